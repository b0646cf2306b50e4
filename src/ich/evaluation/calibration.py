"""Calibration of predicted probabilities: Brier score, expected calibration error, the
reliability diagram's bins, and recalibration fitted on validation (Platt or isotonic).

In: one label's `y_true` 0/1 (N,) and `y_prob` (N,). Out: floats, a bin table as a dict of
lists (JSON-ready), and calibrators as small JSON-ready dicts of parameters (no pickles), with
`apply_calibration` to use them. Pure functions.

Why it matters here: the balanced training sample puts about 80% of images positive for `any`
against 14% in real scans, so raw probabilities overstate risk at natural prevalence; the
Brier score and ECE at the test set's prevalence show by how much, and a calibrator fitted on
validation shows how much of it a monotone map repairs (AUC is unchanged by Platt scaling and
nearly so by isotonic regression: both keep the order, isotonic adds ties).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

CALIBRATION_METHODS = ("none", "platt", "isotonic")
# Equal-width probability bins of the reliability diagram and ECE (the common choice, 10).
N_BINS = 10
# Platt scaling works on log-odds; probabilities are clipped this far from 0 and 1 first.
LOGIT_EPS = 1e-6


def brier_score(y_true, y_prob) -> float | None:
    """Mean squared difference between probability and outcome, (1/N) sum (p_i - y_i)^2;
    None for no rows. 0 is perfect; always predicting the prevalence pi scores pi (1 - pi)."""
    y, p = _vectors(y_true, y_prob)
    return float(np.mean((p - y) ** 2)) if len(y) else None


def reliability_bins(y_true, y_prob, n_bins: int = N_BINS) -> dict[str, list]:
    """The reliability diagram's table: N_BINS equal-width bins over [0, 1] (the last one
    closed, so p = 1 falls in it). Out: {"lower", "upper", "count", "mean_prob",
    "fraction_positive"}, one entry per bin; means are None for empty bins."""
    y, p = _vectors(y_true, y_prob)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    sum_p = np.bincount(index, weights=p, minlength=n_bins)
    sum_y = np.bincount(index, weights=y, minlength=n_bins)
    return {"lower": edges[:-1].round(10).tolist(), "upper": edges[1:].round(10).tolist(),
            "count": count.astype(int).tolist(),
            "mean_prob": [float(s / c) if c else None for s, c in zip(sum_p, count)],
            "fraction_positive": [float(s / c) if c else None for s, c in zip(sum_y, count)]}


def expected_calibration_error(y_true, y_prob, n_bins: int = N_BINS) -> float | None:
    """ECE = sum over bins b of (n_b / N) |fraction positive in b - mean probability in b|,
    with the bins of `reliability_bins`; None for no rows."""
    bins = reliability_bins(y_true, y_prob, n_bins)
    total = sum(bins["count"])
    if total == 0:
        return None
    return float(sum(c / total * abs(f - m) for c, f, m in
                     zip(bins["count"], bins["fraction_positive"], bins["mean_prob"]) if c))


def fit_calibration(y_true, y_prob, method: str) -> dict:
    """Fit a calibrator on validation rows. Out: {"method": "none"} (identity),
    {"method": "platt", "a", "b"} for p' = sigmoid(a * logit(p) + b) (a logistic regression on
    the log-odds, almost unpenalised), or {"method": "isotonic", "x", "y"}: the breakpoints of
    a non-decreasing step function, applied by linear interpolation, clipped at the ends.
    With one class only in `y_true` nothing can be fitted: the identity is returned."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {method!r} is not one of {list(CALIBRATION_METHODS)}")
    y, p = _vectors(y_true, y_prob)
    if method == "none" or not 0 < y.sum() < len(y):
        return {"method": "none"}
    if method == "platt":
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(C=1e6, max_iter=1000).fit(_logit(p)[:, None], y)
        return {"method": "platt", "a": float(model.coef_[0, 0]), "b": float(model.intercept_[0])}
    from sklearn.isotonic import IsotonicRegression

    model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
    return {"method": "isotonic", "x": model.X_thresholds_.tolist(), "y": model.y_thresholds_.tolist()}


def apply_calibration(calibrator: dict, y_prob) -> np.ndarray:
    """Calibrated probabilities (N,) float64 from a `fit_calibration` dict."""
    p = np.asarray(y_prob, dtype=np.float64).reshape(-1)
    method = calibrator.get("method", "none")
    if method == "none":
        return p
    if method == "platt":
        return 1.0 / (1.0 + np.exp(-(calibrator["a"] * _logit(p) + calibrator["b"])))
    if method == "isotonic":
        return np.interp(p, calibrator["x"], calibrator["y"])
    raise ValueError(f"calibrator method {method!r} is not one of {list(CALIBRATION_METHODS)}")


def calibration_summary(y_true, y_prob, n_bins: int = N_BINS) -> dict:
    """{"brier", "ece", "reliability": reliability_bins(...)} of one label."""
    return {"brier": brier_score(y_true, y_prob), "ece": expected_calibration_error(y_true, y_prob, n_bins),
            "reliability": reliability_bins(y_true, y_prob, n_bins)}


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, LOGIT_EPS, 1 - LOGIT_EPS)
    return np.log(p) - np.log1p(-p)


def _vectors(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(y_prob, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but y_prob has {p.size}")
    return y, p


def calibration_effect(val_true, val_prob, test_true, test_prob, method: str,
                       labels: Sequence[str]) -> dict[str, dict]:
    """Fit `method` per label on validation (N_val, L) and report its effect on test (N, L).

    Out: {label: {"method", "calibrator" (fit_calibration's dict), "brier", "ece", "roc_auc"}}
    for the recalibrated test probabilities, to sit beside the raw brier/ece/roc_auc in
    metrics.json as `calibrated`. Rows with unknown truth (NaN) are skipped per label.
    """
    from sklearn.metrics import roc_auc_score

    out = {}
    for j, label in enumerate(labels):
        vt, vp = np.asarray(val_true, float)[:, j], np.asarray(val_prob, float)[:, j]
        tt, tp = np.asarray(test_true, float)[:, j], np.asarray(test_prob, float)[:, j]
        vk, tk = np.isfinite(vt), np.isfinite(tt)
        calibrator = fit_calibration(vt[vk], vp[vk], method)
        after = apply_calibration(calibrator, tp[tk])
        y = tt[tk]
        out[label] = {"method": calibrator["method"], "calibrator": calibrator,
                      "brier": brier_score(y, after), "ece": expected_calibration_error(y, after),
                      "roc_auc": float(roc_auc_score(y, after)) if 0 < y.sum() < len(y) else None}
    return out
