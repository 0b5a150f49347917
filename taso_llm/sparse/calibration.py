"""Calibration batches for importance: the first N sequences of the tokenized train split, collated exactly as
training batches are (same chat template, same completion-only labels), in a fixed order.

Batch b is scored by rank b % world_size, so any world size sees the same batches, each exactly once. Every batch
carries its global index (importance.BATCH_INDEX). When the batch count is not a multiple of the world size, the
ranks with fewer batches get one padding batch (a repeat of an earlier one, marked importance.COUNTED = False):
every rank then runs the same number of forward/backward passes, which ZeRO-3 / FSDP need because gathering a
sharded weight inside those passes is a collective all ranks must join.
"""

from __future__ import annotations

from typing import Callable, Iterator

from .importance import BATCH_INDEX, COUNTED

# Columns the SFT collator consumes; string metadata columns (task, answer, tests, ...) are dropped.
_MODEL_COLUMNS = ("input_ids", "attention_mask", "completion_mask", "assistant_masks", "labels", "position_ids")


def num_calibration_batches(dataset_len: int, samples: int, batch_size: int) -> int:
    n = min(samples, dataset_len)
    return (n + batch_size - 1) // batch_size


def rank_batch_indices(n_batches: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, bool]]:
    """(global batch index, counted) in the order `rank` scores them; the same length on every rank."""
    mine = [(b, True) for b in range(rank, n_batches, world_size)]
    steps = -(-n_batches // world_size)  # ceil
    while len(mine) < steps:  # pad with a repeat: its own last batch, or batch 0 if it has none
        mine.append((mine[-1][0] if mine else 0, False))
    return mine


def calibration_batches(dataset, collate: Callable, samples: int, batch_size: int, rank: int = 0,
                        world_size: int = 1) -> Iterator[dict]:
    n = min(samples, len(dataset))
    keep = [c for c in dataset.column_names if c in _MODEL_COLUMNS]
    subset = dataset.select(range(n)).select_columns(keep)
    for b, counted in rank_batch_indices(num_calibration_batches(n, n, batch_size), rank, world_size):
        rows = [subset[i] for i in range(b * batch_size, min(n, (b + 1) * batch_size))]
        yield {**collate(rows), BATCH_INDEX: b, COUNTED: counted}
