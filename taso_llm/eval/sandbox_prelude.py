"""Entry point of the sandbox child: `python -I -B sandbox_prelude.py`, the run's payload as JSON on stdin.

Trusted code up to the first line of the solution. In order:
  1. read the payload (code, tests, the pass token, the level and its settings) from stdin, then point fd 0 at
     /dev/null: the token is never in argv, the environment or a file, and no fd to it is left open;
  2. level "namespaces" (we are root in fresh pid/mount/net/ipc/uts namespaces, pid 1): expose the interpreter's
     directories to the run's uid, remount everything read-only, mount the capped tmpfs work dir, then fork the
     worker and stay as its supervisor: wait for it and report its wait status on a pipe only this process holds.
     When this process exits, the kernel kills everything left in the pid namespace (setsid daemons included);
  3. the worker: no_new_privs, drop to the run's uid/gid (levels "namespaces", "uid"), not dumpable, the audit
     guard (sandbox_guard.py), then the solution and the tests, each compiled before either runs, in one fresh
     `__main__` module.

Verdict protocol (read by sandbox.py): the tests ran to their end only if the worker exits 0 with the token as the
last line of stdout; 10 = an assertion failed; 11 = any other exception; 12 = an exit (SystemExit) before the tests
ended, whether raised by the solution at import or from inside a call the tests made. The token is written with
os.write captured before the solution ran, and the harness forgets it (token = None) before it touches the
exception of a failed run, so nothing the solution controls runs while a failing run still holds it.
"""

import builtins
import json
import os
import sys

# The functions below look builtins up in a private copy: the solution may patch the builtins module (isinstance,
# print, ...) and must not steer the harness's classification of its own failure.
__builtins__ = dict(builtins.__dict__)
EXIT_FAILED, EXIT_ERROR, EXIT_EARLY = 10, 11, 12
_HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name):
    """A sibling module by file path: not on sys.path and not in sys.modules, so the solution cannot import it.

    Its functions get a private copy of the builtins, so a solution that patches the builtins module (isinstance,
    PermissionError, ...) does not change what the guard's hook computes.
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_taso_{name}", os.path.join(_HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    module.__dict__["__builtins__"] = dict(builtins.__dict__)
    spec.loader.exec_module(module)
    return module


def _read_payload() -> dict:
    payload = json.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return payload


def _supervise(payload: dict, kernel, guard) -> None:
    status_fd = payload.pop("status_fd")
    pid = os.fork()
    if pid == 0:
        os.close(status_fd)
        _worker(payload, kernel, guard)
    payload.clear()  # this process keeps no copy of the token it does not need
    _, status = os.waitpid(pid, 0)
    os.write(status_fd, str(status).encode())
    os._exit(0)  # as pid 1: the kernel now kills whatever the worker left behind


def _worker(payload: dict, kernel, guard) -> None:
    workdir = payload["workdir"]
    os.chdir(workdir)  # after the work dir mount, so the cwd is the tmpfs, not the directory under it
    kernel.drop_privileges(payload["uid"], payload["gid"])
    with open("solution.py", "w", encoding="utf-8") as f:  # for the source lines in tracebacks
        f.write(payload["code"])
    if payload["guard"]:
        guard.install(workdir)
    _run(payload.pop("code"), payload.pop("tests"), payload.pop("token"))


def _run(code: str, tests: str, token: str) -> None:
    import types

    # Everything the harness calls after the solution started is bound here first: the solution may replace
    # builtins (an `exec` that skips the tests), os functions or sys hooks.
    run, write, exit_, excepthook = exec, os.write, os._exit, sys.__excepthook__
    pristine_builtins = dict(builtins.__dict__)  # the tests see these, not a builtins module the solution patched
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    sys.argv = ["solution.py"]
    stage = "compiling"
    try:
        compiled = compile(code, "solution.py", "exec"), compile(tests, "tests.py", "exec")
        stage = "solution"
        run(compiled[0], main.__dict__)
        stage = "tests"
        main.__dict__["__builtins__"] = pristine_builtins
        run(compiled[1], main.__dict__)
    except BaseException as exc:  # noqa: BLE001 - every way out of the untrusted code is a verdict
        token = None  # noqa: F841 - forgotten before anything the solution defined (exc's __str__, ...) runs
        code = _exit_code(exc, stage)
        try:
            excepthook(type(exc), exc, exc.__traceback__)  # C-level printer: needs no frame access
        except BaseException:  # noqa: BLE001 - printing can fail (after a MemoryError, a broken stderr)
            pass
        _flush()
        exit_(code)
    _flush()
    write(1, b"\n" + token.encode() + b"\n")
    exit_(0)


def _exit_code(exc: BaseException, stage: str) -> int:
    if isinstance(exc, AssertionError):
        return EXIT_FAILED
    if isinstance(exc, SystemExit):
        print(f"sandbox: SystemExit during the {stage}; a pass needs the tests to run to their end", file=sys.stderr)
        return EXIT_EARLY
    return EXIT_ERROR


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - the solution may have replaced or closed the streams
            pass


def main() -> None:
    payload = _read_payload()
    kernel, guard = _load("sandbox_kernel"), _load("sandbox_guard")
    if payload["level"] == "namespaces":
        kernel.expose_to_sandbox_uid([*sys.path, os.path.dirname(payload["workdir"])])
        kernel.read_only_filesystem()
        kernel.mount_work_dir(payload["workdir"], payload["disk_bytes"], payload["max_files"], payload["uid"],
                              payload["gid"])
        _supervise(payload, kernel, guard)
    _worker(payload, kernel, guard)


if __name__ == "__main__":
    main()
