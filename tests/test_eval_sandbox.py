import time

import pytest

from taso_llm.eval.sandbox import SandboxResult, pass_at_1, run_tests

SOLUTION = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"


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
        result = run_tests(f"import os, shutil\n{stmt}\n" + SOLUTION, TESTS)
        assert not result.passed and "outside the sandbox" in result.stderr_tail, stmt
    assert victim.read_text() == "keep" and not (tmp_path / "d").exists()


def test_files_inside_workdir_allowed():
    code = ("import os, shutil, tempfile\nos.mkdir('d')\nopen('d/f.txt', 'w').write('x')\n"
            "os.rename('d/f.txt', 'd/g.txt')\ntempfile.mkstemp()\nshutil.rmtree('d')\n" + SOLUTION)
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


@pytest.mark.parametrize("stmt", [
    "import socket; socket.create_connection(('127.0.0.1', 9))",
    "import socket; socket.socket().connect(('127.0.0.1', 9))",
    "import _socket; _socket.socket().connect(('127.0.0.1', 9))",
])
def test_network_refused(stmt):
    result = run_tests(stmt + "\n" + SOLUTION, TESTS)
    assert not result.passed and "PermissionError" in result.stderr_tail


def test_network_namespace_fallback_still_refuses():
    result = run_tests("import socket; socket.create_connection(('127.0.0.1', 9))\n" + SOLUTION, TESTS,
                       network_namespace=False)
    assert not result.passed


def test_pass_at_1():
    ok, bad = SandboxResult(True, "passed", "", 0.1), SandboxResult(False, "failed", "", 0.1)
    assert pass_at_1([ok, bad, bad, ok]) == 0.5
    assert pass_at_1([True, False, False]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        pass_at_1([])


def test_bad_limits_rejected():
    with pytest.raises(ValueError):
        run_tests(SOLUTION, TESTS, timeout_s=0)
