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
statistics themselves (see distributed.py). For that, a batch may carry its global index (`BATCH_INDEX`) and a
`COUNTED` flag: an uncounted batch still runs forward/backward and reads every weight (so ranks issue the same
collectives under ZeRO-3/FSDP) but adds nothing. `per_batch=True` keeps the rowcol statistics of each batch apart,
keyed by global index, so an owner can later sum every rank's batches in global order with `ordered_sum`, the same
accumulation this module uses on one process: the sums are then bitwise equal for any world size.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..targets import dense_weight, layer_shape

BATCH_INDEX = "taso_batch_index"  # global calibration batch index (calibration.py sets it)
COUNTED = "taso_counted"  # False on a padding batch that only keeps ranks in step


def ordered_sum(parts: Iterable[torch.Tensor], into: torch.Tensor | None = None) -> torch.Tensor:
    """Left-to-right sum ((into + p0) + p1) + ...; THE accumulation order of every importance sum.

    Streaming (one process) and gathered (distributed owner) sums both go through here, so the same per-batch
    parts in the same order give bitwise-equal results. `into` is updated in place.
    """
    for part in parts:
        into = part.clone() if into is None else into.add_(part)
    return into


@dataclass
class LayerStats:
    shape: tuple[int, int]
    row: torch.Tensor | None = None  # (d_out,) float64
    col: torch.Tensor | None = None  # (d_in,) float64
    full: torch.Tensor | None = None  # (d_out, d_in) float32: |W⊙G| summed, or ΣG when abs is deferred
    batches: int = 0
    meta: dict = field(default_factory=dict)
    per_batch: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # global batch index -> (row, col)
    abs_deferred: bool = False  # full holds ΣG; finalize_stats applies |W ⊙ ΣG|


@dataclass
class ImportanceResult:
    stats: dict[str, LayerStats]
    batches: int
    tokens: int
    seconds: float


class _Collector:
    """Hooks on one linear layer: keeps its input from the forward pass, scores it when the output grad arrives."""

    def __init__(self, module: nn.Module, keep: str, abs_per_batch: bool,
                 weight_fn: Callable[[nn.Module], torch.Tensor], per_batch: bool = False):
        self.module, self.keep, self.abs_per_batch, self.weight_fn = module, keep, abs_per_batch, weight_fn
        d_out, d_in = layer_shape(module)
        self.stats = LayerStats(shape=(d_out, d_in), abs_deferred=not abs_per_batch)
        if keep == "rowcol" and abs_per_batch:
            self.stats.row = torch.zeros(d_out, dtype=torch.float64)
            self.stats.col = torch.zeros(d_in, dtype=torch.float64)
            if per_batch:
                self.stats.per_batch = {}
        self.batch_index, self.counted = 0, True  # set by estimate_importance before each batch
        self.handle = module.register_forward_hook(self._on_forward)

    def _on_forward(self, module, args, output):
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        x = args[0].detach()
        output.register_hook(lambda g: self._on_grad(x, g))

    @torch.no_grad()
    def _on_grad(self, x: torch.Tensor, g: torch.Tensor) -> None:
        d_out, d_in = self.stats.shape
        # Read the weight first, even for a padding batch: under ZeRO-3/FSDP this is a collective every rank makes.
        weight = self.weight_fn(self.module) if self.abs_per_batch else None
        if not self.counted:
            return
        grad_w = g.reshape(-1, d_out).float().T @ x.reshape(-1, d_in).float()  # G = gᵀx, freed on return
        if not self.abs_per_batch:
            self._accumulate_full(grad_w)
            return
        # |W ⊙ G| in G's own storage: one matrix-sized temporary per hook, not three (peak memory of importance).
        saliency = grad_w.mul_(weight).abs_()
        del weight
        if self.keep == "full":
            self._accumulate_full(saliency)
            return
        # Per-batch sums in fp32 (a float64 `dtype=` would first copy the whole matrix); batches add up in float64.
        row = saliency.sum(dim=1).double().cpu()
        col = saliency.sum(dim=0).double().cpu()
        if self.stats.per_batch is not None:
            self.stats.per_batch[self.batch_index] = (row, col)
        ordered_sum([row], into=self.stats.row)
        ordered_sum([col], into=self.stats.col)

    def _accumulate_full(self, value: torch.Tensor) -> None:
        self.stats.full = ordered_sum([value.cpu()], into=self.stats.full)

    def finish(self, finalize: bool) -> LayerStats:
        self.handle.remove()
        if finalize:
            finalize_stats(self.stats, lambda: self.weight_fn(self.module) if self.stats.abs_deferred else None)
        return self.stats


