"""Baselines LoRA and QLoRA through PEFT's transformers integration (`model.add_adapter`).

QLoRA is this method on a 4-bit base (`load_in_4bit: true` in the recipe). Rank, alpha, dropout, rsLoRA and DoRA
come from TRL's ModelConfig fields (`lora_r`, `lora_alpha`, ...), as in TRL's own scripts; the target modules
from `lora_target_modules`, else TASO's `target_modules`, so both methods adapt the same layers by default.
The Trainer saves such a model as a standard PEFT adapter (adapter-only checkpoints).
"""

from __future__ import annotations

import logging

from ..config import TasoArguments
from ..regions import lora_params
from ..targets import find_targets, layer_shape

log = logging.getLogger("taso_llm")


def _targets(args: TasoArguments, model_args) -> list[str]:
    return list(getattr(model_args, "lora_target_modules", None) or args.target_modules)


def validate(args: TasoArguments, shapes: dict, model_args=None) -> None:
    if args.save_merged:
        raise ValueError("save_merged is for TASO adapters; merge a LoRA adapter with peft: "
                         "PeftModel.from_pretrained(base, output_dir).merge_and_unload().save_pretrained(...)")
    if model_args is not None and model_args.lora_r < 1:
        raise ValueError(f"lora_r={model_args.lora_r}: must be at least 1")


def prepare(model, args: TasoArguments, *_, model_args=None, **__) -> dict:
    from peft import LoraConfig

    targets = _targets(args, model_args)
    shapes = {n: layer_shape(m) for n, m in find_targets(model, targets).items()}
    r = model_args.lora_r if model_args is not None else 16
    config = LoraConfig(
        r=r, lora_alpha=model_args.lora_alpha if model_args is not None else 2 * r,
        lora_dropout=model_args.lora_dropout if model_args is not None else 0.0,
        use_rslora=bool(getattr(model_args, "use_rslora", False)), use_dora=bool(getattr(model_args, "use_dora", False)),
        target_modules=sorted(set(targets)), bias="none", task_type="CAUSAL_LM",
    )
    for p in model.parameters():
        p.requires_grad_(False)
    if not hasattr(model, "peft_config"):
        # build_trainer pre-declares adapters on a 4-bit base (_hf_peft_config_loaded) so the Trainer accepts it;
        # add_adapter reads that flag as "a PEFT config exists" and fails on the missing peft_config: clear it.
        model._hf_peft_config_loaded = False
    model.add_adapter(config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora1 = sum(lora_params(s) for s in shapes.values())
    log.info("LoRA r=%d on %d matrices: %d trainable params (rank-1 LoRA: %d)", r, len(shapes), trainable, lora1)
    return {"trainable_params": trainable, "lora_r1_params": lora1, "trainable_vs_lora_r1": trainable / lora1,
            "lora_r": r, "lr_multiplier": 1.0, "importance_seconds": 0.0}
