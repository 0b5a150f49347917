"""Local data files: which builder reads them, and errors that name the file (and line) when one cannot be read.

`datasets.load_dataset` on its own raises a bare StopIteration for an empty file, "Expected object or value at
position 29" for a malformed JSON line, loads non-UTF-8 bytes only to fail later on access, reads CSV numbers as
numbers, and, for a directory of mixed file types, silently reads the most common type and drops the rest. Here:
  * text files (JSON, JSONL, CSV) are checked to be UTF-8 and non-empty before loading;
  * a load that fails is diagnosed (the first line that is not JSON, a file with no rows) naming the file;
  * CSV columns are read as text exactly as written ("007" stays "007", an empty cell is "");
  * a directory must hold one kind of data file; other kinds are refused, by name.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

from datasets import DatasetDict, Features, Value, load_dataset

from taso_llm.data.errors import DataFormatError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
TEXT_BUILDERS = ("json", "csv")
CHUNK_BYTES = 1 << 24


def builder_for(path: Path) -> str | None:
    return BUILDERS.get(path.suffix.lower())


def check_text_file(path: Path) -> None:
    """UTF-8 throughout and not blank. Reads in chunks cut at line ends, so an error knows its line number."""
    lines_before, pending, blank = 0, b"", True
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK_BYTES)
            data = pending + chunk
            end = data.rfind(b"\n") + 1 if chunk else len(data)
            try:
                data[:end].decode("utf-8")
            except UnicodeDecodeError as err:
                line = lines_before + data.count(b"\n", 0, err.start) + 1
                column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
                raise DataFormatError(str(path), f"line {line}, column {column}: not UTF-8 text (byte "
                                                 f"0x{data[err.start]:02x}); re-save the file as UTF-8") from None
            blank = blank and not data[:end].strip()
            lines_before += data.count(b"\n", 0, end)
            pending = data[end:]
            if not chunk:
                break
    if blank:
        raise DataFormatError(str(path), "the file is empty: no rows to read")


def first_json_error(path: Path) -> str | None:
    """Where a JSON / JSON-lines file stops being JSON, as "line N: message", or None if every line parses."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 16).lstrip()
    if head.startswith("["):  # one JSON document (a list of rows)
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            return f"line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})"
        return None
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number}, column {err.colno}: not valid JSON ({err.msg})"
            if not isinstance(row, dict):
                return f"line {number}: expected a JSON object (one row), got {type(row).__name__}"
    return None


def csv_features(files: list[Path]) -> Features:
    """Every CSV column as text; all files must share the first one's header."""
    headers = {}
    for path in files:
        with open(path, encoding="utf-8", newline="") as f:
            headers[path] = next(csv.reader(f), [])
    first, columns = next(iter(headers.items()))
    for path, header in headers.items():
        if header != columns:
            raise DataFormatError(str(path), f"CSV header {header} differs from {columns} in {first}")
    return Features({name: Value("string") for name in columns})


def directory_data_files(directory: Path) -> tuple[str, dict[str, list[Path]]]:
    """(builder, split -> files) for a directory, splits named from file names as `load_dataset(directory)` does.
    Files of another kind than the rest are refused rather than silently left out."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        resolved = DataFilesDict.from_patterns(get_data_patterns(str(directory)), base_path=str(directory))
    except FileNotFoundError:  # datasets' EmptyDatasetError / DataFilesNotFoundError
        raise DataFormatError(str(directory), f"no data files in the directory; expected {sorted(BUILDERS)}",
                              field="dataset_name") from None
    splits = {str(split): [Path(f) for f in files] for split, files in resolved.items()}
    by_kind = defaultdict(list)
    for path in (f for files in splits.values() for f in files):
        by_kind[builder_for(path) or path.suffix.lower() or "(no extension)"].append(path.name)
    if len(by_kind) > 1 or not set(by_kind) <= set(BUILDERS.values()):
        listing = "; ".join(f"{kind}: {', '.join(sorted(names))}" for kind, names in sorted(by_kind.items()))
        raise DataFormatError(str(directory), f"the directory mixes file types ({listing}); a directory is read as "
                                              f"one type, one of {sorted(BUILDERS)}: move the other files out, or "
                                              "give each file its own dataset_mixture entry", field="dataset_name")
    return next(iter(by_kind)), splits


def read_local(label: str, builder: str, splits: dict[str, list[Path]]) -> DatasetDict:
    """load_dataset on explicit files, with every file checked first and any failure tied to a file."""
    files = [f for split_files in splits.values() for f in split_files]
    kwargs = {}
    if builder in TEXT_BUILDERS:
        for path in files:
            check_text_file(path)
    if builder == "csv":
        kwargs = {"features": csv_features(files), "keep_default_na": False}
    try:
        loaded = load_dataset(builder, data_files={split: [str(f) for f in fs] for split, fs in splits.items()},
                              **kwargs)
    except DataFormatError:
        raise
    except Exception as err:  # StopIteration included: datasets raises it bare for some empty inputs
        raise diagnose(label, builder, files, err) from err
    for split, ds in loaded.items():
        if len(ds) == 0:
            raise DataFormatError(label if len(splits[split]) > 1 else str(splits[split][0]), "no rows to read")
    return loaded


def diagnose(label: str, builder: str, files: list[Path], err: BaseException) -> DataFormatError:
    if builder == "json":
        for path in files:
            problem = first_json_error(path)
            if problem:
                return DataFormatError(str(path), problem)
    if isinstance(err, StopIteration) or "corresponds to no data" in str(err):
        return DataFormatError(str(files[0]) if len(files) == 1 else label, "no rows to read (only a header, an empty "
                                                                            "list or blank lines)")
    cause = f"{type(err).__name__}: {err}".strip().rstrip(":")
    return DataFormatError(str(files[0]) if len(files) == 1 else label, f"cannot be read as {builder} ({cause})")
