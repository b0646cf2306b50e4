"""The whole pipeline, `ich run` then `ich predict`, on an RSNA-format folder ich synth did not make.

Tiny real architectures (EfficientNetV2B0 + ConvNeXtTiny at 32 px, a few steps): this checks
that the steps fit together and that the numbers they write agree with each other and with
scikit-learn, not that the model is good.
"""

import json
import re

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from alt_rsna import write_alt_rsna, write_config
from ich.cli import main
from ich.constants import LABELS
from ich.io import read_csv


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    # PatientIDs starting with "=": escaped in every CSV, yet joined exactly (natural prevalence).
    truth = write_alt_rsna(root / "rsna", n_patients=10, slices=4, size=64, seed=5, patient_prefix="=")
    config = write_config(
        root, truth,
        augment={"target_per_label": 20, "max_copies_per_image": 1, "workers": 1},
        model={"image_size": 32, "fusion_dim": 16, "attention_heads": 2},
        train={"batch_size": 8, "finetune_epochs": 1, "steps_per_epoch": 2},
        predict={"workers": 2}, evaluate={"natural_prevalence": True})
    assert main(["run", "--config", str(config)]) == 0
    return root, config, truth


def test_run_writes_every_artifact(pipeline):
    root, _, _ = pipeline
    for name in ("labels.csv", "sampled.csv", "images.csv", "failures.csv", "missing.csv",
                 "splits.csv", "augmented.csv"):
        assert (root / "work" / name).is_file(), name
    for name in ("stage1.keras", "stage2.keras", "sequence.keras", "cascade.json", "eval/metrics.json",
                 "eval/predictions.csv", "eval/report.md", "eval/studies.csv", "provenance.json"):
        assert (root / "run" / name).is_file(), name
    # What leaves the machine (eval/, predict's --out) names no patient and no absolute path.
    from alt_rsna import ACCESSION, INSTITUTION, PATIENT_NAME

    patients = set(read_csv(root / "work" / "splits.csv", dtype=str)["patient_id"])
    assert patients and all(p.startswith("=") for p in patients)
    for path in (root / "run" / "eval").iterdir():
        if path.suffix in (".csv", ".json", ".md", ".html"):
            # Embedded images are base64: any short string turns up in them by chance.
            text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", path.read_text())
            for secret in (PATIENT_NAME, "Doe Jane", "19450317", INSTITUTION, ACCESSION, str(root)):
                assert secret not in text, (path.name, secret)
            assert not [p for p in patients if p in text], path.name
    html = (root / "run" / "eval" / "report.html").read_text()
    # The model card carries the run's provenance; the image stages sit beside the sequence stage.
    assert "ich version" in html and "labels CSV sha256" in html
    assert 'id="comparison"' in html


def test_metrics_agree_with_sklearn_on_predictions(pipeline):
    root, _, _ = pipeline
    metrics = json.loads((root / "run" / "eval" / "metrics.json").read_text())
    predictions = pd.read_csv(root / "run" / "eval" / "predictions.csv")
    splits = pd.read_csv(root / "work" / "splits.csv")
    test = splits[splits.split == "test"].set_index("image_id").loc[predictions.image_id]
    assert list(predictions.columns) == ["image_id", *LABELS]
    checked = 0
    for label in LABELS:
        y = test[label].to_numpy()
        if 0 < y.sum() < len(y):
            expected = roc_auc_score(y, predictions[label])
            assert metrics["labels"][label]["roc_auc"] == pytest.approx(expected, abs=1e-6)
            checked += 1
        else:
            assert metrics["labels"][label]["roc_auc"] is None
    assert checked >= 2  # any and subdural have both classes in alt_rsna's test split
    # Cascade: p(subtype) never exceeds p(any).
    assert (predictions[list(LABELS[1:])].max(axis=1) <= predictions["any"] + 1e-6).all()


def test_predict_folder_with_broken_files(pipeline, tmp_path):
    root, config, truth = pipeline
    out = tmp_path / "pred"
    assert main(["predict", str(truth["dicom_dir"]), "--model", str(root / "run"), "--out", str(out),
                 "--config", str(config)]) == 0
    predicted = pd.read_csv(out / "predictions.csv")
    failures = pd.read_csv(out / "failures.csv")
    assert set(predicted.image_id) == set(truth["hu"])
    broken = {p.split("/")[-1][:-4] for p in failures.path}
    skipped = {p.split("/")[-1][:-4] for p in pd.read_csv(out / "skipped.csv").path}
    # The MR slice is known from its header not to be CT: skipped, not a failure.
    assert skipped == {i for i, kind in truth["bad"].items() if kind == "mr"}
    assert broken == set(truth["bad"]) - skipped
    submission = pd.read_csv(out / "submission.csv")
    assert len(submission) == 6 * len(predicted)
    # Predict's outputs name no patient: no PatientID (all start with "="), name or accession.
    from alt_rsna import ACCESSION, INSTITUTION, PATIENT_NAME

    patients = set(pd.read_parquet(root / "work" / "index.parquet")["patient_id"]) - {""}
    assert patients and all(p.startswith("=") for p in patients)
    for path in out.iterdir():
        if path.suffix in (".csv", ".json"):
            text = path.read_text()
            assert not [s for s in (PATIENT_NAME, "Doe Jane", "19450317", INSTITUTION, ACCESSION, *patients)
                        if s in text], path.name
    # Same preprocessing and model as evaluate: identical probabilities for the test images.
    evaluated = pd.read_csv(root / "run" / "eval" / "predictions.csv").set_index("image_id")
    both = predicted.set_index("image_id").loc[evaluated.index, list(LABELS)]
    np.testing.assert_allclose(both.to_numpy(), evaluated[list(LABELS)].to_numpy(), atol=1e-4)


def test_natural_prevalence_scores_every_axial_slice_of_the_test_patients(pipeline):
    from ich.data.index import skip_reason

    root, _, _ = pipeline
    metrics = json.loads((root / "run" / "eval" / "metrics.json").read_text())
    splits = read_csv(root / "work" / "splits.csv", dtype=str)
    test_patients = set(splits.loc[splits["split"] == "test", "patient_id"])
    index = pd.read_parquet(root / "work" / "index.parquet")
    index = index[index["patient_id"].isin(test_patients)]
    axial = index[index.apply(skip_reason, axis=1) == ""]
    natural = metrics["natural_prevalence"]
    assert natural["overall"]["n_images"] + natural["n_failed"] == len(axial) > 0
    assert "test patients, every slice" in (root / "run" / "eval" / "report.html").read_text()
