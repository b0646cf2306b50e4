"""`ich predict`: probabilities for any DICOM or PNG files with a trained cascade.

In: paths (DICOM files, PNGs already windowed to RGB like work/png/, or folders: every regular
file in them is tried, since a DICOM needs neither a `.dcm` name nor a preamble), a run directory
(the models and cascade.json) or an `ich export` folder (cascade.onnx, cascade.json: run by
onnxruntime without Keras) and the config (`predict` section).
Out, in out_dir (files are named relative to the root given on the command line, see
ich.data.sources.display_names; no absolute path and no patient identifier is written unless
predict.keep_patient_id):
- predictions.csv: image_id, path, one probability column per label (LABELS order), and
  `<label>_pred` 0/1 at the thresholds of cascade.json.
- submission.csv: the RSNA long format, `ID,Label` with `ID_<hex>_<subtype>` rows, six per image
  in RSNA order (epidural ... subdural, any).
- studies.csv: one row per DICOM study: study_id, n_slices (and patient_id with
  keep_patient_id) and, per label, its probability: with a sequence stage in the run, the
  highest of its series' sequence-stage outputs; without one, the maximum over its slices. PNG
  inputs carry no study, so they are left out of it.
- skipped.csv: path, reason for every DICOM that is not an axial CT image slice (localizers,
  scouts, sagittal/coronal/oblique reformats, other modalities), known from its header.
- failures.csv: path, reason for every input that could not be used (logged and skipped).
- .predict/: the journal a rerun into the same out_dir continues from.

Whole studies, in any file names and order: every DICOM header is read first (no pixels) to
skip what is not an axial CT slice and to group the rest by series, ordered by position along
the slice normal. DICOMs get exactly the training preprocessing: `ich.data.dicom.read_hu`,
then `ich.data.windowing.hu_to_rgb` with the input description recorded in cascade.json
(windows, channel order, image size), and the model's input is assembled from it: with
neighbouring-slice offsets, each slice's neighbours are the given files of its series (edges
repeat). A series is predicted, and journalled, as soon as its last file is decoded (its
context and the sequence stage need all of it); slices without a series (PNGs, headers without
orientation, position or series id) are predicted alone, batch by batch. Decoding runs in
predict.workers isolated processes (ich.compute), or on the Dask cluster of compute.scheduler
(ich.distributed; the workers must see the input folders), in the same order, so the same
batches and the same outputs: a file that crashes or hangs the decoder is a failure, not the
end of the run. Fails (StepError) only when no input at all could be
predicted, on NaN probabilities, and on machine failures (disk full, I/O errors, memory).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ich.compute import TaskError, WorkerStartError, is_machine_error, machine_message
from ich.config import resolve_workers
from ich.constants import (CASCADE_JSON, FAILURES_CSV, LABELS, PREDICTIONS_CSV, RSNA_ORDER,
                           SKIPPED_CSV, STUDIES_CSV, SUBMISSION_CSV)
from ich.data.index import HeaderError, not_axial_reason, read_header, unordered_reason
from ich.data.sources import PNG_SUFFIX, decode_all, display_names, find_inputs
from ich.errors import StepError
from ich.evaluation.cascade_file import check_finite, read_cascade_json
from ich.evaluation.studies import aggregate_studies
from ich.io import Timer, progress, read_cell, safe_cell, summary, write_csv, write_json

JOURNAL_DIR = ".predict"   # resume state inside the output folder

log = logging.getLogger("ich")



def load_any_cascade(folder: Path):
    """A run directory's Keras cascade, or an `ich export` folder's OnnxCascade (same interface).

    Imported lazily: an ONNX export must run without Keras installed.
    """
    from ich.evaluation import onnx_cascade

    if onnx_cascade.is_export(folder):
        return onnx_cascade.load_onnx_cascade(folder)
    from ich.evaluation.inference import load_cascade

    return load_cascade(folder)


def predict_paths(paths: list[Path], run_dir: Path, out_dir: Path, cfg: dict) -> Path:
    """Predict every image found under `paths` with the cascade in `run_dir`; return the path of
    out_dir/predictions.csv. Bad files are recorded in out_dir/failures.csv and skipped;
    localizers, scouts and non-axial images in out_dir/skipped.csv.

    Results are journalled in out_dir/.predict/ as each series (or, for slices without one,
    each batch) finishes, so a killed run loses nothing finished and a rerun into the same
    out_dir continues (files that failed are not tried again unless predict.retry_failed).
    Outputs name files relative to the roots given.
    """
    timer = Timer()
    out_dir = Path(out_dir)
    roots = [Path(p) for p in paths]
    files, failures = find_inputs(roots)
    for failure in failures:            # a missing argument is shown by its name only
        failure["path"] = Path(failure["path"]).name
    names = display_names(roots, files)
    try:
        cascade = load_any_cascade(Path(run_dir))
    except (ValueError, ImportError) as err:  # malformed cascade.json or model, or onnxruntime missing
        raise StepError(str(err)) from err
    spec = cascade.spec
    pc = cfg["predict"]
    batch_size = int(pc["batch_size"])
    workers = resolve_workers(pc["workers"])
    keep_pid = bool(pc.get("keep_patient_id"))
    plan = plan_inputs(files, names)
    journal = Journal(out_dir / JOURNAL_DIR, {"model": _model_identity(Path(run_dir)),
                                              "keep_patient_id": keep_pid})
    done = journal.finished(retry_failed=bool(pc.get("retry_failed")))
    todo = plan.todo(done)
    log.info("predict: %d input files (%d done before, %d skipped: not axial CT images), "
             "%d series, %d workers, model %s", len(files), len(plan.kept) - len(todo),
             len(plan.skipped), len(plan.members), workers, run_dir)

    alone: list[tuple[dict, np.ndarray]] = []        # slices without a series, until a batch is full
    pending: dict[str, list[tuple[dict, np.ndarray]]] = {}
    remaining = Counter(plan.series_of[f] for f in todo if f in plan.series_of)

    def flush(group: list[tuple[dict, np.ndarray]], series: str | None) -> None:
        if not group:
            return
        info = [entry for entry, _ in group]
        ids = [series or "" for _ in info]
        # A slice without a series is its own: its neighbours and its "series" are itself.
        positions = [entry["position"] if series else 0.0 for entry in info]
        probs, _, study = cascade.predict_slices(np.stack([image for _, image in group]), ids,
                                                 positions, batch_size)
        if series:
            first = info[0]
            journal.add_series({"series_id": series, "study_id": first["study_id"],
                                "patient_id": first["patient_id"], "n_slices": len(info),
                                **{label: float(study[0, j]) for j, label in enumerate(LABELS)}})
        _journal_batch(journal, info, probs)
        group.clear()

    max_mb = pc.get("max_file_mb")
    try:
        with progress(total=len(todo), desc="predict", unit="img") as bar:
            for path, image, info in decode_all(todo, spec.png_windows, spec.image_size, workers,
                                                timeout_s=pc.get("file_timeout_s"),
                                                max_bytes=int(max_mb * 2 ** 20) if max_mb else None,
                                                scheduler=cfg["compute"]["scheduler"]):
                bar.update(1)
                name, series = names[path], plan.series_of.get(path)
                if image is None:
                    log.warning("predict: skipped %s: %s", name, info["reason"])
                    journal.add_failure(name, info["reason"])
                else:
                    entry = {"name": name, "image_id": info["image_id"],
                             "study_id": info.get("study_id", ""), "series_id": series or "",
                             "patient_id": info.get("patient_id", "") if keep_pid else "",
                             "position": plan.position.get(path, info.get("position", np.nan))}
                    (pending.setdefault(series, []) if series else alone).append((entry, image))
                if series:
                    remaining[series] -= 1
                    if remaining[series] == 0:          # the whole series is decoded
                        flush(pending.pop(series, []), series)
                elif len(alone) >= batch_size:
                    flush(alone, None)
            flush(alone, None)
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
    write_csv(pd.DataFrame(plan.skipped, columns=["path", "reason"]), out_dir / SKIPPED_CSV)
    if not rows:
        raise StepError(f"nothing could be predicted: none of the {len(files) + len(failures)} inputs "
                        f"was a readable axial DICOM or RGB PNG; reasons in {out_dir / FAILURES_CSV} "
                        f"and {out_dir / SKIPPED_CSV}")
    table = pd.DataFrame(rows).rename(columns={"name": "path"})
    p = table[list(LABELS)].to_numpy(dtype=np.float32)
    predictions = prediction_table(table, p, cascade.thresholds)
    write_csv(submission_table(predictions), out_dir / SUBMISSION_CSV)
    studies = study_table(table, p, pd.DataFrame(journal.read_series()))
    if not keep_pid:
        studies = studies.drop(columns="patient_id")
    write_csv(studies, out_dir / STUDIES_CSV)
    path = write_csv(predictions, out_dir / PREDICTIONS_CSV)
    source = "sequence stage" if cascade.sequence_stage is not None else "max over slices"
    summary("predict", f"{len(rows)} images predicted ({len(todo)} this run), {len(failures)} failed, "
            f"{len(plan.skipped)} skipped, {len(studies)} studies ({source}) -> {out_dir}",
            len(todo), "images", timer)
    return path


@dataclass
class InputPlan:
    """What the headers say about the input files, before any pixel is decoded."""

    kept: list[Path]                       # files to predict, in input order
    skipped: list[dict]                    # {path, reason}: localizers, scouts, reformats, other modalities
    series_of: dict[Path, str]             # file -> its series, for files that can be placed in one
    position: dict[Path, float]            # file -> position along its slice normal
    members: dict[str, list[Path]]         # series -> its files
    names: dict[Path, str]

    def todo(self, done: set[str]) -> list[Path]:
        """Files still to predict: a series is predicted whole, so every file of a series with
        any file not done is redone (its neighbours and its study result depend on all of them)."""
        open_series = {series for series, files in self.members.items()
                       if any(self.names[f] not in done for f in files)}
        return [f for f in self.kept
                if (self.series_of[f] in open_series if f in self.series_of else self.names[f] not in done)]


def plan_inputs(files: list[Path], names: dict[Path, str]) -> InputPlan:
    """Read each DICOM's header (no pixel data) and sort the files into skipped (not an axial CT
    image: localizer, scout, sagittal/coronal/oblique reformat, another modality), placed in a
    series (orientation, position and series id known), and alone (PNGs, headers without that
    geometry, and files that are not readable DICOM: decoding names their fault)."""
    kept, skipped, series_of, position, members = [], [], {}, {}, {}
    for path in files:
        row = None
        if path.suffix.lower() != PNG_SUFFIX:
            try:
                row = read_header(path)
            except (HeaderError, OSError):
                row = None  # decoding says what is wrong with it, or reads it as a PNG
        if row is not None:
            why = not_axial_reason(row)
            if why:
                skipped.append({"path": names[path], "reason": why})
                continue
            if not unordered_reason(row):
                series_of[path] = row["series_id"]
                position[path] = float(row["position"])
                members.setdefault(row["series_id"], []).append(path)
        kept.append(path)
    return InputPlan(kept, skipped, series_of, position, members, names)


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
    """Predict's resume state in out_dir/.predict/: rows.csv, series.csv and failed.csv,
    appended and fsync'd per series or batch, and settings.json (the model and options they were made with). A record
    made with other settings is discarded at start. A killed append leaves at most one partial
    last line, which `read` drops."""

    ROW_COLUMNS = ("name", "image_id", "study_id", "series_id", "patient_id", "position", *LABELS)
    FAIL_COLUMNS = ("name", "reason")
    SERIES_COLUMNS = ("series_id", "study_id", "patient_id", "n_slices", *LABELS)

    def __init__(self, folder: Path, settings: dict):
        self.folder = Path(folder)
        self.rows_csv, self.failed_csv = self.folder / "rows.csv", self.folder / "failed.csv"
        self.series_csv = self.folder / "series.csv"
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

    def add_series(self, row: dict) -> None:
        """Append one series' result (written before its slices' rows: a series whose rows are
        all on disk always has its result too)."""
        self._append(self.series_csv, self.SERIES_COLUMNS, [row])

    def read_series(self) -> list[dict]:
        """Series results, one per series id (the last kept), numbers parsed."""
        rows = {row["series_id"]: row for row in self._read(self.series_csv, self.SERIES_COLUMNS)}
        for row in rows.values():
            row["n_slices"] = int(row["n_slices"])
            for label in LABELS:
                row[label] = float(row[label])
        return list(rows.values())

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
        # read_cell undoes _append's formula escaping: a name comes back as it was written.
        return [{k: read_cell(v) for k, v in row.items()} for row in reader
                if all(row.get(c) is not None for c in columns)]


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


def study_table(table, probs: np.ndarray, series):
    """Per DICOM study: study_id, patient_id, n_slices and, per label, the highest probability
    over its series' results (the sequence stage's, or a series' highest slice without one) and
    over its slices that are in no series. Rows without a study (PNG inputs, DICOMs lacking
    StudyInstanceUID) are left out."""
    frame = pd.DataFrame(probs, columns=list(LABELS))
    for column in ("study_id", "patient_id", "series_id"):
        frame[column] = table[column].fillna("").astype(str).to_numpy()
    parts = [frame.loc[frame["series_id"] == "", ["study_id", "patient_id", *LABELS]].assign(n_slices=1)]
    if len(series):
        # Only series with slices in the table: a redone series' last result is the one kept.
        series = series[series["series_id"].isin(set(frame["series_id"]))]
        parts.append(series[["study_id", "patient_id", "n_slices", *LABELS]].astype({"study_id": str}))
    return aggregate_studies(pd.concat(parts, ignore_index=True), LABELS, keep=["patient_id"],
                             slices="n_slices")
