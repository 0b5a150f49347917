"""Plan and execute the comparison's runs: each one `recipes/sft_taso.py` in a subprocess, then its evaluation.

Why subprocesses: peak memory is then per run (metrics.json's peak RSS / CUDA bytes belong to that run alone) and
each run takes exactly the code path a user's `sft_taso.py --config ... --overrides` takes.

Resumable: a run whose metrics.json exists is not retrained, one whose eval.json exists is not re-evaluated. Both
files are written atomically at the very end of their step, so their presence means the step finished; a directory
without metrics.json is a crashed or interrupted run and is started again from scratch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from taso_llm.compare.config import CompareConfig, DataSpec, check_recipes
from taso_llm.io import write_json

log = logging.getLogger("taso_llm")
ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "sft_taso.py"
METRICS, EVAL = "metrics.json", "eval.json"


@dataclass(frozen=True)
class Run:
    task: str
    method: str
    lr: float
    seed: int

    def dir(self, config: CompareConfig) -> Path:
        return Path(config.output_dir) / self.task / self.method / f"lr{self.lr:g}-seed{self.seed}"


def cli_args(values: dict) -> list[str]:
    """A mapping of recipe fields as TrlParser command-line overrides."""
    out = []
    for key, value in values.items():
        if isinstance(value, list):
            out += [f"--{key}", *map(str, value)]
        elif isinstance(value, bool):
            out += [f"--{key}", str(value).lower()]
        elif value is None:
            continue
        else:
            out += [f"--{key}", str(value)]
    return out


def data_file(config: CompareConfig, task: str, which: str) -> Path:
    return Path(config.output_dir) / "data" / f"{task}_{which}.jsonl"


def prepare_data(config: CompareConfig) -> None:
    """Write the generated train/test files (deterministic in their seeds, so rewriting is harmless); a generated
    test set leaves out rows equal to a generated training row."""
    from taso_llm.proxy import write_task_data

    for name, task in config.tasks.items():
        for which, spec in (("train", task.train), ("test", task.test)):
            if spec is None or spec.generate is None or data_file(config, name, which).is_file():
                continue
            train_file = data_file(config, name, "train")
            exclude = train_file if which == "test" and train_file.is_file() else None
            write_task_data(data_file(config, name, which), spec.generator or name, spec.generate, spec.seed, exclude)


def data_overrides(config: CompareConfig, task: str) -> dict:
    spec = config.tasks[task]
    out = {}
    if spec.train is not None:
        if spec.train.generate is not None:
            out.update(dataset_name=str(data_file(config, task, "train")), dataset_format="prompt_completion")
        else:
            out.update(dataset_name=spec.train.dataset_name, dataset_format=spec.train.format,
                       dataset_config=spec.train.dataset_config, dataset_train_split=spec.train.split)
    if spec.validation_size is not None:
        out["validation_size"] = spec.validation_size
    return out


def test_source(config: CompareConfig, task: str) -> DataSpec:
    spec = config.tasks[task].test
    if spec.generate is None:
        return spec
    return DataSpec(dataset_name=str(data_file(config, task, "test")), format="prompt_completion")


def train_command(config: CompareConfig, run: Run) -> list[str]:
    method = config.methods[run.method]
    overrides = {
        "model_name_or_path": config.base_model, "output_dir": str(run.dir(config)), "seed": run.seed,
        "learning_rate": run.lr, "max_steps": config.max_steps, "save_strategy": "no", "eval_strategy": "no",
        "export_peft": False, "report_to": "none", **data_overrides(config, run.task), **config.overrides,
        **method.overrides}
    launcher = [str(x) for x in config.launcher] if config.launcher else [sys.executable]
    return [*launcher, str(RECIPE), "--config", str(config.recipe_path(run.task, method, ROOT)),
            *cli_args(overrides)]


def run_fields(config: CompareConfig, run: Run) -> dict:
    """The run's recipe fields as training sees them: the recipe YAML under the comparison's and the method's
    overrides."""
    method = config.methods[run.method]
    recipe = yaml.safe_load(config.recipe_path(run.task, method, ROOT).read_text()) or {}
    return {**recipe, **config.overrides, **method.overrides}


MODEL_FIELDS = ("dtype", "load_in_4bit", "bnb_4bit_quant_type", "use_bnb_nested_quant")  # to rebuild the model


def _env(config: CompareConfig) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if config.threads_per_run:
        env.update(OMP_NUM_THREADS=str(config.threads_per_run), MKL_NUM_THREADS=str(config.threads_per_run))
    return env


def _run_logged(cmd: list[str], log_path: Path, env: dict, what: str) -> None:
    with open(log_path, "w") as logf:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}); log {log_path}:\n{tail}")


def train(config: CompareConfig, run: Run) -> dict:
    out = run.dir(config)
    if (out / METRICS).is_file():
        return json.loads((out / METRICS).read_text())
    if out.exists():  # interrupted before metrics.json: start over (no partial state is trusted)
        shutil.rmtree(out)
    out.mkdir(parents=True)
    start = time.perf_counter()
    _run_logged(train_command(config, run), out / "train.log", _env(config), f"training {run}")
    log.info("trained %s in %.0fs", run, time.perf_counter() - start)
    return json.loads((out / METRICS).read_text())


def evaluate(config: CompareConfig, run: Run) -> dict:
    out = run.dir(config)
    if (out / EVAL).is_file():
        return json.loads((out / EVAL).read_text())
    fields = run_fields(config, run)  # what evaluation needs to rebuild the model and render the rows as trained
    spec = {"run_dir": str(out), "base_model": config.base_model, "task": run.task,
            "model_fields": {k: fields[k] for k in MODEL_FIELDS if k in fields},
            "test": asdict(test_source(config, run.task)), "prompt_format": fields.get("prompt_format", "auto"),
            "limit": config.tasks[run.task].eval_limit, "eval": asdict(config.eval)}
    write_json(out / "eval_spec.json", spec)
    cmd = [sys.executable, "-m", "taso_llm.compare.evaluation", str(out / "eval_spec.json")]
    start = time.perf_counter()
    _run_logged(cmd, out / "eval.log", _env(config), f"evaluating {run}")
    log.info("evaluated %s in %.0fs", run, time.perf_counter() - start)
    return json.loads((out / EVAL).read_text())


def _pool_map(config: CompareConfig, fn, items: list) -> list:
    if config.workers == 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(config.workers) as pool:  # threads only wait on subprocesses
        return list(pool.map(fn, items))


def select_lr(config: CompareConfig, task: str, method: str, metrics: dict[Run, dict]) -> tuple[float, str]:
    """The grid LR with the lowest validation loss (completion-only NLL on held-out training rows) on the first
    seed; the last train loss decides when a recipe has no validation split (then said so in the report)."""
    runs = [r for r in metrics if r.task == task and r.method == method and r.seed == config.seeds[0]]
    key = "eval_loss" if all(metrics[r].get("eval_loss") is not None for r in runs) else "last_train_loss"
    best = min(runs, key=lambda r: (float("inf") if metrics[r].get(key) is None else metrics[r][key], r.lr))
    return best.lr, key


def execute(config: CompareConfig) -> dict:
    """Grid on the first seed → chosen LR per (task, method) → the other seeds at that LR → evaluation of all chosen
    runs. Returns {"grid": {run: metrics}, "chosen": {(task, method): (lr, key)}, "final": {run: (metrics, eval)}}."""
    check_recipes(config, ROOT)
    prepare_data(config)
    grid = [Run(t, m, lr, config.seeds[0]) for t in config.tasks for m, spec in config.methods.items()
            for lr in spec.lr_grid]
    grid_metrics = dict(zip(grid, _pool_map(config, lambda r: train(config, r), grid)))
    chosen = {(t, m): select_lr(config, t, m, grid_metrics) for t in config.tasks for m in config.methods}
    final = [Run(t, m, chosen[(t, m)][0], s) for (t, m) in chosen for s in config.seeds]

    def train_and_evaluate(run: Run):
        return train(config, run), evaluate(config, run)

    results = dict(zip(final, _pool_map(config, train_and_evaluate, final)))
    return {"grid": grid_metrics, "chosen": chosen, "final": results}
