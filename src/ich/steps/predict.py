"""`ich predict`: probabilities for any DICOM or PNG files with a trained cascade.

In: paths (DICOM files, folders searched recursively for `*.dcm`, `*.png` and other files marked as DICOM,
or PNGs already windowed to RGB like work/png/), a run directory (stage1.keras, stage2.keras,
cascade.json) or an ONNX export folder (`ich export`: cascade.onnx, cascade.json) and the config (predict.batch_size, predict.workers).
Out, in out_dir:
- predictions.csv: image_id, path, one probability column per label (LABELS order), and
  `<label>_pred` 0/1 at the thresholds of cascade.json.
- submission.csv: the RSNA long format, `ID,Label` with `ID_<hex>_<subtype>` rows, six per image
  in RSNA order (epidural ... subdural, any).
- studies.csv: one row per DICOM study: study_id, patient_id, n_slices and, per label, the
  maximum probability over its slices. PNG inputs carry no study, so they are left out of it.
- failures.csv: path, reason for every input that could not be read (logged and skipped).

DICOMs get exactly the training preprocessing: `ich.data.dicom.read_hu`, then `ich.data.windowing.hu_to_rgb`
with the windows, channel order and image size recorded in cascade.json. Decoding runs in
predict.workers processes, one block ahead of the model, so memory stays bounded for any number
of files. Fails (StepError) only when no input at all could be predicted.
"""

from __future__ import annotations

import functools
import logging
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

log = logging.getLogger("ich")

DICOM_SUFFIXES = (".dcm", ".dicom")
PNG_SUFFIX = ".png"
# Files handed to one worker at a time: amortises inter-process overhead (~50 ms of work each).
CHUNK = 8


def predict_paths(paths: list[Path], run_dir: Path, out_dir: Path, cfg: dict) -> Path:
    """Predict every image found under `paths` with the cascade in `run_dir`; return the path of
    out_dir/predictions.csv. Bad files are recorded in out_dir/failures.csv and skipped."""
    import pandas as pd

    from ich.backend import select_backend
    from ich.evaluation.onnx_cascade import is_export

    # Before anything imports keras: Keras reads KERAS_BACKEND once, at import. An ONNX export
    # runs in onnxruntime and needs no backend at all.
    if not is_export(run_dir):
        select_backend(cfg["train"]["backend"])
    from ich.errors import StepError
    from ich.config import resolve_workers
    from ich.constants import FAILURES_CSV, PREDICTIONS_CSV, STUDIES_CSV, SUBMISSION_CSV
    from ich.evaluation.inference import load_cascade
    from ich.io import Timer, progress, summary, write_csv

    timer = Timer()
    out_dir = Path(out_dir)
    files, failures = find_inputs([Path(p) for p in paths])
    try:
        cascade = load_cascade(Path(run_dir))
    except (ValueError, ImportError) as err:  # malformed cascade.json or model file, or onnxruntime missing
        raise StepError(str(err)) from err
    windows = _windows(cascade.meta, cfg)
    batch_size = int(cfg["predict"]["batch_size"])
    workers = resolve_workers(cfg["predict"]["workers"])
    log.info("predict: %d input files, %d workers, model %s", len(files), workers, run_dir)

    rows: list[dict] = []
    probs: list[np.ndarray] = []
    images: list[np.ndarray] = []
    pending: list[dict] = []

    def flush() -> None:
        if images:
            probs.append(cascade.predict(np.stack(images), batch_size=batch_size))
            rows.extend(pending)
            images.clear()
            pending.clear()

    with progress(total=len(files), desc="predict", unit="img") as bar:
        for path, image, info in decode_all(files, windows, cascade.image_size, workers,
                                            block=max(batch_size, 4 * CHUNK * workers)):
            bar.update(1)
            if image is None:
                log.warning("predict: skipped %s: %s", path, info["reason"])
                failures.append({"path": str(path), "reason": info["reason"]})
                continue
            images.append(image)
            pending.append({"image_id": info["image_id"], "path": str(path),
                            "study_id": info.get("study_id", ""), "patient_id": info.get("patient_id", ""),
                            "position": info.get("position", np.nan)})
            if len(images) >= batch_size:
                flush()
        flush()

    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(pd.DataFrame(failures, columns=["path", "reason"]), out_dir / FAILURES_CSV)
    if not rows:
        raise StepError(f"nothing could be predicted: none of the {len(files) + len(failures)} inputs "
                        f"was a readable DICOM or RGB PNG; reasons in {out_dir / FAILURES_CSV}")
    table = pd.DataFrame(rows)
    p = np.concatenate(probs)
    thresholds = cascade.thresholds
    predictions = prediction_table(table, p, thresholds)
    write_csv(submission_table(predictions), out_dir / SUBMISSION_CSV)
    write_csv(study_table(table, p), out_dir / STUDIES_CSV)
    path = write_csv(predictions, out_dir / PREDICTIONS_CSV)
    n_studies = table.loc[table["study_id"] != "", "study_id"].nunique()
    summary("predict", f"{len(rows)} images predicted, {len(failures)} failed, {n_studies} studies "
            f"-> {out_dir}", len(rows), "images", timer)
    return path


