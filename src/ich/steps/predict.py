"""`ich predict`: probabilities for any DICOM or PNG files with a trained cascade.

In: paths (DICOM files, folders searched recursively for `*.dcm`, `*.png` and other files marked as DICOM,
or PNGs already windowed to RGB like work/png/), a run directory (stage1.keras, stage2.keras,
cascade.json) and the config (predict.batch_size, predict.workers).
Out, in out_dir:
- predictions.csv: image_id, path, one probability column per label (LABELS order), and
  `<label>_pred` 0/1 at the thresholds of cascade.json.
- submission.csv: the RSNA long format, `ID,Label` with `ID_<hex>_<subtype>` rows, six per image
  in RSNA order (epidural ... subdural, any).
- studies.csv: one row per DICOM study: study_id, patient_id, n_slices and, per label, the
  maximum probability over its slices. PNG inputs carry no study, so they are left out of it.
- failures.csv: path, reason for every input that could not be read (logged and skipped).

DICOMs get exactly the training preprocessing: `ich.data.dicom.read_hu`, then
`ich.data.windowing.hu_to_rgb` with the input description recorded in cascade.json (windows,
channel order, image size), and the model's input is assembled from it: with neighbouring-slice
offsets, each slice's neighbours are the given files of the same series ordered by position
(edges repeat). Decoding runs in predict.workers processes, one block ahead of the model, so
memory stays bounded for single-slice models; a model with context holds the decoded slices
until all are read. Fails (StepError) only when no input at all could be predicted.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ich.config import resolve_workers
from ich.constants import (FAILURES_CSV, LABELS, PREDICTIONS_CSV, RSNA_ORDER, STUDIES_CSV,
                           SUBMISSION_CSV)
from ich.data.inputs import neighbour_rows
from ich.data.sources import CHUNK, decode_all, find_inputs
from ich.errors import StepError
from ich.evaluation.inference import load_cascade
from ich.evaluation.studies import aggregate_studies
from ich.io import Timer, progress, summary, write_csv

log = logging.getLogger("ich")



def predict_paths(paths: list[Path], run_dir: Path, out_dir: Path, cfg: dict) -> Path:
    """Predict every image found under `paths` with the cascade in `run_dir`; return the path of
    out_dir/predictions.csv. Bad files are recorded in out_dir/failures.csv and skipped."""
    timer = Timer()
    out_dir = Path(out_dir)
    files, failures = find_inputs([Path(p) for p in paths])
    try:
        cascade = load_cascade(Path(run_dir))
    except ValueError as err:  # a malformed cascade.json or model file: a user-facing error
        raise StepError(str(err)) from err
    spec = cascade.spec
    batch_size = int(cfg["predict"]["batch_size"])
    workers = resolve_workers(cfg["predict"]["workers"])
    log.info("predict: %d input files, %d workers, model %s", len(files), workers, run_dir)

    rows: list[dict] = []
    probs: list[np.ndarray] = []
    images: list[np.ndarray] = []
    pending: list[dict] = []

    def flush() -> None:
        # Single-slice models: predict each full batch as it is decoded.
        if images:
            probs.append(cascade.predict(spec.assemble(np.stack(images)[:, None]), batch_size))
            rows.extend(pending)
            images.clear()
            pending.clear()

    with progress(total=len(files), desc="predict", unit="img") as bar:
        for path, image, info in decode_all(files, spec.png_windows, spec.image_size, workers,
                                            block=max(batch_size, 4 * CHUNK * workers)):
            bar.update(1)
            if image is None:
                log.warning("predict: skipped %s: %s", path, info["reason"])
                failures.append({"path": str(path), "reason": info["reason"]})
                continue
            images.append(image)
            pending.append({"image_id": info["image_id"], "path": str(path),
                            "study_id": info.get("study_id", ""), "patient_id": info.get("patient_id", ""),
                            "series_id": info.get("series_id", ""),
                            "position": info.get("position", np.nan)})
            if len(images) >= batch_size and not spec.has_context:
                flush()
        if spec.has_context and images:
            probs.append(predict_with_context(cascade, images, pending, batch_size))
            rows.extend(pending)
        else:
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


def predict_with_context(cascade, images: list[np.ndarray], info: list[dict], batch_size: int) -> np.ndarray:
    """Probabilities (N, 6) for decoded slices whose inputs take neighbouring slices: the
    neighbours are the given slices of the same series, ordered by position."""
    spec = cascade.spec
    table = pd.DataFrame(info)
    neighbours = neighbour_rows(table["series_id"], table["position"], spec.offsets)
    stack = np.stack(images)
    out = np.empty((len(stack), len(LABELS)), dtype=np.float32)
    for start in range(0, len(stack), batch_size):
        inputs = spec.assemble(stack[neighbours[start:start + batch_size]])
        out[start:start + len(inputs)] = cascade.predict(inputs, batch_size)
    return out


def prediction_table(table, probs: np.ndarray, thresholds: dict[str, float]):
    """image_id, path, one probability column per label, then `<label>_pred` 0/1 per label."""
    out = pd.DataFrame({"image_id": table["image_id"].to_numpy(), "path": table["path"].to_numpy()})
    for j, label in enumerate(LABELS):
        out[label] = probs[:, j]
    for j, label in enumerate(LABELS):
        out[f"{label}_pred"] = (probs[:, j] >= thresholds[label]).astype(int)
    return out


def submission_table(predictions):
    """The RSNA long format: rows `ID_<hex>_<subtype>,<probability>`, six per image in RSNA
    order. An image id seen twice (the same slice given twice) is written once."""
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
    frame = pd.DataFrame(probs, columns=list(LABELS))
    frame["study_id"] = table["study_id"].to_numpy()
    frame["patient_id"] = table["patient_id"].to_numpy()
    return aggregate_studies(frame, LABELS, keep=["patient_id"])
