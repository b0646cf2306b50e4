"""report.html: one self-contained page (every image embedded as base64 PNG, inline CSS, no
script, no external reference), so it opens offline and can be mailed or archived as one file.

In: one or more `Level`s (studies, slices, or the test images of a run: truth, probabilities,
patient groups and the metrics dict of ich.evaluation.metrics.evaluate_table / evaluate_all),
a model card {name: value}, Grad-CAM examples (PNG bytes and captions), and notes. Out: the
HTML text (`render_html`) or the file (`write_html`).

Sections, each an element with a fixed id (tests look for them): disclaimer, summary
(the test set and its prevalence), comparison (only with `Report.comparison`: ROC AUC of
the image stages alone beside the sequence stage's, per slice and per study), results (table
with 95% CIs per level), operating-points,
roc (curves with bootstrap bands), pr, calibration (reliability diagrams, Brier, ECE),
confusion (matrices at the chosen thresholds), studies (study-level results), gradcam,
model-card, notes.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from ich.constants import LABELS
from ich.evaluation.figures import panel_grid
from ich.io import atomic_write_text

SECTIONS = ("disclaimer", "summary", "results", "operating-points", "roc", "pr", "calibration",
            "confusion", "studies", "gradcam", "model-card", "notes")
DISCLAIMER = ("Research use only. This model is not a medical device and must not be used for "
              "diagnosis or treatment decisions.")
# Band resolution: the curves' x axis is sampled at this many points.
GRID_POINTS = 101
# Bands use at most this many of the bootstrap's replicates (the same seed, the first ones):
# a band's percentiles settle long before the 2000 an interval of a single number needs.
BAND_REPLICATES = 500
DPI = 90
COLORS = dict(zip(LABELS, ("#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")))
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1180px;margin:24px auto;
padding:0 16px;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:2em}
table{border-collapse:collapse;margin:8px 0 16px;font-size:0.9em}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
.disclaimer{background:#fff3cd;border:1px solid #e0c36a;padding:10px 14px;font-weight:600}
img{max-width:100%;height:auto}.muted{color:#666}.examples{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:260px}figure img{width:256px;height:256px;image-rendering:pixelated}
figcaption{font-size:0.8em;font-family:monospace}table.card td{text-align:left}
"""


@dataclass
class Level:
    """One level of results: `y_true` (N, len(labels)) float, NaN = unknown; `y_prob` likewise;
    `groups` the bootstrap unit per row; `metrics` evaluate_table's dict for these rows."""

    name: str
    labels: Sequence[str]
    y_true: np.ndarray
    y_prob: np.ndarray
    groups: np.ndarray
    metrics: dict
    bootstrap: int = 0
    seed: int = 0


@dataclass
class Example:
    """A Grad-CAM overlay to show: PNG bytes and a caption."""

    png: bytes
    caption: str


@dataclass
class Report:
    """Everything the page shows."""

    title: str
    levels: list[Level]
    model_card: Mapping[str, object]
    examples: list[Example] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    test_set: str = ""
    comparison: Mapping[str, dict] = field(default_factory=dict)  # column name -> metrics, side by side
    study_source: str = "the highest over its slices"              # how a study's probability is made


def write_html(path: Path, report: Report) -> Path:
    """Render `report` and write it atomically to `path`."""
    return atomic_write_text(Path(path), render_html(report))


