"""Reductions and sharing for the sparse selection pipeline (sparse/select.py drives them; sparse/importance.py has
no collectives).

Flow on each of W ranks (`sparse.select.select_regions` drives it):
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

Measured on the tiny model: ZeRO-3 statistics match the unpartitioned ones to ~1e-7 relative, not bitwise (the
forward loss is bitwise equal, so the drift is in backward: most likely DeepSpeed's fetch/release hooks add autograd
nodes that change the order in which gradients of reused activations are summed; not verified further), and the
masks were identical. DDP and FSDP2 were bitwise equal (tests/test_distributed_importance.py).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..sparse.importance import LayerStats, finalize_stats, ordered_sum
from ..sparse.regions import Region
from .backend import gathered_weight
from .process_group import comm_device as _comm_device
from .process_group import rank_and_world


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
                  structure: str, index_names: tuple[str, ...] = ("rows", "cols")) -> dict[str, Region]:
    """All-gather the regions each owner chose, so every rank holds all of them (same order: sorted names).

    A matrix its owner left without a region (zero budget) stays absent everywhere. Index vectors differ in length,
    so a table (present, rank, one length per index vector) goes first (an all-reduce: each row is filled by its
    owner only), then each rank's index vectors concatenated and padded to the longest."""
    rank, world = rank_and_world()
    device = _comm_device()
    names = sorted(owners)
    k = len(index_names)
    table = torch.zeros(len(names), 2 + k, dtype=torch.int64)
    for i, name in enumerate(names):
        if owners[name] == rank and name in mine:
            r = mine[name]
            table[i] = torch.tensor([1, r.rank, *(len(v) for v in r.index_tensors().values())])
    table = table.to(device)
    dist.all_reduce(table)
    table = table.cpu()
    sizes = [0] * world
    for i, name in enumerate(names):
        sizes[owners[name]] += int(table[i, 2:].sum())
    payload = torch.full((max(sizes) if sizes else 0,), -1, dtype=torch.int64)
    flat = [v for n in names if owners[n] == rank and n in mine for v in mine[n].index_tensors().values()]
    if flat:
        flat = torch.cat(flat).long()
        payload[:len(flat)] = flat
    gathered = [torch.empty_like(payload, device=device) for _ in range(world)]
    dist.all_gather(gathered, payload.to(device))
    gathered = [g.cpu() for g in gathered]
    offset = [0] * world
    out = {}
    for i, name in enumerate(names):
        if not int(table[i, 0]):
            continue
        src = owners[name]
        indices = {}
        for key, length in zip(index_names, (int(v) for v in table[i, 2:])):
            indices[key] = gathered[src][offset[src]:offset[src] + length].clone()
            offset[src] += length
        out[name] = Region.from_indices(structure, shapes[name], indices, rank=int(table[i, 1]))
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


def broadcast_from_owners(owned: dict[str, torch.Tensor], owners: dict[str, int],
                          shapes: dict[str, tuple[int, int]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Whole per-matrix tensors (e.g. TaLoS's between-round masks) from their owners to every rank: one broadcast
    per matrix, in name order, so a rank holds at most one foreign matrix in flight. bool travels as uint8."""
    device = _comm_device()
    wire = torch.uint8 if dtype == torch.bool else dtype
    rank, _ = rank_and_world()
    out = {}
    for name in sorted(owners):
        if owners[name] == rank:
            buffer = owned[name].to(device=device, dtype=wire).contiguous()
        else:
            buffer = torch.empty(shapes[name], dtype=wire, device=device)
        dist.broadcast(buffer, src=owners[name])
        out[name] = buffer.cpu().to(dtype)
    return out
