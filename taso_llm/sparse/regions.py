"""Core regions: importance statistics + shape + parameter budget → which rows/columns/entries an adapter trains.

Structures (chosen reading of TASO, methods.md):
  - "lora_block":  a rank-r update B_R A_C on core rows R × core columns C, with r·(|R| + |C|) ≤ budget;
  - "dense_block": a free |R| × |C| block, |R|·|C| ≤ budget;
  - "entries":     the top-`budget` entries of I (needs full importance matrices).

Block sizes: row shares f_r(a) (importance mass held by the top-a rows) and column shares f_c(b) are taken from
the statistics; the split of the budget between rows and columns maximises f_r(a)·f_c(b), the block's share of
the mass if importance were a product of row and column factors. Ties keep the smaller row count. Everything is
sorted with stable sorts so the same statistics always give the same masks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

STRUCTURES = ("lora_block", "dense_block", "entries")


@dataclass
class Region:
    """Trainable coordinates of one matrix. Blocks: sorted `rows`, `cols`. Entries: pairs (rows[k], cols[k]).

    A structure that needs more index vectors than rows and cols keeps them in `extra` (name → int64 vector); every
    consumer (masks file, sharing between ranks, adapter files, resume checks) goes through `index_tensors()`."""

    structure: str
    shape: tuple[int, int]
    rows: torch.Tensor  # int64
    cols: torch.Tensor  # int64
    rank: int = 1
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def index_tensors(self) -> dict[str, torch.Tensor]:
        return {"rows": self.rows, "cols": self.cols, **{k: self.extra[k] for k in sorted(self.extra)}}

    @classmethod
    def from_indices(cls, structure: str, shape, indices: dict[str, torch.Tensor], rank: int = 1) -> "Region":
        extra = {k: v.long() for k, v in indices.items() if k not in ("rows", "cols")}
        return cls(structure, tuple(shape), indices["rows"].long(), indices["cols"].long(), rank=rank, extra=extra)

    def num_params(self) -> int:
        count = PARAM_COUNTS.get(self.structure)
        if count is None:
            raise ValueError(f"structure {self.structure!r} has no registered parameter count (regions.PARAM_COUNTS)")
        return count(self)


# Trainable parameters of a region, per structure; a module that adds a structure registers its count here.
PARAM_COUNTS = {
    "lora_block": lambda r: r.rank * (len(r.rows) + len(r.cols)),
    "dense_block": lambda r: len(r.rows) * len(r.cols),
    "entries": lambda r: len(r.rows),
}


def parse_budget(budget: str | int, shape: tuple[int, int]) -> int:
    """Trainable parameters allowed for one matrix: 'rank1' = d_in + d_out, 'rankK' = K·(d_in + d_out), or an int."""
    d_out, d_in = shape
    text = str(budget).strip().lower()
    if text.isdigit():
        return int(text)
    match = re.fullmatch(r"(?:rank|lora_r)(\d+)", text)
    if match:
        return int(match.group(1)) * (d_in + d_out)
    raise ValueError(f"budget={budget!r}: expected 'rank1', 'rankK' (K·(d_in+d_out) params), or an integer")


def min_budget(structure: str, rank: int) -> int:
    """The smallest budget the structure can spend: one row and one column at rank r, or one entry."""
    return 2 * rank if structure == "lora_block" else 1


def budget_step(structure: str, rank: int) -> int:
    """Parameters one more row or column costs: r for a rank-r block, 1 otherwise (model-wide allocation rounds to it)."""
    return rank if structure == "lora_block" else 1


def mass_shares(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, share): indices by descending score and the cumulative share held by the top-k, k = 1..n."""
    order = torch.sort(scores, descending=True, stable=True).indices
    cum = torch.cumsum(scores[order].double(), 0)
    total = float(cum[-1]) if len(cum) else 0.0
    if total <= 0:  # no signal: shares grow linearly, the first indices win
        share = torch.arange(1, len(scores) + 1, dtype=torch.float64) / len(scores)
    else:
        share = cum / total
    return order, share


def _sorted(idx: torch.Tensor) -> torch.Tensor:
    return torch.sort(idx).values


def choose_region(row: torch.Tensor, col: torch.Tensor, shape: tuple[int, int], structure: str, budget: int,
                  rank: int = 1, full: torch.Tensor | None = None, keep: str = "high") -> Region:
    """`keep="high"` takes the highest scores (TASO); "low" the lowest (TaLoS's low-sensitivity entries)."""
    d_out, d_in = shape
    if keep not in ("high", "low"):
        raise ValueError(f"keep={keep!r}: expected 'high' or 'low'")
    if keep == "low" and structure != "entries":
        raise ValueError(f"keeping the lowest scores is defined for structure='entries', not {structure!r}")
    if budget < min_budget(structure, rank):
        raise ValueError(f"budget of {budget} params is below what structure={structure!r} "
                         f"(rank={rank}) can use: at least {min_budget(structure, rank)}")
    if structure == "entries":
        if full is None:
            raise ValueError("structure='entries' needs full importance matrices (importance keep='full')")
        flat = top_entries(full, min(budget, d_out * d_in), high=keep == "high")
        return Region(structure, shape, flat // d_in, flat % d_in)
    row_order, row_share = mass_shares(row)
    col_order, col_share = mass_shares(col)
    a = torch.arange(1, d_out + 1)
    if structure == "lora_block":
        cells = budget // rank  # |R| + |C|
        b = torch.clamp(cells - a, max=d_in)
    elif structure == "dense_block":
        b = torch.clamp(budget // a, max=d_in)
    else:
        raise ValueError(f"structure={structure!r}: expected one of {STRUCTURES}")
    valid = b >= 1
    value = torch.where(valid, row_share * col_share[torch.clamp(b, min=1) - 1], torch.tensor(-1.0, dtype=torch.float64))
    best = int(torch.argmax(value))  # argmax returns the first maximum: the smaller row count on ties
    n_rows, n_cols = best + 1, int(b[best])
    return Region(structure, shape, _sorted(row_order[:n_rows]), _sorted(col_order[:n_cols]),
                  rank=rank if structure == "lora_block" else 1)


def top_entries(scores: torch.Tensor, k: int, high: bool = True) -> torch.Tensor:
    """Sorted flat indices of the k highest (`high`) or lowest scores, ties at the cut taken by lowest index: exactly
    the first k of a stable sort, without sorting everything (a full sort of a 4096 × 4096 matrix takes ~9 s on one
    CPU thread, this ~1 s). topk only finds the cut value; which entries are taken does not depend on its tie order."""
    flat = scores.flatten()
    if k >= flat.numel():
        return torch.arange(flat.numel())
    values = torch.topk(flat, k, largest=high, sorted=False).values
    cut = values.min() if high else values.max()
    beyond = flat > cut if high else flat < cut
    at_cut = torch.nonzero(flat == cut).flatten()
    chosen = torch.cat([torch.nonzero(beyond).flatten(), at_cut[:k - int(beyond.sum())]])
    return torch.sort(chosen).values  # row-major order: rows then cols ascending


def lora_params(shape: tuple[int, int], rank: int = 1) -> int:
    """Parameters of a rank-r LoRA on a matrix: the reference TASO's budget is measured against."""
    return rank * (shape[0] + shape[1])
