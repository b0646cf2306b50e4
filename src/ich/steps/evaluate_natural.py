"""The test patients at natural prevalence: every slice of their axial series, not the sample.

The test split is drawn from the balanced sample (about half its images positive), so its
precision, F1 and calibration say little about real scans, where about 14% of RSNA's slices
show a bleed. With `evaluate.natural_prevalence`, `ich evaluate` also scores every slice the
header index (work/index.parquet) lists for the test split's patients, in their axial series,
read straight from paths.dicom_dir with the run's preprocessing and context, labelled from
work/labels.csv (the whole labels CSV, de-duplicated). No training patient is among them.

In: the config, the loaded cascade, the work dir and the test patients. Out: a table of the
scored slices (image_id, patient_id, study_id, series_id, the six labels and the six
probabilities) and a table of their studies (study_id, n_slices, probabilities, `<label>_true`),
plus the number of files that could not be read. Nothing is written here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ich.constants import INDEX_PARQUET, LABELS, LABELS_CSV
from ich.data.index import skip_reason
from ich.data.sources import decode_all
from ich.errors import StepError
from ich.evaluation.studies import aggregate_studies
from ich.io import progress, read_csv

log = logging.getLogger("ich")

SERIES_PER_CHUNK = 64   # decoded together: bounded memory whatever the number of test patients


def natural_slices(work_dir: Path, patients: set[str]) -> pd.DataFrame:
    """Index rows (with the six labels) of every axial, ordered slice of `patients`, in series
    order; slices the labels CSV does not label are left out. StepError without the index."""
    work_dir = Path(work_dir)
    index_path = work_dir / INDEX_PARQUET
    if not index_path.is_file():
        raise StepError(f"evaluate.natural_prevalence needs the header index {index_path}: run "
                        "`ich index` (or `ich run`), or set evaluate.natural_prevalence false")
    index = pd.read_parquet(index_path)
    index = index[index["patient_id"].astype(str).isin(patients)]
    index = index[index.apply(skip_reason, axis=1) == ""]
    labels = read_csv(work_dir / LABELS_CSV, dtype={"image_id": str})
    rows = index.merge(labels[["image_id", *LABELS]], on="image_id", how="inner")
    return rows.sort_values(["series_id", "position"], kind="stable", ignore_index=True)


def score_natural(cascade, rows: pd.DataFrame, dicom_dir: Path, batch_size: int,
                  workers: int) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """(scored slices, their studies, files that failed) for the index rows of `rows`, series
    by series: decoded from dicom_dir, their neighbours from the same series, then the run's
    stages (the sequence stage included)."""
    spec = cascade.spec
    series_ids = list(dict.fromkeys(rows["series_id"]))
    scored, studies, failed = [], [], 0
    with progress(total=len(rows), desc="natural prevalence", unit="img") as bar:
        for start in range(0, len(series_ids), SERIES_PER_CHUNK):
            chunk = rows[rows["series_id"].isin(set(series_ids[start:start + SERIES_PER_CHUNK]))]
            paths = [Path(dicom_dir) / f for f in chunk["file"]]
            kept, images = [], []
            for k, (_, image, info) in enumerate(decode_all(paths, spec.png_windows, spec.image_size, workers)):
                bar.update(1)
                if image is None:
                    failed += 1
                    log.warning("evaluate: natural prevalence: skipped %s: %s", chunk["file"].iloc[k],
                                info["reason"])
                    continue
                kept.append(k)
                images.append(image)
            if not kept:
                continue
            part = chunk.iloc[kept].reset_index(drop=True)
            probs, runs, series = cascade.predict_slices(np.stack(images), part["series_id"],
                                                         part["position"], batch_size)
            out = part[["image_id", "patient_id", "study_id", "series_id", *LABELS]].copy()
            for j, label in enumerate(LABELS):
                out[f"{label}_prob"] = probs[:, j]
            scored.append(out)
            for k, run in enumerate(runs):
                studies.append({"study_id": part["study_id"].iloc[run[0]], "n_slices": len(run),
                                **{label: float(series[k, j]) for j, label in enumerate(LABELS)},
                                **{f"{label}_true": int(part[label].iloc[run].max()) for label in LABELS}})
    table = pd.concat(scored, ignore_index=True) if scored else pd.DataFrame()
    per_series = pd.DataFrame(studies)
    if per_series.empty:
        return table, per_series, failed
    columns = [*LABELS, *(f"{label}_true" for label in LABELS)]
    return table, aggregate_studies(per_series, columns, slices="n_slices"), failed
