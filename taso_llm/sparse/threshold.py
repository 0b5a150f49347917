"""One global threshold over the scores of every target matrix, on one process or spread over owner ranks.

`kth_smallest` finds the k-th smallest score of all matrices exactly without gathering them: a radix select on the
float32 bit patterns (for non-negative floats, +inf included, the int32 view orders exactly as the values do). Four
passes of 8 bits; in each, every rank histograms the entries of its owned matrices that share the prefix found so
far, and the 256-bin histograms are summed over ranks (int64: exact). Then `threshold_counts` gives each matrix's
entries below and at the threshold, `budget.allocate_by_threshold` turns them into per-matrix counts, and
`lowest_entries` marks a matrix's kept entries (all below, then ties by flat index, as regions.choose_region sorts).
Given the owners' scores, all of it is exact integer work: the same on every rank and for every world size.
"""

from __future__ import annotations

import torch

from ..distributed.reduce import all_reduce_sum


def _bits(scores: torch.Tensor) -> torch.Tensor:
    if scores.dtype != torch.float32:
        raise TypeError(f"threshold: scores must be float32, got {scores.dtype}")
    bits = scores.detach().contiguous().view(torch.int32).flatten()
    if bool((bits < 0).any()) or bool((bits > 0x7F800000).any()):  # sign bit set, or NaN
        raise ValueError("threshold: scores must be non-negative and not NaN")
    return bits


def kth_smallest(tensors: list[torch.Tensor], k: int, distributed: bool = False) -> float:
    """The k-th smallest (1-based) entry of all `tensors` (with `distributed`, of every rank's tensors together)."""
    bits = [_bits(t) for t in tensors]
    total = sum(b.numel() for b in bits)
    if distributed:
        total = all_reduce_sum([total])[0]
    if not 1 <= k <= total:
        raise ValueError(f"threshold: k={k} is outside 1..{total} (the number of scored entries)")
    prefix, remaining = 0, k
    for shift in (24, 16, 8, 0):
        hist = torch.zeros(256, dtype=torch.int64)
        for b in bits:
            if shift < 24:  # only the entries whose higher bits equal the prefix found so far
                b = b[(b >> (shift + 8)) == (prefix >> (shift + 8))]
            hist += torch.bincount(((b >> shift) & 255).long(), minlength=256)
        if distributed:
            hist = torch.tensor(all_reduce_sum(hist.tolist()), dtype=torch.int64)
        cumulative = torch.cumsum(hist, 0)
        digit = int(torch.searchsorted(cumulative, torch.tensor(remaining)))  # first bin reaching `remaining`
        remaining -= int(cumulative[digit - 1]) if digit else 0
        prefix |= digit << shift
    return float(torch.tensor([prefix], dtype=torch.int32).view(torch.float32))


def threshold_counts(scores: torch.Tensor, threshold: float) -> tuple[int, int]:
    """(entries < threshold, entries == threshold)."""
    t = torch.tensor(threshold, dtype=scores.dtype)
    return int((scores < t).sum()), int((scores == t).sum())


def lowest_entries(scores: torch.Tensor, keep: int, threshold: float) -> torch.Tensor:
    """Bool mask of the `keep` lowest entries: every entry below the threshold, then entries equal to it by flat index
    (what a stable ascending sort would take first)."""
    t = torch.tensor(threshold, dtype=scores.dtype)
    mask = scores < t
    extra = keep - int(mask.sum())
    if extra < 0:
        raise ValueError(f"lowest_entries: {int(mask.sum())} entries lie below the threshold, more than keep={keep}")
    if extra:
        ties = (scores == t).flatten().nonzero().squeeze(1)[:extra]
        mask.view(-1)[ties] = True
    return mask
