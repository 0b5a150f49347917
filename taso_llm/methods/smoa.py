"""SMoA: high-rank structured modulation adapter (as in the authors' code: no router).

One SVD of each frozen target matrix orders its rows and columns by the singular directions they draw on and cuts
them into `smoa_subspaces` groups (sparse/svd_order.py); each diagonal block W_kk then gets a Hadamard modulation
ΔW_kk = (α/r)(B_k A_k) ⊙ W_kk, B_k zero-initialised, the total rank `smoa_rank` split across the blocks
(adapters/modulated.py). Parameters per matrix: Σ_k r_k(|R_k| + |C_k|) ≈ (r/K)(d_in + d_out); the update can reach
rank far above r. The groups travel as Region index vectors (masks file, sharing between ranks, adapter files).

SMoA is not a low-rank LoRA, so there is no PEFT export; it merges (base + ΔW, offline). Its size is set by r and K,
not by the shared `budget` (which it refuses to take, rather than ignore).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..adapters import attach_updates
from ..distributed.backend import Backend
from ..outputs import pending_path
from ..sparse.masks import load_fitting_masks, save_masks
from ..sparse.regions import lora_params
from ..sparse.svd_order import STRUCTURE, modulated_params, select_modulated_blocks
from ..targets import find_targets, layer_shape
from .base import AdapterFileMethod, Report, RunContext
from .taso import MASKS_FILE, TasoMethod

log = logging.getLogger("taso_llm")


@dataclass
class SmoaArguments:
    smoa_rank: int = field(default=8, metadata={"help": "Total rank r, split across the subspaces (r // K each, the "
                                                        "first r mod K one more); parameters ≈ (r/K)(d_in + d_out)."})
    smoa_subspaces: int = field(
        default=2, metadata={"help": "K: groups of rows and columns (by energy-weighted singular index); each "
                                     "diagonal block is modulated, off-diagonal blocks are not."})
    smoa_alpha: float = field(default=8.0, metadata={"help": "Scale alpha of the update (alpha / r)."})


class SmoaMethod(AdapterFileMethod):
    name = "smoa"
    uses_masks = True
    args_class = SmoaArguments
    # exports_peft_lora stays False: (B A) ⊙ W is not low-rank in general

    def validate(self, shared, own: SmoaArguments, shapes, model_args=None) -> None:
        super().validate(shared, own, shapes, model_args)
        if own.smoa_subspaces < 1:
            raise ValueError(f"smoa_subspaces={own.smoa_subspaces}: must be at least 1")
        if own.smoa_rank < own.smoa_subspaces:
            raise ValueError(f"smoa_rank={own.smoa_rank}: must be at least smoa_subspaces={own.smoa_subspaces} "
                             "(every subspace needs rank 1 or more)")
        if not own.smoa_alpha > 0:
            raise ValueError(f"smoa_alpha={own.smoa_alpha}: must be positive")
        if shared.budget_scope != "matrix" or str(shared.budget) != "rank1":
            raise ValueError(f"budget={shared.budget!r}, budget_scope={shared.budget_scope!r}: method=smoa takes its "
                             "size from smoa_rank and smoa_subspaces ((r/K)(d_in + d_out) per matrix), not from the "
                             "budget; leave budget and budget_scope at their defaults")
        for name, (d_out, d_in) in shapes.items():
            if min(d_out, d_in) < own.smoa_subspaces:
                raise ValueError(f"smoa_subspaces={own.smoa_subspaces}: {name} ({d_out} x {d_in}) has too few rows "
                                 "or columns for that many groups")

    resume_check = TasoMethod.resume_check  # a resumed run reuses the groups it chose the first time

    def _reused_regions(self, shared, own: SmoaArguments, shapes):
        regions, header = load_fitting_masks(shared.masks_path, shapes)
        for name, region in regions.items():
            groups = len(region.extra.get("row_offsets", ())) - 1
            if region.structure != STRUCTURE or (groups, region.rank) != (own.smoa_subspaces, own.smoa_rank):
                raise ValueError(f"masks_path={shared.masks_path}: {name} is {region.structure!r} with {groups} "
                                 f"groups at rank {region.rank}; this run asks for {STRUCTURE!r} with smoa_subspaces="
                                 f"{own.smoa_subspaces}, smoa_rank={own.smoa_rank}")
        log.info("reusing SMoA groups from %s (model %s)", shared.masks_path, header.get("model"))
        return regions

    def prepare(self, model: nn.Module, shared, own: SmoaArguments, ctx: RunContext) -> Report:
        targets = find_targets(model, shared.target_modules)
        shapes = {name: layer_shape(m) for name, m in targets.items()}
        details: dict = {"importance_seconds": 0.0}
        layers: dict = {}
        if shared.masks_path:
            regions = self._reused_regions(shared, own, shapes)
            details["masks_reused_from"] = str(shared.masks_path)
        else:
            regions, layers, report = select_modulated_blocks(model, targets, own.smoa_subspaces, own.smoa_rank,
                                                              Backend.for_model(model), ctx.show_progress)
            details.update(report)
        masks_file = Path(ctx.output_dir) / MASKS_FILE
        if ctx.is_main:  # pending until the run commits (training starts), as TASO's
            save_masks(pending_path(masks_file), regions, ctx.model_id, extra={"smoa_config": vars(own)})
        wrapped = attach_updates(model, regions, alpha=own.smoa_alpha)  # reads each W once, for its frozen blocks
        frozen = [f"{name}.update.{b}" for name, w in wrapped.items() for b in w.update.frozen_buffer_names()]
        # The frozen blocks are the same on every rank (read from the same W): DDP must not broadcast them per step
        ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored + frozen)
        frozen_bytes = sum(b.numel() * b.element_size() for w in wrapped.values() for n, b in
                           w.update.named_buffers() if n.startswith("frozen_"))
        trainable = sum(modulated_params(r) for r in regions.values())
        # rows/cols: the K blocks together touch every row and column (plots.py draws them beside TASO's)
        layers = {name: {"shape": list(shapes[name]), "rows": shapes[name][0], "cols": shapes[name][1],
                         "groups": own.smoa_subspaces, "params": modulated_params(regions[name]),
                         **layers.get(name, {})} for name in shapes}
        details.update(masks_file=str(masks_file), frozen_block_bytes=frozen_bytes,
                       frozen_blocks="nf4" if any(w.update.quantized for w in wrapped.values()) else "dense")
        report = Report(trainable_params=trainable, lora_r1_params=sum(lora_params(s) for s in shapes.values()),
                        layers=layers, details=details)
        log.info("SMoA: %d trainable params on %d matrices (K=%d, r=%d; rank-1 LoRA: %d); frozen diagonal blocks "
                 "%.1f MB per rank (%s)", trainable, len(regions), own.smoa_subspaces, own.smoa_rank,
                 report.lora_r1_params, frozen_bytes / 2**20, details["frozen_blocks"])
        return report

    def equal_budget(self, rank: int) -> dict:
        """(r/K)(d_in + d_out) parameters per matrix: r = rank·K gives a rank-`rank` LoRA's count."""
        return {"own": {"smoa_rank": rank * SmoaArguments().smoa_subspaces}}

    def adapter_extra(self, shared, own: SmoaArguments) -> dict:
        return {"structure": STRUCTURE, "smoa_config": vars(own)}  # load_adapter reads the frozen blocks from the base
