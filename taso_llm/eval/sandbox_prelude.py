"""Runs INSIDE the sandbox child, before any untrusted code: `python -I -B -c <this file's source> <workdir> <token>`.

It is a guard against accidents in model-written code (a stray file write, a network call, a subprocess), not a
security boundary: code running in the same interpreter can in principle find ways around an in-process check. The
hard limits live outside this file: the separate process, rlimits, a kill of the whole process group on timeout and,
where available, an empty network namespace (`unshare -n`). See sandbox.py.

Layers set up here, in order, before the solution is compiled:
  1. `socket.socket` / `socket.create_connection` replaced by functions that raise (cheap, readable error);
  2. an audit hook (PEP 578; it cannot be removed once added) that refuses
     - file opens for writing/creating, and mkdir/remove/rename/chdir/... on paths outside the work directory;
     - opening a directory outside it (a dir fd would let `dir_fd=` relative opens escape the path check);
     - processes: subprocess, os.system, exec*, spawn*, fork, kill;
     - sockets (creation, connect, bind, DNS), raising rlimits, gc object walks (tampering with this hook), and ctypes
       calls, symbol lookups and raw memory access (loading ctypes itself stays allowed: numpy imports it);
  3. the solution then the tests are exec'd in one namespace; the exit status tells the parent what happened.

Exit protocol (read by sandbox.py): 0 + the token on stdout = passed; 10 = an assertion failed; 11 = any other
exception; 12 = SystemExit before the tests finished. The token guards against a solution that exits 0 early.
"""

import os
import sys

EXIT_FAILED, EXIT_ERROR, EXIT_EARLY = 10, 11, 12


def _install(workdir):
    import socket

    def _no_network(*args, **kwargs):
        raise PermissionError("sandbox: network access is disabled")

    socket.socket = _no_network
    socket.create_connection = _no_network

    root = os.path.realpath(workdir)
    readlink, realpath, fsdecode, isdir = os.readlink, os.path.realpath, os.fsdecode, os.path.isdir
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    busy = [False]  # path resolution below must not re-enter the hook

    def resolve(path, dir_fd=None):
        if isinstance(path, int):  # an fd (e.g. os.chdir(fd)): name its file through /proc
            return readlink(f"/proc/self/fd/{path}")
        path = fsdecode(path)
        if dir_fd is not None and dir_fd >= 0 and not os.path.isabs(path):  # -1: the event's "no dir_fd"
            path = os.path.join(readlink(f"/proc/self/fd/{dir_fd}"), path)
        return realpath(path)

    def inside(path, dir_fd=None):
        try:
            resolved = resolve(path, dir_fd)
        except (OSError, TypeError, ValueError):
            return False
        return resolved == root or resolved.startswith(root + os.sep)

    def deny(what):
        raise PermissionError(f"sandbox: {what} is not allowed")

    # event -> indices of (path, dir_fd) pairs in the audit args (dir_fd index None where the event has none)
    path_events = {
        "os.mkdir": [(0, 2)], "os.remove": [(0, 1)], "os.rmdir": [(0, 1)], "os.rename": [(0, 2), (1, 3)],
        "os.chdir": [(0, None)], "os.chmod": [(0, 2)], "os.chown": [(0, 3)], "os.truncate": [(0, None)],
        "os.utime": [(0, 3)], "os.link": [(0, 2), (1, 3)], "os.symlink": [(1, 2)], "os.mkfifo": [(0, 2)],
        "os.mknod": [(0, 3)], "os.setxattr": [(0, None)], "os.removexattr": [(0, None)],
        "shutil.rmtree": [(0, 1)], "shutil.copyfile": [(1, None)], "shutil.copytree": [(1, None)],
        "shutil.move": [(1, None)], "shutil.make_archive": [(0, None)], "shutil.unpack_archive": [(1, None)],
        "shutil.copymode": [(1, None)], "shutil.copystat": [(1, None)],
    }
    process_events = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                      "os.forkpty", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "os.startfile"}
    other_denied = {"resource.setrlimit", "resource.prlimit", "gc.get_objects", "gc.get_referrers",
                    "gc.get_referents", "socket.__new__", "socket.connect", "socket.bind", "socket.sendto",
                    "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"}

    def check(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & write_flags)
            # An int path is an fd that an earlier, already checked open returned (or an inherited stdio stream).
            if path is None or isinstance(path, int) or inside(path):
                return
            if writing:
                deny(f"writing {path!r} (outside the sandbox directory)")
            if isdir(path):
                deny(f"opening the directory {path!r} (outside the sandbox directory)")
        elif event in path_events:
            for p, d in path_events[event]:
                if p < len(args) and not inside(args[p], args[d] if d is not None and d < len(args) else None):
                    deny(f"{event} on {args[p]!r} (outside the sandbox directory)")
        elif event in process_events:
            deny(f"starting or signalling processes ({event})")
        elif event in other_denied or (event.startswith("ctypes.") and event != "ctypes.dlopen"):
            deny(event)

    def hook(event, args):
        if busy[0]:
            return
        busy[0] = True
        try:
            check(event, args)
        finally:
            busy[0] = False

    sys.addaudithook(hook)


def _run(token):
    import traceback

    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    with open("solution.py", encoding="utf-8") as f:
        solution = f.read()
    with open("tests.py", encoding="utf-8") as f:
        tests = f.read()
    stage = "solution"
    try:
        exec(compile(solution, "solution.py", "exec"), namespace)
        stage = "tests"
        exec(compile(tests, "tests.py", "exec"), namespace)
    except AssertionError:
        traceback.print_exc()
        code = EXIT_FAILED
    except SystemExit as exc:
        # The tests may end with unittest-style sys.exit(0); an exit from the solution means the tests never ran.
        if stage == "tests" and exc.code in (0, None):
            code = 0
        else:
            print(f"sandbox: SystemExit({exc.code!r}) in the {stage}", file=sys.stderr)
            code = EXIT_EARLY if stage == "solution" else EXIT_FAILED
    except BaseException:  # noqa: BLE001 - every other exception (MemoryError included) is an error result
        try:
            traceback.print_exc()
        except BaseException:  # noqa: BLE001 - printing can fail after a MemoryError
            pass
        code = EXIT_ERROR
    else:
        code = 0
    if code == 0:
        sys.stdout.write("\n" + token + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _workdir, _token = sys.argv[1], sys.argv[2]
    sys.argv = ["solution.py"]
    _install(_workdir)
    _run(_token)
