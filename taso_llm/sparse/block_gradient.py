"""Gradient-aligned initialisation of TASO's rank-r block (`taso_init: gradient`).

After the core regions are fixed, the calibration gradient of the loss restricted to each block,
G_RC = Σ_batches g[:, R]ᵀ x[:, C]  (|R| × |C| values, never the full d_out × d_in gradient), is accumulated with the
same hooks as importance (importance.py: x from a forward hook, g from a hook on the layer output, all weights frozen)
and reduced to each matrix's owner rank. A is set from G_RC's top-r right singular vectors, A = V_rᵀ / √3 (rows of
norm 1/√3, the expected row norm of the default Kaiming-uniform init, so the effective step size does not change),
and B stays zero:

  * the initial model output is unchanged (ΔW = B A = 0), so no weight offset is needed and 4-bit / sharded bases
    keep working (the LoRA-GA / PiSSA variants that also set B must subtract B₀A₀ from the frozen weight);
  * the first gradient of B is s · g_Rᵀ (x_C Aᵀ) = s · G_RC V_r / √3 = s · U_r Σ_r / √3: B starts moving along the
    block gradient's top-r subspace instead of a random one.

It costs one more pass over the calibration batches (forward + activation backward). The owner sums per-rank partial
sums in rank order: deterministic for a given world size, equal across world sizes to float round-off (unlike the
masks, which are bitwise equal).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from ..distributed.backend import Backend
from ..distributed.reduce import assign_owners, reduce_to_owners, share_object
from ..targets import layer_shape
from .importance import BATCH_INDEX, COUNTED, LayerStats, _activations_require_grad, _scoring_mode, _to_device
from .regions import Region


class _BlockCollector:
    def __init__(self, module: nn.Module, region: Region):
        self.rows, self.cols = region.rows, region.cols
        self.grad = torch.zeros(len(region.rows), len(region.cols), dtype=torch.float64)
        self.counted = True
        self.handle = module.register_forward_hook(self._on_forward)

    def _on_forward(self, module, args, output):
        if not torch.is_grad_enabled() or not output.requires_grad:
            return  # the no-grad first pass of reentrant checkpointing: the recompute in backward is the one we want
        xc = args[0].detach().index_select(-1, self.cols.to(args[0].device))
        output.register_hook(lambda g: self._on_grad(xc, g))

    def _on_grad(self, xc: torch.Tensor, g: torch.Tensor) -> None:
        if self.counted:
            g_rows = g.index_select(-1, self.rows.to(g.device))
            block = g_rows.reshape(-1, len(self.rows)).float().T @ xc.reshape(-1, len(self.cols)).float()
            self.grad.add_(block.double().cpu())


def block_gradients(model: nn.Module, targets: dict[str, nn.Module], regions: dict[str, Region],
                    batches: Iterable[dict], backend: Backend, checkpointing: bool = True) -> dict[str, torch.Tensor]:
    """G_RC per adapted matrix, summed over this rank's counted batches, reduced to owners (owned names only)."""
    collectors = {name: _BlockCollector(targets[name], regions[name]) for name in sorted(regions)}
    device = next(model.parameters()).device
    try:
        with backend.forward_context(model), _scoring_mode(model, checkpointing), _activations_require_grad(model):
            for batch in batches:
                counted = bool(batch.get(COUNTED, True))
                for c in collectors.values():
                    c.counted = counted
                batch = _to_device({k: v for k, v in batch.items() if k not in (BATCH_INDEX, COUNTED)}, device)
                model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                      labels=batch["labels"]).loss.backward()
    finally:
        for c in collectors.values():
            c.handle.remove()
    grads = {name: c.grad for name, c in collectors.items()}
    if not backend.distributed:
        return grads
    stats = {name: LayerStats(shape=tuple(g.shape), full=g.float()) for name, g in grads.items()}
    owners = assign_owners({name: layer_shape(targets[name]) for name in stats}, backend.world)
    return {name: s.full.double() for name, s in reduce_to_owners(stats, owners, targets).items()}


def aligned_lora_a(block_grad: torch.Tensor, rank: int, like: torch.Tensor) -> torch.Tensor:
    """A = V_rᵀ/√3 from the block gradient's top-r right singular vectors; the sign of each vector fixed so its largest
    entry is positive (SVD signs are arbitrary; this makes the init deterministic). Padded with zeros if the block has
    fewer than r columns or rows."""
    _, _, vh = torch.linalg.svd(block_grad.double(), full_matrices=False)
    top = vh[:rank]
    signs = torch.sign(top.gather(1, top.abs().argmax(dim=1, keepdim=True)))
    top = top * torch.where(signs == 0, torch.ones_like(signs), signs)
    out = torch.zeros_like(like, dtype=torch.float64)
    out[: top.shape[0]] = top / math.sqrt(3.0)
    return out.to(like.dtype)


def aligned_inits(model: nn.Module, targets: dict[str, nn.Module], regions: dict[str, Region],
                  batches: Iterable[dict], backend: Backend, checkpointing: bool = True) -> dict[str, torch.Tensor]:
    """A (rank × |C|, float32) for every lora_block region, from its block gradient; on every rank. Call it before
    the updates are attached (the hooks go on the bare base layers)."""
    blocks = {n: r for n, r in regions.items() if r.structure == "lora_block"}
    owned = block_gradients(model, targets, blocks, batches, backend, checkpointing)
    inits = {n: aligned_lora_a(g, blocks[n].rank, torch.zeros(blocks[n].rank, len(blocks[n].cols)))
             for n, g in owned.items()}
    if backend.distributed:
        owners = assign_owners({name: layer_shape(targets[name]) for name in blocks}, backend.world)
        inits = share_object(inits, owners)
    return inits
