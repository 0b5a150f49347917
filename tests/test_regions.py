"""Core-region choice: exact budgets, planted structure found, deterministic."""

import pytest
import torch

from taso_llm.sparse.regions import choose_region, parse_budget


def _planted(d_out=40, d_in=60, rows=(3, 17, 29), cols=(5, 11, 42, 58), seed=0):
    g = torch.Generator().manual_seed(seed)
    full = torch.rand(d_out, d_in, generator=g) * 0.01
    for r in rows:
        full[r, :] += 1.0
    for c in cols:
        full[:, c] += 1.0
    return full


def test_budget_parsing():
    assert parse_budget("rank1", (40, 60)) == 100
    assert parse_budget("rank4", (40, 60)) == 400
    assert parse_budget("lora_r2", (40, 60)) == 200
    assert parse_budget(123, (40, 60)) == 123
    with pytest.raises(ValueError, match="budget='half'"):
        parse_budget("half", (40, 60))


@pytest.mark.parametrize("rank", [1, 2, 4, 7])
def test_lora_block_respects_budget_exactly(rank):
    full = _planted()
    region = choose_region(full.sum(1), full.sum(0), (40, 60), "lora_block", 100, rank=rank)
    assert region.num_params() == rank * (len(region.rows) + len(region.cols)) <= 100
    assert 100 - region.num_params() < rank  # spends the budget up to rounding
    assert torch.equal(region.rows, torch.sort(region.rows).values)
    assert len(set(region.rows.tolist())) == len(region.rows)


def test_planted_rows_and_columns_are_found():
    full = _planted()
    region = choose_region(full.sum(1), full.sum(0), (40, 60), "lora_block", 100, rank=4)
    assert {3, 17, 29} <= set(region.rows.tolist())
    assert {5, 11, 42, 58} <= set(region.cols.tolist())


def test_dense_block_and_entries():
    full = _planted()
    dense = choose_region(full.sum(1), full.sum(0), (40, 60), "dense_block", 100)
    assert len(dense.rows) * len(dense.cols) <= 100
    assert {3, 17, 29} <= set(dense.rows.tolist())
    entries = choose_region(full.sum(1), full.sum(0), (40, 60), "entries", 100, full=full)
    assert len(entries.rows) == 100
    expected = torch.topk(full.flatten(), 100).indices
    got = entries.rows * 60 + entries.cols
    assert set(got.tolist()) == set(expected.tolist())


def test_budget_below_minimum_is_refused():
    full = _planted()
    with pytest.raises(ValueError, match="below what structure='lora_block'"):
        choose_region(full.sum(1), full.sum(0), (40, 60), "lora_block", 5, rank=4)


def test_zero_importance_is_deterministic():
    z = torch.zeros(8), torch.zeros(6)
    a = choose_region(*z, (8, 6), "lora_block", 14, rank=1)
    b = choose_region(*z, (8, 6), "lora_block", 14, rank=1)
    assert torch.equal(a.rows, b.rows) and torch.equal(a.cols, b.cols)


@pytest.mark.parametrize("high", [True, False])
def test_top_entries_equal_the_first_k_of_a_stable_sort_with_ties(high):
    from taso_llm.sparse.regions import top_entries

    g = torch.Generator().manual_seed(0)
    for scores in (torch.randint(0, 5, (30, 40), generator=g).float(), torch.rand(30, 40, generator=g)):
        for k in (1, 7, 240, 241, 600, 1199, 1200, 5000):
            reference = torch.sort(scores.flatten(), descending=high, stable=True).indices[:k]
            assert torch.equal(top_entries(scores, k, high), torch.sort(reference).values), (k, high)
