"""DeLong's interval by hand, the patient bootstrap against scikit-learn on resampled rows,
operating points and calibration by hand."""

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from ich.evaluation import calibration, intervals, operating
from ich.evaluation.metrics import evaluate_all, evaluate_table
from ich.constants import LABELS

Z95 = 1.959963984540054


def test_delong_small_case_by_hand():
    # Positives 0.9, 0.6, 0.4; negatives 0.5, 0.3.
    # psi rows (per positive): [1, 1], [1, 1], [0, 1] -> V10 = 1, 1, 1/2; AUC = 5/6.
    # V01 (per negative): 0.5 beaten by 2 of 3 -> 2/3; 0.3 by all -> 1.
    # var(V10) = ((1/6)^2 + (1/6)^2 + (1/3)^2) / 2 = 1/12; var(V01) = 2 (1/6)^2 / 1 = 1/18.
    # Var = (1/12)/3 + (1/18)/2 = 1/18.
    out = intervals.delong_ci([1, 1, 1, 0, 0], [0.9, 0.6, 0.4, 0.5, 0.3])
    assert out["auc"] == pytest.approx(5 / 6)
    assert out["variance"] == pytest.approx(1 / 18)
    assert out["ci"][0] == pytest.approx(5 / 6 - Z95 * math.sqrt(1 / 18))
    assert out["ci"][1] == 1.0  # 5/6 + 0.462 is clipped to 1


def test_delong_with_a_tie_by_hand():
    # Positives 0.8, 0.5; negatives 0.5, 0.2: the tie 0.5 = 0.5 counts one half.
    # V10 = 1, 3/4; V01 = 3/4, 1; AUC = 7/8; var(V10) = var(V01) = 2 (1/8)^2 = 1/32.
    # Var = (1/32)/2 + (1/32)/2 = 1/32.
    out = intervals.delong_ci([1, 1, 0, 0], [0.8, 0.5, 0.5, 0.2], confidence=0.90)
    assert out["auc"] == pytest.approx(7 / 8)
    assert out["variance"] == pytest.approx(1 / 32)
    z90 = 1.6448536269514722
    assert out["ci"] == pytest.approx([7 / 8 - z90 * math.sqrt(1 / 32), 1.0])


def test_delong_unclipped_and_one_class():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.25, 300), 0, 1)
    out = intervals.delong_ci(y, p)
    assert out["auc"] == pytest.approx(roc_auc_score(y, p))
    low, high = out["ci"]
    assert 0 < low < out["auc"] < high < 1
    assert high - out["auc"] == pytest.approx(out["auc"] - low)
    assert intervals.delong_ci([1, 1], [0.2, 0.4]) == {"auc": None, "variance": None, "ci": None}


def test_bootstrap_weights_resample_patients_and_are_seeded():
    groups = ["a", "a", "a", "b", "c", "c", "d"]
    w = intervals.bootstrap_weights(groups, 50, seed=3)
    assert w.shape == (50, 7)
    # Every slice of a patient has its patient's count; counts of the 4 patients sum to 4.
    np.testing.assert_array_equal(w[:, 0], w[:, 1])
    np.testing.assert_array_equal(w[:, 1], w[:, 2])
    np.testing.assert_array_equal(w[:, 4], w[:, 5])
    np.testing.assert_array_equal(w[:, [0, 3, 4, 6]].sum(axis=1), 4)
    np.testing.assert_array_equal(w, intervals.bootstrap_weights(groups, 50, seed=3))
    assert not np.array_equal(w, intervals.bootstrap_weights(groups, 50, seed=4))


def test_weighted_metrics_equal_sklearn_on_resampled_rows():
    rng = np.random.default_rng(1)
    n = 60
    groups = rng.integers(0, 15, n)
    y = rng.integers(0, 2, n)
    p = np.round(np.clip(0.25 * y + rng.uniform(0, 0.75, n), 0, 1), 1)  # rounding makes ties
    w = intervals.bootstrap_weights(groups, 20, seed=0)
    got = intervals.weighted_metrics(y, p, w, threshold=0.5)
    for b in range(20):
        rows = np.repeat(np.arange(n), w[b].astype(int))
        yb, pb = y[rows], p[rows]
        if 0 < yb.sum() < len(yb):
            assert got["roc_auc"][b] == pytest.approx(roc_auc_score(yb, pb))
            assert got["pr_auc"][b] == pytest.approx(average_precision_score(yb, pb))
            pred = pb >= 0.5
            tp, fp = np.sum(pred & (yb == 1)), np.sum(pred & (yb == 0))
            fn, tn = np.sum(~pred & (yb == 1)), np.sum(~pred & (yb == 0))
            assert got["sensitivity"][b] == pytest.approx(tp / (tp + fn))
            assert got["specificity"][b] == pytest.approx(tn / (tn + fp))
            assert got["f1"][b] == pytest.approx(2 * tp / (2 * tp + fp + fn))
            ops = operating.operating_points(yb, pb)
            for key in ("sensitivity_at_specificity_0.90", "specificity_at_sensitivity_0.95"):
                assert got[key][b] == pytest.approx(ops[key])
        else:
            assert np.isnan(got["roc_auc"][b])


