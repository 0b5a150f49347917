"""The selection pipeline every sparse method runs, on one process or many:

    1. the statistic scores each target matrix; owners hold the reduced statistics   (statistics.py)
    2. each matrix's importance mass goes to every rank (a few floats)               (distributed/reduce.py)
    3. the budget is allocated per matrix, or model-wide by mass                     (budget.py)
    4. each owner chooses the structure of its matrices under their budgets          (regions.py)
    5. the regions are all-gathered, so every rank holds the same masks              (distributed/reduce.py)

Steps 2-5 are pure functions of the owners' statistics, which are bitwise equal for any world size: so are the masks.
A matrix allocated zero parameters gets no region and is not wrapped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from ..distributed.backend import Backend
from ..distributed.reduce import share_object, share_regions
from ..targets import layer_shape
from .budget import BudgetPolicy, allocate, allocation_summary
from .regions import Region, budget_step, choose_region, mass_shares, min_budget, parse_budget


@dataclass(frozen=True)
class SelectionSpec:
    structure: str  # regions.STRUCTURES
    rank: int = 1  # of a lora_block update
    budget: str = "rank1"  # per matrix (regions.parse_budget)
    policy: BudgetPolicy = BudgetPolicy()
    keep: str = "high"  # which end of the scores is trainable: "high" (TASO) or "low" (TaLoS)

    def own_budgets(self, shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
        return {name: parse_budget(self.budget, shape) for name, shape in shapes.items()}


@dataclass
class Selection:
    regions: dict[str, Region]  # every adapted matrix, on every rank
    layers: dict[str, dict] = field(default_factory=dict)  # per matrix: captured mass share, allocated params, ...
    report: dict = field(default_factory=dict)  # statistic's figures + "budget_allocation"
    stats: dict | None = None  # the owned statistics, when asked for (tests, benchmarks)


def mass(stats) -> float:
    """A matrix's importance mass: the sum of its statistic (float64, from the row sums)."""
    return float(stats.row.sum())


def _captured_share(stats, region: Region) -> float:
    """Share of the matrix's importance mass estimated to fall in the chosen region (row share × column share)."""
    row_total, col_total = float(stats.row.sum()), float(stats.col.sum())
    if row_total <= 0 or col_total <= 0:
        return 0.0
    if region.structure == "entries" and stats.full is not None:
        return float(stats.full[region.rows, region.cols].sum()) / float(stats.full.sum())
    return float(stats.row[region.rows].sum() / row_total * stats.col[region.cols].sum() / col_total)


def _layer_info(stats, region: Region | None, budget: int) -> dict:
    info = {"allocated_params": budget, "importance_mass": mass(stats)}
    if region is not None:
        distinct_rows = len(torch.unique(region.rows))  # entries repeat rows; blocks list each once
        info.update(captured_share=_captured_share(stats, region),
                    top_rows_share=float(mass_shares(stats.row)[1][distinct_rows - 1]))
    return info


def allocate_budgets(spec: SelectionSpec, shapes: dict[str, tuple[int, int]],
                     masses: dict[str, float]) -> tuple[dict[str, int], dict[str, int]]:
    """(allocated, own) parameters per matrix under the spec's budget and policy."""
    own = spec.own_budgets(shapes)
    return allocate(own, masses, spec.policy, step=budget_step(spec.structure, spec.rank),
                    minimum=min_budget(spec.structure, spec.rank)), own


def choose_regions(stats: dict, spec: SelectionSpec, budgets: dict[str, int] | None = None) -> dict[str, Region]:
    """Regions of the matrices in `stats` (finalized LayerStats) under their budgets; without `budgets`, allocated
    from these statistics alone (one process holding every matrix). Zero-budget matrices get no region."""
    if budgets is None:
        budgets, _ = allocate_budgets(spec, {n: s.shape for n, s in stats.items()},
                                      {n: mass(s) for n, s in stats.items()})
    return {name: choose_region(s.row, s.col, s.shape, spec.structure, budgets[name], rank=spec.rank, full=s.full,
                                keep=spec.keep)
            for name, s in stats.items() if budgets[name] > 0}


def select_regions(model: nn.Module, targets: dict[str, nn.Module], statistic, spec: SelectionSpec,
                   batches: Iterable[dict], num_batches: int | None = None, backend: Backend | None = None,
                   show_progress: bool = True, keep_stats: bool = False) -> Selection:
    backend = backend or Backend.for_model(model)
    scores = statistic.score(model, targets, batches, num_batches, backend, show_progress)
    shapes = {name: layer_shape(m) for name, m in targets.items()}
    masses = {name: mass(s) for name, s in scores.stats.items()}
    if backend.distributed:
        masses = share_object(masses, scores.owners)
    budgets, own = allocate_budgets(spec, shapes, masses)
    mine = choose_regions(scores.stats, spec, budgets)
    layers = {name: _layer_info(s, mine.get(name), budgets[name]) for name, s in scores.stats.items()}
    regions = mine
    if backend.distributed:
        regions = share_regions(mine, scores.owners, shapes, spec.structure)
        layers = share_object(layers, scores.owners)
    report = {**scores.report, "budget_allocation": allocation_summary(budgets, own, masses, spec.policy)}
    return Selection(regions=regions, layers=layers, report=report, stats=scores.stats if keep_stats else None)
