"""Task evaluations on rows of the common schema (prompt, completion, task, answer, tests, entry_point).

Each evaluate_* returns {"metrics": {...}, "records": [...]}: metrics for the table, one record per row to look at
what the model actually wrote. run_evaluation picks the task's rows, runs the evaluation and writes the JSON file.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from taso_llm.eval.generate import MATH_TEXT_STOP, Prompt, build_math_prompt, generate_batched
from taso_llm.eval.nll import completion_nll
from taso_llm.eval.sandbox import pass_at_1, sandbox_isolation
from taso_llm.eval.scoring import score_code, score_math
from taso_llm.io import write_json

TASKS = ("math", "code", "instruct")
REQUIRED_COLUMNS = {"math": ("prompt", "answer"), "code": ("prompt", "tests"), "instruct": ("prompt", "completion")}
Judge = Callable[[Prompt, str], float]


def _check_columns(dataset, task: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS[task] if c not in dataset.column_names]
    if missing:
        raise ValueError(f"evaluate {task}: dataset lacks columns {missing} (has {dataset.column_names})")
    if len(dataset) == 0:
        raise ValueError(f"evaluate {task}: the dataset is empty")


def last_user_text(prompt) -> str:
    """The question: the content of the last user turn (what a plain-text prompt is built from); a standard row's
    prompt is its text already (without the newline standard rows end their prompt with)."""
    if isinstance(prompt, str):
        return prompt.removesuffix("\n")
    for message in reversed(prompt):
        if message["role"] == "user":
            return message["content"]
    raise ValueError(f"prompt has no user message: {prompt!r}")


def completion_text(completion) -> str:
    """The reference answer's text: a standard row's completion string, or the last assistant message's content."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def _plain_prompts(dataset, use_chat_template: bool) -> list[Prompt]:
    """Message lists as stored, or (without the template) the user's text followed by a newline: a standard row's
    prompt as trained."""
    if use_chat_template:
        return list(dataset["prompt"])
    return [p if isinstance(p, str) else last_user_text(p) + "\n" for p in dataset["prompt"]]


def _math_prompt(prompt, fewshot: Sequence[tuple[str, str]], use_chat_template: bool) -> Prompt:
    if not fewshot and (use_chat_template or isinstance(prompt, str)):
        return prompt  # as trained: plain text (no "Question:" frame), or messages with any system turn and history
    built = build_math_prompt(last_user_text(prompt), fewshot, use_chat_template)
    if use_chat_template:  # keep a system prompt in front of the shots
        built = [m for m in prompt if m["role"] == "system"] + built
    return built


def _add_nll(model, tokenizer, dataset, result: dict, batch_size: int) -> dict:
    """Also score the reference completion's likelihood (separates methods when exact match is all zeros)."""
    nll = answer_nll(model, tokenizer, dataset, batch_size=batch_size)
    result["metrics"].update({"answer_nll": nll["metrics"]["nll"], "answer_perplexity": nll["metrics"]["perplexity"]})
    for record, row in zip(result["records"], nll["per_row"]):
        record["answer_nll"] = row["nll"]
    return result


def answer_nll(model, tokenizer, dataset, batch_size: int = 8, max_length: int | None = None) -> dict:
    """Completion-only NLL of the reference answers, any task: {"metrics": {nll, perplexity, ...}, "per_row": [...]}."""
    return completion_nll(model, tokenizer, dataset, batch_size=batch_size, max_length=max_length, desc="answer nll")


def evaluate_math(model, tokenizer, dataset, batch_size: int = 8, max_new_tokens: int = 256,
                  fewshot: Sequence[tuple[str, str]] = (), use_chat_template: bool = True,
                  with_nll: bool = False) -> dict:
    """Greedy generation scored by strict (`#### N`) and flexible (last number) exact match against `answer`."""
    _check_columns(dataset, "math")
    prompts = [_math_prompt(p, fewshot, use_chat_template) for p in dataset["prompt"]]
    generated = generate_batched(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 desc="math", stop=() if use_chat_template else MATH_TEXT_STOP)
    records = [{"prompt": prompt, "generated": text, "gold": gold, **score_math(text, gold)}
               for prompt, text, gold in zip(prompts, generated, dataset["answer"])]
    n = len(records)
    metrics = {"strict_match": sum(r["strict_correct"] for r in records) / n,
               "flexible_match": sum(r["flexible_correct"] for r in records) / n,
               "n": n, "num_fewshot": len(fewshot)}
    result = {"metrics": metrics, "records": records}
    return _add_nll(model, tokenizer, dataset, result, batch_size) if with_nll else result


