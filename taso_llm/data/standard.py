"""Standard (non-conversational) prompt-completion rows: TRL's format for models without a chat template.

TRL trains a row {"prompt": str, "completion": str} on the text prompt + completion + eos, with the loss on the
completion (and eos); no chat template is involved. Which format a run uses (`DataArguments.prompt_format`):
  * conversational: the rows are message lists, rendered by the tokenizer's chat template (its own, or TRL's
    `chat_template_path` given on the command line);
  * standard: plain text, as TRL trains non-conversational data;
  * auto: conversational when the tokenizer has a chat template, standard when it has none (a base model).

Rows become standard as follows: `prompt_completion` rows whose prompt is a plain string keep prompt and completion
exactly as written (what TRL would train on); rows of every other format, whose prompt is one user turn, become that
turn's text followed by a newline (the plain prompt the evaluation gives a base model, see eval/evaluate.py). A
prompt with a system turn or several turns has no plain form and is refused, naming the row.
"""

from __future__ import annotations

from datasets import Features, Value

from taso_llm.data.formats import RowError
from taso_llm.data.schema import META_COLUMNS

PROMPT_FORMATS = ("auto", "conversational", "standard")
STANDARD_FEATURES = Features({"prompt": Value("string"), "completion": Value("string"),
                              **{name: Value("string") for name in META_COLUMNS}})
# The source field that holds a format's prompt turns, for errors.
PROMPT_FIELD = {"messages": "messages", "sharegpt": "conversations"}


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def is_standard(dataset) -> bool:
    return isinstance(dataset.features["prompt"], Value)


def use_conversational(prompt_format: str, tokenizer) -> bool:
    """The run's format. Without a tokenizer (data loaded for evaluation or inspection) auto means conversational."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format: expected one of {PROMPT_FORMATS}, got {prompt_format!r}")
    if prompt_format == "standard":
        return False
    if tokenizer is None or has_chat_template(tokenizer):
        return True
    if prompt_format == "conversational":
        raise ValueError(f"prompt_format='conversational', but the tokenizer of {tokenizer.name_or_path!r} has no chat "
                         "template: set chat_template_path (a .jinja file, or a tokenizer whose template to copy), "
                         "or prompt_format: standard")
    return False


def check_system_prompt(system_prompt: str | None, standard: bool) -> None:
    if standard and system_prompt:
        raise ValueError("DataArguments.system_prompt: standard (plain text) rows have no system turn; give a chat "
                         "template (chat_template_path: a .jinja file or a tokenizer that has one) or put the text "
                         "in the prompts")


def standard_row(row: dict, fmt: str, raw_prompt) -> dict:
    """A converted (conversational) row as plain text; `raw_prompt` is the source row's prompt value."""
    if fmt == "prompt_completion" and not isinstance(raw_prompt, list):
        prompt = row["prompt"][0]["content"]  # the string as written
    else:
        roles = [turn["role"] for turn in row["prompt"]]
        if roles != ["user"]:
            raise RowError(PROMPT_FIELD.get(fmt, "prompt"),
                           f"the prompt has turns {roles}; standard (non-conversational) rows have one user turn. "
                           "Give a chat template (chat_template_path: a .jinja file or a tokenizer that has one) to "
                           "train on conversations")
        prompt = row["prompt"][0]["content"] + "\n"
    return {**row, "prompt": prompt, "completion": row["completion"][0]["content"]}
