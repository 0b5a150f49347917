"""DataArguments: the data section of a recipe, parsed by TRL's TrlParser (YAML + CLI) beside SFTConfig.

Field types are limited to what HfArgumentParser can turn into argparse options:
  * `validation_size` is typed `float` (HfArgumentParser rejects `float | int`); a value < 1 is a fraction of the
    rows, a value >= 1 a row count (`100` and `100.0` both mean 100 rows), 0 means an empty validation split.
  * `dataset_mixture` is typed `dict | str | None`: from YAML it arrives as a mapping; on the command line it is a JSON
    string (`--dataset_mixture '{"a": {...}}'`). After `__post_init__` it is always a dict or None.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from taso_llm.data.formats import FORMATS
from taso_llm.data.standard import PROMPT_FORMATS, check_system_prompt

LENGTH_POLICIES = ("truncate", "drop")
# Keys a mixture entry may carry. `path` and `dataset_name` are synonyms.
MIXTURE_KEYS = {"path", "dataset_name", "format", "weight", "split", "config", "test_split"}


@dataclass
class DataArguments:
    dataset_name: str = field(default="taso-tiny", metadata={
        "help": "Hub dataset id, local .jsonl/.json/.parquet file or directory, or 'taso-tiny' (the bundled set)."})
    dataset_format: str = field(default="auto", metadata={
        "help": f"One of auto, {', '.join(FORMATS)}. auto detects from the columns."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(default=None, metadata={
        "help": "Use this split of the source as the validation set instead of holding out validation_size rows."})
    dataset_mixture: dict | str | None = field(default=None, metadata={
        "help": "Mapping name -> {path|dataset_name, format, weight, split, config, test_split}. Weights are "
                "normalised to the fraction of the mixture each source contributes (see mixture.py)."})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "Cap on training rows: a seeded random subset of the train split, taken after the held-out split."})
    validation_size: float = field(default=0.05, metadata={
        "help": "Held-out rows: < 1 is a fraction, >= 1 a count, 0 none. Ignored when dataset_test_split is set."})
    max_length_policy: str = field(default="truncate", metadata={
        "help": "Rows longer than max_length: 'truncate' keeps them (the trainer truncates), 'drop' removes them."})
    system_prompt: str | None = field(default=None, metadata={
        "help": "Prepended as a system message to every prompt that does not already start with one."})
    prompt_format: str = field(default="auto", metadata={
        "help": "How rows reach the model, in TRL's terms: 'conversational' (message lists rendered with the chat "
                "template, the tokenizer's own or chat_template_path) or 'standard' (plain prompt + completion text, "
                "eos appended, loss on the completion). 'auto': conversational if the tokenizer has a chat template."})

    def __post_init__(self):
        if self.dataset_format != "auto" and self.dataset_format not in FORMATS:
            raise ValueError(f"DataArguments.dataset_format: unknown format {self.dataset_format!r}; expected auto "
                             f"or one of {list(FORMATS)}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"DataArguments.prompt_format: expected one of {PROMPT_FORMATS}, got "
                             f"{self.prompt_format!r}")
        check_system_prompt(self.system_prompt, standard=self.prompt_format == "standard")
        if self.max_length_policy not in LENGTH_POLICIES:
            raise ValueError(f"DataArguments.max_length_policy: expected one of {LENGTH_POLICIES}, got "
                             f"{self.max_length_policy!r}")
        size = self.validation_size
        if size < 0 or (size >= 1 and size != int(size)):
            raise ValueError(f"DataArguments.validation_size: expected a fraction in [0, 1) or a whole row count, "
                             f"got {self.validation_size!r}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"DataArguments.max_train_samples: expected a positive count, "
                             f"got {self.max_train_samples}")
        if isinstance(self.dataset_mixture, str):
            try:
                self.dataset_mixture = json.loads(self.dataset_mixture)
            except json.JSONDecodeError as err:
                raise ValueError(f"DataArguments.dataset_mixture: not valid JSON ({err})") from None
        if self.dataset_mixture is not None:
            check_mixture(self.dataset_mixture)


def check_mixture(mixture) -> None:
    """Shape check only (sources are loaded later): name -> mapping with a source and a non-negative weight."""
    if not isinstance(mixture, dict) or not mixture:
        raise ValueError(f"DataArguments.dataset_mixture: expected a non-empty mapping, got {type(mixture).__name__}")
    for name, spec in mixture.items():
        where = f"DataArguments.dataset_mixture[{name!r}]"
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(spec).__name__}")
        unknown = set(spec) - MIXTURE_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(MIXTURE_KEYS)}")
        if ("path" in spec) == ("dataset_name" in spec):
            raise ValueError(f"{where}: give exactly one of 'path' or 'dataset_name'")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"{where}.weight: expected a non-negative number, got {weight!r}")
        fmt = spec.get("format", "auto")
        if fmt != "auto" and fmt not in FORMATS:
            raise ValueError(f"{where}.format: unknown format {fmt!r}; expected auto or one of {list(FORMATS)}")
    if not any(spec.get("weight", 1.0) > 0 for spec in mixture.values()):
        raise ValueError("DataArguments.dataset_mixture: every weight is 0")
