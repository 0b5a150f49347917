"""Load one split of one source through `datasets.load_dataset`, whatever the source is.

Local files use the packaged builder for their extension, directories and hub ids pass straight through, and the
`taso-tiny` alias is just the bundled JSONL file. One path for all, so the default run exercises the real loader.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

from taso_llm.data.bundled_set import BUNDLED_ALIAS, BUNDLED_PATH
from taso_llm.data.errors import DataFormatError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_source(name: str, split: str, config: str | None = None) -> Dataset:
    """One split of `name`. Single files have one split, "train"; a missing split is an error listing those there."""
    path = BUNDLED_PATH if name == BUNDLED_ALIAS else Path(name)
    if path.suffix.lower() in BUILDERS:
        if not path.is_file():
            raise DataFormatError(str(path), "file not found", field="dataset_name")
        splits = load_dataset(BUILDERS[path.suffix.lower()], data_files=str(path))
    elif path.suffix and path.is_file():
        raise DataFormatError(str(path), f"unsupported file type {path.suffix!r}; expected one of {sorted(BUILDERS)}",
                              field="dataset_name")
    else:  # a directory (builder inferred from its files) or a hub id
        splits = load_dataset(name, config)
    if not isinstance(splits, DatasetDict) or split not in splits:
        available = list(splits) if isinstance(splits, DatasetDict) else []
        raise DataFormatError(str(path), f"no split {split!r}; available splits: {available}", field="split")
    return splits[split]
