"""The contract every fine-tuning method implements. run.py, compare/, recipes/evaluate.py, recipes/export.py and
bench/ talk to a method only through this interface and its capability flags; no method name appears outside
taso_llm/methods/ and the recipe configs.

Life of a method in one run (run.py):
    validate(shared, own, shapes, model_args)   meta shapes only: bad fields stop here, before any heavy work
    prepare(model, shared, own, ctx) → Report   select / estimate and attach to `model` in place (every rank)
    ... the Trainer trains the parameters left with requires_grad ...
    save(model, ctx, state)                     own-format methods write their adapter (main process)
    resume_check(shared, own, output_dir)        what a resumed run must reuse (e.g. the masks it chose)
Afterwards, for evaluation, merging and export:
    load_for_eval(run_dir, load_base) → model   the trained function on a fresh base (load_base(path=None) loads the
                                                base, or another checkpoint path, as the run loaded its base)
    merge(model) → plain HF model               when `mergeable`
    export_peft(model, out_dir, model_id)       when `exports_peft_lora` (an exact PEFT LoRA copy)

`own` is the method's own prefixed dataclass (`args_class`, e.g. TasoArguments' `taso_*` fields), or None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from torch import nn

from ..sparse.regions import lora_params
from ..targets import find_targets, layer_shape


@dataclass
class Report:
    """What prepare chose, for the log and metrics.json. `details` holds method-specific figures (importance time,
    budget allocation, masks file, ...); `layers` per adapted matrix (shape, params, ...)."""

    trainable_params: int
    lora_r1_params: int
    lr_multiplier: float = 1.0
    layers: dict[str, dict] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_metrics(self) -> dict:
        return {"trainable_params": self.trainable_params, "lora_r1_params": self.lora_r1_params,
                "trainable_vs_lora_r1": self.trainable_params / max(1, self.lora_r1_params),
                "lr_multiplier": self.lr_multiplier, **self.details}


@dataclass
class RunContext:
    """What prepare may use from the run: where outputs go, which process this is, the calibration batches."""

    output_dir: Path
    model_id: str
    model_args: Any = None  # TRL ModelConfig
    is_main: bool = True
    calibration: Callable[[], Iterable[dict]] = lambda: iter(())  # this rank's batches, read lazily
    num_calibration_batches: int = 0  # for the progress bar
    seed: int = 0
    show_progress: bool = True


class Method:
    """Base class: defaults every method may keep. Subclasses set `name` and override what they do differently."""

    name: str = ""
    args_class: type | None = None  # the method's own prefixed dataclass, parsed beside the shared arguments
    own_adapter_format = False  # writes its adapter itself (save/load_for_eval); else the Trainer's save_model
    exports_peft_lora = False  # export_peft writes an exact PEFT LoRA copy
    mergeable = False  # merge() folds the update into the base weights
    supports_4bit = True  # trains on a 4-bit (nf4) base
    supports_sharded = True  # trains under DeepSpeed ZeRO-3 / FSDP2
    needs_calibration = False  # prepare reads the calibration batches
    uses_masks = False  # selects regions into a masks file (masks_path reuses one)
    default_budget_scope = "matrix"  # budget_scope when the run does not set one
    trains_whole_model = False  # the output is the whole model, not an adapter

    def validate(self, shared, own, shapes: dict[str, tuple[int, int]], model_args=None) -> None:
        if model_args is not None and getattr(model_args, "load_in_4bit", False) and not self.supports_4bit:
            raise ValueError(f"method={self.name} cannot train a 4-bit base (load_in_4bit: true)")
        if shared.save_merged and not self.mergeable:
            raise ValueError(f"save_merged: method={self.name} has no merge step here; see docs/methods.md")
        if shared.masks_path and not self.uses_masks:
            raise ValueError(f"masks_path={shared.masks_path}: method={self.name} selects no masks")
        if shared.masks_path:  # read and fitted now (indices only): a wrong file stops before the model loads
            from ..sparse.masks import load_fitting_masks

            load_fitting_masks(shared.masks_path, shapes)

    def prepare(self, model: nn.Module, shared, own, ctx: RunContext) -> Report:
        raise NotImplementedError

    def resume_check(self, shared, own, output_dir: Path) -> None:
        """Called when a run resumes, before any heavy work: fix `shared`/`own` so the run rebuilds what it trained."""

    def callbacks(self, model: nn.Module, shared, own) -> list:
        """TrainerCallbacks the method needs during training (e.g. a mask resampled every step), after prepare."""
        return []

    def equal_budget(self, rank: int) -> dict | None:
        """Options that give this method the trainable-parameter budget of a rank-`rank` LoRA on the target modules,
        as {"shared": {...}, "own": {...}, "model": {...}} (fields of MethodArguments, the method's own dataclass and
        ModelConfig); None where the method has no such knob. Benchmarks compare methods at equal budgets with it.
        Sparse methods spend the shared `budget`."""
        return {"shared": {"budget": f"rank{rank}"}}

    def save(self, model: nn.Module, output_dir: Path, shared, own, model_id: str, state: dict) -> None:
        raise NotImplementedError(f"method={self.name} saves through the Trainer")

    def load_for_eval(self, run_dir: Path, load_base: Callable[..., nn.Module]) -> nn.Module:
        raise NotImplementedError

    def merge(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError(f"method={self.name} cannot be merged")

    def export_peft(self, model: nn.Module, output_dir: Path, model_id: str) -> dict:
        raise NotImplementedError(f"method={self.name} has no exact PEFT LoRA export")


class AdapterFileMethod(Method):
    """A method that writes the project's own adapter format (adapters/io.py: indices + values, self-contained):
    save, load for evaluation, merge and the PEFT LoRA export are the same for every such method; `adapter_extra`
    adds the method's own fields to adapter_config.json."""

    own_adapter_format = mergeable = True

    def adapter_extra(self, shared, own) -> dict:
        return {}

    def save(self, model: nn.Module, output_dir: Path, shared, own, model_id: str, state: dict) -> None:
        from ..adapters.io import save_adapter

        save_adapter(model, output_dir, base_model=model_id, state=state,
                     extra={"method": self.name, "target_modules": list(shared.target_modules),
                            **self.adapter_extra(shared, own)})

    def load_for_eval(self, run_dir: Path, load_base: Callable[..., nn.Module]) -> nn.Module:
        from ..adapters.io import load_adapter

        return load_adapter(load_base(), run_dir)

    def merge(self, model: nn.Module) -> nn.Module:
        from ..adapters.export import merge_adapters

        return merge_adapters(model)

    def export_peft(self, model: nn.Module, output_dir: Path, model_id: str) -> dict:
        if not self.exports_peft_lora:
            return super().export_peft(model, output_dir, model_id)
        from ..adapters.export import export_peft_lora

        return export_peft_lora(model, output_dir, model_id)


def rank1_reference(model: nn.Module, target_modules) -> int:
    """Parameters of a rank-1 LoRA on the target modules: the budget every method is compared against."""
    return sum(lora_params(layer_shape(m)) for m in find_targets(model, target_modules).values())
