"""The one error type for bad input data. Messages always say where: source, row, field."""

from __future__ import annotations


class DataFormatError(ValueError):
    """A row (or a whole source) does not fit the declared/detected format."""

    def __init__(self, source: str, message: str, row: int | None = None, field: str | None = None):
        self.source, self.row, self.field = source, row, field
        where = [source]
        if row is not None:
            where.append(f"row {row} (0-based)")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}")
