"""The evaluation report: PNG plots and a markdown page that embeds them.

In: the metrics dict of `ich.evaluation.metrics.evaluate_all`, the test labels and probabilities (N, 6) in
LABELS order, the Keras CSVLogger files of training, a few example images, and counts and
settings to show. Out: out_dir/report.md plus roc.png, pr.png, confusion.png, training.png and
examples.png beside it (the last two only when there is something to draw).

Plots use Matplotlib's object API on the Agg canvas (no pyplot, no display, no global state).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import precision_recall_curve, roc_curve

from ich.constants import LABELS, REPORT_MD
from ich.evaluation.figures import panel_grid
from ich.io import atomic_path, atomic_write_text

ROC_PNG = "roc.png"
PR_PNG = "pr.png"
CONFUSION_PNG = "confusion.png"
TRAINING_PNG = "training.png"
EXAMPLES_PNG = "examples.png"

# Short clinical abbreviations for crowded figure text.
ABBREV = {"any": "ANY", "epidural": "EDH", "intraparenchymal": "IPH", "intraventricular": "IVH",
          "subarachnoid": "SAH", "subdural": "SDH"}
# One colour per label, the same in every figure (matplotlib's tab10, colour-blind safer order).
COLORS = dict(zip(LABELS, ("#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")))
# Context for the RSNA score, quoted in the report only as context (different test set).
RSNA_FIRST_PLACE = 0.04383
DPI = 110
# Training phases in the order `ich train` runs them (history/<stage>_<phase>.csv).
PHASE_ORDER = {"frozen": 0, "finetune": 1}
# Training curves: (train, validation) colours per logged metric; train solid, validation dashed.
CURVE_COLORS = (("#1f77b4", "#ff7f0e"), ("#2ca02c", "#d62728"), ("#9467bd", "#8c564b"))


def write_report(out_dir: Path, metrics: dict, y_true, y_prob, history_dir: Path | None = None,
                 example_images: np.ndarray | None = None, example_ids: Sequence[str] | None = None,
                 example_rows: Sequence[int] | None = None, *,
                 data_counts: Mapping[str, Mapping[str, int]] | None = None,
                 threshold_method: str | None = None,
                 settings: Mapping[str, object] | None = None) -> Path:
    """Draw every plot and write out_dir/report.md; return the report's path.

    metrics: evaluate_all's dict for the test split. y_true, y_prob: (N, 6) test labels and
    probabilities. history_dir: folder of CSVLogger CSVs (one per stage/phase), optional.
    example_images (k, S, S, 3) uint8 with their ids and their row numbers in y_true/y_prob.
    data_counts: {split: {column: count}} shown as the data table. threshold_method: how the
    thresholds were chosen. settings: {name: value} shown as the configuration table.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    y_true = np.asarray(y_true).astype(int)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    thresholds = {label: metrics["labels"][label]["threshold"] for label in LABELS}
    figures = {"ROC curves": plot_roc(y_true, y_prob, metrics),
               "Precision-recall curves": plot_pr(y_true, y_prob, metrics),
               "Confusion matrices": plot_confusion(metrics)}
    names = {"ROC curves": ROC_PNG, "Precision-recall curves": PR_PNG,
             "Confusion matrices": CONFUSION_PNG}
    histories = read_histories(history_dir) if history_dir else {}
    if histories:
        figures["Training curves"] = plot_training(histories)
        names["Training curves"] = TRAINING_PNG
    if example_images is not None and len(example_images):
        rows = list(example_rows if example_rows is not None else range(len(example_images)))
        ids = list(example_ids if example_ids is not None else [str(r) for r in rows])
        figures["Example test images"] = plot_examples(example_images, ids, y_true[rows],
                                                       y_prob[rows], thresholds)
        names["Example test images"] = EXAMPLES_PNG
    for title, fig in figures.items():
        save_png(fig, out_dir / names[title])

    text = render_markdown(metrics, names, histories, data_counts, threshold_method, settings)
    return atomic_write_text(out_dir / REPORT_MD, text)


def save_png(fig: Figure, path: Path) -> Path:
    """Save a figure as PNG atomically."""
    # Cropping ("tight") draws the figure twice: only the figures with a layout engine need it
    # (ich.evaluation.figures' grids are laid out to fit).
    crop = "tight" if fig.get_layout_engine() is not None else None
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches=crop)
    return Path(path)


