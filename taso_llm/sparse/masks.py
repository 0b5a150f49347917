"""The masks file: every matrix's core rows/columns (or entries) as sorted int32 indices, plus metadata.

One `masks.safetensors` holds each adapted matrix's index vectors (`<module>.rows`, `<module>.cols`, and any other
the structure names), and in its metadata a JSON header: format version, model id, per-matrix shapes, structure,
rank and index names, the matrices the budget left unwrapped, and the method config used. A later
run passes it as `masks_path` to reuse the structure without re-estimating importance.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..io import read_safetensors_header, save_safetensors
from .regions import Region

MASKS_FORMAT = "taso-masks/1"


def save_masks(path: str | Path, regions: dict[str, Region], model_id: str, extra: dict | None = None,
               unwrapped: list[str] | None = None) -> None:
    """`unwrapped`: target matrices the budget allocation gave no parameters (recorded so a reuse can check them)."""
    tensors, shapes, structures, ranks, indices = {}, {}, {}, {}, {}
    for name, r in regions.items():
        for key, index in r.index_tensors().items():
            tensors[f"{name}.{key}"] = index.to(torch.int32)
        shapes[name], structures[name], ranks[name] = list(r.shape), r.structure, r.rank
        indices[name] = list(r.index_tensors())
    header = {"format": MASKS_FORMAT, "model": model_id, "shapes": shapes, "structures": structures,
              "ranks": ranks, "indices": indices, "unwrapped": sorted(unwrapped or []), **(extra or {})}
    save_safetensors(tensors, path, metadata={"taso": json.dumps(header)})


def load_masks(path: str | Path) -> tuple[dict[str, Region], dict]:
    from safetensors import safe_open

    path = Path(path)
    meta = read_safetensors_header(path, what="masks file", fix="delete it, or drop masks_path to select masks again")
    with safe_open(str(path), framework="pt") as f:
        if "taso" not in meta:
            raise ValueError(f"{path}: not a taso masks file (no 'taso' metadata header)")
        header = json.loads(meta["taso"])
        if header.get("format") != MASKS_FORMAT:
            raise ValueError(f"{path}: masks format {header.get('format')!r}, expected {MASKS_FORMAT!r}")
        names = set(f.keys())
        regions = {}
        for name, shape in header["shapes"].items():
            keys = header.get("indices", {}).get(name, ["rows", "cols"])
            missing = [f"{name}.{k}" for k in keys if f"{name}.{k}" not in names]
            if missing:
                raise ValueError(f"{path}: masks file lacks {missing[:3]}; it is incomplete (re-run importance)")
            regions[name] = Region.from_indices(header["structures"][name], shape,
                                                {k: f.get_tensor(f"{name}.{k}") for k in keys},
                                                rank=int(header["ranks"][name]))
    return regions, header


def check_masks_fit(regions: dict[str, Region], shapes: dict[str, tuple[int, int]], source: str,
                    unwrapped: list[str] | tuple = ()) -> None:
    """Stop with the offending matrix named if saved masks don't fit the model they are reused on. Matrices the
    allocation left `unwrapped` (zero parameters) are targets without a region."""
    missing = sorted(set(shapes) - set(regions) - set(unwrapped))
    extra = sorted(set(regions) - set(shapes))
    if missing or extra:
        raise ValueError(f"{source}: masks cover {len(regions)} matrices but the targets are {len(shapes)}; "
                         f"missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in shapes.items():
        if name in regions and tuple(regions[name].shape) != tuple(shape):
            raise ValueError(f"{source}: {name} has shape {tuple(regions[name].shape)} in the masks, "
                             f"{tuple(shape)} in the model")


def load_fitting_masks(path: str | Path, shapes: dict[str, tuple[int, int]]) -> tuple[dict[str, Region], dict]:
    """load_masks + check_masks_fit: the regions of a masks file that fits these target shapes, and its header."""
    regions, header = load_masks(path)
    check_masks_fit(regions, shapes, str(path), unwrapped=header.get("unwrapped", ()))
    return regions, header
