"""TaLoS's sensitivity statistic: a diagonal Fisher estimate from the model's own SAMPLED outputs.

Per calibration example e (one row of a batch): at every completion position t, sample a pseudo-label
ŷ_t ~ p_θ(· | x, y_<t) from the model's own prediction (teacher-forced on the reference prefix; the reference label
itself is never used), back-propagate log p_θ(ŷ | x) = Σ_t log p_θ(ŷ_t | ...), and add the squared gradient of
every target weight:

    F += G_e ⊙ G_e,      G_e = Σ_{tokens of e} g_tᵀ x_t   (d_out × d_in)

The authors run one backward per example. Rows of a batch do not interact in a causal LM, so one backward of the
batch's summed objective gives every row's own g, and each G_e is formed inside the output-gradient hook (as
importance.py forms G = gᵀx), one example and one matrix-sized temporary at a time: weights never need
`requires_grad` and autograd never materialises weight gradients. The squares add up per batch in fp32, and batches
in order into a full (d_out × d_in) fp32 accumulator per matrix on the CPU (TaLoS selects single entries).

`frozen` (between TaLoS's selection rounds): for scoring only, the listed entries of each weight are damped,
W_eff = W ⊙ (1 − (1 − damping)·frozen), by a forward hook that adds x·(ΔW)ᵀ to the layer's output, ΔW = (damping − 1)
·W ⊙ frozen formed from the gathered weight one matrix at a time (the base layer is called as it is: 4-bit, ZeRO-3
and FSDP2 bases keep working; the gather is a collective every rank makes in the same order).

Pseudo-labels come from a generator seeded by (seed, round, global batch index), so every world size samples the
same labels. Reduction to owners is distributed/reduce.py's "full" path: owners sum per-rank partial sums in rank
order, so the statistic equals the one-process one to float tolerance (not bitwise; see reduce.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..distributed.backend import Backend
from ..distributed.reduce import all_reduce_sum, assign_owners, reduce_to_owners
from ..targets import dense_weight, layer_shape
from .importance import (BATCH_INDEX, COUNTED, LayerStats, _activations_require_grad, _scoring_mode, _to_device,
                         finalize_stats, ordered_sum)
from .statistics import Scores


def sampled_log_likelihood(logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Σ over completion positions of log p(ŷ_t), ŷ_t sampled from the model's own prediction at t.

    `labels` only mark where the completion is (−100 elsewhere), as the SFT loss uses them: the logits at position t
    predict token t + 1."""
    where = labels[:, 1:] != -100
    if not where.any():  # nothing to score in this batch: a zero objective keeps every rank's backward in step
        return logits.sum() * 0.0
    log_probs = torch.log_softmax(logits[:, :-1][where].float(), dim=-1)
    sampled = torch.multinomial(log_probs.exp(), 1, generator=generator)
    return log_probs.gather(1, sampled).sum()


def batch_seed(seed: int, round_index: int, batch_index: int) -> int:
    """The pseudo-label generator's seed for one calibration batch: the same on every rank and world size."""
    return (seed * 1_000_003 + round_index) * 1_000_003 + batch_index


class _FisherCollector:
    """Hooks on one linear layer: damps its frozen entries in forward; adds Σ_e G_e² when its output grad arrives."""

    def __init__(self, module: nn.Module, weight_fn: Callable[[nn.Module], torch.Tensor],
                 frozen: torch.Tensor | None, damping: float):
        self.module, self.weight_fn, self.frozen, self.damping = module, weight_fn, frozen, damping
        self.stats = LayerStats(shape=layer_shape(module))
        self.counted = True  # set by sampled_fisher before each batch
        self.handle = module.register_forward_hook(self._on_forward)

    def _on_forward(self, module, args, output):
        x = args[0]
        if self.frozen is not None:  # also without grad: the first pass of a checkpointed layer must agree
            weight = self.weight_fn(module)
            delta = weight.float().mul(self.frozen.to(weight.device)).mul_(self.damping - 1.0)
            del weight
            output = output + F.linear(x.to(delta.dtype), delta).to(output.dtype)
        if torch.is_grad_enabled() and output.requires_grad:
            inputs = x.detach()
            output.register_hook(lambda g: self._on_grad(inputs, g))
        return output

    @torch.no_grad()
    def _on_grad(self, x: torch.Tensor, g: torch.Tensor) -> None:
        if not self.counted:
            return
        d_out, d_in = self.stats.shape
        x, g = x.reshape(x.shape[0], -1, d_in), g.reshape(g.shape[0], -1, d_out)
        batch_sum = None
        for e in range(x.shape[0]):  # one example's gradient at a time: one matrix-sized temporary
            grad_e = g[e].float().T @ x[e].float()
            batch_sum = grad_e.square_() if batch_sum is None else batch_sum.addcmul_(grad_e, grad_e)
        self.stats.full = ordered_sum([batch_sum.cpu()], into=self.stats.full)

    def finish(self, finalize: bool) -> LayerStats:
        self.handle.remove()
        if self.stats.full is None:  # no batch reached this layer: a zero statistic, same shape on every rank
            self.stats.full = torch.zeros(self.stats.shape, dtype=torch.float32)
        return finalize_stats(self.stats, lambda: None) if finalize else self.stats


