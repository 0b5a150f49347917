"""The comparison's YAML file, parsed into dataclasses. Every error names the field (`tasks.math.test.split: ...`).

    name: proxy
    base_model: taso-proxy            # --model_name_or_path of every run (taso-proxy / taso-tiny / a hub id)
    recipes: tiny                     # runs start from recipes/configs/<recipes>/<task>_<recipe>.yaml
    output_dir: outputs/compare/proxy # one sub-directory per run (resumable)
    report_dir: bench/compare_proxy   # report.md, results.json, PNGs (default: output_dir)
    seeds: [0, 1]                     # the first seed also picks each method's learning rate
    max_steps: 300
    workers: 2                        # runs at a time (each a subprocess with threads_per_run threads)
    threads_per_run: 1
    launcher: [accelerate, launch, --config_file, launch/multi_gpu.yaml]   # default: this Python, one process
    overrides: {per_device_train_batch_size: 16}     # CLI overrides for every run
    methods:
      taso: {recipe: taso, lr_grid: [3.0e-3, 1.0e-2]}
      full: {recipe: full, lr_grid: [3.0e-4], overrides: {...}}
    tasks:
      math:
        train: {generate: 2000, seed: 1}              # generated rows (taso_llm.proxy), or dataset_name/format/...
        # generator: math_composed                    # with generate: another generated family of the same task
        test: {dataset_name: openai/gsm8k, dataset_config: main, split: test, format: gsm8k}
        validation_size: 100
        eval_limit: 200
    eval: {batch_size: 16, max_new_tokens: 192}

A config can start from another: `extends: proxy_math_plain.yaml` (a path relative to the extending file) reads that
file first and merges this one over it. Mappings merge key by key, a `null` value removes the key (`methods:
{taso_matrix: null}` drops a method), and anything else (lists, scalars) replaces the parent's value. Chains are
allowed; a cycle is an error naming the files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from taso_llm.records import build_dataclass

TASKS = ("math", "code", "instruct")


class CompareConfigError(ValueError):
    pass


@dataclass
class DataSpec:
    """Rows for a task: `generate` rows of the synthetic family, or a dataset loaded like DataArguments would."""
    generate: int | None = None
    seed: int = 0
    generator: str | None = None        # with generate: a family of taso_llm.proxy.GENERATORS (default: the task's)
    dataset_name: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    format: str = "auto"

    def check(self, where: str, task: str) -> None:
        if (self.generate is None) == (self.dataset_name is None):
            raise CompareConfigError(f"{where}: give exactly one of 'generate' (a row count) or 'dataset_name'")
        if self.generator is not None:
            from taso_llm.proxy import GENERATORS

            if self.generate is None or GENERATORS.get(self.generator, (None, None))[1] != task:
                raise CompareConfigError(f"{where}.generator: expected, with 'generate', one of the {task} families "
                                         f"{[g for g, (_, t) in GENERATORS.items() if t == task]}, got "
                                         f"{self.generator!r}")
        if self.generate is not None and (not isinstance(self.generate, int) or self.generate < 2):
            raise CompareConfigError(f"{where}.generate: expected a row count >= 2, got {self.generate!r}")
        from taso_llm.data.formats import FORMATS

        if self.format != "auto" and self.format not in FORMATS:
            raise CompareConfigError(f"{where}.format: unknown format {self.format!r}; expected auto or one of "
                                     f"{list(FORMATS)}")


@dataclass
class TaskSpec:
    name: str
    test: DataSpec
    train: DataSpec | None = None       # None: the recipe's own dataset
    validation_size: float | None = None  # None: the recipe's
    eval_limit: int | None = None


@dataclass
class MethodSpec:
    name: str
    lr_grid: list[float]
    recipe: str = ""                    # default: the method's name
    overrides: dict = field(default_factory=dict)


@dataclass
class EvalSpec:
    batch_size: int = 8
    max_new_tokens: int = 256
    timeout_s: float = 5.0


@dataclass
class CompareConfig:
    name: str
    base_model: str
    recipes: str
    output_dir: str
    methods: dict[str, MethodSpec]
    tasks: dict[str, TaskSpec]
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    max_steps: int = 100
    report_dir: str | None = None
    workers: int = 1
    threads_per_run: int | None = None
    launcher: list[str] | None = None      # command prefix for training, e.g. [accelerate, launch, --config_file, ...]
    overrides: dict = field(default_factory=dict)
    eval: EvalSpec = field(default_factory=EvalSpec)
    real_model_command: str | None = None  # shown in the report: the same comparison on a real model
    note: str | None = None                # shown at the top of the report (what this comparison is and is not)

    def recipe_path(self, task: str, method: MethodSpec, root: Path) -> Path:
        return root / "recipes" / "configs" / self.recipes / f"{task}_{method.recipe}.yaml"


def _build(cls, values, where: str, **fixed):
    return build_dataclass(cls, values, where, CompareConfigError, **fixed)


def _positive_int(value, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CompareConfigError(f"{where}: expected a positive integer, got {value!r}")


def _method(name: str, values, where: str) -> MethodSpec:
    spec = _build(MethodSpec, values, where, name=name)
    spec.recipe = spec.recipe or name
    grid = spec.lr_grid
    if not isinstance(grid, list) or not grid:
        raise CompareConfigError(f"{where}.lr_grid: expected a non-empty list of learning rates, got {grid!r}")
    try:
        spec.lr_grid = [float(lr) for lr in grid]  # YAML reads 3e-3 (no dot) as a string
    except (TypeError, ValueError):
        raise CompareConfigError(f"{where}.lr_grid: not all numbers: {grid!r}") from None
    if any(lr <= 0 for lr in spec.lr_grid):
        raise CompareConfigError(f"{where}.lr_grid: learning rates must be positive, got {grid!r}")
    if not isinstance(spec.overrides, dict):
        raise CompareConfigError(f"{where}.overrides: expected a mapping of recipe fields")
    return spec


def _task(name: str, values, where: str) -> TaskSpec:
    if name not in TASKS:
        raise CompareConfigError(f"{where}: unknown task {name!r}; expected one of {list(TASKS)}")
    values = dict(values or {})
    if "test" not in values:
        raise CompareConfigError(f"{where}.test: missing (the rows every method is evaluated on)")
    test = _build(DataSpec, values.pop("test"), f"{where}.test")
    test.check(f"{where}.test", name)
    train = values.pop("train", None)
    if train is not None:
        train = _build(DataSpec, train, f"{where}.train")
        train.check(f"{where}.train", name)
    spec = _build(TaskSpec, values, where, name=name, test=test, train=train)
    if spec.eval_limit is not None:
        _positive_int(spec.eval_limit, f"{where}.eval_limit")
    return spec


def parse_compare_config(values: dict, source: str = "compare config") -> CompareConfig:
    if not isinstance(values, dict):
        raise CompareConfigError(f"{source}: expected a mapping at the top level")
    values = dict(values)
    for key in ("methods", "tasks"):
        if not isinstance(values.get(key), dict) or not values[key]:
            raise CompareConfigError(f"{key}: expected a non-empty mapping")
    methods = {n: _method(n, v, f"methods.{n}") for n, v in values.pop("methods").items()}
    tasks = {n: _task(n, v, f"tasks.{n}") for n, v in values.pop("tasks").items()}
    eval_spec = _build(EvalSpec, values.pop("eval", {}) or {}, "eval")
    config = _build(CompareConfig, values, source, methods=methods, tasks=tasks, eval=eval_spec)
    seeds = config.seeds
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise CompareConfigError(f"seeds: expected a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise CompareConfigError(f"seeds: repeated seed in {seeds!r}")
    for key in ("max_steps", "workers"):
        _positive_int(getattr(config, key), key)
    if config.threads_per_run is not None:
        _positive_int(config.threads_per_run, "threads_per_run")
    for key in ("batch_size", "max_new_tokens"):
        _positive_int(getattr(config.eval, key), f"eval.{key}")
    if config.launcher is not None and (not isinstance(config.launcher, list) or not config.launcher):
        raise CompareConfigError(f"launcher: expected a non-empty command list, got {config.launcher!r}")
    if not isinstance(config.overrides, dict):
        raise CompareConfigError("overrides: expected a mapping of recipe fields")
    return config


def merge_over(parent: dict, child: dict) -> dict:
    """`child` merged over `parent`: nested mappings key by key, None deletes a key, other values replace."""
    merged = dict(parent)
    for key, value in child.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_over(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_compare_values(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The YAML mapping of a compare config with its `extends:` chain resolved (the key itself removed)."""
    path = Path(path)
    if not path.is_file():
        where = f" (extends: in {_chain[-1]})" if _chain else ""
        raise CompareConfigError(f"{path}: no such compare config{where}")
    if path.resolve() in {p.resolve() for p in _chain}:
        raise CompareConfigError(f"extends: cycle {' -> '.join(map(str, (*_chain, path)))}")
    values = yaml.safe_load(path.read_text())
    if not isinstance(values, dict):
        raise CompareConfigError(f"{path}: expected a mapping at the top level")
    parent = values.pop("extends", None)
    if parent is None:
        return values
    if not isinstance(parent, str):
        raise CompareConfigError(f"{path}: extends: expected the path of another compare config, got {parent!r}")
    return merge_over(read_compare_values(path.parent / parent, (*_chain, path)), values)


def load_compare_config(path: str | Path) -> CompareConfig:
    return parse_compare_config(read_compare_values(path), str(path))


def check_recipes(config: CompareConfig, root: Path) -> None:
    """Every (task, method) recipe exists and names a registered method: checked before any run starts."""
    from taso_llm.config import MethodArguments
    from taso_llm.methods import METHODS

    for task in config.tasks:
        for method in config.methods.values():
            path = config.recipe_path(task, method, root)
            if not path.is_file():
                raise CompareConfigError(f"methods.{method.name}.recipe: {path} does not exist "
                                         f"(recipes={config.recipes!r}, task={task!r})")
            name = {**(yaml.safe_load(path.read_text()) or {}), **method.overrides}.get("method", MethodArguments.method)
            if name not in METHODS:
                raise CompareConfigError(f"methods.{method.name}: method={name!r} is not in the registry "
                                         f"{sorted(METHODS)}")
