"""Append-only CSV journals: a step's finished rows, on disk before they count as done, and
merged back without holding them all.

In: rows (dicts of strings) as a step finishes them, in chunks. Out: journal parts
(`<journal>/parts/<token>-<seq>.csv`, each written whole by temp-and-rename and fsync'd, its rows
sorted by the step's key), and, read back, `latest`: the rows of the step's previous tables and
of every part as one stream sorted by the key, one row per key, the last written winning.

Memory stays flat at any size: parts are sorted in runs of RUN_ROWS rows (spilled to scratch
files beside the journal when there are more) and merged with the previous tables, which are
sorted already, by heapq.merge: only one row per open file is held. Used by the preprocess and
index steps (steps/preprocess.py, steps/index.py) for their resume journals.
"""

from __future__ import annotations

import csv
import heapq
import itertools
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from ich.errors import StepError
from ich.io import atomic_path, read_cell, safe_cell

PARTS = "parts"            # folder of the journal parts inside a step's journal folder
SCRATCH = "merge"          # folder of the sorted runs while merging (removed after)
RUN_ROWS = 20_000          # part rows sorted in memory at once (~15 MB of Python lists)
FAN_IN = 200               # files merged at once: well under the usual limit of 1,024 open files


def write_rows(path: Path, columns: Sequence[str], rows: Iterable[dict], sync: bool = False) -> int:
    """Write `rows` (dicts; keys beyond `columns` ignored, missing ones empty) as a CSV, atomically
    (temp file + rename), formulas escaped (ich.io.safe_cell; read_rows undoes it); `sync` also
    forces it to disk first. Returns the number of rows."""
    n = 0
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({key: safe_cell(value) for key, value in row.items()})
                n += 1
            if sync:
                handle.flush()
                os.fsync(handle.fileno())
    return n


def write_part(journal: Path, name: str, columns: Sequence[str], rows: list[dict], key: str) -> Path:
    """Write `rows` as the journal part `<journal>/parts/<name>.csv`, sorted by `key`, whole or
    not at all, and on disk (fsync) before the call returns: only then do they count as done."""
    path = journal / PARTS / f"{name}.csv"
    write_rows(path, columns, sorted(rows, key=lambda row: row[key]), sync=True)
    return path


def parts(journal: Path) -> list[Path]:
    """The journal's parts in the order they were written (names start with a zero-padded token
    and sequence number; a killed write leaves only a dot-named temporary file, never a part)."""
    return sorted((journal / PARTS).glob("[0-9]*.csv"))


def read_rows(path: Path, columns: Sequence[str]) -> Iterator[dict]:
    """The rows of a CSV as dicts of strings with every one of `columns` ('' where absent), one
    at a time; nothing when the file does not exist."""
    for values in _read_lists(path, columns):
        yield dict(zip(columns, values))


def latest(tables: Sequence[Path], journal: Path, columns: Sequence[str], key: str) -> Iterator[dict]:
    """One row per `key`, in key order: the rows of `tables` (CSVs sorted by `key`, e.g. the
    step's output of its last consolidation), then of the journal's parts, a later one winning
    over an earlier one with the same key. StepError when a table is not sorted."""
    index = list(columns).index(key)
    scratch = journal / SCRATCH
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        sources = [_checked(path, columns, index) for path in tables]
        sources += _sorted_runs(parts(journal), columns, index, scratch)
        merged = heapq.merge(*sources, key=lambda values: values[index])  # stable: later sources last
        for _, group in itertools.groupby(merged, key=lambda values: values[index]):
            *_, last = group
            yield dict(zip(columns, last))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def reset(journal: Path) -> None:
    """Forget the journal's parts (after a consolidation, or when the settings changed)."""
    shutil.rmtree(journal / PARTS, ignore_errors=True)
    shutil.rmtree(journal / SCRATCH, ignore_errors=True)


def _read_lists(path: Path, columns: Sequence[str]) -> Iterator[list[str]]:
    """A CSV's rows as lists of strings in `columns` order ('' for a column it lacks), the
    formula escaping of write_rows undone."""
    if not path.is_file():
        return
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return
        where = {name: i for i, name in enumerate(header)}
        positions = [where.get(column) for column in columns]
        width = len(header)
        for values in reader:
            if len(values) < width:
                values = values + [""] * (width - len(values))
            yield ["" if p is None else read_cell(values[p]) for p in positions]


def _checked(path: Path, columns: Sequence[str], index: int) -> Iterator[list[str]]:
    """_read_lists, raising StepError when the key goes down (merging needs sorted tables)."""
    previous = None
    for line, values in enumerate(_read_lists(path, columns), start=2):
        if previous is not None and values[index] < previous:
            raise StepError(f"{path} is not sorted by {columns[index]} (line {line}); it is not "
                            "the file ich wrote: delete it and run the step again")
        previous = values[index]
        yield values


def _sorted_runs(paths: list[Path], columns: Sequence[str], index: int,
                 scratch: Path) -> list[Iterable[list[str]]]:
    """The rows of `paths`, in order, as sorted runs of at most RUN_ROWS rows each (a stable
    sort: within a run, a later part's row stays after an earlier one's). One run stays in
    memory; more are spilled to `scratch` and, past FAN_IN of them, merged down to FAN_IN."""
    runs: list[Path] = []
    rows: list[list[str]] = []

    def spill() -> None:
        rows.sort(key=lambda values: values[index])
        runs.append(_write_run(scratch / f"run-{len(runs):06d}.csv", columns, rows))
        rows.clear()

    for path in paths:
        rows.extend(_read_lists(path, columns))
        if len(rows) >= RUN_ROWS:
            spill()
    if not runs:
        rows.sort(key=lambda values: values[index])
        return [rows] if rows else []
    if rows:
        spill()
    level = 0
    while len(runs) > FAN_IN:
        level += 1
        merged = []
        for start in range(0, len(runs), FAN_IN):
            group = runs[start:start + FAN_IN]
            stream = heapq.merge(*(_read_lists(p, columns) for p in group), key=lambda v: v[index])
            merged.append(_write_run(scratch / f"run-{level}-{len(merged):06d}.csv", columns, stream))
            for done in group:
                done.unlink()
        runs = merged
    return [_read_lists(p, columns) for p in runs]


def _write_run(path: Path, columns: Sequence[str], rows: Iterable[list[str]]) -> Path:
    """A sorted run on scratch space (no fsync: it lives only for one merge)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path
