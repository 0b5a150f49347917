"""Task importance of frozen pretrained weights: I = |W ⊙ ∂L/∂W| on the task's own SFT loss.

The weight gradient of a linear layer on a batch is G = gᵀx, where x is the layer input and g the gradient at its
output. We capture x with a forward hook and g with a hook on the output tensor, so the base weights never need
`requires_grad` (they may be frozen, 4-bit or sharded) and autograd never materialises weight gradients. One G lives
at a time, inside the hook, and only the statistics the chosen structure needs are kept:
  - "rowcol": row sums r_i = Σ_j I_ij and column sums c_j = Σ_i I_ij, O(d_in + d_out) per matrix;
  - "full":   the whole I, O(d_in · d_out) per matrix (unstructured "entries" selection needs it).

Chosen reading (methods.md: not public): |W ⊙ G_b| is taken per calibration batch and summed over batches
(`abs_per_batch=True`); `abs_per_batch=False` sums G over batches first and takes |W ⊙ ΣG| at the end, which
needs a full-size accumulator per matrix.

Nothing distributed happens here: callers pass the batches this process should score and reduce the returned
statistics themselves (see distributed.py).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .targets import dense_weight, layer_shape


@dataclass
class LayerStats:
    shape: tuple[int, int]
    row: torch.Tensor | None = None  # (d_out,) float64
    col: torch.Tensor | None = None  # (d_in,) float64
    full: torch.Tensor | None = None  # (d_out, d_in) float32: |W⊙G| summed, or ΣG when abs is deferred
    batches: int = 0
    meta: dict = field(default_factory=dict)


@dataclass
class ImportanceResult:
    stats: dict[str, LayerStats]
    batches: int
    tokens: int
    seconds: float


class _Collector:
    """Hooks on one linear layer: keeps its input from the forward pass, scores it when the output grad arrives."""

    def __init__(self, module: nn.Module, keep: str, abs_per_batch: bool,
                 weight_fn: Callable[[nn.Module], torch.Tensor]):
        self.module, self.keep, self.abs_per_batch, self.weight_fn = module, keep, abs_per_batch, weight_fn
        d_out, d_in = layer_shape(module)
        self.stats = LayerStats(shape=(d_out, d_in))
        if keep == "rowcol" and abs_per_batch:
            self.stats.row = torch.zeros(d_out, dtype=torch.float64)
            self.stats.col = torch.zeros(d_in, dtype=torch.float64)
        self.handle = module.register_forward_hook(self._on_forward)

    def _on_forward(self, module, args, output):
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        x = args[0].detach()
        output.register_hook(lambda g: self._on_grad(x, g))

    @torch.no_grad()
    def _on_grad(self, x: torch.Tensor, g: torch.Tensor) -> None:
        d_out, d_in = self.stats.shape
        grad_w = g.reshape(-1, d_out).float().T @ x.reshape(-1, d_in).float()  # G = gᵀx, freed on return
        if not self.abs_per_batch:
            self._accumulate_full(grad_w)
            return
        saliency = (self.weight_fn(self.module).float() * grad_w).abs_()
        if self.keep == "full":
            self._accumulate_full(saliency)
        else:
            self.stats.row += saliency.sum(dim=1, dtype=torch.float64).cpu()
            self.stats.col += saliency.sum(dim=0, dtype=torch.float64).cpu()

    def _accumulate_full(self, value: torch.Tensor) -> None:
        value = value.cpu()
        self.stats.full = value if self.stats.full is None else self.stats.full.add_(value)

    def finish(self) -> LayerStats:
        """Resolve deferred |·| and derive row/col sums from full matrices, so every result has row and col."""
        self.handle.remove()
        s = self.stats
        if not self.abs_per_batch and s.full is not None:
            s.full = (dense_weight(self.module).float().cpu() * s.full).abs_()
        if s.full is not None:
            s.row = s.full.sum(dim=1, dtype=torch.float64)
            s.col = s.full.sum(dim=0, dtype=torch.float64)
        if s.row is None:  # no batch reached this layer
            s.row, s.col = torch.zeros(s.shape[0], dtype=torch.float64), torch.zeros(s.shape[1], dtype=torch.float64)
        return s


@contextmanager
def _activations_require_grad(model: nn.Module):
    """Make the embedding output require grad so gradients reach every layer while all weights stay frozen."""
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _scoring_mode(model: nn.Module):
    """Eval mode (no dropout) and no gradient checkpointing (its recompute would fire the hooks twice)."""
    was_training = model.training
    flag = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    checkpointing = getattr(model, flag, False)
    if checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def estimate_importance(
    model: nn.Module,
    targets: dict[str, nn.Module],
    batches: Iterable[dict],
    keep: str = "rowcol",
    abs_per_batch: bool = True,
    weight_fn: Callable[[nn.Module], torch.Tensor] = dense_weight,
    num_batches: int | None = None,
    show_progress: bool = True,
) -> ImportanceResult:
    """Score `targets` on `batches` (dicts with input_ids, attention_mask, labels; labels -100 outside completions).

    `weight_fn` reads a layer's full weight when it is scored; the distributed path passes one that gathers a
    ZeRO-3 / FSDP shard just for that moment.
    """
    if keep not in ("rowcol", "full"):
        raise ValueError(f"importance keep={keep!r}: expected 'rowcol' or 'full'")
    device = next(model.parameters()).device
    collectors = {name: _Collector(m, keep, abs_per_batch, weight_fn) for name, m in targets.items()}
    n_batches = n_tokens = 0
    start = time.perf_counter()
    try:
        with _scoring_mode(model), _activations_require_grad(model):
            for batch in tqdm(batches, total=num_batches, desc="importance", disable=not show_progress,
                              unit="batch"):
                batch = _to_device(batch, device)
                loss = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                             labels=batch["labels"]).loss
                loss.backward()
                n_batches += 1
                n_tokens += int((batch["labels"] != -100).sum())
    finally:
        stats = {name: c.finish() for name, c in collectors.items()}
    for s in stats.values():
        s.batches = n_batches
    return ImportanceResult(stats=stats, batches=n_batches, tokens=n_tokens, seconds=time.perf_counter() - start)
