"""Confidence intervals: DeLong's for ROC AUC, and a bootstrap that resamples patients.

In: one label's `y_true` 0/1 (N,) and `y_prob` (N,), and for the bootstrap a group id per row
(the patient: slices of one patient are correlated, so resampling slices would understate the
width), a threshold, a replicate count and a seed. Out: [low, high] lists of floats (None where
a metric is undefined in too many replicates) and curve bands, ready for JSON. Pure functions.

How the bootstrap stays fast: drawing patients with replacement is the same as giving each row
a weight, the number of times its patient was drawn. Rows are sorted by score once; each
replicate's ROC and precision-recall curves are then weighted cumulative sums over that one
order, done for a block of replicates at a time as a matrix. A replicate's weighted metrics are
exactly those scikit-learn computes on the explicitly resampled rows (tested).

Percentile intervals (the 2.5th and 97.5th percentiles of the replicates for 95%). Replicates
in which a metric is undefined (no positive or no negative patient drawn) are left out of that
metric's interval; when more than half are, the interval is None.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm, rankdata

# Replicates processed per block: a (block, N) float64 matrix, 200 x 10,000 slices = 16 MB.
BLOCK = 200
# Below this fraction of replicates with a defined value, a percentile interval means little.
MIN_DEFINED = 0.5
# Operating points reported: sensitivity at these specificities and specificity at these
# sensitivities (the values papers in this field quote).
OPERATING_LEVELS = (0.90, 0.95)


def delong_ci(y_true, y_prob, confidence: float = 0.95) -> dict:
    """ROC AUC with DeLong's variance (DeLong, DeLong & Clarke-Pearson 1988).

    With m positives X and n negatives Y, psi(x, y) = 1 if x > y, 1/2 if x = y, else 0;
    AUC = mean psi; V10_i = mean_j psi(X_i, Y_j), V01_j = mean_i psi(X_i, Y_j);
    Var = var(V10) / m + var(V01) / n (sample variances, ddof 1). The interval is
    AUC -/+ z * sqrt(Var), clipped to [0, 1]. Out: {"auc", "variance", "ci": [low, high]};
    all None when one class is absent. The components come from midranks (Sun & Xu 2014),
    so this is O(N log N).
    """
    y_true = np.asarray(y_true).reshape(-1).astype(int)
    y_prob = np.asarray(y_prob, dtype=np.float64).reshape(-1)
    pos, neg = y_prob[y_true == 1], y_prob[y_true == 0]
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        return {"auc": None, "variance": None, "ci": None}
    # Midrank of a positive among all scores minus its midrank among positives = how many
    # negatives it beats (ties count one half): V10 times n.
    all_ranks = rankdata(np.concatenate([pos, neg]))
    v10 = (all_ranks[:m] - rankdata(pos)) / n
    v01 = 1.0 - (all_ranks[m:] - rankdata(neg)) / m
    auc = float(v10.mean())
    s10 = float(np.var(v10, ddof=1)) if m > 1 else 0.0
    s01 = float(np.var(v01, ddof=1)) if n > 1 else 0.0
    variance = s10 / m + s01 / n
    half = float(norm.ppf(0.5 + confidence / 2)) * np.sqrt(variance)
    return {"auc": auc, "variance": float(variance),
            "ci": [float(max(0.0, auc - half)), float(min(1.0, auc + half))]}


def bootstrap_weights(groups, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, N) float64 weights: each replicate draws the distinct groups (patients) with
    replacement, as many as there are, and every row gets the count of its group's draws."""
    _, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    n_groups = int(inverse.max()) + 1 if len(inverse) else 0
    rng = np.random.default_rng(np.random.SeedSequence(int(seed)))
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / max(n_groups, 1)), size=int(n_boot))
    return counts[:, inverse].astype(np.float64)


