"""Fused sparse-update steps: add the update into the base layer's output in place, and in backward add the update's
input gradient into the base layer's input gradient at the core columns only.

Plain autograd on `out.index_add_(rows, f(x.index_select(cols)))` costs, per layer and step: index_select's backward
allocates a dense zero N × d_in tensor and scatters into it, and autograd then adds that whole tensor onto the base
layer's input gradient (x feeds both the base and the update). Here instead:

    x ──InjectInputGrad──▶ base(·) ──▶ out ──Fused*Fn (in place)──▶ y
          ▲ backward: grad_x[..., cols] += g_xc          │ backward: parameter grads from the gathered columns,
          └──────────────── GradSlot ◀───────────────────┘ g_xc = ∂L/∂x[..., cols] left in the slot

The update Function gets x detached (it never returns a dense input gradient); it leaves the |C|-column input
gradient in a `GradSlot`, and an identity Function in front of the base layer adds it into the base layer's input
gradient in place, at the core columns. Autograd runs the update's backward first (it consumes the base's output) and
the identity's last (the base consumes its output), so the slot is always filled in time, also under reentrant
activation checkpointing (each recomputed forward makes a new slot). The base layer is called, never read.
Each backward is written out by hand from the forward's saved gathered columns: tests compare it with autograd on
the reference path (`update(x)` without `out`) and with an explicit dense ΔW.

Column gathers run on 2-D (tokens × features) views: on CPU (torch 2.13) `index_select(-1, idx)` of a 3-D
batch × seq × d tensor took ~4 ms where the same gather of its 2-D view took ~0.6 ms (2 × 256 × 768, 2816 indices,
one thread), and for SpaRTA's ~d_in + d_out scattered entries per matrix those gathers were most of its cost.

Entries dense enough that the gathered tokens × K columns outgrow the layer input (K ≥ 2 (d_in + d_out), as TaLoS's
concentrated selection gives) go through CSR products instead (EntriesCsrFn, CPU): there the input gradient is one
tokens × d_in tensor added whole through the slot, smaller than the tokens × K tensors the gather path would make.
"""

from __future__ import annotations

import warnings

import torch


class GradSlot:
    """Carries the update's input gradient at the core columns from its backward to the identity in front of the
    base. `wanted` is False when x needs no gradient (then nothing is computed)."""

    __slots__ = ("cols", "grad", "full", "wanted")

    def __init__(self, cols: torch.Tensor, wanted: bool):
        self.cols, self.grad, self.full, self.wanted = cols, None, None, wanted

    def put(self, grad_cols: torch.Tensor) -> None:
        self.grad = grad_cols if self.grad is None else self.grad + grad_cols

    def put_full(self, grad: torch.Tensor) -> None:
        """A gradient over all input features (2-D, tokens × d_in): the CSR entries path (EntriesCsrFn)."""
        self.full = grad if self.full is None else self.full + grad


