"""TASO: estimate task importance, choose core regions under the budget, attach sparse updates.

Stages (each its own module): importance.py → regions.py → masks.py → adapters/. This file only glues them and
reports what was chosen. Distributed runs pass `reduce_stats` (distributed.py) to combine per-rank statistics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable

from ..adapters import attach_updates
from ..adapters_io import save_adapter
from ..config import TasoArguments, lr_multiplier, validate_taso_args
from ..importance import estimate_importance
from ..masks import check_masks_fit, load_masks, save_masks
from ..regions import choose_region, lora_params, mass_shares, parse_budget
from ..targets import find_targets, layer_shape

log = logging.getLogger("taso_llm")
MASKS_FILE = "masks.safetensors"


def validate(args: TasoArguments, shapes: dict[str, tuple[int, int]]) -> None:
    validate_taso_args(args, shapes)


def choose_regions(stats: dict, args: TasoArguments) -> dict:
    return {name: choose_region(s.row, s.col, s.shape, args.structure, parse_budget(args.budget, s.shape),
                                rank=args.adapter_rank, full=s.full)
            for name, s in stats.items()}


def _captured_share(stats, region) -> float:
    """Share of the matrix's importance mass estimated to fall in the chosen region (row share × column share)."""
    row_total, col_total = float(stats.row.sum()), float(stats.col.sum())
    if row_total <= 0 or col_total <= 0:
        return 0.0
    if region.structure == "entries" and stats.full is not None:
        return float(stats.full[region.rows, region.cols].sum()) / float(stats.full.sum())
    return float(stats.row[region.rows].sum() / row_total * stats.col[region.cols].sum() / col_total)


def prepare(model, args: TasoArguments, calibration: Callable[[], Iterable[dict]], num_batches: int,
            output_dir: str | Path, model_id: str, is_main: bool = True,
            reduce_stats: Callable | None = None, weight_fn=None, show_progress: bool = True) -> dict:
    """Select the adapter's structure and attach it to `model` in place. Returns the report for metrics.json."""
    targets = find_targets(model, args.target_modules)
    shapes = {name: layer_shape(m) for name, m in targets.items()}
    masks_file = Path(output_dir) / MASKS_FILE
    report: dict = {"importance_seconds": 0.0, "importance_batches": 0, "importance_tokens": 0}
    stats = None
    if args.masks_path:
        regions, header = load_masks(args.masks_path)
        check_masks_fit(regions, shapes, args.masks_path)
        report["masks_reused_from"] = str(args.masks_path)
        log.info("reusing masks from %s (model %s)", args.masks_path, header.get("model"))
    else:
        kwargs = {"weight_fn": weight_fn} if weight_fn is not None else {}
        result = estimate_importance(model, targets, calibration(), keep="full" if args.needs_full_importance()
                                     else "rowcol", abs_per_batch=args.importance_abs == "per_batch",
                                     num_batches=num_batches, show_progress=show_progress, **kwargs)
        stats = reduce_stats(result.stats) if reduce_stats is not None else result.stats
        regions = choose_regions(stats, args)
        report.update(importance_seconds=result.seconds, importance_batches=result.batches,
                      importance_tokens=result.tokens)
    if is_main:
        save_masks(masks_file, regions, model_id, extra={"budget": args.budget, "structure": args.structure,
                                                        "adapter_rank": args.adapter_rank,
                                                        "taso_config": vars(args)})
    attach_updates(model, regions, alpha=args.alpha)
    trainable = sum(r.num_params() for r in regions.values())
    lora1 = sum(lora_params(s) for s in shapes.values())
    report.update(
        masks_file=str(masks_file), trainable_params=trainable, lora_r1_params=lora1,
        trainable_vs_lora_r1=trainable / lora1, lr_multiplier=lr_multiplier(args.lr_scaling, regions),
        layers={name: {"shape": list(r.shape), "rows": len(r.rows), "cols": len(r.cols), "params": r.num_params(),
                       **({"captured_share": _captured_share(stats[name], r),
                           "top_rows_share": float(mass_shares(stats[name].row)[1][len(r.rows) - 1])}
                          if stats is not None else {})}
                for name, r in regions.items()},
    )
    log.info("TASO: %d trainable params on %d matrices (rank-1 LoRA on the same modules: %d, ratio %.3f); "
             "structure=%s rank=%d, lr x%.2f", trainable, len(regions), lora1, trainable / lora1,
             args.structure, args.adapter_rank, report["lr_multiplier"])
    return report


def save(model, output_dir: str | Path, args: TasoArguments, model_id: str, state=None) -> None:
    save_adapter(model, output_dir, base_model=model_id, alpha=args.alpha, state=state,
                 extra={"method": "taso", "structure": args.structure, "budget": args.budget,
                        "target_modules": list(args.target_modules)})
