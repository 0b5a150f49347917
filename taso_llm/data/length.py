"""Length report and policy: count (and optionally drop) rows that do not fit max_length, never silently.

Lengths are measured exactly as the trainer will see them. Conversational rows: the chat template rendered over
prompt+completion, and the prompt alone with add_generation_prompt=True (the completion-only loss starts where that
prefix ends). Standard rows: the tokenized prompt, and prompt + completion + eos (TRL appends eos to the completion).
"""

from __future__ import annotations

import logging

from datasets import Dataset

from taso_llm.data.standard import has_chat_template, is_standard

POLICIES = ("truncate", "drop")
logger = logging.getLogger("taso_llm")


def rendered_ids(prompt, completion, tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, prompt + completion ids) as the trainer sees them: standard rows (prompt and completion strings)
    tokenized template-free with eos appended to the completion, as TRL's SFTTrainer does; conversational rows through
    the chat template (the prompt alone with add_generation_prompt=True)."""
    if isinstance(prompt, str):
        eos = tokenizer.eos_token
        completion = completion if completion.endswith(eos) else completion + eos
        return tokenizer(prompt)["input_ids"], tokenizer(prompt + completion)["input_ids"]

    def ids(messages, add_generation_prompt):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                             return_dict=True)["input_ids"]

    return ids(prompt, True), ids(prompt + completion, False)


def token_lengths(row: dict, tokenizer) -> dict:
    prompt, full = rendered_ids(row["prompt"], row["completion"], tokenizer)
    # Completion-only loss masks the first len(prompt) tokens; if the prompt is not a token prefix that mask is off.
    return {"prompt_tokens": len(prompt), "total_tokens": len(full), "prefix_ok": full[:len(prompt)] == prompt}


def apply_length_policy(dataset: Dataset, tokenizer, max_length: int, policy: str = "truncate"):
    """Returns (dataset, stats). Rows whose prompt alone is >= max_length are always dropped (no completion token
    would survive truncation, so there is nothing to learn); other rows over max_length are dropped under "drop" and
    kept under "truncate" (the trainer truncates them). A policy that leaves no row is an error naming max_length."""
    if policy not in POLICIES:
        raise ValueError(f"max_length_policy: expected one of {POLICIES}, got {policy!r}")
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length: expected a positive int, got {max_length!r}")
    if not is_standard(dataset) and not has_chat_template(tokenizer):
        raise ValueError(f"the rows are conversational but the tokenizer of {tokenizer.name_or_path!r} has no chat "
                         "template: set chat_template_path, or load the data with this tokenizer "
                         "(load_sft_splits(..., tokenizer=...)) to get standard plain-text rows")
    lengths = dataset.map(token_lengths, fn_kwargs={"tokenizer": tokenizer}, remove_columns=dataset.column_names,
                          load_from_cache_file=False, desc="Measuring token lengths")
    prompt_tokens, total_tokens = lengths["prompt_tokens"], lengths["total_tokens"]
    over = [total > max_length for total in total_tokens]
    prompt_too_long = [p >= max_length for p in prompt_tokens]
    keep = [not (long_prompt or (policy == "drop" and is_over)) for long_prompt, is_over in zip(prompt_too_long, over)]
    kept = dataset.select([i for i, k in enumerate(keep) if k]) if not all(keep) else dataset
    stats = {"rows": len(dataset), "over_max_length": sum(over), "prompt_too_long": sum(prompt_too_long),
             "dropped": len(dataset) - len(kept), "kept": len(kept), "policy": policy, "max_length": max_length,
             "prompt_not_prefix": len(dataset) - sum(lengths["prefix_ok"])}
    logger.info("length policy %r at max_length=%d: %d of %d rows over, %d with the prompt alone >= max_length, "
                "%d dropped, %d kept; %d rows whose rendered prompt is not a token prefix of prompt+completion",
                policy, max_length, stats["over_max_length"], stats["rows"], stats["prompt_too_long"],
                stats["dropped"], stats["kept"], stats["prompt_not_prefix"])
    if len(dataset) and not len(kept):
        needed = min(total_tokens) if policy == "drop" else min(prompt_tokens) + 1
        raise ValueError(f"max_length={max_length} with max_length_policy={policy!r} leaves no training rows: all "
                         f"{len(dataset)} dropped ({stats['prompt_too_long']} with the prompt alone >= max_length, "
                         f"{stats['over_max_length']} over it in total). The shortest row is {min(total_tokens)} "
                         f"tokens and the shortest prompt {min(prompt_tokens)}; keeping any row needs max_length >= "
                         f"{needed}")
    return kept, stats
