"""Every collective of a run lives here: the process group's lifecycle (at the end of this file) and the
distributed TASO importance stage (importance.py has none).

Flow on each of W ranks (`methods.taso.select_regions` drives it):
  1. score this rank's calibration batches (calibration.py: batch b on rank b % W, padded to equal counts);
  2. each target matrix has ONE owner rank (`assign_owners`: greedy by size, deterministic);
  3. statistics are reduced to their owners (`reduce_to_owners`); owners finalize them;
  4. each owner chooses the core regions of its matrices;
  5. the masks are all-gathered (`share_regions`), so every rank ends with the same full set.

Exactness. In rowcol mode (the default) the result does not depend on W at all, bit for bit: every rank keeps the
row and column vectors of each of its batches apart, tagged by global batch index, and the owner sums all batches in
global index order with `importance.ordered_sum`, the accumulation a single process uses. The price is memory on
the scoring rank and the owner: n_batches × (d_in + d_out) × 8 bytes per matrix (float64). For an 8B LLaMA
(7 projections × 32 layers, Σ(d_in + d_out) ≈ 2.6M) that is about 21 MB per calibration batch in all, spread over
the ranks (each rank keeps its own batches, each owner the batches of its own matrices).
In "full" mode (structure entries, or importance_abs after_sum) keeping every batch's d_out × d_in matrix is too
big, so each rank sums its own batches and the owner adds the per-rank partial sums in rank order: deterministic
for a given W, equal across different W only to float tolerance (the additions are grouped differently).

Partitioned weights. `gathered_weight` reads ONE layer's full weight at the moment it is scored: a ZeRO-3 parameter
(it has `ds_id`) through `deepspeed.zero.GatheredParameters`, an FSDP2 DTensor through `full_tensor()`; anything
else as it is. All ranks score the same layers in the same order, so these collectives line up. A model built
under `zero.Init` cannot run forward by itself; `zero3_forward` gives it DeepSpeed's fetch/release hooks for the
importance pass through a temporary engine without optimizer, destroyed afterwards so the Trainer builds its own.
Measured on the tiny model: ZeRO-3 statistics match the unpartitioned ones to ~1e-7 relative, not bitwise (the
forward loss is bitwise equal, so the drift is in backward: most likely DeepSpeed's fetch/release hooks add autograd
nodes that change the order in which gradients of reused activations are summed; not verified further), and the
masks were identical. DDP and FSDP2 were bitwise equal (tests/test_distributed_importance.py).
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .importance import LayerStats, finalize_stats, ordered_sum
from .regions import Region
from .targets import dense_weight


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device() -> torch.device:
    """Where collective buffers live: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def assign_owners(shapes: dict[str, tuple[int, int]], world_size: int) -> dict[str, int]:
    """One owner rank per matrix, balancing Σ d_out·d_in per rank: largest matrix first (ties by name) to the
    least-loaded rank (ties by lowest rank). Depends only on the shapes and W, so every rank computes the same."""
    load = [0] * world_size
    owners = {}
    for name in sorted(shapes, key=lambda n: (-shapes[n][0] * shapes[n][1], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += shapes[name][0] * shapes[name][1]
    return owners


# ---------------------------------------------------------------------------------------------- weights

def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(t, DTensor)


def gathered_weight(module: nn.Module) -> torch.Tensor:
    """The full weight of one layer, gathered only for this call when it is sharded (a collective then)."""
    weight = module.weight
    if hasattr(weight, "ds_id"):  # DeepSpeed ZeRO-3
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters, ZeroParamStatus

        if weight.ds_status == ZeroParamStatus.AVAILABLE:  # DeepSpeed's own hooks fetched it for this module
            return weight.data.clone()
        if weight.ds_status == ZeroParamStatus.INFLIGHT:  # GatheredParameters would skip it and we'd read a part
            raise RuntimeError("ZeRO-3 weight is being prefetched; score with stage3_prefetch_bucket_size 0")
        with GatheredParameters([weight], modifier_rank=None):
            return weight.data.clone()
    if _is_dtensor(weight):  # FSDP2 while the layer is resharded
        return weight.full_tensor().detach()
    return dense_weight(module)


def is_zero3_partitioned(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextmanager
def _temporary_zero3_engine(model: nn.Module):
    import deepspeed

    dtype = next(model.parameters()).dtype
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # persistence 0: no parameter is gathered for good, each is fetched per module and released; prefetch 0: no
        # weight is ever half-fetched (INFLIGHT) when the importance hook gathers it
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
    }
    engine, *_ = deepspeed.initialize(model=model, config=config)
    try:
        yield
    finally:
        engine.destroy()  # removes the fetch/release hooks; the model stays partitioned


def zero3_forward(model: nn.Module):
    """Context in which a zero.Init-partitioned model can run forward/backward (nothing to do otherwise)."""
    return _temporary_zero3_engine(model) if is_zero3_partitioned(model) else nullcontext()


# ---------------------------------------------------------------------------------------------- statistics

def _gather_to(owner: int, tensor: torch.Tensor) -> list[torch.Tensor] | None:
    """dist.gather of same-shape tensors; the owner gets the list in rank order, others None."""
    rank, world = rank_and_world()
    device = _comm_device()
    tensor = tensor.to(device)
    parts = [torch.empty_like(tensor) for _ in range(world)] if rank == owner else None
    dist.gather(tensor, gather_list=parts, dst=owner)
    return [p.cpu() for p in parts] if parts is not None else None


def _reduce_rowcol(s: LayerStats, owner: int, steps: int) -> LayerStats | None:
    """Send every per-batch (row, col) to the owner: one (steps, 1 + d_out + d_in) float64 block per rank, the
    first column the global batch index (-1 = empty slot; float64 holds integers exactly)."""
    d_out, d_in = s.shape
    block = torch.zeros(steps, 1 + d_out + d_in, dtype=torch.float64)
    block[:, 0] = -1
    for k, (index, (row, col)) in enumerate(sorted(s.per_batch.items())):
        block[k, 0], block[k, 1:1 + d_out], block[k, 1 + d_out:] = index, row, col
    s.per_batch = None  # this rank's copies are no longer needed
    blocks = _gather_to(owner, block)
    if blocks is None:
        return None
    rows = torch.cat(blocks)
    rows = rows[rows[:, 0] >= 0]
    rows = rows[torch.sort(rows[:, 0], stable=True).indices]
    if len(torch.unique(rows[:, 0])) != len(rows):
        raise RuntimeError("a calibration batch was scored by more than one rank")
    out = LayerStats(shape=s.shape, row=torch.zeros(d_out, dtype=torch.float64),
                     col=torch.zeros(d_in, dtype=torch.float64))
    ordered_sum(rows[:, 1:1 + d_out], into=out.row)  # global batch order, as one process adds them
    ordered_sum(rows[:, 1 + d_out:], into=out.col)
    return out


def _reduce_full(s: LayerStats, owner: int) -> LayerStats | None:
    """Partial full matrices summed by the owner in rank order (deterministic for a given world size)."""
    local = s.full if s.full is not None else torch.zeros(s.shape, dtype=torch.float32)
    s.full = None
    parts = _gather_to(owner, local)
    if parts is None:
        return None
    return LayerStats(shape=s.shape, full=ordered_sum(parts), abs_deferred=s.abs_deferred)


def reduce_to_owners(stats: dict[str, LayerStats], owners: dict[str, int], targets: dict[str, nn.Module],
                     weight_fn: Callable[[nn.Module], torch.Tensor] = gathered_weight) -> dict[str, LayerStats]:
    """Unfinalized per-rank statistics (estimate_importance(..., finalize=False)) → finalized statistics of the
    matrices this rank owns. Every rank must call this with the same names; layers go one at a time, so a rank
    never holds more than one foreign matrix's partials."""
    rank, _ = rank_and_world()
    rowcol = all(s.per_batch is not None for s in stats.values())
    steps = 0
    if rowcol:  # slots per rank: the most batches any rank scored
        count = torch.tensor([max((len(s.per_batch) for s in stats.values()), default=0)], device=_comm_device())
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        steps = int(count)
    owned = {}
    for name in sorted(stats):
        s, owner = stats[name], owners[name]
        reduced = _reduce_rowcol(s, owner, steps) if rowcol else _reduce_full(s, owner)
        # |W ⊙ ΣG| needs the full weight: gathering it is a collective, so every rank joins; only the owner keeps it
        weight = weight_fn(targets[name]) if s.abs_deferred else None
        if reduced is not None:
            owned[name] = finalize_stats(reduced, lambda: weight)
        del weight
    return owned


def all_reduce_sum(values: list[int]) -> list[int]:
    t = torch.tensor(values, dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t)
    return [int(v) for v in t.cpu()]


# ---------------------------------------------------------------------------------------------- masks

def share_regions(mine: dict[str, Region], owners: dict[str, int], shapes: dict[str, tuple[int, int]],
                  structure: str) -> dict[str, Region]:
    """All-gather the regions each owner chose, so every rank holds all of them (same order: sorted names).

    Index lists differ in length, so (n_rows, n_cols, rank) per matrix go first (an all-reduce: each row of the
    table is filled by its owner only), then each rank's indices concatenated and padded to the longest."""
    rank, world = rank_and_world()
    device = _comm_device()
    names = sorted(owners)
    table = torch.zeros(len(names), 3, dtype=torch.int64)
    for i, name in enumerate(names):
        if owners[name] == rank:
            r = mine[name]
            table[i] = torch.tensor([len(r.rows), len(r.cols), r.rank])
    table = table.to(device)
    dist.all_reduce(table)
    table = table.cpu()
    sizes = [0] * world
    for i, name in enumerate(names):
        sizes[owners[name]] += int(table[i, 0] + table[i, 1])
    payload = torch.full((max(sizes),), -1, dtype=torch.int64)
    flat = [torch.cat([mine[n].rows, mine[n].cols]) for n in names if owners[n] == rank]
    if flat:
        flat = torch.cat(flat).long()
        payload[:len(flat)] = flat
    gathered = [torch.empty_like(payload, device=device) for _ in range(world)]
    dist.all_gather(gathered, payload.to(device))
    gathered = [g.cpu() for g in gathered]
    offset = [0] * world
    out = {}
    for i, name in enumerate(names):
        src = owners[name]
        n_rows, n_cols, r = (int(v) for v in table[i])
        chunk = gathered[src][offset[src]:offset[src] + n_rows + n_cols]
        offset[src] += n_rows + n_cols
        out[name] = Region(structure, tuple(shapes[name]), chunk[:n_rows].clone(), chunk[n_rows:].clone(), rank=r)
    return out


def share_object(obj_by_owner: dict, owners: dict[str, int]) -> dict:
    """Small per-matrix report values (floats) from their owners to every rank."""
    _, world = rank_and_world()
    gathered = [None] * world
    dist.all_gather_object(gathered, obj_by_owner)
    merged = {}
    for part in gathered:
        merged.update(part)
    return {name: merged[name] for name in sorted(owners) if name in merged}


def gathered_adapter_state(model: nn.Module) -> dict:
    """The adapter as its file stores it (adapters_io.adapter_state), whole on every rank. Collective: all ranks
    call it. Only the adapter is gathered (a few MB), never the frozen base: ZeRO-3 partitions through
    GatheredParameters, FSDP2 DTensors through full_tensor(); plain tensors (DDP, ZeRO-2, one process) pass through."""
    from .adapters import iter_adapters
    from .adapters_io import adapter_state

    params = [p for _, w in iter_adapters(model) for p in w.update.parameters()]
    gather = nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gather:
        return adapter_state(model, materialize=lambda t: t.full_tensor() if _is_dtensor(t) else t)


# ---------------------------------------------------------------------------------------------- process group

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

    # cpu=True only when asked for (ACCELERATE_USE_CPU / --cpu): it would switch a DeepSpeed launch to plain DDP.
    PartialState(backend="gloo", timeout=process_group_timeout(), cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def configured_state_defaults() -> dict:
    """Parser defaults that make TrainingArguments reuse the state from `init_distributed`, if it ran.

    A default, not an argument: a YAML `accelerator_config` still wins. (Passing the JSON on the command line
    does not survive accelerate's DeepSpeed launcher's re-quoting.)
    """
    from accelerate import PartialState

    return {} if PartialState._shared_state == {} else {"accelerator_config": {"use_configured_state": True}}


def finish_distributed() -> None:
    """Barrier, then tear the process group down: ranks leaving at different moments otherwise abort at exit
    ("terminate called without an active exception") and turn a finished run into a failed job."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
