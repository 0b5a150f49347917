"""Baseline: full fine-tuning, every parameter trainable (the Trainer saves the whole model)."""

from __future__ import annotations

from ..config import TasoArguments
from ..regions import lora_params
from ..targets import find_targets, layer_shape


def validate(args: TasoArguments, shapes: dict, model_args=None) -> None:
    if model_args is not None and getattr(model_args, "load_in_4bit", False):
        raise ValueError("method=full cannot train a 4-bit base (load_in_4bit: true); use method=lora (QLoRA)")


def prepare(model, args: TasoArguments, *_, **__) -> dict:
    for p in model.parameters():
        p.requires_grad_(True)
    shapes = {n: layer_shape(m) for n, m in find_targets(model, args.target_modules).items()}
    trainable = sum(p.numel() for p in model.parameters())
    lora1 = sum(lora_params(s) for s in shapes.values())
    return {"trainable_params": trainable, "lora_r1_params": lora1, "trainable_vs_lora_r1": trainable / lora1,
            "lr_multiplier": 1.0, "importance_seconds": 0.0}
