"""`bench_importance.py --epoch-share`: TASO's importance stage as a share of one training epoch of the 8B / 7B
recipes, from a per-token cost ratio measured side by side, and its peak memory against a checkpointed step's.

Time: in one process, on the step benchmark's model (bench_adapter_step.py's model arguments, default the 99.5M
LLaMA, fp32 on CPU), the parent alternates one importance pass over one batch (TASO's statistic, exactly as
`method.prepare` scores: reentrant checkpointing, G = gᵀx formed in hooks) with one TASO rank-1 training step on a
batch of the same shape, in ABBA order; a non-checkpointed step runs alongside for reference. The recipes score
`calibration_samples` rows in batches of `calibration_batch_size` = their training batch size, so one scored batch
and one step on the same shape compare per-token costs directly: ratio = median importance seconds per token /
median checkpointed-step seconds per token (the recipes train with `gradient_checkpointing: true`).

Share of one epoch = (calibration rows / training rows) × ratio. The calibration rows are the training split's first
rows, tokenized, masked and padded as training batches, so their tokens per row are the epoch's in expectation and
token counts cancel; with W ranks both stages split their rows over the ranks, so W cancels too. Training rows =
the dataset card's row count minus the recipe's `validation_size`.

Memory: each stage in its own child process (one at a time), measured the same way as bench_adapter_step.py's
memory children (`measure_run`: RSS high-water mark reset after the model is built, 1 warm-up + 2 calls).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

import bench_adapter_step as steps
from step_variants import DEFAULT_TARGETS, Variant, build_base, build_variant, make_batch, train_step

ROOT = Path(__file__).resolve().parents[1]
RECIPE_DIRS = ("llama-3.1-8b", "qwen2.5-7b")
# Rows of the recipes' training datasets. Hugging Face's dataset cards and viewers give rows, never tokens.
DATASET_ROWS = {
    "yahma/alpaca-cleaned": (51_760, "HF card/viewer of yahma/alpaca-cleaned: one train split, 51.8k rows (51,760; "
                                     "the 52,002 Stanford Alpaca rows after cleaning)"),
    "meta-math/MetaMathQA": (395_000, "HF card of meta-math/MetaMathQA: MetaMathQA-395K.json, 395,000 rows"),
    "ise-uiuc/Magicoder-OSS-Instruct-75K": (75_197, "HF viewer of ise-uiuc/Magicoder-OSS-Instruct-75K: one train "
                                                    "split, 75.2k rows (75,197; data-oss_instruct-decontaminated)"),
}


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6, help="timed ABBA rounds (one call of each stage per round)")
    p.add_argument("--share-child", choices=("importance", "step"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "importance_epoch_share_cpu.json"))
    own, rest = p.parse_known_args(argv)
    a = steps.parse_args(rest + ["--out", own.out])  # the step bench's model, batch, threads and device arguments
    a.gradient_checkpointing = True  # the recipes' training setting; the reference step below turns it off
    return own, a


def _importance(a):
    """A frozen base and a callable scoring one list of batches as TASO's prepare does (scoring only)."""
    from taso_llm.config import MethodArguments
    from taso_llm.distributed import Backend
    from taso_llm.methods.taso import TasoArguments, selection_spec
    from taso_llm.targets import find_targets

    model = build_base(a)
    model.requires_grad_(False)
    targets = find_targets(model, list(DEFAULT_TARGETS))
    own, shared = TasoArguments(), MethodArguments(method="taso", target_modules=list(DEFAULT_TARGETS))
    statistic, spec = own.statistic(), selection_spec(shared, own)
    backend = Backend.for_model(model)

    def score(batches):
        return statistic.score(model, targets, batches, len(batches), backend, False)

    return model, score, spec


def child(kind: str, a) -> dict:
    torch.set_num_threads(a.threads)
    batch = make_batch(a, a.batch, a.seq, seed=1, prompt_frac=0.5)
    if kind == "importance":
        _, score, _ = _importance(a)
        run = lambda: score([batch])  # noqa: E731
    else:
        model, opt, _ = build_variant(Variant.parse("taso@r1"), a)
        run = lambda: train_step(model, opt, batch)  # noqa: E731
    times, mem = steps.measure_run(a, run, warmup=1, steps=a.mem_steps)
    return {"stage": kind, "seconds": times, "memory": mem}


def _run_child(kind: str, a) -> dict:
    argv = [sys.executable, str(ROOT / "bench" / "bench_importance.py"), "--epoch-share", "--share-child", kind,
            *steps.child_argv(a, "floor", a.seq)[4:]]  # the step bench's child arguments without `--variant floor`
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(steps.RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} child exited {proc.returncode}:\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1][len(steps.RESULT_MARK):])


