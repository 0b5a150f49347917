"""Load one split of one source through `datasets.load_dataset`, whatever the source is.

Local files and directories go through files.py (checked, read with the packaged builder for their type, failures
tied to a file); hub ids pass straight through; the `taso-tiny` alias is just the bundled JSONL file. One path for
all, so the default run exercises the real loader.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

from taso_llm.data.bundled_set import BUNDLED_ALIAS, BUNDLED_PATH
from taso_llm.data.errors import DataFormatError
from taso_llm.data.files import BUILDERS, builder_for, directory_data_files, read_local


def looks_like_path(name: str) -> bool:
    """Meant as a local path (a hub dataset id is `name` or `org/name`)."""
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
            or builder_for(Path(name)) is not None)


def load_splits(name: str, config: str | None) -> DatasetDict:
    path = BUNDLED_PATH if name == BUNDLED_ALIAS else Path(name).expanduser()
    if path.is_dir():
        builder, files = directory_data_files(path)
        return read_local(str(path), builder, files)
    if path.is_file():
        if builder_for(path) is None:
            raise DataFormatError(str(path), f"unsupported file type {path.suffix!r}; expected one of "
                                             f"{sorted(BUILDERS)}", field="dataset_name")
        return read_local(str(path), builder_for(path), {"train": [path]})
    if looks_like_path(name):
        raise DataFormatError(str(path), "file not found", field="dataset_name")
    return load_dataset(name, config)


def load_source(name: str, split: str, config: str | None = None) -> Dataset:
    """One split of `name`. Single files have one split, "train"; a missing split is an error listing those there."""
    splits = load_splits(name, config)
    if not isinstance(splits, DatasetDict) or split not in splits:
        available = list(splits) if isinstance(splits, DatasetDict) else []
        raise DataFormatError(name, f"no split {split!r}; available splits: {available}", field="split")
    return splits[split]
