"""DropLoRA: LoRA with a random 0/1 mask on the rank dimension between A and B, resampled every training step, so
the subspace the update learns in keeps changing; at inference there is no mask (a plain LoRA, merged or exported
to PEFT exactly).

The update is adapters/rank_dropout.py's `RankDropoutUpdate` on every target matrix (rank `droplora_r`, scale
`droplora_alpha / droplora_r`); `callbacks` returns the TrainerCallback that tells the shared `RankDropout` schedule
which optimizer step is running, so a "step"-mode mask is a function of (seed, step, matrix) and the same on every
rank under DDP / ZeRO / FSDP without communication.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn
from transformers import TrainerCallback

from ..adapters import attach_updates, iter_adapters
from ..adapters.rank_dropout import MODES, RankDropout, full_region
from ..sparse.regions import lora_params
from ..targets import find_targets, layer_shape
from .base import AdapterFileMethod, Report, RunContext

log = logging.getLogger("taso_llm")


@dataclass
class DropLoraArguments:
    droplora_r: int = field(default=32, metadata={"help": "LoRA rank r (the authors' recipes: 32; 64 for math)."})
    droplora_alpha: float = field(default=64.0, metadata={"help": "LoRA alpha: the update is scaled by alpha / r."})
    droplora_p: float = field(
        default=0.5, metadata={"help": "Probability that a rank dimension is dropped (the authors' default 0.5)."})
    droplora_mode: str = field(
        default="step",
        metadata={"help": "'step': one Bernoulli keep-vector per matrix per optimizer step, seeded by (seed, step, "
                          "matrix), identical on every rank (the paper); 'token': dropout on the rank activation per "
                          "token (the authors' code)."})
    droplora_rescale: bool = field(
        default=True,
        metadata={"help": "Scale kept dimensions by 1/(1-p) in training (nn.Dropout's convention, the authors' code), "
                          "so the expected update equals the maskless inference update; false: a plain 0/1 mask."})


class RankDropoutCallback(TrainerCallback):
    """Opens the mask for each optimizer step (global_step, which a resumed run restores) and closes it after."""

    def __init__(self, schedule: RankDropout):
        self.schedule = schedule

    def on_step_begin(self, args, state, control, **kwargs):
        self.schedule.begin(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.schedule.end()

    on_train_end = on_step_end


def _schedules(model: nn.Module) -> list[RankDropout]:
    found = {id(w.update.schedule): w.update.schedule for _, w in iter_adapters(model)
             if getattr(w.update, "schedule", None) is not None}
    return list(found.values())


class DropLoraMethod(AdapterFileMethod):
    name = "droplora"
    args_class = DropLoraArguments
    exports_peft_lora = True

    def validate(self, shared, own: DropLoraArguments, shapes, model_args=None) -> None:
        super().validate(shared, own, shapes, model_args)
        if own.droplora_r < 1:
            raise ValueError(f"droplora_r={own.droplora_r}: must be at least 1")
        if not own.droplora_alpha > 0:
            raise ValueError(f"droplora_alpha={own.droplora_alpha}: must be positive")
        if not 0.0 <= own.droplora_p < 1.0:
            raise ValueError(f"droplora_p={own.droplora_p}: must be in [0, 1)")
        if own.droplora_mode not in MODES:
            raise ValueError(f"droplora_mode={own.droplora_mode!r}: expected one of {list(MODES)}")
        # shared options of the sparse methods that would be silently ignored here: refused instead
        for field_name, value, default in (("budget", shared.budget, "rank1"), ("budget_scope", shared.budget_scope,
                                           "matrix"), ("masks_path", shared.masks_path, None)):
            if value != default:
                raise ValueError(f"{field_name}={value!r}: method=droplora trains a rank-droplora_r LoRA on every "
                                 "target matrix (no budget allocation, no masks); set droplora_r instead")

    def prepare(self, model: nn.Module, shared, own: DropLoraArguments, ctx: RunContext) -> Report:
        shapes = {name: layer_shape(m) for name, m in find_targets(model, shared.target_modules).items()}
        schedule = RankDropout(p=own.droplora_p, mode=own.droplora_mode, seed=ctx.seed, rescale=own.droplora_rescale)
        regions = {name: full_region(shape, own.droplora_r) for name, shape in shapes.items()}
        for name, wrapper in attach_updates(model, regions, alpha=own.droplora_alpha).items():
            wrapper.update.seed_init(ctx.seed, name)
            wrapper.update.schedule, wrapper.update.key = schedule, name
        trainable = sum(r.num_params() for r in regions.values())
        lora1 = sum(lora_params(s) for s in shapes.values())
        log.info("DropLoRA r=%d alpha=%g on %d matrices: %d trainable params (rank-1 LoRA: %d); rank dropout p=%g, "
                 "mode=%s, rescale=%s", own.droplora_r, own.droplora_alpha, len(shapes), trainable, lora1,
                 own.droplora_p, own.droplora_mode, own.droplora_rescale)
        return Report(trainable_params=trainable, lora_r1_params=lora1,
                      details={"importance_seconds": 0.0, "droplora_r": own.droplora_r, "droplora_p": own.droplora_p,
                               "droplora_mode": own.droplora_mode},
                      layers={name: {"shape": list(s), "rows": s[0], "cols": s[1],  # every row and column
                                     "params": lora_params(s, own.droplora_r)} for name, s in shapes.items()})

    def equal_budget(self, rank: int) -> dict:
        return {"own": {"droplora_r": rank, "droplora_alpha": 2.0 * rank}}  # alpha/r = 2 as the authors' recipes

    def callbacks(self, model: nn.Module, shared, own) -> list:
        return [RankDropoutCallback(s) for s in _schedules(model)]

    def adapter_extra(self, shared, own: DropLoraArguments) -> dict:
        return {"droplora": dict(vars(own))}