def time_side_by_side(a, rounds: int) -> dict:
    """Importance (1 batch), checkpointed TASO step and plain TASO step, interleaved ABBA in this process."""
    torch.set_num_threads(a.threads)
    batch = make_batch(a, a.batch, a.seq, seed=1, prompt_frac=0.5)
    _, score, spec = _importance(a)
    gc_model, gc_opt, _ = build_variant(Variant.parse("taso@r1"), a)
    plain = copy.copy(a)
    plain.gradient_checkpointing = False
    model, opt, _ = build_variant(Variant.parse("taso@r1"), plain)
    calls = {"importance": lambda: score([batch]), "step_checkpointed": lambda: train_step(gc_model, gc_opt, batch),
             "step": lambda: train_step(model, opt, batch)}
    for f in calls.values():
        f()  # warm-up
    times: dict = {k: [] for k in calls}
    load = [steps._loadavg()]
    for k in steps.run_order(list(calls), rounds):
        steps._sync(a)
        t0 = time.perf_counter()
        calls[k]()
        steps._sync(a)
        times[k].append(time.perf_counter() - t0)
    # the one-off selection after scoring (runs once per run, not per batch): timed once on 2 scored batches
    from taso_llm.sparse.select import allocate_budgets, choose_regions, mass

    scores = score([batch, batch])
    t0 = time.perf_counter()
    budgets, _ = allocate_budgets(spec, {n: s.shape for n, s in scores.stats.items()},
                                  {n: mass(s) for n, s in scores.stats.items()})
    choose_regions(scores.stats, spec, budgets)
    tokens = a.batch * a.seq
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"raw_seconds": times, "median_seconds": med, "tokens_per_call": tokens,
            "seconds_per_token": {k: v / tokens for k, v in med.items()},
            "ratio_importance_to_checkpointed_step": med["importance"] / med["step_checkpointed"],
            "ratio_importance_to_step": med["importance"] / med["step"],
            "selection_seconds_once": time.perf_counter() - t0, "loadavg_1m": load + [steps._loadavg()]}


def recipe_shares(ratio: float) -> list[dict]:
    rows = []
    for d in RECIPE_DIRS:
        for path in sorted((ROOT / "recipes" / "configs" / d).glob("*_taso.yaml")):
            cfg = yaml.safe_load(path.read_text())
            n, source = DATASET_ROWS[cfg["dataset_name"]]
            train_rows = n - int(cfg.get("validation_size") or 0)
            share = cfg["calibration_samples"] / train_rows * ratio
            rows.append({"recipe": str(path.relative_to(ROOT)), "dataset": cfg["dataset_name"], "dataset_rows": n,
                         "rows_source": source, "validation_size": cfg.get("validation_size"),
                         "train_rows": train_rows, "calibration_samples": cfg["calibration_samples"],
                         "calibration_batch_size": cfg["calibration_batch_size"],
                         "per_device_train_batch_size": cfg["per_device_train_batch_size"],
                         "max_length": cfg["max_length"], "gradient_checkpointing": cfg.get("gradient_checkpointing"),
                         "num_train_epochs": cfg["num_train_epochs"], "share_of_one_epoch": share,
                         "share_of_the_run": share / cfg["num_train_epochs"]})
    return rows


def main(argv) -> None:
    own, a = _parse(argv)
    if own.share_child:
        print(steps.RESULT_MARK + json.dumps(child(own.share_child, a)), flush=True)
        return
    from taso_llm.io import write_json

    memory = {k: _run_child(k, a) for k in ("importance", "step")}
    timing = time_side_by_side(a, own.rounds)
    imp, step = (memory[k]["memory"] for k in ("importance", "step"))
    result = {
        "bench": "importance_epoch_share",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": steps.machine_info(a),
        "config": {k: getattr(a, k) for k in ("batch", "seq", "layers", "hidden", "intermediate", "heads",
                                              "kv_heads", "vocab", "threads", "device", "dtype", "mem_steps")},
        "labels": "prompt half masked (-100), completion half scored, as SFT batches",
        "timing": timing,
        "memory": {**memory, "importance_peak_x_checkpointed_step": imp["train_peak_mb"] / step["train_peak_mb"],
                   "importance_delta_x_checkpointed_step": imp["delta_train_mb"] / step["delta_train_mb"]},
        "recipes": recipe_shares(timing["ratio_importance_to_checkpointed_step"]),
    }
    write_json(a.out, result)
    t = timing
    print(f"importance {t['median_seconds']['importance']:.3f} s, checkpointed step "
          f"{t['median_seconds']['step_checkpointed']:.3f} s, step {t['median_seconds']['step']:.3f} s per "
          f"{t['tokens_per_call']} tokens -> ratio {t['ratio_importance_to_checkpointed_step']:.3f} "
          f"(vs plain step {t['ratio_importance_to_step']:.3f})")
    print(f"peak MB since build: importance {imp['train_peak_mb']:.0f} (Δ {imp['delta_train_mb']:.0f}), "
          f"checkpointed step {step['train_peak_mb']:.0f} (Δ {step['delta_train_mb']:.0f})")
    for r in result["recipes"]:
        print(f"{r['recipe']:48s} {r['train_rows']:>7} rows  epoch share {r['share_of_one_epoch']:.3%}  "
              f"run share {r['share_of_the_run']:.3%}")
    print(f"wrote {a.out}")
