"""Seeded randomness every rank reproduces without communicating: a seed derived from named parts, and the
`SeededRandomScore` statistic (SpaRTA's random entries) of the selection pipeline.

A derived seed is a hash of its parts (run seed, matrix name, step, ...), not an offset from a global RNG, so the
same parts give the same draw on every rank, for any world size, in any order the matrices are visited.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from ..distributed.reduce import assign_owners
from ..targets import layer_shape
from .importance import LayerStats
from .statistics import Scores


def derived_seed(*parts) -> int:
    """A 63-bit seed from the parts' text: stable across processes, Python versions and hash randomisation."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(*parts) -> torch.Generator:
    """A CPU generator seeded from the parts (CPU: the same numbers whatever accelerator a rank has)."""
    return torch.Generator().manual_seed(derived_seed(*parts))


class _RegeneratedStats(Mapping):
    """name → LayerStats of the owned matrices, regenerated from (seed, name) at each access.

    Holding every matrix's full d_out × d_in scores at once would take tens of GB on an 8B model; the pipeline reads
    each matrix a few times (its mass, its region, its report line), so regenerating keeps one matrix in memory at a
    time for the price of a few random draws."""

    def __init__(self, statistic: "SeededRandomScore", shapes: dict[str, tuple[int, int]]):
        self.statistic, self.shapes = statistic, shapes

    def __getitem__(self, name: str) -> LayerStats:
        full = self.statistic.matrix_scores(name, self.shapes[name])
        return LayerStats(shape=self.shapes[name], row=full.sum(1), col=full.sum(0), full=full)

    def __iter__(self):
        return iter(sorted(self.shapes))

    def __len__(self) -> int:
        return len(self.shapes)


@dataclass(frozen=True)
class SeededRandomScore:
    """Uniform random scores in [0, 1) per entry, a pure function of (seed, matrix name): the top-k entries of a
    matrix are a uniformly random k-subset of it (float64 draws, so ties do not bias the choice).

    No data and no reduction: each matrix's owner draws its scores itself, so the regions are bitwise the same for
    any world size. A matrix's mass (Σ of its scores) is ≈ d_out·d_in / 2, so `budget_scope: model` spreads the
    total in proportion to matrix size: the same density everywhere, as a model-wide Bernoulli gives."""

    seed: int = 0
    needs_calibration = False

    def matrix_scores(self, name: str, shape: tuple[int, int]) -> torch.Tensor:
        return torch.rand(tuple(shape), generator=generator("random-entries", self.seed, name), dtype=torch.float64)

    def score(self, model: nn.Module, targets: dict[str, nn.Module], batches: Iterable[dict],
              num_batches: int | None, backend, show_progress: bool = True) -> Scores:
        shapes = {name: layer_shape(m) for name, m in targets.items()}
        owners = assign_owners(shapes, backend.world)
        owned = {name: shape for name, shape in shapes.items() if owners[name] == backend.rank}
        report = {"importance_seconds": 0.0, "importance_batches": 0, "importance_tokens": 0,
                  "importance_world_size": backend.world}
        return Scores(stats=_RegeneratedStats(self, owned), owners=owners, shapes=shapes, report=report)
