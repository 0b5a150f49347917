"""Arguments every method shares, parsed by TRL's TrlParser beside SFTConfig, ModelConfig, DataArguments and each
method's own prefixed dataclass (`taso_*`, ... in taso_llm/methods/<method>.py). YAML + CLI, as in TRL's scripts.

Checked by `validate_shared_args` (and each method's `validate`) against a meta-device copy of the model, before
data loading, model loading or importance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .sparse.budget import BudgetPolicy
from .sparse.regions import parse_budget
from .targets import DEFAULT_TARGETS


@dataclass
class MethodArguments:
    method: str = field(default="taso", metadata={"help": "Fine-tuning method (taso_llm.methods.METHODS; "
                                                          "docs/methods.md says what each one does)."})
    target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        metadata={"help": "Last name component of the linear layers to adapt (default: all 7 LLaMA projections)."})
    budget: str = field(
        default="rank1",
        metadata={"help": "Sparse methods: trainable params per matrix, 'rank1' (d_in + d_out, a rank-1 LoRA's), "
                          "'rankK' (K·(d_in + d_out)), or an integer."})
    budget_scope: str | None = field(
        default=None,
        metadata={"help": "'matrix': every matrix spends its own budget; 'model': the sum of the per-matrix budgets "
                          "is spread across matrices by importance mass (sparse/budget.py). Default: the method's "
                          "own (model for taso, matrix for the others)."})
    budget_allocation: str = field(
        default="proportional",
        metadata={"help": "With budget_scope=model: share of the total ∝ 'proportional' (mass) or 'sqrt' (√mass)."})
    budget_floor: float = field(
        default=0.25, metadata={"help": "With budget_scope=model: least a matrix gets, as a fraction of its own "
                                        "budget (0 lets a matrix go unwrapped)."})
    budget_cap: float = field(
        default=4.0, metadata={"help": "With budget_scope=model: most a matrix gets, as a multiple of its own budget."})
    calibration_samples: int = field(
        default=256, metadata={"help": "Methods that score weights: training sequences scored (the first N)."})
    calibration_batch_size: int = field(default=8, metadata={"help": "Sequences per calibration batch."})
    masks_path: str | None = field(
        default=None, metadata={"help": "Sparse methods: reuse a saved masks.safetensors instead of selecting anew."})
    export_peft: bool = field(default=True, metadata={
        "help": "Also write the adapter as a PEFT LoRA (peft_lora/) when the method can do so exactly."})
    save_merged: bool = field(default=False, metadata={"help": "Also write base + adapter merged (merged/)."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace the outputs of an earlier run in output_dir (without it, or resume_from_checkpoint, such a "
                "directory is refused). Only the run's own files go, once the new run starts training."})

    def __post_init__(self):
        if self.budget_scope is None:  # each method names its own default (Method.default_budget_scope)
            from .methods import METHODS, get_method

            known = self.method in METHODS  # an unknown name is reported where the method is looked up
            self.budget_scope = get_method(self.method).default_budget_scope if known else "matrix"

    def budget_policy(self) -> BudgetPolicy:
        return BudgetPolicy(scope=self.budget_scope, rule=self.budget_allocation, floor=float(self.budget_floor),
                            cap=float(self.budget_cap))


def validate_shared_args(args: MethodArguments, shapes: dict[str, tuple[int, int]]) -> None:
    """Cheap checks that need only layer names and shapes. `shapes` maps target module names to (d_out, d_in)."""
    for name, value in (("calibration_samples", args.calibration_samples),
                        ("calibration_batch_size", args.calibration_batch_size)):
        if value < 1:
            raise ValueError(f"{name}={value}: must be at least 1")
    args.budget_policy().check()
    for shape in list(shapes.values())[:1]:
        parse_budget(args.budget, shape)


def validate_training_args(training_args) -> None:
    """The training arguments a run cannot use, stopped before any heavy work (transformers checks some of them
    only when training starts, after importance has run)."""
    checks = [
        ("learning_rate", training_args.learning_rate, training_args.learning_rate > 0, "must be positive"),
        ("per_device_train_batch_size", training_args.per_device_train_batch_size,
         training_args.per_device_train_batch_size >= 1, "must be at least 1"),
        ("gradient_accumulation_steps", training_args.gradient_accumulation_steps,
         training_args.gradient_accumulation_steps >= 1, "must be at least 1"),
        ("num_train_epochs", training_args.num_train_epochs,
         training_args.max_steps > 0 or training_args.num_train_epochs > 0,
         "must be positive (or set max_steps): the run would end with an untrained adapter"),
        ("max_length", training_args.max_length, training_args.max_length is None or training_args.max_length >= 2,
         "must be at least 2 tokens"),
    ]
    for name, value, ok, why in checks:
        if not ok:
            raise ValueError(f"{name}={value}: {why}")


def sft_parser():
    """The recipe's TrlParser: data, shared method arguments, SFTConfig, ModelConfig, then every method's own
    prefixed dataclass (parse_args_and_config returns them in this order)."""
    from trl import ModelConfig, SFTConfig, TrlParser

    from .data import DataArguments
    from .methods import argument_classes

    return TrlParser((DataArguments, MethodArguments, SFTConfig, ModelConfig, *argument_classes()))
