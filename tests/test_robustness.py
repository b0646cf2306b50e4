"""Issue 10: real files and real machines. Decoder crashes and hangs, transient write errors,
two runs on one folder, predict killed mid-way, no patient identifiers in predict's outputs.

Faults are injected by file name through ICH_TEST_FAULTS (ich.faults), which reaches the
spawned worker processes where a monkeypatch cannot.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml

from alt_rsna import read_back, write_alt_rsna
from ich import config
from ich.cli import StepError, main
from ich.constants import FAILURES_CSV, IMAGES_CSV, PREDICTIONS_CSV
from ich.faults import ENV
from ich.locks import LOCK_NAME
from ich.steps import predict, preprocess
from tiny_cascade import save_tiny_cascade

TIMEOUT_S = 5   # roomy: a loaded machine must not turn a normal file into a timeout


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Twenty good slices (and alt_rsna's few bad files) in one folder."""
    truth = write_alt_rsna(tmp_path_factory.mktemp("src"), n_patients=5, slices=4, size=64, seed=7)
    good = sorted(truth["hu"])
    assert len(good) == 20
    return truth, good


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return save_tiny_cascade(tmp_path_factory.mktemp("run"), image_size=16)


def _work(tmp_path: Path, truth: dict) -> Path:
    work = tmp_path / "work"
    shutil.copytree(truth["dicom_dir"], work / "dicom", ignore=shutil.ignore_patterns("*.csv"))
    return work


def _cfg(work: Path, workers: int, **keys) -> dict:
    sets = [f"paths.work_dir={work}", "preprocess.image_size=16", f"preprocess.workers={workers}",
            f"preprocess.file_timeout_s={TIMEOUT_S}", f"predict.workers={workers}",
            "predict.batch_size=4", f"predict.file_timeout_s={TIMEOUT_S}"]
    return config.load(None, sets + [f"{k}={v}" for k, v in keys.items()])


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_survives_a_crash_and_a_hang(source, tmp_path, monkeypatch, workers):
    truth, good = source
    crash, hang = good[3], good[11]
    work = _work(tmp_path, truth)
    monkeypatch.setenv(ENV, f"decode:{crash}=crash,decode:{hang}=hang")
    preprocess.run(_cfg(work, workers))
    images = pd.read_csv(work / IMAGES_CSV)
    reasons = dict(pd.read_csv(work / FAILURES_CSV)[["image_id", "reason"]].to_numpy())
    assert set(images["image_id"]) == set(good) - {crash, hang}
    assert reasons[crash] == "decoder crashed with signal 11 (SIGSEGV)"
    assert reasons[hang] == f"decoder timed out after {TIMEOUT_S} s"
    assert set(reasons) == {crash, hang} | set(truth["bad"])

    # Without the faults a retry would succeed; a plain rerun must not retry.
    monkeypatch.delenv(ENV)
    preprocess.run(_cfg(work, workers))
    assert set(pd.read_csv(work / FAILURES_CSV)["image_id"]) >= {crash, hang}
    assert main(["preprocess", "--config", str(_config_file(tmp_path, work, workers)),
                 "--retry-failed"]) == 0
    assert set(pd.read_csv(work / IMAGES_CSV)["image_id"]) == set(good)
    assert set(pd.read_csv(work / FAILURES_CSV)["image_id"]) == set(truth["bad"])


def _config_file(tmp_path: Path, work: Path, workers: int, timeout_s: float = TIMEOUT_S) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"paths": {"work_dir": str(work)},
                                    "preprocess": {"image_size": 16, "workers": workers,
                                                   "file_timeout_s": timeout_s}}))
    return path


def test_transient_write_error_stops_and_records_nothing(source, tmp_path, monkeypatch):
    truth, good = source
    victim = good[5]
    work = _work(tmp_path, truth)
    monkeypatch.setenv(ENV, f"write:{victim}=enospc")
    with pytest.raises(StepError, match=f"disk full.*{victim}.*Nothing is recorded"):
        preprocess.run(_cfg(work, 2))
    assert victim not in preprocess.journal_ids(work)
    assert not (work / IMAGES_CSV).exists()
    monkeypatch.delenv(ENV)
    preprocess.run(_cfg(work, 2))
    assert set(pd.read_csv(work / IMAGES_CSV)["image_id"]) == set(good)
    assert victim not in set(pd.read_csv(work / FAILURES_CSV)["image_id"])


def _png_folder_is_the_manifest(work: Path) -> None:
    listed = {Path(p).name for p in pd.read_csv(work / IMAGES_CSV)["path"]}
    assert {p.name for p in (work / "png").iterdir()} == listed   # dot-files included


