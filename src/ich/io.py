"""Atomic file writes and step bookkeeping shared by every step.

A step writes to a temporary file in the destination folder and renames it into place, so a
run killed at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

log = logging.getLogger("ich")


def _read_umask() -> int:
    """The process's umask (reading it means setting it: set and restore at once)."""
    old = os.umask(0)
    os.umask(old)
    return old


# Read once, at import: os.umask is process-wide and not thread-safe to probe on every write.
# mkstemp creates files 0600 whatever the umask; a finished file gets what open() would give.
FILE_MODE = 0o666 & ~_read_umask()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The finished file has the mode a plain open() would give it (0666 less the umask, 0644
    usually), not mkstemp's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():  # the block may have replaced it with a folder or removed it
            os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


# A text cell starting with one of these is run as a formula by spreadsheets (CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# What escaping puts in front of such a cell: spreadsheets show the rest as text.
ESCAPE = "'"
# Space left free on a volume after a large write, for logs, stamps and other processes.
FREE_SPACE_RESERVE = 64 * 2 ** 20


def safe_cell(value):
    """`value` as a spreadsheet shows it, not runs it: a string starting with = + - @ (or a tab
    or carriage return) gets a leading apostrophe. Numbers, and strings that are numbers
    ("-1.5", "+3"), are left alone. A string that already starts with an apostrophe followed by
    one of those characters (or another apostrophe) gets one more, so that `read_cell` gives
    back exactly what was written: ich reads its own CSVs back (patient ids join tables)."""
    if not isinstance(value, str):
        return value
    if _looks_escaped(value):
        return ESCAPE + value
    if not value.startswith(FORMULA_STARTS):
        return value
    try:
        float(value)
        return value
    except ValueError:
        return ESCAPE + value


def read_cell(value):
    """The inverse of `safe_cell`: the apostrophe it added, removed."""
    if isinstance(value, str) and _looks_escaped(value):
        return value[1:]
    return value


def _looks_escaped(value: str) -> bool:
    # The one rule behind safe_cell, read_cell and _ESCAPED_PATTERN (read_arrow_cells).
    return value.startswith(ESCAPE) and value[1:2] in (*FORMULA_STARTS, ESCAPE)


# _looks_escaped as a regular expression, for pyarrow.compute.
_ESCAPED_PATTERN = "^" + re.escape(ESCAPE) + "[" + "".join(re.escape(c) for c in (*FORMULA_STARTS, ESCAPE)) + "]"


def _text_columns(df) -> list:
    from pandas.api.types import is_string_dtype

    # object columns, pandas' "string" dtypes and pandas 3's default `str` dtype
    return [c for c in df.columns if df[c].dtype == object or is_string_dtype(df[c].dtype)]


def escape_formulas(df):
    """A copy of DataFrame `df` whose text cells (object and string columns) pass `safe_cell`;
    column names too. Numeric columns are untouched."""
    out = df.copy()
    for column in _text_columns(out):
        out[column] = out[column].map(safe_cell)
    out.columns = [safe_cell(c) for c in out.columns]
    return out


def read_csv(path: str | Path, **kwargs):
    """A CSV that ich wrote (write_csv, a journal) as a pandas DataFrame, exactly as it was
    before the formula escaping: text cells and column names pass `read_cell`. `kwargs` go to
    pandas.read_csv. Users' own CSVs (labels, reads) are read as they are, without this."""
    import pandas as pd

    df = pd.read_csv(path, **kwargs)
    for column in _text_columns(df):
        df[column] = df[column].map(read_cell)
    df.columns = [read_cell(c) for c in df.columns]
    return df


def read_arrow_cells(table):
    """`read_cell` on every string column of a pyarrow Table (for the steps that read their CSVs
    with pyarrow, to keep memory flat): the table as it was before write_csv's escaping."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for i, field in enumerate(table.schema):
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            column = table.column(i)
            escaped = pc.match_substring_regex(column, _ESCAPED_PATTERN)
            # Escaped cells are rare (ids are not formulas): a column without one is kept as
            # it is, not copied (issue 11: a copy of a 752,803-row id column is 15 MB).
            if pc.any(escaped).as_py():
                table = table.set_column(i, field.name, pc.if_else(escaped, pc.utf8_slice_codeunits(column, 1), column))
    return table


# Rows escaped and written at a time by write_csv: the escaped copy of a block is all it adds.
CSV_BLOCK_ROWS = 100_000


def write_csv(df, path: str | Path) -> Path:
    """Write a pandas DataFrame as CSV atomically (no index column), formulas escaped.

    In blocks of CSV_BLOCK_ROWS rows (the same bytes as one to_csv call), so that a table of
    752,803 rows is never copied whole for the escaping."""
    return write_csv_blocks((df.iloc[start:start + CSV_BLOCK_ROWS]
                             for start in range(0, max(len(df), 1), CSV_BLOCK_ROWS)), path)


def write_csv_blocks(frames: Iterable, path: str | Path) -> Path:
    """Write pandas DataFrames of the same columns, one after the other, as one CSV atomically
    (no index column, the header once, formulas escaped): the bytes of write_csv on their
    concatenation, for a step that makes its table a block at a time. At least one frame
    (maybe empty), or the file is left empty."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            for n, frame in enumerate(frames):
                escape_formulas(frame).to_csv(handle, index=False, header=n == 0)
    return Path(path)


def require_free_space(folder: str | Path, need_bytes: int, what: str) -> None:
    """Raise StepError before a write of `need_bytes` into `folder` that would fill its volume
    (keeping FREE_SPACE_RESERVE free); the message says how much is needed and free."""
    from ich.errors import StepError

    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need_bytes + FREE_SPACE_RESERVE > free:
        raise StepError(f"not enough disk space for {what} in {folder}: needs "
                        f"{need_bytes / 2 ** 20:,.0f} MB (+{FREE_SPACE_RESERVE // 2 ** 20} MB "
                        f"reserve), {free / 2 ** 20:,.0f} MB free; free some space and run again")


def write_json(obj, path: str | Path) -> Path:
    """Write JSON atomically, indented for people to read."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class Timer:
    """Wall-clock seconds since creation; `rate(n)` gives items per second."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        """Seconds elapsed."""
        return time.perf_counter() - self.start

    def rate(self, n: int) -> float:
        """Items per second for `n` items."""
        return n / max(self.seconds, 1e-9)


def summary(step: str, text: str, n: int, unit: str, timer: Timer) -> str:
    """Log and return the one summary line every step ends with: counts, seconds, items/s."""
    line = f"{step}: {text} in {timer.seconds:.1f} s ({timer.rate(n):,.1f} {unit}/s)"
    log.info(line)
    return line


def progress(iterable=None, total: int | None = None, desc: str = "", unit: str = "it"):
    """A tqdm progress bar on stderr, shown on terminals and hidden in logs and CI."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=None, dynamic_ncols=True,
                smoothing=0.05)