def finalize_stats(s: LayerStats, weight: Callable[[], torch.Tensor | None]) -> LayerStats:
    """Resolve deferred |·| and derive row/col sums from full matrices, so every result has row and col.

    `weight()` gives the full weight when |W ⊙ ΣG| is still to be taken (distributed owners call this after the
    reduction, since |·| of a sum is not the sum of per-rank |·|).
    """
    if s.abs_deferred and s.full is not None:
        s.full = (weight().float().cpu() * s.full).abs_()
    s.abs_deferred = False
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
def _scoring_mode(model: nn.Module, checkpointing: bool):
    """No dropout anywhere, and every parameter frozen, so backward computes activation gradients only and never fills
    (or, under ZeRO-3, tries to partition) a weight's .grad. Everything is restored exactly afterwards.

    With `checkpointing`, decoder layers run under reentrant activation checkpointing, so importance needs no more
    activation memory than training with checkpointing does: the first forward runs without grad (the hooks skip
    it) and the hooks capture each layer once, in its recompute during backward. transformers checkpoints a layer
    when its `gradient_checkpointing` flag is set and it is in training mode; only those layers are put in training
    mode (not their children: attention dropout and the like stay off). Without it, no layer is checkpointed (a
    non-reentrant recompute would fire the hooks a second time)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    trainable = [p for p in model.parameters() if p.requires_grad]
    modes = [(m, m.training) for m in model.modules()]
    layers = [(m, m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func"))
              for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for p in trainable:
        p.requires_grad_(False)
    model.eval()
    for layer, _, _ in layers:
        layer.gradient_checkpointing = checkpointing
        if checkpointing:
            layer._gradient_checkpointing_func = partial(torch.utils.checkpoint.checkpoint, use_reentrant=True)
            layer.training = True
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
        for m, training in modes:
            m.training = training
        for layer, flag, func in layers:
            layer.gradient_checkpointing = flag
            if func is None:
                layer.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                layer._gradient_checkpointing_func = func


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
    per_batch: bool = False,
    finalize: bool = True,
    checkpointing: bool = True,
) -> ImportanceResult:
    """Score `targets` on `batches` (dicts with input_ids, attention_mask, labels; labels -100 outside completions).

    `weight_fn` reads a layer's full weight when it is scored; the distributed path passes one that gathers a
    ZeRO-3 / FSDP shard just for that moment. `per_batch` keeps rowcol statistics per global batch index;
    `finalize=False` leaves deferred |·| and full → row/col to the caller (after a cross-rank reduction).
    `batches` and `tokens` in the result count only counted batches. `checkpointing` (default) recomputes
    decoder layers in backward, as training with gradient checkpointing does, instead of keeping their activations.
    """
    if keep not in ("rowcol", "full"):
        raise ValueError(f"importance keep={keep!r}: expected 'rowcol' or 'full'")
    device = next(model.parameters()).device
    collectors = {name: _Collector(m, keep, abs_per_batch, weight_fn, per_batch) for name, m in targets.items()}
    n_batches = n_tokens = 0
    start = time.perf_counter()
    try:
        with _scoring_mode(model, checkpointing), _activations_require_grad(model):
            for i, batch in enumerate(tqdm(batches, total=num_batches, desc="importance", disable=not show_progress,
                                           unit="batch")):
                index, counted = int(batch.get(BATCH_INDEX, i)), bool(batch.get(COUNTED, True))
                for c in collectors.values():
                    c.batch_index, c.counted = index, counted
                batch = _to_device(batch, device)
                loss = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                             labels=batch["labels"]).loss
                loss.backward()
                if counted:
                    n_batches += 1
                    n_tokens += int((batch["labels"] != -100).sum())
    finally:
        stats = {name: c.finish(finalize) for name, c in collectors.items()}
    for s in stats.values():
        s.batches = n_batches
    return ImportanceResult(stats=stats, batches=n_batches, tokens=n_tokens, seconds=time.perf_counter() - start)
