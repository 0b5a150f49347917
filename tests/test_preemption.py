"""SIGTERM → checkpoint at the next step end on every rank, stop, no final outputs, exit 0 (taso_llm/preemption.py),
and launch/forward_sigterm.sh, which gets the signal to the training processes through a launcher.

The callback is driven with a real signal to this process and the Trainer's own state/control objects; agreement
between ranks with two real processes over gloo of which only one is signalled; the end-to-end test signals the
launch script of a real one-process recipe run (the SLURM, multi-node case and the resume: tests/test_multinode.py).
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl, TrainerState

from taso_llm.preemption import PREEMPTED_FILE_ENV, PreemptionCallback

sys.path.insert(0, str(Path(__file__).parent))
from dist_helpers import (FINAL_FILES, OBSERVED, ROOT, finish, launch_cmd, launch_env, processes_with,  # noqa: E402
                          recipe_args, wait_for_file)


@pytest.fixture
def callback():
    cb = PreemptionCallback()
    yield cb
    cb.restore()


def _step(cb, step: int, out: Path) -> TrainerControl:
    control = TrainerControl()
    cb.on_step_end(SimpleNamespace(device=torch.device("cpu"), output_dir=str(out)), TrainerState(global_step=step),
                   control)
    return control


def test_sigterm_stops_at_the_next_step_end_with_a_checkpoint(callback, tmp_path):
    assert signal.getsignal(signal.SIGTERM) == callback._handle
    control = _step(callback, 1, tmp_path)
    assert not (control.should_save or control.should_training_stop or callback.stopped)
    os.kill(os.getpid(), signal.SIGTERM)  # this process survives: the handler only takes note
    assert callback.received == signal.SIGTERM and not callback.stopped
    control = _step(callback, 2, tmp_path)
    assert control.should_save and control.should_training_stop
    assert callback.stopped_step == 2 and callback.checkpoint == tmp_path / "checkpoint-2"


def test_restore_puts_the_previous_handler_back(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    PreemptionCallback().restore()
    assert signal.getsignal(signal.SIGTERM) == before


def test_finish_writes_the_checkpoint_for_the_requeue_on_the_main_process_only(callback, tmp_path, monkeypatch):
    marker = tmp_path / "logs" / "job.preempted"
    monkeypatch.setenv(PREEMPTED_FILE_ENV, str(marker))
    os.kill(os.getpid(), signal.SIGTERM)
    _step(callback, 7, tmp_path)
    assert callback.finish(is_main=False)["checkpoint"] == str(tmp_path / "checkpoint-7")
    assert not marker.exists()
    report = callback.finish(is_main=True)
    assert report == {"preempted": True, "global_step": 7, "checkpoint": str(tmp_path / "checkpoint-7")}
    assert marker.read_text() == f"{tmp_path / 'checkpoint-7'}\n"


# A launcher like `accelerate launch` with one process: it starts the trainer and has no SIGTERM handler of its own.
LAUNCHER = """
import subprocess, sys
sys.exit(subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]]).wait())
"""
TRAINER = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: (out.joinpath("stopped").touch(), sys.exit(0)))
out.joinpath("ready").touch()
time.sleep(60)
sys.exit(5)
"""


