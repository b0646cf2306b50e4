"""Step 7, `ich evaluate`: thresholds on val, metrics and the report on test.

In: run_dir/cascade.json, stage1.keras, stage2.keras (from `ich train`), the val and test splits
of work_dir (splits.csv, images.csv, PNGs; read through ich.data.loading's packed cache), run_dir/history/
and the config (evaluate.threshold_method, evaluate.report_examples, predict.batch_size).
Out: per-label thresholds chosen on val, written into cascade.json (other keys kept), and in
run_dir/eval/: metrics.json (ich.evaluation.metrics.evaluate_all's shape), predictions.csv (image_id and one
probability column per label), test_labels.csv (image_id and the true 0/1 labels), report.md
with its plots. Skipped when metrics.json is newer than the models and the splits, unless force.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ich.constants import (AUGMENTED_CSV, CASCADE_JSON, EVAL_DIR, HISTORY_DIR, LABELS, METRICS_JSON,
                           PREDICTIONS_CSV, REPORT_MD, SPLITS_CSV, STAGE1_MODEL, STAGE2_MODEL)
from ich.io import outdated

log = logging.getLogger("ich")

TEST_LABELS_CSV = "test_labels.csv"


def run(cfg: dict, force: bool = False) -> Path:
    """Evaluate the trained cascade of cfg.paths.run_dir; return the path of eval/metrics.json."""
    from ich.backend import select_backend

    # Before anything imports keras (ich.data.loading does): Keras reads KERAS_BACKEND once, at import.
    select_backend(cfg["train"]["backend"])
    from ich.data import loading
    from ich.errors import StepError
    from ich.config import resolve_workers
    from ich.evaluation.inference import load_cascade
    from ich.io import Timer, summary, write_csv, write_json
    from ich.evaluation.metrics import DEFAULT_THRESHOLD, choose_threshold, evaluate_all
    from ich.evaluation.report import fmt, pick_examples, write_report

    run_dir = Path(cfg["paths"]["run_dir"])
    work_dir = Path(cfg["paths"]["work_dir"])
    eval_dir = run_dir / EVAL_DIR
    metrics_path = eval_dir / METRICS_JSON
    if not force and is_complete(run_dir, work_dir):
        log.info("evaluate: %s is newer than the models and splits; skipped (--force to redo)",
                 metrics_path)
        return metrics_path

    timer = Timer()
    try:
        cascade = load_cascade(run_dir)
    except ValueError as err:  # a malformed cascade.json or model file: a user-facing error
        raise StepError(str(err)) from err
    batch_size = int(cfg["predict"]["batch_size"])
    workers = resolve_workers(cfg["data"]["workers"])
    splits = {}
    for split in ("val", "test"):
        table = loading.split_table(work_dir, split, include_augmented=False)
        images = loading.packed(work_dir, split, table, cascade.image_size, workers=workers)
        splits[split] = (table, images, predict_split(cascade, images, batch_size, split))
    test_table, test_images, test_prob = splits["test"]
    if len(test_table) == 0:
        raise StepError(f"the test split in {work_dir / SPLITS_CSV} is empty: nothing to evaluate; "
                        "use more patients or larger split.fractions[2]")

    method = cfg["evaluate"]["threshold_method"]
    val_table, _, val_prob = splits["val"]
    val_true = val_table[list(LABELS)].to_numpy()
    if len(val_table) == 0:
        log.warning("evaluate: the val split is empty; every threshold stays %.2f", DEFAULT_THRESHOLD)
    thresholds = {label: (choose_threshold(val_true[:, j], val_prob[:, j], method)
                          if len(val_table) else DEFAULT_THRESHOLD)
                  for j, label in enumerate(LABELS)}
    save_thresholds(run_dir, thresholds, method)

    test_true = test_table[list(LABELS)].to_numpy()
    metrics = evaluate_all(test_true, test_prob, thresholds)
    ids = test_table["image_id"].astype(str)
    write_csv(pd.concat([ids, pd.DataFrame(test_prob, columns=list(LABELS))], axis=1),
              eval_dir / PREDICTIONS_CSV)
    write_csv(test_table[["image_id", *LABELS]], eval_dir / TEST_LABELS_CSV)
    rows = pick_examples(test_true, int(cfg["evaluate"]["report_examples"]), seed=int(cfg["seed"]))
    write_report(eval_dir, metrics, test_true, test_prob, run_dir / HISTORY_DIR,
                 example_images=np.asarray(test_images[rows]) if rows else None,
                 example_ids=[ids[i] for i in rows], example_rows=rows,
                 data_counts=data_counts(work_dir), threshold_method=method,
                 settings=settings(cfg, cascade.meta, run_dir))
    # metrics.json last: it marks the evaluation complete.
    write_json(metrics, metrics_path)

    overall = metrics["overall"]
    n = len(test_table) + len(val_table)
    summary("evaluate", f"{len(test_table)} test + {len(val_table)} val images, AUC any "
            f"{fmt(metrics['labels']['any']['roc_auc'])}, macro AUC {fmt(overall['macro_roc_auc'])}, "
            f"RSNA log loss {overall['rsna_weighted_log_loss']:.4f}, report {eval_dir / REPORT_MD}",
            n, "images", timer)
    return metrics_path


def predict_split(cascade, images, batch_size: int, split: str) -> np.ndarray:
    """(N, 6) probabilities for one split's images, with a progress bar."""
    from ich.evaluation.inference import n_batches
    from ich.io import progress

    out = np.empty((len(images), len(LABELS)), dtype=np.float32)
    batches = cascade.iter_predict(images, batch_size)
    for start, probs in progress(batches, total=n_batches(len(images), batch_size),
                                 desc=f"evaluate {split}", unit="batch"):
        out[start:start + len(probs)] = probs
    return out


