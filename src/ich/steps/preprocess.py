"""Step 3, preprocess: work/dicom/*.dcm -> HU -> three windows -> RGB PNG, in processes.

In: work/dicom/<image_id>.dcm (the copy step's output) and the `preprocess` config section.
Out: work/png/<image_id>.png (uint8 RGB, image_size square, one window per channel in
`channels` order), work/images.csv (one row per good image, sorted by image_id) and
work/failures.csv (image_id, path, reason; always written, maybe only a header).

Where: compute.scheduler null converts in this machine's process pool (ich.compute, one
file per task); "local" or a Dask scheduler's address converts on that cluster
(ich.distributed, chunk_size files per task), with the same rows, journal and resume.

Isolation: every file is converted in a worker process (ich.compute, whatever
preprocess.workers is), so a decoder that segfaults, is killed for memory or hangs past
preprocess.file_timeout_s costs only that file: it is listed in failures.csv ("decoder crashed
with signal 11 (SIGSEGV)", "decoder timed out after 60 s"), as is a file over
preprocess.max_file_mb, and the run goes on. On Dask the same holds with the same reasons
("decoder timed out after 60 s"): a worker past its budget is restarted through its nanny and
the file named (ich.distributed: a chunk may run chunk_size x the limit, then its files are
redone one at a time). Failures are remembered: a rerun does not try those
files again unless preprocess.retry_failed (`--retry-failed`). A failure of the machine (disk
full, I/O error, too many open files, out of memory) is not the image's fault: the step stops
with a message naming it, and nothing is recorded against the image.

Resume: workers write each PNG under a temporary name and rename it, so no half PNG ever
exists; png/ holds exactly the PNGs images.csv lists (the temporary PNGs of killed writers are
removed when the step ends, and a failed image's PNG from an earlier attempt goes with its
failure row). The parent appends finished rows to the journal (work/.preprocess/parts/, one fsync'd
file per chunk_size rows or few seconds, written atomically); a run killed even with SIGKILL
restarts from the journal, redoing only images not yet journalled. At the end the journal is
consolidated (deduplicated, sorted) into images.csv and failures.csv by a streaming merge
(ich.journal: parts sorted by image id, heapq.merge with the previous tables), and the folder
is listed into a compact sorted array of ids: neither the images nor a table of rows is ever
held by the parent, so its memory stays flat at full RSNA size. Tables are plain csv here
(no pandas): workers import this module too, and pandas would add ~0.5 s of start-up and
~60 MB to each of them. Dot-named files in work/dicom/ (a killed copy's temporary files) are
never inputs.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from ich import faults, journal
from ich.compute import TaskError, WorkerStartError, is_machine_error, machine_message, map_files
from ich.errors import StepError
from ich.config import resolve_workers
from ich.constants import DICOM_DIR, FAILURES_CSV, IMAGES_CSV, PNG_DIR
from ich.io import Timer, atomic_path, progress, summary
from ich.stamps import Stamp, clear, must_run, reason, record

log = logging.getLogger("ich")

# Step-internal resume state (not an artifact other steps read): parts/*.csv.
JOURNAL_DIR = ".preprocess"
# Bump when the pixel pipeline changes so old PNGs are not mistaken for current ones.
METHOD = "window-then-area-resize/v1"
IMAGE_COLUMNS = ("image_id", "patient_id", "study_id", "series_id", "position", "rows", "columns",
                 "pixel_spacing", "storage", "path")
FAILURE_COLUMNS = ("image_id", "path", "reason")
_JOURNAL_COLUMNS = IMAGE_COLUMNS + ("reason",)
_JOURNAL_EVERY_S = 5.0   # finished rows reach the journal at least this often (and every chunk_size)
_FAILURES_LOGGED = 10
_LIST_BLOCK = 65_536   # file names gathered per numpy block while listing work/dicom/


def settings(cfg: dict) -> dict:
    """What every PNG's pixels depend on: size, the window of each channel, the method."""
    pp = cfg["preprocess"]
    return {"image_size": pp["image_size"], "method": METHOD,
            "windows": [[name] + list(pp["windows"][name]) for name in pp["channels"]]}


def stamps(cfg: dict) -> list[Stamp]:
    """Preprocess depends on its pixel settings and on the DICOMs in work/dicom/."""
    work = Path(cfg["paths"]["work_dir"])
    return [Stamp("preprocess", work, settings=settings(cfg), inputs=[work / DICOM_DIR],
                  outputs=[work / IMAGES_CSV, work / FAILURES_CSV, work / PNG_DIR])]


def pixel_stamp(cfg: dict) -> Stamp:
    """The journal's settings: a change redoes every image, otherwise a rerun resumes."""
    work = Path(cfg["paths"]["work_dir"])
    return Stamp("preprocess.pixels", work, settings=settings(cfg))


