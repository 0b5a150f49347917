"""Training-step time and memory of TASO against the frozen-base floor and PEFT LoRA, side by side in one run.

Variants (all on the same seeded ~100M LLaMA built from code, fp32):
  floor     no adapter, every weight frozen; the embedding output requires grad so backward still runs through
            the whole network. That activation-gradient pass is the cost every adapter pays, so it is the floor.
  taso      TASO lora_block, adapter rank 4, budget rank1, on all 7 projections; regions from a real
            estimate_importance on 2 small calibration batches (timed separately, run once in the parent).
  lora_r1, lora_r16   PEFT LoRA r=1 / r=16 on the same 7 projections (lora_dropout=0), via get_peft_model.

Memory: each variant runs a few steps in its own child process (`--variant NAME`), one at a time, so the process's
peak RSS belongs to that variant alone; the parent collects one JSON line from each child's stdout.
Time: the parent builds all variants side by side and runs them step-interleaved, one step of each per round in ABBA
order (A B C D, D C B A, ...). On a shared 2-core machine other work comes and goes on the scale of seconds;
interleaving single steps puts every variant under the same load, which separate runs cannot.

  python bench/bench_adapter_step.py                 # defaults: see --help; writes bench/results/adapter_step_cpu.json
  python bench/bench_adapter_step.py --profile taso  # torch.profiler table of a few steps of one variant
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

VARIANTS = ("floor", "taso", "lora_r1", "lora_r16")
RESULT_MARK = "BENCH_RESULT "  # prefix of the one stdout line a child hands back to the parent
TIME_AIM, SEED = 1.10, 0
ROOT = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 2 x 256 rather than 4 x 256: one 4 x 256 step takes ~11 s on 2 cores, which would put 4 variants x 10 steps
    # (plus the memory children) well past an 8-minute run; the ratios compare per-token costs either way.
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant (interleaved rounds)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (allocator, thread pools)")
    p.add_argument("--mem-steps", type=int, default=2, help="steps after 1 warm-up in each memory child")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=None, help="default: 8/3 hidden rounded up to 64")
    p.add_argument("--heads", type=int, default=None, help="default: hidden / 64")
    p.add_argument("--kv-heads", type=int, default=None, help="default: heads / 3 (GQA as in LLaMA-3)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--calib-batches", type=int, default=2)  # TASO importance: 2 small batches of 2 x 128
    p.add_argument("--calib-batch", type=int, default=2)
    p.add_argument("--calib-seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--out", default=None, help="default: bench/results/adapter_step_<device>.json")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # child mode: measure one variant
    p.add_argument("--masks", default=None, help=argparse.SUPPRESS)  # child mode: TASO regions from the parent
    p.add_argument("--profile", default=None, metavar="VARIANT", help="profile a few steps of one variant instead")
    a = p.parse_args(argv)
    a.intermediate = a.intermediate or -(-a.hidden * 8 // 3 // 64) * 64
    a.heads = a.heads or max(1, a.hidden // 64)
    a.kv_heads = a.kv_heads or max(1, a.heads // 3)
    a.variants = [v for v in a.variants.split(",") if v]
    if unknown := set(a.variants) - set(VARIANTS) | ({a.variant, a.profile} - {None} - set(VARIANTS)):
        p.error(f"unknown variant(s) {sorted(unknown)}; expected {list(VARIANTS)}")
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    a.out = a.out or str(ROOT / "results" / f"adapter_step_{a.device}.json")
    return a


def model_config(a):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                       num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
                       max_position_embeddings=max(a.seq, a.calib_seq), tie_word_embeddings=False)


def build_base(a):
    """The same weights in every process: one seed, built from code (nothing downloaded)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(model_config(a)).to(a.device)
    model.config.use_cache = False
    return model


def make_batch(a, batch: int, seq: int, seed: int, prompt_frac: float = 0.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, a.vocab, (batch, seq), generator=g)
    labels = ids.clone().index_fill_(1, torch.arange(int(seq * prompt_frac)), -100)  # SFT: no loss on prompts
    return {k: t.to(a.device) for k, t in (("input_ids", ids), ("attention_mask", torch.ones_like(ids)),
                                           ("labels", labels))}


