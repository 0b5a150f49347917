"""Sparse updates: each reads a few input columns and writes a few output rows of a frozen linear layer.

Called as `update(x)` an update returns (contribution, out_index): `contribution[..., k]` is added to output feature
`out_index[k]`, through plain autograd (the reference path tests compare with). Called as `update(x, out=..., slot=...)`
it adds itself into the base output in place through its fused Function (fused.py: hand-written backward, input
gradient added into the base's at the core columns only); the wrapper uses that path. Either way no dense
d_out × d_in tensor is built in forward or backward; the dense forms below (`delta_weight`, `lora_factors`) exist only
for merge/export, run once offline.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..sparse.regions import Region
from .fused import CsrIndex, DenseBlockFn, EntriesCsrFn, EntriesFn, LoraBlockFn
from .modulated import ModulatedBlocksUpdate


def _register_indices(update: nn.Module, region: Region, device) -> None:
    """The region's index vectors as buffers: they move with .to() and land in state_dict, but are never trained.
    An update's buffers are exactly its indices (adapters/io.py stores every buffer as int32)."""
    update.shape = region.shape
    for name, index in region.index_tensors().items():
        update.register_buffer(name, index.to(device=device, dtype=torch.long))


class LoraBlockUpdate(nn.Module):
    """ΔW[R, C] = (alpha / r) · B A, with A: r × |C| (random init) and B: |R| × r (zero init)."""

    structure = "lora_block"
    fused = True

    def __init__(self, region: Region, alpha: float, dtype: torch.dtype, device=None):
        super().__init__()
        self.rank, self.alpha = region.rank, float(alpha)
        _register_indices(self, region, device)
        self.lora_A = nn.Parameter(torch.empty(self.rank, len(region.cols), dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(len(region.rows), self.rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT's LoRA A

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None, slot=None):
        if out is not None:
            return LoraBlockFn.apply(out, x, self.rows, self.cols, self.lora_A, self.lora_B, self.scaling, slot)
        h = x.index_select(-1, self.cols).to(self.lora_A.dtype) @ self.lora_A.T
        return (h @ self.lora_B.T) * self.scaling, self.rows

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Zero-padded LoRA factors (A: r × d_in, B: d_out × r) and scaling, reproducing this update exactly."""
        d_out, d_in = self.shape
        a = self.lora_A.new_zeros(self.rank, d_in).index_copy(1, self.cols, self.lora_A.detach())
        b = self.lora_B.new_zeros(d_out, self.rank).index_copy(0, self.rows, self.lora_B.detach())
        return a, b, self.scaling

    def block(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).detach() * self.scaling


class DenseBlockUpdate(nn.Module):
    """ΔW[R, C] = D, a free |R| × |C| block, zero init."""

    structure = "dense_block"
    fused = True

    def __init__(self, region: Region, alpha: float, dtype: torch.dtype, device=None):
        super().__init__()
        _register_indices(self, region, device)
        self.delta = nn.Parameter(torch.zeros(len(region.rows), len(region.cols), dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None, slot=None):
        if out is not None:
            return DenseBlockFn.apply(out, x, self.rows, self.cols, self.delta, slot)
        return x.index_select(-1, self.cols).to(self.delta.dtype) @ self.delta.T, self.rows

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Exact as a LoRA of rank |C|: A selects the core columns, B holds the block in the core rows."""
        d_out, d_in = self.shape
        k = len(self.cols)
        a = self.delta.new_zeros(k, d_in).index_put_((torch.arange(k, device=self.cols.device), self.cols),
                                                     self.delta.new_ones(k))
        b = self.delta.new_zeros(d_out, k).index_copy(0, self.rows, self.delta.detach())
        return a, b, 1.0

    def block(self) -> torch.Tensor:
        return self.delta.detach()


class EntriesUpdate(nn.Module):
    """ΔW[rows[k], cols[k]] = values[k] at stored indices, zero init; the gradient exists only at those entries."""

    structure = "entries"
    fused = True

    def __init__(self, region: Region, alpha: float, dtype: torch.dtype, device=None):
        super().__init__()
        _register_indices(self, region, device)
        self.values = nn.Parameter(torch.zeros(len(region.rows), dtype=dtype, device=device))

    # Entries per matrix from which the fused step goes through CSR products instead of gathering K columns, as a
    # multiple of d_in + d_out (a rank-1 LoRA's count). Measured on CPU (1 thread, 512 tokens, fp32): at 1x the
    # gather path is ~15% faster, at ~4x (TaLoS's concentrated entries, 12k in a 2048 x 768 matrix) the CSR path
    # is 3-4x faster in forward and backward. CPU only: the CSR kernels were not measured on a GPU.
    csr_from = 2.0

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None, slot=None):
        if out is not None:
            csr = self._csr_index()
            if csr is not None and x.device.type == "cpu" and self.values.dtype in (torch.float32, torch.float64):
                return EntriesCsrFn.apply(out, x, csr, self.values, slot)
            return EntriesFn.apply(out, x, self.rows, self.cols, self.values, slot)
        return x.index_select(-1, self.cols).to(self.values.dtype) * self.values, self.rows

    def _csr_index(self) -> CsrIndex | None:
        """The CSR index of the entries when they are dense enough for EntriesCsrFn (built once per index tensors)."""
        d_out, d_in = self.shape
        if len(self.rows) < self.csr_from * (d_in + d_out):
            return None
        key = (self.rows.device, self.rows.data_ptr(), self.rows._version, self.cols.data_ptr(), self.cols._version)
        cached = self.__dict__.get("_csr")
        if cached is None or cached[0] != key:  # moved, replaced or loaded into (load_state_dict copies in place)
            cached = self.__dict__["_csr"] = (key, CsrIndex(self.rows, self.cols, (d_out, d_in)))
        return cached[1]

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Exact as a LoRA whose rank is the number of distinct columns (A one-hot per column, B the values)."""
        d_out, d_in = self.shape
        uniq, slot = torch.unique(self.cols, return_inverse=True)
        k = len(uniq)
        a = self.values.new_zeros(k, d_in).index_put_((torch.arange(k, device=uniq.device), uniq),
                                                      self.values.new_ones(k))
        b = self.values.new_zeros(d_out, k).index_put_((self.rows, slot), self.values.detach())
        return a, b, 1.0


UPDATES = {cls.structure: cls for cls in (LoraBlockUpdate, DenseBlockUpdate, EntriesUpdate, ModulatedBlocksUpdate)}


def delta_weight(update: nn.Module) -> torch.Tensor:
    """The dense ΔW of an update (d_out × d_in). For merge/export and tests only, never in a training step."""
    if hasattr(update, "delta_weight"):  # an update that is no LoRA (SMoA's modulated blocks) forms its own
        return update.delta_weight()
    a, b, scaling = update.lora_factors()
    return (b.float() @ a.float()) * scaling
