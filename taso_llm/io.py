"""File I/O. Output is atomic: every file the project writes goes through a temp file + rename, so a crash mid-write
never leaves a truncated artifact where a good one is expected. Input of safetensors is checked: a corrupt or truncated
file (an interrupted copy or download, a file from before atomic writes) fails naming the file and what to do."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path in the same directory; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


class CorruptFileError(ValueError):
    """A file exists but cannot be what it claims to be (truncated, wrong format). The message names the file."""


DEFAULT_FIX = "delete it and re-create it (re-run the step that wrote it, or download it again)"
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


def read_safetensors_header(path: str | os.PathLike, what: str = "safetensors file",
                            fix: str = DEFAULT_FIX) -> dict[str, str]:
    """Check that `path` is a complete safetensors file from its header and size alone (no tensor is read) and return
    its `__metadata__`. safetensors itself says only "incomplete metadata, file not fully covered" without the file.

    `what` says what the file is to the reader ("sparse masks", "model weights"); `fix` what to do about a bad one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no file at {path}")

    def corrupt(problem: str) -> CorruptFileError:
        return CorruptFileError(f"{what} {path}: {problem}; the file is corrupt or truncated (an interrupted write, "
                                f"copy or download). To fix: {fix}")

    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise corrupt(f"header length {header_len} exceeds the {size - 8} bytes after it")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise corrupt(f"header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    try:
        data_end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise corrupt("header entries lack valid data_offsets") from None
    expected = 8 + header_len + data_end
    if size != expected:
        raise corrupt(f"{size} bytes, but its header describes {expected}")
    return metadata


def load_safetensors(path: str | os.PathLike, what: str = "safetensors file", fix: str = DEFAULT_FIX,
                     device: str = "cpu") -> dict:
    """All tensors of a checked safetensors file (see read_safetensors_header for the check and the arguments)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    read_safetensors_header(path, what, fix)
    try:
        return load_file(str(path), device=device)
    except SafetensorError as err:  # damage the header check cannot see (e.g. a bad dtype name)
        raise CorruptFileError(f"{what} {path}: cannot be read ({err}). To fix: {fix}") from None
