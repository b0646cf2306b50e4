"""Whole-study `ich predict`: folders of studies in any names and order, with scouts and
reformats mixed in, and a run with a sequence stage (tests/tiny_cascade.py's, hand-checkable)."""

import shutil
import warnings

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import generate_uid

from ich import config
from ich.constants import LABELS, PREDICTIONS_CSV, SKIPPED_CSV, STUDIES_CSV
from ich.data.dicom import read_hu
from ich.data.windowing import hu_to_rgb
from ich.steps.predict import predict_paths
from ich.synth import generate
from tiny_cascade import expected_probs, expected_series, save_tiny_cascade

SIZE = 16
WINDOWS = [(80, 200), (40, 80), (600, 2800)]


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Two patients' axial series (6 slices each), plus per study a scout and a sagittal
    reformat, shuffled under meaningless names. Returns (folder, {name: role}, axial paths by study)."""
    root = tmp_path_factory.mktemp("studies")
    generate(root / "synth", patients=2, slices=6, seed=3, workers=1, size=64)
    axial = sorted((root / "synth" / "stage_2_train").glob("*.dcm"))
    by_study = {}
    warnings.filterwarnings("ignore", message="Invalid value for VR UI")  # RSNA's ID_ style UIDs
    for path in axial:
        by_study.setdefault(str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID), []).append(path)
    assert len(by_study) >= 2     # a phantom patient may have more than one study, like RSNA's
    by_study = dict(sorted(by_study.items())[:2])
    folder = root / "incoming"
    folder.mkdir()
    rng = np.random.default_rng(0)
    roles = {}
    names = iter(f"IM{n:05d}" for n in rng.permutation(1000))
    for study, paths in by_study.items():
        for path in paths:
            name = next(names)
            shutil.copy(path, folder / name)
            roles[name] = ("axial", study, path)
        for role in ("scout", "sagittal"):
            ds = pydicom.dcmread(paths[0])
            ds.SOPInstanceUID = generate_uid()
            ds.SeriesInstanceUID = generate_uid()
            if role == "scout":
                ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
            else:
                ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
            name = next(names)
            ds.save_as(folder / name)
            roles[name] = (role, study, None)
    return folder, roles, by_study


def _cfg():
    return config.load(None, ["predict.workers=1", "predict.batch_size=4"])


def _expected(paths):
    return expected_probs(np.stack([hu_to_rgb(read_hu(p)[0], WINDOWS, SIZE) for p in paths]))


def test_whole_studies_with_scouts_and_reformats(studies, tmp_path):
    folder, roles, by_study = studies
    run = save_tiny_cascade(tmp_path / "run", image_size=SIZE, sequence=True)
    out = tmp_path / "out"
    predict_paths([folder], run, out, _cfg())

    skipped = pd.read_csv(out / SKIPPED_CSV)
    assert sorted(skipped["path"]) == sorted(n for n, r in roles.items() if r[0] != "axial")
    reasons = dict(zip(skipped["path"], skipped["reason"]))
    assert all("localizer" in reasons[n] for n, r in roles.items() if r[0] == "scout")
    assert all("sagittal" in reasons[n] for n, r in roles.items() if r[0] == "sagittal")

    pred = pd.read_csv(out / PREDICTIONS_CSV)
    axial = {n: r for n, r in roles.items() if r[0] == "axial"}
    assert sorted(pred["path"]) == sorted(axial)      # every axial slice, once
    by_name = pred.set_index("path")
    # The untrained sequence stage keeps each slice's cascade probabilities.
    names = sorted(axial)
    np.testing.assert_allclose(by_name.loc[names, list(LABELS)].to_numpy(),
                               _expected([axial[n][2] for n in names]), atol=1e-4)

    table = pd.read_csv(out / STUDIES_CSV)
    assert sorted(table["study_id"]) == sorted(by_study)      # one row per study
    for _, row in table.iterrows():
        paths = by_study[row["study_id"]]
        assert row["n_slices"] == len(paths)
        # The study's probability is the sequence stage's (attention over its slices), not the max.
        np.testing.assert_allclose(row[list(LABELS)].to_numpy(float),
                                   expected_series(_expected(paths)), atol=1e-4)
        assert not np.allclose(row[list(LABELS)].to_numpy(float), _expected(paths).max(axis=0), atol=1e-3)


def test_a_series_is_redone_whole_when_one_of_its_files_is_retried(studies, tmp_path):
    """Rerun with predict.retry_failed into the same folder after a file of a series failed:
    the series is predicted again whole (its context), and each slice appears once."""
    folder, roles, by_study = studies
    run = save_tiny_cascade(tmp_path / "run", image_size=SIZE, sequence=True)
    work = tmp_path / "in"
    shutil.copytree(folder, work)
    victim = next(n for n, r in sorted(roles.items()) if r[0] == "axial")
    original = (work / victim).read_bytes()
    (work / victim).write_bytes(original[:2000])           # the header survives, the pixels do not
    out = tmp_path / "out"
    predict_paths([work], run, out, _cfg())
    first = pd.read_csv(out / PREDICTIONS_CSV)
    assert victim not in set(first["path"])
    (work / victim).write_bytes(original)
    predict_paths([work], run, out, config.load(None, ["predict.workers=1", "predict.batch_size=4",
                                                       "predict.retry_failed=true"]))
    again = pd.read_csv(out / PREDICTIONS_CSV)
    assert sorted(again["path"]) == sorted(n for n, r in roles.items() if r[0] == "axial")
    table = pd.read_csv(out / STUDIES_CSV)
    study = roles[victim][1]
    row = table.set_index("study_id").loc[study]
    assert row["n_slices"] == len(by_study[study])
    np.testing.assert_allclose(row[list(LABELS)].to_numpy(float),
                               expected_series(_expected(by_study[study])), atol=1e-4)
