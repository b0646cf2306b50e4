"""Step 0, index: every DICOM header of paths.dicom_dir, read once -> work/index.parquet.

In: the source folder (RSNA: 752,803 files in one folder; subfolders are walked too) and the
`index` config section. Out: work/index.parquet (one row per readable file, columns
ich.data.index.INDEX_COLUMNS, sorted by image_id, each series ranked along its slice normal)
and work/index_failures.csv (image_id, file, reason; always written, maybe only a header).

Headers only: pydicom stops before the pixel data and parses only the tags the index needs.
The folder is listed as a stream (os.scandir) and handed to the workers in chunks, with a
bounded number of chunks in flight, so memory stays flat while reading: the parent holds only
the names seen and the small rows of finished chunks on disk.

Where: compute.scheduler null reads in this process, a thread pool or a process pool
(index.workers, index.pool); "local" or a Dask scheduler's address reads on that cluster
(ich.distributed, index.chunk_size files per task, a few tasks per worker thread out at a time
so the listing stays a stream), with the same rows, journal and resume. On Dask a file whose
header reader kills its worker (a segfault, out of memory) is failed alone ("header reader
crashed its worker process ...") and the rest of its chunk is read; in the local process pool
too ("header reader crashed with signal 11 (SIGSEGV)"): the chunks in flight when a worker died
are read again one file per isolated process. (A thread pool or one in-process reader cannot
survive a reader that crashes its process: the run stops, finished chunks kept.)

Resume: each finished chunk's rows go to the journal (work/.index/parts/, one fsync'd CSV per
chunk, written atomically); a killed run restarts from the journal and skips every file it
records. A rerun after files were added reads only the new ones.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np

from ich import compute, journal
from ich.config import resolve_workers
from ich.constants import INDEX_FAILURES_CSV, INDEX_PARQUET
from ich.data.arrays import name_bytes, sorted_unique
from ich.data.index import HeaderError, read_header
from ich.errors import StepError
from ich.io import Timer, progress, summary, write_json
from ich.stamps import Stamp, must_run, record, record_path
from ich.steps.index_consolidation import JOURNAL_COLUMNS as _JOURNAL_COLUMNS
from ich.steps.index_consolidation import consolidate, member, read_part

log = logging.getLogger("ich")

JOURNAL_DIR = ".index"          # step-internal resume state: parts/*.csv
METHOD = "header-index/v1"      # bump when the row layout changes, so old indexes are redone
_IN_FLIGHT_PER_WORKER = 3       # chunks queued per worker: enough to keep it busy, bounded memory
_FAILURES_LOGGED = 10
_LIST_BLOCK = 65_536             # names per numpy block while listing and checking the folder


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
    counts = _read_all(source, work, journal_dir, known, seen_blocks, cfg["index"],
                       cfg["compute"]["scheduler"])
    seen = sorted_unique(np.concatenate(seen_blocks)) if seen_blocks else np.array([], dtype="S1")
    del known, seen_blocks
    if not len(seen):
        raise StepError(f"no .dcm files under {source}; set paths.dicom_dir to the folder of DICOM files")
    n_ok, n_failed, n_series = consolidate(work, journal_dir, seen, out, failures_csv)
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
              seen: list[np.ndarray], settings: dict, scheduler: str | None = None) -> dict:
    """Stream the folder into chunks for the pool, journalling each chunk as it finishes.

    `known`: the sorted names (bytes) already indexed. The names listed are appended to `seen`
    as numpy blocks (about 20 bytes a name, where a set of strings took about 90)."""
    counts = {"read": 0, "failed": 0}
    workers = max(1, resolve_workers(settings["workers"]))
    chunk_size = max(1, int(settings["chunk_size"]))

    def unknown(block: list[str]) -> Iterator[str]:
        encoded = _names_array(block)
        seen.append(encoded)
        for name, done in zip(block, member(encoded, known)):
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
        for seq, rows in enumerate(_results(chunks, str(source), workers, settings["pool"], scheduler)):
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


def _results(chunks: Iterator[list[str]], root: str, workers: int, pool_kind: str,
             scheduler: str | None = None):
    """Yield each chunk's rows as it finishes, keeping at most a few chunks per worker queued:
    in this process (one worker), a thread or process pool, or on the Dask cluster of
    `scheduler` (compute.scheduler), where a file that kills its worker is failed alone."""
    if scheduler is not None:
        yield from _dask_results(chunks, root, workers, scheduler)
        return
    if workers == 1:
        for files in chunks:
            yield read_chunk(files, root)
        return
    if pool_kind == "thread":
        yield from _thread_results(chunks, root, workers)
    else:
        yield from _process_results(chunks, root, workers)


def _thread_results(chunks: Iterator[list[str]], root: str, workers: int):
    """Chunks read by a thread pool, at most a few per worker in flight (a reader that crashes
    takes this process with it: threads are for network disks, processes are the default)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: set = set()
        for files in chunks:
            pending.add(pool.submit(read_chunk, files, root))
            while len(pending) >= workers * _IN_FLIGHT_PER_WORKER:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()


