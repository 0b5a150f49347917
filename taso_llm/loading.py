"""Loading the base model and tokenizer, and reading target shapes from a weightless (meta) copy."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from .targets import find_targets, layer_shape
from .tiny import resolve_model_path

log = logging.getLogger("taso_llm")


def torch_dtype(name: str | None) -> torch.dtype | str | None:
    if name in (None, "auto"):
        return name
    try:
        return getattr(torch, name)
    except AttributeError:
        raise ValueError(f"dtype={name!r}: expected auto, float32, bfloat16 or float16") from None


@contextlib.contextmanager
def no_zero_init():
    """Build a model whole even under ZeRO-3 (transformers would otherwise partition it with zero.Init): the
    meta-device copy for shapes, the CPU copy that merge/export read."""
    import transformers.integrations.deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def target_shapes(model_path: str, target_modules: list[str], revision: str | None = None) -> dict[str, tuple]:
    """Names and (d_out, d_in) of the target layers, from the config alone: the model is built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, revision=revision)
    with no_zero_init(), torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    return {name: layer_shape(m) for name, m in find_targets(meta, target_modules).items()}


def quantization_config(model_args, load_dtype):
    """nf4 4-bit base (QLoRA style). The storage dtype equals the load dtype so ZeRO-3 / FSDP can shard it."""
    if not model_args.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    storage = model_args.bnb_4bit_quant_storage or (load_dtype if isinstance(load_dtype, torch.dtype) else None)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=load_dtype if isinstance(load_dtype, torch.dtype) else torch.float32,
        bnb_4bit_quant_storage=storage or torch.float32,
    )


def _quantized_device_map():
    """bitsandbytes quantizes when weights move to their device, so a 4-bit base needs one at load time: this
    rank's GPU (or the CPU). Not under ZeRO-3: zero.Init places and partitions the weights itself."""
    from accelerate import PartialState
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return None
    return {"": PartialState().local_process_index} if torch.cuda.is_available() else "cpu"


def load_model_and_tokenizer(model_args, device_map=None) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model_args.model_name_or_path)
    dtype = torch_dtype(model_args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = dict(revision=model_args.model_revision, dtype=dtype, attn_implementation=model_args.attn_implementation)
    qconfig = quantization_config(model_args, dtype if dtype != "auto" else torch.float32)
    if qconfig is not None:
        kwargs.update(quantization_config=qconfig, device_map=device_map or _quantized_device_map())
    model = AutoModelForCausalLM.from_pretrained(path, **{k: v for k, v in kwargs.items() if v is not None})
    if qconfig is not None:
        _no_cpu_packing(model)
    model.config.use_cache = False
    log.info("loaded %s (%s, %.1fM params%s)", model_args.model_name_or_path, model.dtype,
             sum(p.numel() for p in model.parameters()) / 1e6, ", 4-bit nf4" if qconfig else "")
    return model, tokenizer


def _no_cpu_packing(model) -> None:
    """bitsandbytes repacks 4-bit weights for its CPU kernel on the first no-grad forward (evaluation); that repack
    needs both dims divisible by the quant block size (64) and fails otherwise (taso-tiny's 176, the proxy's 224).
    Keep the plain dequantize path, which handles every shape."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
