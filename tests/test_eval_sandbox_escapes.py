"""Every escape of issue 11 section 1 as a test that must hold, plus the verdict's token hunts.

Each runs with the audit guard on (at the best level here, and at level "process", where the guard is all there
is) and, for the kernel layers, with the guard off (audit_guard=False) at level "namespaces".
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from taso_llm.eval.sandbox import run_tests, sandbox_isolation

SOLUTION = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"
ROOT = os.geteuid() == 0
GUARD_LEVELS = [None, "process"]  # None: the best level here


@pytest.fixture
def namespaces():
    if sandbox_isolation().level != "namespaces":
        pytest.skip("needs root and working namespaces (level 'namespaces')")


@pytest.fixture
def shared_dir():
    """World-writable, like /tmp: file permissions alone do not keep the run's uid out of it."""
    path = Path(tempfile.mkdtemp(prefix="taso-sandbox-test-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("stmt", [
    "import socket; socket.create_connection(('127.0.0.1', 9))",
    "import socket; socket.socket().connect(('127.0.0.1', 9))",
    "import _socket; _socket.socket().connect(('127.0.0.1', 9))",
])
@pytest.mark.parametrize("isolation", GUARD_LEVELS)
def test_network_refused(stmt, isolation):
    result = run_tests(stmt + "\n" + SOLUTION, TESTS, isolation=isolation)
    assert not result.passed and "PermissionError" in result.stderr_tail


# --- the verdict: the pass token cannot be read, so a pass cannot be forged --------------------------------------

FORGE = '''import os, sys
def forge(found):
    """Write what looks like the token as the last stdout line and exit 0, as a passing run does."""
    if isinstance(found, str) and len(found) == 32:
        os.write(1, b"\\n" + found.encode() + b"\\n")
        os._exit(0)
def scan(blob):
    import re
    for token in re.findall(rb"[0-9a-f]{32}", blob):
        forge(token.decode())
def walk(frame):
    while frame is not None:
        forge(frame.f_locals.get("token"))
        frame = frame.f_back
'''
CMDLINE_EXPLOIT = ("import os\nt=open('/proc/self/cmdline','rb').read().split(b'\\0')[-2].decode()\n"
                   "print('\\n'+t,flush=True);os._exit(0)\n")  # verbatim from the issue
HUNTS = {
    "argv": "scan(open('/proc/self/cmdline', 'rb').read())",
    "environment": "scan(repr(dict(os.environ)).encode()); scan(open('/proc/self/environ', 'rb').read())",
    "stdin": "scan(os.read(0, 1 << 20))",
    "open fds": "for fd in range(64):\n    try: scan(os.pread(fd, 1 << 20, 0))\n    except OSError: pass",
    "fds reopened via /proc": "for n in os.listdir('/proc/self/fd'):\n"
                              "    try: scan(open(f'/proc/self/fd/{n}', 'rb').read())\n    except OSError: pass",
    "work dir files": "for n in os.listdir('.'): scan(open(n, 'rb').read())",
    "memory": "import re\nmem = open('/proc/self/mem', 'rb', 0)\nfor line in open('/proc/self/maps'):\n"
              "    lo, hi = (int(x, 16) for x in line.split()[0].split('-'))\n"
              "    try: mem.seek(lo); scan(mem.read(min(hi - lo, 1 << 24)))\n    except (OSError, ValueError): pass",
    "frames: sys._getframe": "walk(sys._getframe())",
    "frames: traceback": "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    walk(e.__traceback__.tb_frame)",
    "frames: generator": "def g():\n    walk(gen.gi_frame)\n    yield\ngen = g()\nnext(gen)",
    "frames: signal handler": "import signal\nsignal.signal(signal.SIGUSR1, lambda n, f: walk(f))\n"
                              "signal.raise_signal(signal.SIGUSR1)",
    "frames: profiler": "sys.setprofile(lambda f, e, a: walk(f))\nlen('x')",
    "gc": "import gc\nfor o in gc.get_objects():\n    if isinstance(o, dict): forge(o.get('token'))",
}
KERNEL_HUNTS = ["argv", "environment", "stdin", "open fds", "fds reopened via /proc", "memory"]


@pytest.mark.parametrize("isolation", GUARD_LEVELS)
def test_token_in_argv_cannot_forge_a_pass(isolation):
    result = run_tests(CMDLINE_EXPLOIT, "assert False\n", isolation=isolation)
    assert not result.passed


