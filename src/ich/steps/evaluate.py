"""Step 7, `ich evaluate`: metrics and the report on the test split.

In: run_dir/cascade.json and the stage models (from `ich train`), the val and test splits of
work_dir (splits.csv, images.csv, PNGs; read through ich.data.loading's packed cache),
run_dir/history/ and the config (evaluate.threshold_method, evaluate.report_examples,
predict.batch_size). Out, in run_dir/eval/ only: metrics.json (ich.evaluation.metrics'
evaluate_all shape, plus the thresholds used and where they came from), predictions.csv
(image_id and one probability column per label), test_labels.csv (image_id and the true 0/1
labels), studies.csv (per test study: its slices' maximum probability and label, and
metrics.json's "studies" section from it), report.md with its plots, and report.html (the
self-contained report of ich.evaluation.html: CIs, bands, calibration, Grad-CAM, model card).
Every label's metrics carry the paper set of ich.evaluation.metrics.extended_metrics: 95%
intervals of an evaluate.bootstrap-replicate bootstrap over patients (seeded by `seed`),
DeLong's AUC interval, operating points, Brier, ECE and reliability bins; with
evaluate.calibration platt or isotonic, a calibrator fitted on val and its effect on test.

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
from ich.constants import (AUGMENTED_CSV, CASCADE_JSON, EVAL_DIR, HISTORY_DIR, INDEX_PARQUET, LABELS,
                           LABELS_CSV, METRICS_JSON, PREDICTIONS_CSV, REPORT_MD, SPLITS, SPLITS_CSV,
                           STUDIES_CSV)
from ich.data.labels import label_counts
from ich.data.loading import load_split
from ich.errors import StepError
from ich.evaluation.calibration import calibration_effect
from ich.evaluation.cascade_file import check_finite, read_cascade_json
from ich.evaluation.inference import load_cascade, refine_split
from ich.evaluation.metrics import choose_threshold, evaluate_all
from ich.evaluation.studies import aggregate_studies
from ich.evaluation.report import fmt, pick_examples, write_report
from ich.io import Timer, read_csv, summary, write_csv, write_json
from ich.steps.evaluate_external import REPORT_HTML, write_html_report
from ich.provenance import settings_rows
from ich.stamps import Stamp, must_run, record, record_path

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
    natural = [work / INDEX_PARQUET, work / LABELS_CSV] if cfg["evaluate"]["natural_prevalence"] else []
    return [Stamp("evaluate", run_dir, settings={"seed": cfg["seed"], "evaluate": cfg["evaluate"],
                                                    "explain": cfg["explain"]},
                  inputs=[run_dir / CASCADE_JSON, *models, work / SPLITS_CSV,
                          record_path(work, "preprocess"), *natural],
                  outputs=[eval_dir / METRICS_JSON, eval_dir / REPORT_MD, eval_dir / PREDICTIONS_CSV])]


def run(cfg: dict, force: bool = False) -> Path:
    """Evaluate the trained cascade of cfg.paths.run_dir; return the path of eval/metrics.json."""
    run_dir = Path(cfg["paths"]["run_dir"])
    work_dir = Path(cfg["paths"]["work_dir"])
    eval_dir = run_dir / EVAL_DIR
    metrics_path = eval_dir / METRICS_JSON
    [stamp] = stamps(cfg)
    if not must_run("evaluate", stamp, force, metrics_path):
        return metrics_path

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
    scored = refine_split(cascade, test, batch_size, "test")
    test_prob = scored["refined"]          # the run's final per-slice output
    has_sequence = cascade.sequence_stage is not None
    try:
        check_finite(test_prob, test_table["image_id"], "evaluate")  # issue 10
    except ValueError as err:
        raise StepError(str(err)) from err
    method = cfg["evaluate"]["threshold_method"]
    thresholds, source = cascade.thresholds, f"the run ({CASCADE_JSON}, chosen on val)"
    cascade_thresholds = {**thresholds, **cascade.meta.get("cascade_thresholds", {})}
    calibration = cfg["evaluate"]["calibration"]
    val_true = val_prob = None
    if cascade.meta.get("threshold_method") != method or calibration != "none":
        val = load_split(work_dir, "val", cascade.spec, cfg["data"]["cache"], workers)
        if len(val.targets):
            val_levels = refine_split(cascade, val, batch_size, "val")
            val_prob = val_levels["refined"]
            val_true = val.table.iloc[val.targets][list(LABELS)].to_numpy()
    if cascade.meta.get("threshold_method") != method:
        if val_prob is not None:
            thresholds = {label: choose_threshold(val_true[:, j], val_prob[:, j], method)
                          for j, label in enumerate(LABELS)}
            cascade_thresholds = {label: choose_threshold(val_true[:, j], val_levels["cascade"][:, j], method)
                                  for j, label in enumerate(LABELS)}
            source = "this evaluation, chosen on val"
            log.info("evaluate: the run's thresholds were chosen by %s; choosing %s thresholds on "
                     "val for this report (the run's are left as they are)",
                     cascade.meta.get("threshold_method"), method)

    test_true = test_table[list(LABELS)].to_numpy()
    bootstrap, seed = int(cfg["evaluate"]["bootstrap"]), int(cfg["seed"])
    test_table["patient_id"] = patient_ids(work_dir, test_table)
    patients = test_table["patient_id"].to_numpy()
    metrics = evaluate_all(test_true, test_prob, thresholds, groups=patients, bootstrap=bootstrap, seed=seed)
    metrics["thresholds"] = {"values": {k: float(v) for k, v in thresholds.items()},
                             "method": method, "source": source}
    if calibration != "none" and val_prob is not None:
        for label, effect in calibration_effect(val_true, val_prob, test_true, test_prob, calibration,
                                                LABELS).items():
            metrics["labels"][label]["calibrated"] = effect
    studies = study_results(scored["series"])
    levels = {"test images": (test_true.astype(float), test_prob, patients, list(LABELS))}
    comparison = {}
    # A study's patient is that of its target slices (context slices share their series' study).
    study_patient = test_table.drop_duplicates("study_id").set_index("study_id")["patient_id"]
    if len(studies):
        truth = studies[[f"{label}{TRUE_SUFFIX}" for label in LABELS]].to_numpy()
        study_patients = studies["study_id"].map(study_patient).fillna(studies["study_id"]).astype(str).to_numpy()
        metrics["studies"] = evaluate_all(truth, studies[list(LABELS)].to_numpy(), thresholds,
                                          groups=study_patients, bootstrap=bootstrap, seed=seed)
        metrics["studies"]["source"] = "sequence stage" if has_sequence else "max over slices"
        levels["studies"] = (truth.astype(float), studies[list(LABELS)].to_numpy(), study_patients, list(LABELS))
        write_csv(studies, eval_dir / STUDIES_CSV)
    if has_sequence:
        # The image stages alone, per slice and per study (max), beside the sequence stage.
        metrics["image_stages"] = evaluate_all(test_true, scored["cascade"], cascade_thresholds,
                                               groups=patients, bootstrap=bootstrap, seed=seed)
        comparison = {"slices, image stages": metrics["image_stages"], "slices, sequence stage": metrics}
        if len(studies):
            plain = study_results(scored["series_max"])
            metrics["image_stages"]["studies"] = evaluate_all(
                truth, plain.set_index("study_id").loc[studies["study_id"], list(LABELS)].to_numpy(),
                cascade_thresholds, groups=study_patients, bootstrap=bootstrap, seed=seed)
            comparison.update({"studies, image stages (max)": metrics["image_stages"]["studies"],
                               "studies, sequence stage": metrics["studies"]})
    html_metrics = {"test images": metrics, **({"studies": metrics["studies"]} if "studies" in metrics else {})}
    if cfg["evaluate"]["natural_prevalence"]:
        natural = natural_level(cfg, cascade, work_dir, test_table, thresholds, bootstrap, seed)
        metrics["natural_prevalence"] = natural["metrics"]
        for name, (level, metric) in natural["levels"].items():
            levels[name], html_metrics[name] = level, metric
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
    write_html_report(eval_dir / REPORT_HTML, cascade, run_dir, html_metrics, levels, bootstrap, seed,
                      title="Intracranial hemorrhage detection: evaluation report",
                      test_set=test_set_text(test_table, len(studies)), comparison=comparison,
                      study_source=("the sequence stage's output for the study (its highest over the "
                                    "study's series)" if has_sequence else None),
                      examples=gradcam_examples(cascade, test, rows, ids, test_prob,
                                                        int(cfg["explain"]["feature_stride"])),
                      notes=["Thresholds: " + source + f", by {method}.",
                             "Subtype probabilities are p(any) x p(subtype | any).",
                             "The test split is drawn from the seed's balanced sample, so its "
                             "prevalence is far above that of real scans (see the prevalence table): "
                             "precision, F1 and calibration here do not carry over to natural prevalence"
                             + ("; the natural-prevalence levels score every axial slice of the test "
                                "patients instead." if cfg["evaluate"]["natural_prevalence"] else
                                " (evaluate.natural_prevalence adds levels that do).")])
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


def natural_level(cfg: dict, cascade, work_dir: Path, test_table: pd.DataFrame, thresholds: dict,
                  bootstrap: int, seed: int) -> dict:
    """Metrics and report levels of every axial slice of the test patients (ich.steps.evaluate_natural):
    {"metrics": {evaluate_all's shape, "studies", "n_failed"}, "levels": {name: (level, metrics)}}."""
    from ich.steps.evaluate_natural import natural_slices, score_natural

    patients = set(test_table["patient_id"].astype(str))
    rows = natural_slices(work_dir, patients)
    log.info("evaluate: natural prevalence: %d slices of %d test patients", len(rows), len(patients))
    table, studies, failed = score_natural(cascade, rows, Path(cfg["paths"]["dicom_dir"]),
                                           int(cfg["predict"]["batch_size"]),
                                           resolve_workers(cfg["predict"]["workers"]))
    if table.empty:
        raise StepError(f"evaluate.natural_prevalence: none of the {len(rows)} indexed slices of the "
                        f"test patients could be read from {cfg['paths']['dicom_dir']}")
    truth = table[list(LABELS)].to_numpy()
    probs = table[[f"{label}_prob" for label in LABELS]].to_numpy()
    groups = table["patient_id"].astype(str).to_numpy()
    out = evaluate_all(truth, probs, thresholds, groups=groups, bootstrap=bootstrap, seed=seed)
    out["n_failed"] = failed
    levels = {"test patients, every slice": ((truth.astype(float), probs, groups, list(LABELS)), out)}
    if len(studies):
        patient = table.drop_duplicates("study_id").set_index("study_id")["patient_id"].astype(str)
        s_truth = studies[[f"{label}{TRUE_SUFFIX}" for label in LABELS]].to_numpy()
        s_probs = studies[list(LABELS)].to_numpy()
        s_groups = studies["study_id"].map(patient).to_numpy()
        out["studies"] = evaluate_all(s_truth, s_probs, thresholds, groups=s_groups,
                                      bootstrap=bootstrap, seed=seed)
        levels["test patients, every study"] = ((s_truth.astype(float), s_probs, s_groups, list(LABELS)),
                                                out["studies"])
    return {"metrics": out, "levels": levels}


def patient_ids(work_dir: Path, table: pd.DataFrame) -> np.ndarray:
    """The bootstrap's unit per row of a split table: patient_id from splits.csv, else the
    study, else the image itself (str array)."""
    splits = read_csv(Path(work_dir) / SPLITS_CSV, dtype=str)
    by_image = (splits.drop_duplicates("image_id").set_index("image_id")["patient_id"]
                if "patient_id" in splits.columns else pd.Series(dtype=str))
    patient = table["image_id"].astype(str).map(by_image)
    study = table["study_id"].astype(str).where(table["study_id"].astype(str) != "")
    return patient.fillna(study).fillna(table["image_id"].astype(str)).astype(str).to_numpy()


def test_set_text(table: pd.DataFrame, n_studies: int) -> str:
    """One sentence on the test set for report.html: its size and `any` prevalence."""
    share = float(table["any"].mean()) if len(table) else float("nan")
    return (f"Test split: {len(table)} images of {table['patient_id'].nunique()} patients "
            f"({n_studies} studies); {100 * share:.1f}% of images positive for any hemorrhage.")


def gradcam_examples(cascade, test, rows: list[int], ids, probs: np.ndarray, stride: int) -> list:
    """report.html's Grad-CAM overlays: for each example test image, the heatmap of every label
    at or above its threshold (of `any` when none is), at feature stride `stride`."""
    import cv2

    from ich.evaluation.explain import overlay
    from ich.evaluation.html import Example
    from ich.steps.explain import label_heatmaps

    if not rows:
        return []
    spec = cascade.spec
    centre = list(spec.offsets).index(0)
    targets = test.targets[rows]
    stacks = np.stack([np.asarray(test.images[test.neighbours[t]]) for t in targets])
    inputs, slices = spec.assemble(stacks), stacks[:, centre]
    out = []
    for j, label in enumerate(LABELS):
        chosen = [k for k, r in enumerate(rows) if probs[r, j] >= cascade.thresholds[label]
                  or (label == "any" and not any(probs[r, i] >= cascade.thresholds[lb]
                                                 for i, lb in enumerate(LABELS)))]
        if not chosen:
            continue
        for k, heat in zip(chosen, label_heatmaps(cascade, inputs[chosen], label, stride)):
            ok, data = cv2.imencode(".png", cv2.cvtColor(overlay(slices[k], heat), cv2.COLOR_RGB2BGR))
            if ok:
                out.append(Example(data.tobytes(), f"{ids[rows[k]]} {label} p={probs[rows[k], j]:.3f}"))
    return out


def study_results(series: pd.DataFrame) -> pd.DataFrame:
    """Per study of a series table (ich.evaluation.inference.refine_split's "series"): study_id,
    n_slices, the six probabilities (highest over its series) and the six labels
    (`<label>_true`: positive when any of its slices is). Series without a study id are left out."""
    true = [f"{label}{TRUE_SUFFIX}" for label in LABELS]
    return aggregate_studies(series, [*LABELS, *true], slices="n_slices")


def data_counts(work_dir: Path) -> dict[str, dict[str, int]]:
    """{split: {"images", "patients", <label>: positives}} from splits.csv, plus a row for the
    augmented training copies when augmented.csv exists."""
    splits = read_csv(Path(work_dir) / SPLITS_CSV, dtype={"image_id": str, "patient_id": str})
    counts = {}
    for split in SPLITS:
        part = splits[splits["split"] == split]
        n = label_counts(part)
        counts[split] = {"images": n["images"], "patients": int(part["patient_id"].nunique()),
                         **{label: n[label] for label in LABELS}}
    augmented = Path(work_dir) / AUGMENTED_CSV
    if augmented.is_file():
        n = label_counts(read_csv(augmented))
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
        "run directory": run_dir.resolve().name,  # its name only: the report may leave the machine
        **{f"{stage['name']} backbones": " + ".join(stage.get("backbones", []))
           for stage in meta.get("stages", []) if stage.get("backbones")},
        **{f"{stage['name']} stage": f"over each series' slices, {stage.get('pooling', 'max')} pooling per series"
           for stage in meta.get("stages", []) if stage.get("kind") == "sequence"},
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
        **dict(settings_rows(run_dir)),   # provenance.json: version, commit, inputs' hashes, command
    }
