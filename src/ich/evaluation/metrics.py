"""Classification metrics of the cascade: per-label thresholds, per-label metrics, the RSNA score,
and (with `evaluate_all(..., groups=, bootstrap=)` or `evaluate_table`) what a paper reports:
95% intervals, operating points and calibration.

In: `y_true` 0/1 and `y_prob` probabilities, one column per label in LABELS order (or one
label's vectors). Out: plain floats and dicts of floats/ints/None, ready for JSON. Pure
functions on arrays; nothing here reads or writes files.

Intervals (ich.evaluation.intervals): `<metric>_ci: [low, high]` beside each value is the
percentile interval of a bootstrap that resamples patients (`groups`), seeded, the same
replicates for every label; `roc_auc_ci_delong` is DeLong's interval, which treats rows as
independent (right for one study per patient, too narrow for slices of one patient).

Conventions (the same as scikit-learn's, so the numbers agree with it):
- A prediction is positive when `prob >= threshold`.
- A ratio whose denominator is zero (precision with no predicted positive, recall with no true
  positive, specificity with no true negative) is 0.0, like sklearn's `zero_division=0`.
- ROC AUC and PR AUC are undefined when only one class is present; they are None (null in
  JSON) then, never NaN, and macro averages skip them.
"""

from __future__ import annotations

import logging
from typing import Mapping

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from ich.constants import LABELS

log = logging.getLogger("ich")

THRESHOLD_METHODS = ("youden", "f1")
# Used where the data cannot pick a threshold (one class only): the neutral point of a sigmoid.
DEFAULT_THRESHOLD = 0.5
# RSNA 2019 competition weights in LABELS order: `any` counts twice, each subtype once.
RSNA_WEIGHTS = np.array([2.0, 1.0, 1.0, 1.0, 1.0, 1.0])
# Probabilities are clipped to [eps, 1 - eps] before the log, as Kaggle's log loss does, so
# one confident mistake costs log(1e15) = 34.5 instead of infinity.
LOG_LOSS_EPS = 1e-15
# Coverage of every interval reported.
CONFIDENCE = 0.95