@pytest.mark.parametrize("hunt", HUNTS)
@pytest.mark.parametrize("isolation", GUARD_LEVELS)
def test_token_hunt_cannot_forge_a_pass(hunt, isolation):
    result = run_tests(FORGE + HUNTS[hunt] + "\n", "assert False\n", isolation=isolation)
    assert not result.passed, result.stderr_tail


@pytest.mark.parametrize("hunt", KERNEL_HUNTS)
def test_token_hunt_cannot_forge_a_pass_without_the_guard(namespaces, hunt):
    result = run_tests(FORGE + HUNTS[hunt] + "\n", "assert False\n", audit_guard=False)
    assert not result.passed, result.stderr_tail
    if hunt == "memory":  # closed by the kernel, not merely unlucky
        assert "Permission denied: '/proc/self/mem'" in result.stderr_tail


def test_token_hunt_control_frames_do_forge_without_the_guard():
    """The hunts are real: with the guard left out, walking the frames finds the token and fakes a pass."""
    result = run_tests(FORGE + HUNTS["frames: sys._getframe"] + "\n", "assert False\n", audit_guard=False)
    assert result.passed


# --- the write guard, processes, sessions -------------------------------------------------------------------------

def _dir_fd_escape(target: Path) -> str:
    """The issue's escape: a dir fd of the work dir, a chdir deeper, then a '..' path relative to the dir fd."""
    return (f"import os\nbase = os.open('.', os.O_RDONLY)\nrel = os.path.relpath({str(target)!r}, os.getcwd())\n"
            "deep = '/'.join(['d'] * rel.count('..'))\nos.makedirs(deep)\nos.chdir(deep)\n"
            "fd = os.open(rel, os.O_WRONLY | os.O_CREAT, dir_fd=base)\nos.write(fd, b'escaped')\n")


@pytest.mark.parametrize("isolation", GUARD_LEVELS)
def test_dir_fd_write_escape_refused(shared_dir, isolation):
    result = run_tests(_dir_fd_escape(shared_dir / "x"), "pass\n", isolation=isolation)
    assert not result.passed and "outside the sandbox" in result.stderr_tail
    assert not (shared_dir / "x").exists()


def test_dir_fd_write_escape_refused_by_the_read_only_filesystem(namespaces, shared_dir):
    result = run_tests(_dir_fd_escape(shared_dir / "x"), "pass\n", audit_guard=False)
    assert not result.passed and "Read-only file system" in result.stderr_tail
    assert not (shared_dir / "x").exists()


@pytest.mark.parametrize("tamper", [
    # the escape: catch the guard's PermissionError, reach its frames, flip its state
    "try:\n    open(TARGET, 'w')\nexcept PermissionError as e:\n    tb = e.__traceback__\n    while tb.tb_next:\n"
    "        tb = tb.tb_next\n    f = tb.tb_frame\n    while f is not None:\n"
    "        for v in list(f.f_locals.values()):\n            if isinstance(v, list) and v in ([False], [True]):\n"
    "                v[0] = True\n        f = f.f_back\n",
    # monkeypatch what a guard written in Python might call
    "import builtins, os\nbuiltins.isinstance = lambda *a: True\nbuiltins.type = lambda *a: int\n"
    "os.path.realpath = os.path.abspath = lambda p: os.getcwd()\n",
])
@pytest.mark.parametrize("isolation", GUARD_LEVELS)
def test_guard_cannot_be_switched_off(shared_dir, tamper, isolation):
    code = f"TARGET = {str(shared_dir / 'x')!r}\ntry:\n" + "".join(f"    {line}\n" for line in tamper.splitlines())
    code += "except Exception as err:\n    print('tampering refused:', err)\nopen(TARGET, 'w').write('x')\n"
    result = run_tests(code, "pass\n", isolation=isolation)
    assert not result.passed and "outside the sandbox" in result.stderr_tail
    assert not (shared_dir / "x").exists()


