"""Distributed TASO importance: owner assignment, exact ordered reduction, padded batches (no processes), and real
2-process runs over gloo (DDP-style replicas, ZeRO-3 under zero.Init, FSDP2 fully_shard) against one process."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from taso_llm.sparse.calibration import rank_batch_indices
from taso_llm.distributed.reduce import assign_owners
from taso_llm.sparse.importance import BATCH_INDEX, COUNTED, estimate_importance, ordered_sum
from taso_llm.targets import DEFAULT_TARGETS, find_targets

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist" / "importance_run.py"
CASES = ("even", "odd", "after_sum", "model_budget")  # as in tests/dist/importance_run.py


# ------------------------------------------------------------------------------------------- no processes

def _llama_shapes(layers=4, h=4096, kv=1024, ff=14336):
    shapes = {}
    for i in range(layers):
        for name, shape in (("q_proj", (h, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, h)),
                            ("gate_proj", (ff, h)), ("up_proj", (ff, h)), ("down_proj", (h, ff))):
            shapes[f"model.layers.{i}.{name}"] = shape
    return shapes


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_owner_assignment_is_balanced_and_deterministic(world):
    shapes = _llama_shapes()
    owners = assign_owners(shapes, world)
    assert set(owners) == set(shapes) and set(owners.values()) <= set(range(world))
    load = [sum(shapes[n][0] * shapes[n][1] for n, r in owners.items() if r == k) for k in range(world)]
    largest = max(a * b for a, b in shapes.values())
    assert max(load) - min(load) <= largest  # greedy LPT bound
    shuffled = list(shapes.items())
    random.Random(0).shuffle(shuffled)
    assert assign_owners(dict(shuffled), world) == owners  # input order does not matter


def test_owner_ties_go_to_lowest_rank_then_name():
    shapes = {n: (8, 8) for n in ("d", "b", "a", "c")}
    assert assign_owners(shapes, 2) == {"a": 0, "b": 1, "c": 0, "d": 1}
    assert assign_owners({"big": (10, 10), "x": (5, 5), "y": (5, 5)}, 2) == {"big": 0, "x": 1, "y": 1}


def test_ordered_sum_is_the_streaming_accumulation():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(1000, generator=g, dtype=torch.float64) * 10 ** k for k in range(-4, 5)]
    streamed = torch.zeros(1000, dtype=torch.float64)
    for p in parts:
        streamed += p
    assert torch.equal(ordered_sum(parts, into=torch.zeros(1000, dtype=torch.float64)), streamed)
    assert torch.equal(ordered_sum(parts), streamed)
    assert not torch.equal(ordered_sum(parts[::-1]), streamed)  # order matters, hence one fixed order


@pytest.mark.parametrize("n, world", [(5, 2), (6, 2), (2, 4), (7, 3), (0, 2)])
def test_padded_rank_batches(n, world):
    per_rank = [rank_batch_indices(n, r, world) for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1  # same number of passes on every rank
    counted = sorted(b for p in per_rank for b, c in p if c)
    assert counted == list(range(n))  # each batch counted exactly once
    for r, p in enumerate(per_rank):
        assert all(b % world == r for b, c in p if c)


def test_uncounted_batch_adds_nothing(tiny_model):
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(5, 700, (2, 10), generator=g) for _ in range(3)]
    batches = [{"input_ids": x, "labels": x.clone(), BATCH_INDEX: 10 + i} for i, x in enumerate(ids)]
    targets = find_targets(tiny_model, DEFAULT_TARGETS)
    ref = estimate_importance(tiny_model, targets, batches[:2], show_progress=False, per_batch=True)
    padded = estimate_importance(tiny_model, targets, [*batches[:2], {**batches[0], COUNTED: False}],
                                 show_progress=False, per_batch=True)
    assert padded.batches == 2 and padded.tokens == ref.tokens
    for name, s in ref.stats.items():
        p = padded.stats[name]
        assert torch.equal(p.row, s.row) and torch.equal(p.col, s.col)
        assert sorted(p.per_batch) == [10, 11]
        assert torch.equal(ordered_sum([r for r, _ in p.per_batch.values()],
                                       into=torch.zeros_like(s.row)), s.row)


# ------------------------------------------------------------------------------------------- 2 processes

def _env(cache: Path) -> dict:
    return {**os.environ, "TASO_LLM_CACHE": str(cache), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _launch(cmd, cache):
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(cache), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The reference: one process, same data. Also builds the shared tiny-model cache before any rank starts."""
    cache = tmp_path_factory.mktemp("cache")
    subprocess.run([sys.executable, "-c", "from taso_llm.tiny import tiny_model_path; tiny_model_path()"],
                   env=_env(cache), check=True, timeout=120)
    out = tmp_path_factory.mktemp("single")
    _launch([sys.executable, str(SCRIPT), "--engine", "single", "--out", str(out)], cache)
    return cache, out


def _stats(out: Path, case: str, world: int) -> dict:
    merged = {}
    for r in range(world):
        part = load_file(out / case / f"stats_rank{r}.safetensors")
        assert not set(part) & set(merged), "a matrix has two owners"
        merged.update(part)
    return merged


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero3"])
def test_two_processes_match_one(single_run, tmp_path, engine):
    cache, ref = single_run
    out = tmp_path / engine
    _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
             "--engine", engine, "--out", str(out), *(["--then_train"] if engine == "zero3" else [])], cache)
    for case in CASES:
        expected, got = load_file(ref / case / "masks.safetensors"), load_file(out / case / "masks.safetensors")
        assert expected.keys() == got.keys() and len(expected) == 28
        for key in expected:  # masks: bitwise, in every case and on every engine
            assert torch.equal(expected[key], got[key]), (case, key)
        ranks = [load_file(out / case / f"regions_rank{r}.safetensors") for r in range(2)]
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # every rank holds the same full set
        ref_stats, stats = _stats(ref, case, 1), _stats(out, case, 2)
        assert ref_stats.keys() == stats.keys() and len(stats) == 28
        bitwise = case != "after_sum" and engine != "zero3"  # see distributed.py: full mode and ZeRO-3 to tolerance
        for key in ref_stats:
            if bitwise:
                assert torch.equal(ref_stats[key], stats[key]), (case, key)
            else:
                torch.testing.assert_close(stats[key], ref_stats[key], rtol=1e-6, atol=0)
        report = json.loads((out / case / "report.json").read_text())
        expected_report = json.loads((ref / case / "report.json").read_text())
        assert report["importance_world_size"] == 2
        assert report["importance_batches"] == expected_report["importance_batches"]  # padding batch not counted
        assert report["importance_tokens"] == expected_report["importance_tokens"]
        allocated = {k: v for k, v in report["budget_allocation"].items() if k != "by_module"}
        assert allocated == {k: v for k, v in expected_report["budget_allocation"].items() if k != "by_module"}
        if bitwise:  # the allocation is a function of the owners' masses: bitwise equal wherever the stats are
            assert report["budget_allocation"] == expected_report["budget_allocation"]