def choose_threshold(y_true, y_prob, method: str = "youden") -> float:
    """Pick one label's decision threshold from validation data.

    In: `y_true` 0/1 (N,), `y_prob` (N,), `method` "youden" (maximise TPR - FPR over the ROC
    curve's thresholds) or "f1" (maximise F1 over the precision-recall curve's thresholds).
    Out: the threshold, a probability seen in `y_prob` (ties go to the highest threshold).
    With only one class present no threshold separates anything, so DEFAULT_THRESHOLD (0.5)
    is returned and a warning logged.
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold method {method!r} is not one of {list(THRESHOLD_METHODS)}")
    y_true, y_prob = _check_vectors(y_true, y_prob)
    if not _both_classes(y_true):
        log.warning("threshold: only one class in %d validation images; using %.2f",
                    len(y_true), DEFAULT_THRESHOLD)
        return DEFAULT_THRESHOLD
    if method == "youden":
        fpr, tpr, thresholds = roc_curve(y_true, y_prob, drop_intermediate=False)
        # The first ROC threshold is +inf (nothing predicted positive): never a useful choice.
        j = tpr[1:] - fpr[1:]
        return float(thresholds[1:][_first_best(j)])
    precision, recall, thresholds = precision_recall_curve(y_true, y_prob)
    # precision/recall have one more entry than thresholds (the final point recall=0).
    p, r = precision[:-1], recall[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    # thresholds ascend here; reversed, the first best is the highest threshold.
    best = len(f1) - 1 - _first_best(f1[::-1])
    return float(thresholds[best])


def label_metrics(y_true, y_prob, threshold: float) -> dict:
    """Metrics of one label at one threshold.

    In: `y_true` 0/1 (N,), `y_prob` (N,), `threshold`. Out: dict with roc_auc and pr_auc
    (average precision; both None when one class only), accuracy, precision, recall, f1,
    specificity, threshold, confusion {tn, fp, fn, tp} and support (the number of positives).
    """
    y_true, y_prob = _check_vectors(y_true, y_prob)
    both = _both_classes(y_true)
    pred = y_prob >= threshold
    truth = y_true == 1
    tp = int(np.sum(pred & truth))
    fp = int(np.sum(pred & ~truth))
    fn = int(np.sum(~pred & truth))
    tn = int(np.sum(~pred & ~truth))
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "roc_auc": float(roc_auc_score(y_true, y_prob)) if both else None,
        "pr_auc": float(average_precision_score(y_true, y_prob)) if both else None,
        "accuracy": _ratio(tp + tn, len(y_true)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "specificity": _ratio(tn, tn + fp),
        "threshold": float(threshold),
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        "support": tp + fn,
    }


def rsna_weighted_log_loss(y_true, y_prob) -> float:
    """The RSNA 2019 Intracranial Hemorrhage Detection competition metric.

    In: `y_true` 0/1 and `y_prob` of shape (N, 6) in LABELS order (any first). Out: the
    weighted multi-label log loss: each (image, label) pair has the binary log loss
    L_ij = -w_j [y_ij log p_ij + (1 - y_ij) log(1 - p_ij)], with w = 2 for `any` and 1 for each
    subtype, and the score is sum_ij L_ij / sum_ij w_j, i.e. the per-image weighted mean of the
    six losses averaged over images (the same as sklearn's log_loss per column averaged with
    weights 2,1,1,1,1,1). Probabilities are clipped to [1e-15, 1 - 1e-15] first.
    """
    y_true, y_prob = _check_matrix(y_true, y_prob)
    if len(y_true) == 0:
        raise ValueError("rsna_weighted_log_loss: no images")
    p = np.clip(y_prob, LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
    bce = -(y_true * np.log(p) + (1 - y_true) * np.log(1 - p))
    return float(np.sum(bce * RSNA_WEIGHTS) / (len(y_true) * RSNA_WEIGHTS.sum()))


def evaluate_all(y_true, y_prob, thresholds: Mapping[str, float], *, groups=None,
                 bootstrap: int = 0, seed: int = 0, confidence: float = CONFIDENCE) -> dict:
    """Every metric of the six labels, in the shape metrics.json is written in.

    In: `y_true` 0/1 and `y_prob` (N, 6) in LABELS order; `thresholds` {label: threshold}.
    Out: {"labels": {label: label_metrics(...)}, "overall": {"macro_roc_auc", "macro_pr_auc",
    "macro_f1", "rsna_weighted_log_loss", "n_images"}}. Macro AUCs average the labels whose
    AUC is defined (None when none is).
    With `groups` (a patient id per row) each label also gets `extended_metrics` (operating
    points, calibration, DeLong's AUC interval, prevalence) and, when `bootstrap` > 0, the
    `<metric>_ci` intervals of that many patient-resampling replicates drawn from `seed`;
    overall then records the bootstrap's settings.
    """
    y_true, y_prob = _check_matrix(y_true, y_prob)
    missing = [label for label in LABELS if label not in thresholds]
    if missing:
        raise ValueError(f"evaluate_all: no threshold for {missing}")
    if groups is not None:
        return evaluate_table(y_true, y_prob, thresholds, groups, labels=LABELS,
                              bootstrap=bootstrap, seed=seed, confidence=confidence,
                              count_name="n_images")
    per_label = {label: label_metrics(y_true[:, j], y_prob[:, j], thresholds[label])
                 for j, label in enumerate(LABELS)}
    return {
        "labels": per_label,
        "overall": {
            "macro_roc_auc": _mean_defined(m["roc_auc"] for m in per_label.values()),
            "macro_pr_auc": _mean_defined(m["pr_auc"] for m in per_label.values()),
            "macro_f1": _mean_defined(m["f1"] for m in per_label.values()),
            "rsna_weighted_log_loss": rsna_weighted_log_loss(y_true, y_prob),
            "n_images": int(len(y_true)),
        },
    }


def extended_metrics(y_true, y_prob, threshold: float, weights: np.ndarray | None = None,
                     confidence: float = CONFIDENCE) -> dict:
    """`label_metrics` of one label plus what a paper reports: sensitivity (= recall),
    prevalence and n, the operating points of ich.evaluation.operating, brier, ece and the
    reliability bins of ich.evaluation.calibration, `roc_auc_ci_delong`, and with bootstrap
    `weights` (B, N) from intervals.bootstrap_weights a `<metric>_ci` beside every metric the
    bootstrap covers (None where it is undefined in most replicates)."""
    from ich.evaluation.calibration import calibration_summary
    from ich.evaluation.intervals import bootstrap_ci, delong_ci, metric_names
    from ich.evaluation.operating import operating_points

    y_true, y_prob = _check_vectors(y_true, y_prob)
    out = label_metrics(y_true, y_prob, threshold)
    out["sensitivity"] = out["recall"]
    out["n"] = int(len(y_true))
    out["prevalence"] = float(y_true.mean()) if len(y_true) else None
    out.update(operating_points(y_true, y_prob))
    out.update(calibration_summary(y_true, y_prob))
    out["roc_auc_ci_delong"] = delong_ci(y_true, y_prob, confidence)["ci"]
    if weights is not None and len(weights):
        intervals = bootstrap_ci(y_true, y_prob, None, threshold, weights=weights, confidence=confidence)
    else:
        intervals = {name: None for name in metric_names()}
    for name, interval in intervals.items():
        out[f"{name}_ci"] = interval
    return out


def evaluate_table(y_true, y_prob, thresholds: Mapping[str, float], groups, *,
                   labels=LABELS, bootstrap: int = 0, seed: int = 0,
                   confidence: float = CONFIDENCE, count_name: str = "n") -> dict:
    """`extended_metrics` for each of `labels`, where some truth may be missing.

    In: `y_true` (N, len(labels)) float with NaN where a row has no truth for a label (an
    external table may label only some subtypes, or only some rows), `y_prob` (N, len(labels)),
    `thresholds` {label: t}, `groups` a patient (or study) id per row: the bootstrap's unit.
    Each label is scored on its rows with truth; all labels share the replicates.
    Out: {"labels": {label: ...}, "overall": {macro_roc_auc, macro_pr_auc, macro_f1,
    rsna_weighted_log_loss (only when all six labels are scored, on rows with all six),
    count_name: N, "prevalence": {label: p}, "bootstrap": {"replicates", "seed", "unit",
    "confidence", "groups"}}}.
    """
    from ich.evaluation.intervals import bootstrap_weights

    labels = list(labels)
    y_true = np.asarray(y_true, dtype=np.float64).reshape(len(y_prob), len(labels))
    y_prob = np.asarray(y_prob, dtype=np.float64).reshape(len(y_prob), len(labels))
    groups = np.asarray(groups).astype(str)
    if len(groups) != len(y_prob):
        raise ValueError(f"{len(groups)} group ids for {len(y_prob)} rows")
    weights = bootstrap_weights(groups, bootstrap, seed) if bootstrap > 0 else None
    per_label = {}
    for j, label in enumerate(labels):
        known = np.isfinite(y_true[:, j])
        w = weights[:, known] if weights is not None else None
        per_label[label] = extended_metrics(y_true[known, j].astype(int), y_prob[known, j],
                                            thresholds[label], w, confidence)
    complete = np.isfinite(y_true).all(axis=1)
    log_loss = (rsna_weighted_log_loss(y_true[complete], y_prob[complete])
                if labels == list(LABELS) and complete.any() else None)
    return {
        "labels": per_label,
        "overall": {
            "macro_roc_auc": _mean_defined(m["roc_auc"] for m in per_label.values()),
            "macro_pr_auc": _mean_defined(m["pr_auc"] for m in per_label.values()),
            "macro_f1": _mean_defined(m["f1"] for m in per_label.values()),
            "rsna_weighted_log_loss": log_loss,
            count_name: int(len(y_prob)),
            "prevalence": {label: m["prevalence"] for label, m in per_label.items()},
            "bootstrap": {"replicates": int(bootstrap), "seed": int(seed), "unit": "patient",
                          "confidence": confidence, "groups": int(len(np.unique(groups)))},
        },
    }


def _check_vectors(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).reshape(-1)
    y_prob = np.asarray(y_prob, dtype=np.float64).reshape(-1)
    if y_true.shape != y_prob.shape:
        raise ValueError(f"y_true has {y_true.size} values but y_prob has {y_prob.size}")
    _check_values(y_true, y_prob)
    return y_true.astype(np.int64), y_prob


def _check_matrix(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    expected = (len(y_true), len(LABELS))
    if y_true.shape != expected or y_prob.shape != expected:
        raise ValueError(f"expected y_true and y_prob of shape (N, {len(LABELS)}) in order {LABELS}; "
                         f"got {y_true.shape} and {y_prob.shape}")
    _check_values(y_true, y_prob)
    return y_true.astype(np.int64), y_prob


def _check_values(y_true: np.ndarray, y_prob: np.ndarray) -> None:
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError(f"y_true must hold only 0 and 1; found {np.unique(y_true)[:10]}")
    if not (np.isfinite(y_prob).all() and (y_prob >= 0).all() and (y_prob <= 1).all()):
        raise ValueError("y_prob must hold finite probabilities in [0, 1]")


def _both_classes(y_true: np.ndarray) -> bool:
    return 0 < int(y_true.sum()) < len(y_true)


def _first_best(scores: np.ndarray) -> int:
    # Scores equal up to rounding (2/3 vs 1 - 1/3) count as ties, so the first one wins;
    # callers order scores from the highest threshold down: fewer false alarms on ties.
    return int(np.flatnonzero(scores >= scores.max() - 1e-12)[0])


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def _mean_defined(values) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None

