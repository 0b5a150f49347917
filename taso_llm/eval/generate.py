"""Greedy batched generation for evaluation, and the few-shot math prompt.

A prompt is either a chat message list (rendered with the tokenizer's chat template, add_generation_prompt=True) or
a plain string (tokenized as is, with the tokenizer's usual special tokens) for base models / no-template few-shot.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence, Union

import torch
from tqdm.auto import tqdm

Prompt = Union[list[dict], str]


def build_math_prompt(question: str, fewshot_examples: Sequence[tuple[str, str]] = (),
                      use_chat_template: bool = True) -> Prompt:
    """The question preceded by worked examples.

    With the chat template the shots become earlier user/assistant turns (how a chat model saw examples in SFT);
    without it, lm-eval's gsm8k text format "Question: ...\\nAnswer: ..." separated by blank lines, ending at
    "Answer:" for the model to continue (generation must then stop at the next "Question:", see MATH_TEXT_STOP).
    """
    if use_chat_template:
        messages = []
        for q, a in fewshot_examples:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return messages + [{"role": "user", "content": question}]
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in fewshot_examples)
    return f"{shots}Question: {question}\nAnswer:"


# Where a plain-text few-shot continuation ends: the model starting the next example.
MATH_TEXT_STOP = ("Question:",)


def render_prompt(tokenizer, prompt: Prompt) -> tuple[str, bool]:
    """(text, add_special_tokens). The chat template already writes BOS, so its text is tokenized without them."""
    if isinstance(prompt, str):
        return prompt, True
    if not tokenizer.chat_template:
        raise ValueError("generate: prompt is a message list but the tokenizer has no chat_template; pass plain text "
                         "prompts (e.g. --no_chat_template) or use a chat model")
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False), False


@contextmanager
def _left_padding(tokenizer):
    """Decoder-only batches must be left padded so every row's last token is its real last prompt token."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = pad


def _stop_ids(model, tokenizer) -> list[int]:
    """Tokenizer EOS plus whatever the model's generation config treats as end (e.g. Llama-3's <|eot_id|>)."""
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    return sorted(i for i in ids if i is not None)


def truncate_at(text: str, stop: Sequence[str]) -> str:
    """Cut the text at the first occurrence of any stop string (applied after generation)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def generate_batched(model, tokenizer, prompts: Sequence[Prompt], max_new_tokens: int = 256, batch_size: int = 8,
                     desc: str = "generate", stop: Sequence[str] = ()) -> list[str]:
    """Greedy completions, in input order, of only the new tokens (special tokens skipped).

    Prompts are sorted by length before batching so rows in a batch need little padding; `stop` strings truncate the
    decoded text afterwards (generation itself stops at EOS or max_new_tokens).
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"generate_batched: batch_size and max_new_tokens must be >= 1, got {batch_size}, "
                         f"{max_new_tokens}")
    rendered = [render_prompt(tokenizer, p) for p in prompts]
    lengths = [len(tokenizer(text, add_special_tokens=special)["input_ids"]) for text, special in rendered]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    outputs: list[str | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with _left_padding(tokenizer), torch.no_grad():
            for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
                rows = order[start:start + batch_size]
                batch = _encode(tokenizer, [rendered[i] for i in rows]).to(device)
                generated = model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                    top_k=None, eos_token_id=_stop_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                )
                new_tokens = generated[:, batch["input_ids"].shape[1]:]
                for i, text in zip(rows, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                    outputs[i] = truncate_at(text, stop) if stop else text
    finally:
        model.train(was_training)
    return outputs


def _encode(tokenizer, rendered: list[tuple[str, bool]]):
    """Tokenize one batch. Chat-rendered and plain prompts can mix, so each keeps its own special-token choice."""
    ids = [tokenizer(text, add_special_tokens=special)["input_ids"] for text, special in rendered]
    return tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
