"""Method registry: the `method:` name of a recipe → the class implementing the contract in base.py.

Adding a method is one new module (its Method subclass and, if it has options, its prefixed argument dataclass) and
one line here. `argument_classes()` lists every method's own dataclass for TrlParser; `detect(run_dir)` tells which
method wrote a training output, so evaluation and export never switch on method names.
"""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path

from .base import Method, Report, RunContext

METHODS = {
    "taso": "taso_llm.methods.taso:TasoMethod",
    "lora": "taso_llm.methods.lora:LoraMethod",  # LoRA, QLoRA (load_in_4bit), DoRA (use_dora) through PEFT
    "full": "taso_llm.methods.full:FullMethod",
    "sparta": "taso_llm.methods.sparta:SpartaMethod",  # seeded random single entries
    "droplora": "taso_llm.methods.droplora:DropLoraMethod",  # LoRA with a rank mask resampled every step
    "talos": "taso_llm.methods.talos:TalosMethod",  # low-sensitivity sparse entries; task vectors for task arithmetic
    "smoa": "taso_llm.methods.smoa:SmoaMethod",  # Hadamard modulation of SVD-ordered diagonal blocks of W
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method={name!r}: expected one of {sorted(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(import_module(module), cls)()


def all_methods() -> list[Method]:
    return [get_method(name) for name in METHODS]


def argument_classes() -> list[type]:
    """Every registered method's own argument dataclass, in registry order (parsed beside the shared arguments)."""
    return [m.args_class for m in all_methods() if m.args_class is not None]


def detect(run_dir: str | Path) -> Method:
    """The method that wrote `run_dir`: metrics.json's `method`, else the adapter config's own `method` field, a PEFT
    adapter (peft_type) → lora, a whole model (config.json) → full."""
    run_dir = Path(run_dir)
    metrics, adapter, model = run_dir / "metrics.json", run_dir / "adapter_config.json", run_dir / "config.json"
    if metrics.is_file():
        name = json.loads(metrics.read_text()).get("method")
        if name:
            return get_method(name)
    if adapter.is_file():
        config = json.loads(adapter.read_text())
        if "method" in config:
            return get_method(config["method"])
        if str(config.get("format", "")).startswith("taso-adapter/"):  # written by save_adapter without a method
            return get_method("taso")
        if "peft_type" in config:
            return get_method("lora")
    if model.is_file():
        return get_method("full")
    raise FileNotFoundError(f"{run_dir}: no metrics.json, adapter_config.json or config.json; is it a training "
                            "output directory?")


__all__ = ["METHODS", "Method", "Report", "RunContext", "all_methods", "argument_classes", "detect", "get_method"]