def calibrate(a):
    """TASO's selection stage as the recipe runs it: estimate_importance → choose_regions. Returns (regions, info)."""
    from taso_llm.methods.taso import TasoArguments
    from taso_llm.sparse.importance import estimate_importance
    from taso_llm.sparse.select import SelectionSpec, choose_regions
    from taso_llm.targets import DEFAULT_TARGETS, find_targets

    model = build_base(a)
    targs = TasoArguments(taso_structure="lora_block", taso_adapter_rank=4)
    batches = [make_batch(a, a.calib_batch, a.calib_seq, seed=100 + i, prompt_frac=0.5)
               for i in range(a.calib_batches)]
    start = time.perf_counter()
    result = estimate_importance(model, find_targets(model, DEFAULT_TARGETS), batches, show_progress=False)
    regions = choose_regions(result.stats, SelectionSpec("lora_block", rank=targs.taso_adapter_rank, budget="rank1"))
    info = {"importance_seconds": result.seconds, "select_seconds": time.perf_counter() - start,
            "batches": result.batches, "tokens": result.tokens, "structure": targs.taso_structure,
            "budget": "rank1", "adapter_rank": targs.taso_adapter_rank, "alpha": targs.alpha,
            "base_params": sum(p.numel() for p in model.parameters())}
    del model
    gc.collect()
    return regions, info


def build_variant(name: str, a, regions=None):
    """(model, optimizer or None) for one variant, from a fresh seeded base."""
    from taso_llm.targets import DEFAULT_TARGETS

    model = build_base(a)
    for p in model.parameters():
        p.requires_grad_(False)
    if name == "floor":
        # Nothing trainable: make the embedding output a grad-requiring leaf so backward traverses the network.
        model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    elif name == "taso":
        from taso_llm.adapters import attach_updates

        attach_updates(model, regions, alpha=4.0)  # alpha = adapter_rank: scale 1, the recipe default
    else:
        from peft import LoraConfig, get_peft_model

        r = int(name.removeprefix("lora_r"))
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, bias="none",
                                                 target_modules=list(DEFAULT_TARGETS), task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, (torch.optim.AdamW(params, lr=1e-4) if params else None)


def train_step(model, opt, batch) -> None:
    loss = model(**batch).loss
    loss.backward()
    if opt is not None:  # floor: nothing to update
        opt.step()
        opt.zero_grad(set_to_none=True)


def _status_kb(field: str) -> int | None:
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    return next((int(ln.split()[1]) for ln in lines if ln.startswith(field + ":")), None)


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS, so the next peak is training-only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _loadavg() -> float | None:  # how busy the machine was: other work on these cores inflates wall times
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _sync(a) -> None:
    if a.device == "cuda":  # CUDA runs asynchronously: wait for the step before reading the clock
        torch.cuda.synchronize()


def measure_variant(name: str, a, regions=None, warmup: int = 1, steps: int | None = None) -> dict:
    """Build one variant alone, run warmup + steps; memory after build and at the training peak (and the times)."""
    steps = a.mem_steps if steps is None else steps
    torch.set_num_threads(a.threads)
    model, opt = build_variant(name, a, regions)
    batch = make_batch(a, a.batch, a.seq, seed=1)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gc.collect()
    mem: dict = {}
    if a.device == "cuda":
        built = torch.cuda.synchronize() or torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        built = (_status_kb("VmRSS") or 0) * 1024
        mem["peak_reset"] = _reset_peak_rss()
    times = []
    for i in range(warmup + steps):
        _sync(a)
        t0 = time.perf_counter()
        train_step(model, opt, batch)
        _sync(a)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if a.device == "cuda":  # allocator peak, not RSS: what the GPU actually had to hold
        peak = torch.cuda.max_memory_allocated()
        mem.update(kind="cuda_max_memory_allocated", peak_mb=peak / 2**20, train_peak_mb=peak / 2**20)
    else:
        lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        since_build = (_status_kb("VmHWM") or 0) * 1024 if mem["peak_reset"] else lifetime
        mem.update(kind="cpu_rss", peak_mb=lifetime / 2**20, train_peak_mb=since_build / 2**20)
    mem.update(built_mb=built / 2**20, delta_train_mb=mem["train_peak_mb"] - built / 2**20)
    return {"variant": name, "trainable_params": trainable, "step_seconds": times,
            "median_step_seconds": statistics.median(times), "memory": mem,
            "loadavg_1m_after": _loadavg()}


