"""`ich evaluate --dataset cq500 | rsna | table` end to end on folders built from `ich synth`
studies, with the hand-weighted blood detector as stage 1; series selection and CQ500 parsing."""

import json
import shutil

import numpy as np
import pandas as pd
import pydicom
import pytest
from sklearn.metrics import roc_auc_score

from ich import cli
from ich.constants import LABELS
from ich.data import datasets
from ich.synth import generate
from blood_detector import build_blood_detector
from tiny_cascade import build_tiny, write_cascade

SIZE = 64
# The synth UIDs are RSNA-like ('ID_...'), invalid by design; pydicom warns on every copy.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
READERS = ("R1", "R2", "R3")
FINDINGS = {"ICH": "any", "IPH": "intraparenchymal", "IVH": "intraventricular", "SDH": "subdural",
            "EDH": "epidural", "SAH": "subarachnoid"}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synth"), patients=10, slices=8, seed=3, workers=1, size=SIZE)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    _, stage2 = build_tiny(SIZE)
    return write_cascade(tmp_path_factory.mktemp("run") / "run", build_blood_detector(SIZE), stage2, SIZE)


def _evaluate(*args):
    return cli.main(["-q", "evaluate", *args, "--set", "evaluate.bootstrap=200",
                     "--set", "predict.workers=1", "--set", "evaluate.report_examples=2"])


def make_cq500(synth, root):
    """CQ500 layout from the synth studies: study folders with the axial series as 'CT 5mm',
    shuffled CT<6 digits> file numbers, a scout in every other study, a thin axial series of
    air (which must not be scored) in every third; reads.csv with R3 disagreeing at times."""
    truth = pd.read_csv(synth / "truth.csv")
    rng = np.random.default_rng(0)
    reads = []
    for n, (study_id, part) in enumerate(truth.groupby("study_id", sort=True)):
        folder = root / f"CQ500CT{n} CQ500CT{n}" / "Unknown Study"
        numbers = iter(rng.permutation(900000)[:100] + 100000)
        axial = folder / "CT 5mm"
        axial.mkdir(parents=True)
        for image_id in part["image_id"]:
            shutil.copy(synth / "stage_2_train" / f"{image_id}.dcm", axial / f"CT{next(numbers):06d}.dcm")
        first = pydicom.dcmread(synth / "stage_2_train" / f"{part['image_id'].iloc[0]}.dcm")
        if n % 2 == 0:
            scout = first.copy()
            scout.SeriesInstanceUID = f"{study_id}.9"
            scout.SeriesDescription = "SCOUT"
            scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
            scout.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
            (folder / "SCOUT").mkdir()
            scout.save_as(folder / "SCOUT" / f"CT{next(numbers):06d}.dcm", enforce_file_format=False)
        if n % 3 == 0:
            (folder / "CT PLAIN THIN").mkdir()
            for k, image_id in enumerate(part["image_id"]):
                thin = pydicom.dcmread(synth / "stage_2_train" / f"{image_id}.dcm")
                thin.SeriesInstanceUID = f"{study_id}.7"
                thin.SOPInstanceUID = f"{image_id}.7"
                thin.SeriesDescription = "CT PLAIN THIN"
                thin.SliceThickness = "0.625"
                pixels = thin.pixel_array
                thin.PixelData = np.full_like(pixels, pixels.min()).tobytes()  # air only
                thin.save_as(folder / "CT PLAIN THIN" / f"CT{next(numbers):06d}.dcm", enforce_file_format=False)
        row = {"name": f"CQ500-CT-{n}", "Category": "test"}
        study_truth = part[list(LABELS)].max()
        for reader in READERS:
            for finding, label in FINDINGS.items():
                value = int(study_truth[label])
                if reader == "R3" and rng.random() < 0.3:
                    value = 1 - value  # the third reader disagrees at times: majority unchanged
                row[f"{reader}:{finding}"] = value
            row[f"{reader}:Fracture"] = 0
        reads.append(row)
    (root / "CQ500CT0 CQ500CT0" / "Unknown Study" / "CT 5mm" / "CT000001.dcm").write_bytes(b"broken")
    pd.DataFrame(reads).to_csv(root / "reads.csv", index=False)
    return truth.groupby("study_id", sort=True)[list(LABELS)].max().reset_index(drop=True)


def test_cq500_end_to_end(synth, run_dir, tmp_path):
    majority = make_cq500(synth, tmp_path / "cq500")
    assert 0 < majority["any"].sum() < len(majority)
    out = tmp_path / "out"
    assert _evaluate("--dataset", "cq500", "--model", str(run_dir), "--data", str(tmp_path / "cq500"),
                     "--out", str(out)) == 0
    studies = pd.read_csv(out / "studies.csv")
    assert list(studies.columns) == ["study", *LABELS]
    assert sorted(studies["study"]) == sorted(f"CQ500-CT-{n}" for n in range(len(majority)))
    # Majority vote of reads.csv against the probabilities of studies.csv, by scikit-learn.
    reads = pd.read_csv(tmp_path / "cq500" / "reads.csv").set_index("name")
    votes = sum(reads[f"{r}:ICH"] for r in READERS) >= 2
    truth = votes.loc[studies["study"]].to_numpy().astype(int)
    metrics = json.loads((out / "metrics.json").read_text())
    any_ = metrics["studies"]["labels"]["any"]
    assert any_["roc_auc"] == pytest.approx(roc_auc_score(truth, studies["any"]))
    low, high = any_["roc_auc_ci"]
    assert low <= any_["roc_auc"] <= high
    assert "slices" not in metrics and metrics["studies"]["overall"]["n_studies"] == len(studies)
    # Scouts and the thin air series were seen and not scored; the broken file is a failure.
    series = pd.read_csv(out / "series.csv")
    assert series.loc[series["chosen"], "description"].eq("CT 5mm").all()
    assert set(series.loc[~series["chosen"], "description"]) == {"SCOUT", "CT PLAIN THIN"}
    failures = pd.read_csv(out / "failures.csv")
    assert failures["path"].str.endswith("CT000001.dcm").sum() == 1
    html = (out / "report.html").read_text()
    assert 'id="studies"' in html and "CQ500" in html
    assert not list(run_dir.glob("eval*")) and not (run_dir / "metrics.json").exists()