def prediction_table(table, probs: np.ndarray, thresholds: dict[str, float]):
    """image_id, path, one probability column per label, then `<label>_pred` 0/1 per label."""
    import pandas as pd

    from ich.constants import LABELS

    out = pd.DataFrame({"image_id": table["image_id"].to_numpy(), "path": table["path"].to_numpy()})
    for j, label in enumerate(LABELS):
        out[label] = probs[:, j]
    for j, label in enumerate(LABELS):
        out[f"{label}_pred"] = (probs[:, j] >= thresholds[label]).astype(int)
    return out


def submission_table(predictions):
    """The RSNA long format: rows `ID_<hex>_<subtype>,<probability>`, six per image in RSNA
    order. An image id seen twice (the same slice given twice) is written once."""
    import pandas as pd

    from ich.constants import RSNA_ORDER

    unique = predictions.drop_duplicates("image_id")
    if len(unique) < len(predictions):
        log.warning("predict: %d duplicate image ids written once in the submission",
                    len(predictions) - len(unique))
    ids = np.repeat(unique["image_id"].to_numpy(), len(RSNA_ORDER)).astype(object)
    subtypes = np.tile(np.array(RSNA_ORDER, dtype=object), len(unique))
    values = unique[list(RSNA_ORDER)].to_numpy().reshape(-1)
    return pd.DataFrame({"ID": ids + "_" + subtypes, "Label": values})


def study_table(table, probs: np.ndarray):
    """Per DICOM study: study_id, patient_id, n_slices, max probability over its slices per label.
    Rows without a study (PNG inputs, DICOMs lacking StudyInstanceUID) are left out."""
    import pandas as pd

    from ich.constants import LABELS

    frame = pd.DataFrame(probs, columns=list(LABELS))
    frame["study_id"] = table["study_id"].to_numpy()
    frame["patient_id"] = table["patient_id"].to_numpy()
    frame = frame[frame["study_id"] != ""]
    columns = ["study_id", "patient_id", "n_slices", *LABELS]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    grouped = frame.groupby("study_id", sort=True)
    out = grouped[list(LABELS)].max()
    out.insert(0, "n_slices", grouped.size())
    out.insert(0, "patient_id", grouped["patient_id"].first())
    return out.reset_index()[columns]


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
    from ich.data.dicom import DicomError, read_hu
    from ich.data.png import read_png
    from ich.data.windowing import hu_to_rgb

    try:
        if path.suffix.lower() == PNG_SUFFIX:
            return path, read_png(path, size), {"image_id": path.stem, "study_id": "", "patient_id": ""}
        hu, meta = read_hu(path)
        return path, hu_to_rgb(hu, windows, size), meta
    except DicomError as err:
        return path, None, {"reason": str(err)}
    except Exception as err:  # noqa: BLE001 - one bad file must never stop the others
        return path, None, {"reason": f"{type(err).__name__}: {err}"}


def _windows(meta: dict, cfg: dict) -> list[tuple[float, float]]:
    """(center, width) per channel from cascade.json; from the config if the model lacks them."""
    windows, channels = meta.get("windows"), meta.get("channels")
    if not windows or not channels:
        log.warning("predict: cascade.json records no windows; using preprocess.windows/channels "
                    "of the config, which must match what the model was trained on")
        windows, channels = cfg["preprocess"]["windows"], cfg["preprocess"]["channels"]
    return [(float(windows[name][0]), float(windows[name][1])) for name in channels]


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
    import cv2

    # One thread per worker process: the pool already uses every core.
    cv2.setNumThreads(1)
