"""The in-process guard of the sandbox child: an audit hook (PEP 578) plus a few patched entry points.

Loaded by sandbox_prelude.py (by file path) and installed last, just before the untrusted code runs. It is one layer
of several (see sandbox.py): the kernel layers hold even if this one is bypassed. It refuses
  * writes, and directory opens, outside the work directory; a relative path that climbs out of its base with ".."
    is outside whatever its base (os.open's audit event does not carry dir_fd, so the base cannot be trusted); no
    symlinks (a link could point a later dir_fd-relative path anywhere);
  * starting or signalling processes (subprocess, os.system, exec*, spawn*, fork, kill, and
    `_posixsubprocess.fork_exec`, which has no audit event of its own: it is replaced, and re-importing the module
    to get the original back is refused);
  * opening /proc/<pid>/{mem,environ,pagemap,cmdline} of any process;
  * sockets, raising rlimits, ctypes calls and raw memory access, new code objects built by hand (crafted bytecode
    reads memory) and reassigning a function's code;
  * every way to a frame object: sys._getframe, sys._current_frames, tracing and profiling hooks, the frame
    attributes of tracebacks, generators and coroutines, gc's object walks, and the frame argument of signal
    handlers. Frames are how code would reach the harness's locals (the pass token) or this hook's own state;
  * further audit hooks (one would see the tests' code object when the harness execs it).
The hook has no switch: nothing in it can turn it off, and it keeps no mutable state.
"""

import os
import re
import sys


def install(workdir: str) -> None:
    import _posixsubprocess
    import _signal
    import socket

    def refuse(*args, **kwargs):
        raise PermissionError("sandbox: network access and starting processes are not allowed")

    socket.socket = socket.create_connection = refuse
    _posixsubprocess.fork_exec = refuse
    _signal.signal = _signal_without_frames(_signal.signal)
    sys.addaudithook(_make_hook(os.path.realpath(workdir)))


def _signal_without_frames(real_signal):
    """signal.signal, but the handler gets None instead of the interrupted frame."""
    def signal(signalnum, handler):
        if callable(handler):
            user_handler = handler

            def handler(signum, frame):
                return user_handler(signum, None)
        return real_signal(signalnum, handler)
    return signal


