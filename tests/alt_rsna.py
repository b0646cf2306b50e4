"""An independent RSNA-format test data writer for the preprocess tests (not ich.synth).

`write_alt_rsna(root)` writes root/stage_2_train/ID_<hex>.dcm and root/stage_2_train.csv the
way the real dataset stores them, with its quirks: signed 16-bit with intercept -1024 and -2000
padding outside the field of view; unsigned 12-bit with the intercept as the decimal string
'-1024.000000'; the 12-bit intercept bug (intercept 0 or 1, HU wrapped into 12 bits); 2-valued
WindowCenter/Width; non-square slices; tilted series; one JPEG 2000 file. Plus bad inputs: a
truncated file, a non-DICOM file, an MR slice, a header without pixels, CSV IDs without a file
and duplicated CSV rows. Anatomy: an ellipse of bone around brain, a rectangular ventricle and,
in some slices, a rectangular bleed, all of known integer HU. Returns the truth to check against.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from ich.constants import RSNA_ORDER

AIR, BRAIN, CSF, BLOOD, BONE = -1000, 35, 8, 70, 1300
PADDING_RAW = -2000              # raw value outside the field of view in signed RSNA files
VARIANTS = ("int16", "uint12", "uint12_bug", "int16_nonsquare")
TILTS_DEG = (0.0, 15.0, -22.0)
BAD_KINDS = ("truncated", "not_dicom", "mr", "no_pixels")


PATIENT_NAME = "Doe^Jane"
INSTITUTION = "St Elsewhere General"
ACCESSION = "ACC7734521"


def write_alt_rsna(root: Path, n_patients: int = 4, slices: int = 5, size: int = 64,
                   seed: int = 0, patient_prefix: str = "") -> dict:
    """Write an RSNA-like folder under `root`; return the truth. `patient_prefix` starts every
    PatientID (a hospital's free text: "=" makes one a spreadsheet formula).

    Truth keys: dicom_dir, csv, hu {id: float32 HU}, meta {id: dict of expected metadata},
    labels {id: {label: 0/1}}, variant {id: storage variant}, bad {id: kind}, compressed [ids],
    missing [ids in the CSV without a file], duplicated [ids listed twice in the CSV].
    """
    with _quiet_rsna_uids():
        return _write(Path(root), n_patients, slices, size, np.random.default_rng(seed), patient_prefix)


def _write(root: Path, n_patients: int, slices: int, size: int, rng, patient_prefix: str) -> dict:
    dicom_dir = root / "stage_2_train"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    truth = {"dicom_dir": dicom_dir, "csv": root / "stage_2_train.csv", "hu": {}, "meta": {},
             "labels": {}, "variant": {}, "bad": {}, "compressed": [], "missing": [],
             "duplicated": []}
    used: set[str] = set()
    for p in range(n_patients):
        variant = VARIANTS[p % len(VARIANTS)]
        tilt = np.deg2rad(TILTS_DEG[p % len(TILTS_DEG)])
        rows = size * 3 // 4 if variant == "int16_nonsquare" else size
        series = {"patient_id": patient_prefix + _hex_id(rng, 8, used), "study_id": _hex_id(rng, 10, used),
                  "series_id": _hex_id(rng, 10, used)}
        spacing = round(float(rng.uniform(0.4, 0.6)), 6)
        orientation = [1.0, 0.0, 0.0, 0.0, float(np.cos(tilt)), float(-np.sin(tilt))]
        normal = np.cross(orientation[:3], orientation[3:])
        start = float(rng.uniform(-50, 50))
        for k in range(slices):
            image_id = _hex_id(rng, 9, used)
            bleed = (k + p) % 2 == 1
            hu = _phantom(rows, size, bleed, rng)
            position = start + 5.0 * k
            # In-plane offset along the row and column directions, so the projection on the
            # normal is exactly `position`.
            ipp = (-size * spacing / 2 * np.asarray(orientation[:3])
                   - rows * spacing / 2 * np.asarray(orientation[3:]) + position * normal)
            stored, hu, header = _store(hu, variant, k)
            ds = _dataset(image_id, stored, header, series, orientation, ipp, spacing)
            if p == 0 and k == 0:
                ds.compress(JPEG2000Lossless, generate_instance_uid=False)
                truth["compressed"].append(image_id)
            _save(ds, dicom_dir / f"{image_id}.dcm")
            truth["hu"][image_id] = hu
            truth["variant"][image_id] = variant
            truth["meta"][image_id] = dict(series, position=position, rows=rows, columns=size,
                                           pixel_spacing=spacing)
            truth["labels"][image_id] = _labels(bleed)
    _write_bad_files(truth, dicom_dir, rng, used, patient_prefix)
    truth["missing"] = [_hex_id(rng, 9, used) for _ in range(2)]
    for image_id in truth["missing"]:
        truth["labels"][image_id] = _labels(False)
    truth["duplicated"] = sorted(truth["hu"])[:1]
    _write_csv(truth)
    return truth


def _phantom(rows: int, cols: int, bleed: bool, rng) -> np.ndarray:
    yy, xx = np.mgrid[:rows, :cols].astype(np.float32)
    cy, cx = rows / 2 + rng.uniform(-1, 1), cols / 2 + rng.uniform(-1, 1)
    ry, rx = rows * 0.42, cols * 0.36
    r2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    hu = np.full((rows, cols), AIR, np.float32)
    hu[r2 <= 1.0] = BONE
    hu[r2 <= 0.8] = BRAIN
    iy, ix = int(cy), int(cx)
    hu[iy - rows // 10:iy + rows // 10, ix - cols // 16:ix + cols // 16] = CSF
    if bleed:
        top = int(cy - ry * 0.6)
        hu[top:top + rows // 8, ix + cols // 10:ix + cols // 4] = BLOOD
    return hu


def _store(hu: np.ndarray, variant: str, k: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """HU -> (stored pixels, HU a correct reader must recover, storage tags) for one variant."""
    if variant in ("int16", "int16_nonsquare"):
        intercept = -1024 if variant == "int16" else -1000
        stored = (hu - intercept).astype(np.int16)
        if variant == "int16":
            rows, cols = hu.shape
            yy, xx = np.mgrid[:rows, :cols]
            outside = (yy - rows / 2) ** 2 + (xx - cols / 2) ** 2 > (min(rows, cols) / 2) ** 2
            stored[outside] = PADDING_RAW
            hu = stored.astype(np.float32) + intercept
        tags = {"bits": 16, "signed": True, "intercept": str(intercept),
                "center": ["40", "40"], "width": ["80", "80"]}
        return stored, hu, tags
    if variant == "uint12":
        stored = np.clip(hu + 1024, 0, 4095).astype(np.uint16)
        tags = {"bits": 12, "signed": False, "intercept": "-1024.000000",
                "center": "35.000000", "width": "100.000000"}
        return stored, stored.astype(np.float32) - 1024, tags
    # The RSNA bug: HU wrapped into 12 bits with a bogus intercept of 0 or 1; the known fix
    # ((px + 1000) mod 4096, intercept -1000) recovers HU in [-1000, 3095].
    hu = np.clip(hu, -1000, 3095)
    stored = np.mod(hu.astype(np.int32), 4096).astype(np.uint16)
    tags = {"bits": 12, "signed": False, "intercept": str(k % 2),
            "center": ["00040", "00040"], "width": ["00080", "00080"]}
    return stored, hu, tags


def _dataset(image_id: str, stored: np.ndarray, tags: dict, series: dict, orientation, ipp,
             spacing: float, modality: str = "CT") -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(image_id, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = image_id
    ds.Modality = modality
    ds.PatientID = series["patient_id"]
    # Identifiers a hospital export holds; nothing `ich` writes may carry them (issue 10).
    ds.PatientName = PATIENT_NAME
    ds.PatientBirthDate = "19450317"
    ds.InstitutionName = INSTITUTION
    ds.AccessionNumber = ACCESSION
    ds.StudyInstanceUID = series["study_id"]
    ds.SeriesInstanceUID = series["series_id"]
    ds.StudyID = ""
    ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.PixelSpacing = [f"{spacing:.6f}", f"{spacing:.6f}"]
    ds.BitsAllocated = 16
    ds.BitsStored = tags["bits"]
    ds.HighBit = tags["bits"] - 1
    ds.PixelRepresentation = int(tags["signed"])
    ds.WindowCenter = tags["center"]
    ds.WindowWidth = tags["width"]
    ds.RescaleIntercept = tags["intercept"]
    ds.RescaleSlope = "1"
    ds.PixelData = stored.astype("<i2" if tags["signed"] else "<u2").tobytes()
    return ds


def _write_bad_files(truth: dict, dicom_dir: Path, rng, used: set[str], patient_prefix: str) -> None:
    hu = _phantom(16, 16, False, rng)
    series = {"patient_id": patient_prefix + _hex_id(rng, 8, used), "study_id": _hex_id(rng, 10, used),
              "series_id": _hex_id(rng, 10, used)}
    orientation, ipp = [1, 0, 0, 0, 1, 0], (0.0, 0.0, 0.0)
    for kind in BAD_KINDS:
        image_id = _hex_id(rng, 9, used)
        path = dicom_dir / f"{image_id}.dcm"
        stored, _, tags = _store(hu, "int16", 0)
        ds = _dataset(image_id, stored, tags, series, orientation, ipp, 0.5,
                      modality="MR" if kind == "mr" else "CT")
        if kind == "no_pixels":
            del ds.PixelData
        if kind == "not_dicom":
            path.write_bytes(b"This is a text file with a .dcm name, not a DICOM file.\n" * 8)
        else:
            _save(ds, path)
        if kind == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[:len(data) - stored.nbytes // 2])
        truth["bad"][image_id] = kind
        truth["labels"][image_id] = _labels(False)


def _save(ds: FileDataset, path: Path) -> None:
    ds.save_as(path, enforce_file_format=True)


@contextmanager
def _quiet_rsna_uids():
    """pydicom warns and logs about the `ID_...` UIDs on every assignment: hush both here."""
    logger = logging.getLogger("pydicom")
    was_disabled, logger.disabled = logger.disabled, True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Invalid value for VR UI: 'ID_")
            yield
    finally:
        logger.disabled = was_disabled


def _labels(bleed: bool) -> dict:
    return {label: int(bleed and label in ("subdural", "any")) for label in RSNA_ORDER}


def _write_csv(truth: dict) -> None:
    lines = ["ID,Label"]
    for image_id in list(truth["labels"]) + truth["duplicated"]:
        lines += [f"{image_id}_{label},{truth['labels'][image_id][label]}" for label in RSNA_ORDER]
    truth["csv"].write_text("\n".join(lines) + "\n")


def _hex_id(rng, digits: int, used: set[str]) -> str:
    while True:
        value = "ID_" + "".join(rng.choice(list("0123456789abcdef"), digits))
        if value not in used:
            used.add(value)
            return value


def read_back(path: Path) -> pydicom.Dataset:
    """dcmread without the RSNA UID warnings (for tests that inspect tags)."""
    with _quiet_rsna_uids():
        return pydicom.dcmread(path)


def write_config(root: Path, truth: dict, **sections: dict) -> Path:
    """An ich config YAML under `root` pointing at the folder `truth` describes, 32 px PNGs.

    `sections` override or add config sections (e.g. train={...}).
    """
    import yaml

    cfg = {"paths": {"labels_csv": str(truth["csv"]), "dicom_dir": str(truth["dicom_dir"]),
                     "work_dir": str(root / "work"), "run_dir": str(root / "run")},
           "sample": {"per_label": 1000, "exclude_ids": []},
           "preprocess": {"image_size": 32, "workers": 2}}
    cfg.update(sections)
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
