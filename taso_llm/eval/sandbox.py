"""Run model-written code against its tests in a separate, confined Python process (code pass@1).

Threat model: the solution is arbitrary Python that may try to fake a pass, read secrets or leave something behind.
Layers, outermost first (sandbox_isolation.py says which exist at each level; the level in use is probed once,
logged, and recorded in code evaluation results as metrics["sandbox_isolation"]):
  * kernel: per-run unprivileged uid/gid when we are root; private pid/mount/network namespaces where the kernel
    allows them, with a read-only filesystem and a size-capped tmpfs work dir; rlimits (address space, CPU seconds,
    processes, file size, open files); no_new_privs; a non-dumpable child (/proc/self/mem closed to it);
  * process: a scrubbed environment, `python -I -B`, stdin carrying only the payload, stdout/stderr to files
    beside (not inside) the work dir, a wall-clock limit, then everything killed (the pid namespace, every process
    of the run's uid, or the process group, by level) and the directory deleted;
  * in-process: the audit guard (sandbox_guard.py), the last line of defence, not the only one.

The verdict. The solution and the tests run in one interpreter (they share a namespace), so anything the harness can
do, code in that interpreter could imitate, given the harness's secrets. A pass therefore needs a 128-bit token
that is fresh per run and that the solution cannot obtain: it travels on the stdin pipe, read to EOF and replaced by
/dev/null before the solution runs, so it is in no argv, environment, file or open fd; /proc/self/mem cannot be
opened by the non-dumpable, unprivileged child; and the only copy, a local of the harness's frame, is out of
Python's reach because the guard refuses every route to frame objects (and ctypes, gc walks, hand-built code,
further audit hooks). The harness binds exec, os.write and os._exit before the solution runs (a patched builtin
cannot skip the tests), gives the tests the builtins as they were before the solution ran, prints the token only
after the tests ran to their end (an exit from inside a tested call is not a pass) and drops it before touching a
failure. The parent then requires exit status 0 (reported, at level "namespaces", by the supervisor on a pipe the
worker does not hold) and the token as the last line of stdout.
Residual risk: a memory-unsafe primitive in the interpreter or an importable native library (crafted marshal data,
numpy's array interface on raw addresses) could still scan the process's own memory; every kernel layer above still
applies to such code. And a solution can still subvert the tests' own logic (an object whose __eq__ is always
True, a patched module the tests import): a sandbox cannot judge that, the tests must.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from taso_llm.eval import sandbox_isolation as iso
from taso_llm.eval import sandbox_prelude

STATUSES = ("passed", "failed", "timeout", "error", "killed")
STDERR_TAIL_CHARS = 2000
FILE_SIZE_LIMIT = 16 * 2**20
OPEN_FILES_LIMIT = 64
MAX_FILES = 10_000
WATCHDOG_INTERVAL_S = 0.02
PRELUDE = str(Path(sandbox_prelude.__file__).resolve())
# a probe run at a uid-switching level must import modules the prelude did not (decimal: a C extension), use
# tempfile, write in its work dir, and no longer be root
PROBE_CODE = ("import decimal, fractions, os, tempfile\nwith tempfile.NamedTemporaryFile() as f:\n"
              "    f.write(b'x')\nassert os.geteuid() != 0\n")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # one of STATUSES
    stderr_tail: str
    seconds: float


@functools.lru_cache(maxsize=1)
def sandbox_isolation() -> iso.Isolation:
    """The strongest level that works here, found by running a probe solution at each; logged once."""
    reasons = []
    for level, reason in iso.candidate_levels():
        if reason:
            reasons.append(reason)
        if level == "process":
            break
        result = run_tests(PROBE_CODE, "pass\n", timeout_s=30, isolation=level)
        if result.passed:
            break
        reasons.append(f"level {level} failed its probe: {result.status}: {result.stderr_tail[-300:].strip()}")
    if level == "process" and os.geteuid() == 0:
        reasons.append("so the child runs as root, confined only by rlimits and the in-process guard")
    chosen = iso.make_isolation(level, "; ".join(dict.fromkeys(reasons)))
    (logger.info if level == "namespaces" else logger.warning)("code sandbox isolation: %s", chosen.describe())
    return chosen


def _limits(memory_mb: int, cpu_s: int, max_procs: int):
    def apply():  # runs in the child between fork and exec; only async-signal-safe-ish calls here
        mem = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))  # SIGXCPU at soft, SIGKILL at hard
        resource.setrlimit(resource.RLIMIT_NPROC, (max_procs, max_procs))  # counts the run's own uid (root is exempt)
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
        resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES_LIMIT, OPEN_FILES_LIMIT))
    return apply


def _tail(path: Path, chars: int) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 4 * chars))
        return f.read().decode("utf-8", errors="replace")[-chars:]


def _status(returncode: int, stdout_tail: str, token: str) -> str:
    if returncode == 0:  # exit 0 without the token as the last line: left before the tests ended
        return "passed" if stdout_tail.rstrip("\n").rsplit("\n", 1)[-1] == token else "error"
    if returncode == sandbox_prelude.EXIT_FAILED:
        return "failed"
    if returncode < 0:  # a signal: SIGKILL/SIGXCPU from rlimits, SIGSEGV from a crash
        return "killed"
    return "error"


def _check_level(isolation: str | None) -> str:
    if isolation is None:
        return sandbox_isolation().level
    usable = [level for level, _ in iso.candidate_levels()]
    if isolation not in usable:
        raise ValueError(f"run_tests: isolation {isolation!r} is not usable here (usable: {usable})")
    return isolation


def run_tests(code: str, tests: str, timeout_s: float = 5.0, memory_mb: int = 512, max_procs: int = 32,
              disk_mb: int = 64, isolation: str | None = None, audit_guard: bool = True) -> SandboxResult:
    """Run `code` then `tests` (one namespace, as `code + "\\n" + tests`) in a confined child process.

    passed: the tests ran to the end; failed: an assertion (or a non-zero SystemExit) in the tests; error: any other
    exception, a syntax error, a refused operation, or an exit before the tests ended; timeout: wall clock exceeded;
    killed: ended by a signal (CPU limit, memory, crash) or by the disk watchdog. disk_mb caps the work dir's total
    size. isolation: None for the strongest level that works here (see sandbox_isolation()), or a named weaker one;
    audit_guard=False leaves out the in-process guard, only to test the kernel layers on their own.
    """
    if timeout_s <= 0 or memory_mb <= 0 or max_procs <= 0 or disk_mb <= 0:
        raise ValueError(f"run_tests: timeout_s, memory_mb, max_procs and disk_mb must be positive, got "
                         f"{timeout_s}, {memory_mb}, {max_procs}, {disk_mb}")
    level = _check_level(isolation)
    outer = Path(tempfile.mkdtemp(prefix="taso-sandbox-"))
    start = time.monotonic()
    try:
        os.chmod(outer, 0o711)  # the run's uid may pass through (to its work dir), not list or read
        workdir = outer / "work"
        workdir.mkdir(mode=0o700)
        uid, gid = iso.run_ids(level)
        if level == "uid":
            os.chown(workdir, uid, gid)
        token = secrets.token_hex(16)
        payload = {"token": token, "code": code, "tests": tests, "workdir": str(workdir), "level": level,
                   "uid": uid, "gid": gid, "disk_bytes": disk_mb * 2**20, "max_files": MAX_FILES,
                   "guard": audit_guard}
        outcome = _execute(payload, outer, level, timeout_s, memory_mb, max_procs)
        seconds = time.monotonic() - start
        stderr_tail = _tail(outer / "stderr", STDERR_TAIL_CHARS)
        if outcome.note:
            stderr_tail = (stderr_tail + "\n" + outcome.note)[-STDERR_TAIL_CHARS:]
        status = outcome.status or _status(outcome.returncode, _tail(outer / "stdout", 200), token)
        return SandboxResult(status == "passed", status, stderr_tail, seconds)
    finally:
        shutil.rmtree(outer, ignore_errors=True)


@dataclass(frozen=True)
class _Outcome:
    returncode: int | None  # the worker's exit code, negative for a signal; None when it has none
    status: str | None = None  # the status when it does not follow from the exit code
    note: str = ""  # appended to stderr_tail


def _execute(payload: dict, outer: Path, level: str, timeout_s: float, memory_mb: int, max_procs: int) -> _Outcome:
    """Start the child, feed it the payload, wait under the limits, kill what is left."""
    workdir = payload["workdir"]
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    status_read, status_write = os.pipe() if level == "namespaces" else (None, None)
    payload["status_fd"] = status_write
    cmd = [*iso.command_prefix(level), sys.executable, "-I", "-B", PRELUDE]
    try:
        with open(outer / "stdout", "wb") as out, open(outer / "stderr", "wb") as err:
            proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True,
                                    pass_fds=() if status_write is None else (status_write,),
                                    preexec_fn=_limits(memory_mb, int(timeout_s) + 1, max_procs))
            try:
                if status_write is not None:
                    os.close(status_write)
                    status_write = None
                threading.Thread(target=_feed, args=(proc.stdin, json.dumps(payload).encode()), daemon=True).start()
                outcome = _wait(proc, time.monotonic() + timeout_s,
                                None if level == "namespaces" else (workdir, payload["disk_bytes"]))
            finally:
                iso.kill_group(proc)
                if level == "uid":
                    iso.kill_uid(payload["uid"])
        if outcome is not None:
            return outcome
        if level != "namespaces":
            return _Outcome(proc.returncode)
        returncode = _read_status(status_read)
        if returncode is None:
            return _Outcome(None, "error", "sandbox: no exit status from the supervisor (it failed before the worker)")
        return _Outcome(returncode)
    finally:
        for fd in (status_read, status_write):
            if fd is not None:
                os.close(fd)


def _feed(pipe, data: bytes) -> None:
    """Write the payload from a thread: a payload over the pipe buffer must not hold up the wall-clock limit."""
    with contextlib.suppress(BrokenPipeError, OSError):
        with pipe:
            pipe.write(data)


def _wait(proc: subprocess.Popen, deadline: float, watch) -> _Outcome | None:
    """None once the child exited; else the timeout or the disk watchdog's verdict (watch: (dir, max bytes))."""
    while True:
        try:
            proc.wait(timeout=max(0.0, min(WATCHDOG_INTERVAL_S, deadline - time.monotonic())))
            return None
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() >= deadline:
            return _Outcome(None, "timeout")
        if watch is not None and iso.tree_over(watch[0], watch[1], MAX_FILES):
            return _Outcome(None, "killed",
                            f"sandbox: the work directory went over {watch[1] // 2**20} MB or {MAX_FILES} files")


def _read_status(fd: int) -> int | None:
    """The worker's wait status as the supervisor reported it (None: the supervisor died or failed first)."""
    data = b""
    while chunk := os.read(fd, 64):
        data += chunk
    return os.waitstatus_to_exitcode(int(data)) if data else None


def pass_at_1(results) -> float:
    """Fraction of problems whose single (greedy) sample passed. Accepts SandboxResults or bools."""
    results = list(results)
    if not results:
        raise ValueError("pass_at_1: no results to score")
    return sum(bool(r.passed if isinstance(r, SandboxResult) else r) for r in results) / len(results)
