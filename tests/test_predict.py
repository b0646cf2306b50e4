"""ich.steps.predict on real DICOMs mixed with bad files, on PNGs, and through the CLI."""

import cv2
import numpy as np
import pandas as pd
import pytest

from ich import config
from ich.cli import StepError, main
from ich.constants import (FAILURES_CSV, LABELS, PREDICTIONS_CSV, RSNA_ORDER, STUDIES_CSV,
                           SUBMISSION_CSV)
from ich.data.dicom import read_hu
from ich.data.sources import display_names
from ich.steps.predict import find_inputs, predict_paths
from ich.data.windowing import hu_to_rgb
from tiny_cascade import expected_probs, red_images, save_tiny_cascade

SIZE = 16
WINDOWS = [(80, 200), (40, 80), (600, 2800)]  # blood, brain, bone as tiny_cascade records them


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    thresholds = {label: 0.3 for label in LABELS}
    return save_tiny_cascade(tmp_path_factory.mktemp("run"), image_size=SIZE, thresholds=thresholds)


def _cfg(workers=1, batch_size=4):
    return config.load(None, [f"predict.workers={workers}", f"predict.batch_size={batch_size}"])


def test_real_dicoms_with_bad_files(real_dicom_dir, run_dir, tmp_path):
    rsna = real_dicom_dir / "rsna_samples"
    real = sorted(rsna.glob("*.dcm"))
    truncated = tmp_path / "bad" / "ID_truncated.dcm"
    truncated.parent.mkdir()
    truncated.write_bytes(real[0].read_bytes()[:60_000])
    text = tmp_path / "bad" / "notes.txt"
    text.write_text("not an image\n")
    out = tmp_path / "out"

    result = predict_paths([rsna, truncated, text, tmp_path / "missing.dcm"], run_dir, out,
                           _cfg(workers=1, batch_size=2))
    assert result == out / PREDICTIONS_CSV

    pred = pd.read_csv(out / PREDICTIONS_CSV)
    assert list(pred.columns) == ["image_id", "path", *LABELS, *[f"{k}_pred" for k in LABELS]]
    assert sorted(pred["image_id"]) == sorted(p.stem for p in real)  # labels.csv in the folder is ignored
    # Same preprocessing as training: read_hu -> hu_to_rgb with cascade.json's windows and size.
    expected = expected_probs(np.stack([hu_to_rgb(read_hu(p)[0], WINDOWS, SIZE) for p in real]))
    order = [pred.index[pred["image_id"] == p.stem][0] for p in real]
    np.testing.assert_allclose(pred.loc[order, list(LABELS)].to_numpy(), expected, atol=1e-5)
    for label in LABELS:
        assert (pred[f"{label}_pred"] == (pred[label] >= 0.3)).all()

    # Every file in a folder is tried (labels.csv too), and each is named relative to the root
    # given, prefixed by the root's position since there are several; never an absolute path.
    failures = pd.read_csv(out / FAILURES_CSV)
    assert sorted(failures["path"]) == ["1/labels.csv", "2/ID_truncated.dcm", "3/notes.txt", "missing.dcm"]
    reasons = dict(zip(failures["path"], failures["reason"]))
    assert "not found" in reasons["missing.dcm"]
    assert "DICOM" in reasons["3/notes.txt"]
    assert sorted(pred["path"]) == sorted(f"1/{p.name}" for p in real)

    submission = pd.read_csv(out / SUBMISSION_CSV)
    assert list(submission.columns) == ["ID", "Label"]
    assert len(submission) == 6 * len(real)
    first = pred["image_id"].iloc[0]
    rows = submission.iloc[:6]
    assert list(rows["ID"]) == [f"{first}_{sub}" for sub in RSNA_ORDER]
    np.testing.assert_allclose(rows["Label"], pred.loc[0, list(RSNA_ORDER)].astype(float), atol=1e-6)

    studies = pd.read_csv(out / STUDIES_CSV)
    assert list(studies.columns) == ["study_id", "n_slices", *LABELS]   # no PatientID by default
    assert studies["n_slices"].sum() == len(real)
    assert studies["study_id"].str.startswith("ID_").all()


