"""SIGTERM (what SLURM sends on preemption and at the time limit): save a checkpoint, stop, exit 0 on every rank.

  1. The handler only records the signal: the step in flight finishes (a signal handler must not save).
  2. At every optimizer step end the ranks all-reduce (MAX) one integer, so all of them stop after the same step
     even when only some got the signal (one node signalled, a launcher that passed it to some ranks only).
  3. The callback asks the Trainer for its ordinary checkpoint and a stop (control.should_save,
     should_training_stop): `--resume_from_checkpoint true` continues it exactly as an uninterrupted run would.
  4. run_sft sees `stopped` and returns before the final outputs (adapter, metrics.json, plots): the output
     directory holds masks and checkpoints only, as a run that is not finished. `finish` waits for every rank's
     part of the checkpoint, logs how to resume and, if $TASO_PREEMPTED_FILE is set, rank 0 writes the checkpoint's
     path there: launch/slurm_multinode.sbatch requeues the job when that file exists.

Exit status 0: the process did what the signal asked. A non-zero rank would make torchrun/accelerate tear the
other ranks down and `srun --kill-on-bad-exit` end the other nodes, possibly before rank 0 finished writing. A
stopped run is told from a finished one by its missing metrics.json and by the file above, not by the status.
The handler stays installed until the process ends: a SIGTERM during the final outputs lets them complete.

DataLoader worker processes (`dataloader_num_workers` > 0) ignore a SIGTERM that is not from their rank
(`workers_ignore_sigterm`): SLURM signals every process of the job, and torch's worker exits on a SIGTERM from anyone
but its parent, so the rank's next batch would fail before the checkpoint. A SIGTERM from the rank (its loader or
multiprocessing shutting the worker down) still ends the worker, as in torch.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .io import write_text

log = logging.getLogger("taso_llm")
PREEMPTED_FILE_ENV = "TASO_PREEMPTED_FILE"


def any_rank(flag: bool, device) -> bool:
    """True on every rank if it is True on any (one tiny all-reduce; just `flag` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class PreemptionCallback(TrainerCallback):
    """Install when the run starts (the handler is set in __init__, in the main thread); see the module doc."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.received: int | None = None  # the signal number, once one came
        self.stopped_step: int | None = None  # the step after which all ranks stopped
        self.output_dir: Path | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def restore(self) -> None:
        """Put the previous handlers back (tests; a run keeps ours to the end)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def stopped(self) -> bool:
        return self.stopped_step is not None

    def on_step_end(self, args, state, control, **kwargs):
        # args.device: the device this rank's collectives use (the GPU for NCCL, the CPU for gloo)
        if self.stopped or not any_rank(self.received is not None, args.device):
            return
        control.should_save = True
        control.should_training_stop = True
        self.stopped_step = state.global_step
        self.output_dir = Path(args.output_dir)

    @property
    def checkpoint(self) -> Path:
        return self.output_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.stopped_step}"

    def finish(self, is_main: bool) -> dict:
        """After trainer.train() returned with `stopped`: on every rank, before returning from the run."""
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's RNG state / shard of the checkpoint is written
        if is_main:
            name = signal.Signals(self.received).name if self.received else "a signal on another rank"
            log.warning("%s: stopped after step %d with checkpoint %s. The run is NOT finished (no adapter, no "
                        "metrics.json); continue it with --resume_from_checkpoint true", name, self.stopped_step,
                        self.checkpoint)
            if os.environ.get(PREEMPTED_FILE_ENV):
                write_text(os.environ[PREEMPTED_FILE_ENV], f"{self.checkpoint}\n")
        return {"preempted": True, "global_step": self.stopped_step, "checkpoint": str(self.checkpoint)}


def _exit_on_sigterm_from(parent: int) -> None:
    """A worker thread that takes every SIGTERM (blocked in all the worker's threads, so none is delivered anywhere
    else): from the parent rank (its loader shutting down, multiprocessing's exit) the worker ends as torch's own
    handler would end it; from anyone else (SLURM) it is dropped."""
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


def _ignore_sigterm_then(worker_init_fn, worker_id: int) -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit the mask
    threading.Thread(target=_exit_on_sigterm_from, args=(os.getppid(),), name="sigterm-from-parent",
                     daemon=True).start()
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


def workers_ignore_sigterm(dataloader):
    """The loader's worker processes ignore a SIGTERM that is not from their rank (see the module doc); its own
    worker_init_fn still runs after. A partial of a module function, so it pickles for a spawn or forkserver context
    too; a loader the Trainer hands out again (cached eval loaders) is not wrapped twice."""
    if not hasattr(signal, "sigwaitinfo"):  # macOS and Windows have none: their workers keep torch's behaviour
        return dataloader
    loader = getattr(dataloader, "base_dataloader", dataloader)  # accelerate's wrapper iterates the loader inside
    init = loader.worker_init_fn
    if loader.num_workers > 0 and getattr(init, "func", None) is not _ignore_sigterm_then:
        loader.worker_init_fn = partial(_ignore_sigterm_then, init)
    return dataloader
