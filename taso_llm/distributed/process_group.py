"""The process group's lifecycle: created before the training arguments, torn down at the end of a run.

The recipe calls `init_distributed()` before TrlParser builds the training arguments, passes
`configured_state_defaults()` to the parser, and calls `finish_distributed()` last. `rank_and_world()` is how the
rest of the library asks where it runs: (0, 1) on one process.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def comm_device() -> torch.device:
    """Where collective buffers live: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")



def broadcast_from_main(obj):
    """`obj` as the main process (global rank 0) has it, on every rank: for a decision only the main process can
    make (it holds a lock, reads the output directory) that every rank must then act on alike."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=comm_device())
    return box[0]


def process_group_timeout(default_s: float = 1800.0) -> timedelta:
    """How long a collective may wait for a missing rank before the job fails (TASO_DDP_TIMEOUT seconds).

    A rank that dies mid-step leaves the others blocked in an all-reduce; this bounds the wait. TrainingArguments'
    `ddp_timeout` sets the same on GPU; on CPU transformers does not pass it on, so we do.
    """
    return timedelta(seconds=float(os.environ.get("TASO_DDP_TIMEOUT", default_s)))


def init_distributed() -> None:
    """Create the process group before TrainingArguments does, when there are several ranks and no CUDA.

    Without CUDA, accelerate + DeepSpeed would pick a backend that miscounts the world size; gloo is forced here
    and the training arguments then reuse this state (`accelerator_config.use_configured_state`, see
    `configured_state_defaults`). With CUDA nothing happens: TrainingArguments sets up NCCL with `ddp_timeout`.
    """
    from accelerate import PartialState

    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return
    from accelerate.utils import parse_flag_from_env

    if _asks_for_deepspeed(sys.argv[1:]):
        # accelerate launch sets this for its DeepSpeed configs; under torchrun nobody does, and the state built here
        # would then be a plain DDP one that the DeepSpeed training arguments refuse to reuse.
        os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")
    # cpu=True only when asked for (ACCELERATE_USE_CPU / --cpu): it would switch a DeepSpeed launch to plain DDP.
    PartialState(backend="gloo", timeout=process_group_timeout(), cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def _asks_for_deepspeed(argv: list[str]) -> bool:
    """`--deepspeed` on the command line, or a `deepspeed:` entry in the recipe YAML given with --config."""
    if any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in argv):
        return True
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        import yaml

        try:
            with open(argv[argv.index("--config") + 1]) as f:
                return bool((yaml.safe_load(f) or {}).get("deepspeed"))
        except OSError:
            return False  # the parser reports a missing config file, with its name
    return False


def configured_state_defaults() -> dict:
    """Parser defaults that make TrainingArguments reuse the state from `init_distributed`, if it ran.

    A default, not an argument: a YAML `accelerator_config` still wins. (Passing the JSON on the command line
    does not survive accelerate's DeepSpeed launcher's re-quoting.)
    """
    from accelerate import PartialState

    return {} if PartialState._shared_state == {} else {"accelerator_config": {"use_configured_state": True}}


# How long the main thread lets go of the GIL after the last barrier (see finish_distributed).
GLOO_DRAIN_SECONDS = 0.5


def finish_distributed() -> None:
    """Barrier, then tear the process group down, so that a finished run exits 0 on every rank.

    Two ways a rank aborts at exit ("terminate called without an active exception", SIGABRT): ranks leaving at
    different moments (hence the barrier), and gloo's worker thread freeing the last finished collectives after the
    barrier returns. Freeing a collective that holds tensors made in Python needs the GIL; if the interpreter is
    already finalizing, the thread is killed inside a noexcept destructor (seen in a gdb backtrace: runLoop →
    ~AsyncBarrierWork → ~AsyncAllgatherWork → decref → take_gil → pthread_exit). Sleeping releases the GIL so the
    worker finishes first; it needs microseconds, the margin is for loaded machines."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        if dist.get_backend() == "gloo":
            time.sleep(GLOO_DRAIN_SECONDS)
        dist.destroy_process_group()
