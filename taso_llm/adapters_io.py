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

from .adapters import attach_updates, iter_adapters
from .io import save_safetensors, write_json
from .regions import Region

ADAPTER_FORMAT = "taso-adapter/1"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_state(model: nn.Module, materialize=lambda t: t) -> dict[str, torch.Tensor]:
    """Indices and trainable values of every adapter as the file stores them: `<module>.<tensor>`, rows/cols as
    int32, on CPU. `materialize` turns a sharded tensor whole (distributed.gathered_adapter_state passes one)."""
    state = {}
    for name, wrapper in iter_adapters(model):
        for key, tensor in wrapper.update.state_dict().items():
            tensor = materialize(tensor).detach().cpu()
            state[f"{name}.{key}"] = tensor.to(torch.int32) if key in ("rows", "cols") else tensor.clone()
    return state


def adapter_config(model: nn.Module, base_model: str, alpha: float, extra: dict | None = None) -> dict:
    modules = {}
    for name, wrapper in iter_adapters(model):
        u = wrapper.update
        modules[name] = {"shape": list(u.shape), "structure": u.structure, "rank": getattr(u, "rank", 1)}
    return {"format": ADAPTER_FORMAT, "base_model_name_or_path": base_model, "alpha": alpha,
            "modules": modules, **(extra or {})}


def save_adapter(model: nn.Module, output_dir: str | Path, base_model: str, alpha: float,
                 extra: dict | None = None, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the adapter. `state` lets a distributed caller pass values it gathered from shards."""
    output_dir = Path(output_dir)
    save_safetensors(state if state is not None else adapter_state(model), output_dir / WEIGHTS_NAME,
                     metadata={"format": ADAPTER_FORMAT})
    write_json(output_dir / CONFIG_NAME, adapter_config(model, base_model, alpha, extra))


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {CONFIG_NAME}; is this a taso adapter directory?")
    config = json.loads(cfg_path.read_text())
    if config.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{cfg_path}: format {config.get('format')!r}, expected {ADAPTER_FORMAT!r} "
                         "(a PEFT adapter loads with peft.PeftModel.from_pretrained)")
    return config, load_file(str(adapter_dir / WEIGHTS_NAME))


def regions_from_state(config: dict, state: dict[str, torch.Tensor]) -> dict[str, Region]:
    return {
        name: Region(m["structure"], tuple(m["shape"]), state[f"{name}.rows"].long(), state[f"{name}.cols"].long(),
                     rank=int(m["rank"]))
        for name, m in config["modules"].items()
    }


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
        own = {k: state[f"{name}.{k}"] for k in wrapper.update.state_dict() if k not in ("rows", "cols")}
        wrapper.update.load_state_dict(own, strict=False)
    return model