def run(cfg: dict, force: bool = False) -> Path:
    """Convert every DICOM in work/dicom/ to a windowed RGB PNG; return the images.csv path."""
    work = Path(cfg["paths"]["work_dir"])
    pp = cfg["preprocess"]
    source_dir, png_dir = work / DICOM_DIR, work / PNG_DIR
    images_csv, failures_csv, journal_dir = work / IMAGES_CSV, work / FAILURES_CSV, work / JOURNAL_DIR
    if not source_dir.is_dir():
        raise StepError(f"{source_dir} not found; run `ich copy` first")
    ids = dicom_ids(source_dir)
    if not len(ids):
        raise StepError(f"no .dcm files in {source_dir}; run `ich copy` first")
    [stamp] = stamps(cfg)
    retry = bool(pp.get("retry_failed")) and not force
    failed_before = sum(1 for _ in journal.read_rows(failures_csv, FAILURE_COLUMNS)) if retry else 0
    also = f"--retry-failed: trying the {failed_before:,} failed images again" if failed_before else None
    if not must_run("preprocess", stamp, force, images_csv, also):
        return images_csv

    pixels = pixel_stamp(cfg)
    changed = reason(pixels)
    if force or changed is not None:
        if not force and changed != "never run":
            log.info("preprocess: redoing every image (%s)", changed)
        _reset(work, journal_dir, stamp, pixels)
    png_dir.mkdir(parents=True, exist_ok=True)
    remove_temporary_pngs(png_dir)   # those of a run killed mid-write

    done = np.zeros(len(ids), dtype=bool)
    for position, row in _usable_rows(work, journal_dir, ids):
        done[position] = not (retry and row["reason"])
    todo = [os.path.join(source_dir, f"{os.fsdecode(image_id)}.dcm") for image_id in ids[~done]]
    timer = Timer()
    try:
        counts = _process(todo, work, journal_dir, settings(cfg), pp, cfg["compute"]["scheduler"])
    finally:
        # A worker killed between opening and renaming its temporary PNG (a crash, an
        # out-of-memory kill, a time limit, a Dask nanny restart) leaves it behind: png/ must
        # hold exactly the PNGs the manifest lists, not those too.
        remove_temporary_pngs(png_dir)
    n_ok = _consolidate(work, journal_dir, ids, images_csv, failures_csv)
    line = summary("preprocess", f"{counts['ok']:,} ok, {counts['failed']:,} failed, "
                   f"{len(ids) - len(todo):,} already done; {n_ok:,} of {len(ids):,} images "
                   f"usable", len(todo), "images", timer)
    record(stamp, line)
    return images_csv


def dicom_ids(folder: Path) -> np.ndarray:
    """The image ids (file names without `.dcm`, as bytes) of the `*.dcm` files in `folder`,
    sorted: a compact array (about 16 bytes an id, where a dict of Paths took ~300), read as a
    stream. Dot-named files (the temporary files of a killed copy, `.ID_x.dcm.XXXX.tmp.dcm`)
    are never inputs."""
    blocks, names = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.endswith(".dcm") and not entry.name.startswith("."):
                names.append(os.fsencode(entry.name[:-4]))
                if len(names) == _LIST_BLOCK:
                    blocks.append(np.array(names))
                    names = []
    if names:
        blocks.append(np.array(names))
    ids = np.concatenate(blocks) if blocks else np.array([], dtype="S1")
    ids.sort()
    return ids


def remove_temporary_pngs(png_dir: Path) -> int:
    """Delete the temporary PNGs (`.<image_id>.png.<pid>.tmp.png`) of writers that were killed
    mid-write; return how many. A streamed listing: Path.glob would list the whole folder into
    memory first (150 MB of entries at RSNA's size)."""
    with os.scandir(png_dir) as entries:
        leftovers = [entry.path for entry in entries
                     if entry.name.startswith(".") and entry.name.endswith(".tmp.png")]
    for leftover in leftovers:
        Path(leftover).unlink(missing_ok=True)
    return len(leftovers)


def convert_file(path: str, work_dir: str, windows: list[tuple[float, float]], size: int,
                 max_bytes: int | None = None) -> dict:
    """Convert one DICOM file to a PNG under work_dir/png/; return its journal row.

    Runs in a worker process (ich.compute). A problem of the file gives a row with its reason;
    a problem of the machine (disk full, I/O error, out of memory) is raised, so that the step
    stops and the image is not recorded as bad.
    """
    import cv2

    from ich.compute import is_machine_error
    from ich.data.dicom import DicomError, read_hu
    from ich.data.windowing import hu_to_rgb

    work, source = Path(work_dir), Path(path)
    image_id = source.stem
    try:
        hu, meta = read_hu(source, max_bytes)
        rgb = hu_to_rgb(hu, windows, size)
        ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), _png_params(cv2))
        if not ok:
            raise ValueError("PNG encoding failed")
        _write_png(work / PNG_DIR / f"{image_id}.png", png)
    except Exception as err:  # noqa: BLE001 - one bad image must never stop the others
        if is_machine_error(err):
            raise
        reason = str(err) if isinstance(err, DicomError) else f"{type(err).__name__}: {err}"
        return _failure(image_id, source, work, reason)
    row = {key: _cell(meta[key]) for key in IMAGE_COLUMNS if key in meta}
    row.update(image_id=image_id, path=f"{PNG_DIR}/{image_id}.png", reason="")
    return row


