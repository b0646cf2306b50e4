"""ich.steps.evaluate on a small work dir of PNGs and the hand-weighted tiny cascade."""

import json
import re

import cv2
import numpy as np
import pandas as pd
import pytest

from ich import config
from ich.constants import (CASCADE_JSON, EVAL_DIR, HISTORY_DIR, IMAGES_CSV, LABELS, METRICS_JSON,
                           PNG_DIR, PREDICTIONS_CSV, REPORT_MD, SPLITS_CSV)
from ich.evaluation.metrics import choose_threshold, evaluate_all
from ich.steps import evaluate
from tiny_cascade import expected_probs, red_images, save_tiny_cascade

SIZE = 16


def _labels(n: int, rng) -> np.ndarray:
    y = np.zeros((n, len(LABELS)), dtype=int)
    y[:, 1:] = rng.random((n, len(LABELS) - 1)) < 0.3
    y[:, 0] = y[:, 1:].max(axis=1)
    return y


def make_work_dir(root, n_per_split=(6, 20, 24), seed=0):
    """PNGs whose red channel is brighter for hemorrhage (noisy), splits.csv and images.csv."""
    rng = np.random.default_rng(seed)
    work = root / "work"
    (work / PNG_DIR).mkdir(parents=True)
    split_rows, image_rows = [], []
    for split, n in zip(("train", "val", "test"), n_per_split):
        y = _labels(n, rng)
        reds = np.clip(90 + 70 * y[:, 0] + rng.normal(0, 30, n), 0, 255)
        for i, (red, image) in enumerate(zip(reds, red_images(reds, size=SIZE, seed=len(split_rows)))):
            image_id = f"ID_{len(split_rows):09x}"
            path = f"{PNG_DIR}/{image_id}.png"
            cv2.imwrite(str(work / path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            split_rows.append({"image_id": image_id, "split": split, "patient_id": f"P{i // 3}_{split}",
                               "study_id": f"S{i // 3}_{split}", **dict(zip(LABELS, y[i]))})
            image_rows.append({"image_id": image_id, "patient_id": f"P{i // 3}_{split}", "path": path})
    pd.DataFrame(split_rows).to_csv(work / SPLITS_CSV, index=False)
    pd.DataFrame(image_rows).to_csv(work / IMAGES_CSV, index=False)
    return work


@pytest.fixture
def setup(tmp_path):
    work = make_work_dir(tmp_path)
    run = save_tiny_cascade(tmp_path / "run", image_size=SIZE, extra_key="kept")
    (run / HISTORY_DIR).mkdir()
    pd.DataFrame({"epoch": [0, 1, 2], "auc": [0.6, 0.7, 0.8], "loss": [0.7, 0.5, 0.4],
                  "val_auc": [0.55, 0.65, 0.7], "val_loss": [0.8, 0.6, 0.5],
                  "learning_rate": [1e-3] * 3}).to_csv(run / HISTORY_DIR / "stage1_frozen.csv", index=False)
    cfg = config.load(None, [f"paths.work_dir={work}", f"paths.run_dir={run}", "data.workers=1",
                             "predict.batch_size=8", "evaluate.report_examples=4"])
    return cfg, work, run


def _truth_and_expected(work, split):
    splits = pd.read_csv(work / SPLITS_CSV)
    part = splits[splits["split"] == split]
    images = np.stack([cv2.cvtColor(cv2.imread(str(work / PNG_DIR / f"{i}.png")), cv2.COLOR_BGR2RGB)
                       for i in part["image_id"]])
    return part, part[list(LABELS)].to_numpy(), expected_probs(images)


def test_evaluate_writes_metrics_thresholds_and_report(setup):
    cfg, work, run = setup
    path = evaluate.run(cfg)
    eval_dir = run / EVAL_DIR
    assert path == eval_dir / METRICS_JSON
    metrics = json.loads(path.read_text())

    # Thresholds: the run's own (cascade.json, chosen by the same method), which stays untouched.
    cascade = json.loads((run / CASCADE_JSON).read_text())
    assert metrics["thresholds"]["values"] == cascade["thresholds"]
    assert metrics["thresholds"]["method"] == "youden" and "the run" in metrics["thresholds"]["source"]

    # Predictions: image_id + six probabilities exactly, equal to the hand-computed cascade.
    test_part, test_true, test_prob = _truth_and_expected(work, "test")
    pred = pd.read_csv(eval_dir / PREDICTIONS_CSV)
    assert list(pred.columns) == ["image_id", *LABELS]
    assert list(pred["image_id"]) == list(test_part["image_id"])
    np.testing.assert_allclose(pred[list(LABELS)].to_numpy(), test_prob, atol=1e-5)

    # Metrics: evaluate_all on the test split at those thresholds.
    expected = evaluate_all(test_true, pred[list(LABELS)].to_numpy(), cascade["thresholds"])
    assert metrics["overall"]["n_images"] == len(test_part)
    assert metrics["labels"]["any"]["roc_auc"] == pytest.approx(expected["labels"]["any"]["roc_auc"])
    assert metrics["labels"]["any"]["roc_auc"] > 0.8  # red brightness carries the label
    assert metrics["overall"]["rsna_weighted_log_loss"] == pytest.approx(
        expected["overall"]["rsna_weighted_log_loss"], rel=1e-4)
    assert metrics["labels"]["subdural"]["confusion"] == expected["labels"]["subdural"]["confusion"]

    report = (eval_dir / REPORT_MD).read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert "training.png" in links and "examples.png" in links
    assert all((eval_dir / link).is_file() for link in links)
    assert f"| any | {metrics['labels']['any']['roc_auc']:.3f} |" in report
    assert "Research use only" in report


def test_study_level_is_the_max_over_slices_and_agrees_with_scikit_learn(setup):
    from sklearn.metrics import roc_auc_score

    cfg, work, run = setup
    metrics = json.loads(evaluate.run(cfg).read_text())
    studies = pd.read_csv(run / EVAL_DIR / "studies.csv")
    test_part, test_true, test_prob = _truth_and_expected(work, "test")
    groups = test_part.assign(**{f"p_{l}": test_prob[:, j] for j, l in enumerate(LABELS)}).groupby("study_id")
    assert studies["study_id"].tolist() == sorted(groups.groups)
    assert studies["n_slices"].tolist() == groups.size().tolist()
    np.testing.assert_allclose(studies["any"], groups["p_any"].max(), atol=1e-5)
    assert studies["any_true"].tolist() == groups["any"].max().tolist()
    assert metrics["studies"]["overall"]["n_images"] == len(studies)
    # Every test study here has a bleed (AUC undefined: None); epidural has both classes.
    assert metrics["studies"]["labels"]["any"]["roc_auc"] is None
    assert 0 < studies["epidural_true"].sum() < len(studies)
    assert metrics["studies"]["labels"]["epidural"]["roc_auc"] == pytest.approx(
        roc_auc_score(studies["epidural_true"], studies["epidural"]))


@pytest.mark.slow  # two evaluations (the report's figures are most of their ~12 s each)
def test_other_threshold_method_is_chosen_on_val_and_leaves_the_run_alone(setup, caplog):
    cfg, work, run = setup
    before = (run / CASCADE_JSON).read_bytes()
    evaluate.run(cfg)
    f1 = config.load(None, [f"paths.work_dir={work}", f"paths.run_dir={run}", "data.workers=1",
                            "predict.batch_size=8", "evaluate.report_examples=4",
                            "evaluate.threshold_method=f1"])
    with caplog.at_level("INFO", logger="ich"):
        path = evaluate.run(f1)  # recomputed: its settings changed
    assert "settings changed: evaluate.threshold_method" in caplog.text
    metrics = json.loads(path.read_text())
    _, val_true, val_prob = _truth_and_expected(work, "val")
    for j, label in enumerate(LABELS):
        assert metrics["thresholds"]["values"][label] == pytest.approx(
            choose_threshold(val_true[:, j], val_prob[:, j], "f1"), abs=1e-5)
    assert metrics["thresholds"]["method"] == "f1"
    assert (run / CASCADE_JSON).read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["cascade.json", "stage1.keras", "stage2.keras", "history", "eval", ".done"])


@pytest.mark.slow  # three evaluations: ~25 s
def test_evaluate_skips_when_complete_and_force_redoes(setup):
    cfg, _, run = setup
    path = evaluate.run(cfg)
    stamp = path.stat().st_mtime_ns
    assert evaluate.run(cfg) == path and path.stat().st_mtime_ns == stamp
    evaluate.run(cfg, force=True)
    assert path.stat().st_mtime_ns > stamp


def test_evaluate_without_trained_model_names_the_file(tmp_path):
    work = make_work_dir(tmp_path, n_per_split=(3, 3, 3))
    cfg = config.load(None, [f"paths.work_dir={work}", f"paths.run_dir={tmp_path / 'none'}"])
    with pytest.raises(FileNotFoundError, match=CASCADE_JSON):
        evaluate.run(cfg)


def _with_series(work):
    """Give images.csv series (one per study, three slices) and positions."""
    images = pd.read_csv(work / IMAGES_CSV)
    splits = pd.read_csv(work / SPLITS_CSV).set_index("image_id")
    images["series_id"] = [f"SE_{splits.loc[i, 'study_id']}" for i in images["image_id"]]
    images["position"] = [float(k % 3) for k in range(len(images))]
    images.to_csv(work / IMAGES_CSV, index=False)


def test_sequence_stage_level_beside_the_image_stages_and_no_patient_id_in_outputs(tmp_path):
    from tiny_cascade import expected_series

    work = make_work_dir(tmp_path)
    _with_series(work)
    run = save_tiny_cascade(tmp_path / "run", image_size=SIZE, sequence=True)
    cfg = config.load(None, [f"paths.work_dir={work}", f"paths.run_dir={run}", "data.workers=1",
                             "predict.batch_size=8", "evaluate.report_examples=2",
                             "evaluate.bootstrap=20"])
    metrics = json.loads(evaluate.run(cfg).read_text())
    assert metrics["studies"]["source"] == "sequence stage"
    assert set(metrics["image_stages"]["labels"]) == set(LABELS)
    studies = pd.read_csv(run / EVAL_DIR / "studies.csv")
    assert len(studies) == 8 and (studies["n_slices"] == 3).all()   # 24 test images, 3 per study
    # Each study's probability is the tiny sequence stage's, from its slices' cascade output.
    splits = pd.read_csv(work / SPLITS_CSV)
    test = splits[splits["split"] == "test"]
    images = {i: cv2.cvtColor(cv2.imread(str(work / PNG_DIR / f"{i}.png")), cv2.COLOR_BGR2RGB)
              for i in test["image_id"]}
    for _, row in studies.iterrows():
        ids = test.loc[test["study_id"] == row["study_id"], "image_id"]
        expected = expected_series(expected_probs(np.stack([images[i] for i in ids])))
        np.testing.assert_allclose(row[list(LABELS)].to_numpy(float), expected, atol=1e-4)
    report = (run / EVAL_DIR / REPORT_MD).read_text()
    assert "## Stages compared (ROC AUC)" in report and "studies, sequence stage" in report
    html = (run / EVAL_DIR / "report.html").read_text()
    assert 'id="comparison"' in html
    # Nothing that leaves the machine names a patient or an absolute path.
    patients = set(splits["patient_id"])
    for path in (run / EVAL_DIR).iterdir():
        if path.suffix in (".csv", ".json", ".md", ".html"):
            text = path.read_text()
            assert str(tmp_path) not in text, path.name
            found = [p for p in patients if re.search(rf"\b{re.escape(p)}\b", text)]
            assert not found, (path.name, found[:3])
