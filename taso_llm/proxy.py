"""The pretrained proxy base: a small LLaMA-class model that has learned something, built on CPU in minutes.

Why: a randomly initialised model cannot tell fine-tuning methods apart (every method just learns the output format),
and a trial with a 3M base pretrained briefly scored <= 2% exact match on word problems for every method (the format
was learned, the numbers were copied wrong). So the proxy is pretrained on plain text that teaches the sub-skills the
SFT tasks compose (`synthetic.pretraining_text`: copying numbers, arithmetic facts, worked word problems, small
functions, output formats); fine-tuning then mostly has to map those skills onto the chat format and the answer marker,
and the quality of that mapping is what separates methods.

Tokenizer: `taso_llm.tiny.build_tokenizer` with one change: digits are split into single tokens before BPE. The tiny
BPE merged numbers irregularly (" 40" one token, " 27" two, "4821" as 4/8/21), so "copy the number" and carries
had to be learned per token pair; one token per digit makes both a small, regular skill (as in LLaMA-1 / Mistral).

The model is cached under TASO_LLM_CACHE as `taso-proxy-<hash of everything that defines it>`, written atomically
(temp dir + rename), with `pretrain_log.json` beside the weights. `model_name_or_path: taso-proxy` resolves to it
(taso_llm.tiny.resolve_model_path).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from .io import write_json, write_text
from .tiny import default_cache_dir

log = logging.getLogger("taso_llm")
PROXY_MODEL_ID = "taso-proxy"
PROXY_VERSION = 1

# ~3.8M parameters, near the trial's second base (4.8M; LoRA r=1 74% vs r=16 80%), shrunk so that 300 steps fit
# in 10 minutes on one contended CPU core (one thread: two threads on two shared cores ran 3x slower per step).
PROXY_CONFIG = dict(hidden_size=224, intermediate_size=608, num_hidden_layers=6, num_attention_heads=8,
                    num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                    tie_word_embeddings=False)
# Steps, not minutes, define the model (reproducible); `max_minutes` only stops a run on a slow machine early.
PRETRAIN = dict(steps=300, batch_size=16, seq_len=128, lr=3e-3, warmup=20, weight_decay=0.01, n_docs=20000,
                seed=0)


def build_proxy_tokenizer():
    from tokenizers import pre_tokenizers

    from .tiny import build_tokenizer

    tok = build_tokenizer()
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return tok


def proxy_key(config: dict, pretrain: dict) -> str:
    key = json.dumps({"cfg": config, "pretrain": pretrain, "v": PROXY_VERSION}, sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def proxy_dir(config: dict | None = None, pretrain: dict | None = None) -> Path:
    config, pretrain = {**PROXY_CONFIG, **(config or {})}, {**PRETRAIN, **(pretrain or {})}
    return default_cache_dir() / f"{PROXY_MODEL_ID}-{proxy_key(config, pretrain)}"


def _packed_batches(tokenizer, docs: list[str], seq_len: int, batch_size: int, seed: int):
    """Endless batches of `seq_len` windows cut from the documents joined with BOS ... EOS, reshuffled per epoch."""
    import torch

    ids: list[int] = []
    for doc in docs:
        ids += [tokenizer.bos_token_id, *tokenizer(doc, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    n = len(ids) // seq_len
    windows = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            yield windows[order[start:start + batch_size]]


def pretrain(out: str | os.PathLike | None = None, config: dict | None = None, pretrain: dict | None = None,
             max_minutes: float | None = None) -> Path:
    """Pretrain the proxy (or return the cached one). Returns its directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .data.synthetic import pretraining_text

    config, hp = {**PROXY_CONFIG, **(config or {})}, {**PRETRAIN, **(pretrain or {})}
    out = Path(out) if out is not None else proxy_dir(config, hp)
    if (out / "config.json").exists():
        return out
    tok = build_proxy_tokenizer()
    torch.manual_seed(hp["seed"])
    model = LlamaForCausalLM(LlamaConfig(**config, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    n_params = sum(p.numel() for p in model.parameters())
    batches = _packed_batches(tok, pretraining_text(hp["n_docs"], hp["seed"]), hp["seq_len"], hp["batch_size"],
                              hp["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"], betas=(0.9, 0.95))
    # Linear warmup then cosine to 10%: the usual LM schedule; the tail at low LR matters for exact digits.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / hp["warmup"]) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / hp["steps"])))))
    model.train()
    curve, start, step = [], time.perf_counter(), 0
    for step in range(1, hp["steps"] + 1):
        batch = next(batches)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == 1:
            curve.append((step, round(loss.item(), 4)))
            log.info("proxy pretraining step %d/%d loss %.3f (%.0fs)", step, hp["steps"], loss.item(),
                     time.perf_counter() - start)
        if max_minutes is not None and time.perf_counter() - start > 60 * max_minutes:
            log.warning("proxy pretraining stopped at step %d: max_minutes=%s reached", step, max_minutes)
            break
    seconds = time.perf_counter() - start
    _write_atomically(out, model, tok, {"params": n_params, "config": config, "pretrain": hp, "steps_done": step,
                                        "seconds": seconds, "tokens": step * hp["batch_size"] * hp["seq_len"],
                                        "loss_curve": curve})
    return out


def _write_atomically(out: Path, model, tokenizer, info: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "pretrain_log.json", info)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first; keep its copy
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_proxy_path() -> Path:
    """The default proxy's directory; it must have been pretrained (`python recipes/pretrain_proxy.py`)."""
    path = proxy_dir()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"the pretrained proxy {path} does not exist yet; build it with "
                                "`python recipes/pretrain_proxy.py` (about 10 minutes on 2 CPU cores)")
    return path


# ------------------------------------------------------------------------------------------- fine-tuning data
def task_rows(task: str, n: int, seed: int) -> list[dict]:
    from .data import synthetic

    make = {"math": synthetic.math_word_problems, "code": synthetic.code_tasks,
            "instruct": synthetic.instruct_tasks}
    if task not in make:
        raise ValueError(f"task={task!r}: expected one of {sorted(make)}")
    return make[task](n, seed)


def write_task_data(path: str | os.PathLike, task: str, n: int, seed: int) -> Path:
    """Generated rows of `task` as JSONL (our row schema; loads with dataset_format prompt_completion), atomically.

    Train and test files differ by seed only. Math questions almost never repeat; code and instruct prompts come from
    a few dozen templates, so their test prompts also occur in training (the test then measures how reliably a
    method learned them, not generalisation)."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in task_rows(task, n, seed)))
    return Path(path)
