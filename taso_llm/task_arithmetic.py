"""Task arithmetic (Ilharco et al., 2023) as TaLoS evaluates it: add task vectors, or negate one, with α on a grid.

    addition:  θ = θ_pre + α Σ_t τ_t, α maximising the mean normalized accuracy over the added tasks on their
               validation rows; normalized accuracy = accuracy of the merged model ÷ accuracy of the task's own
               fine-tuned model (θ_pre + τ_t; a task whose fine-tuned accuracy is 0 counts 0, and the report says so)
    negation:  θ = θ_pre − α τ_target, α minimising the target task's accuracy among the α where the control task
               keeps ≥ `min_control` (0.95) × its accuracy under θ_pre (α = 0 always qualifies)
Ties go to the smaller α. The merged models are written in HF format (save_pretrained + tokenizer) beside
report.json and report.md. Task vectors come from any training output (adapters/task_vector.py): TaLoS, SpaRTA and
TASO adapters, PEFT LoRA adapters, fully fine-tuned models, mixed freely, as long as they share the base model.

The YAML config (recipes/configs/task_arithmetic/*.yaml; docs/task_arithmetic.md):

    base_model: taso-tiny                # the base every run was trained from (path, hub id, taso-tiny/taso-proxy)
    output_dir: outputs/task-arithmetic
    alpha_step: 0.05                     # grid 0, step, ..., alpha_max
    alpha_max: 1.0
    tasks:
      upper:
        run: outputs/upper-talos         # a training output directory
        kind: instruct                   # accuracy: math (exact match; metric: strict `#### N` or flexible, the
                                         # last number), code (pass@1), instruct (the one correct response, exact
                                         # match after stripping whitespace)
        data: {dataset_name: data/upper.jsonl, dataset_format: prompt_completion, validation_size: 0.1}
        seed: 42                         # the run's seed: the validation split is rebuilt as training built it
        limit: 100                       # first N validation rows
    addition: [upper, lower]             # default: every task
    negation: {target: upper, control: lower, min_control: 0.95}    # optional
    eval: {batch_size: 16, max_new_tokens: 64}
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .records import build_dataclass

log = logging.getLogger("taso_llm")
KINDS = ("math", "code", "instruct")


class TaskArithmeticConfigError(ValueError):
    pass


@dataclass
class TaskSpec:
    name: str
    run: str
    kind: str
    data: dict
    seed: int = 42
    split: str = "validation"
    limit: int | None = None
    metric: str = "strict"  # kind math: "strict" (`#### N`) or "flexible" (the last number, e.g. MetaMath's answers)


@dataclass
class NegationSpec:
    target: str
    control: str
    min_control: float = 0.95


@dataclass
class EvalSpec:
    batch_size: int = 16
    max_new_tokens: int = 128


@dataclass
class TaskArithmeticConfig:
    base_model: str
    output_dir: str
    tasks: dict[str, TaskSpec]
    addition: list[str] | None = None
    negation: NegationSpec | None = None
    alpha_step: float = 0.05
    alpha_max: float = 1.0
    dtype: str = "float32"
    eval: EvalSpec = field(default_factory=EvalSpec)

    def alphas(self) -> list[float]:
        steps = int(round(self.alpha_max / self.alpha_step))
        return [round(i * self.alpha_step, 10) for i in range(steps + 1)]


def _build(cls, values, where: str, **fixed):
    return build_dataclass(cls, values, where, TaskArithmeticConfigError, **fixed)


def parse_config(values: dict, source: str = "task arithmetic config") -> TaskArithmeticConfig:
    """Every error names the field (`tasks.upper.kind: ...`) and comes before any model is loaded."""
    if not isinstance(values, dict):
        raise TaskArithmeticConfigError(f"{source}: expected a mapping at the top level")
    values = dict(values)
    if not isinstance(values.get("tasks"), dict) or not values["tasks"]:
        raise TaskArithmeticConfigError("tasks: expected a non-empty mapping of task name -> {run, kind, data}")
    tasks = {name: _build(TaskSpec, spec, f"tasks.{name}", name=name) for name, spec in values.pop("tasks").items()}
    for name, spec in tasks.items():
        if spec.kind not in KINDS:
            raise TaskArithmeticConfigError(f"tasks.{name}.kind: expected one of {list(KINDS)}, got {spec.kind!r}")
        if spec.metric not in (("strict", "flexible") if spec.kind == "math" else ("strict",)):
            raise TaskArithmeticConfigError(f"tasks.{name}.metric: {spec.metric!r}; 'flexible' (last number) exists for "
                                            "kind math only, beside the default 'strict'")
        if not isinstance(spec.data, dict) or "dataset_name" not in spec.data:
            raise TaskArithmeticConfigError(f"tasks.{name}.data: expected a mapping with dataset_name (DataArguments "
                                            "fields, as the run's recipe had them)")
        if not (Path(spec.run) / "metrics.json").is_file() and not (Path(spec.run) / "adapter_config.json").is_file():
            raise TaskArithmeticConfigError(f"tasks.{name}.run: {spec.run} is not a training output (no metrics.json "
                                            "or adapter_config.json)")
        if spec.limit is not None and (not isinstance(spec.limit, int) or spec.limit < 1):
            raise TaskArithmeticConfigError(f"tasks.{name}.limit: expected a positive integer, got {spec.limit!r}")
    negation = values.pop("negation", None)
    if negation is not None:
        negation = _build(NegationSpec, negation, "negation")
        for key in ("target", "control"):
            if getattr(negation, key) not in tasks:
                raise TaskArithmeticConfigError(f"negation.{key}: {getattr(negation, key)!r} is not one of the tasks "
                                                f"{sorted(tasks)}")
        if negation.target == negation.control:
            raise TaskArithmeticConfigError("negation: target and control must be different tasks")
        if not 0.0 <= negation.min_control <= 1.0:
            raise TaskArithmeticConfigError(f"negation.min_control: expected a fraction in [0, 1], got "
                                            f"{negation.min_control!r}")
    eval_spec = _build(EvalSpec, values.pop("eval", None) or {}, "eval")
    config = _build(TaskArithmeticConfig, values, source, tasks=tasks, negation=negation, eval=eval_spec)
    config.addition = list(tasks) if config.addition is None else config.addition
    unknown = [t for t in config.addition if t not in tasks]
    if unknown or not config.addition:
        raise TaskArithmeticConfigError(f"addition: expected task names from {sorted(tasks)}, got {config.addition!r}")
    if not 0 < config.alpha_step <= config.alpha_max:
        raise TaskArithmeticConfigError(f"alpha_step={config.alpha_step}, alpha_max={config.alpha_max}: expected "
                                        "0 < alpha_step <= alpha_max")
    return config


def load_config(path: str | Path, **overrides) -> TaskArithmeticConfig:
    """The YAML file, with top-level fields replaced by `overrides` (the command line) before validation."""
    path = Path(path)
    if not path.is_file():
        raise TaskArithmeticConfigError(f"{path}: no such task arithmetic config")
    values = yaml.safe_load(path.read_text())
    if isinstance(values, dict):
        values.update(overrides)
    return parse_config(values, str(path))


# ------------------------------------------------------------------------------------------------ evaluation

def validation_rows(spec: TaskSpec):
    """The task's held-out rows, rebuilt as the run's training built them (same data fields and seed)."""
    from .data import DataArguments, load_sft_splits

    try:
        data_args = DataArguments(**spec.data)
    except (TypeError, ValueError) as err:
        raise TaskArithmeticConfigError(f"tasks.{spec.name}.data: {err}") from None
    rows = load_sft_splits(data_args, seed=spec.seed)[spec.split]
    if len(rows) == 0:
        raise TaskArithmeticConfigError(f"tasks.{spec.name}: the {spec.split} split is empty (validation_size?)")
    return rows.select(range(min(spec.limit, len(rows)))) if spec.limit else rows


def accuracy(model, tokenizer, rows, kind: str, eval_spec: EvalSpec, metric: str = "strict") -> float:
    """The project's evaluation (taso_llm/eval): math exact match (strict `#### N` or flexible last number), code
    pass@1, instruct exact match of the one correct response (the synthetic checker's rule, as a judge)."""
    from .eval import evaluate_code, evaluate_instruct, evaluate_math

    opts = {"batch_size": eval_spec.batch_size, "max_new_tokens": eval_spec.max_new_tokens}
    if kind == "math":
        return evaluate_math(model, tokenizer, rows, **opts)["metrics"][f"{metric}_match"]
    if kind == "code":
        return evaluate_code(model, tokenizer, rows, **opts)["metrics"]["pass@1"]
    answers = {json.dumps(p): a for p, a in zip(rows["prompt"], rows["answer"])}
    judge = lambda prompt, text: float(text.strip() == answers[json.dumps(prompt)].strip())  # noqa: E731
    return evaluate_instruct(model, tokenizer, rows, judge=judge, **opts)["metrics"]["judge_mean"]


# ------------------------------------------------------------------------------------------------ search

def choose_addition(curve: list[dict]) -> dict:
    """The point of highest mean normalized accuracy; ties: the smaller α (the curve is in α order)."""
    return max(curve, key=lambda p: (p["mean_normalized"], -p["alpha"]))


def choose_negation(curve: list[dict], target: str, control: str, floor: float) -> dict:
    """The lowest target accuracy among points whose control accuracy ≥ floor; ties: the smaller α."""
    allowed = [p for p in curve if p["accuracy"][control] >= floor - 1e-12]
    return min(allowed, key=lambda p: (p["accuracy"][target], p["alpha"]))


def normalized(acc: dict[str, float], finetuned: dict[str, float]) -> dict[str, float]:
    return {t: (acc[t] / finetuned[t] if finetuned[t] > 0 else 0.0) for t in acc}


def run_task_arithmetic(config: TaskArithmeticConfig) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .adapters.task_vector import TaskArithmetic, load_task_vector, trained_base
    from .io import write_json, write_text
    from .methods import detect
    from .tiny import resolve_model_path

    base_path = resolve_model_path(config.base_model)
    for name, spec in config.tasks.items():  # cheap checks first: which method, which base
        detect(spec.run)
        trained_on = trained_base(spec.run)
        if trained_on is not None and str(resolve_model_path(trained_on)) != str(base_path):
            raise TaskArithmeticConfigError(f"tasks.{name}.run: {spec.run} was trained on {trained_on!r}, not on "
                                            f"base_model {config.base_model!r}; task vectors add up on their own base")
    rows = {name: validation_rows(spec) for name, spec in config.tasks.items()}
    dtype = getattr(torch, config.dtype)
    load_base = lambda path=None: AutoModelForCausalLM.from_pretrained(path or base_path, dtype=dtype)  # noqa: E731
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    vectors = {name: load_task_vector(spec.run, load_base) for name, spec in config.tasks.items()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    merger = TaskArithmetic(load_base().to(device), vectors)

    def evaluate(coefficients: dict[str, float], tasks) -> dict[str, float]:
        model = merger.set(coefficients)
        return {t: accuracy(model, tokenizer, rows[t], config.tasks[t].kind, config.eval, config.tasks[t].metric)
                for t in tasks}

    tasks = list(config.tasks)
    base_acc = evaluate({}, tasks)
    finetuned = {t: evaluate({t: 1.0}, [t])[t] for t in tasks}
    report = {"base_model": config.base_model, "alphas": config.alphas(),
              "tasks": {t: {"run": config.tasks[t].run, "method": vectors[t].method, "kind": config.tasks[t].kind,
                            "rows": len(rows[t]), "nonzero": vectors[t].num_nonzero(), "base_accuracy": base_acc[t],
                            "finetuned_accuracy": finetuned[t]} for t in tasks}}
    out = Path(config.output_dir)

    added = config.addition
    curve = []
    for alpha in config.alphas():
        acc = evaluate({t: alpha for t in added}, added)
        norm = normalized(acc, finetuned)
        curve.append({"alpha": alpha, "accuracy": acc, "normalized": norm,
                      "mean_normalized": sum(norm.values()) / len(norm)})
        log.info("addition alpha=%.2f: %s", alpha, {t: round(a, 4) for t, a in acc.items()})
    best = choose_addition(curve)
    report["addition"] = {"tasks": added, "chosen": best, "curve": curve, "merged_dir": str(out / "addition"),
                          "zero_finetuned": [t for t in added if finetuned[t] == 0]}
    _save_merged(merger.set({t: best["alpha"] for t in added}), tokenizer, out / "addition")

    if config.negation is not None:
        target, control = config.negation.target, config.negation.control
        floor = config.negation.min_control * base_acc[control]
        curve = [{"alpha": a, "accuracy": evaluate({target: -a}, [target, control])} for a in config.alphas()]
        best = choose_negation(curve, target, control, floor)
        report["negation"] = {"target": target, "control": control, "control_floor": floor, "chosen": best,
                              "curve": curve, "merged_dir": str(out / "negation")}
        _save_merged(merger.set({target: -best["alpha"]}), tokenizer, out / "negation")
    merger.reset()
    write_json(out / "report.json", report)
    write_text(out / "report.md", report_markdown(report))
    return report


def _save_merged(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def report_markdown(report: dict) -> str:
    tasks = report["tasks"]
    lines = [f"# Task arithmetic on {report['base_model']}", "",
             "| task | method | run | nonzero in τ | base | fine-tuned |", "|---|---|---|---|---|---|"]
    lines += [f"| {t} | {v['method']} | {v['run']} | {v['nonzero']} | {v['base_accuracy']:.3f} | "
              f"{v['finetuned_accuracy']:.3f} |" for t, v in tasks.items()]
    add = report["addition"]
    chosen = add["chosen"]
    lines += ["", f"## Addition of {', '.join(add['tasks'])}: α = {chosen['alpha']:g}", "",
              "Normalized accuracy = merged accuracy / the task's own fine-tuned accuracy; α maximises its mean.", "",
              "| α | " + " | ".join(f"{t} acc (norm)" for t in add["tasks"]) + " | mean normalized |",
              "|---|" + "---|" * (len(add["tasks"]) + 1)]
    lines += [f"| {p['alpha']:g}{' ←' if p['alpha'] == chosen['alpha'] else ''} | "
              + " | ".join(f"{p['accuracy'][t]:.3f} ({p['normalized'][t]:.2f})" for t in add["tasks"])
              + f" | {p['mean_normalized']:.3f} |" for p in add["curve"]]
    if add["zero_finetuned"]:
        lines += ["", f"Fine-tuned accuracy 0 (normalized accuracy counted 0): {', '.join(add['zero_finetuned'])}."]
    if "negation" in report:
        neg = report["negation"]
        chosen = neg["chosen"]
        lines += ["", f"## Negation of {neg['target']} (control {neg['control']}): α = {chosen['alpha']:g}", "",
                  f"α minimises {neg['target']} accuracy while {neg['control']} stays ≥ {neg['control_floor']:.3f} "
                  "(min_control × its base accuracy).", "",
                  f"| α | {neg['target']} (target) | {neg['control']} (control) |", "|---|---|---|"]
        lines += [f"| {p['alpha']:g}{' ←' if p['alpha'] == chosen['alpha'] else ''} | "
                  f"{p['accuracy'][neg['target']]:.3f} | {p['accuracy'][neg['control']]:.3f} |" for p in neg["curve"]]
    return "\n".join(lines) + "\n"