class InjectInputGrad(torch.autograd.Function):
    """Identity on x; in backward, adds the slot's gradient at its columns into the incoming (base) input gradient."""

    @staticmethod
    def forward(ctx, x, slot: GradSlot):
        ctx.slot = slot
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        slot = ctx.slot
        if slot.grad is not None or slot.full is not None:
            # The incoming gradient is the base layer's fresh input gradient (this node's only consumer): adding into
            # it in place at |C| columns is the whole point. A gradient that is itself part of a graph (double
            # backward) is left untouched.
            target = grad if not grad.requires_grad else grad.clone()
            if slot.grad is not None:
                _index_add_last(target, slot.cols, slot.grad.to(target.dtype))
            if slot.full is not None:
                _add_2d(target, slot.full.to(target.dtype))
            slot.grad = slot.full = None
            return target, None
        return grad, None


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _index_add_last(t: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """t[..., index] += src in place, src 2-D (tokens × |index|); through t's 2-D view where it has one."""
    if t.is_contiguous():
        t.view(-1, t.shape[-1]).index_add_(-1, index, src)
    else:
        t.index_add_(-1, index, src.reshape(*t.shape[:-1], src.shape[-1]))


def _add_2d(t: torch.Tensor, src: torch.Tensor) -> None:
    """t += src in place, src 2-D (tokens × d); through t's 2-D view where it has one."""
    if t.is_contiguous():
        t.view(-1, t.shape[-1]).add_(src)
    else:
        t.add_(src.reshape(t.shape))


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t[..., index] as a 2-D (tokens × |index|) tensor (a strided t is gathered as it is: no copy of the whole)."""
    if t.is_contiguous():
        return t.view(-1, t.shape[-1]).index_select(-1, index)
    return _flat(t.index_select(-1, index))


class LoraBlockFn(torch.autograd.Function):
    """out[..., rows] += s · (x[..., cols] Aᵀ) Bᵀ."""

    @staticmethod
    def forward(ctx, out, x, rows, cols, lora_A, lora_B, scaling: float, slot: GradSlot):
        xc = _gather(x, cols).to(lora_A.dtype)
        h = xc @ lora_A.T
        _index_add_last(out, rows, ((h @ lora_B.T) * scaling).to(out.dtype))
        ctx.mark_dirty(out)
        ctx.save_for_backward(xc, h, lora_A, lora_B, rows)
        ctx.scaling, ctx.slot = scaling, slot
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xc, h, lora_A, lora_B, rows = ctx.saved_tensors
        g = _gather(grad_out, rows).to(lora_B.dtype) * ctx.scaling
        grad_B = g.T @ h
        gh = g @ lora_B
        grad_A = gh.T @ xc
        if ctx.slot.wanted:
            ctx.slot.put(gh @ lora_A)
        return grad_out, None, None, None, grad_A, grad_B, None, None


class DenseBlockFn(torch.autograd.Function):
    """out[..., rows] += x[..., cols] Dᵀ."""

    @staticmethod
    def forward(ctx, out, x, rows, cols, delta, slot: GradSlot):
        xc = _gather(x, cols).to(delta.dtype)
        _index_add_last(out, rows, (xc @ delta.T).to(out.dtype))
        ctx.mark_dirty(out)
        ctx.save_for_backward(xc, delta, rows)
        ctx.slot = slot
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xc, delta, rows = ctx.saved_tensors
        g = _gather(grad_out, rows).to(delta.dtype)
        grad_delta = g.T @ xc
        if ctx.slot.wanted:
            ctx.slot.put(g @ delta)
        return grad_out, None, None, None, grad_delta, None


class EntriesFn(torch.autograd.Function):
    """out[..., rows[k]] += values[k] · x[..., cols[k]]. The value gradient is Σ_tokens g[:, rows[k]] · x[:, cols[k]],
    formed from the K gathered columns: never a d_out × d_in weight gradient."""

    @staticmethod
    def forward(ctx, out, x, rows, cols, values, slot: GradSlot):
        xc = _gather(x, cols).to(values.dtype)
        _index_add_last(out, rows, (xc * values).to(out.dtype))
        ctx.mark_dirty(out)
        ctx.save_for_backward(xc, values, rows)
        ctx.slot = slot
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xc, values, rows = ctx.saved_tensors
        g = _gather(grad_out, rows).to(values.dtype)
        grad_values = (g * xc).sum(0)
        if ctx.slot.wanted:
            ctx.slot.put(g * values)
        return grad_out, None, None, None, grad_values, None


class EntriesCsrFn(torch.autograd.Function):
    """EntriesFn's update through sparse CSR products, for entries dense enough that the gathered tokens × K
    columns cost more than the layer input itself (EntriesUpdate picks it: K ≥ 2 (d_in + d_out), on CPU).

    forward  out += x ΔWᵀ, ΔW a CSR d_out × d_in matrix of the K values (rows sorted once: `csr`);
    backward value gradient = gᵀx sampled at the K entries (torch.sparse.sampled_addmm: K dot products over tokens),
             input gradient = g ΔW through ΔWᵀ in CSR, added whole into the base's input gradient (GradSlot.full).
    No dense d_out × d_in tensor in either direction; saved: the layer input (tokens × d_in) instead of the
    tokens × K gathered columns. Values and gradients are in the caller's entry order (`csr` maps between them).
    """

    @staticmethod
    def forward(ctx, out, x, csr, values, slot: GradSlot):
        xf = _flat(x).to(values.dtype)
        w = _csr(csr.crow, csr.col, values.detach()[csr.by_row], csr.shape)
        _add_2d(out, (w @ xf.T).T.to(out.dtype))
        ctx.mark_dirty(out)
        ctx.save_for_backward(xf, values)
        ctx.csr, ctx.slot = csr, slot
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xf, values = ctx.saved_tensors
        csr = ctx.csr
        g = _flat(grad_out).to(values.dtype)
        pattern = _csr(csr.crow, csr.col, values.new_zeros(len(csr.col)), csr.shape)
        sampled = torch.sparse.sampled_addmm(pattern, g.T, xf, beta=0.0).values()
        grad_values = torch.empty_like(sampled).index_copy_(0, csr.by_row, sampled)
        if ctx.slot.wanted:
            wt = _csr(csr.crow_t, csr.row_t, values.detach()[csr.by_col], (csr.shape[1], csr.shape[0]))
            ctx.slot.put_full((wt @ g.T).T)
        return grad_out, None, None, grad_values, None


def _csr(crow, col, values, shape) -> torch.Tensor:
    """A CSR tensor from indices CsrIndex built valid once (no per-step invariant check; torch's one-time "beta"
    notice silenced)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class CsrIndex:
    """Entry (rows, cols) in CSR form, built once: `by_row` orders the entries by (row, col), `crow`/`col` index that
    order; `by_col` orders them by (col, row) for the transpose, `crow_t`/`row_t` index it."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]):
        d_out, d_in = shape
        self.shape = (d_out, d_in)
        self.by_row = torch.argsort(rows * d_in + cols)
        self.col = cols[self.by_row].contiguous()
        self.crow = _crow(rows, d_out)
        self.by_col = torch.argsort(cols * d_out + rows)
        self.row_t = rows[self.by_col].contiguous()
        self.crow_t = _crow(cols, d_in)


def _crow(index: torch.Tensor, n: int) -> torch.Tensor:
    crow = torch.zeros(n + 1, dtype=torch.long, device=index.device)
    crow[1:] = torch.bincount(index, minlength=n).cumsum(0)
    return crow


def fused_call(base, update, x: torch.Tensor) -> torch.Tensor:
    """base(x) with `update` added in place through its fused Function (update.fused(out, x, slot))."""
    wanted = torch.is_grad_enabled() and x.requires_grad
    slot = GradSlot(update.cols, wanted)
    out = base(InjectInputGrad.apply(x, slot) if wanted else x)
    return update(x.detach(), out=out, slot=slot)