def render_html(report: Report) -> str:
    """The whole page as a string (see the module docstring for its sections)."""
    parts = [f"<h1>{_e(report.title)}</h1>",
             f'<p class="muted">Generated {dt.datetime.now().isoformat(timespec="seconds")}</p>',
             f'<section id="disclaimer"><p class="disclaimer">{_e(DISCLAIMER)}</p></section>',
             _summary(report)]
    if report.comparison:
        parts.append(_comparison(report))
    parts.append('<section id="results"><h2>Results with 95% confidence intervals</h2>'
                 + "".join(_results_table(level) for level in report.levels) + _ci_note(report) + "</section>")
    parts.append('<section id="operating-points"><h2>Operating points</h2>'
                 + "".join(_operating_table(level) for level in report.levels) + "</section>")
    parts.append('<section id="roc"><h2>ROC curves</h2><p>Shaded: pointwise 95% band of the '
                 'patient bootstrap; dot: the chosen threshold.</p>'
                 + "".join(_img(plot_curves(level, "roc"), f"ROC, {level.name}") for level in report.levels)
                 + "</section>")
    parts.append('<section id="pr"><h2>Precision-recall curves</h2><p>Dashed: the prevalence (a '
                 'no-skill model); shaded: pointwise 95% bootstrap band.</p>'
                 + "".join(_img(plot_curves(level, "pr"), f"PR, {level.name}") for level in report.levels)
                 + "</section>")
    parts.append('<section id="calibration"><h2>Calibration</h2>'
                 + "".join(_calibration(level) for level in report.levels) + "</section>")
    parts.append('<section id="confusion"><h2>Confusion matrices at the chosen thresholds</h2>'
                 + "".join(_img(plot_confusion(level), f"confusion, {level.name}") for level in report.levels)
                 + "</section>")
    parts.append(_studies(report))
    parts.append(_gradcam(report))
    parts.append('<section id="model-card"><h2>Model card</h2>'
                 + _table(["item", "value"], [[k, v] for k, v in report.model_card.items()], cls="card")
                 + "</section>")
    parts.append('<section id="notes"><h2>Notes</h2><ul>'
                 + "".join(f"<li>{_e(n)}</li>" for n in report.notes) + "</ul></section>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{_e(report.title)}</title><style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


# ---- sections ----------------------------------------------------------------------------

def _summary(report: Report) -> str:
    rows = []
    for level in report.levels:
        m = level.metrics
        for label in level.labels:
            lm = m["labels"][label]
            rows.append([level.name, label, lm["n"], lm["support"], _pct(lm["prevalence"])])
    text = f"<p>{_e(report.test_set)}</p>" if report.test_set else ""
    return ('<section id="summary"><h2>Test set and prevalence</h2>' + text
            + _table(["level", "label", "n", "positives", "prevalence"], rows) + "</section>")


def _comparison(report: Report) -> str:
    """ROC AUC (95% interval) per label of every compared level, in one table."""
    names = list(report.comparison)
    rows = [[label] + [_ci(report.comparison[name]["labels"][label], "roc_auc")
                       if label in report.comparison[name]["labels"] else "" for name in names]
            for label in report.comparison[names[0]]["labels"]]
    rows.append(["macro"] + [_f(report.comparison[name]["overall"].get("macro_roc_auc")) for name in names])
    return ('<section id="comparison"><h2>Stages compared (ROC AUC, 95% interval)</h2>'
            "<p>The same test split scored by the image stages alone (one input per slice, its "
            "neighbouring slices included when the input description has them) and after the "
            "sequence stage, per slice and per study.</p>"
            + _table(["label", *names], rows) + "</section>")


def _results_table(level: Level) -> str:
    rows = []
    for label in level.labels:
        m = level.metrics["labels"][label]
        rows.append([label, _ci(m, "roc_auc"), _ci(m, "pr_auc"), _ci(m, "sensitivity"),
                     _ci(m, "specificity"), _ci(m, "f1"), _f(m["threshold"]),
                     _f(m["brier"]), _f(m["ece"]), m["support"], m["n"]])
    o = level.metrics["overall"]
    extra = (f'<p>macro ROC AUC {_f(o["macro_roc_auc"])}, macro PR AUC {_f(o["macro_pr_auc"])}'
             + (f', RSNA weighted log loss {_f(o["rsna_weighted_log_loss"], 4)}'
                if o.get("rsna_weighted_log_loss") is not None else "") + "</p>")
    return (f"<h3>{_e(level.name)}</h3>"
            + _table(["label", "ROC AUC", "PR AUC", "sensitivity", "specificity", "F1", "threshold",
                      "Brier", "ECE", "positives", "n"], rows) + extra)


def _ci_note(report: Report) -> str:
    level = report.levels[0] if report.levels else None
    b = level.metrics["overall"].get("bootstrap", {}) if level else {}
    return (f'<p class="muted">Intervals: percentile bootstrap, {b.get("replicates", 0)} replicates '
            f'resampling {b.get("groups", "?")} patients with replacement (seed {b.get("seed", "?")}), '
            "so correlated slices of one patient move together. Sensitivity, specificity and F1 at "
            "the thresholds chosen on validation. DeLong's ROC AUC interval (rows independent) is in "
            "metrics.json as roc_auc_ci_delong.</p>")


def _operating_table(level: Level) -> str:
    rows = []
    for label in level.labels:
        m = level.metrics["labels"][label]
        rows.append([label] + [_ci(m, f"{kind}_{v}") + f' <span class="muted">(t {_f(m.get(t_key + v))})</span>'
                               for kind, t_key in (("sensitivity_at_specificity", "threshold_at_specificity_"),
                                                   ("specificity_at_sensitivity", "threshold_at_sensitivity_"))
                               for v in ("0.90", "0.95")])
    return (f"<h3>{_e(level.name)}</h3>" + _table(
        ["label", "sens. at spec. 0.90", "sens. at spec. 0.95", "spec. at sens. 0.90",
         "spec. at sens. 0.95"], rows, raw=True)
        + '<p class="muted">Read off this set\'s own ROC curve (t = threshold reaching it).</p>')


def _calibration(level: Level) -> str:
    rows = []
    for label in level.labels:
        m = level.metrics["labels"][label]
        row = [label, _f(m["brier"]), _f(m["ece"])]
        cal = m.get("calibrated")
        row += [cal["method"], _f(cal["brier"]), _f(cal["ece"]), _f(cal["roc_auc"])] if cal else ["none", "", "", ""]
        rows.append(row)
    return (f"<h3>{_e(level.name)}</h3>" + _img(plot_reliability(level), f"reliability, {level.name}")
            + _table(["label", "Brier", "ECE (10 bins)", "recalibration (fit on val)", "Brier after",
                      "ECE after", "ROC AUC after"], rows))


def _studies(report: Report) -> str:
    studies = [lv for lv in report.levels if lv.name.lower().startswith("stud")]
    if not studies:
        body = "<p>No study-level results.</p>"
    else:
        level = studies[0]
        rows = [[label, _ci(level.metrics["labels"][label], "roc_auc"),
                 _ci(level.metrics["labels"][label], "sensitivity"),
                 _ci(level.metrics["labels"][label], "specificity"),
                 level.metrics["labels"][label]["support"], level.metrics["labels"][label]["n"]]
                for label in level.labels]
        body = (f"<p>A study's probability per label is {_e(report.study_source)}.</p>"
                + _table(["label", "ROC AUC", "sensitivity", "specificity", "positive studies", "studies"], rows))
    return f'<section id="studies"><h2>Study-level results</h2>{body}</section>'


def _gradcam(report: Report) -> str:
    if not report.examples:
        body = "<p>No Grad-CAM examples were made for this report.</p>"
    else:
        body = ('<p>The blood window in grey with the Grad-CAM heatmap on top (red = most '
                'evidence) for the label in each caption.</p><div class="examples">'
                + "".join(f'<figure><img alt="{_e(x.caption)}" src="data:image/png;base64,'
                          f'{base64.b64encode(x.png).decode()}"><figcaption>{_e(x.caption)}</figcaption></figure>'
                          for x in report.examples) + "</div>")
    return f'<section id="gradcam"><h2>Grad-CAM examples</h2>{body}</section>'


# ---- figures -------------------------------------------------------------------------------

def plot_curves(level: Level, kind: str) -> Figure:
    """ROC (kind "roc") or precision-recall ("pr") per label with bootstrap bands."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    from ich.evaluation.intervals import bootstrap_weights, pr_band, roc_band

    labels = list(level.labels)
    fig, axes = _grid(len(labels), f"{'ROC' if kind == 'roc' else 'Precision-recall'} curves, {level.name}")
    grid = np.linspace(0, 1, GRID_POINTS)
    n_band = min(level.bootstrap, BAND_REPLICATES)
    for ax, label in zip(axes, labels):
        j = labels.index(label)
        known = np.isfinite(level.y_true[:, j])
        y, p = level.y_true[known, j].astype(int), level.y_prob[known, j]
        m = level.metrics["labels"][label]
        ax.set_title(label, fontsize=11)
        if not 0 < y.sum() < len(y):
            ax.text(0.5, 0.5, "one class only:\nno curve", ha="center", va="center", transform=ax.transAxes)
            continue
        weights = bootstrap_weights(level.groups[known], n_band, level.seed) if n_band else None
        if kind == "roc":
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot([0, 1], [0, 1], color="0.75", lw=1, ls="--")
            if weights is not None:
                low, high = roc_band(y, p, weights, grid)
                ax.fill_between(grid, low, high, color=COLORS[label], alpha=0.18, lw=0)
            ax.plot(fpr, tpr, color=COLORS[label], lw=2, label=f"AUC {_f(m['roc_auc'])} {_bracket(m.get('roc_auc_ci'))}")
            ax.plot(1 - m["specificity"], m["recall"], "o", color=COLORS[label], mfc="white", mew=2)
            ax.set_xlabel("1 - specificity")
            ax.set_ylabel("sensitivity")
        else:
            precision, recall, _ = precision_recall_curve(y, p)
            if weights is not None:
                low, high = pr_band(y, p, weights, grid)
                ax.fill_between(grid, low, high, color=COLORS[label], alpha=0.18, lw=0)
            ax.step(recall, precision, where="post", color=COLORS[label], lw=2,
                    label=f"AP {_f(m['pr_auc'])} {_bracket(m.get('pr_auc_ci'))}")
            ax.axhline(y.mean(), color="0.6", lw=1, ls="--")
            ax.set_xlabel("recall")
            ax.set_ylabel("precision")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=8, frameon=False)
    return fig


def plot_reliability(level: Level) -> Figure:
    """Reliability diagram per label: fraction positive against mean probability per bin,
    marker area by bin count, the diagonal = perfect calibration."""
    labels = list(level.labels)
    fig, axes = _grid(len(labels), f"Reliability, {level.name}")
    for ax, label in zip(axes, labels):
        bins = level.metrics["labels"][label]["reliability"]
        pts = [(mp, fp, c) for mp, fp, c in zip(bins["mean_prob"], bins["fraction_positive"], bins["count"]) if c]
        ax.plot([0, 1], [0, 1], color="0.75", lw=1, ls="--")
        if pts:
            mp, fp, c = map(np.array, zip(*pts))
            ax.plot(mp, fp, "-", color=COLORS[label], lw=1.5)
            ax.scatter(mp, fp, s=20 + 180 * c / c.max(), color=COLORS[label], zorder=3)
        m = level.metrics["labels"][label]
        ax.set_title(f"{label}: ECE {_f(m['ece'])}, Brier {_f(m['brier'])}", fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("fraction positive")
        ax.grid(alpha=0.3)
    return fig


def plot_confusion(level: Level) -> Figure:
    """2 x 2 confusion matrix per label at its threshold (counts, rows = truth)."""
    labels = list(level.labels)
    fig, axes = _grid(len(labels), f"Confusion matrices, {level.name}", size=2.6)
    for ax, label in zip(axes, labels):
        c = level.metrics["labels"][label]["confusion"]
        matrix = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1, matrix.max()))
        for (r, k), v in np.ndenumerate(matrix):
            ax.text(k, r, str(v), ha="center", va="center",
                    color="white" if v > matrix.max() / 2 else "black", fontsize=12)
        ax.set_xticks([0, 1], ["pred 0", "pred 1"])
        ax.set_yticks([0, 1], ["true 0", "true 1"])
        ax.set_title(f"{label} (t {_f(level.metrics['labels'][label]['threshold'])})", fontsize=10)
    return fig


def png_bytes(fig: Figure) -> bytes:
    """A figure as PNG bytes."""
    buf = io.BytesIO()
    # No bbox_inches="tight": the fixed layout already fits, and the extra pass doubles the time.
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


# ---- helpers -------------------------------------------------------------------------------

def _grid(n: int, title: str, size: float = 3.6):
    cols = min(3, max(1, n))
    rows = -(-n // cols)
    # `size` is the panel's share of the figure, as it was under the constrained layout.
    fig, axes = panel_grid(rows, cols, (size - 0.8, size - 0.9), title)
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig, axes[:n]


def _img(fig: Figure, alt: str) -> str:
    return f'<p><img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png_bytes(fig)).decode()}"></p>'


def _table(headers, rows, raw: bool = False, cls: str = "") -> str:
    cell = (lambda v: str(v)) if raw else (lambda v: _e(str(v)))
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _ci(m: Mapping, key: str) -> str:
    return f"{_f(m.get(key))} {_bracket(m.get(key + '_ci'))}".strip()


def _bracket(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def _f(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _e(text) -> str:
    return html.escape(str(text), quote=True)
