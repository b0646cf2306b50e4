"""Operating points of one label: sensitivity at a fixed specificity and the reverse.

In: `y_true` 0/1 (N,) and `y_prob` (N,). Out: a flat dict of floats (None when one class is
absent), keys `sensitivity_at_specificity_0.90` with `threshold_at_specificity_0.90` (the
highest threshold reaching it, so the fewest false alarms), and `specificity_at_sensitivity_0.90`
with `threshold_at_sensitivity_0.90`, for each level of OPERATING_LEVELS. Pure functions.

These points are read off the test set's own ROC curve, so they describe what the model can
do, not what a threshold fixed in advance would give; the metrics at the thresholds chosen on
validation (metrics.label_metrics) are the honest prospective numbers, and both are reported.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve

from ich.evaluation.intervals import OPERATING_LEVELS

# 0.9 computed as 9/10 in floating point must count as reaching 0.90.
TOLERANCE = 1e-12


def operating_points(y_true, y_prob, levels=OPERATING_LEVELS) -> dict[str, float | None]:
    """Sensitivity at specificity >= L and specificity at sensitivity >= L, with thresholds.

    A prediction is positive when prob >= threshold (the ROC curve's convention). Among the
    curve's points whose specificity reaches L, the one with the highest sensitivity is taken
    (and vice versa); its threshold is reported, +inf mapped to None (nothing called positive).
    """
    y_true = np.asarray(y_true).reshape(-1).astype(int)
    y_prob = np.asarray(y_prob, dtype=np.float64).reshape(-1)
    out: dict[str, float | None] = {}
    both = 0 < y_true.sum() < len(y_true)
    if both:
        fpr, tpr, thresholds = roc_curve(y_true, y_prob, drop_intermediate=False)
    for level in levels:
        key = f"{level:.2f}"
        if not both:
            out.update({f"sensitivity_at_specificity_{key}": None, f"threshold_at_specificity_{key}": None,
                        f"specificity_at_sensitivity_{key}": None, f"threshold_at_sensitivity_{key}": None})
            continue
        ok = np.flatnonzero(1 - fpr >= level - TOLERANCE)
        # roc_curve orders points by falling threshold: argmax takes the first, highest one.
        i = ok[np.argmax(tpr[ok])]
        out[f"sensitivity_at_specificity_{key}"] = float(tpr[i])
        out[f"threshold_at_specificity_{key}"] = _finite(thresholds[i])
        ok = np.flatnonzero(tpr >= level - TOLERANCE)
        i = ok[np.argmax((1 - fpr)[ok])]
        out[f"specificity_at_sensitivity_{key}"] = float(1 - fpr[i])
        out[f"threshold_at_sensitivity_{key}"] = _finite(thresholds[i])
    return out


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
