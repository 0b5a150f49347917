"""Completion-only negative log-likelihood: how probable the reference answer is under the model.

Rows are rendered as training renders them (the chat template, or plain text + eos for standard rows); the loss
covers only the completion tokens (the prompt rendered alone must be a token prefix of the full rendering, as in TRL's
completion-only loss). The mean is token-weighted over the whole set: sum of token NLLs / number of tokens, so long
answers count in proportion to their length (the same number the trainer's eval_loss reports).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from taso_llm.data.length import rendered_ids

IGNORE_INDEX = -100


def completion_tokens(tokenizer, prompt, completion) -> tuple[list[int], int]:
    """(ids of prompt + completion, number of prompt tokens), rendered as training renders the row (chat messages
    through the template, plain-text rows with eos after the completion). Raises if the prompt is not a prefix."""
    prompt_ids, full_ids = rendered_ids(prompt, completion, tokenizer)
    if full_ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError("completion NLL: the rendering of the prompt alone is not a token prefix of prompt + "
                         "completion, so completion tokens cannot be located")
    return full_ids, len(prompt_ids)


def _batch(rows: list[tuple[list[int], int]], pad_id: int):
    """Right-padded input_ids / attention_mask / labels with the prompt and padding masked out of the labels."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, n_prompt) in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        attention[r, :len(ids)] = 1
        labels[r, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
    return input_ids, attention, labels


def completion_nll(model, tokenizer, dataset, batch_size: int = 8, max_length: int | None = None,
                   desc: str = "nll") -> dict:
    """Token-weighted mean NLL and perplexity over the completions, plus per-row sums and token counts.

    max_length (default: none) right-truncates prompt + completion; completion tokens cut off are not scored and a
    row with none left contributes nothing (counted in metrics["truncated_rows"]).
    """
    if batch_size < 1:
        raise ValueError(f"completion_nll: batch_size must be >= 1, got {batch_size}")
    if len(dataset) == 0:
        raise ValueError("completion_nll: the dataset is empty")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, truncated = [], 0
    for row in dataset:
        ids, n_prompt = completion_tokens(tokenizer, row["prompt"], row["completion"])
        if max_length is not None and len(ids) > max_length:
            ids, truncated = ids[:max_length], truncated + 1
        rows.append((ids, min(n_prompt, len(ids))))

    device = next(model.parameters()).device
    per_row: list[tuple[float, int]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch"):
                input_ids, attention, labels = (t.to(device) for t in _batch(rows[start:start + batch_size], pad_id))
                logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
                # position t predicts token t+1
                target = labels[:, 1:]
                token_nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=IGNORE_INDEX,
                                            reduction="none")
                counted = target != IGNORE_INDEX
                for r in range(input_ids.shape[0]):
                    per_row.append((token_nll[r][counted[r]].sum().item(), int(counted[r].sum().item())))
    finally:
        model.train(was_training)

    total_nll = sum(s for s, _ in per_row)
    total_tokens = sum(n for _, n in per_row)
    if total_tokens == 0:
        raise ValueError("completion_nll: no completion tokens to score (all truncated away or empty completions)")
    mean = total_nll / total_tokens
    return {
        "metrics": {"nll": mean, "perplexity": math.exp(mean), "n_tokens": total_tokens, "n_rows": len(rows),
                    "truncated_rows": truncated},
        "per_row": [{"nll_sum": s, "n_tokens": n, "nll": s / n if n else None} for s, n in per_row],
    }
