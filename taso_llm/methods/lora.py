"""Baselines LoRA, QLoRA and DoRA through PEFT's transformers integration (`model.add_adapter`).

QLoRA is this method on a 4-bit base (`load_in_4bit: true` in the recipe). Rank, alpha, dropout, rsLoRA and DoRA
come from TRL's ModelConfig fields (`lora_r`, `lora_alpha`, `lora_dropout`, `use_rslora`, `use_dora`), as in TRL's
own scripts; the target modules from `lora_target_modules`, else the shared `target_modules`, so every method adapts
the same layers by default. The Trainer saves such a model as a standard PEFT adapter (adapter-only checkpoints),
and a resumed run rebuilds the same adapter from the same config (nothing to reuse from the first run).
"""

from __future__ import annotations

import logging

from ..sparse.regions import lora_params
from ..targets import find_targets, layer_shape
from .base import Method, Report, RunContext

log = logging.getLogger("taso_llm")


def _targets(shared, model_args) -> list[str]:
    return list(getattr(model_args, "lora_target_modules", None) or shared.target_modules)


class LoraMethod(Method):
    name = "lora"
    # exports_peft_lora stays False: its output directory already is a PEFT LoRA adapter (nothing to convert)
    mergeable = True  # merge() is PEFT's merge_and_unload (task arithmetic reads a LoRA run as a task vector so)

    def validate(self, shared, own, shapes, model_args=None) -> None:
        if shared.save_merged:
            raise ValueError("save_merged is for the project's own adapter format; merge a LoRA adapter with peft: "
                             "PeftModel.from_pretrained(base, output_dir).merge_and_unload().save_pretrained(...)")
        super().validate(shared, own, shapes, model_args)
        if model_args is not None and model_args.lora_r < 1:
            raise ValueError(f"lora_r={model_args.lora_r}: must be at least 1")

    def prepare(self, model, shared, own, ctx: RunContext) -> Report:
        from peft import LoraConfig

        model_args = ctx.model_args
        targets = _targets(shared, model_args)
        shapes = {n: layer_shape(m) for n, m in find_targets(model, targets).items()}
        r = model_args.lora_r if model_args is not None else 16
        config = LoraConfig(
            r=r, lora_alpha=model_args.lora_alpha if model_args is not None else 2 * r,
            lora_dropout=model_args.lora_dropout if model_args is not None else 0.0,
            use_rslora=bool(getattr(model_args, "use_rslora", False)),
            use_dora=bool(getattr(model_args, "use_dora", False)),
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
        return Report(trainable_params=trainable, lora_r1_params=lora1,
                      details={"lora_r": r, "importance_seconds": 0.0, "use_dora": config.use_dora})

    def equal_budget(self, rank: int) -> dict:
        return {"model": {"lora_r": rank, "lora_alpha": 2 * rank}}

    def load_for_eval(self, run_dir, load_base):
        from peft import PeftModel

        return PeftModel.from_pretrained(load_base(), str(run_dir))

    def merge(self, model):
        return model.merge_and_unload()
