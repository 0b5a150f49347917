"""TaLoS's selection: the LOWEST-sensitivity entries of all target matrices, found in rounds under one global threshold.

    N = Σ d_out·d_in over the targets, K = entries to keep trainable, R rounds (4 in the paper):
    round r = 1..R:  F_r = sampled-label Fisher (fisher.py), the entries frozen so far damped for scoring
                     candidates = F_r, frozen entries set to +inf (a frozen entry never comes back)
                     t_r = the k_r-th smallest candidate over ALL matrices, k_r = N·(K/N)^(r/R) (k_R = K exactly)
                     per matrix: its entries below t_r, then ties by (matrix name, flat index) up to k_r in all
                     everything else is frozen
    the round-R entries become each matrix's region (structure "entries", keep="low"); a matrix left with none is
    not wrapped.

Each round reuses the pipeline's pieces: the statistic reduced to owners (distributed/reduce.py), an allocation
(budget.allocate_by_threshold, from threshold.py's exact global k-th value), regions.choose_region on the owners,
regions shared to every rank. Between rounds the owners' frozen masks are broadcast (every rank damps every matrix in
its forward). Given the owners' scores, thresholds, allocation and masks are exact integer work: the same for every
world size; the scores themselves match the one-process ones to float tolerance (fisher.py).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Iterable

import torch
from torch import nn

from ..distributed.backend import Backend
from ..distributed.reduce import broadcast_from_owners, share_object, share_regions
from ..targets import layer_shape
from .budget import allocate_by_threshold
from .fisher import SampledFisher
from .importance import LayerStats
from .select import Selection, SelectionSpec, choose_regions
from .threshold import kth_smallest, lowest_entries, threshold_counts

log = logging.getLogger("taso_llm")
SPEC = SelectionSpec(structure="entries", keep="low")


def round_targets(total: int, keep: int, rounds: int) -> list[int]:
    """Entries left trainable after each round: ⌊N·(K/N)^(r/R)⌋, shrinking geometrically, the last exactly K."""
    if not 1 <= keep <= total:
        raise ValueError(f"keep={keep} trainable entries: expected 1..{total} (the target matrices' size)")
    fraction, targets, previous = keep / total, [], total
    for r in range(1, rounds + 1):
        k = keep if r == rounds else int(math.floor(total * fraction ** (r / rounds)))
        previous = min(previous, max(keep, k))
        targets.append(previous)
    return targets


def _candidates(stats: dict[str, LayerStats], frozen: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: s.full.masked_fill(frozen[n], math.inf) if n in frozen else s.full for n, s in stats.items()}


def select_low_sensitivity(model: nn.Module, targets: dict[str, nn.Module], keep: int,
                           batches: Callable[[], Iterable[dict]], num_batches: int | None = None,
                           backend: Backend | None = None, seed: int = 0, rounds: int = 4, damping: float = 0.1,
                           checkpointing: bool = True, show_progress: bool = True) -> Selection:
    """`batches()` gives this rank's calibration batches afresh for each round. Returns the Selection of select.py
    (regions on every rank, per-matrix report, figures for metrics.json)."""
    backend = backend or Backend.for_model(model)
    shapes = {name: layer_shape(m) for name, m in targets.items()}
    total = sum(d_out * d_in for d_out, d_in in shapes.values())
    frozen: dict[str, torch.Tensor] = {}  # every rank: the entries damped in the next round's scoring
    history, seconds = [], 0.0
    goals = round_targets(total, keep, rounds)
    for r, goal in enumerate(goals):
        start = time.perf_counter()
        statistic = SampledFisher(seed=seed, round_index=r, damping=damping, checkpointing=checkpointing,
                                  frozen=frozen)
        scores = statistic.score(model, targets, batches(), num_batches, backend, show_progress)
        candidates = _candidates(scores.stats, frozen)
        threshold = kth_smallest(list(candidates.values()), goal, backend.distributed)
        counts = {n: threshold_counts(c, threshold) for n, c in candidates.items()}
        if backend.distributed:
            counts = share_object(counts, scores.owners)
        allocated = allocate_by_threshold({n: c[0] for n, c in counts.items()},
                                          {n: c[1] for n, c in counts.items()}, goal)
        if r < len(goals) - 1:
            owned_frozen = {n: ~lowest_entries(c, allocated[n], threshold) for n, c in candidates.items()}
            frozen = (broadcast_from_owners(owned_frozen, scores.owners, shapes, torch.bool)
                      if backend.distributed else owned_frozen)
        seconds += scores.report["importance_seconds"]
        history.append({"round": r + 1, "trainable": goal, "keep_fraction": goal / total, "threshold": threshold,
                        "seconds": time.perf_counter() - start})
        log.info("TaLoS round %d/%d: %d of %d entries stay trainable (threshold %.3e)", r + 1, len(goals), goal,
                 total, threshold)
    stats = {n: LayerStats(shape=s.shape, row=s.row, col=s.col, full=candidates[n]) for n, s in scores.stats.items()}
    mine = choose_regions(stats, SPEC, allocated)
    layers = {n: {"allocated_params": allocated[n], "fisher_mass": float(s.row.sum()),
                  "density": allocated[n] / (s.shape[0] * s.shape[1])} for n, s in scores.stats.items()}
    regions = mine
    if backend.distributed:
        regions = share_regions(mine, scores.owners, shapes, SPEC.structure)
        layers = share_object(layers, scores.owners)
    report = {**scores.report, "importance_seconds": seconds, "talos_rounds": history,
              "budget_allocation": {"scope": "global_threshold", "total_budget": keep,
                                    "allocated": sum(allocated.values()),
                                    "unwrapped": sorted(n for n, a in allocated.items() if a == 0)}}
    return Selection(regions=regions, layers=layers, report=report)
