"""Task vectors τ = θ_ft − θ_pre of training outputs, whatever method wrote them, and their weighted sums on a base.

`load_task_vector(run_dir, load_base)` asks `methods.detect(run_dir)` which method wrote the run and lets it load
the trained function (`load_for_eval`) on a fresh base; then, one matrix at a time:
  - own-format sparse adapters (TaLoS, SpaRTA, TASO entries): τ of a matrix is the update itself; single entries stay
    sparse (indices + values, exactly what was trained), other structures become their dense ΔW (`delta_weight`);
  - anything else (a PEFT LoRA, a fully fine-tuned model): the method's merge (LoRA: PEFT's merge_and_unload; full:
    the model as it is) minus the base, per parameter; parameters that did not change are left out.
τ is keyed by the parameter names of the plain HF model (`model.layers.0.self_attn.q_proj.weight`), so vectors from
different methods add up on one base. `TaskArithmetic` holds that base and sets θ = θ_pre + Σ_t c_t τ_t in place,
restoring the touched parameters exactly between settings (an α grid search re-merges dozens of times).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .updates import delta_weight
from .wrap import iter_adapters


@dataclass
class SparseDelta:
    """ΔW[rows[k], cols[k]] = values[k] on a (d_out, d_in) matrix."""

    shape: tuple[int, int]
    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor  # float32

    def dense(self) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=torch.float32)
        return out.index_put_((self.rows, self.cols), self.values, accumulate=True)


@dataclass
class TaskVector:
    run_dir: str
    method: str
    base_model: str | None  # what the run was trained on (metrics.json `model`, or the adapter config's)
    deltas: dict[str, torch.Tensor | SparseDelta] = field(default_factory=dict)

    def num_nonzero(self) -> int:
        return sum(len(d.values) if isinstance(d, SparseDelta) else int(torch.count_nonzero(d))
                   for d in self.deltas.values())


def trained_base(run_dir: str | Path) -> str | None:
    """The base model id a run was trained on, as its metrics.json or adapter config recorded it."""
    run_dir = Path(run_dir)
    for name, key in (("metrics.json", "model"), ("adapter_config.json", "base_model_name_or_path")):
        path = run_dir / name
        if path.is_file():
            value = json.loads(path.read_text()).get(key)
            if value:
                return value
    return None


def _own_format_deltas(model: nn.Module) -> dict[str, torch.Tensor | SparseDelta]:
    deltas = {}
    for name, wrapper in iter_adapters(model):
        update = wrapper.update
        if update.structure == "entries":
            deltas[f"{name}.weight"] = SparseDelta(tuple(update.shape), update.rows.cpu(), update.cols.cpu(),
                                                   update.values.detach().float().cpu())
        else:
            deltas[f"{name}.weight"] = delta_weight(update).cpu()
    return deltas


@torch.no_grad()
def _diff(base: nn.Module, tuned: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """Per parameter (named_parameters: a tied weight once), the change; unchanged parameters left out."""
    before, after = dict(base.named_parameters()), dict(tuned.named_parameters())
    if set(before) != set(after):
        raise ValueError(f"{source}: the merged model's parameters differ from the base's "
                         f"({sorted(set(before) ^ set(after))[:3]}...); was it trained on another base?")
    deltas = {}
    for name, value in after.items():  # one parameter at a time
        delta = value.float() - before[name].float()
        if torch.count_nonzero(delta):
            deltas[name] = delta.cpu()
    return deltas


def load_task_vector(run_dir: str | Path, load_base: Callable[..., nn.Module]) -> TaskVector:
    """τ of one training output. `load_base(path=None)` loads a fresh base (or, with a path, a whole checkpoint) as
    the run loaded its base."""
    from ..methods import detect

    run_dir = Path(run_dir)
    method = detect(run_dir)
    model = method.load_for_eval(run_dir, load_base)
    deltas = _own_format_deltas(model)
    if not deltas:
        tuned = method.merge(model) if method.mergeable else model
        deltas = _diff(load_base(), tuned, str(run_dir))
    return TaskVector(run_dir=str(run_dir), method=method.name, base_model=trained_base(run_dir), deltas=deltas)


class TaskArithmetic:
    """A base model whose parameters are set to θ_pre + Σ_t c_t τ_t, in place, one parameter at a time (fp32 sums,
    then cast to the parameter's dtype). The pre-trained values of every touched parameter are kept (on the CPU) so
    each setting starts from θ_pre exactly."""

    def __init__(self, model: nn.Module, vectors: dict[str, TaskVector]):
        self.model, self.vectors = model, vectors
        self.params = dict(model.named_parameters())
        touched = sorted({n for v in vectors.values() for n in v.deltas})
        for v in vectors.values():
            missing = sorted(set(v.deltas) - set(self.params))
            if missing:
                raise ValueError(f"{v.run_dir}: task vector touches {missing[:3]}, not parameters of the base model")
            for name, delta in v.deltas.items():
                shape = tuple(delta.shape)
                if shape != tuple(self.params[name].shape):
                    raise ValueError(f"{v.run_dir}: {name} has shape {shape} in the task vector, "
                                     f"{tuple(self.params[name].shape)} in the base model")
        self.original = {n: self.params[n].detach().cpu().clone() for n in touched}

    @torch.no_grad()
    def set(self, coefficients: dict[str, float]) -> nn.Module:
        """θ = θ_pre + Σ coefficients[t]·τ_t (tasks not named count 0). Returns the model."""
        unknown = set(coefficients) - set(self.vectors)
        if unknown:
            raise ValueError(f"unknown task vectors {sorted(unknown)}; have {sorted(self.vectors)}")
        for name, original in self.original.items():
            weight = original.float().clone()
            for task, coefficient in coefficients.items():
                delta = self.vectors[task].deltas.get(name)
                if delta is None or coefficient == 0:
                    continue
                if isinstance(delta, SparseDelta):
                    weight.index_put_((delta.rows, delta.cols), coefficient * delta.values, accumulate=True)
                else:
                    weight.add_(delta, alpha=coefficient)
            param = self.params[name]
            param.copy_(weight.to(device=param.device, dtype=param.dtype))
        return self.model

    def reset(self) -> nn.Module:
        return self.set({})
