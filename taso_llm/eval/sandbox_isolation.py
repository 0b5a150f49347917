"""Isolation levels of the code sandbox: what each one adds, what this machine allows, and the per-run ids.

  namespaces  root, and `unshare` can create pid/mount/net/ipc/uts namespaces: everything of level uid, plus a
              private pid namespace (the parent is invisible; when the supervisor exits the kernel kills every
              process left, setsid daemons included), an empty network namespace, a read-only filesystem (nosuid)
              with the work dir a tmpfs capped in bytes and files (the total-disk cap).
  uid         root without namespaces: the run gets its own unprivileged uid/gid, so RLIMIT_NPROC counts only its
              processes, /proc/<ppid>/environ and root's files are out of reach, and every process of that uid is
              killed at the end (sessions included); the disk cap is a watchdog on the work dir's size.
  process     not root (a developer laptop): the child keeps our uid; rlimits, the audit guard, a process-group
              kill and the disk watchdog. A process that escapes the guard can outlive the run at this level.
Every level: a scrubbed environment, rlimits (memory, CPU, processes, file size, open files), no_new_privs, a
non-dumpable child, the in-process guard (sandbox_guard.py), the wall-clock kill.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass

LEVELS = ("namespaces", "uid", "process")  # strongest first
LAYERS = {
    "namespaces": ("pid/mount/net/ipc/uts namespaces", "per-run uid/gid", "read-only filesystem",
                   "tmpfs work dir (disk cap)", "RLIMIT_NPROC per run uid", "pid-namespace kill"),
    "uid": ("per-run uid/gid", "RLIMIT_NPROC per run uid", "kill by uid", "disk watchdog"),
    "process": ("process-group kill", "disk watchdog"),
}
COMMON_LAYERS = ("scrubbed environment", "rlimits", "no_new_privs", "non-dumpable", "audit guard", "wall-clock kill")
UNSHARE_FLAGS = ("--pid", "--fork", "--kill-child", "--mount", "--mount-proc", "--net", "--ipc", "--uts",
                 "--propagation", "private")
# Per-run ids come from a range above the usual system, user, subuid and SSSD/AD id ranges, below 2**31.
RUN_ID_BASE, RUN_ID_SPAN = 2_113_929_216, 2**20


@dataclass(frozen=True)
class Isolation:
    level: str
    layers: tuple[str, ...]
    reason: str = ""  # why no stronger level, when there is one

    def describe(self) -> str:
        text = f"{self.level}: {', '.join(self.layers)}"
        return f"{text} (not stronger: {self.reason})" if self.reason else text


def make_isolation(level: str, reason: str = "") -> Isolation:
    return Isolation(level, LAYERS[level] + COMMON_LAYERS, reason)


def candidate_levels() -> tuple[tuple[str, str], ...]:
    """(level, why a stronger one is not even tried) for the levels this process could use, strongest first."""
    if os.geteuid() != 0:
        return (("process", "not running as root"),)
    if shutil.which("unshare") is None:
        return (("uid", "no unshare executable"), ("process", "no unshare executable"))
    return (("namespaces", ""), ("uid", ""), ("process", ""))


def command_prefix(level: str) -> list[str]:
    return [shutil.which("unshare") or "unshare", *UNSHARE_FLAGS] if level == "namespaces" else []


def run_ids(level: str) -> tuple[int | None, int | None]:
    """A fresh unprivileged uid (= gid) for this run at levels that switch ids, else (None, None)."""
    if level == "process":
        return None, None
    run_id = RUN_ID_BASE + secrets.randbelow(RUN_ID_SPAN)
    return run_id, run_id


def kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid` (a forked helper takes the uid and signals -1), twice to catch a fork race."""
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # only syscalls here, then _exit: safe in a multi-threaded parent
            try:
                os.setresuid(uid, uid, uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def tree_over(path: str, max_bytes: int, max_files: int) -> bool:
    """Whether the directory holds more than max_bytes (allocated) or max_files entries; stops early once over."""
    total, files, stack = 0, 0, [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            files += 1
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            total += st.st_blocks * 512
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            if total > max_bytes or files > max_files:
                return True
    return False