def sampled_fisher(model: nn.Module, targets: dict[str, nn.Module], batches: Iterable[dict], seed: int = 0,
                   round_index: int = 0, frozen: dict[str, torch.Tensor] | None = None, damping: float = 0.1,
                   weight_fn: Callable[[nn.Module], torch.Tensor] | None = None, num_batches: int | None = None,
                   show_progress: bool = True, finalize: bool = True,
                   checkpointing: bool = True) -> tuple[dict[str, LayerStats], dict]:
    """Per target matrix, Σ over counted calibration examples of (∂ log p(ŷ)/∂W)² (unfinalized with finalize=False:
    the caller reduces across ranks first). Returns (stats, {"batches", "tokens", "seconds"})."""
    weight_fn = weight_fn or dense_weight
    frozen = frozen or {}
    device = next(model.parameters()).device
    collectors = {name: _FisherCollector(m, weight_fn, frozen.get(name), damping) for name, m in targets.items()}
    n_batches = n_tokens = 0
    start = time.perf_counter()
    try:
        with _scoring_mode(model, checkpointing), _activations_require_grad(model):
            for i, batch in enumerate(tqdm(batches, total=num_batches, desc=f"fisher round {round_index + 1}",
                                           disable=not show_progress, unit="batch")):
                index, counted = int(batch.get(BATCH_INDEX, i)), bool(batch.get(COUNTED, True))
                for c in collectors.values():
                    c.counted = counted
                batch = _to_device(batch, device)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
                generator = torch.Generator(device=logits.device).manual_seed(batch_seed(seed, round_index, index))
                sampled_log_likelihood(logits, batch["labels"], generator).backward()
                if counted:
                    n_batches += 1
                    n_tokens += int((batch["labels"][:, 1:] != -100).sum())
    finally:
        stats = {name: c.finish(finalize) for name, c in collectors.items()}
    for s in stats.values():
        s.batches = n_batches
    return stats, {"batches": n_batches, "tokens": n_tokens, "seconds": time.perf_counter() - start}


@dataclass(frozen=True)
class SampledFisher:
    """The statistic of sparse/statistics.py's interface: full per-entry scores, reduced to owners.

    `round_index` seeds the pseudo-labels of one selection round; `frozen` (matrix name → bool mask) lists the
    entries damped by `damping` for this round's scoring."""

    seed: int = 0
    round_index: int = 0
    damping: float = 0.1
    checkpointing: bool = True
    frozen: dict = field(default_factory=dict, hash=False)
    needs_calibration = True

    def score(self, model: nn.Module, targets: dict[str, nn.Module], batches: Iterable[dict],
              num_batches: int | None, backend: Backend, show_progress: bool = True) -> Scores:
        world = backend.world
        with backend.forward_context(model):
            stats, info = sampled_fisher(model, targets, batches, seed=self.seed, round_index=self.round_index,
                                         frozen=self.frozen, damping=self.damping, weight_fn=backend.gathered_weight,
                                         num_batches=num_batches, show_progress=show_progress and backend.is_main,
                                         finalize=world == 1, checkpointing=self.checkpointing)
        shapes = {name: s.shape for name, s in stats.items()}
        owners = assign_owners(shapes, world)
        batches_done, tokens = info["batches"], info["tokens"]
        if world > 1:
            stats = reduce_to_owners(stats, owners, targets, backend.gathered_weight)
            batches_done, tokens = all_reduce_sum([batches_done, tokens])
        report = {"importance_seconds": info["seconds"], "importance_batches": batches_done,
                  "importance_tokens": tokens, "importance_world_size": world}
        return Scores(stats=stats, owners=owners, shapes=shapes, report=report)
