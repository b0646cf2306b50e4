"""The index step's consolidation: previous tables + journal -> index.parquet and index_failures.csv.

In: the previous work/index.parquet and index_failures.csv, the journal's parts (one CSV of
header rows per finished chunk; a file read twice has a row in each) and the sorted names of the
files still in the folder. Out: index.parquet (the last row of each file still present, one file
per image id, sorted by image id, every series ranked along its slice normal, written in row
groups of WRITE_ROWS rows with the schema and pandas metadata pandas wrote) and
index_failures.csv (sorted by file).

Flat memory (issue 11): the rows never sit in memory as one table. They are first written, a
group of GROUP_ROWS rows at a time, to a column store on disk (one Arrow IPC file per column in
the journal's scratch folder SCRATCH); which rows are kept, their order and their ranks are
worked out on the few columns that decide them, read one or two at a time; each output column
is then read, put in image id order and written back to the store, and index.parquet is
assembled from the sorted columns a row group at a time. The main process holds about two
columns and a few index arrays, not the table (about 150 bytes an image, plus its allocator's
fragments). Same rows, ranks and failures as the pandas consolidation of before issue 11
(tests/test_index.py).
"""

from __future__ import annotations

import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import numpy as np

from ich import journal
from ich.data.arrays import name_bytes, sorted_codes
from ich.data.index import FAILURE_COLUMNS, INDEX_COLUMNS
from ich.errors import StepError
from ich.io import atomic_path, read_arrow_cells

JOURNAL_COLUMNS = INDEX_COLUMNS + ("reason",)
FLOAT_COLUMNS = ("normal_x", "normal_y", "normal_z", "position", "pixel_spacing")
INT_COLUMNS = ("rows", "columns", "rank", "series_size")
SCRATCH = "consolidate"   # folder of the column store inside the journal folder (removed after)
GROUP_ROWS = 65_536       # journal rows read before they are compacted and written to the store
WRITE_ROWS = 65_536       # rows of an index.parquet row group (what pandas' writer used)
NAME_BLOCK = 65_536       # names turned into numpy bytes at a time


def consolidate(work: Path, journal_dir: Path, seen: np.ndarray, out: Path,
                failures_csv: Path) -> tuple[int, int, int]:
    """Previous tables + journal -> index.parquet (ranked) and index_failures.csv, for the
    files still present (`seen`: sorted name bytes); empty the journal. Returns (indexed,
    failed, series) counts. The scratch store is removed after, and rebuilt from the sources by
    a run that finds one left by a killed run."""
    import pyarrow as pa
    import pyarrow.compute as pc

    store = journal_dir / SCRATCH
    shutil.rmtree(store, ignore_errors=True)
    try:
        _store_sources(work, journal_dir, out, failures_csv, store)
        files = read_column(store, "file")
        # The last row written of each file (sort_indices is stable: a file's rows stay in order).
        rows = pc.sort_indices(files).to_numpy()
        last = np.ones(len(rows), dtype=bool)
        if len(rows) > 1:
            in_order = files.take(rows)
            last[:-1] = pc.not_equal(in_order[:-1], in_order[1:]).to_numpy(zero_copy_only=False)
            del in_order
        rows = rows[last]
        del last
        # Only files still in the folder.
        present = np.concatenate([np.zeros(0, dtype=bool)] + [
            member(name_bytes(files.take(rows[start:start + NAME_BLOCK])), seen)
            for start in range(0, len(rows), NAME_BLOCK)])
        rows = rows[present]
        del present
        reasons = read_column(store, "reason")
        failed = pc.not_equal(reasons.take(rows), "").to_numpy(zero_copy_only=False)
        bad_rows, good = rows[failed], rows[~failed]
        del rows, failed

        # One image id, one file: a second file with the same name in another subfolder would
        # make every later join ambiguous. Sorted by (image id, file), the first of each id is kept.
        ids = read_column(store, "image_id")
        by_id = pc.sort_indices(pa.table({"image_id": ids.take(good), "file": files.take(good)}),
                                sort_keys=[("image_id", "ascending"), ("file", "ascending")]).to_numpy()
        good = good[by_id]
        del by_id
        in_order = ids.take(good)
        dup = np.zeros(len(good), dtype=bool)
        if len(good) > 1:
            dup[1:] = pc.equal(in_order[1:], in_order[:-1]).to_numpy(zero_copy_only=False)
        del in_order
        columns = {"image_id": ids, "file": files, "reason": reasons}
        failures = _rows(columns, bad_rows, FAILURE_COLUMNS)
        if dup.any():
            first = np.maximum.accumulate(np.where(dup, 0, np.arange(len(good))))
            first_file = _rows(columns, good[first[dup]], ("file",))
            for row, also in zip(_rows(columns, good[dup], FAILURE_COLUMNS), first_file):
                row["reason"] = f"duplicate image id (also {also['file']})"
                failures.append(row)
            good = good[~dup]
        del dup, columns, ids, files, reasons
        pa.default_memory_pool().release_unused()

        rank, size, n_series = ranks(read_column(store, "series_id"), read_column(store, "position"), good)
        failures.sort(key=lambda row: row["file"])
        _replace_outputs(store, good, rank, size, out, failures, failures_csv)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    # Last: until both tables are in place, the journal holds what a rerun needs to redo this.
    journal.reset(journal_dir)
    return len(good), len(failures), n_series


