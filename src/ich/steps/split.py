"""Step 4, split: work/images.csv + work/sampled.csv -> work/splits.csv.

Only images that preprocessing turned into PNGs are split. Columns of splits.csv: image_id,
split (train/val/test), patient_id, study_id, the six labels, and `target` (from sampled.csv):
only target rows (1) decide the patient split and are training or evaluation targets; context
rows (0) take their patient's split so that neighbours are gathered within one split.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ich.errors import StepError
from ich.constants import IMAGES_CSV, LABELS, SAMPLED_CSV, SPLITS, SPLITS_CSV
from ich.data.arrays import sorted_codes, sorted_lookup, sorted_unique
from ich.io import CSV_BLOCK_ROWS, Timer, read_arrow_cells, summary, write_csv_blocks
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
    columns = ("image_id", "patient_id", "study_id")
    images = _read_csv(images_csv, columns, columns)
    labels = _read_csv(sampled_csv, ("image_id", *LABELS, "target"), ("image_id", *LABELS))
    # The inner join on image_id, in image id order, on the sorted ids (issue 11: flat memory;
    # a hash table of the 752,803 ids took about 70 MB).
    image_order, image_ids, images = _sorted_ids(images, images_csv)
    label_order, label_ids, labels = _sorted_ids(labels, sampled_csv)
    where = sorted_lookup(image_ids, label_ids)
    found = where >= 0
    matched, label_rows, image_ids = image_order[found], label_order[where[found]], image_ids.filter(found)
    unlabelled = len(image_order) - len(matched)
    del label_ids, image_order, label_order, where, found
    if unlabelled:
        log.warning("split: %d image(s) in %s have no labels in %s and are left out",
                    unlabelled, images_csv, sampled_csv)
    if not len(matched):
        raise StepError(f"no labelled images to split: {images_csv} and {sampled_csv} share no image_id")
    values = {column: _label_values(labels[column].take(label_rows)) for column in labels.column_names}
    if "target" not in values:  # a sampled.csv from before context sampling: all are targets
        values["target"] = np.ones(len(matched), dtype=np.int64)
    del labels, label_rows
    patients = images["patient_id"].take(matched)
    if patients.null_count:
        bad = image_ids.filter(pc.is_null(patients)).slice(0, 5).to_pylist()
        raise StepError(f"{images_csv}: empty patient_id for {bad}; every DICOM needs PatientID")
    # Patients as integer codes in the order of their ids: what assign_splits would make of
    # the ids (pd.factorize, sorted), without a pandas column of every image's id. Studies as
    # a dictionary: the images' table is not kept.
    codes, patient_ids = sorted_codes(patients)
    studies = pc.dictionary_encode(images["study_id"].take(matched).combine_chunks())
    del images, patients, matched
    pa.default_memory_pool().release_unused()   # the reads' and sorts' scratch
    # Only training targets decide the split; context rows (target 0) follow their patient.
    is_target = values["target"] == 1
    target_codes = codes[is_target]
    target_labels = np.column_stack([values[label] for label in LABELS])[is_target]
    try:
        unplaced: list = []
        assigned = assign_splits(pd.Series(target_codes), target_labels,
                                 tuple(cfg["split"]["fractions"]), cfg["seed"], unplaced)
    except ValueError as err:
        raise StepError(f"split: {err}") from err
    for j, name in unplaced:
        n_pos = len(sorted_unique(target_codes[target_labels[:, j] > 0]))
        log.warning("split: no positive patient for %s in %s (%d positive patient(s) in all, "
                    "not enough for every split)", LABELS[j], name, n_pos)
    del target_labels
    # Each image's split, as an index into SPLITS (-1: context rows of a patient without targets).
    by_patient = np.full(codes.max() + 1, -1, dtype=np.int8)
    for k, name in enumerate(SPLITS):
        by_patient[target_codes[assigned == name]] = k
    split_of = by_patient[codes]
    placed = np.flatnonzero(split_of >= 0)
    names = np.array(SPLITS, dtype=object)
    write_csv_blocks(_blocks(placed, names[split_of[placed]], image_ids, patient_ids, codes[placed],
                             studies, {column: value[placed] for column, value in values.items()}), out)

    targets = placed[is_target[placed]]
    table = split_summary(names[split_of[targets]], codes[targets],
                          np.column_stack([values[label][targets] for label in LABELS]), list(LABELS))
    for line in table.to_string(index=False).splitlines():
        log.info("split: %s", line)
    line = summary("split", f"{len(placed):,} images of {int((by_patient >= 0).sum()):,} patients "
                   "split " + "/".join(str(n) for n in table["images"]), len(placed), "images", timer)
    record(stamp, line)
    return out


def _label_values(column) -> np.ndarray:
    """A sampled.csv column as numpy: integers that fit as int8 (written the same, an eighth of
    the memory), anything else as read (a column with an empty cell as float64, NaN there)."""
    values = column.to_numpy(zero_copy_only=False)
    if values.dtype.kind == "i" and len(values) and -128 <= values.min() and values.max() <= 127:
        values = values.astype(np.int8, copy=False)
    return values


def _blocks(rows: np.ndarray, split: np.ndarray, image_ids, patient_ids, patients: np.ndarray, studies,
            values: dict) -> Iterator[pd.DataFrame]:
    """splits.csv a block of CSV_BLOCK_ROWS rows at a time: the rows `rows` of `image_ids` and
    `studies` (a dictionary array), with `split`, the patients (`patient_ids` of the codes
    `patients`) and the label columns `values` already in the rows' order. Text columns go to
    pandas as strings (a null one empty)."""
    for start in range(0, max(len(rows), 1), CSV_BLOCK_ROWS):
        part = slice(start, start + CSV_BLOCK_ROWS)
        source = pa.array(rows[part], pa.int64())
        frame = pd.DataFrame({"image_id": image_ids.take(source).to_pandas(),
                              "split": split[part],
                              "patient_id": patient_ids.take(patients[part]).to_pandas(),
                              "study_id": studies.take(source).dictionary_decode().to_pandas()})
        for column in (*LABELS, "target"):
            frame[column] = values[column][part]
        yield frame


def _sorted_ids(table, path: Path):
    """(the row order that sorts table's image ids, the sorted ids, the table without its
    image_id column: the sorted ids stand for it); a StepError naming `path` for an empty or
    repeated id."""
    ids = table["image_id"]
    table = table.drop_columns(["image_id"])
    ids = ids.combine_chunks()
    if ids.null_count:
        row = pc.index(pc.is_null(ids), True).as_py()
        raise StepError(f"{path}: empty image_id in data row {row + 1}; run the step that wrote it again")
    order = pc.sort_indices(ids).to_numpy()
    ids = ids.take(order)
    if len(ids) > 1 and pc.any(pc.equal(ids[1:], ids[:-1])).as_py():
        raise StepError(f"{path} lists an image_id more than once; run the step that wrote it "
                        "again (`ich preprocess` / `ich sample --force`)")
    return order, ids, table


def _read_csv(path: Path, columns: tuple, required: tuple):
    """The `columns` of a CSV that are there (all of `required` must be) as an Arrow table, ids
    (`*_id`) as strings, the others as int8 (0/1 labels; read by inference, as int64, they
    took about three times the memory) or, when a value does not fit, typed as inferred; cells
    pandas reads as missing ("", NA, ...) null. Read on one thread: the parallel reader's
    blocks held about a third more."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError) as err:
        raise StepError(f"{path}: cannot read it ({err}); run the step that wrote it again") from err
    missing = [name for name in required if name not in header]
    if missing:
        raise StepError(f"{path} has no column {', '.join(missing)}; run the step that wrote it again")
    present = [name for name in columns if name in header]
    ids = {name: pa.string() for name in present if name.endswith("_id")}
    small = {name: pa.int8() for name in present if name not in ids}
    for types in (ids | small, ids):
        try:
            table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(use_threads=False),
                                   convert_options=pacsv.ConvertOptions(
                                       column_types=types, include_columns=present, strings_can_be_null=True))
            break
        except (pa.ArrowInvalid, KeyError) as err:
            if types is ids or not small:
                raise StepError(f"{path}: cannot read it as a table with columns {', '.join(required)} "
                                f"({err}); run the step that wrote it again") from err
    # write_csv and the journals escaped formula-like cells: ids go on as they were written.
    table = read_arrow_cells(table)
    pa.default_memory_pool().release_unused()   # the reader's blocks
    return table
