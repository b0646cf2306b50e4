"""External data sets for `ich evaluate --dataset NAME --data PATH`: CQ500, an RSNA-format
folder, or a table the user writes; and the choice of one axial series per study.

In: the dataset's folder or CSV. Out: an `ExternalDataset`: the DICOM files to score (one
series per study), the truth per study and, where the data set has it, per slice, the group
(patient) of each study for the bootstrap, the series considered and why others were left
out, and the files that could not be used, each with a reason. Only DICOM headers are read
here (no pixels); predicting is the caller's job.

Layouts
- cq500 (Chilamkurthy et al. 2018, as published): `PATH/CQ500CT<n> CQ500CT<n>/Unknown Study/
  <series description>/CT<6 digits>.dcm` and `PATH/reads.csv`: one row per study, `name`
  (`CQ500-CT-<n>`), `Category`, then per reader R1, R2, R3 the columns `R1:ICH`, `R1:IPH`,
  `R1:IVH`, `R1:SDH`, `R1:EDH`, `R1:SAH`, ... (0/1; `R1_ICH` or `R1 ICH` are read too). Study
  truth is the majority of the three readers. No slice labels.
- rsna: `PATH/<labels>.csv` in the RSNA long format (`ID,Label`, six rows per image) and the
  DICOMs `ID_<hex>.dcm` in a folder under PATH (`stage_2_train/` or any other). Slice truth
  from the CSV; a study (StudyInstanceUID) is positive for a label when any slice is.
- table: a CSV with a `path` column (a DICOM file, or a folder holding one study; relative to
  the CSV's folder) and any subset of the six labels (0/1, blank = unknown); optional
  `study` and `patient` columns. File rows are slice labels (their study: the `study` column,
  else the StudyInstanceUID; study truth = any of its labelled slices); folder rows are study
  labels (study name: the `study` column, else the path as written).

Series selection (`select_series`): CQ500 studies hold several series (scouts, thin and thick
axial reconstructions, bone kernels). A series is a candidate when it is CT, not a localizer
(ImageType LOCALIZER, or a description naming scout, localizer, topogram or surview), axial
(slice normal within 30 degrees of the patient's z axis), and has at least MIN_SLICES images.
When several qualify, the one whose slice thickness (SliceThickness, else the median gap
between slice positions) is closest to 5 mm, the thickness of the RSNA training slices, is
scored; ties go to the series with more slices, then the lower SeriesNumber, then the UID.
"""

from __future__ import annotations

import logging
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from ich.constants import EXTERNAL_DATASETS, LABELS

log = logging.getLogger("ich")

DATASETS = EXTERNAL_DATASETS
READS_CSV = "reads.csv"
# The RSNA 2019 slices are about 5 mm thick: the series closest to it matches training best.
TARGET_THICKNESS_MM = 5.0
# Scouts are one to three images; a real axial head series has dozens.
MIN_SLICES = 5
# A slice normal within this angle of z is axial (gantry tilts reach about 25 degrees).
MAX_TILT_DEGREES = 30.0
LOCALIZER_WORDS = re.compile(r"scout|locali[sz]er|topogram|surview|scanogram|pilot", re.I)
CQ500_FOLDER = re.compile(r"^CQ500[-_ ]?CT[-_ ]?(\d+)\b", re.I)
CQ500_NAME = re.compile(r"^CQ500[-_ ]?CT[-_ ]?(\d+)$", re.I)
CQ500_READ = re.compile(r"^(R[123])\W*(ICH|IPH|IVH|SDH|EDH|SAH)$", re.I)
# CQ500's reader columns and the labels they are scored as.
CQ500_LABELS = {"ICH": "any", "IPH": "intraparenchymal", "IVH": "intraventricular",
                "SDH": "subdural", "EDH": "epidural", "SAH": "subarachnoid"}
HEADER_THREADS = 8  # header reads are I/O bound


@dataclass
class ExternalDataset:
    """What `load_dataset` found; every table has a `study` column naming the study as the
    data set names it."""

    name: str
    files: pd.DataFrame          # study, path, series_id, image_id, position: the slices to score
    study_truth: pd.DataFrame    # study, patient, then labels (float 0/1, NaN = unknown)
    slice_truth: pd.DataFrame | None  # path, then labels; None when the set has no slice labels
    series: pd.DataFrame         # study, series_id, description, n_images, chosen, reason
    failures: list[dict] = field(default_factory=list)  # {"path", "reason"}

    @property
    def labels(self) -> list[str]:
        """The labels this data set has truth for, in LABELS order."""
        return [label for label in LABELS if label in self.study_truth.columns]


