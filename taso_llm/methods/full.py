"""Baseline: full fine-tuning, every parameter trainable (the Trainer saves the whole model)."""

from __future__ import annotations

from .base import Method, Report, RunContext, rank1_reference


class FullMethod(Method):
    name = "full"
    trains_whole_model = True
    supports_4bit = False  # a 4-bit weight cannot take gradient steps: QLoRA (method=lora + load_in_4bit) instead

    def prepare(self, model, shared, own, ctx: RunContext) -> Report:
        for p in model.parameters():
            p.requires_grad_(True)
        return Report(trainable_params=sum(p.numel() for p in model.parameters()),
                      lora_r1_params=rank1_reference(model, shared.target_modules),
                      details={"importance_seconds": 0.0})

    def equal_budget(self, rank: int) -> None:
        return None  # every parameter trains: there is no budget to match

    def load_for_eval(self, run_dir, load_base):
        """The run directory holds the whole trained model, loaded as the base was (dtype)."""
        return load_base(str(run_dir))
