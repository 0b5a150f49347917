"""Smoke test of bench/bench_adapter_step.py on a toy LLaMA: the report's structure and the trainable-parameter
counts of every variant. No timing or memory assertions: those depend on the machine and on what else runs."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from script_loader import load_script  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_adapter_step.py"
TOY = ["--layers", "2", "--hidden", "64", "--intermediate", "176", "--heads", "4", "--kv-heads", "2",
       "--vocab", "256", "--batch", "2", "--seqs", "32", "--steps", "2", "--warmup", "1", "--threads", "1",
       "--calib-seq", "32", "--device", "cpu"]
VARIANTS = "floor,taso@r1,taso@r1/autograd,lora@r1,lora@r16"


def _load_bench():
    return load_script("bench/bench_adapter_step.py", "bench_adapter_step")


@pytest.fixture(scope="module")
def toy():
    """Everything the parent does for one sequence length, in process: memory runs, interleaved timing, summary."""
    bench = _load_bench()
    a = bench.parse_args(TOY + ["--variants", VARIANTS])
    mem_runs = [bench.measure_variant(v, a, 32) for v in a.variants]
    timing = bench.time_interleaved(a, a.variants, 32)
    base_params = sum(p.numel() for p in bench.build_base(a).parameters())
    run = bench.summarize_run(a, 32, timing, mem_runs, base_params)
    return bench, a, json.loads(json.dumps(run))


def test_run_structure_and_table(toy):
    bench, a, run = toy
    assert run["seq"] == 32 and run["tokens_per_step"] == 64
    assert list(run["variants"]) == VARIANTS.split(",")
    assert run["order"] == bench.run_order(VARIANTS.split(","), a.steps)
    for v in run["variants"].values():
        assert len(v["raw_step_seconds"]) == a.steps and v["median_step_seconds"] > 0 and v["tokens_per_second"] > 0
        assert v["peak_mb"] > 0 and v["memory"]["kind"] == "cpu_rss"
    assert run["variants"]["floor"]["time_x_floor"] == pytest.approx(1.0)
    assert {"time_within_1.05x_floor", "time_ratio_below_lora_r1", "delta_mem_le_lora_r1"} <= set(run["aims"])
    assert all(isinstance(aim["holds"], bool) for aim in run["aims"].values())
    table = bench.format_table(run)
    assert all(name in table for name in run["variants"]) and "x floor time" in table


def test_trainable_params_are_the_methods_budgets(toy):
    bench, a, run = toy
    from taso_llm.targets import DEFAULT_TARGETS, find_targets, layer_shape

    targets = find_targets(bench.build_base(a), DEFAULT_TARGETS)
    lora_r1 = sum(d_in + d_out for d_out, d_in in map(layer_shape, targets.values()))
    v = run["variants"]
    assert v["floor"]["trainable_params"] == 0
    assert v["lora@r1"]["trainable_params"] == lora_r1 and v["lora@r16"]["trainable_params"] == 16 * lora_r1
    taso = v["taso@r1"]
    assert taso["trainable_params"] == taso["method_report"]["trainable_params"] <= lora_r1
    assert lora_r1 - 4 * len(targets) < taso["trainable_params"]  # rank-4 blocks spend the budget to < r per matrix
    assert v["taso@r1/autograd"]["trainable_params"] == taso["trainable_params"]


def test_variant_labels_parse_and_refuse():
    bench = _load_bench()
    v = bench.Variant.parse("taso@r16/autograd+compile")
    assert (v.method, v.rank, v.autograd, v.compiled) == ("taso", 16, True, True)
    assert bench.Variant.parse("floor").method is None
    for bad in ("taso@", "nosuch@r1"):
        with pytest.raises(ValueError, match="variant"):
            bench.Variant.parse(bad)


def test_run_order_is_abba():
    bench = _load_bench()
    assert bench.run_order(["a", "b", "c"], 2) == ["a", "b", "c", "c", "b", "a"]
    assert bench.run_order(["a", "b"], 3) == ["a", "b", "b", "a", "a", "b"]


@pytest.mark.slow
def test_cli_spawns_one_child_per_run(tmp_path):
    """The parent/child plumbing over two sequence lengths: each is a run of child processes and one timing."""
    import subprocess

    out = tmp_path / "cli.json"
    proc = subprocess.run([sys.executable, str(BENCH), *TOY, "--seqs", "16,32", "--variants", "floor,taso@r1",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["seq"] for r in report["runs"]] == [16, 32]
    assert report["runs"][0]["order"] == ["floor", "taso@r1", "taso@r1", "floor"]
    assert report["config"]["variants"] == ["floor", "taso@r1"]
    assert "aim time_within_1.05x_floor" in proc.stdout