def test_png_folder_holds_exactly_what_images_csv_lists(source, tmp_path, monkeypatch):
    """A writer killed with its temporary PNG open leaves nothing behind, and an image that fails
    keeps no PNG of an earlier run."""
    truth, good = source
    killed, broken = good[4], good[9]
    work = _work(tmp_path, truth)
    monkeypatch.setenv(ENV, f"write:{killed}=crash")   # SIGSEGV with .<id>.png.<pid>.tmp.png open
    preprocess.run(_cfg(work, 1))
    reasons = dict(pd.read_csv(work / FAILURES_CSV)[["image_id", "reason"]].to_numpy())
    assert reasons[killed] == "decoder crashed with signal 11 (SIGSEGV)"
    _png_folder_is_the_manifest(work)
    assert (work / "png" / f"{broken}.png").is_file()
    # The DICOM of a converted image goes bad; everything is redone (--force): it fails now, and
    # its PNG of the first run must not stay.
    monkeypatch.delenv(ENV)
    source_file = work / "dicom" / f"{broken}.dcm"
    source_file.write_bytes(source_file.read_bytes()[:1000])
    preprocess.run(_cfg(work, 1), force=True)
    assert broken in set(pd.read_csv(work / FAILURES_CSV)["image_id"])
    _png_folder_is_the_manifest(work)


def test_killed_copy_temp_files_are_not_inputs(source, tmp_path):
    truth, good = source
    work = _work(tmp_path, truth)
    (work / "dicom" / f".{good[0]}.dcm.abc123.tmp.dcm").write_bytes(b"half a file")
    preprocess.run(_cfg(work, 1))
    ids = set(pd.read_csv(work / IMAGES_CSV)["image_id"]) | set(pd.read_csv(work / FAILURES_CSV)["image_id"])
    assert not any(i.startswith(".") for i in ids)


@pytest.mark.timeout(120)
def test_second_preprocess_on_one_work_dir_stops_at_once(source, tmp_path):
    truth, good = source
    work = _work(tmp_path, truth)
    # The sleeping files take 2 s each: a roomy time limit, so that a loaded machine cannot
    # turn them into timeouts.
    cfg_path = _config_file(tmp_path, work, 1, timeout_s=60)
    cmd = [sys.executable, "-m", "ich.cli", "preprocess", "--config", str(cfg_path)]
    # A few slow files keep the first run busy for several seconds.
    env = {**os.environ, ENV: ",".join(f"decode:{i}=sleep" for i in good[:3])}
    first = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lock = work / LOCK_NAME
        deadline = time.monotonic() + 60
        while not (lock.is_file() and lock.read_text().strip()):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        start = time.monotonic()
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert time.monotonic() - start < 20   # at once: no waiting for the first
        assert f"pid {first.pid}" in second.stderr and "in use by another ich" in second.stderr
        assert first.poll() is None            # the first was still running meanwhile
    finally:
        _, err = first.communicate(timeout=90)
    assert first.returncode == 0, err
    assert set(pd.read_csv(work / IMAGES_CSV)["image_id"]) == set(good)
    assert set(pd.read_csv(work / FAILURES_CSV)["image_id"]) == set(truth["bad"])


@pytest.mark.parametrize("workers", [1, 2])
def test_predict_survives_a_crash_and_a_hang(source, run_dir, tmp_path, monkeypatch, workers):
    truth, good = source
    crash, hang = good[2], good[17]
    folder = tmp_path / "in"
    shutil.copytree(truth["dicom_dir"], folder)
    out = tmp_path / "out"
    monkeypatch.setenv(ENV, f"decode:{crash}=crash,decode:{hang}=hang")
    predict.predict_paths([folder], run_dir, out, _cfg(tmp_path, workers))
    pred = pd.read_csv(out / PREDICTIONS_CSV)
    reasons = dict(pd.read_csv(out / FAILURES_CSV).to_numpy())
    assert set(pred["image_id"]) == set(good) - {crash, hang}
    assert reasons[f"{crash}.dcm"] == "decoder crashed with signal 11 (SIGSEGV)"
    assert reasons[f"{hang}.dcm"] == f"decoder timed out after {TIMEOUT_S} s"

    monkeypatch.delenv(ENV)
    predict.predict_paths([folder], run_dir, out, _cfg(tmp_path, workers))   # continues, no retry
    assert set(pd.read_csv(out / PREDICTIONS_CSV)["image_id"]) == set(good) - {crash, hang}
    predict.predict_paths([folder], run_dir, out, _cfg(tmp_path, workers, **{"predict.retry_failed": "true"}))
    pred = pd.read_csv(out / PREDICTIONS_CSV)
    assert sorted(pred["image_id"]) == sorted(good)          # each image once
    assert {f"{crash}.dcm", f"{hang}.dcm"}.isdisjoint(pd.read_csv(out / FAILURES_CSV)["path"])


