"""Step 0, index: every DICOM header of paths.dicom_dir, read once -> work/index.parquet.

In: the source folder (RSNA: 752,803 files in one folder; subfolders are walked too) and the
`index` config section. Out: work/index.parquet (one row per readable file, columns
ich.data.index.INDEX_COLUMNS, sorted by image_id, each series ranked along its slice normal)
and work/index_failures.csv (image_id, file, reason; always written, maybe only a header).

Headers only: pydicom stops before the pixel data and parses only the tags the index needs.
The folder is listed as a stream (os.scandir) and handed to the workers in chunks, with a
bounded number of chunks in flight, so memory stays flat while reading: the parent holds only
the names seen and the small rows of finished chunks on disk.

Resume: each finished chunk's rows go to the journal (work/.index/parts/, one fsync'd CSV per
chunk, written atomically); a killed run restarts from the journal and skips every file it
records. A rerun after files were added reads only the new ones.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np

from ich import journal
from ich.config import resolve_workers
from ich.constants import INDEX_FAILURES_CSV, INDEX_PARQUET
from ich.data.index import FAILURE_COLUMNS, INDEX_COLUMNS, HeaderError, read_header
from ich.errors import StepError
from ich.io import Timer, atomic_path, progress, read_arrow_cells, summary, write_json
from ich.stamps import Stamp, must_run, record, record_path

log = logging.getLogger("ich")

JOURNAL_DIR = ".index"          # step-internal resume state: parts/*.csv
METHOD = "header-index/v1"      # bump when the row layout changes, so old indexes are redone
_JOURNAL_COLUMNS = INDEX_COLUMNS + ("reason",)
_IN_FLIGHT_PER_WORKER = 3       # chunks queued per worker: enough to keep it busy, bounded memory
_FAILURES_LOGGED = 10
_FLOAT_COLUMNS = ("normal_x", "normal_y", "normal_z", "position", "pixel_spacing")
_INT_COLUMNS = ("rows", "columns", "rank", "series_size")
# Few distinct values per image: held as Arrow dictionaries while consolidating.
_DICTIONARY_COLUMNS = ("patient_id", "study_id", "series_id", "modality", "image_type", "orientation")
_LIST_BLOCK = 65_536             # names per numpy block while listing and checking the folder
_GROUP_ROWS = 65_536             # journal rows read before they are compacted into one table
_WRITE_ROWS = 65_536             # index.parquet rows written at a time


def stamps(cfg: dict) -> list[Stamp]:
    """What the index depends on: the source folder, its modification time (a file added or
    removed changes it; the folder is never listed here: 752,803 files on RSNA) and the row
    layout."""
    work, source = Path(cfg["paths"]["work_dir"]), Path(cfg["paths"]["dicom_dir"])
    mtime = source.stat().st_mtime_ns if source.exists() else None
    return [Stamp("index", work, settings={"dicom_dir": str(source.resolve()), "dir_mtime": mtime,
                                           "method": METHOD},
                  outputs=[work / INDEX_PARQUET, work / INDEX_FAILURES_CSV])]


def run(cfg: dict, force: bool = False) -> Path:
    """Index every DICOM header under paths.dicom_dir; return the path of index.parquet."""
    work = Path(cfg["paths"]["work_dir"])
    source = Path(cfg["paths"]["dicom_dir"])
    out, failures_csv, journal_dir = work / INDEX_PARQUET, work / INDEX_FAILURES_CSV, work / JOURNAL_DIR
    if not source.is_dir():
        raise StepError(f"{source} not found; set paths.dicom_dir to the folder of DICOM files")
    [stamp] = stamps(cfg)
    if not must_run("index", stamp, force, out):
        return out
    if force or _journal_method(journal_dir) != METHOD:
        # Rows of another layout (or --force) are never mixed into the new index.
        _reset(work, journal_dir)
        write_json({"method": METHOD}, journal_dir / "settings.json")

    timer = Timer()
    known = _known_files(work, journal_dir)
    seen_blocks: list[np.ndarray] = []
    counts = _read_all(source, work, journal_dir, known, seen_blocks, cfg["index"])
    seen = np.unique(np.concatenate(seen_blocks)) if seen_blocks else np.array([], dtype="S1")
    del known, seen_blocks
    if not len(seen):
        raise StepError(f"no .dcm files under {source}; set paths.dicom_dir to the folder of DICOM files")
    n_ok, n_failed, n_series = _consolidate(work, journal_dir, seen, out, failures_csv)
    line = summary("index", f"{n_ok:,} headers of {n_series:,} series indexed, {n_failed:,} failed "
                   f"({counts['read']:,} read now, {len(seen) - counts['read']:,} already done)",
                   counts["read"], "files", timer)
    record(stamp, line)
    return out


def read_chunk(files: list[str], root: str) -> list[dict]:
    """Read the headers of `files` (names relative to `root`); one journal row per file.

    Runs in a worker. A file that fails gets a row with its reason, never an exception.
    """
    rows = []
    for file in files:
        try:
            row = read_header(Path(root) / file, root)
            row["reason"] = ""
        except HeaderError as err:
            row = _failure(file, str(err))
        except Exception as err:  # noqa: BLE001 - one bad file must never stop the others
            row = _failure(file, f"{type(err).__name__}: {err}")
        rows.append(row)
    return rows


def walk_dicoms(root: Path) -> Iterator[str]:
    """Names (relative to root, '/'-separated) of the .dcm files under root, as a stream.

    os.scandir yields entries as the directory is read: a 752k-file folder is never held as
    one list. Hidden files and folders (temporary copies) are left out.
    """
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(root / rel if rel else root) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                name = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append(name)
                elif entry.name.lower().endswith(".dcm"):
                    yield name


def _read_all(source: Path, work: Path, journal_dir: Path, known: np.ndarray,
              seen: list[np.ndarray], settings: dict) -> dict:
    """Stream the folder into chunks for the pool, journalling each chunk as it finishes.

    `known`: the sorted names (bytes) already indexed. The names listed are appended to `seen`
    as numpy blocks (about 20 bytes a name, where a set of strings took about 90)."""
    counts = {"read": 0, "failed": 0}
    workers = max(1, resolve_workers(settings["workers"]))
    chunk_size = max(1, int(settings["chunk_size"]))

    def unknown(block: list[str]) -> Iterator[str]:
        encoded = _names_array(block)
        seen.append(encoded)
        for name, done in zip(block, _member(encoded, known)):
            if not done:
                yield name

    def todo() -> Iterator[str]:
        block: list[str] = []
        for name in walk_dicoms(source):
            block.append(name)
            if len(block) == _LIST_BLOCK:
                yield from unknown(block)
                block = []
        if block:
            yield from unknown(block)

    names = todo()
    chunks = iter(lambda: list(islice(names, chunk_size)), [])
    token = f"{time.time_ns():020d}"
    with progress(desc="index", unit="file") as bar:
        for seq, rows in enumerate(_results(chunks, str(source), workers, settings["pool"])):
            journal.write_part(journal_dir, f"{token}-{seq:07d}", _JOURNAL_COLUMNS, rows, "file")
            for row in rows:
                counts["read"] += 1
                if row["reason"]:
                    counts["failed"] += 1
                    if counts["failed"] <= _FAILURES_LOGGED:
                        log.warning("index: %s: %s", row["file"], row["reason"])
            bar.update(len(rows))
    if counts["failed"] > _FAILURES_LOGGED:
        log.warning("index: %d more failures, all listed in %s", counts["failed"] - _FAILURES_LOGGED,
                    work / INDEX_FAILURES_CSV)
    return counts


def _results(chunks: Iterator[list[str]], root: str, workers: int, pool_kind: str):
    """Yield each chunk's rows as it finishes, keeping at most a few chunks per worker queued."""
    if workers == 1:
        for files in chunks:
            yield read_chunk(files, root)
        return
    if pool_kind == "thread":
        pool = ThreadPoolExecutor(max_workers=workers)
    else:
        # spawn: workers start clean (no inherited threads or locks from the parent) on every OS.
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    limit = workers * _IN_FLIGHT_PER_WORKER
    try:
        pending = set()
        for files in chunks:
            pending.add(pool.submit(read_chunk, files, root))
            if len(pending) >= limit:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
    except BrokenProcessPool as err:
        raise StepError("index: a worker process died (out of memory?); finished chunks are kept: "
                        "run the same command again to resume") from err
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _names_array(names: list[str]) -> np.ndarray:
    """File names as a numpy bytes array (their file-system bytes: UTF-8, sorted as the names)."""
    return np.array([os.fsencode(name) for name in names], dtype=bytes) if names else np.array([], dtype="S1")


