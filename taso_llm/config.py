"""TASO options, parsed by TRL's TrlParser beside SFTConfig, ModelConfig and DataArguments (YAML + CLI).

Every field is checked by `validate_taso_args` against a meta-device copy of the model (no weights loaded), so a
bad module name or an impossible budget stops the run before data loading, model loading or importance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .regions import STRUCTURES, min_budget, parse_budget
from .targets import DEFAULT_TARGETS


@dataclass
class TasoArguments:
    method: str = field(default="taso", metadata={"help": "Fine-tuning method (see taso_llm.methods.METHODS)."})
    target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        metadata={"help": "Last name component of the linear layers to adapt (default: all 7 LLaMA projections)."})
    budget: str = field(
        default="rank1",
        metadata={"help": "Trainable params per matrix: 'rank1' (d_in + d_out, a rank-1 LoRA), 'rankK' "
                          "(K·(d_in + d_out)), or an integer."})
    structure: str = field(
        default="lora_block",
        metadata={"help": "Core-region structure: lora_block (rank-r update on core rows × columns), "
                          "dense_block, or entries (unstructured top importance)."})
    adapter_rank: int = field(default=4, metadata={"help": "Rank r of the lora_block update; r·(|R|+|C|) ≤ budget."})
    adapter_alpha: float | None = field(
        default=None, metadata={"help": "Scale alpha of the lora_block update (alpha / r); default: r (scale 1)."})
    calibration_samples: int = field(
        default=256, metadata={"help": "Training sequences scored for importance (the first N of the train split)."})
    calibration_batch_size: int = field(default=8, metadata={"help": "Sequences per importance batch."})
    importance_abs: str = field(
        default="per_batch",
        metadata={"help": "'per_batch': sum over batches of |W⊙G_b| (default); 'after_sum': |W⊙ΣG_b| "
                          "(keeps a full-size accumulator per matrix)."})
    importance_checkpointing: bool = field(
        default=True,
        metadata={"help": "Recompute decoder layers in the importance backward (reentrant activation checkpointing), "
                          "so scoring needs no more activation memory than checkpointed training."})
    lr_scaling: str = field(
        default="sqrt",
        metadata={"help": "Sparsity-aware learning-rate multiplier: 'none', 'sqrt' ((d_in+d_out)/(|R|+|C|))^0.5 "
                          "averaged over matrices, or a number."})
    masks_path: str | None = field(
        default=None, metadata={"help": "Reuse a saved masks.safetensors instead of estimating importance."})
    export_peft: bool = field(default=True, metadata={"help": "Also write the adapter as a PEFT LoRA (peft_lora/)."})
    save_merged: bool = field(default=False, metadata={"help": "Also write base + adapter merged (merged/)."})

    @property
    def alpha(self) -> float:
        return float(self.adapter_alpha) if self.adapter_alpha is not None else float(self.adapter_rank)

    def needs_full_importance(self) -> bool:
        return self.structure == "entries" or self.importance_abs == "after_sum"


def parse_lr_scaling(value: str) -> str | float:
    text = str(value).strip().lower()
    if text in ("none", "sqrt"):
        return text
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"lr_scaling={value!r}: expected 'none', 'sqrt' or a positive number") from None
    if not number > 0:
        raise ValueError(f"lr_scaling={value!r}: must be positive")
    return number


def validate_taso_args(args: TasoArguments, shapes: dict[str, tuple[int, int]]) -> None:
    """Cheap checks that need only layer names and shapes. `shapes` maps target module names to (d_out, d_in)."""
    if args.structure not in STRUCTURES:
        raise ValueError(f"structure={args.structure!r}: expected one of {list(STRUCTURES)}")
    if args.importance_abs not in ("per_batch", "after_sum"):
        raise ValueError(f"importance_abs={args.importance_abs!r}: expected 'per_batch' or 'after_sum'")
    for name, value in (("adapter_rank", args.adapter_rank), ("calibration_samples", args.calibration_samples),
                        ("calibration_batch_size", args.calibration_batch_size)):
        if value < 1:
            raise ValueError(f"{name}={value}: must be at least 1")
    parse_lr_scaling(args.lr_scaling)
    need = min_budget(args.structure, args.adapter_rank)
    for name, shape in shapes.items():
        budget = parse_budget(args.budget, shape)
        if budget < need:
            raise ValueError(f"budget={args.budget!r} gives {budget} params for {name} {shape}, below the "
                             f"{need} that structure={args.structure!r} with adapter_rank={args.adapter_rank} needs")


def lr_multiplier(setting: str, regions) -> float:
    """The chosen reading of TASO's sparsity-aware scaling (not public): the adapter learning rate grows with the
    square root of how much narrower the core region is than a full rank-1 LoRA, (d_in+d_out)/(|R|+|C|)."""
    mode = parse_lr_scaling(setting)
    if mode == "none":
        return 1.0
    if isinstance(mode, float):
        return mode
    ratios = [(r.shape[0] + r.shape[1]) / max(1, len(r.rows) + len(r.cols)) if r.structure != "entries"
              else (r.shape[0] + r.shape[1]) / max(1, len(set(r.rows.tolist())) + len(set(r.cols.tolist())))
              for r in regions.values()]
    return math.sqrt(sum(ratios) / len(ratios)) if ratios else 1.0
