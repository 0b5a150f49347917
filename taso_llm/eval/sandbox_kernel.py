"""Kernel-level confinement, applied INSIDE the sandbox child by trusted code before any untrusted code runs.

Loaded by sandbox_prelude.py (by file path, not through sys.path). Everything here runs while the child is still
root inside its own mount namespace (level "namespaces") or is the plain child process (levels "uid", "process"):
  * read_only_filesystem: every mount of the private mount namespace remounted read-only and nosuid;
  * expose_to_sandbox_uid: directories the dropped uid must read (the interpreter's sys.path) that sit below a
    directory it cannot traverse (e.g. a pyenv under /root, mode 0700) are bind-mounted under a fresh tmpfs over
    that directory, which also hides the rest of it;
  * mount_work_dir: a size- and inode-capped tmpfs (the total-disk cap) owned by the sandbox uid;
  * drop_privileges: no_new_privs, groups cleared, uid/gid switched to the run's own unprivileged ids, then the
    process made non-dumpable, which makes /proc/self/{mem,environ,...} root-owned: the untrusted code cannot read
    its own memory through /proc/self/mem (the process itself may still list /proc/self/fd; no fd it holds leads
    to anything secret).
ctypes is only used here, before the audit guard (which refuses ctypes calls) is armed.
"""

import ctypes
import os

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 0x1, 0x2, 0x4, 0x8, 0x20
MS_NOSYMFOLLOW, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 0x100, 0x400, 0x800, 0x1000, 0x4000
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
# per-mount options (mountinfo field 6) that a read-only remount must keep
_KEPT_OPTIONS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                 "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME,
                 "nosymfollow": MS_NOSYMFOLLOW}
# remount failures tolerated only on kernel pseudo-filesystems (never writable by the sandbox uid)
_PSEUDO_PREFIXES = ("/proc", "/sys")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"sandbox setup: {what}: {os.strerror(errno)}")


def prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, value, 0, 0, 0), f"prctl({option}, {value})")


def mount(source, target: str, fstype, flags: int, data=None) -> None:
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {source} on {target}")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (\\040 ...)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points() -> list[tuple[str, set[str]]]:
    """(mount point, per-mount options) of this mount namespace, parents before children."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        rows = [line.split() for line in f]
    return [(_unescape(r[4]), set(r[5].split(","))) for r in rows]


def read_only_filesystem() -> None:
    """Remount every mount read-only and nosuid (other per-mount options kept). Only call in a private namespace."""
    for point, options in mount_points():
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        flags |= sum(bit for name, bit in _KEPT_OPTIONS.items() if name in options)
        try:
            mount(None, point, None, flags)
        except OSError:
            if not point.startswith(_PSEUDO_PREFIXES):
                raise


def _traversable(path: str) -> bool:
    return bool(os.stat(path).st_mode & 0o001)  # the sandbox uid is neither owner nor group: "other" x bit


def _first_blocked_ancestor(path: str) -> str | None:
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        ancestor = "/" + "/".join(parts[:i])
        if not _traversable(ancestor):
            return ancestor
    return None


def expose_to_sandbox_uid(paths) -> None:
    """Make `paths` (directories) reachable for an unprivileged uid when an ancestor is not traversable by it."""
    wanted = sorted({os.path.realpath(p) for p in paths if os.path.isdir(p)})
    blocked: dict[str, list[str]] = {}
    for path in wanted:
        ancestor = _first_blocked_ancestor(path)
        if ancestor is not None:
            blocked.setdefault(ancestor, []).append(path)
    umask = os.umask(0o022)  # the directories made on the tmpfs must be traversable whatever our umask
    try:
        for ancestor, inner in blocked.items():
            top = [p for p in inner if not any(p.startswith(q + "/") for q in inner)]  # nested ones come along
            fds = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in top}  # still reachable after the overmount
            mount("tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m,nr_inodes=1000")
            for path, fd in fds.items():
                os.makedirs(path, mode=0o755, exist_ok=True)
                mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
                os.close(fd)
    finally:
        os.umask(umask)


def mount_work_dir(path: str, disk_bytes: int, max_files: int, uid: int, gid: int) -> None:
    options = f"size={disk_bytes},nr_inodes={max_files},mode=0700,uid={uid},gid={gid}"
    mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, options)


def drop_privileges(uid: int | None, gid: int | None) -> None:
    """no_new_privs; switch to (uid, gid) when given; die with the parent; not dumpable (root-owned /proc/self)."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    if uid is not None:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
            raise OSError(f"sandbox setup: dropping to uid {uid} / gid {gid} did not take")
    prctl(PR_SET_PDEATHSIG, 9)  # SIGKILL; a credential change clears it, so set it after the switch
    prctl(PR_SET_DUMPABLE, 0)