def _member(names: np.ndarray, sorted_names: np.ndarray) -> np.ndarray:
    """For each of `names`, whether it is in the sorted array `sorted_names`."""
    if not len(sorted_names) or not len(names):
        return np.zeros(len(names), dtype=bool)
    where = np.minimum(np.searchsorted(sorted_names, names), len(sorted_names) - 1)
    return sorted_names[where] == names


def _known_files(work: Path, journal_dir: Path) -> np.ndarray:
    """Files already indexed (or failed): the last consolidation plus the journal, as a sorted
    numpy array of their names' bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    blocks = []
    if (work / INDEX_PARQUET).is_file():
        for batch in pq.ParquetFile(work / INDEX_PARQUET).iter_batches(batch_size=_LIST_BLOCK, columns=["file"]):
            blocks.append(_names_array(batch.column(0).to_pylist()))
    pending: list = []
    for path in [work / INDEX_FAILURES_CSV, *journal.parts(journal_dir)]:
        if path.is_file():
            pending.extend(_read_part(path).column("file").chunks)
        if sum(len(chunk) for chunk in pending) >= _LIST_BLOCK:
            blocks.append(_names_array(pa.chunked_array(pending).to_pylist()))
            pending = []
    if pending:
        blocks.append(_names_array(pa.chunked_array(pending).to_pylist()))
    return np.unique(np.concatenate(blocks)) if blocks else np.array([], dtype="S1")


def _consolidate(work: Path, journal_dir: Path, seen: np.ndarray, out: Path,
                 failures_csv: Path) -> tuple[int, int, int]:
    """Previous tables + journal -> index.parquet (ranked) and index_failures.csv, for the
    files still present (`seen`: sorted name bytes); empty the journal. Returns (indexed,
    failed, series) counts.

    Columnar (issue 11: flat memory): the rows are one Arrow table, about 140 bytes an image,
    with the repetitive columns (patient, study, series, modality, image type, orientation)
    dictionary-encoded; which rows are kept, their order and their ranks are worked out on
    index arrays, and the parquet is written in slices of _WRITE_ROWS rows. Same rows, ranks
    and failures as the pandas consolidation it replaced (tests/test_index.py).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = _journal_table(work, journal_dir, out, failures_csv)
    # The last row written of each file (a stable sort keeps the rows of a file in order).
    rows = pc.sort_indices(table, sort_keys=[("file", "ascending")]).to_numpy()
    files = table["file"].take(rows)
    last = np.ones(len(rows), dtype=bool)
    if len(rows) > 1:
        last[:-1] = pc.not_equal(files[:-1], files[1:]).to_numpy(zero_copy_only=False)
    rows = rows[last]
    del files, last
    # Only files still in the folder (checked a block at a time: no list of every name).
    present = np.concatenate([np.zeros(0, dtype=bool)] + [
        _member(_names_array(table["file"].take(rows[start:start + _LIST_BLOCK]).to_pylist()), seen)
        for start in range(0, len(rows), _LIST_BLOCK)])
    rows = rows[present]
    failed = pc.not_equal(table["reason"].take(rows), "").to_numpy(zero_copy_only=False)
    bad_rows, good = rows[failed], rows[~failed]
    del rows, failed

    # One image id, one file: a second file with the same name in another subfolder would make
    # every later join ambiguous. Sorted by (image id, file), the first of each id is kept.
    by_id = pc.sort_indices(pa.table({"image_id": table["image_id"].take(good), "file": table["file"].take(good)}),
                            sort_keys=[("image_id", "ascending"), ("file", "ascending")]).to_numpy()
    good = good[by_id]
    ids = table["image_id"].take(good)
    dup = np.zeros(len(good), dtype=bool)
    if len(good) > 1:
        dup[1:] = pc.equal(ids[1:], ids[:-1]).to_numpy(zero_copy_only=False)
    del by_id, ids
    failures = _rows(table, bad_rows, FAILURE_COLUMNS)
    if dup.any():
        first = np.maximum.accumulate(np.where(dup, 0, np.arange(len(good))))
        first_file = _rows(table, good[first[dup]], ("file",))
        for row, also in zip(_rows(table, good[dup], FAILURE_COLUMNS), first_file):
            row["reason"] = f"duplicate image id (also {also['file']})"
            failures.append(row)
        good = good[~dup]
    del dup

    rank, size, n_series = _ranks(table, good)
    schema = _parquet_schema()
    pool = pa.default_memory_pool()
    pool.release_unused()   # the sorts' scratch space, before the slices are made
    with atomic_path(out) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            for start in range(0, max(len(good), 1), _WRITE_ROWS):
                part = good[start:start + _WRITE_ROWS]
                columns = []
                for field in schema:
                    if field.name == "rank":
                        columns.append(pa.array(rank[start:start + _WRITE_ROWS], pa.int32()))
                    elif field.name == "series_size":
                        columns.append(pa.array(size[start:start + _WRITE_ROWS], pa.int32()))
                    else:
                        values = table[field.name].take(part)
                        if pa.types.is_dictionary(values.type):
                            values = values.cast(values.type.value_type)
                        columns.append(values.cast(field.type))
                writer.write_table(pa.Table.from_arrays(columns, schema=schema))
                del columns
                pool.release_unused()
    failures.sort(key=lambda row: row["file"])
    journal.write_rows(failures_csv, FAILURE_COLUMNS, failures)
    journal.reset(journal_dir)
    return len(good), len(failures), n_series


