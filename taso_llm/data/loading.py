"""load_sft_splits: DataArguments -> DatasetDict(train, validation) in the common schema.

Order of operations (each step deterministic given `seed`):
  1. every source is loaded and converted; conversion validates every row (before any tokenization);
  2. a mixture is composed with exact per-source counts (mixture.py); a single dataset is used as is;
  3. system_prompt is prepended to prompts that have no system message;
  4. validation = the sources' `dataset_test_split` if set, else a seeded held-out subset of `validation_size`;
  5. max_train_samples caps the train split with a seeded random subset (so mixture proportions hold on average,
     exactly only in the pre-split mixture);
  6. duplicated training rows, and validation rows that also occur in training, are counted and warned about.

Given the run's tokenizer, rows come out conversational or standard (plain text) as `prompt_format` and the
tokenizer's chat template decide (standard.py); without one they are conversational.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
from datasets import Dataset, DatasetDict, concatenate_datasets

from taso_llm.data.args import DataArguments
from taso_llm.data.convert import convert_dataset
from taso_llm.data.errors import DataFormatError
from taso_llm.data.mixture import mix, seeded_subset
from taso_llm.data.schema import FEATURES, message
from taso_llm.data.sources import load_source
from taso_llm.data.standard import check_system_prompt, use_conversational

logger = logging.getLogger("taso_llm")


@dataclass
class SourceSpec:
    name: str
    dataset_name: str
    format: str
    split: str
    config: str | None
    test_split: str | None
    weight: float


def source_specs(args: DataArguments) -> list[SourceSpec]:
    """The single dataset as a one-source list, or the mixture entries with defaults from the top-level fields."""
    if not args.dataset_mixture:
        return [SourceSpec(args.dataset_name, args.dataset_name, args.dataset_format, args.dataset_train_split,
                           args.dataset_config, args.dataset_test_split, 1.0)]
    return [SourceSpec(name, spec.get("path", spec.get("dataset_name")), spec.get("format", "auto"),
                       spec.get("split", args.dataset_train_split), spec.get("config"),
                       spec.get("test_split", args.dataset_test_split), float(spec.get("weight", 1.0)))
            for name, spec in args.dataset_mixture.items()]


def load_converted(spec: SourceSpec, split: str, standard: bool) -> Dataset:
    label = spec.dataset_name if spec.split == split else f"{spec.dataset_name}[{split}]"
    return convert_dataset(load_source(spec.dataset_name, split, spec.config), spec.format, label, standard)


def add_system_prompt(ds: Dataset, system_prompt: str | None) -> Dataset:
    """Rows that bring their own system message keep it: it is part of what the data teaches."""
    if not system_prompt:
        return ds

    def prepend(row):
        prompt = row["prompt"]
        if prompt and prompt[0]["role"] == "system":
            return {"prompt": prompt}
        return {"prompt": [message("system", system_prompt), *prompt]}

    return ds.map(prepend, features=FEATURES, load_from_cache_file=False, desc="Adding system prompt")


def held_out_count(n: int, validation_size: float, source: str) -> int:
    count = int(validation_size) if validation_size >= 1 else round(n * validation_size)
    if validation_size > 0 and n >= 2:
        count = max(count, 1)  # a requested validation split is never silently empty
    if count >= n and count > 0:
        raise DataFormatError(source, f"validation_size={validation_size} leaves no training rows out of {n}",
                              field="validation_size")
    return count


def hold_out(ds: Dataset, validation_size: float, seed: int, source: str) -> tuple[Dataset, Dataset]:
    """Disjoint (train, validation) by a seeded permutation; both keep the source order."""
    n_val = held_out_count(len(ds), validation_size, source)
    order = np.random.default_rng(seed).permutation(len(ds))
    return ds.select(np.sort(order[n_val:])), ds.select(np.sort(order[:n_val]))


def load_sft_splits(data_args: DataArguments, seed: int = 0, tokenizer=None) -> DatasetDict:
    """`tokenizer`: the run's (with any chat_template_path applied); it decides conversational vs standard rows."""
    standard = not use_conversational(data_args.prompt_format, tokenizer)
    check_system_prompt(data_args.system_prompt, standard)
    specs = source_specs(data_args)
    converted = {spec.name: load_converted(spec, spec.split, standard) for spec in specs}
    label = specs[0].dataset_name if len(specs) == 1 else f"mixture {list(converted)}"
    if len(specs) == 1:
        pool = converted[specs[0].name]
    else:
        pool = mix(converted, {spec.name: spec.weight for spec in specs}, seed)
    if len(pool) == 0:
        raise DataFormatError(label, "no rows to train on", field="dataset_name")
    pool = add_system_prompt(pool, data_args.system_prompt)

    with_test = [spec for spec in specs if spec.test_split and spec.weight > 0]
    if with_test:
        train = pool
        validation = concatenate_datasets([load_converted(spec, spec.test_split, standard) for spec in with_test])
        validation = add_system_prompt(validation, data_args.system_prompt)
    else:
        train, validation = hold_out(pool, data_args.validation_size, seed, label)

    if data_args.max_train_samples is not None and data_args.max_train_samples < len(train):
        train = seeded_subset(train, data_args.max_train_samples, np.random.default_rng([seed, 1]))
    logger.info("data: %s -> %d train / %d validation rows (tasks: %s, %s)", label, len(train), len(validation),
                task_counts(train), "standard text" if standard else "conversational")
    warn_repeats(train, validation)
    return DatasetDict(train=train, validation=validation)


def row_keys(ds: Dataset) -> list[str]:
    """What makes two rows the same example: prompt and completion (metadata is derived from them)."""
    return [json.dumps([prompt, completion]) for prompt, completion in zip(ds["prompt"], ds["completion"])]


def warn_repeats(train: Dataset, validation: Dataset) -> dict[str, int]:
    """Count training rows that repeat an earlier one, and validation rows that also occur in training; warn."""
    train_keys = row_keys(train)
    seen = set(train_keys)
    counts = {"train_duplicates": len(train_keys) - len(seen),
              "validation_in_train": sum(key in seen for key in row_keys(validation))}
    if counts["train_duplicates"]:
        logger.warning("data: %d of %d training rows repeat an earlier row (same prompt and completion); repeated "
                       "examples weigh more in the loss", counts["train_duplicates"], len(train_keys))
    if counts["validation_in_train"]:
        logger.warning("data: %d of %d validation rows also occur in the training split (same prompt and "
                       "completion); the validation loss partly measures memorisation", counts["validation_in_train"],
                       len(validation))
    return counts


def task_counts(ds: Dataset) -> dict[str, int]:
    return dict(sorted(Counter(ds["task"]).items()))
