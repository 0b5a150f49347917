"""Run model-written code against its tests in a separate, limited Python process.

Layers, strongest first:
  * a separate `python -I -B` process (isolated mode: no user site, PYTHON* variables ignored; no bytecode writes)
    in a fresh temporary working directory that is deleted afterwards, with a minimal environment (HOME and TMPDIR
    point into it; no proxy variables);
  * kernel resource limits set in preexec_fn: address space (memory), CPU seconds, processes, file size, open files;
  * its own session / process group, killed as a whole when the wall-clock timeout passes;
  * `unshare -n` (an empty network namespace) when it works here (needs root or user namespaces); probed once and
    skipped otherwise;
  * the in-process prelude (sandbox_prelude.py): socket functions replaced and an audit hook refusing writes outside
    the work directory, processes and network. That layer is a guard against accidents, not a kernel sandbox.
stdout/stderr go to files beside (not inside) the work directory, so a print loop is capped by RLIMIT_FSIZE instead
of filling the parent's memory.
"""

from __future__ import annotations

import functools
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from taso_llm.eval import sandbox_prelude

STATUSES = ("passed", "failed", "timeout", "error", "killed")
STDERR_TAIL_CHARS = 2000
FILE_SIZE_LIMIT = 16 * 2**20
OPEN_FILES_LIMIT = 64


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # one of STATUSES
    stderr_tail: str
    seconds: float


@functools.lru_cache(maxsize=1)
def _unshare_prefix() -> tuple[str, ...]:
    """`("unshare", "-n")` if an empty network namespace can be created here, else () (the guard still applies)."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    try:
        ok = subprocess.run([exe, "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return (exe, "-n") if ok else ()


def _limits(memory_mb: int, cpu_s: int, max_procs: int):
    def apply():  # runs in the child between fork and exec; only async-signal-safe-ish calls here
        mem = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))  # SIGXCPU at soft, SIGKILL at hard
        resource.setrlimit(resource.RLIMIT_NPROC, (max_procs, max_procs))  # root is exempt; the prelude still refuses
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
        resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES_LIMIT, OPEN_FILES_LIMIT))
    return apply


def _tail(path: Path, chars: int) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 4 * chars))
        return f.read().decode("utf-8", errors="replace")[-chars:]


def _status(returncode: int, stdout_tail: str, token: str) -> str:
    if returncode == 0:
        return "passed" if token in stdout_tail else "error"  # exit 0 without the token: left before the tests ran
    if returncode == sandbox_prelude.EXIT_FAILED:
        return "failed"
    if returncode < 0:  # a signal: SIGKILL/SIGXCPU from rlimits, SIGSEGV from a crash
        return "killed"
    return "error"


def run_tests(code: str, tests: str, timeout_s: float = 5.0, memory_mb: int = 512, max_procs: int = 32,
              network_namespace: bool = True) -> SandboxResult:
    """Run `code` then `tests` (one namespace, as `code + "\\n" + tests`) in a limited child process.

    passed: the tests ran to the end; failed: an assertion (or a non-zero SystemExit) in the tests; error: any other
    exception, a syntax error, a refused operation, or an exit before the tests; timeout: wall clock exceeded;
    killed: ended by a signal (CPU limit, memory, crash).
    """
    if timeout_s <= 0 or memory_mb <= 0 or max_procs <= 0:
        raise ValueError(f"run_tests: timeout_s, memory_mb and max_procs must be positive, got "
                         f"{timeout_s}, {memory_mb}, {max_procs}")
    outer = Path(tempfile.mkdtemp(prefix="taso-sandbox-"))
    start = time.monotonic()
    try:
        workdir = outer / "work"
        workdir.mkdir()
        (workdir / "solution.py").write_text(code, encoding="utf-8")
        (workdir / "tests.py").write_text(tests, encoding="utf-8")
        token = secrets.token_hex(16)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8"}
        prefix = _unshare_prefix() if network_namespace else ()
        cmd = [*prefix, sys.executable, "-I", "-B", "-c", Path(sandbox_prelude.__file__).read_text(encoding="utf-8"),
               str(workdir), token]
        with open(outer / "stdout", "wb") as out, open(outer / "stderr", "wb") as err:
            proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True,
                                    preexec_fn=_limits(memory_mb, int(timeout_s) + 1, max_procs))
            try:
                returncode = proc.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)  # also reaps anything the child left behind in its group
        seconds = time.monotonic() - start
        stderr_tail = _tail(outer / "stderr", STDERR_TAIL_CHARS)
        if timed_out:
            return SandboxResult(False, "timeout", stderr_tail, seconds)
        status = _status(returncode, _tail(outer / "stdout", 200), token)
        return SandboxResult(status == "passed", status, stderr_tail, seconds)
    finally:
        shutil.rmtree(outer, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def pass_at_1(results) -> float:
    """Fraction of problems whose single (greedy) sample passed. Accepts SandboxResults or bools."""
    results = list(results)
    if not results:
        raise ValueError("pass_at_1: no results to score")
    return sum(bool(r.passed if isinstance(r, SandboxResult) else r) for r in results) / len(results)
