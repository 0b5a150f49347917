"""TaLoS: task-localized sparse fine-tuning (Iurada et al., 2025), built for task arithmetic.

Score every entry of the target matrices by a diagonal Fisher estimate from the model's own SAMPLED outputs on the
task's calibration examples (sparse/fisher.py), and keep trainable the LOW-sensitivity entries under one global
threshold, in `talos_rounds` rounds whose kept fraction shrinks geometrically, the entries frozen so far damped by
`talos_damping` for scoring (sparse/localize.py). Fine-tuning then changes only those entries: each is a value at a
stored index (adapters' EntriesUpdate, zero init, gradient only at the indices), which is what the authors' 0/1
mask on the optimizer step does. The saved adapter IS the sparse task vector τ = θ_ft − θ_pre (indices + values);
recipes/task_arithmetic.py adds and negates such vectors (adapters/task_vector.py).

How many entries: `talos_density` × the target matrices' size, or by default the shared `budget`'s total (Σ of the
per-matrix budgets: with `budget: rank1`, a rank-1 LoRA's parameter count on the same modules), spread over the
matrices by the global threshold alone (no per-matrix quota; `budget_scope: model` does not apply).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..adapters import attach_updates
from ..distributed.backend import Backend
from ..outputs import pending_path
from ..sparse.localize import select_low_sensitivity
from ..sparse.masks import load_fitting_masks, save_masks
from ..sparse.regions import lora_params, parse_budget
from ..targets import find_targets, layer_shape
from .base import AdapterFileMethod, Report, RunContext
from .taso import MASKS_FILE, TasoMethod

log = logging.getLogger("taso_llm")


@dataclass
class TalosArguments:
    talos_density: float = field(
        default=0.0,
        metadata={"help": "Fraction of the target matrices' weights left trainable (e.g. 0.01). 0 (default): the "
                          "shared `budget`'s total (rank1: a rank-1 LoRA's parameter count), spread by the threshold."})
    talos_rounds: int = field(
        default=4, metadata={"help": "Selection rounds; the kept fraction shrinks geometrically, keep^(r/rounds)."})
    talos_damping: float = field(
        default=0.1, metadata={"help": "Factor on the already-frozen weights while scoring the next round (scoring "
                                       "only; 1 = no damping)."})
    talos_checkpointing: bool = field(
        default=True, metadata={"help": "Recompute decoder layers in the Fisher backward (reentrant activation "
                                        "checkpointing): scoring needs no more activation memory than training."})


def trainable_entries(shared, own: TalosArguments, shapes: dict[str, tuple[int, int]]) -> int:
    """K: `talos_density` of all target entries (at least 1), else the shared budget's total over the targets."""
    if own.talos_density > 0:
        total = sum(d_out * d_in for d_out, d_in in shapes.values())
        return max(1, int(round(own.talos_density * total)))
    return sum(parse_budget(shared.budget, shape) for shape in shapes.values())


class TalosMethod(AdapterFileMethod):
    name = "talos"
    args_class = TalosArguments
    uses_masks = needs_calibration = True
    # exports_peft_lora stays False: an exact LoRA of scattered entries needs one rank per distinct column, often
    # more parameters than the matrix itself. The adapter (indices + values) is the task vector; merge for inference.

    def validate(self, shared, own: TalosArguments, shapes, model_args=None) -> None:
        super().validate(shared, own, shapes, model_args)
        if not 0.0 <= own.talos_density <= 1.0:
            raise ValueError(f"talos_density={own.talos_density}: expected a fraction in [0, 1] (0: use `budget`)")
        if own.talos_density > 0 and str(shared.budget) != "rank1":
            raise ValueError(f"talos_density={own.talos_density} and budget={shared.budget!r} both size the update: "
                             "set one")
        if own.talos_rounds < 1:
            raise ValueError(f"talos_rounds={own.talos_rounds}: must be at least 1")
        if not 0.0 <= own.talos_damping <= 1.0:
            raise ValueError(f"talos_damping={own.talos_damping}: expected a factor in [0, 1]")
        if shared.budget_scope != "matrix":
            raise ValueError(f"budget_scope={shared.budget_scope!r}: TaLoS spreads its budget over matrices by one "
                             "global threshold (docs/methods.md); leave budget_scope, budget_allocation, budget_floor "
                             "and budget_cap at their defaults")
        keep = trainable_entries(shared, own, shapes)
        total = sum(d_out * d_in for d_out, d_in in shapes.values())
        if keep > total:
            raise ValueError(f"budget={shared.budget!r} asks for {keep} trainable entries, more than the {total} "
                             "weights of the target matrices")

    resume_check = TasoMethod.resume_check  # a resumed run reuses the masks it chose the first time

    def equal_budget(self, rank: int) -> dict:
        return {"shared": {"budget": f"rank{rank}"}, "own": {"talos_density": 0.0}}  # the total, spread by threshold

    def prepare(self, model: nn.Module, shared, own: TalosArguments, ctx: RunContext) -> Report:
        targets = find_targets(model, shared.target_modules)
        shapes = {name: layer_shape(m) for name, m in targets.items()}
        keep = trainable_entries(shared, own, shapes)
        details: dict = {"importance_seconds": 0.0}
        layers: dict = {}
        if shared.masks_path:
            regions, _ = load_fitting_masks(shared.masks_path, shapes)
            other = sorted({r.structure for r in regions.values()} - {"entries"})
            if other:
                raise ValueError(f"masks_path={shared.masks_path}: holds {other} regions; TaLoS trains single entries")
            details["masks_reused_from"] = str(shared.masks_path)
        else:
            selection = select_low_sensitivity(
                model, targets, keep, ctx.calibration, ctx.num_calibration_batches, Backend.for_model(model),
                seed=ctx.seed, rounds=own.talos_rounds, damping=own.talos_damping,
                checkpointing=own.talos_checkpointing, show_progress=ctx.show_progress)
            regions, layers = selection.regions, selection.layers
            details.update(selection.report)
        masks_file = Path(ctx.output_dir) / MASKS_FILE
        if ctx.is_main:  # pending until the run commits (training starts), as TASO's
            save_masks(pending_path(masks_file), regions, ctx.model_id, unwrapped=sorted(set(shapes) - set(regions)),
                       extra={"budget": shared.budget, "trainable_entries": keep, "talos_config": vars(own)})
        attach_updates(model, regions)
        trainable = sum(r.num_params() for r in regions.values())
        lora1 = sum(lora_params(s) for s in shapes.values())
        report_layers = {}
        for name, shape in shapes.items():
            region = regions.get(name)
            rows = len(torch.unique(region.rows)) if region is not None else 0
            cols = len(torch.unique(region.cols)) if region is not None else 0
            report_layers[name] = {"shape": list(shape), "rows": rows, "cols": cols,
                                   "params": region.num_params() if region is not None else 0, **layers.get(name, {})}
        log.info("TaLoS: %d trainable entries on %d of %d matrices (rank-1 LoRA on the same modules: %d)", trainable,
                 len(regions), len(shapes), lora1)
        return Report(trainable_params=trainable, lora_r1_params=lora1,
                      details={**details, "masks_file": str(masks_file), "trainable_entries": keep},
                      layers=report_layers)

    def adapter_extra(self, shared, own: TalosArguments) -> dict:
        return {"structure": "entries", "budget": shared.budget, "talos_density": own.talos_density}