def test_bootstrap_ci_brackets_the_estimate_and_clustered_data_widen_it():
    rng = np.random.default_rng(2)
    # 40 patients of 10 identical slices each vs 400 independent rows of the same values:
    # resampling patients must give a wider interval for the clustered set.
    y = rng.integers(0, 2, 40)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 40), 0, 1)
    yc, pc = np.repeat(y, 10), np.repeat(p, 10)
    clustered = intervals.bootstrap_ci(yc, pc, np.repeat(np.arange(40), 10), 0.5, n_boot=400, seed=0)
    independent = intervals.bootstrap_ci(yc, pc, np.arange(400), 0.5, n_boot=400, seed=0)
    auc = roc_auc_score(yc, pc)
    assert clustered["roc_auc"][0] < auc < clustered["roc_auc"][1]
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(clustered["roc_auc"]) > 2 * width(independent["roc_auc"])
    assert clustered == intervals.bootstrap_ci(yc, pc, np.repeat(np.arange(40), 10), 0.5,
                                               n_boot=400, seed=0)


def test_percentile_interval_needs_most_replicates_defined():
    assert intervals.percentile_interval(np.array([np.nan] * 6 + [0.5] * 4)) is None
    assert intervals.percentile_interval(np.arange(101) / 100.0) == pytest.approx([0.025, 0.975])