def test_rsna_folder_end_to_end(run_dir, tmp_path):
    data = generate(tmp_path / "rsna", patients=6, slices=6, seed=5, workers=1, size=SIZE)
    out = tmp_path / "out"
    assert _evaluate("--dataset", "rsna", "--model", str(run_dir), "--data", str(data), "--out", str(out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    truth = pd.read_csv(data / "truth.csv")
    pred = pd.read_csv(out / "predictions.csv").merge(truth, on="image_id", suffixes=("", "_true"))
    assert len(pred) == len(truth)
    assert metrics["slices"]["labels"]["any"]["roc_auc"] == pytest.approx(
        roc_auc_score(pred["any_true"], pred["any"]))
    studies = pd.read_csv(out / "studies.csv")
    study_truth = truth.groupby("study_id")["any"].max()
    assert metrics["studies"]["labels"]["any"]["support"] == int(study_truth.sum())
    assert len(studies) == truth["study_id"].nunique()
    assert metrics["slices"]["overall"]["bootstrap"]["groups"] == truth["patient_id"].nunique()


def test_table_end_to_end_with_missing_labels_and_paths(synth, run_dir, tmp_path):
    truth = pd.read_csv(synth / "truth.csv")
    rows = [{"path": str(synth / "stage_2_train" / f"{r.image_id}.dcm"), "any": r.any,
             "subdural": r.subdural if i % 4 else None} for i, r in enumerate(truth.itertuples())]
    # One study as a folder with a study-level label, and a path that does not exist.
    folder_study = truth["study_id"].iloc[0]
    (tmp_path / "one_study").mkdir()
    for image_id in truth.loc[truth["study_id"] == folder_study, "image_id"]:
        shutil.copy(synth / "stage_2_train" / f"{image_id}.dcm", tmp_path / "one_study")
    rows = [r for r in rows if not any(r["path"].endswith(f"{i}.dcm") for i in
                                       truth.loc[truth["study_id"] == folder_study, "image_id"])]
    rows.append({"path": "one_study", "any": int(truth.loc[truth["study_id"] == folder_study, "any"].max()),
                 "subdural": None})
    rows.append({"path": "missing.dcm", "any": 1, "subdural": 0})
    pd.DataFrame(rows).to_csv(tmp_path / "table.csv", index=False)
    out = tmp_path / "out"
    assert _evaluate("--dataset", "table", "--model", str(run_dir), "--data", str(tmp_path / "table.csv"),
                     "--out", str(out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["studies"]["labels"]) == {"any", "subdural"}
    assert metrics["slices"]["labels"]["subdural"]["n"] == sum(1 for r in rows[:-2] if r["subdural"] is not None)
    studies = pd.read_csv(out / "studies.csv")
    assert "one_study" in set(studies["study"]) and len(studies) == truth["study_id"].nunique()
    failures = pd.read_csv(out / "failures.csv")
    assert failures.loc[failures["path"] == "missing.dcm", "reason"].tolist() == ["not found"]


def test_external_evaluate_refuses_to_write_into_the_run(run_dir, synth, tmp_path):
    assert _evaluate("--dataset", "rsna", "--model", str(run_dir), "--data", str(synth),
                     "--out", str(run_dir / "external")) == 2
    assert not (run_dir / "external").exists()


def test_select_series_rules():
    def rows(series, n, **kw):
        base = {"series_id": series, "modality": "CT", "image_type": "ORIGINAL\\PRIMARY\\AXIAL",
                "series_description": "", "normal_z": 1.0, "slice_thickness": float("nan"),
                "series_number": None}
        return [{**base, **kw, "position": 5.0 * k if "gap" not in kw else kw["gap"] * k} for k in range(n)]

    headers = (rows("scout", 2, image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
               + rows("sagittal", 40, normal_z=0.0) + rows("thin", 40, slice_thickness=0.625)
               + rows("thick", 30) + rows("few", 3, series_description="brain"))
    chosen, reasons = datasets.select_series(headers)
    assert chosen == "thick"
    assert reasons["scout"] == "localizer/scout" and reasons["sagittal"].startswith("not axial")
    assert reasons["few"].startswith("only 3") and "closer" in reasons["thin"]
    assert datasets.select_series(rows("s", 10, series_description="Topogram 0.6"))[0] is None
    # Two equally thick axial series: more slices wins.
    tie = rows("a", 20) + rows("b", 25)
    assert datasets.select_series(tie)[0] == "b"


def test_cq500_truth_majority_and_bad_columns():
    reads = pd.DataFrame({"name": ["CQ500-CT-1", "CQ500-CT-2"], "Category": ["a", "b"],
                          **{f"{r}:{f}": [1, 0] for r in READERS for f in FINDINGS}})
    reads["R3:ICH"] = [0, 1]  # disagrees with R1 and R2 on both
    truth = datasets.cq500_truth(reads)
    assert truth["any"].tolist() == [1.0, 0.0] and truth["patient"].tolist() == ["CQ500-CT-1", "CQ500-CT-2"]
    assert datasets.cq500_name("CQ500CT42 CQ500CT42") == "CQ500-CT-42"
    with pytest.raises(datasets.DatasetError, match="R2:SAH"):
        datasets.cq500_truth(reads.drop(columns=["R2:SAH"]))