def weighted_metrics(y_true, y_prob, weights, threshold: float) -> dict[str, np.ndarray]:
    """Metrics of one label under row weights (B, N) (a bootstrap replicate per row of weights).

    Out: {name: (B,) array}, NaN where undefined: roc_auc and pr_auc (average precision, the
    scikit-learn definition), sensitivity, specificity, f1 at `threshold` (positive when
    prob >= threshold), and for each level L of OPERATING_LEVELS
    `sensitivity_at_specificity_L` and `specificity_at_sensitivity_L` (the best value on the
    ROC curve whose other coordinate reaches L). Integer weights give exactly the metrics of
    the rows repeated that many times.
    """
    y_true = np.asarray(y_true).reshape(-1).astype(bool)
    y_prob = np.asarray(y_prob, dtype=np.float64).reshape(-1)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order = np.argsort(-y_prob, kind="mergesort")
    score, truth, w = y_prob[order], y_true[order], w[:, order]
    # Last row of each run of equal scores: the curves only have points between distinct scores.
    ends = np.flatnonzero(np.r_[score[1:] != score[:-1], True])
    tp = np.cumsum(w * truth, axis=1)[:, ends]
    fp = np.cumsum(w * ~truth, axis=1)[:, ends]
    p, n = tp[:, -1], fp[:, -1]
    tp0 = np.concatenate([np.zeros((len(w), 1)), tp], axis=1)
    fp0 = np.concatenate([np.zeros((len(w), 1)), fp], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        defined = (p > 0) & (n > 0)
        pos_in, neg_in = np.diff(tp0, axis=1), np.diff(fp0, axis=1)
        auc = np.sum(neg_in * (tp0[:, :-1] + 0.5 * pos_in), axis=1) / (p * n)
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        ap = np.sum(pos_in * precision, axis=1) / p
        tpr, fpr = tp0 / p[:, None], fp0 / n[:, None]
        out = {"roc_auc": np.where(defined, auc, np.nan), "pr_auc": np.where(defined, ap, np.nan)}
        for level in OPERATING_LEVELS:
            # Tolerance: 0.9 computed as 9/10 in floating point must count as reaching 0.90.
            sens = np.where(1 - fpr >= level - 1e-12, tpr, -np.inf).max(axis=1)
            spec = np.where(tpr >= level - 1e-12, 1 - fpr, -np.inf).max(axis=1)
            out[f"sensitivity_at_specificity_{level:.2f}"] = np.where(defined, sens, np.nan)
            out[f"specificity_at_sensitivity_{level:.2f}"] = np.where(defined, spec, np.nan)
        pred = score >= threshold
        tp_t = np.sum(w * (truth & pred), axis=1)
        fp_t = np.sum(w * (~truth & pred), axis=1)
        fn_t = p - tp_t
        tn_t = n - fp_t
        out["sensitivity"] = np.where(p > 0, tp_t / p, np.nan)
        out["specificity"] = np.where(n > 0, tn_t / n, np.nan)
        # F1 = 2TP / (2TP + FP + FN); 0 when there is nothing to find and nothing was called.
        den = 2 * tp_t + fp_t + fn_t
        out["f1"] = np.where(p > 0, np.where(den > 0, 2 * tp_t / den, 0.0), np.nan)
    return out


def bootstrap_ci(y_true, y_prob, groups, threshold: float, n_boot: int = 2000, seed: int = 0,
                 confidence: float = 0.95, weights: np.ndarray | None = None) -> dict:
    """Percentile intervals over patient-resampling replicates for one label.

    Out: {metric: [low, high] or None} for every metric of `weighted_metrics`. `weights`
    (from `bootstrap_weights`) lets several labels share the same replicates; without it they
    are drawn here from `groups`, `n_boot` and `seed`.
    """
    if weights is None:
        weights = bootstrap_weights(groups, n_boot, seed)
    if len(weights) == 0:  # evaluate.bootstrap: 0 turns the intervals off
        return {name: None for name in metric_names()}
    values = _replicate_values(y_true, y_prob, weights, threshold)
    return {name: percentile_interval(v, confidence) for name, v in values.items()}


def metric_names() -> list[str]:
    """Names of the metrics `weighted_metrics` returns, in its order."""
    names = ["roc_auc", "pr_auc"]
    for level in OPERATING_LEVELS:
        names += [f"sensitivity_at_specificity_{level:.2f}", f"specificity_at_sensitivity_{level:.2f}"]
    return names + ["sensitivity", "specificity", "f1"]


def percentile_interval(values: np.ndarray, confidence: float = 0.95) -> list[float] | None:
    """[low, high] percentiles of the finite `values`; None when fewer than MIN_DEFINED of
    them are finite (the metric was undefined in most replicates)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if len(values) == 0 or len(finite) < MIN_DEFINED * len(values):
        return None
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return [float(low), float(high)]


def roc_band(y_true, y_prob, weights: np.ndarray, grid: np.ndarray,
             confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise band of the ROC curve: (low, high) true positive rate at each false positive
    rate of `grid` over the replicates (the curve read as a step function, its upper value)."""
    curves = _curves(y_true, y_prob, weights)
    tprs = np.stack([np.interp(grid, fpr, tpr) for fpr, tpr, _ in curves if fpr is not None])
    return _band(tprs, confidence)


def pr_band(y_true, y_prob, weights: np.ndarray, grid: np.ndarray,
            confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise band of the precision-recall curve: (low, high) precision at each recall of
    `grid` (the best precision at that recall or higher, the usual interpolated curve)."""
    rows = []
    for fpr, tpr, precision in _curves(y_true, y_prob, weights):
        if fpr is None:
            continue
        # Interpolated precision: max precision at any recall >= r.
        best = np.maximum.accumulate(precision[::-1])[::-1]
        idx = np.searchsorted(tpr, grid, side="left")
        rows.append(np.where(idx < len(best), best[np.minimum(idx, len(best) - 1)], 0.0))
    return _band(np.stack(rows), confidence)


def _band(rows: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    tail = 100 * (1 - confidence) / 2
    return np.percentile(rows, tail, axis=0), np.percentile(rows, 100 - tail, axis=0)


def _curves(y_true, y_prob, weights):
    """Per replicate (fpr, tpr, precision) at the distinct scores; (None, None, None) where a
    class is missing."""
    y_true = np.asarray(y_true).reshape(-1).astype(bool)
    y_prob = np.asarray(y_prob, dtype=np.float64).reshape(-1)
    order = np.argsort(-y_prob, kind="mergesort")
    score, truth = y_prob[order], y_true[order]
    ends = np.flatnonzero(np.r_[score[1:] != score[:-1], True])
    for start in range(0, len(weights), BLOCK):
        w = np.asarray(weights[start:start + BLOCK], dtype=np.float64)[:, order]
        tp = np.cumsum(w * truth, axis=1)[:, ends]
        fp = np.cumsum(w * ~truth, axis=1)[:, ends]
        for t, f in zip(tp, fp):
            if t[-1] <= 0 or f[-1] <= 0:
                yield None, None, None
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                precision = np.where(t + f > 0, t / (t + f), 1.0)
            yield np.r_[0.0, f / f[-1]], np.r_[0.0, t / t[-1]], np.r_[1.0, precision]


def _replicate_values(y_true, y_prob, weights: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    parts = [weighted_metrics(y_true, y_prob, weights[s:s + BLOCK], threshold)
             for s in range(0, len(weights), BLOCK)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
