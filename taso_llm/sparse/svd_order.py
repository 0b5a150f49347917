"""SMoA's statistic and selector: order each matrix's rows and columns by the singular directions they draw on, and
split them into K groups whose diagonal blocks W_kk are the subspaces SMoA modulates.

One SVD of each frozen W = U Σ Vᵀ (d_out × d_in, k = min(d_out, d_in) singular values, index j = 0..k-1 from the
largest). Row i draws on direction j with energy (U_ij σ_j)² (summing to ‖W_i,:‖²); its score is the energy-weighted
mean index

    s_i = Σ_j j (U_ij σ_j)² / Σ_j (U_ij σ_j)²,

small for rows living in the top singular directions. Columns likewise with V. Rows (columns) are sorted by score,
ascending, ties by index (stable sort), and cut into K contiguous groups of equal size (the first d mod K groups one
longer). A row (column) with no energy at all gets s = k and sorts last.

Distributed: the SVD of a matrix runs on its OWNER rank only (distributed/reduce.py assign_owners), on the weight
gathered through `Backend.gathered_weight`. When the weights are sharded (ZeRO-3, FSDP2) that gather is a collective,
so every rank gathers every matrix, one at a time, in sorted-name order; with whole weights (one process, DDP) only
the owner reads it. The groups then reach every rank as Region index vectors (`share_regions`): the result is a
function of the weights alone, the same for any world size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed.backend import Backend
from ..distributed.reduce import assign_owners, share_object, share_regions
from ..targets import layer_shape
from .importance import LayerStats
from .regions import PARAM_COUNTS, Region
from .statistics import Scores

STRUCTURE = "modulated_blocks"  # adapters/modulated.py: ΔW_kk = (B_k A_k) ⊙ W_kk on each diagonal block
# Region index vectors of a modulated-blocks region besides rows/cols (sorted: the order Region.index_tensors uses)
OFFSET_NAMES = ("col_offsets", "row_offsets")


def singular_index_scores(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row scores (d_out,), column scores (d_in,)) in float64: each one's energy-weighted mean singular index."""
    u, sigma, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    index = torch.arange(len(sigma), dtype=torch.float64, device=sigma.device)

    def mean_index(vectors: torch.Tensor) -> torch.Tensor:  # vectors: (d, k) singular vectors as columns
        energy = (vectors * sigma).double().square()
        total = energy.sum(1)
        score = (energy @ index) / total.clamp_min(torch.finfo(torch.float64).tiny)
        return torch.where(total > 0, score, float(len(sigma))).cpu()

    return mean_index(u), mean_index(vh.T)


def group_offsets(n: int, groups: int) -> torch.Tensor:
    """K + 1 offsets cutting n sorted indices into K contiguous groups of equal size (the first n mod K one longer)."""
    sizes = [n // groups + (1 if k < n % groups else 0) for k in range(groups)]
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)


