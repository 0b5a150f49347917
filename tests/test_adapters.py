"""Sparse updates against an explicit dense ΔW: outputs, parameter gradients, zero-init identity."""

import pytest
import torch
from torch import nn

from taso_llm.adapters import SparseAdapterLinear, UPDATES, delta_weight
from taso_llm.sparse.regions import STRUCTURES, Region


def _region(structure, d_out=12, d_in=10, rank=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    if structure == "entries":
        flat = torch.sort(torch.randperm(d_out * d_in, generator=g)[:15]).values
        return Region(structure, (d_out, d_in), flat // d_in, flat % d_in)
    rows = torch.sort(torch.randperm(d_out, generator=g)[:5]).values
    cols = torch.sort(torch.randperm(d_in, generator=g)[:4]).values
    return Region(structure, (d_out, d_in), rows, cols, rank=rank if structure == "lora_block" else 1)


def _explicit_delta(update, region):
    """ΔW written out by hand from the parameters, independent of the update's own code paths."""
    d = torch.zeros(region.shape, dtype=torch.float64)
    if region.structure == "lora_block":
        block = update.lora_B.double() @ update.lora_A.double() * (update.alpha / update.rank)
        d[region.rows.unsqueeze(1), region.cols.unsqueeze(0)] = block
    elif region.structure == "dense_block":
        d[region.rows.unsqueeze(1), region.cols.unsqueeze(0)] = update.delta.double()
    else:
        d[region.rows, region.cols] = update.values.double()
    return d


@pytest.mark.parametrize("structure", STRUCTURES)
def test_forward_and_grads_equal_dense_delta(structure):
    torch.manual_seed(0)
    region = _region(structure)
    base = nn.Linear(10, 12, bias=True, dtype=torch.float64)
    base.requires_grad_(False)
    update = UPDATES[structure](region, alpha=6.0, dtype=torch.float64)
    for p in update.parameters():  # non-zero values so the test sees the update
        nn.init.normal_(p)
    layer = SparseAdapterLinear(base, update)
    x = torch.randn(2, 7, 10, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    dense = _explicit_delta(update, region)
    torch.testing.assert_close(y, base(x) + x @ dense.T)
    torch.testing.assert_close(delta_weight(update).double(), dense, rtol=1e-6, atol=1e-6)

    # Parameter gradients: autograd through the sparse path vs through the explicit dense ΔW.
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), list(update.parameters()) + [x])
    params_ref = [p.detach().clone().requires_grad_(True) for p in update.parameters()]
    ref_update = UPDATES[structure](region, alpha=6.0, dtype=torch.float64)
    for name, p in zip(dict(update.named_parameters()), params_ref):
        setattr(ref_update, name, nn.Parameter(p))  # shares the ref tensors
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = base(x_ref) + x_ref @ _explicit_delta_differentiable(ref_update, region).T
    ref_grads = torch.autograd.grad((y_ref * w).sum(), list(ref_update.parameters()) + [x_ref])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def _explicit_delta_differentiable(update, region):
    d = torch.zeros(region.shape, dtype=torch.float64)
    if region.structure == "lora_block":
        block = update.lora_B @ update.lora_A * (update.alpha / update.rank)
        return d.index_put((region.rows.unsqueeze(1), region.cols.unsqueeze(0)), block)
    if region.structure == "dense_block":
        return d.index_put((region.rows.unsqueeze(1), region.cols.unsqueeze(0)), update.delta)
    return d.index_put((region.rows, region.cols), update.values)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_zero_init_gives_base_output_and_param_count(structure):
    region = _region(structure)
    base = nn.Linear(10, 12)
    layer = SparseAdapterLinear(base, UPDATES[structure](region, alpha=1.0, dtype=torch.float32))
    x = torch.randn(3, 10)
    assert torch.equal(layer(x), base(x))
    assert sum(p.numel() for p in layer.update.parameters()) == region.num_params()
    assert all(b.dtype == torch.long for b in layer.update.buffers())
    assert {n for n, _ in layer.update.named_buffers()} == {"rows", "cols"}


def test_update_never_reads_base_weight():
    """The wrapper calls the base; a base whose weight is unreadable (as under ZeRO-3) still works."""

    class Opaque(nn.Module):
        in_features, out_features = 10, 12

        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(10, 12)

        def forward(self, x):
            return self.inner(x)

    region = _region("lora_block")
    layer = SparseAdapterLinear(Opaque(), UPDATES["lora_block"](region, alpha=1.0, dtype=torch.float32))
    x = torch.randn(4, 10)
    torch.testing.assert_close(layer(x), layer.base(x))


def _reference_layer_output(base, update, x):
    """The unfused path: plain autograd through update(x) and an out-of-place scatter."""
    contribution, rows = update(x)
    return base(x).index_add(-1, rows, contribution)


def _grads(loss, tensors):
    for t in tensors:
        t.grad = None
    loss.backward()
    return [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("checkpointed", [None, "reentrant", "non_reentrant"])
def test_fused_step_equals_autograd_reference(structure, checkpointed):
    """The fused Functions' hand-written backward = autograd on the reference path, to fp64 round-off; also under
    reentrant activation checkpointing (recomputed forwards make new gradient slots)."""
    torch.manual_seed(1)
    region = _region(structure, d_out=40, d_in=30)
    base = nn.Linear(30, 40, dtype=torch.float64).requires_grad_(False)
    update = UPDATES[structure](region, alpha=3.0, dtype=torch.float64)
    for p in update.parameters():
        nn.init.normal_(p)
    layer = SparseAdapterLinear(base, update)
    x = torch.randn(3, 5, 30, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 40, dtype=torch.float64)
    if checkpointed:
        from torch.utils.checkpoint import checkpoint

        y = checkpoint(lambda t: layer(t) * 1.0, x, use_reentrant=checkpointed == "reentrant")
    else:
        y = layer(x)
    grads = _grads((y * w).sum(), [*update.parameters(), x])
    y_ref = _reference_layer_output(base, update, x)
    ref = _grads((y_ref * w).sum(), [*update.parameters(), x])
    torch.testing.assert_close(y, y_ref)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


class _InputSizedAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts ops whose output has as many elements as the layer input (N × d_in): dense input-sized tensors."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            in_place = func.__name__.split(".")[0].endswith("_")  # writes into an existing tensor
            aliasing = func.__name__.split(".")[0] in ("view", "_unsafe_view", "detach", "alias")
            if isinstance(t, torch.Tensor) and t.numel() == self.numel and not (in_place or aliasing):
                self.count += 1
        return out


@pytest.mark.parametrize("structure", STRUCTURES)
def test_fused_backward_builds_no_extra_dense_input_gradient(structure):
    """The frozen layer's backward makes one N × d_in input gradient; the fused adapter adds nothing input-sized
    (no zero tensor to scatter into, no second gradient to sum), while the plain autograd path adds some."""
    region = _region(structure, d_out=40, d_in=30)
    base = nn.Linear(30, 40).requires_grad_(False)
    update = UPDATES[structure](region, alpha=1.0, dtype=torch.float32)

    def count(forward):
        x = torch.randn(64, 30, requires_grad=True)
        y = forward(x)
        with _InputSizedAllocations(x.numel()) as mode:
            y.sum().backward()
        return mode.count

    floor = count(base)
    assert count(SparseAdapterLinear(base, update)) == floor
    assert count(lambda x: _reference_layer_output(base, update, x)) > floor
