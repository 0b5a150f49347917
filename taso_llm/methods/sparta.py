"""SpaRTA: sparse random parameter adaptation. Train a seeded random set of single weights of each target matrix;
everything else stays frozen.

Selection goes through the shared pipeline (sparse/select.py) with the `SeededRandomScore` statistic: uniform random
scores per entry, a pure function of (seed, matrix name), so every rank chooses the same entries without data or
communication, and the budget rules of every sparse method apply (`budget`, `budget_scope`, floor/cap). With
`sparta_density` each matrix's budget is that fraction of its entries instead.

Training uses the `entries` update (adapters/updates.py): zero-initialised values at stored indices, computed on the
gathered input columns; the gradient of entry (i, j) is Σ_tokens g[:, i]·x[:, j], formed only at the indices,
never as a dense d_out × d_in weight gradient. The adapter file stores the indices as int32 beside the values;
merge folds them into the weights for inference.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..adapters import attach_updates
from ..distributed.backend import Backend
from ..outputs import pending_path
from ..sparse.masks import load_fitting_masks, save_masks
from ..sparse.regions import lora_params
from ..sparse.seeded import SeededRandomScore, generator
from ..sparse.select import SelectionSpec, select_regions
from ..targets import find_targets, layer_shape
from .base import AdapterFileMethod, Report, RunContext
from .taso import MASKS_FILE, TasoMethod

log = logging.getLogger("taso_llm")
SAMPLINGS = ("exact", "bernoulli")


@dataclass
class SpartaArguments:
    sparta_density: float = field(
        default=0.0,
        metadata={"help": "Fraction of each target matrix's entries to train (the authors' 1 - sparsity, e.g. 0.01). "
                          "0 (default): the shared `budget` decides (rank1: d_in + d_out entries per matrix, or that "
                          "total spread over matrices with budget_scope: model)."})
    sparta_sampling: str = field(
        default="exact",
        metadata={"help": "With sparta_density: 'exact' trains round(density · d_out · d_in) entries of every matrix; "
                          "'bernoulli' draws each matrix's count as the authors' per-weight Bernoulli(density) gives "
                          "it (Binomial(d_out · d_in, density), seeded), positions uniform as before."})
    sparta_seed: int | None = field(
        default=None, metadata={"help": "Seed of the random entries (default: the run's seed). Every rank draws the "
                                        "same entries from (seed, matrix name)."})


@dataclass(frozen=True)
class DensitySpec(SelectionSpec):
    """`entries` selection whose per-matrix budget is a density of the matrix (sparta_density), not `budget`."""

    density: float = 0.0
    sampling: str = "exact"
    seed: int = 0

    def own_budgets(self, shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
        if self.density <= 0:
            return super().own_budgets(shapes)
        return {name: density_budget(name, shape, self.density, self.sampling, self.seed)
                for name, shape in shapes.items()}


def density_budget(name: str, shape: tuple[int, int], density: float, sampling: str, seed: int) -> int:
    """Entries a matrix trains at `density`: round(density · n) (at least 1), or a Binomial(n, density) draw seeded by
    (seed, name), which with uniform positions is exactly an independent Bernoulli(density) per weight."""
    n = shape[0] * shape[1]
    if sampling == "bernoulli":
        draw = torch.binomial(torch.tensor([float(n)], dtype=torch.float64),
                              torch.tensor([density], dtype=torch.float64),
                              generator=generator("random-entries-count", seed, name))
        return int(draw.item())
    return max(1, round(density * n))


def _touched(region) -> dict:
    """Distinct rows and columns the entries touch (the run's plot shows them as shares of d_out and d_in)."""
    if region is None:
        return {"rows": 0, "cols": 0}
    return {"rows": len(torch.unique(region.rows)), "cols": len(torch.unique(region.cols))}


class SpartaMethod(AdapterFileMethod):
    name = "sparta"
    uses_masks = True
    args_class = SpartaArguments
    # exports_peft_lora stays False: random entries touch ~every column, so the exact LoRA (rank = distinct columns)
    # would be larger than the dense matrices. Use save_merged (merge) for inference instead.

    def validate(self, shared, own: SpartaArguments, shapes, model_args=None) -> None:
        super().validate(shared, own, shapes, model_args)
        if not 0.0 <= own.sparta_density <= 1.0:
            raise ValueError(f"sparta_density={own.sparta_density}: must be in [0, 1] (0: use `budget`)")
        if own.sparta_sampling not in SAMPLINGS:
            raise ValueError(f"sparta_sampling={own.sparta_sampling!r}: expected one of {list(SAMPLINGS)}")
        if own.sparta_sampling == "bernoulli" and own.sparta_density == 0:
            raise ValueError("sparta_sampling='bernoulli' draws counts at sparta_density: set sparta_density > 0")
        if own.sparta_density > 0 and str(shared.budget) != "rank1":
            raise ValueError(f"sparta_density={own.sparta_density} and budget={shared.budget!r} both size the "
                             "update: set one (budget is for sparta_density: 0)")

    resume_check = TasoMethod.resume_check  # the same rule: a resumed run reuses the entries it chose first

    def spec(self, shared, own: SpartaArguments, seed: int) -> DensitySpec:
        return DensitySpec(structure="entries", budget=shared.budget, policy=shared.budget_policy(),
                           density=own.sparta_density, sampling=own.sparta_sampling, seed=seed)

    def prepare(self, model: nn.Module, shared, own: SpartaArguments, ctx: RunContext) -> Report:
        targets = find_targets(model, shared.target_modules)
        shapes = {name: layer_shape(m) for name, m in targets.items()}
        seed = own.sparta_seed if own.sparta_seed is not None else ctx.seed
        start = time.perf_counter()
        details: dict = {"sparta_seed": seed}
        layers: dict = {}
        if shared.masks_path:
            regions, header = load_fitting_masks(shared.masks_path, shapes)
            other = sorted({r.structure for r in regions.values()} - {"entries"})
            if other:
                raise ValueError(f"masks_path={shared.masks_path}: holds {other} regions; SpaRTA trains single "
                                 "entries (masks written by a sparta run, or taso_structure: entries)")
            details["masks_reused_from"] = str(shared.masks_path)
        else:
            selection = select_regions(model, targets, SeededRandomScore(seed), self.spec(shared, own, seed),
                                       iter(()), 0, Backend.for_model(model), ctx.show_progress)
            regions, layers = selection.regions, selection.layers
            details.update(selection.report)
        details["selection_seconds"] = time.perf_counter() - start
        masks_file = Path(ctx.output_dir) / MASKS_FILE
        if ctx.is_main:  # pending until the run commits (training starts), as TASO's
            save_masks(pending_path(masks_file), regions, ctx.model_id, unwrapped=sorted(set(shapes) - set(regions)),
                       extra={"method": self.name, "budget": shared.budget, "budget_scope": shared.budget_scope,
                              "sparta_config": {**vars(own), "sparta_seed": seed}})
        attach_updates(model, regions)
        counts = {name: len(regions[name].rows) if name in regions else 0 for name in shapes}
        trainable, lora1 = sum(counts.values()), sum(lora_params(s) for s in shapes.values())
        log.info("SpaRTA: %d random entries on %d of %d matrices (density %.2e; rank-1 LoRA on the same modules: %d); "
                 "seed %d, budget_scope=%s", trainable, len(regions), len(shapes),
                 trainable / max(1, sum(a * b for a, b in shapes.values())), lora1, seed, shared.budget_scope)
        return Report(trainable_params=trainable, lora_r1_params=lora1,
                      details={**details, "masks_file": str(masks_file)},
                      layers={name: {"shape": list(shape), "params": counts[name], **_touched(regions.get(name)),
                                     "density": counts[name] / (shape[0] * shape[1]), **layers.get(name, {})}
                              for name, shape in shapes.items()})

    def adapter_extra(self, shared, own: SpartaArguments) -> dict:
        return {"budget": shared.budget, "budget_scope": shared.budget_scope, "sparta_density": own.sparta_density}
