"""`ich predict`: probabilities for any DICOM or PNG files with a trained cascade.

In: paths (DICOM files, PNGs already windowed to RGB like work/png/, or folders: every regular
file in them is tried, since a DICOM needs neither a `.dcm` name nor a preamble), a run directory
(the models and cascade.json) and the config (`predict` section).
Out, in out_dir (files are named relative to the root given on the command line, see
ich.data.sources.display_names; no absolute path and no patient identifier is written unless
predict.keep_patient_id):
- predictions.csv: image_id, path, one probability column per label (LABELS order), and
  `<label>_pred` 0/1 at the thresholds of cascade.json.
- submission.csv: the RSNA long format, `ID,Label` with `ID_<hex>_<subtype>` rows, six per image
  in RSNA order (epidural ... subdural, any).
- studies.csv: one row per DICOM study: study_id, n_slices (and patient_id with
  keep_patient_id) and, per label, the maximum probability over its slices. PNG inputs carry no
  study, so they are left out of it.
- failures.csv: path, reason for every input that could not be used (logged and skipped).
- .predict/: the journal a rerun into the same out_dir continues from.

DICOMs get exactly the training preprocessing: `ich.data.dicom.read_hu`, then
`ich.data.windowing.hu_to_rgb` with the input description recorded in cascade.json (windows,
channel order, image size), and the model's input is assembled from it: with neighbouring-slice
offsets, each slice's neighbours are the given files of the same series ordered by position
(edges repeat). Decoding runs in predict.workers isolated processes (ich.compute): a file that
crashes or hangs the decoder is a failure, not the end of the run. Single-slice models predict
and journal each batch as it is decoded; a model with context holds the decoded slices until
all are read and journals them at the end. Fails (StepError) only when no input at all could
be predicted, on NaN probabilities, and on machine failures (disk full, I/O errors, memory).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from ich.compute import TaskError, WorkerStartError, is_machine_error, machine_message
from ich.config import resolve_workers
from ich.constants import (CASCADE_JSON, FAILURES_CSV, LABELS, PREDICTIONS_CSV, RSNA_ORDER,
                           STUDIES_CSV, SUBMISSION_CSV)
from ich.data.inputs import neighbour_rows
from ich.data.sources import decode_all, display_names, find_inputs
from ich.errors import StepError
from ich.evaluation.inference import check_finite, load_cascade, read_cascade_json
from ich.evaluation.studies import aggregate_studies
from ich.io import Timer, progress, safe_cell, summary, write_csv, write_json

JOURNAL_DIR = ".predict"   # resume state inside the output folder

log = logging.getLogger("ich")



def predict_paths(paths: list[Path], run_dir: Path, out_dir: Path, cfg: dict) -> Path:
    """Predict every image found under `paths` with the cascade in `run_dir`; return the path of
    out_dir/predictions.csv. Bad files are recorded in out_dir/failures.csv and skipped.

    Results are journalled in out_dir/.predict/ as each batch finishes, so a killed run loses
    nothing finished and a rerun into the same out_dir continues (files that failed are not
    tried again unless predict.retry_failed). Outputs name files relative to the roots given.
    """
    timer = Timer()
    out_dir = Path(out_dir)
    roots = [Path(p) for p in paths]
    files, failures = find_inputs(roots)
    for failure in failures:            # a missing argument is shown by its name only
        failure["path"] = Path(failure["path"]).name
    names = display_names(roots, files)
    try:
        cascade = load_cascade(Path(run_dir))
    except ValueError as err:  # a malformed cascade.json or model file: a user-facing error
        raise StepError(str(err)) from err
    spec = cascade.spec
    pc = cfg["predict"]
    batch_size = int(pc["batch_size"])
    workers = resolve_workers(pc["workers"])
    keep_pid = bool(pc.get("keep_patient_id"))
    journal = Journal(out_dir / JOURNAL_DIR, {"model": _model_identity(Path(run_dir)),
                                              "keep_patient_id": keep_pid})
    done = journal.finished(retry_failed=bool(pc.get("retry_failed")))
    todo = [f for f in files if names[f] not in done]
    log.info("predict: %d input files (%d done before), %d workers, model %s", len(files),
             len(files) - len(todo), workers, run_dir)

    images: list[np.ndarray] = []
    pending: list[dict] = []

    def flush() -> None:
        # Single-slice models: predict each full batch as it is decoded, journal it at once.
        if images:
            probs = cascade.predict(spec.assemble(np.stack(images)[:, None]), batch_size)
            _journal_batch(journal, pending, probs)
            images.clear()
            pending.clear()

    max_mb = pc.get("max_file_mb")
    try:
        with progress(total=len(todo), desc="predict", unit="img") as bar:
            for path, image, info in decode_all(todo, spec.png_windows, spec.image_size, workers,
                                                timeout_s=pc.get("file_timeout_s"),
                                                max_bytes=int(max_mb * 2 ** 20) if max_mb else None):
                bar.update(1)
                name = names[path]
                if image is None:
                    log.warning("predict: skipped %s: %s", name, info["reason"])
                    journal.add_failure(name, info["reason"])
                    continue
                images.append(image)
                pending.append({"name": name, "image_id": info["image_id"],
                                "study_id": info.get("study_id", ""), "series_id": info.get("series_id", ""),
                                "patient_id": info.get("patient_id", "") if keep_pid else "",
                                "position": info.get("position", np.nan)})
                if len(images) >= batch_size and not spec.has_context:
                    flush()
            if spec.has_context and images:
                _journal_batch(journal, pending, predict_with_context(cascade, images, pending, batch_size))
            else:
                flush()
    except TaskError as err:
        if not is_machine_error(err):
            raise
        raise StepError(f"predict stopped: {machine_message(err)} while reading "
                        f"{names.get(err.item, '?')}; finished predictions are kept in {out_dir}: "
                        "fix the cause and run the same command again") from err.error
    except WorkerStartError as err:
        raise StepError(f"predict: {err}") from err

    rows, failed = journal.read()
    failures += [f for f in failed if f["path"] not in {r["name"] for r in rows}]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(pd.DataFrame(failures, columns=["path", "reason"]), out_dir / FAILURES_CSV)
    if not rows:
        raise StepError(f"nothing could be predicted: none of the {len(files) + len(failures)} inputs "
                        f"was a readable DICOM or RGB PNG; reasons in {out_dir / FAILURES_CSV}")
    table = pd.DataFrame(rows).rename(columns={"name": "path"})
    p = table[list(LABELS)].to_numpy(dtype=np.float32)
    predictions = prediction_table(table, p, cascade.thresholds)
    write_csv(submission_table(predictions), out_dir / SUBMISSION_CSV)
    studies = study_table(table, p)
    if not keep_pid:
        studies = studies.drop(columns="patient_id")
    write_csv(studies, out_dir / STUDIES_CSV)
    path = write_csv(predictions, out_dir / PREDICTIONS_CSV)
    n_studies = table.loc[table["study_id"] != "", "study_id"].nunique()
    summary("predict", f"{len(rows)} images predicted ({len(todo)} this run), {len(failures)} failed, "
            f"{n_studies} studies -> {out_dir}", len(todo), "images", timer)
    return path


def _journal_batch(journal: "Journal", info: list[dict], probs: np.ndarray) -> None:
    """Check a batch's probabilities, then append its rows to the journal (on disk at once)."""
    try:
        check_finite(probs, [row["name"] for row in info], "predict")
    except ValueError as err:
        raise StepError(str(err)) from err
    journal.add_rows([{**row, **{label: float(probs[i, j]) for j, label in enumerate(LABELS)}}
                      for i, row in enumerate(info)])


