"""TASO importance with 1 and 2 processes on the same calibration set: wall time and peak memory per rank, and the
importance stage as a share of one training epoch of the default recipe.

Engines (2 processes over gloo, OMP_NUM_THREADS=1 per rank, so 1 process uses 1 core and 2 use 2):
  single  one process, the reference;
  ddp     replicated model (what DDP ranks hold while TASO scores: only the per-rank statistics shrink);
  fsdp    FSDP2 fully_shard per decoder layer + root on a CPU mesh (weights sharded);
  zero3   loaded under ZeRO-3 zero.Init (weights partitioned), scored through a temporary engine.
Every run checks that its masks equal the single-process masks.

Memory: a sampler thread reads this process's RSS every 2 ms while importance runs. `rss_peak` is the highest RSS
seen during importance (model or shard + activations + statistics + one gathered weight), `rss_delta` that minus
the RSS just before (what the importance stage itself added). glibc keeps freed memory, so these are high-water
marks. `param_bytes_local` is the model storage a rank holds (its shards under FSDP2 / ZeRO-3). `stats_bytes`
counts the float64 row/col statistics a rank kept: with 2 ranks its batches × Σ(d_in + d_out) × 8
(kept per batch for the exact ordered reduction), on one process a single running sum.

  python bench/bench_importance.py            # writes bench/results/importance_cpu.json and prints a table
  python bench/bench_importance.py --epoch-share --threads 1   # importance vs a training step per token, and the
                                              # 8B/7B recipes' epoch shares (bench/importance_share.py)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist"))  # the test harness's data and engine loaders, not copied here
MARK = "BENCH_RESULT "
ENGINES = ("single", "ddp", "fsdp", "zero3")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    def __init__(self, every=0.002):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def __enter__(self):
        self.before = self.peak = _rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def child(engine: str, samples: int, batch_size: int, model_dir: str, masks_out: str) -> None:
    """One process (or one rank): load, score, print one JSON line from rank 0 with every rank's numbers."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    import importance_run as harness
    from taso_llm.sparse.calibration import calibration_batches, num_calibration_batches
    from taso_llm.distributed import Backend, rank_and_world
    from taso_llm.methods.taso import TasoArguments
    from taso_llm.sparse.masks import save_masks
    from taso_llm.sparse.select import SelectionSpec, select_regions
    from taso_llm.targets import DEFAULT_TARGETS, find_targets

    if engine != "single":
        dist.init_process_group("gloo")
    rank, world = rank_and_world()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = harness.tokenized_rows(tokenizer, samples)
    model = harness.load_model(engine, model_dir, world)
    targets = find_targets(model, DEFAULT_TARGETS)
    own = TasoArguments()
    spec = SelectionSpec(own.taso_structure, rank=own.taso_adapter_rank)
    batches = list(calibration_batches(data, harness.collate_fn(tokenizer.pad_token_id), samples, batch_size,
                                       rank, world))  # collated up front: the timing is importance only
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    with PeakRSS() as mem:
        selection = select_regions(model, targets, own.statistic(), spec, batches,
                                   num_calibration_batches(len(data), samples, batch_size), Backend.for_model(model),
                                   show_progress=False)
        regions, report = selection.regions, selection.report
    seconds = time.perf_counter() - start
    counted = sum(1 for b in batches if b["taso_counted"])
    local = [p.to_local() if hasattr(p, "to_local") else p.ds_tensor if hasattr(p, "ds_tensor") else p
             for p in model.parameters()]
    mine = {"rank": rank, "seconds": seconds, "estimate_seconds": report["importance_seconds"],
            "param_bytes_local": sum(t.numel() * t.element_size() for t in local),  # what this rank holds
            "rss_peak": mem.peak, "rss_delta": mem.peak - mem.before, "batches_scored": len(batches),
            # per-batch vectors kept on several ranks; one running sum on one process
            "stats_bytes": (counted if world > 1 else 1) * 8 * sum(m.in_features + m.out_features
                                                                   for m in targets.values())}
    everyone = [mine]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
    if rank == 0:
        save_masks(masks_out, regions, "bench")
        print(MARK + json.dumps({"engine": engine, "world_size": world, "ranks": everyone}), flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run_child(engine: str, a, model_dir: Path, work: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    masks = work / f"masks_{engine}.safetensors"
    launcher = [sys.executable] if engine == "single" else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*launcher, __file__, "--child", engine, "--samples", str(a.samples), "--batch_size", str(a.batch_size),
           "--model_dir", str(model_dir), "--masks_out", str(masks)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{engine} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return {**json.loads(lines[-1][len(MARK):]), "masks": masks}


def recipe_epoch_share(work: Path) -> dict:
    """The default recipe for one epoch: importance_seconds / train_seconds from its metrics.json."""
    out = work / "recipe"
    cmd = [sys.executable, str(ROOT / "recipes" / "sft_taso.py"), "--output_dir", str(out), "--num_train_epochs", "1",
           "--save_strategy", "no"]
    # one thread as in the importance runs: on this 2-core box two torch threads made both importance and training
    # several times slower (OpenMP contention), which would distort the share
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    m = json.loads((out / "metrics.json").read_text())
    return {"config": "recipes/configs/tiny/instruct_taso.yaml (num_train_epochs 1, save_strategy no)",
            "omp_threads": 1,
            "importance_seconds": m["importance_seconds"], "importance_batches": m["importance_batches"],
            "epoch_train_seconds": m["train_seconds"],
            "importance_share_of_epoch": m["importance_seconds"] / m["train_seconds"]}


def main():
    if "--epoch-share" in sys.argv:  # its own arguments: bench/importance_share.py
        import importance_share

        return importance_share.main([x for x in sys.argv[1:] if x != "--epoch-share"])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=ENGINES)
    p.add_argument("--model_dir")
    p.add_argument("--masks_out")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--sizes", nargs="*", default=["256x4", "768x6"],
                   help="HIDDENxLAYERS model sizes; the larger one shows weight sharding in the memory columns")
    p.add_argument("--engines", nargs="*", default=list(ENGINES))
    p.add_argument("--skip_recipe", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "importance_cpu.json"))
    a = p.parse_args()
    if a.child:
        return child(a.child, a.samples, a.batch_size, a.model_dir, a.masks_out)

    from safetensors.torch import load_file

    from taso_llm.io import write_json
    from taso_llm.tiny import write_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-importance-"))
    result = {
        "bench": "importance", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "omp_threads_per_rank": 1},
        "calibration": {"samples": a.samples, "batch_size": a.batch_size, "batches": -(-a.samples // a.batch_size),
                        "data": "bundled taso-tiny SFT rows, chat template, completion-only labels, <= 128 tokens"},
        "models": [],
    }
    for spec in a.sizes:
        hidden, layers = (int(v) for v in spec.split("x"))
        size = dict(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                    num_attention_heads=8, num_key_value_heads=4)
        model_dir = write_tiny_model(work / f"model-{spec}", seed=0, **size)
        runs = [run_child(e, a, model_dir, work) for e in a.engines]
        ref = load_file(runs[0]["masks"])
        for r in runs:
            got = load_file(r.pop("masks"))
            r["masks_equal_to_first"] = got.keys() == ref.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
        result["models"].append({"size": spec, "config": {**size, "vocab": "tiny tokenizer (1024)"},
                                 "params": _params(model_dir), "runs": runs})
    if not a.skip_recipe:
        result["recipe_epoch"] = recipe_epoch_share(work)
    write_json(a.out, result)
    _table(result)


def _params(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _table(result: dict) -> None:
    mib = 2 ** 20
    print(f"{'model':6} {'engine':7} {'W':>2} {'rank':>4} {'batches':>7} {'seconds':>8} {'rss_peak MiB':>12} "
          f"{'rss_delta MiB':>13} {'params MiB':>10} {'stats KiB':>9} masks==single")
    for m in result["models"]:
        for r in m["runs"]:
            for k in r["ranks"]:
                print(f"{m['size']:6} {r['engine']:7} {r['world_size']:>2} {k['rank']:>4} {k['batches_scored']:>7} "
                      f"{k['seconds']:>8.2f} {k['rss_peak'] / mib:>12.1f} {k['rss_delta'] / mib:>13.1f} "
                      f"{k['param_bytes_local'] / mib:>10.1f} {k['stats_bytes'] / 1024:>9.1f} "
                      f"{r['masks_equal_to_first']}")
    if "recipe_epoch" in result:
        e = result["recipe_epoch"]
        print(f"default recipe: importance {e['importance_seconds']:.2f} s ({e['importance_batches']} batches), "
              f"one epoch {e['epoch_train_seconds']:.2f} s -> share {e['importance_share_of_epoch']:.1%}")


if __name__ == "__main__":
    main()