def test_operating_points_by_hand():
    # Scores (label): 0.9 (1), 0.8 (1), 0.7 (0), 0.6 (1), 0.4 (0), 0.3 (0), 0.2 (1), 0.1 (0)
    # ... with 10 negatives in all so specificity steps by 0.1.
    y = [1, 1, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    p = [0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01, 0.0]
    out = operating.operating_points(y, p)
    # Specificity >= 0.90 allows one false positive (0.7): then 0.6 is also called -> sens 3/4.
    assert out["sensitivity_at_specificity_0.90"] == pytest.approx(0.75)
    assert out["threshold_at_specificity_0.90"] == pytest.approx(0.6)
    # >= 0.95 allows none: threshold 0.8, sens 2/4.
    assert out["sensitivity_at_specificity_0.95"] == pytest.approx(0.5)
    assert out["threshold_at_specificity_0.95"] == pytest.approx(0.8)
    # Sensitivity >= 0.90 needs all four positives: threshold 0.2, 3 false positives -> 7/10.
    assert out["specificity_at_sensitivity_0.90"] == pytest.approx(0.7)
    assert out["threshold_at_sensitivity_0.90"] == pytest.approx(0.2)
    assert operating.operating_points([0, 0], [0.1, 0.2])["sensitivity_at_specificity_0.90"] is None


def test_brier_ece_and_bins_by_hand():
    y = [1, 0, 1, 0]
    p = [0.95, 0.15, 0.55, 0.05]
    # Brier: (0.05^2 + 0.15^2 + 0.45^2 + 0.05^2) / 4 = (0.0025 + 0.0225 + 0.2025 + 0.0025) / 4
    assert calibration.brier_score(y, p) == pytest.approx(0.23 / 4)
    bins = calibration.reliability_bins(y, p)
    assert bins["count"] == [1, 1, 0, 0, 0, 1, 0, 0, 0, 1]
    assert bins["mean_prob"][2] is None and bins["fraction_positive"][5] == 1.0
    # ECE: each occupied bin holds 1 of 4 rows: (0.05 + 0.15 + 0.45 + 0.05) / 4.
    assert calibration.expected_calibration_error(y, p) == pytest.approx(0.7 / 4)
    # p = 1 falls in the last bin, not beyond it.
    assert calibration.reliability_bins([1], [1.0])["count"][-1] == 1


def test_platt_and_isotonic_fit_on_val_improve_a_miscalibrated_model():
    rng = np.random.default_rng(3)
    y = rng.random(4000) < 0.15
    logit = np.where(y, 1.0, -1.0) + rng.normal(0, 1.0, 4000) + 2.0  # far too confident
    p = 1 / (1 + np.exp(-logit))
    val, test = slice(0, 2000), slice(2000, None)
    before = calibration.expected_calibration_error(y[test], p[test])
    for method in ("platt", "isotonic"):
        fitted = calibration.fit_calibration(y[val], p[val], method)
        assert fitted["method"] == method
        after = calibration.apply_calibration(fitted, p[test])
        assert calibration.expected_calibration_error(y[test], after) < before / 3
        assert calibration.brier_score(y[test], after) < calibration.brier_score(y[test], p[test])
    platt = calibration.fit_calibration(y[val], p[val], "platt")
    assert platt["a"] > 0
    assert calibration.fit_calibration([1, 1], [0.2, 0.3], "platt") == {"method": "none"}
    with pytest.raises(ValueError, match="isotonic"):
        calibration.fit_calibration(y, p, "beta")


def test_evaluate_all_with_groups_adds_intervals_beside_values():
    rng = np.random.default_rng(4)
    n = 120
    y = np.zeros((n, 6), int)
    y[:, 1:] = rng.random((n, 5)) < 0.3
    y[:, 0] = y[:, 1:].max(axis=1)
    p = np.clip(0.4 * y + rng.uniform(0, 0.6, (n, 6)), 0, 1)
    thresholds = {label: 0.5 for label in LABELS}
    groups = np.arange(n) // 4
    m = evaluate_all(y, p, thresholds, groups=groups, bootstrap=200, seed=7)
    plain = evaluate_all(y, p, thresholds)
    for label in LABELS:
        got = m["labels"][label]
        assert got["roc_auc"] == pytest.approx(plain["labels"][label]["roc_auc"])
        for key in ("roc_auc", "pr_auc", "sensitivity", "specificity", "f1",
                    "sensitivity_at_specificity_0.90", "specificity_at_sensitivity_0.95"):
            low, high = got[f"{key}_ci"]
            assert low <= got[key] + 1e-9 and got[key] <= high + 1e-9, (label, key)
        assert got["roc_auc_ci_delong"] == intervals.delong_ci(y[:, LABELS.index(label)],
                                                               p[:, LABELS.index(label)])["ci"]
        assert got["prevalence"] == pytest.approx(y[:, LABELS.index(label)].mean())
        assert got["brier"] == pytest.approx(np.mean((p[:, LABELS.index(label)] - y[:, LABELS.index(label)]) ** 2))
    assert m["overall"]["bootstrap"] == {"replicates": 200, "seed": 7, "unit": "patient",
                                         "confidence": 0.95, "groups": 30}
    assert m["overall"]["n_images"] == n
    assert m == evaluate_all(y, p, thresholds, groups=groups, bootstrap=200, seed=7)


def test_evaluate_table_scores_each_label_on_its_known_rows():
    y = np.array([[1, np.nan], [0, 1], [1, 0], [0, np.nan], [1, 1]], dtype=float)
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.5], [0.6, 0.7]])
    m = evaluate_table(y, p, {"any": 0.5, "subdural": 0.5}, groups=np.arange(5),
                       labels=["any", "subdural"], bootstrap=0)
    assert m["labels"]["any"]["n"] == 5 and m["labels"]["subdural"]["n"] == 3
    assert m["labels"]["subdural"]["roc_auc"] == pytest.approx(1.0)
    assert m["labels"]["any"]["roc_auc_ci"] is None
    assert m["overall"]["rsna_weighted_log_loss"] is None


def test_calibration_effect_per_label():
    rng = np.random.default_rng(5)
    y = (rng.random((600, 2)) < 0.2).astype(float)
    p = 1 / (1 + np.exp(-(np.where(y == 1, 1.0, -1.0) + rng.normal(0, 1, y.shape) + 2)))
    effect = calibration.calibration_effect(y[:300], p[:300], y[300:], p[300:], "platt", ["any", "subdural"])
    for j, label in enumerate(["any", "subdural"]):
        assert effect[label]["method"] == "platt"
        assert effect[label]["ece"] < calibration.expected_calibration_error(y[300:, j], p[300:, j])
        # Platt scaling is monotone increasing: the AUC is unchanged.
        assert effect[label]["roc_auc"] == pytest.approx(roc_auc_score(y[300:, j], p[300:, j]))
