"""Helpers of the tests that run launch/ scripts (test_multinode.py, test_preemption.py). The recipe arguments, free
ports, environment and accelerate command line are test_distributed_training.py's, imported from there."""

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from test_distributed_training import COMMON, _env, _free_port, launch_cmd  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parents[1]
OBSERVED = ROOT / "tests" / "dist" / "train_observed.py"  # the recipe plus a write log and a pause
FINAL_FILES = ("adapter_model.safetensors", "metrics.json")  # what a finished run has and a stopped one must not


def recipe_args(out: Path, *extra: str) -> list[str]:
    return [*COMMON, "--output_dir", str(out), *extra]


def launch_env(**extra) -> dict:
    """The tests' environment for a launch script; the venv's `accelerate` / `torchrun` first on PATH."""
    env = _env(None, **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def one_process_run(out: Path) -> Path:
    """The reference: the recipe in one process (`accelerate launch` with launch/single_gpu.yaml), uninterrupted."""
    cmd = launch_cmd("single_gpu.yaml", ROOT / "recipes" / "sft_taso.py", recipe_args(out), nproc=1)
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(ACCELERATE_USE_CPU="true"), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launch script and every process under it (the ranks run in sessions of their own)."""
    try:
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[str]:
    """The processes' outputs once they exit, each asserted 0 (killed with their trees if time runs out)."""
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p)
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-6000:]
    return outputs


def wait_for_file(path: Path, procs: list[subprocess.Popen], timeout: float = 150) -> None:
    """Until `path` exists; fails, with the processes' output, if one of them ended first or time ran out."""
    deadline = time.time() + timeout
    while not path.exists():
        ended = [p for p in procs if p.poll() is not None]
        if ended or time.time() > deadline:
            for p in procs:
                kill_tree(p)
            logs = "\n".join(f"--- exit {p.returncode}\n{(p.communicate()[0] or '')[-4000:]}" for p in procs)
            raise AssertionError(f"{path} never appeared ({'a process ended' if ended else 'timeout'}):\n{logs}")
        time.sleep(0.2)


def processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds TASO_TEST_MARKER=marker (orphans included, whoever their parent)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            continue
        if f"TASO_TEST_MARKER={marker}".encode() in environ and state != "Z":
            pids.append(int(proc.name))
    return pids


def adapter_writes(log: Path) -> Counter:
    """(rank, path) → how often, for every adapter_model.safetensors written (checkpoints and the final one)."""
    lines = log.read_text().split("\n") if log.exists() else []
    return Counter(tuple(line.split(" ", 1)) for line in lines if line.endswith("adapter_model.safetensors"))


def assert_adapter_saved_once(log: Path) -> None:
    """Only global rank 0 writes an adapter file, each once; the final adapter (not in a checkpoint) exactly once."""
    writes = adapter_writes(log)
    assert writes and set(rank for rank, _ in writes) == {"0"}, writes
    assert set(writes.values()) == {1}, writes
    final = [path for _, path in writes if "checkpoint-" not in path]
    assert len(final) == 1, writes


def assert_same_masks(a: Path, b: Path) -> None:
    ma, mb = load_file(str(a / "masks.safetensors")), load_file(str(b / "masks.safetensors"))
    assert ma.keys() == mb.keys()
    for key in ma:
        assert torch.equal(ma[key], mb[key]), key


def assert_same_adapter(a: Path, b: Path) -> None:
    """Bit for bit: masks and values."""
    sa, sb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), (key, (sa[key].double() - sb[key].double()).abs().max())
