"""Weighted mixtures of sources, exact and deterministic.

Reading of the weights: they are normalised to fractions p_i = w_i / sum(w). The mixture has the largest size T for
which no source must repeat a row, T = min_i floor(len_i / p_i) over sources with p_i > 0, and source i contributes
n_i = T * p_i rows, rounded by largest remainder so the counts sum to exactly T. Each source's rows are a seeded random
subset (without replacement); the concatenation is then shuffled with the same seed. Weight 0 drops a source.
"""

from __future__ import annotations

import math

import numpy as np
from datasets import Dataset, concatenate_datasets


def mixture_counts(sizes: dict[str, int], weights: dict[str, float]) -> dict[str, int]:
    total_weight = sum(weights.values())
    fractions = {name: weights[name] / total_weight for name in sizes}
    used = [name for name in sizes if fractions[name] > 0]
    total = min(math.floor(sizes[name] / fractions[name] + 1e-9) for name in used)
    raw = {name: total * fractions[name] for name in sizes}
    counts = {name: math.floor(value + 1e-9) for name, value in raw.items()}
    # Largest remainder; ties go to the earlier source so the result never depends on dict hashing.
    by_remainder = sorted(used, key=lambda name: (-(raw[name] - counts[name]), list(sizes).index(name)))
    for name in by_remainder[:total - sum(counts.values())]:
        counts[name] += 1
    return counts


def seeded_subset(ds: Dataset, n: int, rng: np.random.Generator) -> Dataset:
    """n random rows of ds (without replacement), kept in their original order."""
    return ds.select(np.sort(rng.permutation(len(ds))[:n]))


def mix(sources: dict[str, Dataset], weights: dict[str, float], seed: int) -> Dataset:
    counts = mixture_counts({name: len(ds) for name, ds in sources.items()}, weights)
    parts = [seeded_subset(ds, counts[name], np.random.default_rng([seed, i]))
             for i, (name, ds) in enumerate(sources.items()) if counts[name] > 0]
    mixed = concatenate_datasets(parts)
    return mixed.select(np.random.default_rng(seed).permutation(len(mixed)))
