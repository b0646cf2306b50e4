"""ich.evaluation.metrics: hand-computed cases, then agreement with scikit-learn on random data."""

import json
import math

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, average_precision_score, confusion_matrix, f1_score,
                             log_loss, precision_score, recall_score, roc_auc_score)

from ich.constants import LABELS
from ich.evaluation.metrics import choose_threshold, evaluate_all, label_metrics, rsna_weighted_log_loss

# Four images: positives scored 0.35 and 0.8, negatives 0.1 and 0.4.
Y4 = [0, 0, 1, 1]
P4 = [0.1, 0.4, 0.35, 0.8]


def test_auc_of_four_samples():
    # Positive-negative pairs ranked right: (0.35>0.1), (0.8>0.1), (0.8>0.4); wrong: (0.35<0.4).
    m = label_metrics(Y4, P4, threshold=0.5)
    assert m["roc_auc"] == pytest.approx(3 / 4)
    # Ranked 0.8(+), 0.4(-), 0.35(+), 0.1(-): AP = 0.5 * 1 + 0.5 * 2/3.
    assert m["pr_auc"] == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_confusion_and_ratios_at_threshold():
    # threshold 0.3 -> predicted [0, 1, 1, 1]: tn 1, fp 1, fn 0, tp 2.
    m = label_metrics(Y4, P4, threshold=0.3)
    assert m["confusion"] == {"tn": 1, "fp": 1, "fn": 0, "tp": 2}
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(1.0)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))  # 0.8
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["support"] == 2
    assert m["threshold"] == 0.3


def test_threshold_is_inclusive():
    # A probability equal to the threshold counts as positive (sklearn's ROC convention).
    m = label_metrics(Y4, P4, threshold=0.35)
    assert m["confusion"]["tp"] == 2


def test_single_class_gives_null_aucs_not_nan():
    m = label_metrics([0, 0, 0], [0.1, 0.7, 0.2], threshold=0.5)
    assert m["roc_auc"] is None and m["pr_auc"] is None
    assert m["confusion"] == {"tn": 2, "fp": 1, "fn": 0, "tp": 0}
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    assert m["specificity"] == pytest.approx(2 / 3)
    json.dumps(m, allow_nan=False)


# Six images where Youden and F1 disagree.
Y6 = [0, 0, 1, 1, 0, 1]
P6 = [0.2, 0.3, 0.6, 0.7, 0.65, 0.9]


def test_youden_threshold_hand_computed():
    # TPR-FPR at 0.9: 1/3; 0.7: 2/3; 0.65: 1/3; 0.6: 2/3; 0.3: 1/3; 0.2: 0.
    # Tie at 0.7 and 0.6 goes to the higher threshold.
    assert choose_threshold(Y6, P6, "youden") == pytest.approx(0.7)


def test_youden_tie_break_four_samples():
    # TPR-FPR is 0.5 at both 0.8 and 0.35: the higher wins.
    assert choose_threshold(Y4, P4, "youden") == pytest.approx(0.8)


def test_f1_threshold_hand_computed():
    # F1 at 0.9: 0.5; 0.7: 0.8; 0.65: 2/3; 0.6: P=3/4, R=1 -> 6/7; 0.3: 0.75; 0.2: 2/3.
    assert choose_threshold(Y6, P6, "f1") == pytest.approx(0.6)


def test_threshold_degenerate_single_class():
    assert choose_threshold([1, 1, 1], [0.2, 0.9, 0.4], "youden") == 0.5
    assert choose_threshold([0, 0], [0.2, 0.9], "f1") == 0.5


def test_threshold_unknown_method():
    with pytest.raises(ValueError, match="youden"):
        choose_threshold(Y4, P4, "median")


def test_rsna_log_loss_two_samples_hand_computed():
    y = np.array([[1, 1, 0, 0, 0, 0],
                  [0, 0, 0, 0, 0, 0]])
    p = np.array([[0.8, 0.5, 0.1, 0.1, 0.1, 0.1],
                  [0.2, 0.1, 0.1, 0.1, 0.1, 0.1]])
    image1 = 2 * -math.log(0.8) + -math.log(0.5) + 4 * -math.log(0.9)
    image2 = 2 * -math.log(0.8) + 5 * -math.log(0.9)
    expected = (image1 + image2) / (2 * 7)  # 2 images, weights 2+1+1+1+1+1 = 7
    assert rsna_weighted_log_loss(y, p) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.180997, abs=1e-6)


def test_rsna_log_loss_weights_any_twice():
    y = np.zeros((1, 6))
    wrong_any = np.array([[0.9, 0, 0, 0, 0, 0]])
    wrong_subtype = np.array([[0, 0.9, 0, 0, 0, 0]])
    loss_any = rsna_weighted_log_loss(y, wrong_any)
    loss_sub = rsna_weighted_log_loss(y, wrong_subtype)
    assert loss_any == pytest.approx(2 * loss_sub, rel=1e-9)


def test_rsna_log_loss_clips_certain_mistakes():
    y = np.ones((1, 6))
    loss = rsna_weighted_log_loss(y, np.zeros((1, 6)))
    assert loss == pytest.approx(-math.log(1e-15), rel=1e-6)


def test_rsna_log_loss_matches_sklearn_columnwise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(50, 6))
    p = rng.uniform(0.01, 0.99, size=(50, 6))
    per_column = [log_loss(y[:, j], p[:, j], labels=[0, 1]) for j in range(6)]
    expected = np.average(per_column, weights=[2, 1, 1, 1, 1, 1])
    assert rsna_weighted_log_loss(y, p) == pytest.approx(expected, rel=1e-10)


def test_label_metrics_agree_with_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=200)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, size=200), 0, 1)
    m = label_metrics(y, p, threshold=0.45)
    pred = (p >= 0.45).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
    assert m["confusion"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, p))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["recall"] == pytest.approx(recall_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(1 - y, 1 - pred))


def test_evaluate_all_shape_and_macro():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, size=(40, 6))
    y[:, 1] = 0  # epidural absent: its AUCs are null and the macro AUC skips it
    p = rng.uniform(0, 1, size=(40, 6))
    out = evaluate_all(y, p, {label: 0.5 for label in LABELS})
    assert list(out) == ["labels", "overall"]
    assert list(out["labels"]) == list(LABELS)
    assert set(out["overall"]) == {"macro_roc_auc", "macro_pr_auc", "macro_f1",
                                   "rsna_weighted_log_loss", "n_images"}
    assert out["labels"]["epidural"]["roc_auc"] is None
    defined = [roc_auc_score(y[:, j], p[:, j]) for j in range(6) if j != 1]
    assert out["overall"]["macro_roc_auc"] == pytest.approx(np.mean(defined))
    assert out["overall"]["macro_f1"] == pytest.approx(
        np.mean([out["labels"][k]["f1"] for k in LABELS]))
    assert out["overall"]["n_images"] == 40
    json.dumps(out, allow_nan=False)


def test_evaluate_all_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        evaluate_all(np.zeros((3, 5)), np.zeros((3, 5)), {k: 0.5 for k in LABELS})
    with pytest.raises(ValueError, match="threshold"):
        evaluate_all(np.zeros((3, 6)), np.zeros((3, 6)), {"any": 0.5})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        label_metrics([0, 1], [0.5, 1.5], 0.5)