def child_argv(a, name: str, masks: str | None) -> list[str]:
    args = [sys.executable, str(Path(__file__).resolve()), "--variant", name, "--device", a.device]
    for flag in ("batch", "seq", "mem_steps", "layers", "hidden", "intermediate", "heads", "kv_heads",
                 "vocab", "threads"):
        args += ["--" + flag.replace("_", "-"), str(getattr(a, flag))]
    return args + (["--masks", masks] if masks else [])


def run_child(a, name: str, masks: str | None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(child_argv(a, name, masks), stdout=subprocess.PIPE, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"variant {name}: child exited {proc.returncode} without a result; stdout:\n"
                           f"{proc.stdout[-2000:]}")
    return json.loads(lines[-1][len(RESULT_MARK):])


def run_order(variants: list[str], rounds: int) -> list[str]:
    """A B C D, D C B A, A B C D, ...: each variant sits early and late, so slow drift cancels in the median."""
    return [v for k in range(rounds) for v in (variants if k % 2 == 0 else variants[::-1])]


def time_interleaved(a, variants: list[str], regions) -> dict:
    """All variants built in this process; `warmup` steps each, then `steps` ABBA rounds of one step each."""
    torch.set_num_threads(a.threads)
    batch = make_batch(a, a.batch, a.seq, seed=1)
    built = {v: build_variant(v, a, regions if v == "taso" else None) for v in variants}
    [train_step(*built[v], batch) for v in variants for _ in range(a.warmup)]
    times: dict = {v: [] for v in variants}
    load_before = _loadavg()
    order = run_order(variants, a.steps)
    for v in order:
        _sync(a)
        t0 = time.perf_counter()
        train_step(*built[v], batch)
        _sync(a)
        times[v].append(time.perf_counter() - t0)
    trainable = {v: sum(p.numel() for p in m.parameters() if p.requires_grad) for v, (m, _) in built.items()}
    return {"times": times, "trainable": trainable, "order": order, "loadavg_1m": [load_before, _loadavg()]}


def expected_params(a, regions) -> dict:
    """What each variant should train, from shapes alone: TASO Σ r(|R|+|C|), LoRA r Σ (d_in + d_out)."""
    from taso_llm.sparse.regions import lora_params

    shapes = [tuple(r.shape) for r in regions.values()]
    return {"floor": 0, "taso": sum(r.num_params() for r in regions.values()),
            **{f"lora_r{k}": sum(lora_params(s, k) for s in shapes) for k in (1, 16)}}


def machine_info(a) -> dict:
    import peft
    import transformers

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), platform.processor())
    return {"cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)), "cpu_model": cpu,
            "torch_threads": a.threads, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "gpu": torch.cuda.get_device_name(0) if a.device == "cuda" else None}


def summarize(a, timing: dict, mem_runs: list[dict], calib: dict, regions) -> dict:
    expect = expected_params(a, regions)
    mem = {r["variant"]: r for r in mem_runs}
    variants = {}
    for name, raw in timing["times"].items():
        m = mem[name]
        if m["trainable_params"] != timing["trainable"][name]:
            raise RuntimeError(f"{name}: child and parent built different trainable sets")
        variants[name] = {
            "trainable_params": timing["trainable"][name], "expected_trainable_params": expect[name],
            "median_step_seconds": statistics.median(raw), "raw_step_seconds": raw,
            "isolated_step_seconds": m["step_seconds"],  # the memory child's own steps, for reference
            **{k: m["memory"][k] for k in ("peak_mb", "train_peak_mb", "built_mb", "delta_train_mb")},
            "memory": m["memory"]}
    floor = variants.get("floor")
    for v in variants.values():  # ratios to the frozen-base floor
        v["time_x_floor"] = v["median_step_seconds"] / floor["median_step_seconds"] if floor else None
        v["delta_mem_x_floor"] = (v["delta_train_mb"] / floor["delta_train_mb"]
                                  if floor and floor["delta_train_mb"] > 0 else None)
    aims = {}
    if "taso" in variants and floor:
        x = variants["taso"]["time_x_floor"]
        aims["time_within_1.10x_floor"] = {"measured": x, "holds": x <= TIME_AIM}
    if "taso" in variants and "lora_r1" in variants:
        t, l1 = variants["taso"], variants["lora_r1"]
        aims["delta_mem_le_lora_r1"] = {"taso_mb": t["delta_train_mb"], "lora_r1_mb": l1["delta_train_mb"],
                                        "holds": t["delta_train_mb"] <= l1["delta_train_mb"]}
        aims["peak_mem_le_lora_r1"] = {"taso_mb": t["peak_mb"], "lora_r1_mb": l1["peak_mb"],
                                       "holds": t["peak_mb"] <= l1["peak_mb"]}
    cfg = {k: getattr(a, k) for k in ("batch", "seq", "steps", "warmup", "mem_steps", "layers", "hidden",
                                      "intermediate", "heads", "kv_heads", "vocab", "threads", "device")}
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": {**cfg, "dtype": "float32", "base_params": calib["base_params"], "order": timing["order"]},
            "machine": machine_info(a), "loadavg_1m_during_timing": timing["loadavg_1m"],
            "taso_selection": calib, "variants": variants, "aims": aims}


