"""Dataclasses from YAML mappings, with every unknown or missing key named as `where.key` (the comparison and task
arithmetic configs both build theirs this way)."""

from __future__ import annotations

from dataclasses import MISSING, fields


def build_dataclass(cls, values, where: str, error: type[Exception] = ValueError, **fixed):
    """cls(**fixed, **values); `fixed` fields are set by the caller and may not appear in `values`."""
    if not isinstance(values, dict):
        raise error(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name for f in fields(cls)} - set(fixed)
    unknown = set(values) - known
    if unknown:
        raise error(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(known)}")
    missing = sorted(f.name for f in fields(cls) if f.name not in values and f.name not in fixed
                     and f.default is MISSING and f.default_factory is MISSING)
    if missing:
        raise error(f"{where}: missing field(s) {missing}")
    return cls(**fixed, **values)
