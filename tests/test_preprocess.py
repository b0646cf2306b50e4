"""Step preprocess on the independent RSNA-format data: PNGs, manifests, failures, resume."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from alt_rsna import write_alt_rsna
from ich import config
from ich.cli import StepError
from ich.steps import preprocess

WINDOWS = {"blood": (80, 200), "brain": (40, 80), "bone": (600, 2800)}
REASONS = {"truncated": "truncated", "not_dicom": "not a DICOM file", "mr": "modality MR",
           "no_pixels": "no PixelData"}


def make_work(root: Path, truth: dict) -> Path:
    work = root / "work"
    (work / "dicom").mkdir(parents=True)
    for path in truth["dicom_dir"].glob("*.dcm"):
        shutil.copy(path, work / "dicom" / path.name)
    return work


def make_cfg(work: Path, **preprocess_keys) -> dict:
    overrides = [f"paths.work_dir={work}"] + [f"preprocess.{k}={v}" for k, v in preprocess_keys.items()]
    return config.load(None, overrides)


def reference_rgb(hu: np.ndarray, size: int) -> np.ndarray:
    """Independent implementation: pad with air, window in float, block-mean, round."""
    side = max(hu.shape)
    square = np.full((side, side), -1000.0)
    top, left = (side - hu.shape[0]) // 2, (side - hu.shape[1]) // 2
    square[top:top + hu.shape[0], left:left + hu.shape[1]] = hu
    k = side // size
    channels = []
    for name in ("blood", "brain", "bone"):
        center, width = WINDOWS[name]
        w = np.clip((square - center + width / 2) / width, 0, 1)
        channels.append(w.reshape(size, k, size, k).mean(axis=(1, 3)))
    return np.round(np.stack(channels, -1) * 255)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    truth = write_alt_rsna(root / "src", n_patients=4, slices=4, size=64, seed=1)
    work = make_work(root, truth)
    cfg = make_cfg(work, image_size=32, workers=2, chunk_size=3)
    return truth, work, cfg, preprocess.run(cfg)


def test_pngs_match_independent_implementation(done):
    truth, work, _, images_csv = done
    table = pd.read_csv(images_csv)
    for row in table.itertuples():
        png = np.asarray(Image.open(work / row.path))
        assert png.shape == (32, 32, 3) and png.dtype == np.uint8
        diff = np.abs(png.astype(float) - reference_rgb(truth["hu"][row.image_id], 32))
        assert diff.max() <= 2, row.image_id


def test_images_csv_rows_and_metadata(done):
    truth, work, _, images_csv = done
    table = pd.read_csv(images_csv, dtype={"image_id": str})
    assert list(table.columns) == list(preprocess.IMAGE_COLUMNS)
    assert table["image_id"].tolist() == sorted(truth["hu"])          # one row each, sorted
    for row in table.itertuples():
        expected = truth["meta"][row.image_id]
        assert row.patient_id == expected["patient_id"] and row.series_id == expected["series_id"]
        assert (row.rows, row.columns) == (expected["rows"], expected["columns"])
        assert row.position == pytest.approx(expected["position"], abs=1e-4)
        assert row.pixel_spacing == pytest.approx(expected["pixel_spacing"])
        assert row.path == f"png/{row.image_id}.png"
    storage = dict(zip(table["image_id"], table["storage"]))
    assert storage[truth["compressed"][0]].endswith("JPEG2000Lossless")
    assert any(s.startswith("uint12;intercept-fix") for s in storage.values())


def test_failures_csv_has_each_bad_file_with_reason(done):
    truth, work, _, _ = done
    failures = pd.read_csv(work / "failures.csv")
    assert list(failures.columns) == ["image_id", "path", "reason"]
    assert sorted(failures["image_id"]) == sorted(truth["bad"])
    for row in failures.itertuples():
        assert REASONS[truth["bad"][row.image_id]] in row.reason
        assert row.path == f"dicom/{row.image_id}.dcm"


def test_second_run_skips(done, caplog):
    _, work, cfg, _ = done
    before = {p: p.stat().st_mtime_ns for p in (work / "png").glob("*.png")}
    with caplog.at_level("INFO", logger="ich"):
        preprocess.run(cfg)
    assert "up to date" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in (work / "png").glob("*.png")} == before


def test_new_settings_redo_everything(tmp_path):
    truth = write_alt_rsna(tmp_path / "src", n_patients=2, slices=2, size=32, seed=2)
    work = make_work(tmp_path, truth)
    preprocess.run(make_cfg(work, image_size=16, workers=1))
    preprocess.run(make_cfg(work, image_size=8, workers=1))
    table = pd.read_csv(work / "images.csv")
    assert len(table) == len(truth["hu"])
    assert all(Image.open(work / p).size == (8, 8) for p in table["path"])


def test_no_dicom_folder_says_run_copy(tmp_path):
    with pytest.raises(StepError, match="ich copy"):
        preprocess.run(make_cfg(tmp_path / "work"))


@pytest.mark.timeout(180)
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo (POSIX)")
def test_sigkill_then_resume(tmp_path):
    """Kill `ich preprocess` with SIGKILL mid-run, run it again, check nothing is lost or redone.

    One input is a named pipe: reading it blocks until the test writes to it, so the run can
    never finish before the kill, and the other chunks finishing meanwhile shows that one
    stuck file does not hold up the rest.
    """
    truth = write_alt_rsna(tmp_path / "src", n_patients=10, slices=10, size=64, seed=3)
    work = make_work(tmp_path, truth)
    stuck = work / "dicom" / "ID_fffffffff.dcm"        # sorts last: the other chunks go first
    real_bytes = (truth["dicom_dir"] / f"{sorted(truth['hu'])[0]}.dcm").read_bytes()
    os.mkfifo(stuck)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({"paths": {"work_dir": str(work)},
                                        "preprocess": {"image_size": 32, "workers": 2,
                                                       "chunk_size": 4}}))
    cmd = [sys.executable, "-m", "ich.cli", "preprocess", "--config", str(cfg_path)]
    n_inputs = len(truth["hu"]) + len(truth["bad"]) + 1
    proc = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(preprocess.journal_ids(work)) < 8:
            assert proc.poll() is None, f"preprocess ended early: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no chunk finished within 120 s"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)             # the parent and its workers
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finished = preprocess.journal_ids(work)
    assert 8 <= len(finished) < n_inputs
    assert not (work / "images.csv").exists()
    kept = {p: p.stat().st_mtime_ns for p in (work / "png").glob("*.png") if p.stem in finished}

    stuck.unlink()
    stuck.write_bytes(real_bytes)                       # the stuck file is now readable
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(finished)} already done" in rerun.stderr

    table = pd.read_csv(work / "images.csv", dtype={"image_id": str})
    failures = pd.read_csv(work / "failures.csv")
    assert table["image_id"].is_unique and table["image_id"].is_monotonic_increasing
    assert set(table["image_id"]) == set(truth["hu"]) | {stuck.stem}
    assert sorted(failures["image_id"]) == sorted(truth["bad"])
    pngs = sorted((work / "png").iterdir())
    assert [p.name for p in pngs] == [f"{i}.png" for i in table["image_id"]]   # no temp files
    for png in pngs:
        assert np.asarray(Image.open(png)).shape == (32, 32, 3)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept          # finished work not redone
