"""Step 7, `ich evaluate`: metrics and the report on the test split.

In: run_dir/cascade.json and the stage models (from `ich train`), the val and test splits of
work_dir (splits.csv, images.csv, PNGs; read through ich.data.loading's packed cache),
run_dir/history/ and the config (evaluate.threshold_method, evaluate.report_examples,
predict.batch_size). Out, in run_dir/eval/ only: metrics.json (ich.evaluation.metrics'
evaluate_all shape, plus the thresholds used and where they came from), predictions.csv
(image_id and one probability column per label), test_labels.csv (image_id and the true 0/1
labels), studies.csv (per test study: its slices' maximum probability and label, and
metrics.json's "studies" section from it), report.md with its plots.

The thresholds are the run's (chosen on val when training ended, in cascade.json); when
evaluate.threshold_method differs from the method they were chosen with, evaluate chooses its
own on the val split for its report and leaves the run's as they are. Reruns exactly when its
settings, the models, cascade.json or the split changed (ich.stamps).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ich.config import resolve_workers
from ich.constants import (AUGMENTED_CSV, CASCADE_JSON, EVAL_DIR, HISTORY_DIR, LABELS, METRICS_JSON,
                           PREDICTIONS_CSV, REPORT_MD, SPLITS, SPLITS_CSV, STUDIES_CSV)
from ich.data.labels import label_counts
from ich.data.loading import load_split
from ich.errors import StepError
from ich.evaluation.inference import load_cascade, predict_split, read_cascade_json
from ich.evaluation.metrics import choose_threshold, evaluate_all
from ich.evaluation.studies import aggregate_studies
from ich.evaluation.report import fmt, pick_examples, write_report
from ich.io import Timer, summary, write_csv, write_json
from ich.stamps import Stamp, reason, record, record_path

log = logging.getLogger("ich")

TEST_LABELS_CSV = "test_labels.csv"
TRUE_SUFFIX = "_true"  # studies.csv: the study's 0/1 label beside its probability


def stamps(cfg: dict) -> list[Stamp]:
    """Evaluation depends on its settings, the run (cascade.json and models) and the split."""
    work, run_dir = Path(cfg["paths"]["work_dir"]), Path(cfg["paths"]["run_dir"])
    eval_dir = run_dir / EVAL_DIR
    models = []
    try:
        models = [run_dir / stage["file"] for stage in read_cascade_json(run_dir)["stages"]]
    except (FileNotFoundError, ValueError):
        pass  # no run yet: cascade.json alone marks the evaluation stale
    return [Stamp("evaluate", run_dir, settings={"seed": cfg["seed"], "evaluate": cfg["evaluate"]},
                  inputs=[run_dir / CASCADE_JSON, *models, work / SPLITS_CSV,
                          record_path(work, "preprocess")],
                  outputs=[eval_dir / METRICS_JSON, eval_dir / REPORT_MD, eval_dir / PREDICTIONS_CSV])]


def run(cfg: dict, force: bool = False) -> Path:
    """Evaluate the trained cascade of cfg.paths.run_dir; return the path of eval/metrics.json."""
    run_dir = Path(cfg["paths"]["run_dir"])
    work_dir = Path(cfg["paths"]["work_dir"])
    eval_dir = run_dir / EVAL_DIR
    metrics_path = eval_dir / METRICS_JSON
    [stamp] = stamps(cfg)
    why = "forced" if force else reason(stamp)
    if why is None:
        log.info("evaluate: %s is up to date; skipped (--force to redo)", metrics_path)
        return metrics_path
    log.info("evaluate: running (%s)", why)

    timer = Timer()
    try:
        cascade = load_cascade(run_dir)
    except ValueError as err:  # a malformed cascade.json or model file: a user-facing error
        raise StepError(str(err)) from err
    batch_size = int(cfg["predict"]["batch_size"])
    workers = resolve_workers(cfg["data"]["workers"])
    test = load_split(work_dir, "test", cascade.spec, cfg["data"]["cache"], workers)
    if len(test.targets) == 0:
        raise StepError(f"the test split in {work_dir / SPLITS_CSV} is empty: nothing to evaluate; "
                        "use more patients or larger split.fractions[2]")
    test_table = test.table.iloc[test.targets].reset_index(drop=True)
    test_prob = predict_split(cascade, test, batch_size, "test")
    method = cfg["evaluate"]["threshold_method"]
    thresholds, source = cascade.thresholds, f"the run ({CASCADE_JSON}, chosen on val)"
    if cascade.meta.get("threshold_method") != method:
        val = load_split(work_dir, "val", cascade.spec, cfg["data"]["cache"], workers)
        if len(val.targets):
            val_prob = predict_split(cascade, val, batch_size, "val")
            val_true = val.table.iloc[val.targets][list(LABELS)].to_numpy()
            thresholds = {label: choose_threshold(val_true[:, j], val_prob[:, j], method)
                          for j, label in enumerate(LABELS)}
            source = "this evaluation, chosen on val"
            log.info("evaluate: the run's thresholds were chosen by %s; choosing %s thresholds on "
                     "val for this report (the run's are left as they are)",
                     cascade.meta.get("threshold_method"), method)

    test_true = test_table[list(LABELS)].to_numpy()
    metrics = evaluate_all(test_true, test_prob, thresholds)
    metrics["thresholds"] = {"values": {k: float(v) for k, v in thresholds.items()},
                             "method": method, "source": source}
    studies = study_results(test_table, test_prob)
    if len(studies):
        truth = studies[[f"{label}{TRUE_SUFFIX}" for label in LABELS]].to_numpy()
        metrics["studies"] = evaluate_all(truth, studies[list(LABELS)].to_numpy(), thresholds)
        write_csv(studies, eval_dir / STUDIES_CSV)
    ids = test_table["image_id"].astype(str)
    write_csv(pd.concat([ids, pd.DataFrame(test_prob, columns=list(LABELS))], axis=1),
              eval_dir / PREDICTIONS_CSV)
    write_csv(test_table[["image_id", *LABELS]], eval_dir / TEST_LABELS_CSV)
    rows = pick_examples(test_true, int(cfg["evaluate"]["report_examples"]), seed=int(cfg["seed"]))
    examples = None
    if rows:
        # The target slice of each example (offset 0), as its PNG stores it: what a reader sees.
        centre = list(cascade.spec.offsets).index(0)
        examples = np.asarray(test.images[test.neighbours[test.targets[rows], centre]])
    write_report(eval_dir, metrics, test_true, test_prob, run_dir / HISTORY_DIR,
                 example_images=examples, example_ids=[ids[i] for i in rows], example_rows=rows,
                 data_counts=data_counts(work_dir), threshold_method=method,
                 settings=settings(cfg, cascade.meta, run_dir))
    # metrics.json last: it marks the evaluation complete.
    write_json(metrics, metrics_path)
    record(stamp)

    overall = metrics["overall"]
    study_auc = metrics.get("studies", {}).get("labels", {}).get("any", {}).get("roc_auc")
    summary("evaluate", f"{len(test_table)} test images ({len(studies)} studies), AUC any "
            f"{fmt(metrics['labels']['any']['roc_auc'])} (study {fmt(study_auc)}), macro AUC {fmt(overall['macro_roc_auc'])}, "
            f"RSNA log loss {overall['rsna_weighted_log_loss']:.4f}, report {eval_dir / REPORT_MD}",
            len(test_table), "images", timer)
    return metrics_path


def study_results(table: pd.DataFrame, probs: np.ndarray) -> pd.DataFrame:
    """Per test study: study_id, n_slices, the six probabilities (max over its slices) and the
    six labels (`<label>_true`: positive when any of its slices is)."""
    frame = pd.DataFrame(probs, columns=list(LABELS))
    frame["study_id"] = table["study_id"].to_numpy()
    for label in LABELS:
        frame[f"{label}{TRUE_SUFFIX}"] = table[label].to_numpy()
    return aggregate_studies(frame, [*LABELS, *(f"{label}{TRUE_SUFFIX}" for label in LABELS)])


def data_counts(work_dir: Path) -> dict[str, dict[str, int]]:
    """{split: {"images", "patients", <label>: positives}} from splits.csv, plus a row for the
    augmented training copies when augmented.csv exists."""
    splits = pd.read_csv(Path(work_dir) / SPLITS_CSV, dtype={"image_id": str, "patient_id": str})
    counts = {}
    for split in SPLITS:
        part = splits[splits["split"] == split]
        n = label_counts(part)
        counts[split] = {"images": n["images"], "patients": int(part["patient_id"].nunique()),
                         **{label: n[label] for label in LABELS}}
    augmented = Path(work_dir) / AUGMENTED_CSV
    if augmented.is_file():
        n = label_counts(pd.read_csv(augmented))
        counts["train, augmented copies"] = {"images": n["images"], "patients": "",
                                             **{label: n[label] for label in LABELS}}
    return counts


def settings(cfg: dict, meta: dict, run_dir: Path) -> dict[str, object]:
    """The configuration table of the report: what the model is (from cascade.json) and how it
    was trained (from the config)."""
    train = cfg["train"]
    spec = meta.get("input", {})
    windows = spec.get("windows", {})
    versions = meta.get("versions", {})
    return {
        "run directory": str(run_dir.resolve()),
        **{f"{stage['name']} backbones": " + ".join(stage.get("backbones", []))
           for stage in meta.get("stages", [])},
        "image size": f"{spec.get('image_size')} px",
        "windows (R, G, B)": ", ".join(f"{c} {windows.get(c)}" for c in spec.get("channels", [])),
        "slices (offsets)": ", ".join(str(o) for o in spec.get("offsets", [0])),
        "channels per slice": spec.get("slice_channels", "all"),
        "initial weights": cfg["model"]["weights"] or "random (none)",
        "epochs (config)": f"{train['frozen_epochs']} frozen + {train['finetune_epochs']} fine-tune",
        "batch size (config)": train["batch_size"],
        "backend": meta.get("backend", "?"),
        "mixed precision": meta.get("mixed_precision", "?"),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "seed": cfg["seed"],
    }