def _grouped_order(scores: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Indices by ascending score (stable), each group then sorted by index so a region is canonical."""
    order = torch.sort(scores, stable=True).indices
    return torch.cat([torch.sort(order[a:b]).values for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())])


def modulated_region(row_scores: torch.Tensor, col_scores: torch.Tensor, shape: tuple[int, int], groups: int,
                     rank: int) -> Region:
    """The K row groups and K column groups of one matrix: `rows[row_offsets[k]:row_offsets[k+1]]` × the same slice
    of `cols` is diagonal block k. `rank` is SMoA's total rank r, split across the blocks (split_rank)."""
    d_out, d_in = shape
    if not 1 <= groups <= min(d_out, d_in):
        raise ValueError(f"{groups} subspaces do not fit a {d_out} x {d_in} matrix (each needs a row and a column)")
    row_offsets, col_offsets = group_offsets(d_out, groups), group_offsets(d_in, groups)
    return Region(STRUCTURE, (d_out, d_in), _grouped_order(row_scores, row_offsets),
                  _grouped_order(col_scores, col_offsets), rank=rank,
                  extra={"row_offsets": row_offsets, "col_offsets": col_offsets})


def split_rank(rank: int, groups: int) -> list[int]:
    """SMoA's total rank r split across K blocks: r // K each, the first r mod K blocks one more."""
    return [rank // groups + (1 if k < rank % groups else 0) for k in range(groups)]


def modulated_params(region: Region) -> int:
    """Trainable parameters of a modulated-blocks region: Σ_k r_k (|R_k| + |C_k|) ≈ (r/K)(d_in + d_out)."""
    rows, cols = region.extra["row_offsets"].diff().tolist(), region.extra["col_offsets"].diff().tolist()
    return sum(r * (a + b) for r, a, b in zip(split_rank(region.rank, len(rows)), rows, cols))


PARAM_COUNTS[STRUCTURE] = modulated_params


def diagonal_energy_share(weight: torch.Tensor, region: Region) -> float:
    """‖W‖² held by the K diagonal blocks: the part of the weight SMoA can modulate (1/K if the order meant nothing)."""
    w = weight.float()
    rows, cols = region.rows.to(w.device), region.cols.to(w.device)
    ro, co = region.extra["row_offsets"].tolist(), region.extra["col_offsets"].tolist()
    inside = sum(float(w[rows[ro[k]:ro[k + 1]]][:, cols[co[k]:co[k + 1]]].double().square().sum())
                 for k in range(len(ro) - 1))
    total = float(w.double().square().sum())
    return inside / total if total > 0 else 0.0


@dataclass(frozen=True)
class SingularIndexOrder:
    """The statistic: row and column singular-index scores of each matrix (LayerStats.row / .col), on its owner.
    Reads weights, not data (`needs_calibration` False: the batches are ignored). While the owner holds a weight it
    also records, in LayerStats.meta, the share of ‖W‖² that the `groups` diagonal blocks will hold."""

    groups: int = 2
    needs_calibration = False

    def score(self, model: nn.Module, targets: dict[str, nn.Module], batches=(), num_batches: int | None = None,
              backend: Backend | None = None, show_progress: bool = True) -> Scores:
        backend = backend or Backend.for_model(model)
        shapes = {name: layer_shape(m) for name, m in targets.items()}
        owners = assign_owners(shapes, backend.world)
        start = time.perf_counter()
        stats = {}
        for name in tqdm(sorted(targets), desc="SVD order", disable=not (show_progress and backend.is_main)):
            mine = owners[name] == backend.rank
            if not (mine or backend.sharded):
                continue  # whole weights: only the owner reads this one
            weight = backend.gathered_weight(targets[name])  # a collective when sharded: every rank, same order
            if mine:
                row, col = singular_index_scores(weight)
                region = modulated_region(row, col, shapes[name], self.groups, rank=1)
                stats[name] = LayerStats(shape=shapes[name], row=row, col=col,
                                         meta={"diagonal_energy_share": diagonal_energy_share(weight, region)})
            del weight
        report = {"svd_seconds": time.perf_counter() - start, "svd_world_size": backend.world}
        return Scores(stats=stats, owners=owners, shapes=shapes, report=report)


def select_modulated_blocks(model: nn.Module, targets: dict[str, nn.Module], groups: int, rank: int,
                            backend: Backend | None = None, show_progress: bool = True):
    """statistic → owners → each owner cuts its matrices into K groups → regions (and per-matrix figures) shared
    to every rank. SMoA has no budget allocation: its size is fixed by r and K. Returns (regions, layers, report)."""
    backend = backend or Backend.for_model(model)
    scores = SingularIndexOrder(groups=groups).score(model, targets, backend=backend, show_progress=show_progress)
    regions = {name: modulated_region(s.row, s.col, s.shape, groups, rank) for name, s in scores.stats.items()}
    layers = {name: dict(s.meta) for name, s in scores.stats.items()}
    if backend.distributed:
        regions = share_regions(regions, scores.owners, scores.shapes, STRUCTURE,
                                index_names=("rows", "cols", *OFFSET_NAMES))
        layers = share_object(layers, scores.owners)
    return {name: regions[name] for name in targets}, layers, scores.report  # module order, on every rank
