"""ich synth: the phantom set must look exactly like the RSNA files and labels.

A small set (3 patients x 8 slices x 128 px) is generated once per module; HU are checked with
a decoder written here, independent of the project's own DICOM reader.
"""

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from ich.cli import StepError
from ich.constants import LABELS, RSNA_ORDER, SUBTYPES
from ich.synth import generate, plan_dataset, simulate_patient
from ich.synth.anatomy import sample_head
from ich.synth.lesions import MIN_AREA_MM2
from ich.synth.storage import VARIANTS, SliceTags, Storage, build_dataset, encode, write
from ich.synth.study import sample_geometry

PATIENTS, SLICES, SIZE, SEED = 3, 8, 128, 3
# The RSNA files' elements, in their order (see shared/RSNA.md and the real samples).
RSNA_TAGS = ["SOPInstanceUID", "Modality", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
             "StudyID", "ImagePositionPatient", "ImageOrientationPatient", "SamplesPerPixel",
             "PhotometricInterpretation", "Rows", "Columns", "PixelSpacing", "BitsAllocated",
             "BitsStored", "HighBit", "PixelRepresentation", "WindowCenter", "WindowWidth",
             "RescaleIntercept", "RescaleSlope", "PixelData"]
RSNA_META = ["FileMetaInformationGroupLength", "FileMetaInformationVersion",
             "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID",
             "ImplementationClassUID", "ImplementationVersionName"]


