"""The user's own data files, read with the ``datasets`` library and checked before any training.

Files follow the conventions of transformers' example scripts: ``train_file`` / ``validation_file`` /
``test_file`` in CSV, TSV, JSON lines (``.json``/``.jsonl``), parquet, or a folder written by
``datasets.Dataset.save_to_disk``. Tables load memory-mapped (arrow), so large files never sit in
Python lists. Nothing is dropped silently: every missing column, empty file, empty cell, unreadable
byte or unknown label is reported with the file, the column, the offending value and a count of
rows; the run stops before training unless the user set ``data.drop_invalid_rows=true``, in which
case those rows are dropped and every drop is printed and recorded with the run.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

READERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
FIX = "fix the file, or set data.drop_invalid_rows=true to drop such rows (the run prints and records every drop)"


@dataclass
class Problem:
    """Rows of one file that cannot be used as they are."""

    file: str
    column: str
    what: str
    rows: int
    examples: list[str]

    def __str__(self) -> str:
        shown = ", ".join(self.examples)
        return f"{self.file}: column {self.column!r}: {self.rows} row(s) {self.what}" + (f" ({shown})" if shown else "")


class RowAudit:
    """Collects the problems of every file; raises them all at once, or drops and records the rows."""

    def __init__(self, drop_invalid_rows: bool) -> None:
        self.drop = drop_invalid_rows
        self.problems: list[Problem] = []

    def flag(self, ds: Any, file: str, column: str, bad: np.ndarray, what: str, examples: Sequence[str] = ()) -> Any:
        """Note the rows where ``bad`` is true; with dropping on, return ``ds`` without them."""
        n = int(bad.sum())
        if n == 0:
            return ds
        shown = list(examples) or [f"data row {i + 1}" for i in np.flatnonzero(bad)]  # 1-based, header excluded
        self.problems.append(Problem(file, column, what, n, shown[:5]))
        return ds.select(np.flatnonzero(~bad)) if self.drop else ds

    def finish(self, progress: bool = True) -> None:
        """Raise every problem found (the default), or print the rows dropped."""
        if not self.problems:
            return
        lines = "\n  ".join(str(p) for p in self.problems)
        if not self.drop:
            raise ValueError(f"the data has rows that cannot be used:\n  {lines}\n{FIX}")
        if progress:
            print(f"data.drop_invalid_rows: dropped\n  {lines}")

    def record(self) -> list[dict[str, Any]]:
        """The drops, for results.json and the run folder's data.json."""
        return [asdict(p) for p in self.problems] if self.drop else []


def _unicode_error(err: BaseException) -> UnicodeDecodeError | None:
    while err is not None:
        if isinstance(err, UnicodeDecodeError):
            return err
        err = err.__cause__ or err.__context__
    return None


def read_table(path: str | Path, setting: str) -> Any:
    """One file (or ``save_to_disk`` folder) as a memory-mapped ``datasets.Dataset``; clear errors otherwise."""
    import datasets

    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{setting} {path} does not exist (was it moved or deleted? give its place with --set {setting}=PATH)")
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as err:
            raise ValueError(f"{setting} {path} is a folder but not one written by datasets' save_to_disk ({err})") from None
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(f"{setting} {path} holds several splits {sorted(ds)}: point at one of them, e.g. {path}/{next(iter(ds))}")
    else:
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise ValueError(f"{setting} {path}: unknown file type {path.suffix!r}; use one of {sorted(READERS)} or a save_to_disk folder")
        if path.stat().st_size == 0:
            raise ValueError(f"{setting} {path} is empty (0 rows)")
        options: dict[str, Any] = {}
        if reader == "csv":  # empty cells stay empty strings (no NaN), so they are found and reported as such
            options = {"keep_default_na": False, "sep": "\t" if path.suffix.lower() == ".tsv" else ","}
        with _quiet():
            try:
                ds = datasets.load_dataset(reader, data_files=str(path), split="train", **options)
            except Exception as err:  # datasets wraps the reader's error; name the cause
                bad = _unicode_error(err)
                if bad is not None:
                    raise ValueError(f"{setting} {path} is not UTF-8 text: byte {bad.object[bad.start:bad.start + 1]!r} at "
                                     f"position {bad.start} ({bad.reason}); re-save the file as UTF-8") from None
                if "corresponds to no data" in str(err):  # a header and nothing else
                    raise ValueError(f"{setting} {path} holds no rows") from None
                raise ValueError(f"{setting} {path} could not be read as {reader}: {err.__cause__ or err}") from None
    if len(ds) == 0:
        raise ValueError(f"{setting} {path} holds no rows")
    return ds


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars while datasets converts a file (the tokenisation bar is the one that matters)."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def progress_over(rows: int, threshold: int = 2000) -> Iterator[None]:
    """Show datasets' progress bars only for work over ``threshold`` rows."""
    if rows > threshold:
        yield
    else:
        with _quiet():
            yield


def require_columns(ds: Any, file: str, setting: str, columns: Sequence[str]) -> None:
    """Refuse a file that lacks a needed column, naming the file, the column and the columns it has."""
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(f"{file}: no column {missing[0]!r} ({setting}); the file's columns are {ds.column_names}. "
                         f"Set {setting} to one of them")


def empty_cells(ds: Any, column: str) -> np.ndarray:
    """Rows whose ``column`` is missing, null, or (for text) empty after stripping spaces."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = ds.data.column(column)
    bad = pc.is_null(col)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        bad = pc.or_(bad, pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0))
    elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        bad = pc.or_(bad, pc.equal(pc.list_value_length(col), 0))
    return np.asarray(pc.fill_null(bad, True).to_numpy(zero_copy_only=False), dtype=bool)


def label_key(value: Any) -> str:
    """A label as the text it is known by (labels may be strings or integers)."""
    return str(value).strip() if not isinstance(value, float) or not value.is_integer() else str(int(value))


def label_values(ds: Any, column: str) -> list[str]:
    """Every row's label as text, in row order."""
    return [label_key(v) for v in ds.data.column(column).to_pylist()]


def sorted_labels(keys: set[str]) -> list[str]:
    """The label list of a training file: numeric labels in numeric order, others alphabetically."""
    try:
        return sorted(keys, key=int)
    except ValueError:
        return sorted(keys)


def unknown_labels(keys: list[str], known: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """(rows whose label is not in ``known``, examples naming each such label, its count and a near spelling)."""
    index = set(known)
    lower = {k.lower(): k for k in known}
    bad = np.fromiter((k not in index for k in keys), dtype=bool, count=len(keys))
    counts = Counter(k for k in keys if k not in index)
    examples = []
    for value, n in counts.most_common():
        hint = f", the training labels spell it {lower[value.lower()]!r}" if value.lower() in lower else ""
        examples.append(f"{value!r}: {n} row(s){hint}")
    return bad, examples
