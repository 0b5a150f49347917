"""Fused updates gather and scatter through 2-D (tokens × features) views of contiguous tensors (fused.py): the
other memory layouts take the strided path. Dense enough entries go through CSR products (EntriesCsrFn). Every path
gives autograd's gradients on the reference path."""

import pytest
import torch
from torch import nn

from taso_llm.adapters import SparseAdapterLinear, UPDATES
from taso_llm.sparse.regions import STRUCTURES, Region


CASES = [*STRUCTURES, "entries_csr"]


def _region(structure, d_out=40, d_in=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    if structure.startswith("entries"):  # SpaRTA's count: d_in + d_out entries, so rows and columns repeat;
        k = (d_in + d_out) * (3 if structure == "entries_csr" else 1)  # 3x: the CSR path (EntriesUpdate.csr_from)
        flat = torch.randperm(d_out * d_in, generator=g)[:k]  # unsorted: CsrIndex orders them itself
        return Region("entries", (d_out, d_in), flat // d_in, flat % d_in)
    rows = torch.sort(torch.randperm(d_out, generator=g)[:7]).values
    cols = torch.sort(torch.randperm(d_in, generator=g)[:6]).values
    return Region(structure, (d_out, d_in), rows, cols, rank=2 if structure == "lora_block" else 1)


class StridedLinear(nn.Module):
    """A frozen linear layer whose output, and whose input gradient, are non-contiguous (seq-major compute)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in, dtype=torch.float64), requires_grad=False)

    def forward(self, x):
        return (x.transpose(0, 1) @ self.weight.T).transpose(0, 1)


def _grads(loss, tensors):
    for t in tensors:
        t.grad = None
    loss.backward()
    return [t.grad.clone() for t in tensors]


def _grads_of_both(layer, update, base, x, leaf, w):
    y = layer(x)
    grads = _grads((y * w).sum(), [*update.parameters(), leaf])
    contribution, rows = update(x)
    y_ref = base(x).index_add(-1, rows, contribution)
    return y, grads, y_ref, _grads((y_ref * w).sum(), [*update.parameters(), leaf])


@pytest.mark.parametrize("structure", CASES)
@pytest.mark.parametrize("layout", ["contiguous", "strided_input", "strided_base"])
def test_fused_equals_reference_in_every_layout(structure, layout):
    torch.manual_seed(2)
    region = _region(structure)
    base = StridedLinear(30, 40) if layout == "strided_base" else \
        nn.Linear(30, 40, dtype=torch.float64).requires_grad_(False)
    update = UPDATES[region.structure](region, alpha=3.0, dtype=torch.float64)
    for p in update.parameters():
        nn.init.normal_(p)
    if region.structure == "entries":
        assert (update._csr_index() is not None) == (structure == "entries_csr")
    layer = SparseAdapterLinear(base, update)
    leaf = torch.randn(5, 3, 30, dtype=torch.float64, requires_grad=True)
    x = leaf.transpose(0, 1) if layout == "strided_input" else leaf.transpose(0, 1).contiguous()
    w = torch.randn(3, 5, 40, dtype=torch.float64)
    if layout == "strided_base":
        assert not base(x).is_contiguous()
    y, grads, y_ref, ref = _grads_of_both(layer, update, base, x, leaf, w)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reentrant", [True, False])
def test_csr_entries_under_activation_checkpointing_and_in_float32(reentrant):
    """The CSR path under checkpointing (recomputed forwards fill new slots), and in fp32 to fp32 round-off."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(3)
    region = _region("entries_csr")
    base = nn.Linear(30, 40).requires_grad_(False)
    update = UPDATES["entries"](region, alpha=1.0, dtype=torch.float32)
    nn.init.normal_(update.values)
    layer = SparseAdapterLinear(base, update)
    leaf = torch.randn(3, 5, 30, requires_grad=True)
    w = torch.randn(3, 5, 40)
    y = checkpoint(lambda t: layer(t) * 1.0, leaf, use_reentrant=reentrant)
    grads = _grads((y * w).sum(), [update.values, leaf])
    contribution, rows = update(leaf)
    y_ref = base(leaf).index_add(-1, rows, contribution)
    ref = _grads((y_ref * w).sum(), [update.values, leaf])
    torch.testing.assert_close(y, y_ref)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_csr_index_follows_indices_loaded_in_place():
    """load_state_dict copies index buffers in place: the cached CSR index must follow them."""
    update = UPDATES["entries"](_region("entries_csr", seed=0), alpha=1.0, dtype=torch.float64)
    other = UPDATES["entries"](_region("entries_csr", seed=1), alpha=1.0, dtype=torch.float64)
    nn.init.normal_(other.values)
    assert update._csr_index() is not None  # cached for the first indices
    update.load_state_dict(other.state_dict())
    x = torch.randn(4, 30, dtype=torch.float64)
    out = update(x, out=torch.zeros(4, 40, dtype=torch.float64), slot=_NoGrad())
    contribution, rows = other(x)
    torch.testing.assert_close(out, torch.zeros(4, 40, dtype=torch.float64).index_add(-1, rows, contribution))


class _NoGrad:  # a GradSlot stand-in when x needs no gradient
    wanted = False
