"""Putting updates onto a model and taking them off again."""

from __future__ import annotations

import torch
from torch import nn

from ..sparse.regions import Region
from .fused import fused_call
from .updates import UPDATES


class SparseAdapterLinear(nn.Module):
    """A frozen linear layer plus a sparse update: y = base(x), then y[..., out_index] += contribution.

    Updates with a fused Function (`fused = True`: adapters/fused.py) add themselves in place and route their input
    gradient into the base's at the core columns; others go through plain autograd below. Under torch.compile the
    plain path is traced instead: the fused Functions hand the input gradient over through a Python object, which
    a compiled graph cannot carry (and the compiler fuses the gather / scatter itself)."""

    def __init__(self, base: nn.Module, update: nn.Module):
        super().__init__()
        self.base = base
        self.update = update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.update, "fused", False) and not torch.compiler.is_compiling():
            return fused_call(self.base, self.update, x)
        out = self.base(x)
        dtype = next(self.update.parameters()).dtype
        contribution, out_index = self.update(x.to(dtype))
        # In place: a linear layer does not keep its output for backward, so this saves a full-size copy of `out`
        # per layer (autograd's version counter would refuse it loudly if some base ever did). An update over every
        # output row (out_index None) adds plainly: index_add_'s backward would gather a full-size gradient copy.
        if out_index is None:
            return out.add_(contribution.to(out.dtype))
        return out.index_add_(-1, out_index, contribution.to(out.dtype))

    # Callers (PEFT helpers, generation utils, our exporters) look these up on linear layers.
    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self):
        return self.base.weight


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _adapter_dtype(base: nn.Module) -> torch.dtype:
    """The dtype the base computes in: a 4-bit layer's compute dtype (its weight dtype is only the storage dtype),
    else the weight's dtype, which a ZeRO-3 partition keeps even when its data is empty on this rank."""
    if getattr(base.weight, "quant_state", None) is not None or hasattr(base, "compute_dtype"):
        return getattr(base, "compute_dtype", None) or torch.float32
    dtype = base.weight.dtype
    return dtype if dtype.is_floating_point else torch.float32


def attach_updates(model: nn.Module, regions: dict[str, Region], alpha: float = 1.0,
                   dtype: torch.dtype | None = None, device=None) -> dict[str, SparseAdapterLinear]:
    """Wrap each named linear layer with the update its region's structure names. Base weights are frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = {}
    for name, region in regions.items():
        base = model.get_submodule(name)
        if isinstance(base, SparseAdapterLinear):
            raise ValueError(f"{name} already carries an adapter")
        if (base.out_features, base.in_features) != tuple(region.shape):
            raise ValueError(f"mask for {name} has shape {tuple(region.shape)} but the layer is "
                             f"{(base.out_features, base.in_features)}")
        ref = base.weight
        update_dtype = dtype or _adapter_dtype(base)
        update = UPDATES[region.structure](region, alpha=alpha, dtype=update_dtype,
                                           device=device if device is not None else ref.device)
        if hasattr(update, "read_base"):  # keeps a frozen copy of part of W (SMoA); a collective when sharded
            update.read_base(base)
        wrapped[name] = SparseAdapterLinear(base, update)
        _set_submodule(model, name, wrapped[name])
    return wrapped


def iter_adapters(model: nn.Module):
    """(name of the adapted layer, wrapper) for every adapted layer; names are those of the unwrapped model."""
    for name, module in model.named_modules():
        if isinstance(module, SparseAdapterLinear):
            yield name, module

