"""SMoA's update: Hadamard modulation of the frozen weight's K diagonal blocks (sparse/svd_order.py chooses them).

Block k holds the rows R_k and columns C_k of group k. Its update is ΔW_kk = (α/r) · (B_k A_k) ⊙ W_kk with
A_k: r_k × |C_k| (LoRA's random init), B_k: |R_k| × r_k (zero init, so the model starts as the base), Σ r_k = r.
Off-diagonal blocks get nothing. The groups partition the rows and the columns, so

    y = base(x),  y[..., R_k] += x[..., C_k] ΔW_kkᵀ   for k = 1..K.

How a step computes it (ModulatedBlockFn). Two exact forms exist:
  - per block: form the |R_k| × |C_k| block M_k = (B_k A_k) ⊙ W_kk, then one matmul x_k M_kᵀ;
    N·|R_k|·|C_k| multiply-adds for N tokens (plus r_k·|R_k|·|C_k| to form M_k);
  - per rank: since (B A ⊙ W) x = Σ_j B[:, j] ⊙ (W (A[j] ⊙ x)), r_k matmuls with W_kk itself, never forming M_k;
    r_k · N·|R_k|·|C_k| multiply-adds, and N·r_k·(|R_k| + |C_k|) of temporaries.
The per-block form is r_k times cheaper (measured 5.7x on CPU, N = 2048, 1024 x 1024 block, r_k = 4) and its
temporary, one |R_k| × |C_k| block at a time (a 1/K² part of W), is smaller than the per-rank form's for any N above
|R_k||C_k| / (r_k (|R_k| + |C_k|)) tokens (256 there). So it is used here. M_k is never kept for backward: backward
forms it again, and the block's weight gradient G_k = g_kᵀ x_k only long enough to give ∂B_k = s (G_k ⊙ W_kk) A_kᵀ
and ∂A_k = s B_kᵀ (G_k ⊙ W_kk). No d_out × d_in update or gradient exists at any time.

The frozen blocks are a copy of W taken once at attach (`read_base`, through the Backend's gather, one matrix at a
time; a collective under ZeRO-3/FSDP2), so the forward never reads the base layer's weight and ZeRO-3, FSDP2 and
4-bit bases keep working. They are non-persistent buffers: never in state_dict, adapter files or checkpoints (rebuilt
from the base at load), never trained, and kept out of DDP's per-step buffer broadcast (methods/smoa.py). Memory:
Σ_k |R_k||C_k| ≈ d_out·d_in / K elements per matrix on every rank (buffers are not sharded by ZeRO-3/FSDP2):
  - a dense base: a copy in the adapter dtype (bf16: 2 bytes per element);
  - a 4-bit base: the blocks re-quantized to nf4 (0.5 bytes + a float32 scale per 64 elements), dequantized per
    step, block by block (forward, and again in backward). The blocks then hold the base's nf4 values rounded once
    more to nf4 in their own 64-element groups (~ the base's own quantization error again); training, the saved
    adapter, loading and merging all use these same blocks, so the trained function is reproduced exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..distributed.backend import gathered_weight
from ..sparse.regions import Region
from ..sparse.svd_order import STRUCTURE, split_rank

NF4_BLOCKSIZE = 64


def _nf4_state(absmax_bits: torch.Tensor, shape, dtype):
    import bitsandbytes.functional as bnbf

    # absmax is stored bit-cast to int32 so that .half()/.bfloat16() on the model (DeepSpeed does it) leave it exact
    return bnbf.QuantState(absmax=absmax_bits.view(torch.float32), shape=torch.Size(shape), dtype=dtype,
                           blocksize=NF4_BLOCKSIZE, quant_type="nf4")


def frozen_block(frozen: torch.Tensor, absmax_bits: torch.Tensor | None, shape, dtype) -> torch.Tensor:
    """The |R_k| × |C_k| frozen block W_kk in `dtype`: the stored copy, or the nf4 copy dequantized now."""
    if absmax_bits is None:
        return frozen
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(frozen, _nf4_state(absmax_bits, shape, dtype))


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class ModulatedBlockFn(torch.autograd.Function):
    """y_k = x_k M_kᵀ with M_k = s (B_k A_k) ⊙ W_kk, formed per call and never saved (see the module docstring)."""

    @staticmethod
    def forward(ctx, xk, lora_A, lora_B, frozen, absmax_bits, scaling: float):
        shape, dtype = (lora_B.shape[0], lora_A.shape[1]), lora_A.dtype
        block = (lora_B @ lora_A).mul_(frozen_block(frozen, absmax_bits, shape, dtype)).mul_(scaling)
        ctx.save_for_backward(xk, lora_A, lora_B, frozen, absmax_bits)
        ctx.scaling = scaling
        return xk.to(dtype) @ block.T

    @staticmethod
    def backward(ctx, grad_y):
        xk, lora_A, lora_B, frozen, absmax_bits = ctx.saved_tensors
        shape, dtype = (lora_B.shape[0], lora_A.shape[1]), lora_A.dtype
        weight = frozen_block(frozen, absmax_bits, shape, dtype)
        g = _flat(grad_y).to(dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            block = (lora_B @ lora_A).mul_(weight).mul_(ctx.scaling)
            grad_x = (g @ block).reshape(xk.shape).to(xk.dtype)
            del block
        modulated = (g.T @ _flat(xk).to(dtype)).mul_(weight).mul_(ctx.scaling)  # ∂L/∂(B A) = s · G_k ⊙ W_kk
        grad_A = lora_B.T @ modulated if ctx.needs_input_grad[1] else None
        grad_B = modulated @ lora_A.T if ctx.needs_input_grad[2] else None
        return grad_x, grad_A, grad_B, None, None, None


class ModulatedBlocksUpdate(nn.Module):
    """ΔW_kk = (alpha / r) (B_k A_k) ⊙ W_kk on K diagonal blocks. Parameters lora_A_k, lora_B_k are direct
    attributes (not in a ParameterList) so that ZeRO-3 gathers them when this module runs."""

    structure = STRUCTURE

    def __init__(self, region: Region, alpha: float, dtype: torch.dtype, device=None):
        super().__init__()
        self.shape, self.rank, self.alpha = region.shape, region.rank, float(alpha)
        for name, index in region.index_tensors().items():  # persistent: the adapter's index vectors
            self.register_buffer(name, index.to(device=device, dtype=torch.long))
        self.row_sizes = region.extra["row_offsets"].diff().tolist()
        self.col_sizes = region.extra["col_offsets"].diff().tolist()
        self.ranks = split_rank(self.rank, len(self.row_sizes))
        for k, (rows, cols, r) in enumerate(zip(self.row_sizes, self.col_sizes, self.ranks)):
            a = nn.Parameter(torch.empty(r, cols, dtype=dtype, device=device))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as PEFT's LoRA A
            setattr(self, f"lora_A_{k}", a)
            setattr(self, f"lora_B_{k}", nn.Parameter(torch.zeros(rows, r, dtype=dtype, device=device)))
        self.quantized = None  # set by read_base: whether the frozen blocks are kept in nf4

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def groups(self) -> int:
        return len(self.row_sizes)

    def _groups(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(R_k, C_k) for every block k."""
        return list(zip(self.rows.split(self.row_sizes), self.cols.split(self.col_sizes)))

    def read_base(self, base: nn.Module) -> None:
        """Copy the K frozen diagonal blocks of the base weight (attach_updates calls this once per layer, on every
        rank in the same order: the gather is a collective when the weights are sharded)."""
        weight = gathered_weight(base)
        dtype = self.lora_A_0.dtype
        self.quantized = getattr(base.weight, "quant_state", None) is not None
        for k, (rows, cols) in enumerate(self._groups()):
            block = weight.index_select(0, rows.to(weight.device)).index_select(1, cols.to(weight.device))
            block = block.to(device=self.rows.device, dtype=dtype).contiguous()
            absmax = None
            if self.quantized:
                import bitsandbytes.functional as bnbf

                block, state = bnbf.quantize_4bit(block, blocksize=NF4_BLOCKSIZE, quant_type="nf4")
                absmax = state.absmax.float().view(torch.int32)
            self.register_buffer(f"frozen_{k}", block, persistent=False)
            self.register_buffer(f"frozen_absmax_{k}", absmax, persistent=False)
        del weight

    def frozen_buffer_names(self) -> list[str]:
        return [name for name, _ in self.named_buffers() if name.startswith("frozen_")]

    def _block_args(self, k: int):
        if self.quantized is None:
            raise RuntimeError("SMoA update used before its frozen blocks were read: attach it with "
                               "adapters.attach_updates, which calls read_base(base)")
        return (getattr(self, f"lora_A_{k}"), getattr(self, f"lora_B_{k}"), getattr(self, f"frozen_{k}"),
                getattr(self, f"frozen_absmax_{k}"))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(contribution, out_index): the K blocks' outputs in group order, added at `rows` by the wrapper."""
        parts = x.index_select(-1, self.cols).split(self.col_sizes, dim=-1)
        outs = [ModulatedBlockFn.apply(xk, *self._block_args(k), self.scaling) for k, xk in enumerate(parts)]
        return torch.cat(outs, dim=-1), self.rows

    def delta_weight(self) -> torch.Tensor:
        """The dense ΔW (d_out × d_in, float32 or wider): merge and tests only, never in a training step."""
        dtype = torch.promote_types(self.lora_A_0.dtype, torch.float32)
        delta = torch.zeros(self.shape, dtype=dtype, device=self.rows.device)
        for k, (rows, cols) in enumerate(self._groups()):
            a, b, frozen, absmax = self._block_args(k)
            weight = frozen_block(frozen, absmax, (len(rows), len(cols)), a.dtype).to(dtype)
            delta[rows.unsqueeze(1), cols.unsqueeze(0)] = (b.detach().to(dtype) @ a.detach().to(dtype)) * weight \
                * self.scaling
        return delta

    def lora_factors(self):
        raise NotImplementedError("SMoA's update (B A) ⊙ W is not low-rank in general: it has no exact PEFT LoRA "
                                  "form; merge it into the base instead (save_merged)")
