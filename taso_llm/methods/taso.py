"""TASO: task-aligned sparse optimization. Score every target weight's importance |W ⊙ ∂L/∂W| on the task's own SFT
loss, choose each matrix's core rows and columns under a rank-1 LoRA's budget (per matrix, or spread model-wide by
importance mass), and train a sparse update there: a rank-r block B_R A_C (default), a dense block, or single entries.

The generic machinery lives in sparse/ (statistic → owners → allocation → regions → shared masks) and adapters/
(updates, wrapping, files, merge, PEFT export); this module holds TASO's own options and glues them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..adapters import attach_updates
from ..distributed.backend import Backend
from ..outputs import pending_path
from ..sparse.block_gradient import aligned_inits
from ..sparse.masks import load_fitting_masks, save_masks
from ..sparse.regions import STRUCTURES, lora_params, min_budget, parse_budget
from ..sparse.select import SelectionSpec, select_regions
from ..sparse.statistics import WeightGradSaliency
from ..targets import find_targets, layer_shape
from .base import AdapterFileMethod, Report, RunContext

log = logging.getLogger("taso_llm")
MASKS_FILE = "masks.safetensors"


@dataclass
class TasoArguments:
    taso_structure: str = field(
        default="lora_block",
        metadata={"help": "Core-region structure: lora_block (rank-r update on core rows × columns), "
                          "dense_block, or entries (unstructured top importance)."})
    taso_adapter_rank: int = field(default=4, metadata={"help": "Rank r of the lora_block update; "
                                                                "r·(|R|+|C|) ≤ the matrix's budget."})
    taso_adapter_alpha: float | None = field(
        default=None, metadata={"help": "Scale alpha of the lora_block update (alpha / r); default: r (scale 1)."})
    taso_importance_abs: str = field(
        default="per_batch",
        metadata={"help": "'per_batch': sum over batches of |W⊙G_b| (default); 'after_sum': |W⊙ΣG_b| "
                          "(keeps a full-size accumulator per matrix)."})
    taso_importance_checkpointing: bool = field(
        default=True,
        metadata={"help": "Recompute decoder layers in the importance backward (reentrant activation checkpointing), "
                          "so scoring needs no more activation memory than checkpointed training."})
    taso_init: str = field(
        default="random",
        metadata={"help": "Init of the lora_block factor A: 'random' (Kaiming uniform, as PEFT) or 'gradient' (A from "
                          "the top-r right singular vectors of the calibration gradient restricted to the block, "
                          "B = 0 so the initial output is unchanged; one more calibration pass; sparse/block_gradient.py)."})
    taso_lr_scaling: str = field(
        default="sqrt",
        metadata={"help": "Sparsity-aware learning-rate multiplier: 'none', 'sqrt' ((d_in+d_out)/(|R|+|C|))^0.5 "
                          "averaged over matrices, or a number."})

    @property
    def alpha(self) -> float:
        return float(self.taso_adapter_alpha) if self.taso_adapter_alpha is not None else float(self.taso_adapter_rank)

    def statistic(self) -> WeightGradSaliency:
        return WeightGradSaliency(abs_per_batch=self.taso_importance_abs == "per_batch",
                                  full=self.taso_structure == "entries",
                                  checkpointing=self.taso_importance_checkpointing)


def parse_lr_scaling(value: str) -> str | float:
    text = str(value).strip().lower()
    if text in ("none", "sqrt"):
        return text
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"taso_lr_scaling={value!r}: expected 'none', 'sqrt' or a positive number") from None
    if not number > 0:
        raise ValueError(f"taso_lr_scaling={value!r}: must be positive")
    return number


def lr_multiplier(setting: str, regions) -> float:
    """The chosen reading of TASO's sparsity-aware scaling (not public): the adapter learning rate grows with the
    square root of how much narrower the core region is than a full rank-1 LoRA, (d_in+d_out)/(|R|+|C|)."""
    mode = parse_lr_scaling(setting)
    if mode == "none":
        return 1.0
    if isinstance(mode, float):
        return mode
    ratios = [(r.shape[0] + r.shape[1]) / max(1, len(set(r.rows.tolist())) + len(set(r.cols.tolist())))
              for r in regions.values()]
    return math.sqrt(sum(ratios) / len(ratios)) if ratios else 1.0


def selection_spec(shared, own: TasoArguments) -> SelectionSpec:
    return SelectionSpec(structure=own.taso_structure, rank=own.taso_adapter_rank, budget=shared.budget,
                         policy=shared.budget_policy())


class TasoMethod(AdapterFileMethod):
    name = "taso"
    uses_masks = True
    args_class = TasoArguments
    exports_peft_lora = needs_calibration = True
    # one model-wide budget spread by importance mass: on the plain-text math proxy it is ahead of the per-matrix
    # budget on the mean at 600 and 1200 steps, each at its own learning rate, within seed noise at 7 seeds
    # (docs/comparison.md, "TASO options")
    default_budget_scope = "model"

    def validate(self, shared, own: TasoArguments, shapes, model_args=None) -> None:
        super().validate(shared, own, shapes, model_args)
        if own.taso_structure not in STRUCTURES:
            raise ValueError(f"taso_structure={own.taso_structure!r}: expected one of {list(STRUCTURES)}")
        if own.taso_importance_abs not in ("per_batch", "after_sum"):
            raise ValueError(f"taso_importance_abs={own.taso_importance_abs!r}: expected 'per_batch' or 'after_sum'")
        if own.taso_adapter_rank < 1:
            raise ValueError(f"taso_adapter_rank={own.taso_adapter_rank}: must be at least 1")
        parse_lr_scaling(own.taso_lr_scaling)
        if own.taso_init not in ("random", "gradient"):
            raise ValueError(f"taso_init={own.taso_init!r}: expected 'random' or 'gradient'")
        need = min_budget(own.taso_structure, own.taso_adapter_rank)
        needs = f"that taso_structure={own.taso_structure!r} with taso_adapter_rank={own.taso_adapter_rank} needs"
        if shared.budget_scope == "model":  # the total must give every matrix its minimum (any one, with floor 0)
            total = sum(parse_budget(shared.budget, shape) for shape in shapes.values())
            least = need * (len(shapes) if shared.budget_floor > 0 else 1)
            if total < least:
                raise ValueError(f"budget={shared.budget!r} gives {total} params over {len(shapes)} matrices "
                                 f"(budget_scope=model), below the {least} {needs}")
            return
        for name, shape in shapes.items():
            budget = parse_budget(shared.budget, shape)
            if budget < need:
                raise ValueError(f"budget={shared.budget!r} gives {budget} params for {name} {shape}, below the {need} "
                                 f"{needs}")

    def resume_check(self, shared, own, output_dir: Path) -> None:
        """A resumed run reuses the masks it chose the first time (never re-selects: the data order may differ)."""
        saved = Path(output_dir) / MASKS_FILE
        if not shared.masks_path:
            if not saved.is_file():
                raise FileNotFoundError(f"resume_from_checkpoint is set but {saved} does not exist; cannot rebuild "
                                        "the adapter structure this run was trained with")
            shared.masks_path = str(saved)

    def prepare(self, model: nn.Module, shared, own: TasoArguments, ctx: RunContext) -> Report:
        targets = find_targets(model, shared.target_modules)
        shapes = {name: layer_shape(m) for name, m in targets.items()}
        details: dict = {"importance_seconds": 0.0, "importance_batches": 0, "importance_tokens": 0}
        layers: dict = {}
        if shared.masks_path:
            regions, header = load_fitting_masks(shared.masks_path, shapes)
            details["masks_reused_from"] = str(shared.masks_path)
            log.info("reusing masks from %s (model %s)", shared.masks_path, header.get("model"))
        else:
            selection = select_regions(model, targets, own.statistic(), selection_spec(shared, own),
                                       ctx.calibration(), ctx.num_calibration_batches, Backend.for_model(model),
                                       ctx.show_progress)
            regions, layers = selection.regions, selection.layers
            details.update(selection.report)
        masks_file = Path(ctx.output_dir) / MASKS_FILE
        if ctx.is_main:
            unwrapped = sorted(set(shapes) - set(regions))
            # pending until the run commits (training starts): a run that fails before never replaces earlier masks
            save_masks(pending_path(masks_file), regions, ctx.model_id, unwrapped=unwrapped,
                       extra={"budget": shared.budget, "budget_scope": shared.budget_scope,
                              "structure": own.taso_structure, "adapter_rank": own.taso_adapter_rank,
                              "taso_config": vars(own)})
        inits = {}
        if own.taso_init == "gradient":  # (a resumed run then loads A from its checkpoint over it)
            inits = aligned_inits(model, targets, regions, ctx.calibration(), Backend.for_model(model),
                                  own.taso_importance_checkpointing)
        wrappers = attach_updates(model, regions, alpha=own.alpha)
        with torch.no_grad():
            for name, a in inits.items():
                wrappers[name].update.lora_A.copy_(a)
        trainable = sum(r.num_params() for r in regions.values())
        lora1 = sum(lora_params(s) for s in shapes.values())
        multiplier = lr_multiplier(own.taso_lr_scaling, regions)
        report = Report(
            trainable_params=trainable, lora_r1_params=lora1, lr_multiplier=multiplier,
            details={**details, "masks_file": str(masks_file)},
            layers={name: {"shape": list(shapes[name]), "rows": len(regions[name].rows) if name in regions else 0,
                           "cols": len(regions[name].cols) if name in regions else 0,
                           "params": regions[name].num_params() if name in regions else 0, **layers.get(name, {})}
                    for name in shapes})
        log.info("TASO: %d trainable params on %d of %d matrices (rank-1 LoRA on the same modules: %d, ratio %.3f); "
                 "structure=%s rank=%d budget_scope=%s, lr x%.2f", trainable, len(regions), len(shapes), lora1,
                 trainable / lora1, own.taso_structure, own.taso_adapter_rank, shared.budget_scope, multiplier)
        return report

    def equal_budget(self, rank: int) -> dict:
        """budget rankK, and a block rank grown with it (4·K) so the block keeps the default's width and can spend K
        times the rank-1 budget (a rank-4 block covering every row and column holds only 4·(d_in + d_out))."""
        return {"shared": {"budget": f"rank{rank}"}, "own": {"taso_adapter_rank": 4 * rank}}

    def adapter_extra(self, shared, own: TasoArguments) -> dict:
        return {"structure": own.taso_structure, "budget": shared.budget, "budget_scope": shared.budget_scope}