def read(path) -> pydicom.Dataset:
    """dcmread, quiet only about the RSNA-style 'ID_...' UIDs (invalid by design)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Invalid value for VR UI: 'ID_[0-9a-f]+'")
        ds = pydicom.dcmread(path)
        for _ in ds:  # elements are decoded lazily: decode them here, inside the filter
            pass
        return ds


def decode(ds) -> np.ndarray:
    """Stored pixels -> HU: slope/intercept in float, with the known RSNA 12-bit fix."""
    px = ds.pixel_array.astype(np.float64)
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    if ds.BitsStored == 12 and ds.PixelRepresentation == 0 and intercept > -100:
        px = px + 1000
        px[px >= 4096] -= 4096
        intercept = -1000.0
    return px * slope + intercept


def assert_hu_matches(decoded: np.ndarray, truth: np.ndarray, padded: bool) -> None:
    """Within 1 HU wherever the truth is tissue or air >= -1000; air below that stays air;
    outside the circular field of view of padded files the raw -2000 reads -3024."""
    rows, cols = truth.shape
    i = np.arange(rows)[:, None] - (rows - 1) / 2
    j = np.arange(cols)[None, :] - (cols - 1) / 2
    fov = i ** 2 + j ** 2 <= (min(rows, cols) / 2) ** 2 if padded else np.ones(truth.shape, bool)
    tissue = fov & (truth >= -1000)
    assert np.abs(decoded[tissue] - truth[tissue]).max() <= 1
    assert (decoded[fov & (truth < -1000)] <= -999).all()
    if padded:
        assert (decoded[~fov] == -3024).all()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # writing must not warn, not even about the ID_ UIDs
        generate(out, patients=PATIENTS, slices=SLICES, seed=SEED, workers=1, size=SIZE)
    return out


@pytest.fixture(scope="module")
def truth(dataset) -> pd.DataFrame:
    return pd.read_csv(dataset / "truth.csv")


@pytest.fixture(scope="module")
def scans():
    """The same patients rendered again in memory: {image_id: (hu, mask, labels)}."""
    out = {}
    for plan in plan_dataset(SEED, PATIENTS, SLICES):
        for study, scan in simulate_patient(plan, SLICES, SIZE):
            for k, image_id in enumerate(study.image_ids):
                out[image_id] = (scan.hu[k], scan.masks[k], scan.labels[k], scan.geometry.spacing)
    return out


def csv_blocks(path: Path) -> list[tuple[str, list[int]]]:
    lines = path.read_text().splitlines()
    assert lines[0] == "ID,Label"
    rows = [line.split(",") for line in lines[1:]]
    assert len(rows) % 6 == 0
    blocks = []
    for b in range(0, len(rows), 6):
        block = rows[b:b + 6]
        image_id = block[0][0].rsplit("_", 1)[0]
        assert re.fullmatch(r"ID_[0-9a-f]{9}", image_id)
        assert [r[0] for r in block] == [f"{image_id}_{s}" for s in RSNA_ORDER]
        assert all(r[1] in ("0", "1") for r in block)
        blocks.append((image_id, [int(r[1]) for r in block]))
    return blocks


def test_csv_format_order_duplicates_and_files(dataset, truth):
    blocks = csv_blocks(dataset / "stage_2_train.csv")
    ids = [image_id for image_id, _ in blocks]
    assert len(ids) > len(set(ids)), "a few image blocks must be listed twice"
    first = {}
    for image_id, labels in blocks:
        assert first.setdefault(image_id, labels) == labels, f"{image_id} listed with other labels"
    files = {p.stem for p in (dataset / "stage_2_train").glob("*.dcm")}
    assert set(ids) == files == set(truth.image_id)
    assert len(files) == len(truth) == PATIENTS * SLICES + SLICES * (truth.study_id.nunique() - PATIENTS)
    for image_id, labels in first.items():
        by_name = dict(zip(RSNA_ORDER, labels))
        assert by_name["any"] == max(by_name[s] for s in SUBTYPES)
        row = truth.set_index("image_id").loc[image_id]
        assert [int(row[label]) for label in LABELS] == [by_name[label] for label in LABELS]


def test_tags_exactly_as_rsna(dataset, truth):
    for path in sorted((dataset / "stage_2_train").glob("*.dcm")):
        ds = read(path)
        assert [e.keyword for e in ds] == RSNA_TAGS
        assert [e.keyword for e in ds.file_meta] == RSNA_META
        for absent in ("InstanceNumber", "SliceLocation", "SliceThickness", "SOPClassUID"):
            assert absent not in ds
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert path.read_bytes()[128:132] == b"DICM"
        assert ds.SOPInstanceUID == path.stem
        assert re.fullmatch(r"ID_[0-9a-f]{8}", ds.PatientID)
        assert re.fullmatch(r"ID_[0-9a-f]{10}", ds.StudyInstanceUID)
        assert re.fullmatch(r"ID_[0-9a-f]{10}", ds.SeriesInstanceUID)
        assert ds.Modality == "CT" and ds.StudyID == "" and ds.SamplesPerPixel == 1
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 16
        assert ds.HighBit == ds.BitsStored - 1 and float(ds.RescaleSlope) == 1.0
        assert ds.BitsStored in (12, 16) and ds.PixelRepresentation == (ds.BitsStored == 16)
        assert len(ds.PixelData) == ds.Rows * ds.Columns * 2
        row = truth.set_index("image_id").loc[path.stem]
        assert (ds.PatientID, ds.StudyInstanceUID) == (row.patient_id, row.study_id)
        orientation = np.array(ds.ImageOrientationPatient, float)
        normal = np.cross(orientation[:3], orientation[3:])
        assert abs(np.dot(np.array(ds.ImagePositionPatient, float), normal) - row.position) < 1e-3


def test_tag_set_matches_real_rsna_files(dataset, real_dicom_dir):
    real = read(sorted((real_dicom_dir / "rsna_samples").glob("*.dcm"))[0])
    ours = read(next((dataset / "stage_2_train").glob("*.dcm")))
    assert [(e.keyword, e.VR) for e in ours] == [(e.keyword, e.VR) for e in real]
    assert [e.keyword for e in ours.file_meta] == [e.keyword for e in real.file_meta]


def test_slices_5mm_apart_along_normal_and_patients_with_two_studies(truth):
    for _, study in truth.groupby("study_id"):
        steps = np.diff(study.sort_values("slice").position.to_numpy())
        np.testing.assert_allclose(steps, 5.0, atol=1e-3)
    studies_per_patient = truth.groupby("patient_id").study_id.nunique()
    assert studies_per_patient.max() == 2 and studies_per_patient.min() == 1


def test_files_decode_to_rendered_hu(dataset, truth, scans):
    """Every file, whatever its storage variant, reads back as the rendered HU volume."""
    for row in truth.itertuples():
        ds = read(dataset / "stage_2_train" / f"{row.image_id}.dcm")
        hu = scans[row.image_id][0]
        assert hu.shape == (ds.Rows, ds.Columns) == (row.rows, row.columns)
        assert_hu_matches(decode(ds), hu.astype(np.float64), padded=row.storage.startswith("int16_pad"))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("decimal,multi", [(False, False), (True, False), (False, True)])
def test_each_storage_variant_round_trips(tmp_path, variant, decimal, multi):
    rng = np.random.default_rng(0)
    hu = np.concatenate([np.linspace(-1024, 3071, 48 * 40), rng.uniform(-30, 100, 48 * 24)])
    hu = np.rint(hu).astype(np.int16).reshape(48, 64)  # non-square on purpose
    intercept = 1 if variant == "uint12_bug" else VARIANTS[variant][2]
    storage = Storage(variant, intercept, decimal, multi, (40, 80))
    tags = SliceTags("ID_012345678", "ID_89abcdef", "ID_0123456789", "ID_abcdef0123",
                     "9999.1234", (-125.0, -121.314621, 104.615639),
                     (1.0, 0.0, 0.0, 0.0, 0.953717, -0.300706), 0.48828125)
    path = tmp_path / "ID_012345678.dcm"
    write(build_dataset(encode(hu, storage), storage, tags), path)
    ds = read(path)
    assert (ds.BitsStored, ds.PixelRepresentation) == (VARIANTS[variant][0], int(VARIANTS[variant][1]))
    assert_hu_matches(decode(ds), hu.astype(np.float64), padded=variant == "int16_pad")
    if variant == "uint12_bug":
        assert float(ds.RescaleIntercept) in (0.0, 1.0)
        naive = ds.pixel_array.astype(np.float64) + float(ds.RescaleIntercept)
        assert naive[0, 0] > 3000, "air must read wrong without the fix, as in the real bug"
    raw = {e.keyword: e for e in ds}
    if decimal:
        assert str(raw["RescaleIntercept"].value) == f"{intercept:.6f}"
        assert str(raw["WindowCenter"].value) == "40.000000"
    if multi:
        assert [str(v) for v in ds.WindowCenter] == ["00040", "00040"]
        assert [str(v) for v in ds.WindowWidth] == ["00080", "00080"]
    else:
        assert not isinstance(ds.WindowCenter, pydicom.multival.MultiValue)


def test_labels_match_the_visible_blood(dataset, truth, scans):
    positives = 0
    for row in truth.itertuples():
        ds = read(dataset / "stage_2_train" / f"{row.image_id}.dcm")
        hu = decode(ds)
        _, mask, labels, spacing = scans[row.image_id]
        assert row.any == max(getattr(row, s) for s in SUBTYPES)
        for i, subtype in enumerate(SUBTYPES):
            assert getattr(row, subtype) == labels[i]
            blood = mask == (1 << i)
            if labels[i]:
                positives += 1
                assert blood.sum() * spacing ** 2 >= MIN_AREA_MM2
                assert 45 <= np.median(hu[blood]) <= 95, f"{row.image_id} {subtype} not blood-dense"
            else:
                assert blood.sum() * spacing ** 2 < MIN_AREA_MM2
        if not row.any:
            assert not mask.any(), "no blood may be drawn on a negative slice"
    assert positives > 0


def test_deterministic_for_a_seed_and_worker_count(dataset, tmp_path):
    again = tmp_path / "again"
    generate(again, patients=PATIENTS, slices=SLICES, seed=SEED, workers=2, size=SIZE)
    assert (again / "stage_2_train.csv").read_bytes() == (dataset / "stage_2_train.csv").read_bytes()
    for path in (dataset / "stage_2_train").glob("*.dcm"):
        assert (again / "stage_2_train" / path.name).read_bytes() == path.read_bytes()
    other = tmp_path / "other"
    generate(other, patients=PATIENTS, slices=SLICES, seed=SEED + 1, workers=1, size=SIZE)
    assert not {p.name for p in (other / "stage_2_train").iterdir()} & {
        p.name for p in (dataset / "stage_2_train").iterdir()}


def test_geometry_keeps_the_head_inside_the_field_of_view():
    rng = np.random.default_rng(5)
    for _ in range(200):
        head = sample_head(rng)
        g = sample_geometry(rng, head, 512, 24, nonsquare=bool(rng.random() < 0.5))
        assert g.rows % 2 == 0 and g.cols % 2 == 0 and max(g.rows, g.cols) == 512
        fov_radius = min(g.rows, g.cols) / 2 * g.spacing
        assert head.max_radius + max(abs(g.ox), abs(g.oy)) < fov_radius
        assert 0.4 <= g.spacing <= 0.98  # the real range is 0.29-0.98 mm


def test_plan_has_every_subtype_and_epidural_rarest():
    plans = plan_dataset(0, 60, 24)
    patients_with = {s: sum(s in p.kinds for p in plans) for s in SUBTYPES}
    assert min(patients_with.values()) >= 5
    assert patients_with["epidural"] == min(patients_with.values())
    variants = {s.storage.variant for p in plans for s in p.studies}
    assert variants == set(VARIANTS)
    ids = [i for p in plans for s in p.studies for i in s.image_ids]
    assert len(ids) == len(set(ids))


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(StepError, match="--patients"):
        generate(tmp_path, patients=0, slices=4, seed=0)
    with pytest.raises(StepError, match="size"):
        generate(tmp_path, patients=1, slices=4, seed=0, size=63)
