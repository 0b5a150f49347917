"""Fused updates gather and scatter through 2-D (tokens × features) views of contiguous tensors (fused.py): the
other memory layouts take the strided path. Both give autograd's gradients on the reference path."""

import pytest
import torch
from torch import nn

from taso_llm.adapters import SparseAdapterLinear, UPDATES
from taso_llm.sparse.regions import STRUCTURES, Region


def _region(structure, d_out=40, d_in=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    if structure == "entries":  # SpaRTA's count: d_in + d_out entries, so rows and columns repeat
        flat = torch.sort(torch.randperm(d_out * d_in, generator=g)[:d_in + d_out]).values
        return Region(structure, (d_out, d_in), flat // d_in, flat % d_in)
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


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("layout", ["contiguous", "strided_input", "strided_base"])
def test_fused_equals_reference_in_every_layout(structure, layout):
    torch.manual_seed(2)
    region = _region(structure)
    base = StridedLinear(30, 40) if layout == "strided_base" else \
        nn.Linear(30, 40, dtype=torch.float64).requires_grad_(False)
    update = UPDATES[structure](region, alpha=3.0, dtype=torch.float64)
    for p in update.parameters():
        nn.init.normal_(p)
    layer = SparseAdapterLinear(base, update)
    leaf = torch.randn(5, 3, 30, dtype=torch.float64, requires_grad=True)
    x = leaf.transpose(0, 1) if layout == "strided_input" else leaf.transpose(0, 1).contiguous()
    w = torch.randn(3, 5, 40, dtype=torch.float64)
    y = layer(x)
    if layout == "strided_base":
        assert not base(x).is_contiguous()
    grads = _grads((y * w).sum(), [*update.parameters(), leaf])
    contribution, rows = update(x)
    y_ref = base(x).index_add(-1, rows, contribution)
    ref = _grads((y_ref * w).sum(), [*update.parameters(), leaf])
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