def test_series_in_worker_processes_matches_serial(real_dicom_dir, run_dir, tmp_path):
    series = real_dicom_dir / "ge_head_series"
    parallel = predict_paths([series], run_dir, tmp_path / "par", _cfg(workers=2, batch_size=8))
    serial = predict_paths([series], run_dir, tmp_path / "ser", _cfg(workers=1, batch_size=32))
    a, b = pd.read_csv(parallel), pd.read_csv(serial)
    assert len(a) == 28
    assert list(pd.read_csv(tmp_path / "par" / FAILURES_CSV)["path"]) == ["LICENSE"]  # tried, listed
    assert sorted(a["path"]) == [f"{i:02d}.dcm" for i in range(1, 29)]   # relative to the folder
    pd.testing.assert_frame_equal(a, b, atol=1e-6)
    studies = pd.read_csv(tmp_path / "par" / STUDIES_CSV)
    assert len(studies) == 1 and studies["n_slices"].iloc[0] == 28
    assert studies["any"].iloc[0] == pytest.approx(a["any"].max())


def test_png_inputs(run_dir, tmp_path):
    images = red_images([10, 240, 128], size=32)
    folder = tmp_path / "png"
    folder.mkdir()
    for i, image in enumerate(images):
        cv2.imwrite(str(folder / f"ID_{i:09x}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    gray = folder / "ID_gray.png"
    cv2.imwrite(str(gray), images[0][..., 0])
    out = tmp_path / "out"
    predict_paths([folder], run_dir, out, _cfg())
    pred = pd.read_csv(out / PREDICTIONS_CSV)
    assert list(pred["image_id"]) == [f"ID_{i:09x}" for i in range(3)]
    np.testing.assert_allclose(pred[list(LABELS)].to_numpy(), expected_probs(images), atol=1e-5)
    assert "channel" in pd.read_csv(out / FAILURES_CSV)["reason"].iloc[0]
    assert len(pd.read_csv(out / STUDIES_CSV)) == 0  # PNGs carry no study


def test_nothing_predictable_is_an_error(run_dir, tmp_path):
    bad = tmp_path / "a.dcm"
    bad.write_text("hello")
    with pytest.raises(StepError, match="nothing could be predicted"):
        predict_paths([bad], run_dir, tmp_path / "out", _cfg())
    assert len(pd.read_csv(tmp_path / "out" / FAILURES_CSV)) == 1


def test_cli_exit_codes(run_dir, tmp_path):
    png = tmp_path / "ID_000000001.png"
    cv2.imwrite(str(png), red_images([200], size=SIZE)[0])
    assert main(["predict", str(png), "--model", str(run_dir), "--out", str(tmp_path / "ok"),
                 "--set", "predict.workers=1"]) == 0
    assert main(["predict", str(tmp_path / "nope.dcm"), "--model", str(run_dir),
                 "--out", str(tmp_path / "bad")]) == 2


def test_find_inputs_tries_every_regular_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "README").write_text("text")
    (tmp_path / ".DS_Store").write_text("system file")
    marked = tmp_path / "sub" / "1.2.840.99"
    marked.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    (tmp_path / "x.dcm").write_bytes(b"")
    files, failures = find_inputs([tmp_path, tmp_path / "x.dcm"])
    # README is tried too (it fails with a reason); x.dcm is reached twice but kept once.
    assert files == [tmp_path / "README", marked, tmp_path / "x.dcm"]
    assert failures == []
    assert display_names([tmp_path], files) == {tmp_path / "README": "README",
                                                marked: "sub/1.2.840.99", tmp_path / "x.dcm": "x.dcm"}
    assert display_names([tmp_path / "sub", tmp_path / "x.dcm"], [marked, tmp_path / "x.dcm"]) == \
        {marked: "1/1.2.840.99", tmp_path / "x.dcm": "2/x.dcm"}