def test_forward_sigterm_signals_the_trainer_not_the_launcher(tmp_path):
    cmd = [str(ROOT / "launch" / "forward_sigterm.sh"), sys.executable, "-c", LAUNCHER, TRAINER, str(tmp_path)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    wait_for_file(tmp_path / "ready", [proc], timeout=30)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()  # the trainer's status, through the launcher
    assert (tmp_path / "stopped").exists()


def test_forward_sigterm_returns_the_command_status():
    assert subprocess.run([str(ROOT / "launch" / "forward_sigterm.sh"), "bash", "-c", "exit 7"]).returncode == 7


def _agree(rank: int, port: int, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cb = PreemptionCallback()
    for step in range(1, 6):
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # rank 1 only, during its step 3
        control = _step(cb, step, Path("/out"))
        if control.should_training_stop:
            break
    results.put((rank, cb.stopped_step, cb.received))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_stop_after_the_same_step_when_one_was_signalled():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = ctx.Queue()
    procs = [ctx.Process(target=_agree, args=(rank, port, results)) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    got = sorted(results.get(timeout=5) for _ in procs)
    assert got == [(0, 3, None), (1, 3, signal.SIGTERM)]


@pytest.mark.slow
def test_sigterm_to_the_launch_script_checkpoints_at_the_next_step_and_leaves_nothing_running(tmp_path, tiny_path):
    """`launch/forward_sigterm.sh accelerate launch ...` with one process (accelerate alone would die and orphan the
    trainer) gets SIGTERM while rank 0 is held at the end of step 2: the trainer saves checkpoint-3 (the next step
    end), writes no final outputs, names the checkpoint for the requeue, and every process exits 0. That the
    checkpoint resumes bit for bit: tests/test_multinode.py (the SLURM job)."""
    out, marker, paused = tmp_path / "run", tmp_path / "job.preempted", tmp_path / "paused"
    env = launch_env(ACCELERATE_USE_CPU="true", TASO_PAUSE_AT_STEP="2", TASO_PAUSED_FILE=str(paused),
                     TASO_TEST_MARKER=tmp_path.name, **{PREEMPTED_FILE_ENV: str(marker)})
    cmd = [str(ROOT / "launch" / "forward_sigterm.sh"), *launch_cmd("single_gpu.yaml", OBSERVED, recipe_args(out), 1)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_file(paused, [proc])
    proc.send_signal(signal.SIGTERM)
    (output,) = finish([proc])
    assert processes_with(tmp_path.name) == [], "a training process outlived its launcher"
    assert (out / "checkpoint-3" / "trainer_state.json").is_file(), output[-4000:]
    assert not any((out / name).exists() for name in FINAL_FILES)
    assert marker.read_text().strip() == str(out / "checkpoint-3")
    assert "SIGTERM: stopped after step 3" in output


def test_without_sigwaitinfo_the_loader_is_left_as_it_is(monkeypatch):
    from torch.utils.data import DataLoader

    from taso_llm.preemption import workers_ignore_sigterm

    monkeypatch.delattr(signal, "sigwaitinfo")  # macOS: the worker would fail at start with the wrapper
    loader = DataLoader(list(range(4)), num_workers=1)
    assert workers_ignore_sigterm(loader).worker_init_fn is None


def test_dataloader_worker_ends_on_sigterm_from_its_rank_only():
    """A worker drops a SIGTERM from another process (SLURM's) and keeps serving batches; one from its parent (the
    loader shutting down, multiprocessing at exit) ends it as before, so nothing waits on a worker that won't go."""
    import psutil
    from torch.utils.data import DataLoader

    from taso_llm.preemption import workers_ignore_sigterm

    loader = workers_ignore_sigterm(DataLoader(list(range(64)), batch_size=2, num_workers=1,
                                               worker_init_fn=lambda worker_id: torch.manual_seed(worker_id)))
    wrapped = loader.worker_init_fn
    assert workers_ignore_sigterm(loader).worker_init_fn is wrapped  # handed out again: not wrapped twice
    before = {p.pid for p in psutil.Process().children()}
    batches = iter(loader)
    assert next(batches).tolist() == [0, 1]
    [worker] = [p for p in psutil.Process().children() if p.pid not in before]
    sender = f"import os, signal; os.kill({worker.pid}, signal.SIGTERM)"
    subprocess.run([sys.executable, "-c", sender], check=True)  # sent by another process
    time.sleep(0.5)
    assert worker.is_running() and next(batches).tolist() == [2, 3]
    os.kill(worker.pid, signal.SIGTERM)  # sent by its parent
    assert worker.wait(timeout=10) == 0


@pytest.mark.slow
def test_sigterm_to_every_process_of_the_run_spares_its_dataloader_workers(tmp_path, tiny_path):
    """SLURM signals every process of the job, DataLoader workers too. torch's worker exits on a SIGTERM that is not
    from its parent, and the rank's next batch then fails; ours ignore it, so step 3 still gets its batch and the run
    stops there with its checkpoint as it does with 0 workers."""
    import psutil

    out, paused = tmp_path / "run", tmp_path / "paused"
    env = launch_env(TASO_PAUSE_AT_STEP="2", TASO_PAUSED_FILE=str(paused), TASO_TEST_MARKER=tmp_path.name)
    cmd = [sys.executable, str(OBSERVED), *recipe_args(out, "--dataloader_num_workers", "1")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: the job's processes, as SLURM sees them
    wait_for_file(paused, [proc])
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert workers, "no DataLoader worker was running: this test would check nothing"
    os.killpg(proc.pid, signal.SIGTERM)
    (output,) = finish([proc])
    assert (out / "checkpoint-3" / "trainer_state.json").is_file(), output[-4000:]
    assert not any((out / name).exists() for name in FINAL_FILES)
    assert "SIGTERM: stopped after step 3" in output and processes_with(tmp_path.name) == []