def format_table(report: dict) -> str:
    head = ("variant", "trainable params", "step s", "x floor time", "peak MB", "Δ train MB", "x floor Δmem")
    rows = [head]
    for name, v in report["variants"].items():
        fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
        rows.append((name, f"{v['trainable_params']:,}", f"{v['median_step_seconds']:.3f}",
                     fmt(v["time_x_floor"], ".3f"), f"{v['peak_mb']:.0f}", f"{v['delta_train_mb']:.0f}",
                     fmt(v["delta_mem_x_floor"], ".2f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def format_aims(report: dict) -> str:
    return "\n".join(f"aim {key}: {'HOLDS' if aim['holds'] else 'MISSED'} (" + (
        f"{aim['measured']:.3f}x floor)" if "measured" in aim
        else f"TASO {aim['taso_mb']:.0f} MB vs LoRA r=1 {aim['lora_r1_mb']:.0f} MB)")
        for key, aim in report["aims"].items())


def profile(a, name: str) -> None:
    """Operator-level breakdown of 3 steps (after warm-up) of one variant, sorted by self CPU time."""
    from torch.profiler import ProfilerActivity, profile as tprofile
    regions = calibrate(a)[0] if name == "taso" else None
    torch.set_num_threads(a.threads)
    model, opt = build_variant(name, a, regions)
    batch = make_batch(a, a.batch, a.seq, seed=1)
    [train_step(model, opt, batch) for _ in range(max(1, a.warmup))]
    cuda = a.device == "cuda"
    with tprofile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        for _ in range(3):
            train_step(model, opt, batch)
    print(prof.key_averages().table(sort_by=f"self_{'cuda' if cuda else 'cpu'}_time_total", row_limit=30))


def main(argv=None) -> dict | None:
    a = parse_args(argv)
    if a.profile:
        return profile(a, a.profile)
    if a.variant:  # child: measure one variant, hand back one JSON line
        warnings.filterwarnings("ignore", category=FutureWarning)  # PEFT calls deprecated transformers helpers
        from taso_llm.sparse.masks import load_masks

        regions = load_masks(a.masks)[0] if a.variant == "taso" else None
        print(RESULT_MARK + json.dumps(measure_variant(a.variant, a, regions)), flush=True)
        return None
    torch.set_num_threads(a.threads)
    started = time.perf_counter()
    from taso_llm.io import write_json
    from taso_llm.sparse.masks import save_masks
    regions, calib = calibrate(a)
    print(f"base model: {calib['base_params'] / 1e6:.1f}M parameters, fp32, {a.device}; TASO selection "
          f"{calib['importance_seconds']:.1f} s importance on {calib['batches']} batches", flush=True)
    mem_runs = []
    with tempfile.TemporaryDirectory(prefix="bench-masks-") as tmp:
        masks = str(Path(tmp) / "masks.safetensors")
        save_masks(masks, regions, "bench-llama-from-code")
        for name in a.variants:  # memory: one child per variant, one at a time
            mem_runs.append(run_child(a, name, masks if name == "taso" else None))
            print(f"  memory {name:9s} Δ train {mem_runs[-1]['memory']['delta_train_mb']:.0f} MB "
                  f"(isolated step {mem_runs[-1]['median_step_seconds']:.2f} s)", flush=True)
    print(f"  timing {len(a.variants)} variants x {a.steps} interleaved steps", flush=True)
    report = summarize(a, time_interleaved(a, a.variants, regions), mem_runs, calib, regions)
    report["total_seconds"] = time.perf_counter() - started
    write_json(a.out, report)
    print(format_table(report))
    print(format_aims(report))
    print(f"wrote {a.out} ({report['total_seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
