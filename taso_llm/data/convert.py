"""Apply a format converter to a whole dataset: detect the format, check columns, convert every row.

Conversion is also the validation pass: it runs before any tokenization, and the first bad row stops it with a
`DataFormatError` naming the source, the (0-based) row index and the field.
"""

from __future__ import annotations

from datasets import Dataset

from taso_llm.data.errors import DataFormatError
from taso_llm.data.formats import CONVERTERS, FORMATS, REQUIRED_COLUMNS, RowError, matching_formats
from taso_llm.data.schema import FEATURES
from taso_llm.data.standard import STANDARD_FEATURES, standard_row


def detect_format(columns: list[str], requested: str, source: str) -> str:
    """Resolve `auto` from the columns; check an explicit format's columns are there. Errors list the columns seen."""
    if requested != "auto":
        if requested not in CONVERTERS:
            raise DataFormatError(source, f"unknown dataset_format {requested!r}; expected auto or one of "
                                          f"{list(FORMATS)}", field="dataset_format")
        if not any(sig <= set(columns) for sig in REQUIRED_COLUMNS[requested]):
            wanted = " or ".join(str(sorted(sig)) for sig in REQUIRED_COLUMNS[requested])
            raise DataFormatError(source, f"format {requested!r} needs columns {wanted}; columns seen: {columns}",
                                  field="dataset_format")
        return requested
    found = matching_formats(columns)
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataFormatError(source, f"cannot detect the format from columns {columns}; set dataset_format to one "
                                      f"of {list(FORMATS)}", field="dataset_format")
    raise DataFormatError(source, f"ambiguous format: columns {columns} match {found}; set dataset_format",
                          field="dataset_format")


def convert_dataset(ds: Dataset, fmt: str, source: str, standard: bool = False) -> Dataset:
    """Convert `ds` (format name or auto) to the common schema, or with `standard` to plain prompt/completion text
    (standard.py). Row indices in errors are positions in `ds`."""
    fmt = detect_format(list(ds.column_names), fmt, source)
    converter = CONVERTERS[fmt]

    def convert_row(row: dict, index: int) -> dict:
        try:
            converted = converter(row)
            return standard_row(converted, fmt, row.get("prompt")) if standard else converted
        except RowError as err:
            raise DataFormatError(source, str(err), row=index, field=err.field) from None

    # No cache files: a converted copy is cheap to rebuild, and a stale cache must never hide a validation error.
    return ds.map(convert_row, with_indices=True, remove_columns=list(ds.column_names),
                  features=STANDARD_FEATURES if standard else FEATURES, load_from_cache_file=False,
                  desc=f"Converting {source} ({fmt}{', standard' if standard else ''})")