def _replace_outputs(store: Path, good: np.ndarray, rank: np.ndarray, size: np.ndarray, out: Path,
                     failures: list[dict], failures_csv: Path) -> None:
    """Write the new index.parquet and index_failures.csv beside the old ones, then swap them in
    an order that leaves a consistent state wherever a kill lands: the old failures are removed
    first, then the new index.parquet is renamed into place, then the new failures. A kill
    leaves the old pair, or either index.parquet without index_failures.csv (an output missing:
    the step's record says so and `ich index` runs again; the files failed before are then not
    known and read again, those of this run are still in the journal), or the new pair. Never
    one table of this run beside the other of the last: a file failed now would be in neither,
    one made a duplicate now (its good row in the old index.parquet) in both."""
    with atomic_path(failures_csv) as failures_tmp:
        journal.write_rows(failures_tmp, FAILURE_COLUMNS, failures)
        with atomic_path(out) as parquet_tmp:
            _write_index(store, good, rank, size, parquet_tmp)
            failures_csv.unlink(missing_ok=True)
        # index.parquet is renamed into place here, index_failures.csv when this block ends.


def ranks(series, position, good: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """rank (0 = lowest position in its series, -1 without a position or a series) and
    series_size of the rows `good` of the columns `series` (strings) and `position` (floats),
    in that order (image id order), and the number of distinct non-empty series:
    `ich.data.index.rank_series`'s rule (ties of position broken by image id) on numpy arrays."""
    import pyarrow.compute as pc

    rank = np.full(len(good), -1, dtype=np.int32)
    size = np.zeros(len(good), dtype=np.int32)
    if not len(good):
        return rank, size, 0
    key, values = sorted_codes(series.take(good))
    empty = pc.index(values, "").as_py()   # -1 when every row has a series
    named = key != empty
    # Every distinct value is some row's series: the named series are the others.
    n_series = len(values) - (empty >= 0)
    position = position.take(good).to_numpy(zero_copy_only=False)
    valid = np.flatnonzero(named & ~np.isnan(position))
    # `good` is in image id order: a row's place in it breaks ties of position by image id.
    ranked = valid[np.lexsort((valid, position[valid], key[valid]))]
    group = key[ranked]
    starts = np.flatnonzero(np.concatenate([[True], group[1:] != group[:-1]])) if len(ranked) else ranked
    lengths = np.diff(np.concatenate([starts, [len(ranked)]]))
    rank[ranked] = np.arange(len(ranked)) - np.repeat(starts, lengths)
    size[ranked] = np.repeat(lengths, lengths)
    return rank, size, n_series


def member(names: np.ndarray, sorted_names: np.ndarray) -> np.ndarray:
    """For each of `names`, whether it is in the sorted array `sorted_names`."""
    if not len(sorted_names) or not len(names):
        return np.zeros(len(names), dtype=bool)
    where = np.minimum(np.searchsorted(sorted_names, names), len(sorted_names) - 1)
    return sorted_names[where] == names


def read_column(store: Path, name: str):
    """One column of the store, read whole (not memory-mapped: only what is read is held) as
    one Arrow array."""
    import pyarrow as pa

    with pa.OSFile(str(store / f"{name}.arrow")) as handle:
        return pa.ipc.open_file(handle).read_all().column(0).combine_chunks()


def _store_sources(work: Path, journal_dir: Path, out: Path, failures_csv: Path, store: Path) -> None:
    """Write the rows of the previous index.parquet, index_failures.csv and the journal's parts,
    in that order, to the column store `store` (one IPC file per JOURNAL_COLUMNS column, a
    record batch per group)."""
    import pyarrow as pa

    store.mkdir(parents=True)
    schema = _compact(_empty_part()).schema
    with ExitStack() as stack:
        writers = {field.name: stack.enter_context(pa.ipc.new_file(str(store / f"{field.name}.arrow"),
                                                                   pa.schema([field])))
                   for field in schema}
        for group in _groups(work, journal_dir, out, failures_csv):
            for field in schema:
                writers[field.name].write_batch(pa.record_batch([group[field.name].combine_chunks()],
                                                                schema=pa.schema([field])))
            del group
            # The small tables of the parts are freed: hand their pages back, or they stay in
            # the process as allocator fragments.
            pa.default_memory_pool().release_unused()


def _groups(work: Path, journal_dir: Path, out: Path, failures_csv: Path) -> Iterator:
    """The sources' rows as compact tables (see `_compact`) of about GROUP_ROWS rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if out.is_file():
        for batch in pq.ParquetFile(out).iter_batches(batch_size=GROUP_ROWS):
            table = pa.Table.from_batches([batch])
            yield _compact(table.append_column("reason", pa.array([""] * len(table), pa.string())))
    pending, rows = [], 0
    for path in [failures_csv, *journal.parts(journal_dir)]:
        if not path.is_file():
            continue
        pending.append(read_part(path))
        rows += pending[-1].num_rows
        if rows >= GROUP_ROWS:
            yield _compact(pa.concat_tables(pending))
            pending, rows = [], 0
    if pending:
        yield _compact(pa.concat_tables(pending))


def _write_index(store: Path, good: np.ndarray, rank: np.ndarray, size: np.ndarray, out: Path) -> None:
    """index.parquet's content, written to `out` (a temporary path: _replace_outputs renames it):
    the rows `good` of the store, in that order, with their ranks and sizes.

    Each column is read, put in order and written to the store's sorted/ folder in batches of
    WRITE_ROWS rows; then the parquet file is written a row group at a time from those batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _parquet_schema()
    folder = store / "sorted"
    folder.mkdir()
    pool = pa.default_memory_pool()
    for field in schema:
        if field.name == "rank":
            values = pa.array(rank, pa.int32())
        elif field.name == "series_size":
            values = pa.array(size, pa.int32())
        else:
            values = read_column(store, field.name).take(good).cast(field.type)
        with pa.ipc.new_file(str(folder / f"{field.name}.arrow"), pa.schema([field])) as writer:
            for start in range(0, max(len(good), 1), WRITE_ROWS):
                writer.write_batch(pa.record_batch([values.slice(start, WRITE_ROWS)], schema=pa.schema([field])))
        del values
        pool.release_unused()
    with ExitStack() as stack:
        readers = [pa.ipc.open_file(stack.enter_context(pa.OSFile(str(folder / f"{field.name}.arrow"))))
                   for field in schema]
        with pq.ParquetWriter(out, schema) as writer:
            for i in range(readers[0].num_record_batches):
                writer.write_table(pa.Table.from_arrays([reader.get_batch(i).column(0) for reader in readers],
                                                        schema=schema))


def _rows(columns: dict, rows: np.ndarray, names) -> list[dict]:
    """The rows `rows` of the string arrays `columns` as dicts of `names`: for the failure rows."""
    values = [columns[name].take(rows).to_pylist() for name in names]
    return [dict(zip(names, cells)) for cells in zip(*values)]


def _read_types() -> dict:
    """Arrow types journal CSVs are read with: numbers as float64 (an empty cell is null)."""
    import pyarrow as pa

    return {column: pa.float64() if column in FLOAT_COLUMNS or column in INT_COLUMNS else pa.string()
            for column in JOURNAL_COLUMNS}


def _empty_part():
    import pyarrow as pa

    return pa.table({column: pa.array([], kind) for column, kind in _read_types().items()})


def read_part(path: Path, columns=JOURNAL_COLUMNS):
    """One journal CSV (or index_failures.csv) as an Arrow table of `columns` (of
    JOURNAL_COLUMNS), a column it lacks null."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    types = _read_types()
    try:
        table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(use_threads=False),
                               convert_options=pacsv.ConvertOptions(
                                   column_types={column: types[column] for column in columns},
                                   include_columns=list(columns), include_missing_columns=True,
                                   strings_can_be_null=False, quoted_strings_can_be_null=False))
    except (pa.ArrowInvalid, OSError) as err:
        raise StepError(f"index: cannot read {path} ({err}); delete it, or run `ich index --force` "
                        "to index every file again") from err
    # The journal escaped formula-like cells (a PatientID "=..."): the table holds them as they were.
    return read_arrow_cells(table)


def _compact(table):
    """Journal columns in their stored types: strings ('' where empty), floats (NaN where empty)
    and int32 (0 where empty)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = []
    for column in JOURNAL_COLUMNS:
        values = table[column]
        if column in FLOAT_COLUMNS:
            values = pc.fill_null(values.cast(pa.float64()), float("nan"))
        elif column in INT_COLUMNS:
            values = pc.fill_null(values.cast(pa.float64()), 0.0).cast(pa.int32(), safe=False)
        else:
            values = pc.fill_null(values.cast(pa.string()), "")
        columns.append(values)
    return pa.Table.from_arrays(columns, names=list(JOURNAL_COLUMNS)).combine_chunks()


def _parquet_schema():
    """index.parquet's schema as pandas writes it (large strings, float64, int32 and the pandas
    metadata), so that every reader sees the table it saw before."""
    import pandas as pd
    import pyarrow as pa

    frame = pd.DataFrame({column: pd.Series([], dtype="float64" if column in FLOAT_COLUMNS else
                                            "int32" if column in INT_COLUMNS else "str")
                          for column in INDEX_COLUMNS})
    return pa.Schema.from_pandas(frame, preserve_index=False)