def plot_roc(y_true: np.ndarray, y_prob: np.ndarray, metrics: dict) -> Figure:
    """One ROC panel per label, AUC (from `metrics`) in the legend, the threshold's point marked."""
    fig, axes = _grid("ROC curves (test split)")
    for ax, (j, label) in zip(axes, enumerate(LABELS)):
        y, p = y_true[:, j], y_prob[:, j]
        m = metrics["labels"][label]
        ax.plot([0, 1], [0, 1], color="0.75", lw=1, ls="--")
        if _both_classes(y):
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, color=COLORS[label], lw=2, label=f"AUC {fmt(m['roc_auc'])}")
            ax.plot(1 - m["specificity"], m["recall"], "o", color=COLORS[label],
                    mfc="white", mew=2, ms=7, label=f"threshold {m['threshold']:.2f}")
            ax.legend(loc="lower right", fontsize=9, frameon=False)
        else:
            _no_curve(ax, y)
        _style(ax, label, "false positive rate", "true positive rate")
    return fig


def plot_pr(y_true: np.ndarray, y_prob: np.ndarray, metrics: dict) -> Figure:
    """One precision-recall panel per label, average precision (from `metrics`) in the legend,
    the prevalence (a no-skill model's precision) dashed, the threshold's point marked."""
    fig, axes = _grid("Precision-recall curves (test split)")
    for ax, (j, label) in zip(axes, enumerate(LABELS)):
        y, p = y_true[:, j], y_prob[:, j]
        m = metrics["labels"][label]
        if _both_classes(y):
            precision, recall, _ = precision_recall_curve(y, p)
            ax.step(recall, precision, where="post", color=COLORS[label], lw=2,
                    label=f"AP {fmt(m['pr_auc'])}")
            ax.axhline(y.mean(), color="0.75", lw=1, ls="--", label=f"prevalence {y.mean():.2f}")
            if m["confusion"]["tp"] + m["confusion"]["fp"]:
                ax.plot(m["recall"], m["precision"], "o", color=COLORS[label],
                        mfc="white", mew=2, ms=7, label=f"threshold {m['threshold']:.2f}")
            ax.legend(loc="lower left", fontsize=9, frameon=False)
        else:
            _no_curve(ax, y)
        _style(ax, label, "recall", "precision")
    return fig


