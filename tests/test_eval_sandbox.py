"""The code sandbox: verdicts, limits, the isolation level (probed, logged, recorded) and level "uid".

The issue 11 escapes and the token hunts are in test_eval_sandbox_escapes.py.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from taso_llm.eval import evaluate
from taso_llm.eval.sandbox import SandboxResult, pass_at_1, run_tests, sandbox_isolation
from taso_llm.eval.sandbox_isolation import UNSHARE_FLAGS

SOLUTION = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"
ROOT = os.geteuid() == 0


def test_passing_solution_passes():
    result = run_tests(SOLUTION, TESTS)
    assert result.passed and result.status == "passed", result.stderr_tail


def test_failing_assert_fails():
    result = run_tests("def add(a, b):\n    return a - b\n", TESTS)
    assert not result.passed and result.status == "failed"
    assert "AssertionError" in result.stderr_tail


def test_exception_is_an_error():
    result = run_tests("def add(a, b):\n    raise ValueError('boom')\n", TESTS)
    assert not result.passed and result.status == "error"
    assert "boom" in result.stderr_tail


def test_syntax_error_is_an_error():
    assert run_tests("def add(a, b) return a", TESTS).status == "error"


@pytest.mark.parametrize("exit_stmt", ["import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"])
def test_exit_before_tests_is_not_a_pass(exit_stmt):
    result = run_tests(exit_stmt + SOLUTION, "assert False\n")
    assert not result.passed and result.status == "error"


@pytest.mark.parametrize("exit_call", ["raise SystemExit(0)", "import os; os._exit(0)"])
def test_exit_from_inside_a_tested_call_is_not_a_pass(exit_call):
    result = run_tests(f"def add(a, b):\n    {exit_call}\n", TESTS)
    assert not result.passed and result.status == "error"


@pytest.mark.parametrize("patch", ["builtins.exec = lambda *args, **kwargs: None",  # would skip the tests
                                   "builtins.abs = lambda x: 0"])  # would bend a tolerance check
def test_patched_builtins_do_not_reach_the_harness_or_the_tests(patch):
    code = f"import builtins\n{patch}\ndef add(a, b):\n    return 0.5\n"
    result = run_tests(code, "assert abs(add(1, 2) - 3) < 1e-6\n")
    assert not result.passed and result.status == "failed"


def test_infinite_loop_killed_within_timeout():
    start = time.monotonic()
    result = run_tests("while True:\n    pass\n", TESTS, timeout_s=1.0)
    assert result.status == "timeout" and not result.passed
    assert time.monotonic() - start < 5


def test_memory_bomb_fails():
    result = run_tests("x = bytearray(4 * 2**30)\n" + SOLUTION, TESTS, memory_mb=256)
    assert not result.passed and result.status in ("error", "killed")


def test_write_outside_workdir_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    result = run_tests(f"open({str(target)!r}, 'w').write('x')\n" + SOLUTION, TESTS)
    assert not result.passed and "outside the sandbox" in result.stderr_tail
    assert not target.exists()


def test_filesystem_changes_outside_refused(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("keep")
    for stmt in [f"os.remove({str(victim)!r})", f"os.rename({str(victim)!r}, 'stolen')",
                 f"os.mkdir({str(tmp_path / 'd')!r})", f"shutil.rmtree({str(tmp_path)!r})",
                 f"os.chdir({str(tmp_path)!r})"]:
        result = run_tests(f"import os, shutil\n{stmt}\n" + SOLUTION, TESTS, isolation="process")
        assert not result.passed and "outside the sandbox" in result.stderr_tail, stmt
    assert victim.read_text() == "keep" and not (tmp_path / "d").exists()


def test_files_inside_workdir_allowed():
    code = ("import os, shutil, tempfile, pathlib\nos.mkdir('d')\nopen('d/f.txt', 'w').write('x')\n"
            "os.rename('d/f.txt', 'd/g.txt')\ntempfile.mkstemp()\npathlib.Path('p.txt').write_text('y')\n"
            "shutil.rmtree('d')\n" + SOLUTION)
    result = run_tests(code, TESTS)
    assert result.passed, result.stderr_tail


@pytest.mark.parametrize("stmt", [
    "import os; os.system('true')",
    "import subprocess; subprocess.run(['true'])",
    "import os; os.execv('/bin/true', ['true'])",
    "import os; os.fork()",
])
def test_processes_refused(stmt):
    result = run_tests(stmt + "\n" + SOLUTION, TESTS)
    assert not result.passed and "not allowed" in result.stderr_tail


def test_common_libraries_still_work_under_the_guard():
    code = ("import collections, dataclasses, enum, logging, threading, typing, numpy\n"
            "P = collections.namedtuple('P', 'x')\nclass Q(typing.NamedTuple):\n    a: int\n"
            "@dataclasses.dataclass\nclass D:\n    x: int\nE = enum.Enum('E', 'a b')\nlogging.warning('ok')\n"
            "t = threading.Thread(target=lambda: None); t.start(); t.join()\n" + SOLUTION)
    result = run_tests(code, TESTS + "assert P(1).x == Q(1).a == D(1).x == int(numpy.int64(1))\n")
    assert result.passed, result.stderr_tail


UID_LEVEL_SCRIPT = r"""
import json, subprocess, sys, time, types, uuid
root, marker = sys.argv[1], f"taso-daemon-{uuid.uuid4().hex}"
for name in ("taso_llm", "taso_llm.eval"):  # the sandbox modules only, not the packages' heavy imports
    module = types.ModuleType(name)
    module.__path__ = [root + "/" + name.replace(".", "/")]
    sys.modules[name] = module