def process_chunk(paths: list[str], work_dir: str, windows: list[tuple[float, float]], size: int,
                  max_bytes: int | None = None) -> list[dict]:
    """convert_file over a chunk of files, one journal row each: the unit of work handed to a
    Dask worker (ich.distributed.map_files), where a task per file would cost more than it does."""
    return [convert_file(path, work_dir, windows, size, max_bytes) for path in paths]


def _write_png(path: Path, data) -> None:
    """Write atomically under a per-process temporary name, then rename.

    Cheaper than ich.io.atomic_write_bytes (mkstemp) per image, and safe: one process at a
    time writes a given image. Leftovers of a killed writer match `.*.tmp.png` and are removed
    when the step ends (remove_temporary_pngs), and at the next start after a killed step.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        with open(tmp, "wb") as handle:
            faults.check("write", path.stem)   # tests: a disk that fills, a kill mid-write
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)   # a failed write leaves nothing; a kill is cleaned up at the end
        raise


def journal_ids(work_dir: str | Path) -> set[str]:
    """Image ids the journal records as finished (ok or failed) since the last consolidation."""
    journal_dir = Path(work_dir) / JOURNAL_DIR
    return {row["image_id"] for part in journal.parts(journal_dir)
            for row in journal.read_rows(part, _JOURNAL_COLUMNS)}


def _process(todo: list[str], work: Path, journal_dir: Path, settings: dict, pp: dict,
             scheduler: str | None = None) -> dict:
    """Convert `todo` in isolated worker processes, journalling finished rows as they arrive.

    A file that crashes or hangs its worker becomes a failure row naming what happened. A
    machine failure stops the step (StepError) after journalling everything finished before it.
    `scheduler` (compute.scheduler) null: this machine's process pool; otherwise a Dask cluster.
    """
    counts = {"ok": 0, "failed": 0}
    if not todo:
        return counts
    token = f"{time.time_ns():020d}"
    rows: list[dict] = []
    parts = 0
    last_write = time.monotonic()

    def write_part() -> None:
        nonlocal parts, last_write
        if rows:
            # Whole or absent, and on disk before these images count as done.
            journal.write_part(journal_dir, f"{token}-{parts:07d}", _JOURNAL_COLUMNS, rows, "image_id")
            parts += 1
            rows.clear()
        last_write = time.monotonic()

    try:
        with progress(total=len(todo), desc="preprocess", unit="img") as bar:
            for row in _results(todo, work, settings, pp, scheduler):
                rows.append(row)
                if row["reason"]:
                    counts["failed"] += 1
                    if counts["failed"] <= _FAILURES_LOGGED:
                        log.warning("preprocess: %s: %s", row["path"], row["reason"])
                else:
                    counts["ok"] += 1
                bar.update(1)
                if len(rows) >= pp["chunk_size"] or time.monotonic() - last_write > _JOURNAL_EVERY_S:
                    write_part()
    except TaskError as err:
        if not is_machine_error(err):
            raise
        raise StepError(f"preprocess stopped: {machine_message(err)} while converting "
                        f"{_relative(Path(err.item), work)}. Nothing is recorded against that "
                        "image and finished images are kept: fix the cause and run the same "
                        "command again") from err.error
    except WorkerStartError as err:
        raise StepError(f"preprocess: {err}") from err
    finally:
        write_part()
    if counts["failed"] > _FAILURES_LOGGED:
        log.warning("preprocess: %d more failures, all listed in %s",
                    counts["failed"] - _FAILURES_LOGGED, work / FAILURES_CSV)
    return counts


def _results(todo: list[str], work: Path, settings: dict, pp: dict,
             scheduler: str | None) -> Iterator[dict]:
    """Every file's journal row as it finishes, from the local pool (one file per task) or from
    a Dask cluster (chunk_size files per task), both with the per-file time limit; a file that
    crashed or hung its worker gets the same reason wording from both ("decoder timed out
    after 60 s")."""
    workers = min(max(1, resolve_workers(pp["workers"])), len(todo))
    max_mb = pp.get("max_file_mb")
    windows = [(float(c), float(w)) for _, c, w in settings["windows"]]
    max_bytes = int(max_mb * 2 ** 20) if max_mb else None
    if scheduler is not None:
        from ich import distributed

        size = max(1, int(pp["chunk_size"]))
        chunks = [todo[i:i + size] for i in range(0, len(todo), size)]
        for _, rows in distributed.map_files(
                process_chunk, chunks, scheduler, (str(work), windows, settings["image_size"], max_bytes),
                inputs=[work / DICOM_DIR], outputs=[work / PNG_DIR],
                failure=lambda path, why: _failure(Path(path).stem, Path(path), work, f"decoder {why}"),
                init=_init_worker, workers=workers, timeout_s=pp.get("file_timeout_s")):
            yield from rows
        return
    convert = functools.partial(convert_file, work_dir=str(work), windows=windows,
                                size=settings["image_size"], max_bytes=max_bytes)
    for result in map_files(convert, todo, workers,
                            timeout_s=pp.get("file_timeout_s"), initializer=_init_worker):
        yield result.value if result.ok else _failure(
            Path(result.item).stem, Path(result.item), work, f"decoder {result.failure}")


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already; cv2's own threads would oversubscribe


def _png_params(cv2) -> list[int]:
    """Fast PNG settings: zlib level 1, RLE strategy, 'Up' filter.

    Measured on a 256x256 RSNA slice: ~1.0 ms and 52 kB against 2.2 ms / 52 kB for cv2's
    defaults at level 1 and 7 ms / 46 kB for PIL's defaults (bench/preprocess.py).
    """
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # OpenCV >= 4.11
        params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]
    return params


