"""The local models: the embedded default (a tiny LLaMA-class model and an offline tokenizer) and what defines the
pretrained proxy of the method comparison and where it is cached.

Nothing here downloads. The tokenizer is a byte-level BPE trained in memory on a fixed corpus; the model is a
LlamaConfig built from code. Both are written to a local directory (atomically) and then loaded back through
`from_pretrained`, so the default run exercises exactly the loading path a hub model takes.

`model_name_or_path: taso-tiny` in a recipe resolves to that directory, `taso-proxy` to the pretrained proxy's
(see `resolve_model_path`). How the proxy is pretrained lives in taso_llm/proxy.py, which builds on this module; its
identity (config, pretraining settings, cache key) lives here, so that resolving the alias needs no import of the
trainer (this module imports nothing of the package: no import cycle).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_MODEL_ID = "taso-tiny"

# Llama-3-style chat template. The prompt rendered with add_generation_prompt=True is a token prefix of the prompt +
# completion rendering, which completion-only loss relies on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>"]

# Small on purpose: the full pipeline (importance, regions, training, export) runs in minutes on 2 CPU cores.
# num_key_value_heads < num_attention_heads so k/v projections have a different shape than q/o (as in LLaMA-3).
TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
TINY_VOCAB_SIZE = 1024
FORMAT_VERSION = 1


def _tokenizer_corpus() -> list[str]:
    """A fixed, varied corpus so the BPE merges cover English words, digits, code and punctuation."""
    words = (
        "the a an of to and in is it you that he was for on are with as his they be at one have this from or had by "
        "word but what some we can out other were all there when up use your how said each she which do their time "
        "if will way about many then them write would like so these her long make thing see him two has look more "
        "day could go come did number sound no most people my over know water than call first who may down side "
        "been now find any new work part take get place made live where after back little only round man year came "
        "show every good me give our under name very through just form sentence great think say help low line "
        "question answer total each cost price apples books friends buys sells left remaining how many more times "
        "instruction response input output function return def if else for while in range print list dict str int "
        "sum len max min sorted reverse append result value values string number numbers count even odd first last "
        "uppercase lowercase words letters sentence bullet points json format reply briefly exactly please"
    ).split()
    lines = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    lines += [f"{a} + {b} = {a + b}. {a} * {b} = {a * b}. #### {a * b}" for a in range(0, 60, 7) for b in range(3, 40, 9)]
    lines += ["def add(a, b):\n    return a + b\n", "assert f([1, 2, 3]) == 6\n", "for i in range(10):\n    x += i\n",
              '{"name": "value", "items": [1, 2, 3]}', "- first point\n- second point\n", "Answer: yes. Answer: no."]
    return lines * 3


def build_tokenizer(split_digits: bool = False):
    """Train the byte-level BPE in memory and wrap it as a PreTrainedTokenizerFast with the chat template.

    split_digits (the proxy's tokenizer): every digit becomes its own token before BPE. The BPE merged numbers
    irregularly (" 40" one token, " 27" two, "4821" as 4/8/21), so copying a number and carrying had to be learned
    per token pair; one token per digit makes both a small, regular skill (as in LLaMA-1 / Mistral). The merges are
    the same either way (trained without the split), so the default tokenizer is unchanged."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    if split_digits:
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|pad|>",
        model_max_length=TINY_CONFIG["max_position_embeddings"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(tokenizer, seed: int = 0, **overrides):
    """A randomly initialised LlamaForCausalLM sized to the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **{**TINY_CONFIG, **overrides},
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def default_cache_dir() -> Path:
    return Path(os.environ.get("TASO_LLM_CACHE", Path.home() / ".cache" / "taso_llm"))


def write_tiny_model(path: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Write tokenizer + model to `path` atomically (built in a temp dir, renamed into place)."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tok = build_tokenizer()
        model = build_model(tok, seed=seed, **overrides)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # another process won the race; its copy is identical
            if not (path / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_model_path(seed: int = 0, **overrides) -> Path:
    """The cached directory of the tiny model (built on first use). Keyed by everything that defines it."""
    key = json.dumps({"cfg": {**TINY_CONFIG, **overrides}, "seed": seed, "vocab": TINY_VOCAB_SIZE,
                      "v": FORMAT_VERSION}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return write_tiny_model(default_cache_dir() / f"{TINY_MODEL_ID}-{digest}", seed=seed, **overrides)


# ----------------------------------------------------------------------------------------------- the proxy's identity
PROXY_MODEL_ID = "taso-proxy"
# 3: facts and word problems inside one table (sums <= 30), 2000 steps; 2: pretraining text of sub-skills only (no Q/A layout,
# no composed word problems); digits split
PROXY_VERSION = 3
# ~5M parameters: the size at which a base pretrained for ~30 minutes on one CPU core copies a sentence's numbers
# into an equation and knows the facts up to 30 (99.5% of held-out ones), so that fine-tuning has sub-skills to compose (docs/comparison.md).
PROXY_CONFIG = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8,
                    num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                    tie_word_embeddings=False)
# Steps, not minutes, define the model (reproducible); taso_llm.proxy.pretrain's `max_minutes` only stops a run on a
# slow machine early (then its pretrain_log.json says so).
PROXY_PRETRAIN = dict(steps=2000, batch_size=16, seq_len=128, lr=3e-3, warmup=40, weight_decay=0.01, n_docs=40000,
                      seed=0)


def proxy_dir(config: dict | None = None, pretrain: dict | None = None) -> Path:
    """Where the proxy defined by these settings (defaults: PROXY_CONFIG, PROXY_PRETRAIN) is cached."""
    config, pretrain = {**PROXY_CONFIG, **(config or {})}, {**PROXY_PRETRAIN, **(pretrain or {})}
    key = json.dumps({"cfg": config, "pretrain": pretrain, "v": PROXY_VERSION}, sort_keys=True)
    return default_cache_dir() / f"{PROXY_MODEL_ID}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def cached_proxy_path() -> Path:
    """The default proxy's directory; it must have been pretrained (`python recipes/pretrain_proxy.py`)."""
    path = proxy_dir()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"the pretrained proxy {path} does not exist yet; build it with "
                                "`python recipes/pretrain_proxy.py` (about 30 minutes on one CPU core)")
    return path


def resolve_model_path(name_or_path: str) -> str:
    """Map the `taso-tiny` (built on first use) and `taso-proxy` (must have been pretrained) aliases to their local
    directories; anything else (hub id or path) passes through."""
    if name_or_path == PROXY_MODEL_ID:
        return str(cached_proxy_path())
    return str(tiny_model_path()) if name_or_path == TINY_MODEL_ID else name_or_path
