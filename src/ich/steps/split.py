"""Step 4, split: work/images.csv + work/sampled.csv -> work/splits.csv.

Only images that preprocessing turned into PNGs are split. Columns of splits.csv: image_id,
split (train/val/test), patient_id, study_id, the six labels, and `target` (from sampled.csv):
only target rows (1) decide the patient split and are training or evaluation targets; context
rows (0) take their patient's split so that neighbours are gathered within one split.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from ich.errors import StepError
from ich.constants import IMAGES_CSV, LABELS, SAMPLED_CSV, SPLITS_CSV
from ich.io import Timer, summary, write_csv
from ich.stamps import Stamp, reason, record
from ich.data.splits import assign_splits, split_summary

log = logging.getLogger("ich")


def stamps(cfg: dict) -> list[Stamp]:
    """The split depends on the seed, the `split` section, images.csv and sampled.csv."""
    work = Path(cfg["paths"]["work_dir"])
    return [Stamp("split", work, settings={"seed": cfg["seed"], "split": cfg["split"]},
                  inputs=[work / IMAGES_CSV, work / SAMPLED_CSV], outputs=[work / SPLITS_CSV])]


def run(cfg: dict, force: bool = False) -> Path:
    """Write splits.csv under paths.work_dir and return its path."""
    work = Path(cfg["paths"]["work_dir"])
    images_csv, sampled_csv, out = work / IMAGES_CSV, work / SAMPLED_CSV, work / SPLITS_CSV
    for path, step in ((images_csv, "preprocess"), (sampled_csv, "sample")):
        if not path.is_file():
            raise StepError(f"{path} not found; run `ich {step}` first")
    [stamp] = stamps(cfg)
    why = "forced" if force else reason(stamp)
    if why is None:
        log.info("split: %s is up to date (use --force to redo)", out)
        return out
    log.info("split: running (%s)", why)

    timer = Timer()
    images = pd.read_csv(images_csv, usecols=["image_id", "patient_id", "study_id"], dtype=str)
    labels = pd.read_csv(sampled_csv, dtype={"image_id": str})
    frame = images.merge(labels, on="image_id", how="inner", validate="one_to_one")
    unlabelled = len(images) - len(frame)
    if unlabelled:
        log.warning("split: %d image(s) in %s have no labels in %s and are left out",
                    unlabelled, images_csv, sampled_csv)
    if frame.empty:
        raise StepError(f"no labelled images to split: {images_csv} and {sampled_csv} share no image_id")
    if frame["patient_id"].isna().any():
        bad = frame.loc[frame["patient_id"].isna(), "image_id"].head(5).tolist()
        raise StepError(f"{images_csv}: empty patient_id for {bad}; every DICOM needs PatientID")
    if "target" not in frame:  # a sampled.csv from before context sampling: all are targets
        frame["target"] = 1
    # Only training targets decide the split; context rows (target 0) follow their patient.
    targets = frame[frame["target"] == 1]
    try:
        unplaced: list = []
        assigned = assign_splits(targets["patient_id"], targets[list(LABELS)].to_numpy(),
                                 tuple(cfg["split"]["fractions"]), cfg["seed"], unplaced)
    except ValueError as err:
        raise StepError(f"split: {err}") from err
    for j, name in unplaced:
        label = LABELS[j]
        n_pos = targets.loc[targets[label] > 0, "patient_id"].nunique()
        log.warning("split: no positive patient for %s in %s (%d positive patient(s) in all, "
                    "not enough for every split)", label, name, n_pos)
    by_patient = dict(zip(targets["patient_id"], assigned))
    frame["split"] = frame["patient_id"].map(by_patient)
    frame = frame[frame["split"].notna()]
    frame = frame[["image_id", "split", "patient_id", "study_id", *LABELS, "target"]].sort_values("image_id")
    write_csv(frame, out)

    table = split_summary(frame[frame["target"] == 1], list(LABELS))
    for line in table.to_string(index=False).splitlines():
        log.info("split: %s", line)
    line = summary("split", f"{len(frame):,} images of {frame['patient_id'].nunique():,} patients "
                   "split " + "/".join(str(n) for n in table["images"]), len(frame), "images", timer)
    record(stamp, line)
    return out
