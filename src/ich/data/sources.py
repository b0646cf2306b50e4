"""Input files for prediction: find DICOMs and PNGs under the paths given, decode them in processes.

In: paths (DICOM files, folders searched recursively, PNGs already windowed like work/png/),
the PNG channels' windows and the image size. Out: the files to decode plus failures for paths
that do not exist, then (path, uint8 RGB (S, S, 3) or None, info) per file: read_hu's metadata,
or the reason it failed. Kept free of Keras so the decoding processes start fast.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np

from ich.compute import is_machine_error, map_files
from ich.data.dicom import DicomError, read_hu
from ich.data.png import read_png
from ich.data.windowing import hu_to_rgb

log = logging.getLogger("ich")

PNG_SUFFIX = ".png"
# On Dask (compute.scheduler): files per task (a task costs a few ms of scheduling, a file tens
# of ms to decode), and tasks per worker thread out at a time. Results come back in input order,
# so those of later tasks wait for the earliest: these bound what is held (a 256 px image is
# 196 kB).
DASK_CHUNK = 8
DASK_TASKS_PER_THREAD = 4


def find_inputs(paths: Iterable[Path]) -> tuple[list[Path], list[dict]]:
    """Expand folders into files: returns (files to decode, failures for paths that do not exist).

    Every regular file is tried, in folders too (recursively, sorted): a DICOM needs neither a
    `.dcm` name nor the 128-byte preamble, so only decoding can tell, and a file that is not an
    image becomes a failure with its reason rather than vanishing. Dot-named files (temporary
    and system files such as .DS_Store) are skipped. The same file reached twice is decoded once.
    Failures name a missing path by what was typed.
    """
    files: list[Path] = []
    failures: list[dict] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            files.append(path)

    for path in paths:
        if path.is_dir():
            found = [f for f in sorted(path.rglob("*"))
                     if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)]
            if not found:
                log.warning("predict: no files in folder %s", path)
            for f in found:
                add(f)
        elif path.is_file():
            add(path)
        else:
            failures.append({"path": str(path), "reason": "not found"})
    return files, failures


def display_names(roots: list[Path], files: list[Path]) -> dict[Path, str]:
    """The name each file is shown under in outputs and logs: its path relative to the input
    root given on the command line (a file given itself: its name), never an absolute path
    (clinical exports put patient names in folder names). With several roots, the name starts
    with the root's position, `2/sub/IM0001`, so that names stay unique."""
    names = {}
    for f in files:
        for k, root in enumerate(roots, start=1):
            try:
                rel = f.relative_to(root).as_posix() if root.is_dir() else (f.name if f == root else None)
            except ValueError:
                rel = None
            if rel is not None:
                names[f] = rel if len(roots) == 1 else f"{k}/{rel}"
                break
        else:
            names[f] = f.name
    return names


def decode_all(files: list[Path], windows: list[tuple[float, float]], size: int, workers: int,
               timeout_s: float | None = None, max_bytes: int | None = None,
               scheduler: str | None = None) -> Iterator[tuple[Path, np.ndarray | None, dict]]:
    """Yield (path, uint8 (size, size, 3) image or None, info) for every file, in order.

    info is read_hu's metadata (image_id, study_id, ...) or {"reason": why it failed}. Files
    are decoded in `workers` isolated processes (ich.compute, for one worker too): a decoder
    that crashes or runs past `timeout_s` fails only its file ("decoder crashed with signal
    11 (SIGSEGV)"). A failure of the machine (disk, I/O, memory) raises ich.compute.TaskError.
    With `scheduler` (compute.scheduler: "local" or a Dask scheduler's address) they are
    decoded on that cluster instead (ich.distributed, DASK_CHUNK files a task, the files'
    folders checked on every worker), in the same order, with the same time limit and reasons
    ("decoder timed out after 60 s"; a crash: "decoder crashed its worker process ...").
    """
    if scheduler is not None:
        yield from _dask_decode(files, windows, size, workers, timeout_s, max_bytes, scheduler)
        return
    decode = functools.partial(decode_file, windows=windows, size=size, max_bytes=max_bytes)
    for result in map_files(decode, files, workers, timeout_s=timeout_s, initializer=_init_worker,
                            ordered=True):
        if result.ok:
            yield result.value
        else:
            yield result.item, None, {"reason": f"decoder {result.failure}"}


def _dask_decode(files: list[Path], windows: list[tuple[float, float]], size: int, workers: int,
                 timeout_s: float | None, max_bytes: int | None, scheduler: str
                 ) -> Iterator[tuple[Path, np.ndarray | None, dict]]:
    """decode_all on a Dask cluster: decode_chunk's results, in input order."""
    from ich import distributed

    if not files:
        return
    chunks = [files[i:i + DASK_CHUNK] for i in range(0, len(files), DASK_CHUNK)]
    folders = sorted({Path(f).resolve().parent for f in files})
    for _, results in distributed.map_files(
            decode_chunk, chunks, scheduler, (windows, size, max_bytes), inputs=folders,
            failure=lambda path, why: (path, None, {"reason": f"decoder {why}"}),
            init=_init_worker, workers=workers, timeout_s=timeout_s, ordered=True,
            per_thread=DASK_TASKS_PER_THREAD):
        yield from results


def decode_chunk(paths: list[Path], windows: list[tuple[float, float]], size: int,
                 max_bytes: int | None = None) -> list[tuple[Path, np.ndarray | None, dict]]:
    """decode_file over a chunk of files: the unit of work handed to a Dask worker."""
    return [decode_file(Path(path), windows, size, max_bytes) for path in paths]


def decode_file(path: Path, windows: list[tuple[float, float]], size: int,
                max_bytes: int | None = None) -> tuple[Path, np.ndarray | None, dict]:
    """One input -> (path, uint8 RGB (size, size, 3), info) or (path, None, {"reason": ...}).
    Machine failures (see ich.compute.is_machine_error) are raised, not returned."""
    try:
        if path.suffix.lower() == PNG_SUFFIX:
            return path, read_png(path, size), {"image_id": path.stem, "study_id": "", "patient_id": ""}
        hu, meta = read_hu(path, max_bytes)
        return path, hu_to_rgb(hu, windows, size), meta
    except DicomError as err:
        return path, None, {"reason": str(err)}
    except Exception as err:  # noqa: BLE001 - one bad file must never stop the others
        if is_machine_error(err):
            raise
        return path, None, {"reason": f"{type(err).__name__}: {err}"}


def _init_worker() -> None:
    # One thread per worker process: the pool already uses every core.
    cv2.setNumThreads(1)