@pytest.mark.timeout(180)
def test_predict_killed_mid_way_then_rerun_has_each_image_once(source, run_dir, tmp_path):
    truth, good = source
    folder = tmp_path / "in"
    shutil.copytree(truth["dicom_dir"], folder)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ich.cli", "predict", str(folder), "--model", str(run_dir),
           "--out", str(out), "--set", "predict.workers=1", "--set", "predict.batch_size=2"]
    env = {**os.environ, ENV: f"decode:{good[-1]}=hang"}       # the last slice never finishes
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)
    rows = out / predict.JOURNAL_DIR / "rows.csv"
    try:
        deadline = time.monotonic() + 120
        while not (rows.is_file() and len(rows.read_text().splitlines()) > 8):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / PREDICTIONS_CSV).exists()
    # The rerun, in this process (faster), with another batch size: batches need not line up.
    predict.predict_paths([folder], run_dir, out, _cfg(tmp_path, 1, **{"predict.batch_size": 3}))
    pred = pd.read_csv(out / PREDICTIONS_CSV)
    assert sorted(pred["image_id"]) == sorted(good)


def test_predict_outputs_carry_no_patient_identifiers(source, run_dir, tmp_path):
    truth, good = source
    folder = tmp_path / "Smith^John_1950"       # patient names in folder names are common
    folder.mkdir()
    secrets = {"PatientName": "Smith^John", "PatientBirthDate": "19500102",
               "InstitutionName": "St Elsewhere Hospital", "AccessionNumber": "ACC998877",
               "PatientID": "=HYPERLINK(\"http://x\")"}
    for i, image_id in enumerate(good[:6]):
        ds = read_back(truth["dicom_dir"] / f"{image_id}.dcm")
        for tag, value in secrets.items():
            setattr(ds, tag, value)
        if i == 0:   # a DICOM without preamble or .dcm name is still a DICOM
            ds.preamble = None
            pydicom.dcmwrite(folder / "IM0000", ds, enforce_file_format=False)
        else:
            ds.save_as(folder / f"{image_id}.dcm")
    out = tmp_path / "out"
    assert main(["predict", str(folder), "--model", str(run_dir), "--out", str(out),
                 "--set", "predict.workers=1"]) == 0
    pred = pd.read_csv(out / PREDICTIONS_CSV)
    assert len(pred) == 6 and "IM0000" in set(pred["path"])
    text = "".join(p.read_text() for p in out.rglob("*") if p.is_file())
    for value in [*secrets.values(), "Smith", "HYPERLINK", str(tmp_path)]:
        assert value not in text, f"{value!r} found in predict's outputs"

    keep = tmp_path / "keep"
    assert main(["predict", str(folder), "--model", str(run_dir), "--out", str(keep),
                 "--set", "predict.workers=1", "--keep-patient-id"]) == 0
    studies = (keep / "studies.csv").read_text()
    assert "'=HYPERLINK" in studies and "\n=" not in studies and ",=" not in studies   # escaped


def test_lock_names_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    from ich.locks import LockError, hold

    folder = tmp_path / "work"
    with hold(folder, "work directory"):
        with hold(folder):                     # re-entrant in one process
            pass
        # Another process cannot take it while we hold it, and is told who does.
        code = ("import sys; from ich.locks import hold\n"
                f"with hold({str(folder)!r}, 'work directory'): pass\n")
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert other.returncode != 0 and f"pid {os.getpid()}" in other.stderr
    # A holder killed with SIGKILL leaves its record behind; the next run takes the lock over.
    holder = subprocess.Popen([sys.executable, "-c", code.replace("pass", "import time; time.sleep(600)")])
    deadline = time.monotonic() + 60
    while not (folder / LOCK_NAME).read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with pytest.raises(LockError, match=f"pid {holder.pid} on host"):
        with hold(folder):
            pass
    holder.kill()
    holder.wait()
    assert str(holder.pid) in (folder / LOCK_NAME).read_text()   # the record outlives it
    with hold(folder):
        assert str(os.getpid()) in (folder / LOCK_NAME).read_text()
