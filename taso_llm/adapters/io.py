"""Saving a trained sparse adapter and loading it onto a fresh base model.

Layout of an adapter directory:
  adapter_config.json        format, base model, structure, alpha, per-module shape/structure/rank
  adapter_model.safetensors  per adapted module `<name>.rows`, `<name>.cols` (int32) and its parameters
The indices travel with the values, so an adapter directory is self-contained (no masks file needed to load it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .wrap import attach_updates, iter_adapters
from ..distributed.backend import gathered_params, whole_tensor
from ..io import load_safetensors, save_safetensors, write_json
from ..sparse.regions import Region

ADAPTER_FORMAT = "taso-adapter/1"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_state(model: nn.Module, materialize=lambda t: t) -> dict[str, torch.Tensor]:
    """Indices and trainable values of every adapter as the file stores them: `<module>.<tensor>`, rows/cols as
    int32, on CPU. `materialize` turns a sharded tensor whole (gathered_adapter_state passes one)."""
    state = {}
    for name, wrapper in iter_adapters(model):
        indices = index_names(wrapper.update)
        for key, tensor in wrapper.update.state_dict().items():
            tensor = materialize(tensor).detach().cpu()
            state[f"{name}.{key}"] = tensor.to(torch.int32) if key in indices else tensor.clone()
    return state


def gathered_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter as its file stores it, whole on every rank. Collective: all ranks call it. Only the adapter is
    gathered (a few MB), never the frozen base: ZeRO-3 partitions through GatheredParameters, FSDP2 DTensors through
    full_tensor(); plain tensors (DDP, ZeRO-2, one process) pass through."""
    params = [p for _, w in iter_adapters(model) for p in w.update.parameters()]
    with gathered_params(params):
        return adapter_state(model, materialize=whole_tensor)


def index_names(update: nn.Module) -> list[str]:
    """An update's index vectors are its persistent buffers (adapters/updates.py registers them so). Non-persistent
    buffers are working copies rebuilt at attach (SMoA's frozen blocks of W): never saved, never compared."""
    saved = update.state_dict(keep_vars=True)
    return [key for key, _ in update.named_buffers() if key in saved]


def adapter_config(model: nn.Module, base_model: str, extra: dict | None = None) -> dict:
    """The config beside the weights. `alpha` is the updates' own scale (one per adapter: attach_updates sets it)."""
    modules, alphas = {}, set()
    for name, wrapper in iter_adapters(model):
        u = wrapper.update
        modules[name] = {"shape": list(u.shape), "structure": u.structure, "rank": getattr(u, "rank", 1),
                         "indices": index_names(u)}
        alphas.add(float(getattr(u, "alpha", 1.0)))
    return {"format": ADAPTER_FORMAT, "base_model_name_or_path": base_model,
            "alpha": max(alphas) if alphas else 1.0, "modules": modules, **(extra or {})}


def save_adapter(model: nn.Module, output_dir: str | Path, base_model: str, extra: dict | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the adapter. `state` lets a distributed caller pass values it gathered from shards."""
    output_dir = Path(output_dir)
    save_safetensors(state if state is not None else adapter_state(model), output_dir / WEIGHTS_NAME,
                     metadata={"format": ADAPTER_FORMAT})
    write_json(output_dir / CONFIG_NAME, adapter_config(model, base_model, extra))


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {CONFIG_NAME}; is this a taso adapter directory?")
    config = json.loads(cfg_path.read_text())
    if config.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{cfg_path}: format {config.get('format')!r}, expected {ADAPTER_FORMAT!r} "
                         "(a PEFT adapter loads with peft.PeftModel.from_pretrained)")
    return config, load_safetensors(adapter_dir / WEIGHTS_NAME, what="adapter weights",
                                    fix="re-save the adapter (re-run training, or resume from an intact checkpoint)")


def regions_from_state(config: dict, state: dict[str, torch.Tensor]) -> dict[str, Region]:
    regions = {}
    for name, m in config["modules"].items():
        keys = m.get("indices", ["rows", "cols"])  # adapters written before index names were recorded
        missing = [k for k in keys if f"{name}.{k}" not in state]
        if missing:
            raise ValueError(f"adapter file has no {[f'{name}.{k}' for k in missing]}: the file is incomplete or "
                             "does not belong to this adapter_config.json")
        regions[name] = Region.from_indices(m["structure"], m["shape"], {k: state[f"{name}.{k}"] for k in keys},
                                            rank=int(m["rank"]))
    return regions


def load_adapter(model: nn.Module, adapter_dir: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Attach a saved adapter to `model` (a fresh base) and load its values exactly."""
    config, state = read_adapter(adapter_dir)
    for name in config["modules"]:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{adapter_dir}: adapter module {name} does not exist in this base model") from None
    wrapped = attach_updates(model, regions_from_state(config, state), alpha=config["alpha"], dtype=dtype)
    for name, wrapper in wrapped.items():
        indices = index_names(wrapper.update)
        keys = [k for k in wrapper.update.state_dict() if k not in indices]
        missing = [f"{name}.{k}" for k in keys if f"{name}.{k}" not in state]
        if missing:
            raise ValueError(f"{adapter_dir}: the adapter file lacks {missing[:3]}; it is incomplete or was written "
                             "by another version (re-export it from the run's checkpoint)")
        wrapper.update.load_state_dict({k: state[f"{name}.{k}"] for k in keys}, strict=False)
    return model