class DatasetError(ValueError):
    """A data set that cannot be read as the named layout; the message says what is wrong."""


def load_dataset(name: str, path: str | Path) -> ExternalDataset:
    """Read the data set `name` (one of DATASETS) at `path`: see the module docstring."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; valid: {list(DATASETS)}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data {path} not found")
    return {"cq500": load_cq500, "rsna": load_rsna, "table": load_table}[name](path)


# ---- headers and series selection -------------------------------------------------------

def read_header(path: Path) -> dict:
    """The header fields series selection and scoring need, or {"path", "error"}."""
    import warnings

    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as err:  # noqa: BLE001 - one unreadable file is a failure row, not a crash
        return {"path": str(path), "error": f"not a readable DICOM ({type(err).__name__}: {err})"}
    orientation = _floats(ds.get("ImageOrientationPatient"))
    position = _floats(ds.get("ImagePositionPatient"))
    normal = (np.cross(orientation[:3], orientation[3:]) if len(orientation) == 6 else None)
    return {
        "path": str(path),
        "error": "",
        "modality": str(ds.get("Modality", "") or ""),
        "patient_id": str(ds.get("PatientID", "") or ""),
        "study_id": str(ds.get("StudyInstanceUID", "") or ""),
        "series_id": str(ds.get("SeriesInstanceUID", "") or ""),
        "series_number": _int_or_none(ds.get("SeriesNumber")),
        "series_description": str(ds.get("SeriesDescription", "") or ""),
        "image_type": "\\".join(str(v) for v in (ds.get("ImageType") or [])),
        "image_id": str(ds.get("SOPInstanceUID", "") or path.stem),
        "normal_z": float(abs(normal[2]) / (np.linalg.norm(normal) or 1)) if normal is not None else math.nan,
        "position": (float(np.dot(position, normal)) if normal is not None and len(position) == 3
                     else math.nan),
        "slice_thickness": _float_or_nan(ds.get("SliceThickness")),
    }


def read_headers(paths: Iterable[Path]) -> list[dict]:
    """`read_header` of each path, in order, on a few threads."""
    paths = list(paths)
    with ThreadPoolExecutor(HEADER_THREADS) as pool:
        return list(pool.map(read_header, paths))


def select_series(headers: list[dict]) -> tuple[str | None, dict[str, str]]:
    """Pick the series to score among one study's headers (dicts of `read_header`).

    Out: (chosen series_id or None when none qualifies, {series_id: why it was or was not
    chosen}). The rule is the module docstring's; pure, no I/O.
    """
    by_series: dict[str, list[dict]] = {}
    for h in headers:
        by_series.setdefault(h.get("series_id", ""), []).append(h)
    reasons: dict[str, str] = {}
    candidates = []
    cos_tilt = math.cos(math.radians(MAX_TILT_DEGREES))
    for series_id, rows in by_series.items():
        description = rows[0].get("series_description", "")
        types = " ".join(r.get("image_type", "") for r in rows).upper()
        normal_z = np.array([r.get("normal_z", math.nan) for r in rows], dtype=float)
        if any(r.get("modality", "CT") not in ("CT", "") for r in rows):
            reasons[series_id] = f"modality {rows[0].get('modality')}, not CT"
        elif "LOCALIZER" in types or LOCALIZER_WORDS.search(description):
            reasons[series_id] = "localizer/scout"
        elif np.isfinite(normal_z).any() and np.nanmedian(normal_z) < cos_tilt:
            reasons[series_id] = "not axial (a reformat)"
        elif len(rows) < MIN_SLICES:
            reasons[series_id] = f"only {len(rows)} images (fewer than {MIN_SLICES})"
        else:
            thickness = series_thickness(rows)
            key = (abs(thickness - TARGET_THICKNESS_MM) if np.isfinite(thickness) else math.inf,
                   -len(rows), _number_key(rows[0].get("series_number")), series_id)
            candidates.append((key, series_id, thickness))
    if not candidates:
        return None, reasons
    candidates.sort()
    chosen = candidates[0][1]
    for key, series_id, thickness in candidates:
        text = f"{thickness:.2g} mm" if np.isfinite(thickness) else "unknown thickness"
        reasons[series_id] = (f"chosen: axial, {text}, closest to {TARGET_THICKNESS_MM:g} mm"
                              if series_id == chosen else
                              f"axial, {text}; another axial series is closer to "
                              f"{TARGET_THICKNESS_MM:g} mm")
    return chosen, reasons


def series_thickness(rows: list[dict]) -> float:
    """Slice thickness of a series in mm: the median SliceThickness tag, else the median gap
    between sorted slice positions; NaN when neither is known."""
    tags = np.array([r.get("slice_thickness", math.nan) for r in rows], dtype=float)
    if np.isfinite(tags).any():
        return float(np.nanmedian(tags))
    positions = np.sort(np.array([r.get("position", math.nan) for r in rows], dtype=float))
    positions = positions[np.isfinite(positions)]
    gaps = np.diff(positions)
    gaps = gaps[gaps > 1e-6]
    return float(np.median(gaps)) if len(gaps) else math.nan


def choose_files(headers: list[dict], study_of: dict[str, str], select: bool = True
                 ) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """Group headers by study (`study_of`: path -> study name), pick each study's series
    (`select` False: every readable file is scored, for files the user listed one by one).

    Out: (files: study, path, series_id, image_id, patient_id, position of the chosen series
    sorted by position; series: study, series_id, description, n_images, chosen, reason;
    failures: unreadable files and studies without a usable series).
    """
    failures = [{"path": h["path"], "reason": h["error"]} for h in headers if h.get("error")]
    good = [h for h in headers if not h.get("error")]
    per_study: dict[str, list[dict]] = {}
    for h in good:
        per_study.setdefault(study_of[h["path"]], []).append(h)
    files, series = [], []
    for study in sorted(per_study):
        rows = per_study[study]
        if select:
            chosen, reasons = select_series(rows)
        else:
            chosen, reasons = None, {r.get("series_id", ""): "listed file by file" for r in rows}
        for series_id, reason in reasons.items():
            members = [r for r in rows if r.get("series_id", "") == series_id]
            series.append({"study": study, "series_id": series_id,
                           # CQ500 names each series' folder after its description.
                           "description": (members[0].get("series_description")
                                           or Path(members[0]["path"]).parent.name),
                           "n_images": len(members), "chosen": series_id == chosen or not select,
                           "reason": reason})
        if select and chosen is None:
            failures.append({"path": study, "reason": "no axial CT series to score: "
                             + "; ".join(f"{k or '?'}: {v}" for k, v in reasons.items())})
            continue
        picked = sorted((r for r in rows if not select or r.get("series_id", "") == chosen),
                        key=lambda r: (r["position"] if np.isfinite(r["position"]) else math.inf, r["path"]))
        files += [{"study": study, "path": r["path"], "series_id": r.get("series_id", ""),
                   "image_id": r["image_id"],
                   "patient_id": r["patient_id"], "position": r["position"]} for r in picked]
    columns = ["study", "path", "series_id", "image_id", "patient_id", "position"]
    series_columns = ["study", "series_id", "description", "n_images", "chosen", "reason"]
    return (pd.DataFrame(files, columns=columns), pd.DataFrame(series, columns=series_columns), failures)


# ---- CQ500 -------------------------------------------------------------------------------

def cq500_name(folder_name: str) -> str | None:
    """'CQ500CT42 CQ500CT42' (a study folder) or 'CQ500-CT-42' -> 'CQ500-CT-42'; None if neither."""
    match = CQ500_FOLDER.match(folder_name.strip()) or CQ500_NAME.match(folder_name.strip())
    return f"CQ500-CT-{int(match.group(1))}" if match else None


def cq500_truth(reads: pd.DataFrame, source: str = READS_CSV) -> pd.DataFrame:
    """reads.csv -> study, patient, then the six labels: 1 where at least two of the three
    readers marked the finding. Raises DatasetError naming what is missing."""
    if "name" not in reads.columns:
        raise DatasetError(f"{source}: no 'name' column (CQ500 names studies like CQ500-CT-42)")
    columns: dict[tuple[str, str], str] = {}
    for column in reads.columns:
        match = CQ500_READ.match(str(column).strip())
        if match:
            columns[(match.group(1).upper(), match.group(2).upper())] = column
    missing = [f"{r}:{f}" for r in ("R1", "R2", "R3") for f in CQ500_LABELS if (r, f) not in columns]
    if missing:
        raise DatasetError(f"{source}: reader columns {missing} missing; expected R1:ICH ... R3:SAH")
    out = pd.DataFrame({"study": [cq500_name(str(n)) or str(n) for n in reads["name"]]})
    out["patient"] = out["study"]  # one study per patient in CQ500
    for finding, label in CQ500_LABELS.items():
        votes = np.zeros(len(reads))
        for reader in ("R1", "R2", "R3"):
            values = pd.to_numeric(reads[columns[(reader, finding)]], errors="coerce")
            if values.isna().any() or not values.isin((0, 1)).all():
                bad = reads.loc[~values.isin((0, 1)), "name"].tolist()[:5]
                raise DatasetError(f"{source}: column {columns[(reader, finding)]} holds values other "
                                   f"than 0/1 for {bad}")
            votes += values.to_numpy()
        out[label] = (votes >= 2).astype(float)
    return out[["study", "patient", *LABELS]]


def load_cq500(root: Path) -> ExternalDataset:
    """The CQ500 layout (module docstring). Studies without a reads.csv row, and rows without
    a folder, are failures with that reason."""
    reads_path = root / READS_CSV
    if not reads_path.is_file():
        raise DatasetError(f"{reads_path} not found: a CQ500 folder holds reads.csv beside the "
                           "CQ500CT<n> CQ500CT<n> study folders")
    truth = cq500_truth(pd.read_csv(reads_path), str(reads_path))
    folders = {cq500_name(p.name): p for p in sorted(root.iterdir()) if p.is_dir() and cq500_name(p.name)}
    failures = [{"path": str(p), "reason": f"no row {name} in {READS_CSV}"}
                for name, p in folders.items() if name not in set(truth["study"])]
    failures += [{"path": name, "reason": f"listed in {READS_CSV} but no folder under {root}"}
                 for name in truth["study"] if name not in folders]
    study_of = {}
    for name, folder in folders.items():
        if name in set(truth["study"]):
            for f in sorted(folder.rglob("*")):
                if f.is_file() and f.suffix.lower() in (".dcm", ".dicom"):
                    study_of[str(f)] = name
    if not study_of:
        raise DatasetError(f"no CQ500CT<n> study folders with .dcm files under {root}")
    files, series, more = choose_files(read_headers(map(Path, study_of)), study_of)
    truth = truth[truth["study"].isin(folders)].reset_index(drop=True)
    return ExternalDataset("cq500", files, truth, None, series, failures + more)


# ---- RSNA ----------------------------------------------------------------------------------

def load_rsna(root: Path) -> ExternalDataset:
    """An RSNA-format folder: a long-format labels CSV and the DICOMs it names (module doc).
    Images listed without a file, and files not listed, are failures with that reason."""
    from ich.data.labels import long_to_wide, read_long_csv

    csvs = sorted(root.glob("*.csv")) if root.is_dir() else []
    csvs = [c for c in csvs if c.read_text(errors="replace")[:64].lstrip().startswith("ID,Label")]
    if len(csvs) != 1:
        raise DatasetError(f"{root}: expected exactly one RSNA labels CSV (header 'ID,Label') "
                           f"there, found {[c.name for c in csvs] or 'none'}")
    wide = long_to_wide(read_long_csv(csvs[0]), str(csvs[0]))
    on_disk = {p.stem: p for p in sorted(root.rglob("ID_*.dcm"))}
    failures = [{"path": image_id, "reason": f"listed in {csvs[0].name} but no {image_id}.dcm under {root}"}
                for image_id in wide["image_id"] if image_id not in on_disk]
    listed = set(wide["image_id"])
    failures += [{"path": str(p), "reason": f"not listed in {csvs[0].name}"}
                 for stem, p in on_disk.items() if stem not in listed]
    paths = [on_disk[i] for i in wide["image_id"] if i in on_disk]
    headers = read_headers(paths)
    # Every slice the CSV labels is scored (RSNA folders hold the axial slices only); the
    # study is the StudyInstanceUID.
    study_of = {h["path"]: h.get("study_id") or Path(h["path"]).stem for h in headers}
    files, series, more = choose_files(headers, study_of, select=False)
    slice_truth = wide.assign(path=[str(on_disk.get(i, "")) for i in wide["image_id"]])
    slice_truth = slice_truth[slice_truth["path"].isin(set(files["path"]))]
    slice_truth = slice_truth[["path", *LABELS]].astype({label: float for label in LABELS})
    joined = files[["study", "path", "patient_id"]].merge(slice_truth, on="path")
    study_truth = joined.groupby("study", sort=True).agg(
        patient=("patient_id", "first"), **{label: (label, "max") for label in LABELS}).reset_index()
    study_truth["patient"] = study_truth["patient"].replace("", np.nan).fillna(study_truth["study"])
    return ExternalDataset("rsna", files, study_truth, slice_truth.reset_index(drop=True), series,
                           failures + more)


# ---- a user's table --------------------------------------------------------------------------

def load_table(csv_path: Path) -> ExternalDataset:
    """A user's CSV (module docstring). Rows whose path does not exist are failures."""
    if not csv_path.is_file():
        raise DatasetError(f"--data {csv_path}: the table dataset takes a CSV file")
    table = pd.read_csv(csv_path, dtype={"path": str, "study": str, "patient": str})
    if "path" not in table.columns:
        raise DatasetError(f"{csv_path}: no 'path' column (a DICOM file or a study folder per row)")
    labels = [label for label in LABELS if label in table.columns]
    unknown = [c for c in table.columns if c not in ("path", "study", "patient", *LABELS)]
    if unknown:
        log.warning("evaluate: %s: columns %s are ignored (labels are %s)", csv_path, unknown, list(LABELS))
    if not labels:
        raise DatasetError(f"{csv_path}: no label column; give any of {list(LABELS)} (0/1)")
    for label in labels:
        values = pd.to_numeric(table[label], errors="coerce")
        bad = table.loc[table[label].notna() & ~values.isin((0, 1)), "path"].tolist()
        if bad:
            raise DatasetError(f"{csv_path}: column {label} must be 0, 1 or blank; rows with "
                               f"other values: {bad[:5]}")
        table[label] = values.astype(float)
    base = csv_path.parent
    failures, study_of, folder_rows, file_rows = [], {}, [], []
    for i, row in table.iterrows():
        written = str(row["path"])
        path = Path(written) if Path(written).is_absolute() else base / written
        if path.is_dir():
            name = _given(row, "study") or written
            members = [f for f in sorted(path.rglob("*")) if f.is_file() and _dicom_like(f)]
            if not members:
                failures.append({"path": written, "reason": "folder holds no DICOM files"})
                continue
            study_of.update({str(f): name for f in members})
            folder_rows.append({"study": name, "patient": _given(row, "patient"),
                                **{label: row[label] for label in labels}})
        elif path.is_file():
            file_rows.append({"path": str(path), "study": _given(row, "study"),
                              "patient": _given(row, "patient"), **{label: row[label] for label in labels}})
        else:
            failures.append({"path": written, "reason": "not found"})
    folder_headers = read_headers([Path(p) for p in study_of])
    file_headers = read_headers([Path(r["path"]) for r in file_rows])
    by_path = {h["path"]: h for h in file_headers}
    for r in file_rows:
        h = by_path[r["path"]]
        study_of[r["path"]] = r["study"] or h.get("study_id") or Path(r["path"]).stem
    parts = [choose_files(folder_headers, study_of), choose_files(file_headers, study_of, select=False)]
    files = pd.concat([p[0] for p in parts], ignore_index=True)
    series = pd.concat([p[1] for p in parts], ignore_index=True)
    more = parts[0][2] + parts[1][2]
    slice_truth = None
    truth_rows = list(folder_rows)
    if file_rows:
        slices = pd.DataFrame(file_rows)
        slice_truth = slices[["path", *labels]].reset_index(drop=True)
        slices["study"] = [study_of[p] for p in slices["path"]]
        slices["patient"] = [p or by_path[q].get("patient_id") for p, q in zip(slices["patient"], slices["path"])]
        grouped = slices.groupby("study", sort=True)
        for study, part in grouped:
            truth_rows.append({"study": study, "patient": part["patient"].iloc[0],
                               **{label: part[label].max() for label in labels}})
    study_truth = pd.DataFrame(truth_rows, columns=["study", "patient", *labels])
    study_truth["patient"] = study_truth["patient"].replace("", np.nan).fillna(study_truth["study"])
    # Folder studies take their patient from the headers when the table names none.
    headers_patient = files.groupby("study")["patient_id"].first().to_dict() if len(files) else {}
    study_truth["patient"] = [headers_patient.get(s) or p if p == s else p
                              for s, p in zip(study_truth["study"], study_truth["patient"])]
    return ExternalDataset("table", files, study_truth.reset_index(drop=True), slice_truth, series,
                           failures + more)


def _given(row: pd.Series, column: str) -> str:
    value = row.get(column)
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _dicom_like(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _floats(value) -> list[float]:
    try:
        return [float(v) for v in value] if value is not None else []
    except (TypeError, ValueError):
        return []


def _float_or_nan(value) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except (TypeError, ValueError):
        return math.nan


def _int_or_none(value) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _number_key(value) -> float:
    return float(value) if value is not None else math.inf
