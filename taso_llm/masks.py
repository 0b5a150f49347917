"""The masks file: every matrix's core rows/columns (or entries) as sorted int32 indices, plus metadata.

One `masks.safetensors` holds `<module>.rows` and `<module>.cols` for each adapted matrix, and in its metadata a
JSON header: format version, model id, per-matrix shapes, structure, rank, budget and the TASO config used. A later
run passes it as `masks_path` to reuse the structure without re-estimating importance.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .io import save_safetensors
from .regions import Region

MASKS_FORMAT = "taso-masks/1"


def save_masks(path: str | Path, regions: dict[str, Region], model_id: str, extra: dict | None = None) -> None:
    tensors, shapes, structures, ranks = {}, {}, {}, {}
    for name, r in regions.items():
        tensors[f"{name}.rows"] = r.rows.to(torch.int32)
        tensors[f"{name}.cols"] = r.cols.to(torch.int32)
        shapes[name], structures[name], ranks[name] = list(r.shape), r.structure, r.rank
    header = {"format": MASKS_FORMAT, "model": model_id, "shapes": shapes, "structures": structures,
              "ranks": ranks, **(extra or {})}
    save_safetensors(tensors, path, metadata={"taso": json.dumps(header)})


def load_masks(path: str | Path) -> tuple[dict[str, Region], dict]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"masks_path: no masks file at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "taso" not in meta:
            raise ValueError(f"{path}: not a taso masks file (no 'taso' metadata header)")
        header = json.loads(meta["taso"])
        if header.get("format") != MASKS_FORMAT:
            raise ValueError(f"{path}: masks format {header.get('format')!r}, expected {MASKS_FORMAT!r}")
        regions = {
            name: Region(header["structures"][name], tuple(shape), f.get_tensor(f"{name}.rows").long(),
                         f.get_tensor(f"{name}.cols").long(), rank=int(header["ranks"][name]))
            for name, shape in header["shapes"].items()
        }
    return regions, header


def check_masks_fit(regions: dict[str, Region], shapes: dict[str, tuple[int, int]], source: str) -> None:
    """Stop with the offending matrix named if saved masks don't fit the model they are reused on."""
    missing = sorted(set(shapes) - set(regions))
    extra = sorted(set(regions) - set(shapes))
    if missing or extra:
        raise ValueError(f"{source}: masks cover {len(regions)} matrices but the targets are {len(shapes)}; "
                         f"missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in shapes.items():
        if tuple(regions[name].shape) != tuple(shape):
            raise ValueError(f"{source}: {name} has shape {tuple(regions[name].shape)} in the masks, "
                             f"{tuple(shape)} in the model")