def _model_identity(run_dir: Path) -> str:
    """Changes when the run's cascade.json or any model file changes: a journal of another
    model's results must not be continued."""
    from ich.stamps import identity

    meta = read_cascade_json(run_dir)
    parts = [identity(run_dir / CASCADE_JSON)]
    parts += [f"{stage['file']}={identity(run_dir / stage['file'])}" for stage in meta["stages"]]
    return ";".join(str(part) for part in parts)


class Journal:
    """Predict's resume state in out_dir/.predict/: rows.csv and failed.csv, appended and
    fsync'd per batch, and settings.json (the model and options they were made with). A record
    made with other settings is discarded at start. A killed append leaves at most one partial
    last line, which `read` drops."""

    ROW_COLUMNS = ("name", "image_id", "study_id", "series_id", "patient_id", "position", *LABELS)
    FAIL_COLUMNS = ("name", "reason")

    def __init__(self, folder: Path, settings: dict):
        self.folder = Path(folder)
        self.rows_csv, self.failed_csv = self.folder / "rows.csv", self.folder / "failed.csv"
        settings_json = self.folder / "settings.json"
        try:
            before = json.loads(settings_json.read_text())
        except (OSError, json.JSONDecodeError):
            before = None
        if before != settings:
            if before is not None:
                log.info("predict: %s holds results of another model or options; starting afresh",
                         self.folder)
            shutil.rmtree(self.folder, ignore_errors=True)
            write_json(settings, settings_json)

    def finished(self, retry_failed: bool) -> set[str]:
        """Names already predicted, and (unless retry_failed) those that failed."""
        rows, failed = self.read()
        done = {row["name"] for row in rows}
        return done if retry_failed else done | {f["path"] for f in failed}

    def add_rows(self, rows: list[dict]) -> None:
        """Append predicted rows."""
        self._append(self.rows_csv, self.ROW_COLUMNS, rows)

    def add_failure(self, name: str, reason: str) -> None:
        """Append one failed file."""
        self._append(self.failed_csv, self.FAIL_COLUMNS, [{"name": name, "reason": reason}])

    def read(self) -> tuple[list[dict], list[dict]]:
        """(predicted rows, one per name, the last kept; failures as {path, reason})."""
        rows = {row["name"]: row for row in self._read(self.rows_csv, self.ROW_COLUMNS)}
        for row in rows.values():
            for label in LABELS:
                row[label] = float(row[label])
            row["position"] = float(row["position"]) if row["position"] else np.nan
        failed = {row["name"]: row for row in self._read(self.failed_csv, self.FAIL_COLUMNS)}
        return (list(rows.values()),
                [{"path": name, "reason": row["reason"]} for name, row in failed.items()])

    def _append(self, path: Path, columns: tuple, rows: list[dict]) -> None:
        new = not path.exists()
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows({k: safe_cell(v) for k, v in row.items()} for row in rows)
            handle.flush()
            os.fsync(handle.fileno())

    @staticmethod
    def _read(path: Path, columns: tuple) -> list[dict]:
        if not path.is_file():
            return []
        with open(path, newline="") as handle:
            text = handle.read()
        if not text.endswith("\n"):
            text = text[:text.rfind("\n") + 1]   # a partial last line of a killed append
        reader = csv.DictReader(text.splitlines())
        return [row for row in reader if all(row.get(c) is not None for c in columns)]


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