def _process_results(chunks: Iterator[list[str]], root: str, workers: int):
    """Chunks read by a process pool, at most a few per worker in flight. A worker that dies
    (a header reader's segfault, out of memory) breaks the whole pool and every chunk in flight
    with it, and which file did it cannot be told: those chunks are read again one file per
    isolated process (ich.compute.map_files), the file that kills its process again is failed
    alone with the reason, and a fresh pool goes on with the rest of the listing."""
    limit = workers * _IN_FLIGHT_PER_WORKER
    pool, pending = _process_pool(workers), {}
    try:
        for files in chunks:
            pending[pool.submit(read_chunk, files, root)] = files
            while len(pending) >= limit:
                pool = yield from _settle(pool, pending, root, workers)
        while pending:
            pool = yield from _settle(pool, pending, root, workers)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _process_pool(workers: int) -> ProcessPoolExecutor:
    # spawn: workers start clean (no inherited threads or locks from the parent) on every OS.
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _settle(pool: ProcessPoolExecutor, pending: dict, root: str, workers: int):
    """Yield the rows of the next chunks to finish (removed from `pending`, future -> files);
    return the pool to go on with: `pool`, or a fresh one after a worker died."""
    done, _ = wait(pending, return_when=FIRST_COMPLETED)
    if not any(isinstance(future.exception(), BrokenProcessPool) for future in done):
        for future in done:
            del pending[future]
            yield future.result()
        return pool
    pool.shutdown(wait=True, cancel_futures=True)
    lost = []
    for future, files in pending.items():
        if future.done() and not future.cancelled() and future.exception() is None:
            yield future.result()   # finished before the death: its rows are good
        else:
            lost.append(files)
    pending.clear()
    n_files = sum(len(files) for files in lost)
    log.warning("index: a header reader's process died; reading the %d files of its %d chunks "
                "in flight again one file per process to find the one at fault", n_files, len(lost))
    yield from _isolated(lost, root, workers)
    return _process_pool(workers)


def _isolated(lost: list[list[str]], root: str, workers: int):
    """The rows of `lost`'s files, each read in an isolated worker process (one map over all
    of them): a file whose reader kills its process gets a failure row saying so ("header
    reader crashed with signal 11 (SIGSEGV)"); one list per lost chunk."""
    rows = {}
    for result in compute.map_files(partial(read_chunk, root=root),
                                    [[file] for files in lost for file in files], workers):
        file = result.item[0]
        rows[file] = result.value[0] if result.ok else _failure(file, f"header reader {result.failure}")
    for files in lost:
        yield [rows[file] for file in files]


def _dask_results(chunks: Iterator[list[str]], root: str, workers: int, scheduler: str):
    """The rows of each chunk from ich.distributed.map_files (the workers read `root`, write
    nothing). No cluster is started or joined when there is nothing new to read."""
    from ich import distributed

    first = next(chunks, None)
    if first is None:
        return
    for _, rows in distributed.map_files(
            read_chunk, itertools.chain([first], chunks), scheduler, (root,), inputs=[root],
            failure=lambda file, why: _failure(file, f"header reader {why}"), workers=workers,
            per_thread=_IN_FLIGHT_PER_WORKER):
        yield rows


def _names_array(names: list[str]) -> np.ndarray:
    """File names as a numpy bytes array (their file-system bytes: UTF-8, sorted as the names)."""
    return np.array([os.fsencode(name) for name in names], dtype=bytes) if names else np.array([], dtype="S1")


def _known_files(work: Path, journal_dir: Path) -> np.ndarray:
    """Files already indexed (or failed): the last consolidation plus the journal, as a sorted
    numpy array of their names' bytes (only the file column is read; no Python object a name)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    blocks = []
    if (work / INDEX_PARQUET).is_file():
        for batch in pq.ParquetFile(work / INDEX_PARQUET).iter_batches(batch_size=_LIST_BLOCK, columns=["file"]):
            blocks.append(name_bytes(batch.column(0)))
    pending: list = []
    for path in [work / INDEX_FAILURES_CSV, *journal.parts(journal_dir)]:
        if path.is_file():
            pending.extend(read_part(path, ("file",)).column("file").chunks)
        if sum(len(chunk) for chunk in pending) >= _LIST_BLOCK:
            blocks.append(name_bytes(pa.chunked_array(pending, pa.string())))
            pending = []
    if pending:
        blocks.append(name_bytes(pa.chunked_array(pending, pa.string())))
    return sorted_unique(np.concatenate(blocks)) if blocks else np.array([], dtype="S1")


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
