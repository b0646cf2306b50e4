"""Input files for prediction: find DICOMs and PNGs under the paths given, decode them in processes.

In: paths (DICOM files, folders searched recursively, PNGs already windowed like work/png/),
the PNG channels' windows and the image size. Out: the files to decode plus failures for paths
that do not exist, then (path, uint8 RGB (S, S, 3) or None, info) per file: read_hu's metadata,
or the reason it failed. Kept free of Keras so the decoding processes start fast.
"""

from __future__ import annotations

import functools
import logging
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np

from ich.data.dicom import DicomError, read_hu
from ich.data.png import read_png
from ich.data.windowing import hu_to_rgb

log = logging.getLogger("ich")

DICOM_SUFFIXES = (".dcm", ".dicom")
PNG_SUFFIX = ".png"
# Files handed to one worker at a time: amortises the inter-process overhead per task.
CHUNK = 8


def find_inputs(paths: Iterable[Path]) -> tuple[list[Path], list[dict]]:
    """Expand folders into files: returns (files to decode, failures for paths that do not exist).

    A file named on the command line is always tried (a bad one becomes a failure with a
    reason). Inside folders, only `*.dcm`/`*.dicom`, `*.png` and other files that start like
    DICOM (the 'DICM' marker at byte 128, e.g. extension-less or UID-named files) are taken, so
    READMEs, licences and CSVs are ignored.
    The same file reached twice is decoded once.
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
            found = [f for f in sorted(path.rglob("*")) if f.is_file() and _looks_like_input(f)]
            if not found:
                log.warning("predict: no DICOM or PNG files in folder %s", path)
            for f in found:
                add(f)
        elif path.is_file():
            add(path)
        else:
            failures.append({"path": str(path), "reason": "not found"})
    return files, failures


def decode_all(files: list[Path], windows: list[tuple[float, float]], size: int, workers: int,
               block: int = 256) -> Iterator[tuple[Path, np.ndarray | None, dict]]:
    """Yield (path, uint8 (size, size, 3) image or None, info) for every file, in order.

    info is read_hu's metadata (image_id, study_id, ...) or {"reason": why it failed}. With
    workers > 1, files are decoded in a process pool in blocks; the next block decodes while
    the caller works on the current one.
    """
    decode = functools.partial(decode_file, windows=windows, size=size)
    if workers <= 1 or len(files) <= CHUNK:
        for path in files:
            yield decode(path)
        return
    blocks = [files[i:i + block] for i in range(0, len(files), block)]
    # spawn: the parent may hold Keras/torch thread pools, which a forked child must not inherit.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                             initializer=_init_worker) as pool:
        pending = pool.map(decode, blocks[0], chunksize=CHUNK)
        for k in range(len(blocks)):
            results = list(pending)
            if k + 1 < len(blocks):
                pending = pool.map(decode, blocks[k + 1], chunksize=CHUNK)
            yield from results


def decode_file(path: Path, windows: list[tuple[float, float]], size: int
                ) -> tuple[Path, np.ndarray | None, dict]:
    """One input -> (path, uint8 RGB (size, size, 3), info) or (path, None, {"reason": ...})."""
    try:
        if path.suffix.lower() == PNG_SUFFIX:
            return path, read_png(path, size), {"image_id": path.stem, "study_id": "", "patient_id": ""}
        hu, meta = read_hu(path)
        return path, hu_to_rgb(hu, windows, size), meta
    except DicomError as err:
        return path, None, {"reason": str(err)}
    except Exception as err:  # noqa: BLE001 - one bad file must never stop the others
        return path, None, {"reason": f"{type(err).__name__}: {err}"}


def _looks_like_input(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES or suffix == PNG_SUFFIX:
        return True
    # Other names (no extension, or UID-like names full of dots): DICOM if the marker says so.
    return _has_dicom_marker(path)


def _has_dicom_marker(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _init_worker() -> None:
    # One thread per worker process: the pool already uses every core.
    cv2.setNumThreads(1)