def plot_confusion(metrics: dict) -> Figure:
    """A 2x2 confusion matrix per label at its threshold: counts and share of the row."""
    fig, axes = _grid("Confusion matrices (test split, at the chosen thresholds)")
    for ax, label in zip(axes, LABELS):
        c = metrics["labels"][label]["confusion"]
        cells = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]], dtype=float)
        share = cells / np.maximum(cells.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (r, k), count in np.ndenumerate(cells):
            ax.text(k, r, f"{int(count)}\n{share[r, k]:.0%}", ha="center", va="center", fontsize=11,
                    color="white" if share[r, k] > 0.55 else "black")
        ax.set_xticks([0, 1], ["pred 0", "pred 1"])
        ax.set_yticks([0, 1], ["true 0", "true 1"])
        ax.set_title(f"{label} (t = {metrics['labels'][label]['threshold']:.2f})", fontsize=11)
        ax.tick_params(length=0)
    return fig


def read_histories(history_dir: Path) -> dict[str, pd.DataFrame]:
    """{file stem: table} of the CSVLogger files in history_dir, in training order (`ich train`
    names them <stage>_<phase>.csv; frozen comes before finetune); unreadable or empty files
    are skipped."""
    history_dir = Path(history_dir)
    tables = {}
    paths = sorted(history_dir.glob("*.csv"), key=_training_order) if history_dir.is_dir() else []
    for path in paths:
        try:
            table = pd.read_csv(path)
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
            continue
        if len(table) and "loss" in table.columns:
            tables[path.stem] = table
    return tables


def plot_training(histories: Mapping[str, pd.DataFrame]) -> Figure:
    """Loss and AUC per epoch, train and validation, one row per history file (stage/phase)."""
    n = len(histories)
    fig = Figure(figsize=(10, 2.8 * n + 0.6), layout="constrained")
    axes = fig.subplots(n, 2, squeeze=False)
    fig.suptitle("Training curves", fontsize=13)
    for row, (name, table) in enumerate(histories.items()):
        epochs = (table["epoch"] if "epoch" in table.columns else pd.Series(range(len(table)))) + 1
        for ax, kind in zip(axes[row], ("loss", "auc")):
            columns = [c for c in table.columns
                       if not c.startswith("val_") and (c == "loss" if kind == "loss" else "auc" in c.lower())]
            for (train_color, val_color), col in zip(CURVE_COLORS, columns):
                ax.plot(epochs, table[col], "o-", color=train_color, ms=4, label=f"train {col}")
                if f"val_{col}" in table.columns:
                    ax.plot(epochs, table[f"val_{col}"], "s--", color=val_color, ms=4,
                            label=f"val {col}")
            if not columns:
                ax.text(0.5, 0.5, f"no {kind} column logged", ha="center", va="center",
                        transform=ax.transAxes, color="0.4")
            else:
                ax.legend(fontsize=8, frameon=False)
            ax.set_title(f"{name}: {kind}", fontsize=11)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            if len(epochs) <= 15:
                ax.set_xticks(epochs)  # whole epochs only, even for a single point
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def pick_examples(y_true: np.ndarray, k: int, seed: int = 0) -> list[int]:
    """Rows of up to k images to show: about half `any`-positive, cycling through the subtypes
    so that each is represented where possible, the rest negatives; deterministic per seed."""
    y_true = np.asarray(y_true).astype(int)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    want_pos = min((k + 1) // 2, int(y_true[:, 0].sum()))
    pools = [list(rng.permutation(np.flatnonzero(y_true[:, j]))) for j in range(1, len(LABELS))]
    pools.append(list(rng.permutation(np.flatnonzero(y_true[:, 0]))))
    while len(chosen) < want_pos and any(pools):
        for pool in pools:
            while pool and pool[0] in chosen:
                pool.pop(0)
            if pool and len(chosen) < want_pos:
                chosen.append(int(pool.pop(0)))
    negatives = [int(i) for i in rng.permutation(np.flatnonzero(y_true[:, 0] == 0))]
    chosen += negatives[:k - len(chosen)]
    return chosen


def plot_examples(images: np.ndarray, ids: Sequence[str], y_true: np.ndarray, y_prob: np.ndarray,
                  thresholds: Mapping[str, float]) -> Figure:
    """A grid of images (as the model sees them: blood/brain/bone windows as R/G/B), each with
    its six probabilities; a filled dot marks a true label, bold a predicted positive."""
    n = len(images)
    cols = min(4, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(3.0 * cols, 4.9 * rows), layout="constrained")
    # Each example is an image axis above a text axis, so the text never runs into the next row.
    axes = fig.subplots(2 * rows, cols, squeeze=False, height_ratios=[1.0, 0.62] * rows)
    fig.suptitle("Test images: probability per label\n(● true label, bold = at or above threshold)",
                 fontsize=12)
    for i in range(rows * cols):
        image_ax, text_ax = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        image_ax.set_axis_off()
        text_ax.set_axis_off()
        if i >= n:
            continue
        image_ax.imshow(images[i])
        image_ax.set_title(str(ids[i]), fontsize=9, family="monospace")
        for j, label in enumerate(LABELS):
            above = y_prob[i, j] >= thresholds[label]
            mark = "●" if y_true[i, j] else "○"
            text_ax.text(0.08, 1 - j / len(LABELS), f"{mark} {ABBREV[label]:<4}{y_prob[i, j]:6.3f}",
                         transform=text_ax.transAxes, va="top", fontsize=10, family="monospace",
                         fontweight="bold" if above else "normal",
                         color=COLORS[label] if y_true[i, j] else "0.35")
    return fig


def render_markdown(metrics: dict, images: Mapping[str, str], histories: Mapping[str, pd.DataFrame],
                    data_counts: Mapping[str, Mapping[str, int]] | None,
                    threshold_method: str | None, settings: Mapping[str, object] | None) -> str:
    """The text of report.md: header, data, per-label and overall metrics, plots, thresholds,
    configuration. `images` maps section titles to PNG file names beside the report."""
    overall = metrics["overall"]
    lines = [
        "# Intracranial hemorrhage detection: evaluation report",
        "",
        "> **Research use only.** This model is not a medical device and must not be used for "
        "diagnosis or treatment decisions.",
        "",
        f"Generated {dt.datetime.now().isoformat(timespec='seconds')}. All metrics are on the "
        f"held-out **test** split ({overall['n_images']} images); thresholds were chosen on the "
        "validation split. Subtype probabilities are p(any) x p(subtype | any).",
        "",
    ]
    if data_counts:
        columns = list(next(iter(data_counts.values())).keys())
        lines += ["## Data", "", *md_table(["split", *columns],
                                           [[split, *[row.get(c, "") for c in columns]]
                                            for split, row in data_counts.items()]), ""]
    lines += ["## Metrics per label (test split)", ""]
    rows = []
    for label in LABELS:
        m = metrics["labels"][label]
        c = m["confusion"]
        rows.append([label, fmt(m["roc_auc"]), fmt(m["pr_auc"]), fmt(m["threshold"]),
                     fmt(m["accuracy"]), fmt(m["precision"]), fmt(m["recall"]),
                     fmt(m["specificity"]), fmt(m["f1"]), c["tp"], c["fp"], c["fn"], c["tn"],
                     m["support"]])
    lines += md_table(["label", "ROC AUC", "PR AUC", "threshold", "accuracy", "precision",
                       "recall", "specificity", "F1", "TP", "FP", "FN", "TN", "positives"], rows)
    lines += [
        "",
        "## Overall",
        "",
        *md_table(["metric", "value"], [
            ["macro ROC AUC", fmt(overall["macro_roc_auc"])],
            ["macro PR AUC", fmt(overall["macro_pr_auc"])],
            ["macro F1", fmt(overall["macro_f1"])],
            ["RSNA weighted log loss", fmt(overall["rsna_weighted_log_loss"], 5)],
            ["test images", overall["n_images"]],
        ]),
        "",
        "The RSNA weighted log loss is the 2019 competition metric: binary log loss per label, "
        "`any` weighted 2 and each subtype 1, averaged over images (lower is better). For context "
        f"only: the winning team scored {RSNA_FIRST_PLACE} on the real private leaderboard, on the "
        "full hidden test set with models using neighbouring slices; a score on this run's test "
        "split is not comparable to it.",
        "",
        *stage_comparison(metrics),
        "## Plots",
        "",
    ]
    for title, name in images.items():
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    if not histories:
        lines += ["No training history (run_dir/history/*.csv) was found, so no training curves.", ""]
    method = {"youden": "Youden's J (maximum TPR - FPR on the validation ROC curve)",
              "f1": "maximum F1 on the validation precision-recall curve"}.get(
        threshold_method or "", threshold_method or "not recorded")
    lines += ["## Thresholds", "", f"Chosen per label on the validation split by {method}; an image "
              "is called positive when its probability is at or above the threshold.", "",
              *md_table(["label", "threshold"],
                        [[label, fmt(metrics["labels"][label]["threshold"], 4)] for label in LABELS]),
              ""]
    if histories:
        lines += ["## Training", "", *md_table(
            ["history", "epochs", "best val AUC", "last val loss"],
            [[name, len(t), fmt(_best(t, "val_auc")), fmt(_last(t, "val_loss"), 4)]
             for name, t in histories.items()]), ""]
    if settings:
        lines += ["## Configuration", "", *md_table(["setting", "value"],
                                                    [[k, v] for k, v in settings.items()]), ""]
    return "\n".join(lines)


def stage_comparison(metrics: dict) -> list[str]:
    """Markdown lines: ROC AUC per label of the image stages alone and after the sequence stage,
    per slice and per study, side by side (nothing when the run has no sequence stage)."""
    image = metrics.get("image_stages")
    if not image:
        return []
    columns = {"slices, image stages": image, "slices, sequence stage": metrics}
    if "studies" in image and "studies" in metrics:
        columns.update({"studies, image stages (max)": image["studies"],
                        "studies, sequence stage": metrics["studies"]})
    rows = [[label, *(fmt(m["labels"][label]["roc_auc"]) for m in columns.values())] for label in LABELS]
    rows.append(["macro", *(fmt(m["overall"]["macro_roc_auc"]) for m in columns.values())])
    return ["## Stages compared (ROC AUC)", "", *md_table(["label", *columns], rows), "",
            "The metrics above are the sequence stage's (the run's final output); a study's "
            "probability there is the sequence stage's, here beside the highest slice probability "
            "of the image stages.", ""]


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Lines of a GitHub markdown table (numbers right-aligned)."""
    def cell(value) -> str:
        return str(value).replace("|", "\\|")

    # A column is right-aligned when every non-blank cell is a number.
    numeric = [bool(rows) and all(_is_number(r[i]) for r in rows if str(r[i]) != "")
               for i in range(len(headers))]
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return out


def fmt(value, digits: int = 3) -> str:
    """A metric for a table: fixed decimals, 'n/a' for None (undefined, e.g. AUC of one class)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def _training_order(path: Path) -> tuple:
    stage, _, phase = path.stem.partition("_")
    return stage, PHASE_ORDER.get(phase, len(PHASE_ORDER)), path.stem


def _grid(title: str):
    return panel_grid(2, 3, (3.2, 2.9), title, title_size=13)


def _style(ax, label: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(label, fontsize=11)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)


def _no_curve(ax, y: np.ndarray) -> None:
    which = "positive" if len(y) and y.all() else "negative"
    ax.text(0.5, 0.5, f"only {which} images\nin the test split:\nno curve", ha="center",
            va="center", transform=ax.transAxes, color="0.4")


def _both_classes(y: np.ndarray) -> bool:
    return 0 < int(np.sum(y)) < len(y)


def _is_number(value) -> bool:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return True
    try:
        float(str(value))
        return True
    except ValueError:
        return str(value) == "n/a"


def _best(table: pd.DataFrame, column: str) -> float | None:
    return float(table[column].max()) if column in table.columns and table[column].notna().any() else None


def _last(table: pd.DataFrame, column: str) -> float | None:
    return float(table[column].iloc[-1]) if column in table.columns and table[column].notna().any() else None