@pytest.mark.parametrize("isolation", GUARD_LEVELS)
def test_fork_exec_refused(shared_dir, isolation):
    target = str(shared_dir / "x")
    fork_exec = (f"_posixsubprocess.fork_exec([b'/bin/sh', b'-c', b'echo x > {target}'], [b'/bin/sh'], True, (), "
                 "None, None, -1, -1, -1, -1, -1, -1, r, w, True, False, -1, None, None, None, -1, None, False)")
    for stmt in [fork_exec, "del sys.modules['_posixsubprocess']; import _posixsubprocess; " + fork_exec]:
        code = f"import _posixsubprocess, os, sys, time\nr, w = os.pipe()\n{stmt}\ntime.sleep(0.2)\n"
        result = run_tests(code, "pass\n", isolation=isolation)
        assert not result.passed and "not allowed" in result.stderr_tail, stmt
    assert not Path(target).exists()


def _no_process_with(marker: str) -> bool:
    time.sleep(0.3)
    return subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 1


def test_setsid_daemon_does_not_survive(namespaces, shared_dir):
    """Guard off: a program started in a new session keeps writing; the pid namespace ends it, the mount stops it."""
    marker = f"taso-daemon-{uuid.uuid4().hex}"
    loop = f"while :; do echo x >> {shared_dir / 'x'}; sleep 0.05; done"
    code = (f"import subprocess\nsubprocess.Popen(['/bin/sh', '-c', {loop!r}, {marker!r}], start_new_session=True,\n"
            "                 stderr=subprocess.DEVNULL)\n")
    result = run_tests(code, "pass\n", audit_guard=False)
    assert result.passed, result.stderr_tail
    assert _no_process_with(marker) and not (shared_dir / "x").exists()


# --- privileges, environment, resources -------------------------------------------------------------------------

@pytest.mark.skipif(not ROOT, reason="the uid drop happens when the evaluator runs as root")
def test_child_is_unprivileged_and_cannot_read_our_environment(monkeypatch):
    secret = f"taso-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("TASO_SANDBOX_TEST_SECRET", secret)
    code = ("import os\nfound = []\nfor pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
            f"    try: found += [pid] if {secret.encode()!r} in open(f'/proc/{{pid}}/environ', 'rb').read() else []\n"
            "    except OSError: pass\nids = os.getresuid() + os.getresgid() + tuple(os.getgroups())\n")
    tests = f"assert 0 not in ids, ids\nassert found == [], found\nassert {secret!r} not in repr(os.environ)\n"
    result = run_tests(code, tests, audit_guard=False)
    assert result.passed, result.stderr_tail


@pytest.mark.skipif(not ROOT, reason="RLIMIT_NPROC counts the run's own uid only when it gets one (as root)")
def test_process_count_capped():
    code = ("import os, time\nn = 0\ntry:\n    for _ in range(50):\n        if os.fork() == 0:\n"
            "            time.sleep(10)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    pass\n")
    result = run_tests(code, "assert n < 4, n\n", max_procs=4, audit_guard=False)
    assert result.passed, result.stderr_tail


@pytest.mark.parametrize("isolation", GUARD_LEVELS)
def test_work_dir_total_size_capped(isolation):
    code = ("import sys\nwritten = 0\ntry:\n    for i in range(1000):\n        with open(f'f{i}', 'wb') as f:\n"
            "            f.write(b'x' * 2**20)\n        written += 1\nexcept OSError:\n    pass\n")
    result = run_tests(code, "assert written <= 8, written\n", disk_mb=8, timeout_s=20, isolation=isolation)
    if (isolation or sandbox_isolation().level) == "namespaces":  # tmpfs: the writes fail at the cap
        assert result.passed, result.stderr_tail
    else:  # the watchdog kills the run
        assert result.status == "killed" and "went over 8 MB" in result.stderr_tail


def test_filesystem_read_only_and_network_empty(namespaces, shared_dir):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    code = (f"import os, socket\nrefused = []\nfor path in [{str(shared_dir / 'x')!r}, '/dev/shm/x', '/var/tmp/x']:\n"
            "    try: open(path, 'w')\n    except OSError as e: refused.append(e.errno)\n"
            f"try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    connected = True\n"
            "except OSError:\n    connected = False\n")
    tests = "import errno\nassert refused == [errno.EROFS] * 3, refused\nassert not connected\n"
    tests += "assert socket.if_nameindex() == [(1, 'lo')]\n"
    try:
        result = run_tests(code, tests, audit_guard=False)
    finally:
        listener.close()
    assert result.passed, result.stderr_tail
    assert not (shared_dir / "x").exists()