def evaluate_code(model, tokenizer, dataset, batch_size: int = 8, max_new_tokens: int = 512,
                  use_chat_template: bool = True, timeout_s: float = 5.0, memory_mb: int = 512,
                  with_nll: bool = False) -> dict:
    """pass@1 of greedy completions: the code (a ```python block, else the whole text) must pass the row's tests."""
    _check_columns(dataset, "code")
    prompts = _plain_prompts(dataset, use_chat_template)
    generated = generate_batched(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 desc="code")
    entry_points = dataset["entry_point"] if "entry_point" in dataset.column_names else [""] * len(dataset)
    records = []
    for prompt, text, tests, entry_point in zip(prompts, generated, dataset["tests"], entry_points):
        scored = score_code(text, tests, entry_point or "", timeout_s=timeout_s, memory_mb=memory_mb)
        records.append({"prompt": prompt, "generated": text, "entry_point": entry_point, **scored})
    metrics = {"pass@1": pass_at_1([r["passed"] for r in records]), "n": len(records),
               "status_counts": dict(Counter(r["status"] for r in records)),
               "sandbox_isolation": sandbox_isolation().level}  # how far a pass can be trusted (sandbox.py)
    result = {"metrics": metrics, "records": records}
    return _add_nll(model, tokenizer, dataset, result, batch_size) if with_nll else result


def evaluate_instruct(model, tokenizer, dataset, batch_size: int = 8, judge: Judge | None = None,
                      max_new_tokens: int = 256, use_chat_template: bool = True,
                      max_length: int | None = None) -> dict:
    """Held-out completion-only loss and perplexity; with a judge, also greedy responses and their mean score.

    judge(prompt, response) -> float is any scorer (a rubric, a reward model, an LLM judge); it sees the prompt as
    given to the model (message list, or text without the chat template).
    """
    _check_columns(dataset, "instruct")
    nll = answer_nll(model, tokenizer, dataset, batch_size=batch_size, max_length=max_length)
    records = [{"prompt": row["prompt"], "reference": completion_text(row["completion"]), "nll": per["nll"],
                "n_tokens": per["n_tokens"]} for row, per in zip(dataset, nll["per_row"])]
    metrics = {"loss": nll["metrics"]["nll"], "perplexity": nll["metrics"]["perplexity"],
               "n_tokens": nll["metrics"]["n_tokens"], "n": len(records),
               "truncated_rows": nll["metrics"]["truncated_rows"]}
    if judge is not None:
        prompts = _plain_prompts(dataset, use_chat_template)
        generated = generate_batched(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, desc="instruct")
        for record, prompt, text in zip(records, prompts, generated):
            score = judge(prompt, text)
            if isinstance(score, bool) or not isinstance(score, (int, float)):
                raise ValueError(f"evaluate_instruct: judge must return a number, got {score!r}")
            record.update({"generated": text, "judge_score": float(score)})
        metrics["judge_mean"] = sum(r["judge_score"] for r in records) / len(records)
    return {"metrics": metrics, "records": records}


def select_task(dataset, task: str, limit: int | None = None):
    """Rows of `task` (when the dataset has a task column, e.g. a mixed validation split), then the first `limit`."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if "task" in dataset.column_names:
        dataset = dataset.filter(lambda t: t == task, input_columns="task")
    if len(dataset) == 0:
        raise ValueError(f"no rows with task {task!r} to evaluate")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


EVALUATORS = {"math": evaluate_math, "code": evaluate_code, "instruct": evaluate_instruct}


def run_evaluation(model, tokenizer, dataset, task: str, out_path: str | Path | None = None,
                   limit: int | None = None, **opts) -> dict:
    """Evaluate the task's rows and write {"task", "metrics", "records"} to out_path (atomically) if given."""
    dataset = select_task(dataset, task, limit)
    result = {"task": task, **EVALUATORS[task](model, tokenizer, dataset, **opts)}
    if out_path is not None:
        write_json(out_path, result)
    return result
