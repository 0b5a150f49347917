"""Loading the base model and tokenizer, and reading target shapes from a weightless (meta) copy.

Before anything is built, the model source is checked: a local path that does not exist or a
corrupt weights file is named, rather than reported as a bad Hugging Face repo id or a bare safetensors error.
TRL's `chat_template_path` is applied at load time (as SFTTrainer applies it), so the data can be prepared and
measured with the template the trainer will use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from .io import read_safetensors_header
from .targets import find_targets, layer_shape
from .tiny import default_cache_dir, resolve_model_path

log = logging.getLogger("taso_llm")

# What a Hugging Face repo id can look like ("gpt2", "meta-llama/Llama-3.1-8B"); anything else is meant as a path.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def looks_like_local_path(name: str) -> bool:
    return (name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.count("/") > 1
            or not HUB_ID.fullmatch(name))


def is_jinja_file(path: str) -> bool:
    """TRL's test for a chat_template_path that is a template file rather than a tokenizer to copy it from."""
    return os.path.isfile(path) and path.endswith((".jinja", ".j2"))


def from_pretrained_named(loader, name_or_path: str, option: str, **kwargs):
    """`loader.from_pretrained`, with Hugging Face's "Repo id must be in the form..." / "couldn't connect" errors
    said in terms of what was asked: no such local directory, and not loadable as a repo id either."""
    try:
        return loader.from_pretrained(name_or_path, **kwargs)
    except OSError as err:
        local = Path(name_or_path).expanduser()
        if local.is_dir():
            raise
        raise OSError(f"{option}={name_or_path!r}: no local directory {local.resolve()}, and it could not be loaded "
                      f"as a Hugging Face repo id ({str(err).splitlines()[0]})") from err


def weights_fix(model_dir: Path) -> str:
    """What to do about a corrupt weights file, by where the model directory lives."""
    if default_cache_dir().resolve() in model_dir.resolve().parents:
        return f"delete the cache entry {model_dir} (taso_llm rebuilds it on next use)"
    if "snapshots" in model_dir.parts:  # the Hugging Face hub cache: models--org--name/snapshots/<sha>
        repo_dir = model_dir.parents[1]
        return f"delete the cache entry {repo_dir} (or run `hf cache delete`) and download the model again"
    return f"re-save or re-download the model into {model_dir}"


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The hub cache's local copy of a repo, if there is one (no network)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # not cached, or not a valid repo id: from_pretrained will say which
        return None


def check_model_source(name_or_path: str, revision: str | None = None, weights: bool = True) -> None:
    """Cheap checks before any weight is read: a local path must be a model directory, and (weights=True) every
    safetensors file of it, or of the hub cache's copy, must be complete (headers and sizes only)."""
    local = Path(name_or_path).expanduser()
    if local.exists() and not local.is_dir():
        raise NotADirectoryError(f"model_name_or_path={name_or_path!r}: {local} is a file; expected the directory "
                                 "save_pretrained wrote, or a Hugging Face repo id")
    if not local.exists() and looks_like_local_path(name_or_path):
        raise FileNotFoundError(f"model_name_or_path={name_or_path!r}: no such directory ({local.resolve()}); give "
                                "an existing model directory or a Hugging Face repo id such as 'org/model'")
    if local.is_dir() and not (local / "config.json").is_file():
        raise FileNotFoundError(f"model_name_or_path={name_or_path!r}: {local} has no config.json; expected the "
                                "directory save_pretrained wrote")
    if not weights:
        return
    model_dir = local if local.is_dir() else cached_snapshot(name_or_path, revision)
    for file in sorted(model_dir.glob("*.safetensors")) if model_dir else []:
        read_safetensors_header(file, what="model weights", fix=weights_fix(model_dir))


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

    check_model_source(model_path, revision)
    config = from_pretrained_named(AutoConfig, model_path, "model_name_or_path", revision=revision)
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


def apply_chat_template_path(tokenizer, source: str) -> None:
    """TRL's `SFTConfig.chat_template_path`, tokenizer side: a .jinja/.j2 file is the template itself; anything else
    is a tokenizer (local directory or hub id) whose template, added tokens and eos token are copied, as
    `trl.clone_chat_template` does (the model side, resizing the embeddings, is in load_model_and_tokenizer)."""
    from transformers import AutoTokenizer

    if is_jinja_file(source):
        tokenizer.chat_template = Path(source).read_text(encoding="utf-8")
        return
    if Path(source).is_file():
        raise ValueError(f"chat_template_path={source!r}: a file must be a Jinja template ending in .jinja or .j2; "
                         "otherwise give a tokenizer directory or hub id whose chat template to use")
    if looks_like_local_path(source) and not Path(source).expanduser().is_dir():
        raise FileNotFoundError(f"chat_template_path={source!r}: no such file or directory")
    donor = from_pretrained_named(AutoTokenizer, source, "chat_template_path")
    if not donor.chat_template:
        raise ValueError(f"chat_template_path={source!r}: that tokenizer has no chat template")
    tokenizer.chat_template = donor.get_chat_template()
    vocab = tokenizer.get_vocab()
    tokenizer.add_tokens([token for token in donor.added_tokens_decoder.values() if token.content not in vocab])
    tokenizer.eos_token = donor.eos_token


def load_tokenizer(model_args, chat_template_path: str | None = None):
    """The tokenizer alone (cheap): data preparation needs it, and whether it has a chat template, before the model."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model_args.model_name_or_path)
    check_model_source(path, model_args.model_revision, weights=False)
    tokenizer = from_pretrained_named(AutoTokenizer, path, "model_name_or_path", revision=model_args.model_revision)
    if chat_template_path:
        apply_chat_template_path(tokenizer, chat_template_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(model_args, device_map=None, chat_template_path: str | None = None,
                             tokenizer=None) -> tuple[nn.Module, object]:
    """`tokenizer`: one already returned by load_tokenizer (with the same chat_template_path), to load it once."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model_args.model_name_or_path)
    check_model_source(path, model_args.model_revision)
    dtype = torch_dtype(model_args.dtype)
    if tokenizer is None:
        tokenizer = load_tokenizer(model_args, chat_template_path)
    kwargs = dict(revision=model_args.model_revision, dtype=dtype, attn_implementation=model_args.attn_implementation)
    qconfig = quantization_config(model_args, dtype if dtype != "auto" else torch.float32)
    if qconfig is not None:
        kwargs.update(quantization_config=qconfig, device_map=device_map or _quantized_device_map())
    model = from_pretrained_named(AutoModelForCausalLM, path, "model_name_or_path",
                                  **{k: v for k, v in kwargs.items() if v is not None})
    if chat_template_path and not is_jinja_file(chat_template_path):
        from trl import clone_chat_template

        # The tokenizer already has the donor's tokens; this resizes the embeddings to match. SFTTrainer repeats the
        # call when SFTConfig.chat_template_path is set, which is then a no-op (same tokens, same size).
        model, tokenizer, _ = clone_chat_template(model, tokenizer, chat_template_path)
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
