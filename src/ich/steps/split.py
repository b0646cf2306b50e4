"""Step 4, split: work/images.csv + work/sampled.csv -> work/splits.csv.

Only images that preprocessing turned into PNGs are split. Columns of splits.csv: image_id,
split (train/val/test), patient_id, study_id, the six labels, and `target` (from sampled.csv):
only target rows (1) decide the patient split and are training or evaluation targets; context
rows (0) take their patient's split so that neighbours are gathered within one split.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ich.errors import StepError
from ich.constants import IMAGES_CSV, LABELS, SAMPLED_CSV, SPLITS_CSV
from ich.io import Timer, read_arrow_cells, summary, write_csv
from ich.stamps import Stamp, must_run, record
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
    if not must_run("split", stamp, force, out):
        return out

    timer = Timer()
    images = _read_csv(images_csv, {"image_id": "string", "patient_id": "string", "study_id": "string"})
    labels = _read_csv(sampled_csv, {"image_id": "string"}, keep=None)
    for table, path in ((images, images_csv), (labels, sampled_csv)):
        if pc.count_distinct(table["image_id"], mode="all").as_py() != table.num_rows:
            raise StepError(f"{path} lists an image_id more than once; run the step that wrote it "
                            "again (`ich preprocess` / `ich sample --force`)")
    # The inner join on image_id, in image id order, on index arrays (issue 11: flat memory).
    where = pc.index_in(images["image_id"], value_set=labels["image_id"])
    matched = np.flatnonzero(pc.is_valid(where).to_numpy(zero_copy_only=False))
    unlabelled = images.num_rows - len(matched)
    if unlabelled:
        log.warning("split: %d image(s) in %s have no labels in %s and are left out",
                    unlabelled, images_csv, sampled_csv)
    if not len(matched):
        raise StepError(f"no labelled images to split: {images_csv} and {sampled_csv} share no image_id")
    order = pc.sort_indices(images["image_id"].take(matched)).to_numpy()
    matched = matched[order]
    label_rows = where.take(matched).to_numpy(zero_copy_only=False)
    del where, order
    frame = images.take(matched).to_pandas()
    del images
    for column in labels.column_names[1:]:
        values = labels[column].take(label_rows).to_numpy(zero_copy_only=False)
        if values.dtype == np.int64 and len(values) and -128 <= values.min() and values.max() <= 127:
            values = values.astype(np.int8)   # 0/1 labels: written the same, an eighth of the memory
        frame[column] = values
    del labels, label_rows
    pa.default_memory_pool().release_unused()
    if frame["patient_id"].isna().any():
        bad = frame.loc[frame["patient_id"].isna(), "image_id"].head(5).tolist()
        raise StepError(f"{images_csv}: empty patient_id for {bad}; every DICOM needs PatientID")
    if "target" not in frame:  # a sampled.csv from before context sampling: all are targets
        frame["target"] = 1
    # Only training targets decide the split; context rows (target 0) follow their patient.
    is_target = (frame["target"] == 1).to_numpy()
    # The targets' patients and labels only (not a copy of the whole table).
    target_patients = frame["patient_id"][is_target]
    target_labels = frame[list(LABELS)].to_numpy()[is_target]
    try:
        unplaced: list = []
        assigned = assign_splits(target_patients, target_labels,
                                 tuple(cfg["split"]["fractions"]), cfg["seed"], unplaced)
    except ValueError as err:
        raise StepError(f"split: {err}") from err
    for j, name in unplaced:
        n_pos = target_patients[target_labels[:, j] > 0].nunique()
        log.warning("split: no positive patient for %s in %s (%d positive patient(s) in all, "
                    "not enough for every split)", LABELS[j], name, n_pos)
    del target_patients, target_labels
    codes, _ = pd.factorize(frame["patient_id"])
    by_patient = np.full(codes.max() + 1, None, dtype=object)
    by_patient[codes[is_target]] = assigned
    frame["split"] = by_patient[codes]
    placed = frame["split"].notna().to_numpy()
    if not placed.all():  # context rows of a patient without targets
        frame = frame[placed]
    frame = frame[["image_id", "split", "patient_id", "study_id", *LABELS, "target"]]
    write_csv(frame, out)

    table = split_summary(frame.loc[(frame["target"] == 1).to_numpy(), ["split", "patient_id", *LABELS]],
                          list(LABELS))
    for line in table.to_string(index=False).splitlines():
        log.info("split: %s", line)
    line = summary("split", f"{len(frame):,} images of {frame['patient_id'].nunique():,} patients "
                   "split " + "/".join(str(n) for n in table["images"]), len(frame), "images", timer)
    record(stamp, line)
    return out


def _read_csv(path: Path, types: dict, keep: list | None = "types"):
    """A CSV as an Arrow table: the columns of `types` (or, with keep=None, every column, the
    others typed as inferred), cells pandas reads as missing ("", NA, ...) null."""
    columns = list(types) if keep == "types" else []
    try:
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in types}, include_columns=columns,
            strings_can_be_null=True))
    except (pa.ArrowInvalid, KeyError) as err:
        raise StepError(f"{path}: cannot read it as a table with columns {', '.join(types)} ({err}); "
                        "run the step that wrote it again") from err
    # write_csv and the journals escaped formula-like cells: ids go on as they were written.
    return read_arrow_cells(table)