def _ranks(table, good: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """rank (0 = lowest position in its series, -1 without a position or a series) and
    series_size of the rows `good` of `table` (in that order, which is image id order), and
    the number of distinct non-empty series: `ich.data.index.rank_series`'s rule (ties of
    position broken by image id) on numpy arrays."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rank = np.full(len(good), -1, dtype=np.int32)
    size = np.zeros(len(good), dtype=np.int32)
    if not len(good):
        return rank, size, 0
    series = table["series_id"].take(good)
    if pa.types.is_dictionary(series.type):
        series = series.cast(series.type.value_type)
    encoded = pc.dictionary_encode(series).combine_chunks()
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    values = encoded.dictionary
    # Codes renumbered in the series ids' sort order: sorting them sorts the ids.
    key_of = np.empty(len(values), dtype=np.int64)
    key_of[pc.sort_indices(values).to_numpy()] = np.arange(len(values))
    key = key_of[codes]
    empty = pc.index(values, "").as_py()
    named = codes != empty
    n_series = len(np.unique(codes[named]))
    position = table["position"].take(good).to_numpy(zero_copy_only=False)
    valid = np.flatnonzero(named & ~np.isnan(position))
    # `good` is in image id order: a row's place in it breaks ties of position by image id.
    ranked = valid[np.lexsort((valid, position[valid], key[valid]))]
    group = key[ranked]
    starts = np.flatnonzero(np.concatenate([[True], group[1:] != group[:-1]])) if len(ranked) else ranked
    lengths = np.diff(np.concatenate([starts, [len(ranked)]]))
    rank[ranked] = np.arange(len(ranked)) - np.repeat(starts, lengths)
    size[ranked] = np.repeat(lengths, lengths)
    return rank, size, n_series


def _rows(table, rows: np.ndarray, columns) -> list[dict]:
    """The rows `rows` of `table` as dicts of `columns` (strings): for the failure rows."""
    import pyarrow as pa

    values = []
    for column in columns:
        cells = table[column].take(rows)
        if pa.types.is_dictionary(cells.type):
            cells = cells.cast(cells.type.value_type)
        values.append(cells.to_pylist())
    return [dict(zip(columns, cells)) for cells in zip(*values)]


def _journal_table(work: Path, journal_dir: Path, out: Path, failures_csv: Path):
    """The previous index.parquet, index_failures.csv and the journal's parts, in that order,
    as one compact Arrow table of _JOURNAL_COLUMNS (see `_compact`), read a group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    groups, pending, rows = [], [], 0
    if out.is_file():
        for batch in pq.ParquetFile(out).iter_batches(batch_size=_GROUP_ROWS):
            table = pa.Table.from_batches([batch])
            groups.append(_compact(table.append_column("reason", pa.array([""] * len(table), pa.string()))))
    for path in [failures_csv, *journal.parts(journal_dir)]:
        if not path.is_file():
            continue
        pending.append(_read_part(path))
        rows += pending[-1].num_rows
        if rows >= _GROUP_ROWS:
            groups.append(_compact(pa.concat_tables(pending)))
            pending, rows = [], 0
            # The small tables of the parts are freed: hand their pages back, or they stay
            # in the process as allocator fragments (about 80 MB at RSNA's size).
            pa.default_memory_pool().release_unused()
    if pending or not groups:
        groups.append(_compact(pa.concat_tables(pending) if pending else _empty_part()))
    return pa.concat_tables(groups).unify_dictionaries()


def _read_types() -> dict:
    """Arrow types journal CSVs are read with: numbers as float64 (an empty cell is null)."""
    import pyarrow as pa

    return {column: pa.float64() if column in _FLOAT_COLUMNS or column in _INT_COLUMNS else pa.string()
            for column in _JOURNAL_COLUMNS}


def _empty_part():
    import pyarrow as pa

    return pa.table({column: pa.array([], kind) for column, kind in _read_types().items()})


def _read_part(path: Path):
    """One journal CSV (or index_failures.csv) as an Arrow table of _JOURNAL_COLUMNS, a
    column it lacks null."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    try:
        table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(use_threads=False),
                               convert_options=pacsv.ConvertOptions(
                                   column_types=_read_types(), include_columns=list(_JOURNAL_COLUMNS),
                                   include_missing_columns=True, strings_can_be_null=False,
                                   quoted_strings_can_be_null=False))
    except (pa.ArrowInvalid, OSError) as err:
        raise StepError(f"index: cannot read {path} ({err}); delete it, or run `ich index --force` "
                        "to index every file again") from err
    # The journal escaped formula-like cells (a PatientID "=..."): the table holds them as they were.
    return read_arrow_cells(table)


def _compact(table):
    """Journal columns in their stored types: strings ('' where empty; the repetitive ones as
    dictionaries), floats (NaN where empty) and int32 (0 where empty)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = []
    for column in _JOURNAL_COLUMNS:
        values = table[column]
        if column in _FLOAT_COLUMNS:
            values = pc.fill_null(values.cast(pa.float64()), float("nan"))
        elif column in _INT_COLUMNS:
            values = pc.fill_null(values.cast(pa.float64()), 0.0).cast(pa.int32(), safe=False)
        else:
            values = pc.fill_null(values.cast(pa.string()), "")
            if column in _DICTIONARY_COLUMNS:
                values = pc.dictionary_encode(values)
        columns.append(values)
    return pa.Table.from_arrays(columns, names=list(_JOURNAL_COLUMNS)).combine_chunks()


def _parquet_schema():
    """index.parquet's schema as pandas writes it (large strings, float64, int32 and the pandas
    metadata), so that every reader sees the table it saw before."""
    import pandas as pd
    import pyarrow as pa

    frame = pd.DataFrame({column: pd.Series([], dtype="float64" if column in _FLOAT_COLUMNS else
                                            "int32" if column in _INT_COLUMNS else "str")
                          for column in INDEX_COLUMNS})
    return pa.Schema.from_pandas(frame, preserve_index=False)


def _failure(file: str, reason: str) -> dict:
    row = dict.fromkeys(_JOURNAL_COLUMNS, "")
    name = Path(file).name
    row.update(image_id=name[:-4] if name.lower().endswith(".dcm") else name, file=file,
               reason=" ".join(reason.split()) or "unknown error")
    return row


def _journal_method(journal_dir: Path) -> str | None:
    try:
        return json.loads((journal_dir / "settings.json").read_text()).get("method")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _reset(work: Path, journal_dir: Path) -> None:
    """Forget every earlier result (--force, or a new row layout)."""
    record_path(work, "index").unlink(missing_ok=True)
    (work / INDEX_PARQUET).unlink(missing_ok=True)
    (work / INDEX_FAILURES_CSV).unlink(missing_ok=True)
    shutil.rmtree(journal_dir, ignore_errors=True)
