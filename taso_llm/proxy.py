"""Pretraining the proxy base: a small LLaMA-class model that has learned the sub-skills of the comparison's tasks.

Why: a randomly initialised model cannot tell fine-tuning methods apart (every method just learns the output format),
and a base that has seen the fine-tuning task itself cannot either (every method scores alike). A base pretrained
briefly on a corpus that also held the worked word problems scored 2-4% exact match after fine-tuning with every
method, full fine-tuning included. So the proxy is pretrained on plain text of the sub-skills only
(`synthetic.pretraining_text`: a sentence's numbers copied into an equation, addition/subtraction facts up to 30, running totals, small
functions, output formats), and the math task it is fine-tuned on (`synthetic.composed_word_problems`) is a chat layout
and compositions it never saw: two changes in a row, "how many more than", "k more than ... together". Fine-tuning has
to compose skills the base has, and how well a method does that is what the comparison measures.

The model's identity (PROXY_CONFIG, PROXY_PRETRAIN, cache key, the `taso-proxy` alias) lives in taso_llm/tiny.py; this
module trains it: digit-splitting tokenizer (`tiny.build_tokenizer(split_digits=True)`), packed windows of the corpus,
AdamW with warmup and cosine decay, written atomically (temp dir + rename) under TASO_LLM_CACHE with
`pretrain_log.json` beside the weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from .io import write_json, write_text
from .tiny import PROXY_CONFIG, PROXY_PRETRAIN, build_tokenizer, proxy_dir

log = logging.getLogger("taso_llm")


def build_proxy_tokenizer():
    return build_tokenizer(split_digits=True)


def _packed_batches(tokenizer, docs: list[str], seq_len: int, batch_size: int, seed: int):
    """Endless batches of `seq_len` windows cut from the documents joined with BOS ... EOS, reshuffled per epoch."""
    import torch

    ids: list[int] = []
    for doc_ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids += [tokenizer.bos_token_id, *doc_ids, tokenizer.eos_token_id]
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

    config, hp = {**PROXY_CONFIG, **(config or {})}, {**PROXY_PRETRAIN, **(pretrain or {})}
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


# ------------------------------------------------------------------------------------------- fine-tuning data
# Generated-task names (a compare config's `generate` rows, `generator:` when not the task's own name) -> (function in
# taso_llm.data.synthetic, the task its rows are evaluated as).
GENERATORS = {"math": ("math_word_problems", "math"), "math_composed": ("composed_word_problems", "math"),
              "code": ("code_tasks", "code"), "instruct": ("instruct_tasks", "instruct")}


def task_rows(task: str, n: int, seed: int) -> list[dict]:
    from .data import synthetic

    if task not in GENERATORS:
        raise ValueError(f"task={task!r}: expected one of {sorted(GENERATORS)}")
    return getattr(synthetic, GENERATORS[task][0])(n, seed)


def write_task_data(path: str | os.PathLike, task: str, n: int, seed: int,
                    exclude: str | os.PathLike | None = None) -> Path:
    """Generated rows of `task` as JSONL (our row schema; loads with dataset_format prompt_completion), atomically.

    Train and test files differ by seed only. `exclude` (a JSONL file, the training rows): rows equal to one of its
    rows are skipped and the generator's next rows fill their place, so a test row never repeats a training row (math
    questions on small numbers do, now and then). Code and instruct prompts come from a few dozen templates, so their
    test prompts still occur in training with other test values (the test then measures how reliably a method learned
    them, not generalisation)."""
    seen = set()
    if exclude is not None:
        seen = {json.dumps(json.loads(line), sort_keys=True) for line in Path(exclude).read_text().splitlines()}
    want = n
    while True:  # generators are prefix-stable in n: asking for more rows only appends
        rows = [r for r in task_rows(task, want, seed) if json.dumps(r, sort_keys=True) not in seen]
        if len(rows) >= n or want >= 8 * n:
            break
        want *= 2
    if len(rows) < n:
        raise ValueError(f"task={task!r} seed={seed}: only {len(rows)} of {want} generated rows differ from {exclude}")
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows[:n]))
    return Path(path)
