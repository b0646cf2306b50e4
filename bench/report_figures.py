"""What the evaluation reports' figures cost: the fixed layout against matplotlib's constrained one.

    .venv/bin/python bench/report_figures.py [--rounds 3] [--rows 144] [--bootstrap 200]

Builds one level of synthetic test results (6 labels, `--rows` slices in groups of 12 patients'
worth, `--bootstrap` replicates for the bands) and draws report.html's four grids (ROC, PR,
reliability, confusion: ich.evaluation.html) and report.md's three (ROC, PR, confusion:
ich.evaluation.report) to PNG bytes, as `ich evaluate` does. The baseline is the same figures
with matplotlib's constrained layout switched on (`fig.set_layout_engine("constrained")`) and,
for report.md's, cropped with bbox_inches="tight": how they were drawn before
ich.evaluation.figures. Rounds alternate which side goes first; the median per side is printed
with the ratio. Only drawing and PNG encoding are timed (the curves and bands are computed
before the clock starts, identically for both sides).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _level(rows: int, bootstrap: int):
    from ich.constants import LABELS
    from ich.evaluation.html import Level
    from ich.evaluation.metrics import evaluate_table

    rng = np.random.default_rng(0)
    y = (rng.random((rows, 6)) < 0.3).astype(float)
    y[:, 0] = y[:, 1:].max(axis=1)
    p = np.clip(0.4 * y + 0.6 * rng.random((rows, 6)), 0, 1)
    groups = np.arange(rows) // 12
    metrics = evaluate_table(y, p, {label: 0.5 for label in LABELS}, groups, bootstrap=bootstrap, seed=0)
    return Level("slices", list(LABELS), y, p, groups, metrics, bootstrap, 0)


def figures(level) -> list[tuple[object, bool]]:
    """(figure, cropped as report.md's save_png crops) for the seven grids of one level."""
    from ich.evaluation import html, report

    return ([(html.plot_curves(level, "roc"), False), (html.plot_curves(level, "pr"), False),
             (html.plot_reliability(level), False), (html.plot_confusion(level), False)]
            + [(fig, True) for fig in (report.plot_roc(level.y_true, level.y_prob, level.metrics),
                                       report.plot_pr(level.y_true, level.y_prob, level.metrics),
                                       report.plot_confusion(level.metrics))])


def draw_all(figs, constrained: bool) -> float:
    """Seconds to save every figure as PNG, with the fixed layout or the constrained baseline."""
    from ich.evaluation.html import DPI

    start = time.perf_counter()
    for fig, cropped in figs:
        buf = io.BytesIO()
        if constrained:
            fig.set_layout_engine("constrained")
            fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight" if cropped else None)
            fig.set_layout_engine("none")
        else:
            fig.savefig(buf, format="png", dpi=DPI)
    return time.perf_counter() - start


def main(argv=None) -> int:
    """Time both layouts over interleaved rounds and print the medians and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=144, help="test slices in the level")
    parser.add_argument("--bootstrap", type=int, default=200, help="replicates behind the bands")
    args = parser.parse_args(argv)
    from machine import describe  # bench/machine.py, beside this script

    print(describe(), flush=True)
    level = _level(args.rows, args.bootstrap)
    times = {"fixed": [], "constrained": []}
    n = 0
    for r in range(args.rounds):
        order = ["fixed", "constrained"] if r % 2 == 0 else ["constrained", "fixed"]
        for side in order:
            # Fresh figures each time: a drawn figure caches text extents.
            figs = figures(level)
            n = len(figs)
            times[side].append(draw_all(figs, side == "constrained"))
    fixed, constrained = (statistics.median(times[k]) for k in ("fixed", "constrained"))
    print(f"{n} figures ({args.rows} rows, 6 labels), median of {args.rounds} rounds: fixed layout "
          f"{fixed:.2f} s, constrained layout {constrained:.2f} s: {constrained / fixed:.2f}x faster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
