"""TASO: estimate task importance, choose core regions under the budget, attach sparse updates.

Stages (each its own module): importance.py → regions.py → masks.py → adapters/. This file only glues them and
reports what was chosen. With more than one process (torch.distributed initialized, world size > 1) the distributed
path is the normal one: each rank scores its share of the calibration batches (the `calibration` callable must yield
this rank's batches, calibration.py), owners reduce and choose, masks are all-gathered (distributed.py). Every rank
returns the same regions; only `is_main` writes the masks file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable

from ..adapters import attach_updates
from ..adapters_io import save_adapter
from ..config import TasoArguments, lr_multiplier, validate_taso_args
from .. import distributed
from ..importance import estimate_importance
from ..masks import check_masks_fit, load_masks, save_masks
from ..regions import choose_region, lora_params, mass_shares, parse_budget
from ..targets import find_targets, layer_shape

log = logging.getLogger("taso_llm")
MASKS_FILE = "masks.safetensors"


def validate(args: TasoArguments, shapes: dict[str, tuple[int, int]], model_args=None) -> None:
    validate_taso_args(args, shapes)


def choose_regions(stats: dict, args: TasoArguments) -> dict:
    """Regions of the matrices in `stats`: all of them on one process, the owned ones on a distributed rank."""
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


def _layer_info(stats, region) -> dict:
    return {"captured_share": _captured_share(stats, region),
            "top_rows_share": float(mass_shares(stats.row)[1][len(region.rows) - 1])}


def select_regions(model, targets: dict, args: TasoArguments, batches: Iterable[dict], num_batches: int | None,
                   weight_fn: Callable = distributed.gathered_weight, show_progress: bool = True,
                   keep_stats: bool = False) -> tuple[dict, dict, dict]:
    """Importance → regions, on one process or many. Returns (regions, per-layer info, report).

    Every rank gets all regions. With `keep_stats` the report carries the reduced statistics ("stats": those of
    all matrices on one process, of the owned matrices on a distributed rank), for tests and benchmarks."""
    rank, world = distributed.rank_and_world()
    keep = "full" if args.needs_full_importance() else "rowcol"
    with distributed.zero3_forward(model):
        result = estimate_importance(model, targets, batches, keep=keep,
                                     abs_per_batch=args.importance_abs == "per_batch", weight_fn=weight_fn,
                                     num_batches=num_batches, show_progress=show_progress and rank == 0,
                                     per_batch=world > 1 and keep == "rowcol", finalize=world == 1,
                                     checkpointing=args.importance_checkpointing)
        if world == 1:
            stats = result.stats
        else:  # the weight gathers of after_sum finalization need the ZeRO-3 hooks' context too
            owners = distributed.assign_owners({n: s.shape for n, s in result.stats.items()}, world)
            stats = distributed.reduce_to_owners(result.stats, owners, targets, weight_fn)
    report = {"importance_seconds": result.seconds, "importance_batches": result.batches,
              "importance_tokens": result.tokens, "importance_world_size": world}
    regions = choose_regions(stats, args)
    info = {name: _layer_info(stats[name], r) for name, r in regions.items()}
    if world > 1:
        shapes = {name: s.shape for name, s in result.stats.items()}
        regions = distributed.share_regions(regions, owners, shapes, args.structure)
        info = distributed.share_object(info, owners)
        report["importance_batches"], report["importance_tokens"] = distributed.all_reduce_sum(
            [result.batches, result.tokens])
    if keep_stats:
        report["stats"] = stats
    return regions, info, report


def prepare(model, args: TasoArguments, calibration: Callable[[], Iterable[dict]], num_batches: int,
            output_dir: str | Path, model_id: str, is_main: bool = True,
            weight_fn: Callable = distributed.gathered_weight, show_progress: bool = True, **_) -> dict:
    """Select the adapter's structure and attach it to `model` in place. Returns the report for metrics.json.

    `calibration()` yields this rank's calibration batches; `num_batches` is only for the progress bar."""
    targets = find_targets(model, args.target_modules)
    shapes = {name: layer_shape(m) for name, m in targets.items()}
    masks_file = Path(output_dir) / MASKS_FILE
    report: dict = {"importance_seconds": 0.0, "importance_batches": 0, "importance_tokens": 0}
    info: dict = {}
    if args.masks_path:
        regions, header = load_masks(args.masks_path)
        check_masks_fit(regions, shapes, args.masks_path)
        report["masks_reused_from"] = str(args.masks_path)
        log.info("reusing masks from %s (model %s)", args.masks_path, header.get("model"))
    else:
        regions, info, selected = select_regions(model, targets, args, calibration(), num_batches, weight_fn,
                                                 show_progress)
        report.update(selected)
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
                       **info.get(name, {})}
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
