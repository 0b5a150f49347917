"""Calibration batches for importance: the first N sequences of the tokenized train split, collated exactly as
training batches are (same chat template, same completion-only labels), in a fixed order.

Batch b is scored by rank b % world_size, so any world size sees the same batches, each exactly once.
"""

from __future__ import annotations

from typing import Callable, Iterator

# Columns the SFT collator consumes; string metadata columns (task, answer, tests, ...) are dropped.
_MODEL_COLUMNS = ("input_ids", "attention_mask", "completion_mask", "assistant_masks", "labels", "position_ids")


def num_calibration_batches(dataset_len: int, samples: int, batch_size: int) -> int:
    n = min(samples, dataset_len)
    return (n + batch_size - 1) // batch_size


def calibration_batches(dataset, collate: Callable, samples: int, batch_size: int, rank: int = 0,
                        world_size: int = 1) -> Iterator[dict]:
    n = min(samples, len(dataset))
    keep = [c for c in dataset.column_names if c in _MODEL_COLUMNS]
    subset = dataset.select(range(n)).select_columns(keep)
    for b in range(rank, num_calibration_batches(n, n, batch_size), world_size):
        rows = [subset[i] for i in range(b * batch_size, min(n, (b + 1) * batch_size))]
        yield collate(rows)
