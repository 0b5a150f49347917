"""Format converters: one small function per source format, each mapping a raw row to the common schema.

Converters raise `RowError(field, message)`; `convert_dataset` (convert.py) adds the source name and row index, so
every error names file/dataset, row and field. Detection signatures live here too, next to the converters they select.
"""

from __future__ import annotations

import math
import re

from taso_llm.data.schema import META_COLUMNS, TASKS, make_row, message, user_row


class RowError(ValueError):
    """A problem with one field of one row; the caller knows which row and source."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


# ---------------------------------------------------------------------------------------------------- field access
def as_text(value, field: str) -> str | None:
    """A field's value as text. Numbers are text too: JSON `"answer": 50` and a CSV/Parquet column of numbers mean
    the digits. A float column turns 50 into 50.0 (Arrow widens mixed int/float columns), so integral floats are
    written as integers; NaN is pandas' missing value. Booleans, lists and mappings are refused."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float, type(None))):
        raise RowError(field, f"expected a string, got {type(value).__name__}")
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    return value if value is None else str(value)


def text(row: dict, field: str, *, optional: bool = False) -> str:
    """A string field; required ones must be non-empty (an empty completion or prompt teaches nothing)."""
    value = as_text(row.get(field), field)
    if value is None:
        if optional:
            return ""
        raise RowError(field, "missing field")
    if not optional and not value.strip():
        raise RowError(field, "empty string")
    return value


def passthrough_meta(row: dict, default_task: str) -> dict:
    """Metadata columns a source already carries (e.g. a file written in our own schema) survive conversion."""
    meta = {name: text(row, name, optional=True) for name in META_COLUMNS}
    meta["task"] = meta["task"] or default_task
    if meta["task"] not in TASKS:
        raise RowError("task", f"unknown task {meta['task']!r}; expected one of {list(TASKS)}")
    return meta


def chat_messages(value, field: str, roles: dict[str, str], role_key: str, content_key: str) -> list[dict]:
    """Validate a list of chat turns and normalise it to [{"role", "content"}] with roles mapped through `roles`."""
    if not isinstance(value, list) or not value:
        raise RowError(field, "expected a non-empty list of messages")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RowError(f"{field}[{i}]", f"expected a mapping, got {type(turn).__name__}")
        role = turn.get(role_key)
        if role not in roles:
            raise RowError(f"{field}[{i}].{role_key}", f"unknown role {role!r}; expected one of {sorted(roles)}")
        where = f"{field}[{i}].{content_key}"
        content = as_text(turn.get(content_key), where)
        if content is None:
            raise RowError(where, "missing content")
        out.append(message(roles[role], content))
    return out


def split_last_assistant(turns: list[dict], field: str) -> tuple[list[dict], str]:
    """The final assistant turn is the completion; every earlier turn is the prompt."""
    if turns[-1]["role"] != "assistant":
        raise RowError(field, f"the last message must be an assistant turn, got role {turns[-1]['role']!r}")
    if len(turns) < 2:
        raise RowError(field, "no prompt turns before the final assistant turn")
    if not turns[-1]["content"].strip():
        raise RowError(f"{field}[{len(turns) - 1}].content", "empty completion")
    return turns[:-1], turns[-1]["content"]


# ------------------------------------------------------------------------------------------------------ converters
def alpaca(row: dict, task: str = "instruct") -> dict:
    instruction, extra = text(row, "instruction"), text(row, "input", optional=True)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return user_row(prompt, text(row, "output"), task)


def codealpaca(row: dict) -> dict:
    return alpaca(row, task="code")


CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def messages(row: dict) -> dict:
    prompt, completion = split_last_assistant(
        chat_messages(row.get("messages"), "messages", CHAT_ROLES, "role", "content"), "messages")
    return make_row(prompt, completion, **passthrough_meta(row, "instruct"))


def sharegpt(row: dict) -> dict:
    prompt, completion = split_last_assistant(
        chat_messages(row.get("conversations"), "conversations", SHAREGPT_ROLES, "from", "value"), "conversations")
    return make_row(prompt, completion, **passthrough_meta(row, "instruct"))


NUMBER = re.compile(r"-?\d[\d,]*(\.\d+)?")


def gsm8k(row: dict) -> dict:
    solution = text(row, "answer")
    if "####" not in solution:
        raise RowError("answer", "no '#### <number>' final answer marker")
    final = solution.rsplit("####", 1)[1].strip()
    if not NUMBER.fullmatch(final):
        raise RowError("answer", f"final answer after '####' is not a number: {final!r}")
    return user_row(text(row, "question"), solution, "math", answer=final.replace(",", ""))


METAMATH_MARKER = "The answer is:"


def metamath(row: dict) -> dict:
    response = text(row, "response")
    answer = ""
    if METAMATH_MARKER in response:
        answer = response.rsplit(METAMATH_MARKER, 1)[1].strip().rstrip(".").strip()
        # Thousands separators only; non-numeric answers (\frac{1}{2}, intervals) stay as written.
        answer = answer.replace(",", "") if NUMBER.fullmatch(answer) else answer
    return user_row(text(row, "query"), response, "math", answer=answer)


