"""Per-matrix statistics a sparse method selects by: the pluggable first stage of the selection pipeline.

A statistic scores every target matrix and returns, on each rank, the finalized statistics (`LayerStats`: row and
column sums, and the full matrix where the selection needs entries) of the matrices that rank OWNS, with the owner
map. Any statistic must give owners bitwise-identical statistics for every world size: that is what makes the masks
independent of how many processes chose them. New statistics (a sampled-label Fisher score, a seeded random score,
an SVD ordering) implement `score` the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from torch import nn

from ..distributed.backend import Backend
from ..distributed.reduce import all_reduce_sum, assign_owners, reduce_to_owners
from .importance import LayerStats, estimate_importance


@dataclass
class Scores:
    stats: dict[str, LayerStats]  # finalized, the matrices this rank owns (all of them on one process)
    owners: dict[str, int]  # matrix name → owner rank (all 0 on one process)
    shapes: dict[str, tuple[int, int]]
    report: dict = field(default_factory=dict)  # seconds, batches, tokens: for metrics.json


@dataclass(frozen=True)
class WeightGradSaliency:
    """TASO's importance I = |W ⊙ ∂L/∂W| on the task's SFT loss (importance.py), summed over calibration batches.

    `abs_per_batch`: Σ_b |W ⊙ G_b| (default) or |W ⊙ Σ_b G_b|. `full`: keep each whole |d_out × d_in| matrix (needed
    to select single entries); otherwise only row and column sums. `checkpointing`: recompute decoder layers in
    backward so scoring needs no more activation memory than checkpointed training."""

    abs_per_batch: bool = True
    full: bool = False
    checkpointing: bool = True
    needs_calibration = True

    def score(self, model: nn.Module, targets: dict[str, nn.Module], batches: Iterable[dict],
              num_batches: int | None, backend: Backend, show_progress: bool = True) -> Scores:
        keep = "full" if self.full or not self.abs_per_batch else "rowcol"
        world = backend.world
        with backend.forward_context(model):
            result = estimate_importance(model, targets, batches, keep=keep, abs_per_batch=self.abs_per_batch,
                                         weight_fn=backend.gathered_weight, num_batches=num_batches,
                                         show_progress=show_progress and backend.is_main,
                                         per_batch=world > 1 and keep == "rowcol", finalize=world == 1,
                                         checkpointing=self.checkpointing)
            shapes = {name: s.shape for name, s in result.stats.items()}
            owners = assign_owners(shapes, world)
            stats = result.stats
            if world > 1:  # the weight gathers of after_sum finalization need the ZeRO-3 hooks' context too
                stats = reduce_to_owners(result.stats, owners, targets, backend.gathered_weight)
        batches_done, tokens = result.batches, result.tokens
        if world > 1:
            batches_done, tokens = all_reduce_sum([result.batches, result.tokens])
        report = {"importance_seconds": result.seconds, "importance_batches": batches_done,
                  "importance_tokens": tokens, "importance_world_size": world}
        return Scores(stats=stats, owners=owners, shapes=shapes, report=report)