def save_thresholds(run_dir: Path, thresholds: dict[str, float], method: str) -> Path:
    """Write the thresholds (and how they were chosen) into cascade.json atomically, keeping
    every other key, so `ich predict` applies them."""
    from ich.io import write_json

    path = Path(run_dir) / CASCADE_JSON
    meta = json.loads(path.read_text())
    meta["thresholds"] = {label: float(thresholds[label]) for label in LABELS}
    meta["threshold_method"] = method
    return write_json(meta, path)


def is_complete(run_dir: Path, work_dir: Path) -> bool:
    """True when eval/metrics.json, report.md and predictions.csv exist and metrics.json is
    newer than both models and splits.csv (retraining or resplitting stales the evaluation)."""
    eval_dir = Path(run_dir) / EVAL_DIR
    outputs = [eval_dir / METRICS_JSON, eval_dir / REPORT_MD, eval_dir / PREDICTIONS_CSV]
    inputs = [Path(run_dir) / STAGE1_MODEL, Path(run_dir) / STAGE2_MODEL, Path(work_dir) / SPLITS_CSV]
    if not all(p.is_file() for p in outputs + inputs):
        return False
    return not outdated(eval_dir / METRICS_JSON, inputs)


def data_counts(work_dir: Path) -> dict[str, dict[str, int]]:
    """{split: {"images", "patients", <label>: positives}} from splits.csv, plus a row for the
    augmented training copies when augmented.csv exists."""
    splits = pd.read_csv(Path(work_dir) / SPLITS_CSV, dtype={"image_id": str, "patient_id": str})
    counts = {}
    for split in ("train", "val", "test"):
        part = splits[splits["split"] == split]
        counts[split] = {"images": len(part), "patients": int(part["patient_id"].nunique()),
                         **{label: int(part[label].sum()) for label in LABELS}}
    augmented = Path(work_dir) / AUGMENTED_CSV
    if augmented.is_file():
        extra = pd.read_csv(augmented)
        counts["train, augmented copies"] = {"images": len(extra), "patients": "",
                                             **{label: int(extra[label].sum()) for label in LABELS}}
    return counts


def settings(cfg: dict, meta: dict, run_dir: Path) -> dict[str, object]:
    """The configuration table of the report: what the model is (from cascade.json) and how it
    was trained (from the config)."""
    train = cfg["train"]
    windows = meta.get("windows", {})
    channels = meta.get("channels", [])
    versions = meta.get("versions", {})
    return {
        "run directory": str(run_dir.resolve()),
        "stage 1 backbone": meta.get("stage1", {}).get("backbone", "?"),
        "stage 2 backbones": " + ".join(meta.get("stage2", {}).get("backbones", [])),
        "image size": f"{meta.get('image_size')} px",
        "windows (R, G, B)": ", ".join(f"{c} {windows.get(c)}" for c in channels),
        "initial weights": cfg["model"]["weights"] or "random (none)",
        "epochs (config)": f"{train['frozen_epochs']} frozen + {train['finetune_epochs']} fine-tune",
        "batch size (config)": train["batch_size"],
        "backend": meta.get("backend", "?"),
        "mixed precision": meta.get("mixed_precision", "?"),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "seed": cfg["seed"],
    }