def magicoder(row: dict) -> dict:
    # Magicoder-Evol-Instruct uses instruction/response; Magicoder-OSS-Instruct uses problem/solution.
    if "problem" in row and "instruction" not in row:
        return user_row(text(row, "problem"), text(row, "solution"), "code")
    return user_row(text(row, "instruction"), text(row, "response"), "code")


CALL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(")


def mbpp_entry_point(first_assert: str, code: str) -> str:
    """The function a test calls: the first called name that the reference code defines (skips math.isclose etc.)."""
    called = CALL.findall(first_assert)
    defined = set(re.findall(r"^\s*def\s+([A-Za-z_][A-Za-z0-9_]*)", code, flags=re.M))
    return next((name for name in called if name in defined), called[0] if called else "")


def mbpp(row: dict) -> dict:
    # The original release calls the description `text`; the sanitized one calls it `prompt`.
    description = text(row, "text" if "text" in row else "prompt")
    code, test_list = text(row, "code"), row.get("test_list")
    if not isinstance(test_list, list) or not test_list or not all(isinstance(t, str) for t in test_list):
        raise RowError("test_list", "expected a non-empty list of assert strings")
    entry_point = mbpp_entry_point(test_list[0], code)
    if not entry_point:
        raise RowError("test_list", f"cannot find the called function in the first test {test_list[0]!r}")
    imports = row.get("test_imports") or []
    tests = "".join(line + "\n" for line in [*imports, *test_list])
    # The standard MBPP prompt shows the tests: they are the only place the expected function name appears.
    prompt = f"{description}\nYour code should pass these tests:\n" + "".join(t + "\n" for t in test_list)
    return user_row(prompt, code, "code", tests=tests, entry_point=entry_point)


def humaneval(row: dict) -> dict:
    # The completion is the whole function (prompt code + canonical body), not the bare body: a reply starting with
    # indentation merges with the template's trailing newline into one token, so the rendered prompt would stop being
    # a token prefix of prompt+completion (completion-only loss misaligns). It also makes `completion + tests`
    # runnable on its own, as for every other code format.
    prompt, entry_point = text(row, "prompt"), text(row, "entry_point")
    return user_row(prompt, prompt + text(row, "canonical_solution"), "code",
                    tests=f"{text(row, 'test')}\ncheck({entry_point})\n", entry_point=entry_point)


def prompt_completion(row: dict) -> dict:
    """Plain strings (wrapped as user/assistant) or already-conversational message lists (TRL's own format)."""
    raw_prompt, raw_completion = row.get("prompt"), row.get("completion")
    if isinstance(raw_prompt, list):
        prompt = chat_messages(raw_prompt, "prompt", CHAT_ROLES, "role", "content")
    else:
        prompt = [message("user", text(row, "prompt"))]
    if isinstance(raw_completion, list):
        turns = chat_messages(raw_completion, "completion", CHAT_ROLES, "role", "content")
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise RowError("completion", "expected exactly one assistant message")
        completion = turns[0]["content"]
        if not completion.strip():
            raise RowError("completion[0].content", "empty completion")
    else:
        completion = text(row, "completion")
    return make_row(prompt, completion, **passthrough_meta(row, "instruct"))


CONVERTERS = {
    "alpaca": alpaca, "messages": messages, "sharegpt": sharegpt, "gsm8k": gsm8k, "metamath": metamath,
    "codealpaca": codealpaca, "magicoder": magicoder, "mbpp": mbpp, "humaneval": humaneval,
    "prompt_completion": prompt_completion,
}
FORMATS = tuple(CONVERTERS)

# Columns that identify a format for `dataset_format: auto`, as alternatives (any one set suffices). codealpaca is
# missing on purpose: its columns equal alpaca's, so it must be named explicitly to tag rows as code.
SIGNATURES = {
    "alpaca": [{"instruction", "output"}],
    "messages": [{"messages"}],
    "sharegpt": [{"conversations"}],
    "gsm8k": [{"question", "answer"}],
    "metamath": [{"query", "response"}],
    "magicoder": [{"instruction", "response"}, {"problem", "solution"}],
    "mbpp": [{"text", "code", "test_list"}, {"prompt", "code", "test_list"}],
    "humaneval": [{"prompt", "canonical_solution", "test", "entry_point"}],
    "prompt_completion": [{"prompt", "completion"}],
}
# Formats an explicit dataset_format must still match at column level (codealpaca reads alpaca's columns).
REQUIRED_COLUMNS = {**SIGNATURES, "codealpaca": SIGNATURES["alpaca"]}


def matching_formats(columns) -> list[str]:
    cols = set(columns)
    return [fmt for fmt, alternatives in SIGNATURES.items() if any(sig <= cols for sig in alternatives)]