def _make_hook(root: str):
    # Only C functions bound here and this module's private builtins (see sandbox_prelude._load) are called at event
    # time: the solution can monkeypatch os, os.path or the builtins module, and must not change what this sees.
    lstat, stat, readlink, getcwd, fspath = os.lstat, os.stat, os.readlink, os.getcwd, os.fspath
    encoding = sys.getfilesystemencoding()
    file_type, symlink, directory = 0o170000, 0o120000, 0o040000
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    prefix = root + "/"
    # memory and environment of any process (ours included): the kernel refuses these to a non-dumpable child of
    # another uid, but at level "process" under root only this check stands between the solution and them
    proc_secrets = re.compile(r"/proc/[^/]+/(?:task/[^/]+/)?(?:mem|environ|pagemap|cmdline)")

    def text(path) -> str:
        path = fspath(path)
        return path.decode(encoding, "surrogateescape") if type(path) is bytes else path

    def climbs(path: str) -> bool:
        """Whether a relative path goes above its base directory (".." past the start), read lexically."""
        depth = 0
        for part in path.split("/"):
            depth += -1 if part == ".." else 0 if part in ("", ".") else 1
            if depth < 0:
                return True
        return False

    def resolve(path: str) -> str:
        """The absolute path with every symlink followed, as os.path.realpath (missing parts taken literally)."""
        parts = [p for p in (path if path.startswith("/") else getcwd() + "/" + path).split("/") if p not in ("", ".")]
        done, hops = [], 0
        while parts:
            part = parts.pop(0)
            if part == "..":
                done = done[:-1]
                continue
            candidate = "/" + "/".join(done + [part])
            try:
                is_link = lstat(candidate).st_mode & file_type == symlink
            except OSError:
                is_link = False
            if not is_link:
                done.append(part)
                continue
            hops += 1
            if hops > 40:
                raise OSError("sandbox: too many levels of symbolic links")
            target = readlink(candidate)
            done = [] if target.startswith("/") else done
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
        return "/" + "/".join(done)

    def inside(path, relative_to_dir_fd=False) -> bool:
        """Whether `path` names something in the work directory, whatever directory a relative path is taken from."""
        try:
            if type(path) is int:  # an fd (os.fchdir, os.fchmod, ...): name it through /proc
                resolved = readlink(f"/proc/self/fd/{path}")
            else:
                path = text(path)
                if not path.startswith("/"):
                    if climbs(path):
                        return False  # above its base, which may be any directory in the work dir
                    if relative_to_dir_fd:
                        return True  # every directory fd here is inside: opening one outside is refused
                resolved = resolve(path)
        except (OSError, TypeError, ValueError):
            return False
        return resolved == root or resolved.startswith(prefix)

    def is_dir(path: str) -> bool:
        try:
            return stat(path).st_mode & file_type == directory
        except OSError:
            return False

    def deny(what):
        raise PermissionError(f"sandbox: {what} is not allowed")

    # event -> indices of (path, dir_fd) pairs in the audit args (dir_fd index None where the event has none)
    path_events = {
        "os.mkdir": ((0, 2),), "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.rename": ((0, 2), (1, 3)),
        "os.chdir": ((0, None),), "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.truncate": ((0, None),),
        "os.utime": ((0, 3),), "os.link": ((0, 2), (1, 3)), "os.mkfifo": ((0, 2),), "os.mknod": ((0, 3),),
        "os.setxattr": ((0, None),), "os.removexattr": ((0, None),), "shutil.rmtree": ((0, 1),),
        "shutil.copyfile": ((1, None),), "shutil.copytree": ((1, None),), "shutil.move": ((1, None),),
        "shutil.make_archive": ((0, None),), "shutil.unpack_archive": ((1, None),),
        "shutil.copymode": ((1, None),), "shutil.copystat": ((1, None),), "sqlite3.connect": ((0, None),),
    }
    process_events = frozenset({
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
        "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "os.startfile", "os.symlink"})
    frame_attributes = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back", "f_locals",
                                  "f_globals", "f_builtins"})
    replaced_modules = frozenset({"_posixsubprocess", "_signal", "socket", "_socket"})
    other_denied = frozenset({
        "resource.setrlimit", "resource.prlimit", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
        "socket.gethostbyname", "socket.gethostbyaddr", "sys._current_frames", "sys._current_exceptions",
        "sys.settrace", "sys.setprofile", "sys.monitoring.register_callback", "code.__new__",
        "sqlite3.enable_load_extension", "sqlite3.load_extension"})

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            # An int path is an fd that an earlier, already checked open returned (or an inherited stdio stream).
            if path is None or type(path) is int:
                return
            name = text(path)
            if proc_secrets.fullmatch(resolve(name)):
                deny(f"opening {name!r}")
            if inside(name):
                return
            if any(c in mode for c in "wax+") if type(mode) is str else flags & write_flags:
                deny(f"writing {name!r} (outside the sandbox directory)")
            if not name.startswith("/") or is_dir(name):
                deny(f"opening {name!r} (a directory, or a relative path climbing out of the sandbox directory)")
        elif event in path_events:
            for p, d in path_events[event]:
                dir_fd_given = d is not None and d < len(args) and args[d] not in (None, -1)
                if p < len(args) and not inside(args[p], dir_fd_given):
                    deny(f"{event} on {args[p]!r} (outside the sandbox directory)")
        elif event in process_events:
            deny(f"starting or signalling processes, or symlinks ({event})")
        elif event == "sys._getframe":  # ValueError, as for a too-deep frame: logging and namedtuple cope with it
            raise ValueError("sandbox: the call stack is not available")
        elif event == "object.__getattr__" and args[1] in frame_attributes:
            deny(f"reading {args[1]}")
        elif event == "object.__setattr__" and args[1] == "__code__":
            deny("replacing a function's code")
        elif event == "sys.addaudithook":  # a RuntimeError makes CPython drop the new hook silently
            raise RuntimeError("sandbox: adding audit hooks is not allowed")
        elif event == "import" and args[0] in replaced_modules:
            deny(f"re-importing {args[0]}")
        elif event in other_denied or (event.startswith("ctypes.") and event != "ctypes.dlopen"):
            deny(event)

    return hook
