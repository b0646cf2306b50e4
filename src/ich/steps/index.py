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

from ich import journal
from ich.config import resolve_workers
from ich.constants import INDEX_FAILURES_CSV, INDEX_PARQUET
from ich.data.index import FAILURE_COLUMNS, INDEX_COLUMNS, HeaderError, read_header
from ich.errors import StepError
from ich.io import Timer, atomic_path, progress, summary, write_json
from ich.stamps import Stamp, reason, record, record_path

log = logging.getLogger("ich")

JOURNAL_DIR = ".index"          # step-internal resume state: parts/*.csv
METHOD = "header-index/v1"      # bump when the row layout changes, so old indexes are redone
_JOURNAL_COLUMNS = INDEX_COLUMNS + ("reason",)
_IN_FLIGHT_PER_WORKER = 3       # chunks queued per worker: enough to keep it busy, bounded memory
_FAILURES_LOGGED = 10
_FLOAT_COLUMNS = ("normal_x", "normal_y", "normal_z", "position", "pixel_spacing")
_INT_COLUMNS = ("rows", "columns", "rank", "series_size")


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
    why = "forced" if force else reason(stamp)
    if why is None:
        log.info("index: %s is up to date (use --force to redo)", out)
        return out
    log.info("index: running (%s)", why)
    if force or _journal_method(journal_dir) != METHOD:
        # Rows of another layout (or --force) are never mixed into the new index.
        _reset(work, journal_dir)
        write_json({"method": METHOD}, journal_dir / "settings.json")

    timer = Timer()
    known = _known_files(work, journal_dir)
    seen: set[str] = set()
    counts = _read_all(source, work, journal_dir, known, seen, cfg["index"])
    if not seen:
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


def _read_all(source: Path, work: Path, journal_dir: Path, known: set[str], seen: set[str],
              settings: dict) -> dict:
    """Stream the folder into chunks for the pool, journalling each chunk as it finishes."""
    counts = {"read": 0, "failed": 0}
    workers = max(1, resolve_workers(settings["workers"]))
    chunk_size = max(1, int(settings["chunk_size"]))

    def todo() -> Iterator[str]:
        for name in walk_dicoms(source):
            seen.add(name)
            if name not in known:
                yield name

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


def _known_files(work: Path, journal_dir: Path) -> set[str]:
    """Files already indexed (or failed): the last consolidation plus the journal."""
    import pyarrow.parquet as pq

    known: set[str] = set()
    if (work / INDEX_PARQUET).is_file():
        known.update(pq.read_table(work / INDEX_PARQUET, columns=["file"]).column("file").to_pylist())
    known.update(row["file"] for row in journal.read_rows(work / INDEX_FAILURES_CSV, FAILURE_COLUMNS))
    for part in journal.parts(journal_dir):
        known.update(row["file"] for row in journal.read_rows(part, _JOURNAL_COLUMNS))
    return known


def _consolidate(work: Path, journal_dir: Path, seen: set[str], out: Path,
                 failures_csv: Path) -> tuple[int, int, int]:
    """Previous tables + journal -> index.parquet (ranked) and index_failures.csv, for the
    files still present; empty the journal. Returns (indexed, failed, series) counts."""
    import pandas as pd

    from ich.data.index import rank_series

    frames = []
    if out.is_file():
        frames.append(pd.read_parquet(out).assign(reason=""))
    old_failures = list(journal.read_rows(failures_csv, _JOURNAL_COLUMNS))
    if old_failures:
        frames.append(pd.DataFrame(old_failures))
    for part in journal.parts(journal_dir):
        frames.append(pd.read_csv(part, dtype=str, keep_default_na=False))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=_JOURNAL_COLUMNS)
    table = table[table["file"].isin(seen)].drop_duplicates("file", keep="last")
    table["reason"] = table["reason"].fillna("").astype(str)
    good = table[table["reason"] == ""].copy()
    bad = table[table["reason"] != ""].copy()
    # One image id, one file: a second file with the same name in another subfolder would make
    # every later join ambiguous.
    good = good.sort_values(["image_id", "file"], kind="stable")
    dup = good["image_id"].duplicated(keep="first")
    if dup.any():
        first = good.drop_duplicates("image_id").set_index("image_id")["file"]
        extra = good[dup].copy()
        extra["reason"] = [f"duplicate image id (also {first[i]})" for i in extra["image_id"]]
        bad = pd.concat([bad, extra], ignore_index=True)
        good = good[~dup]
    good = _typed(good[list(INDEX_COLUMNS)])
    good = rank_series(good).sort_values("image_id", ignore_index=True)
    with atomic_path(out) as tmp:
        good.to_parquet(tmp, index=False)
    bad = bad.sort_values("file")
    journal.write_rows(failures_csv, FAILURE_COLUMNS, bad.to_dict("records"))
    journal.reset(journal_dir)
    return len(good), len(bad), int(good.loc[good["series_id"] != "", "series_id"].nunique())


def _typed(frame):
    """Journal strings back to numbers (NaN / 0 where empty)."""
    import pandas as pd

    frame = frame.copy()
    for column in INDEX_COLUMNS:
        if column in _FLOAT_COLUMNS:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
        elif column in _INT_COLUMNS:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").fillna(0).astype("int32")
        else:
            frame[column] = frame[column].fillna("").astype(str)
    return frame


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