from taso_llm.eval.sandbox import PROBE_CODE, run_tests
if not run_tests(PROBE_CODE, "pass\n", isolation="uid").passed:
    sys.exit(3)
def run(code, tests="pass\n", **kwargs):
    return run_tests(code, tests, isolation="uid", **kwargs)
daemon = ("import os, subprocess\nids = os.getresuid()\n"
          f"subprocess.Popen(['/bin/sh', '-c', 'sleep 30; :', {marker!r}], start_new_session=True)\n")
out = {"daemon": run(daemon, "assert 0 not in ids\n", audit_guard=False).passed}
time.sleep(0.3)
out["daemon_left"] = subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout.decode()
forks = ("import os, time\nn = 0\ntry:\n    for _ in range(50):\n        if os.fork() == 0:\n"
         "            time.sleep(10)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    pass\n")
out["nproc"] = run(forks, "assert n < 4, n\n", max_procs=4, audit_guard=False).passed
disk = run("for i in range(1000):\n    open(f'f{i}', 'wb').write(b'x' * 2**20)\n", disk_mb=8, timeout_s=20)
out["disk"] = [disk.status, disk.stderr_tail[-200:]]
environ = "import os\nopen(f'/proc/{os.getppid()}/environ', 'rb').read()\n"
out["environ"] = run(environ, audit_guard=False).stderr_tail[-200:]
print(json.dumps(out))
"""


@pytest.mark.skipif(not ROOT, reason="level 'uid' exists for root without namespaces")
def test_uid_level_without_namespaces():
    """Level uid needs an interpreter the run's uid can read: this one, else the system's python3, else skip."""
    for python in dict.fromkeys([sys.executable, "/usr/bin/python3"]):
        if Path(python).exists():
            done = subprocess.run([python, "-c", UID_LEVEL_SCRIPT, str(Path(__file__).resolve().parents[1])],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode != 3:
                break
    else:
        pytest.skip("no interpreter here that an unprivileged uid can import from")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["daemon"] and out["daemon_left"] == ""  # every process of the run's uid was killed
    assert out["nproc"]
    assert out["disk"][0] == "killed" and "went over 8 MB" in out["disk"][1]
    assert "Permission denied" in out["environ"]


# --- the isolation level: probed, logged, recorded ----------------------------------------------------------------

def _expected_level() -> str:
    if not ROOT:
        return "process"
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, *UNSHARE_FLAGS, "true"], capture_output=True).returncode == 0:
        return "namespaces"
    return sandbox_isolation().level  # uid or process, depending on the interpreter's location


def test_isolation_is_probed_logged_and_recorded(caplog, monkeypatch):
    from datasets import Dataset

    sandbox_isolation.cache_clear()
    with caplog.at_level(logging.INFO, logger="taso_llm.eval.sandbox"):
        chosen = sandbox_isolation()
        assert sandbox_isolation() is chosen
    logged = [r.getMessage() for r in caplog.records if "code sandbox isolation" in r.getMessage()]
    assert len(logged) == 1 and logged[0].startswith(f"code sandbox isolation: {chosen.level}")
    assert chosen.level == _expected_level()
    monkeypatch.setattr(evaluate, "generate_batched", lambda *args, **kwargs: [f"```python\n{SOLUTION}```"])
    rows = Dataset.from_list([{"prompt": [{"role": "user", "content": "add"}], "tests": TESTS}])
    metrics = evaluate.evaluate_code(None, None, rows)["metrics"]
    assert metrics["pass@1"] == 1.0 and metrics["sandbox_isolation"] == chosen.level


def test_unusable_isolation_rejected():
    with pytest.raises(ValueError, match="isolation"):
        run_tests(SOLUTION, TESTS, isolation="nonsense")


def test_pass_at_1():
    ok, bad = SandboxResult(True, "passed", "", 0.1), SandboxResult(False, "failed", "", 0.1)
    assert pass_at_1([ok, bad, bad, ok]) == 0.5
    assert pass_at_1([True, False, False]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        pass_at_1([])


def test_bad_limits_rejected():
    with pytest.raises(ValueError):
        run_tests(SOLUTION, TESTS, timeout_s=0)
    with pytest.raises(ValueError):
        run_tests(SOLUTION, TESTS, disk_mb=0)
