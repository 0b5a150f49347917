"""Which linear layers a method adapts, and how to read a layer's dense weight whatever it is stored as."""

from __future__ import annotations

import torch
from torch import nn

# All linear projections of a LLaMA block.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_linear(module: nn.Module) -> bool:
    """nn.Linear and its quantized subclasses (bitsandbytes Linear4bit/8bit derive from nn.Linear)."""
    return isinstance(module, nn.Linear)


def find_targets(model: nn.Module, names: list[str] | tuple[str, ...]) -> dict[str, nn.Module]:
    """Map full module names to the linear layers whose last name component is in `names`.

    Raises before any heavy work if a requested name matches nothing, listing the names that do exist.
    """
    found: dict[str, nn.Module] = {}
    seen_suffixes: set[str] = set()
    for full_name, module in model.named_modules():
        if not is_linear(module) or full_name.endswith("lm_head"):
            continue
        suffix = full_name.rsplit(".", 1)[-1]
        seen_suffixes.add(suffix)
        if suffix in names:
            found[full_name] = module
    missing = [n for n in names if n not in seen_suffixes]
    if missing:
        raise ValueError(
            f"target_modules: {missing} match no linear layer of this model; "
            f"its linear layers are named {sorted(seen_suffixes)}"
        )
    return found


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) without touching the weight's storage (which may be 4-bit or sharded)."""
    return int(module.out_features), int(module.in_features)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense float tensor: dequantized for 4-bit layers.

    Only call this where the full weight is present on this rank (see distributed.gathered_weight for ZeRO-3).
    """
    weight = module.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, quant_state)
    return weight.data