def _failure(image_id: str, source: Path, work: Path, reason: str) -> dict:
    """The journal row of an image that could not be converted. A failed image has no PNG: one
    left by an attempt cut short after its write (killed at its time limit just as it finished,
    a Dask task cancelled while it wrote) or made under earlier pixel settings is removed, so
    that png/ holds what images.csv lists."""
    (work / PNG_DIR / f"{image_id}.png").unlink(missing_ok=True)
    row = dict.fromkeys(IMAGE_COLUMNS, "")
    row.update(image_id=image_id, path=_relative(source, work),
               reason=reason.replace("\n", " ") or "unknown error")
    return row


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _usable_rows(work: Path, journal_dir: Path, ids: np.ndarray) -> Iterator[tuple[int, dict]]:
    """(position in `ids`, row) of every image finished under the current settings (the last
    consolidation, then the journal, later rows winning), in image id order, streamed.

    Rows of images no longer in work/dicom/ are left out, and so is an ok row whose PNG has
    gone missing, so that image is redone.
    """
    for row in journal.latest([work / IMAGES_CSV, work / FAILURES_CSV], journal_dir,
                              _JOURNAL_COLUMNS, "image_id"):
        key = os.fsencode(row["image_id"])
        position = int(np.searchsorted(ids, key))
        if position < len(ids) and ids[position] == key and (row["reason"] or (work / row["path"]).is_file()):
            yield position, row


def _consolidate(work: Path, journal_dir: Path, ids: np.ndarray, images_csv: Path,
                 failures_csv: Path) -> int:
    """Journal + previous tables -> images.csv and failures.csv (atomic, sorted by image id,
    streamed: no table is held); empty the journal. Returns the number of usable images."""
    n_ok = 0
    with atomic_path(images_csv) as images_tmp, atomic_path(failures_csv) as failures_tmp:
        with open(images_tmp, "w", newline="") as images, open(failures_tmp, "w", newline="") as failures:
            good = csv.DictWriter(images, fieldnames=IMAGE_COLUMNS, extrasaction="ignore")
            bad = csv.DictWriter(failures, fieldnames=FAILURE_COLUMNS, extrasaction="ignore")
            good.writeheader()
            bad.writeheader()
            for _, row in _usable_rows(work, journal_dir, ids):
                if row["reason"]:
                    bad.writerow(row)
                else:
                    good.writerow(row)
                    n_ok += 1
    # failures.csv is renamed into place first, then images.csv (inner block first); the
    # journal goes only after both, so a kill in between redoes this merge, nothing else.
    journal.reset(journal_dir)
    return n_ok


def _cell(value) -> str:
    """A manifest cell: NaN as empty (what pandas writes and reads back as NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return ""
    return str(value)


def _reset(work: Path, journal_dir: Path, stamp: Stamp, pixels: Stamp) -> None:
    """Forget every earlier result, then record the settings the new results will follow.

    images.csv goes first: it must never outlive the settings it was made with.
    """
    clear(stamp)
    (work / IMAGES_CSV).unlink(missing_ok=True)
    (work / FAILURES_CSV).unlink(missing_ok=True)
    journal.reset(journal_dir)
    record(pixels)
