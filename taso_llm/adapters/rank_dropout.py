"""A dense LoRA with a 0/1 mask on its rank dimension between A and B, resampled every training step (DropLoRA).

    y = W x + (alpha / r) · B (m ⊙ A x)

The update covers every row and column of its matrix: it computes x Aᵀ on the whole input (no index gather) and
returns its contribution for all output rows. The mask lives in a `RankDropout` schedule shared by the model's
updates, and only between a training step's begin and end (methods/droplora.py's callback drives it); outside a step,
in evaluation, after loading, or merged, the update is the plain LoRA (alpha / r) · B A: inference is deterministic.

Modes (docs/methods.md):
  - "step":  one Bernoulli(1 - p) keep-vector per matrix per optimizer step, drawn from a generator seeded by
             (seed, step, matrix name): the same on every rank, without communication (the paper's description);
  - "token": standard dropout on the rank activation, per token (the authors' code, nn.Dropout).
With `rescale` the kept dimensions are scaled by 1 / (1 - p) (nn.Dropout's convention), so the expected training
update equals the maskless one used at inference; without it the mask is a plain 0/1 vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..sparse.regions import PARAM_COUNTS, Region
from ..sparse.seeded import generator
from .updates import UPDATES, _register_indices

MODES = ("step", "token")


@dataclass
class RankDropout:
    """Which rank dimensions are kept, for every update of a model. `begin(step)` / `end()` bracket a training step;
    masks are drawn only inside one."""

    p: float
    mode: str = "step"
    seed: int = 0
    rescale: bool = True
    step: int | None = None  # the optimizer step in progress; None: no mask
    _masks: dict = field(default_factory=dict, repr=False)  # (matrix name, device) → this step's keep vector

    def begin(self, step: int) -> None:
        if step != self.step:
            self._masks.clear()
        self.step = step

    def end(self) -> None:
        self.step = None
        self._masks.clear()

    @property
    def scale(self) -> float:
        return 1.0 / (1.0 - self.p) if self.rescale else 1.0

    def step_mask(self, name: str, rank: int, step: int) -> torch.Tensor:
        """The keep vector (0 or `scale`) of matrix `name` at `step`: a pure function of (seed, step, name)."""
        keep = torch.rand(rank, generator=generator("droplora-step", self.seed, step, name), dtype=torch.float64)
        return (keep >= self.p).to(torch.float32) * self.scale

    def apply(self, h: torch.Tensor, name: str) -> torch.Tensor:
        """Mask the rank activation h (..., r) of matrix `name`, if a step is in progress."""
        if self.step is None or self.p == 0:
            return h
        if self.mode == "token":  # the global RNG: activation checkpointing replays it in the recompute
            dropped = F.dropout(h, self.p, training=True)
            return dropped if self.rescale else dropped * (1.0 - self.p)
        key = (name, h.device)
        if key not in self._masks:  # once per step: recomputed forwards (checkpointing) reuse it
            self._masks[key] = self.step_mask(name, h.shape[-1], self.step).to(h.device)
        return h * self._masks[key].to(h.dtype)


class RankDropoutUpdate(nn.Module):
    """ΔW = (alpha / r) · B A over the whole matrix, with A: r × d_in (seeded Kaiming init) and B: d_out × r (zero
    init), and the rank activation masked by `schedule` during training steps. Its index buffers (rows, cols) are
    all rows and columns: they let the adapter files, checkpoints and loaders treat it like every other update."""

    structure = "rank_dropout"

    def __init__(self, region: Region, alpha: float, dtype: torch.dtype, device=None):
        super().__init__()
        d_out, d_in = region.shape
        if len(region.rows) != d_out or len(region.cols) != d_in:
            raise ValueError(f"structure 'rank_dropout' covers the whole matrix: expected {d_out} rows and {d_in} "
                             f"columns, got {len(region.rows)} and {len(region.cols)}")
        self.rank, self.alpha = region.rank, float(alpha)
        _register_indices(self, region, device)
        self.lora_A = nn.Parameter(torch.empty(self.rank, d_in, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, self.rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT's LoRA A; `seed_init` makes it rank-stable
        self.schedule: RankDropout | None = None  # set by the method for training; never saved
        self.key = ""  # the matrix's module name: the mask's seed part

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def seed_init(self, seed: int, name: str) -> None:
        """Re-draw A from a generator seeded by (seed, name), so every rank starts from the same A by construction."""
        a = torch.empty(self.lora_A.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator("droplora-init", seed, name))
        with torch.no_grad():
            self.lora_A.copy_(a)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        h = x @ self.lora_A.T
        if self.training and self.schedule is not None:
            h = self.schedule.apply(h, self.key)
        return (h @ self.lora_B.T) * self.scaling, None  # every output row: the wrapper adds without an index

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Exactly a PEFT LoRA: A, B and alpha / r (no mask at inference)."""
        return self.lora_A.detach(), self.lora_B.detach(), self.scaling


def full_region(shape: tuple[int, int], rank: int) -> Region:
    d_out, d_in = shape
    return Region(RankDropoutUpdate.structure, tuple(shape), torch.arange(d_out), torch.arange(d_in), rank=rank)


# Registered when this module is imported (methods/droplora.py imports it, so every path that builds or loads a
# DropLoRA adapter has it); adapters/__init__.py imports this module so every adapter file can be loaded.
UPDATES.setdefault(RankDropoutUpdate.structure, RankDropoutUpdate)
PARAM_COUNTS.setdefault(RankDropoutUpdate.structure, lambda r: r.rank * (len(r.rows) + len(r.cols)))
