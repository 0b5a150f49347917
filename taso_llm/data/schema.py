"""The common row schema every format converts to.

TRL's conversational prompt-completion format (SFTTrainer puts the loss on the completion only) plus string metadata
columns that are always present ("" when not applicable), so datasets from different formats concatenate.
"""

from __future__ import annotations

from datasets import Features, List, Value

TASKS = ("instruct", "math", "code")
META_COLUMNS = ("task", "answer", "tests", "entry_point")
COLUMNS = ("prompt", "completion") + META_COLUMNS

_MESSAGE = {"role": Value("string"), "content": Value("string")}
# Explicit features: without them Arrow infers the message struct per source, and mixtures would fail to concatenate
# when one source has extra message keys or all-null metadata.
FEATURES = Features({
    "prompt": List(_MESSAGE),
    "completion": List(_MESSAGE),
    **{name: Value("string") for name in META_COLUMNS},
})


def message(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def make_row(prompt: list[dict], completion: str, task: str, answer: str = "", tests: str = "",
             entry_point: str = "") -> dict:
    """One row in the common schema. `prompt` is a message list; `completion` the assistant's reply text."""
    return {"prompt": prompt, "completion": [message("assistant", completion)], "task": task, "answer": answer,
            "tests": tests, "entry_point": entry_point}


def user_row(text: str, completion: str, task: str, **meta: str) -> dict:
    """Shorthand for the common single-user-turn case."""
    return make_row([message("user", text)], completion, task, **meta)
