"""Merging a sparse adapter into its base weights, and exporting it as a standard PEFT LoRA adapter.

Both run once, offline, and are the only places that build a dense ΔW.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .updates import delta_weight
from .wrap import iter_adapters
from .wrap import _set_submodule
from ..io import save_safetensors, write_json
from ..targets import dense_weight

log = logging.getLogger("taso_llm")


def _merged_linear(base: nn.Module, delta: torch.Tensor) -> nn.Module:
    """Add ΔW to the base weight. A 4-bit base is dequantized into a plain Linear first (it can't hold ΔW exactly)."""
    if getattr(base.weight, "quant_state", None) is not None:
        dtype = getattr(base, "compute_dtype", None) or torch.float32
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, dtype=dtype,
                           device=delta.device)
        with torch.no_grad():
            merged.weight.copy_(dense_weight(base).float() + delta)
            if base.bias is not None:
                merged.bias.copy_(base.bias)
        return merged
    with torch.no_grad():
        base.weight.add_(delta.to(base.weight.dtype))
    return base


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and remove the wrappers, leaving a plain HF model."""
    quantized = 0
    for name, wrapper in list(iter_adapters(model)):
        quantized += getattr(wrapper.base.weight, "quant_state", None) is not None
        delta = delta_weight(wrapper.update).to(wrapper.base.weight.device)
        _set_submodule(model, name, _merged_linear(wrapper.base, delta))
    if quantized:
        log.warning("merged %d adapters into dequantized copies of 4-bit layers: the merged layers are dense "
                    "(in the compute dtype) and the model is no longer 4-bit", quantized)
        if hasattr(model, "config"):
            model.config.quantization_config = None
            for attr in ("is_loaded_in_4bit", "is_quantized"):
                if hasattr(model, attr):
                    setattr(model, attr, False)
            model.hf_quantizer = None
            # build_trainer declared the 4-bit model as carrying (PEFT-like) adapters; it no longer does.
            model._hf_peft_config_loaded = False
    return model


def export_peft_lora(model: nn.Module, output_dir: str | Path, base_model: str) -> dict:
    """Write the adapters as one PEFT LoRA adapter with the same outputs.

    Each update is an exact LoRA (zero outside its core rows/columns). Ranks are padded with zeros to the largest
    one and scalings folded into B, so a single `r` and `lora_alpha = r` (scaling 1) describe every module.
    """
    from peft import LoraConfig

    factors = {name: w.update.lora_factors() for name, w in iter_adapters(model)}
    if not factors:
        raise ValueError("export_peft_lora: the model carries no taso adapters")
    rank = max(a.shape[0] for a, _, _ in factors.values())
    tensors = {}
    for name, (a, b, scaling) in factors.items():
        pad = rank - a.shape[0]
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).float()
        tensors[f"base_model.model.{name}.lora_B.weight"] = (
            torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1).float() * scaling)
    output_dir = Path(output_dir)
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=sorted(factors),
                        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model,
                        inference_mode=True)
    save_safetensors(tensors, output_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    as_json = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    write_json(output_dir / "adapter_config.json", as_json)
    return {"r": rank, "modules": len(factors)}


def standalone_model(model: nn.Module, adapter_dir: str | Path, model_args) -> nn.Module:
    """A model merge/export can read whole on one process: `model` itself unless it is sharded, else a fresh
    copy of the base on CPU (4-bit again if it was) with the adapter just written to `adapter_dir` loaded onto it.
    Call on the main process only, after the adapter was saved."""
    from ..distributed.backend import is_sharded

    if not is_sharded(model):
        return model
    from ..loading import load_model_and_tokenizer, no_zero_init

    log.info("the trained model is sharded: merging/exporting from a CPU copy of the base + %s", adapter_dir)
    with no_zero_init():
        base, _ = load_model_and_tokenizer(model_args, device_map="cpu")
    from .io import load_adapter

    return load_adapter(base, adapter_dir)
