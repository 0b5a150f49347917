"""Smoke test of bench/bench_adapter_step.py on a toy LLaMA: the report's structure and the trainable-parameter
counts of every variant. No timing or memory assertions: those depend on the machine and on what else runs."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_adapter_step.py"
TOY = ["--layers", "2", "--hidden", "64", "--intermediate", "176", "--heads", "4", "--kv-heads", "2",
       "--vocab", "256", "--batch", "2", "--seq", "32", "--steps", "2", "--warmup", "1", "--threads", "1",
       "--calib-seq", "32", "--device", "cpu"]


def _load_bench():
    # bench/ is not a package (it is a script directory), so load the file by path.
    spec = importlib.util.spec_from_file_location("bench_adapter_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Everything the parent does, in process: selection, memory runs, interleaved timing, summary, JSON re-read."""
    bench = _load_bench()
    out = tmp_path_factory.mktemp("bench") / "toy.json"
    a = bench.parse_args(TOY + ["--out", str(out)])
    regions, calib = bench.calibrate(a)
    mem_runs = [bench.measure_variant(v, a, regions if v == "taso" else None) for v in bench.VARIANTS]
    timing = bench.time_interleaved(a, list(bench.VARIANTS), regions)
    report = bench.summarize(a, timing, mem_runs, calib, regions)
    from taso_llm.io import write_json

    write_json(out, report)
    return bench, a, regions, json.loads(out.read_text())


def test_report_structure(toy):
    bench, a, _, report = toy
    assert set(report) >= {"date", "config", "machine", "taso_selection", "variants", "aims"}
    assert report["config"]["layers"] == 2 and report["config"]["hidden"] == 64
    assert report["config"]["base_params"] > 0
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["torch"]
    assert report["taso_selection"]["batches"] == a.calib_batches
    assert report["taso_selection"]["importance_seconds"] >= 0
    assert list(report["variants"]) == list(bench.VARIANTS)
    assert report["config"]["order"] == bench.run_order(list(bench.VARIANTS), a.steps)
    for v in report["variants"].values():
        assert len(v["raw_step_seconds"]) == a.steps and all(t > 0 for t in v["raw_step_seconds"])
        assert len(v["isolated_step_seconds"]) == a.mem_steps
        assert v["median_step_seconds"] > 0
        for key in ("peak_mb", "train_peak_mb", "built_mb", "delta_train_mb", "time_x_floor"):
            assert isinstance(v[key], (int, float))
    assert report["variants"]["floor"]["time_x_floor"] == pytest.approx(1.0)
    assert set(report["aims"]) == {"time_within_1.10x_floor", "delta_mem_le_lora_r1", "peak_mem_le_lora_r1"}
    assert all(isinstance(aim["holds"], bool) for aim in report["aims"].values())
    table = bench.format_table(report)
    assert all(name in table for name in bench.VARIANTS) and "x floor time" in table
    assert "aim time_within_1.10x_floor" in bench.format_aims(report)


def test_trainable_params_are_exact(toy):
    bench, a, regions, report = toy
    from taso_llm.targets import DEFAULT_TARGETS, find_targets, layer_shape

    targets = find_targets(bench.build_base(a), DEFAULT_TARGETS)
    assert set(regions) == set(targets) and len(targets) == 7 * a.layers
    lora_r1 = sum(d_in + d_out for d_out, d_in in map(layer_shape, targets.values()))
    taso = sum(r.rank * (len(r.rows) + len(r.cols)) for r in regions.values())
    assert all(r.structure == "lora_block" and r.rank == 4 for r in regions.values())
    v = report["variants"]
    # Measured = what the built model marks requires_grad; expected = from shapes and regions alone.
    assert v["floor"]["trainable_params"] == 0
    assert v["taso"]["trainable_params"] == v["taso"]["expected_trainable_params"] == taso
    assert taso <= lora_r1  # budget rank1: never more than a rank-1 LoRA, matrix by matrix
    assert all(r.rank * (len(r.rows) + len(r.cols)) <= d_in + d_out
               for r, (d_out, d_in) in ((r, r.shape) for r in regions.values()))
    assert v["lora_r1"]["trainable_params"] == v["lora_r1"]["expected_trainable_params"] == lora_r1
    assert v["lora_r16"]["trainable_params"] == 16 * lora_r1


def test_run_order_is_abba():
    bench = _load_bench()
    assert bench.run_order(["a", "b", "c"], 2) == ["a", "b", "c", "c", "b", "a"]
    assert bench.run_order(["a", "b"], 3) == ["a", "b", "b", "a", "a", "b"]


@pytest.mark.slow
def test_cli_spawns_one_child_per_run(tmp_path):
    """The parent/child plumbing: each run is a child process whose JSON line the parent collects."""
    import subprocess

    out = tmp_path / "cli.json"
    proc = subprocess.run([sys.executable, str(BENCH), *TOY, "--variants", "floor,taso",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["config"]["order"] == ["floor", "taso", "taso", "floor"]
    assert report["variants"]["taso"]["trainable_params"] == report["variants"]["taso"]["expected_trainable_params"]
    assert "aim time_within_1.10x_floor" in proc.stdout
