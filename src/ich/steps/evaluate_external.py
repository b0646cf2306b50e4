"""`ich evaluate --model RUN_DIR --dataset NAME --data PATH --out OUT_DIR`: a trained model on
data never used in training (CQ500, an RSNA-format folder, or a user's table).

In: the run (cascade.json: input description, stages, thresholds; the stage models), the data
set read by ich.data.datasets (one axial series per study), and the config (evaluate.bootstrap,
evaluate.report_examples, predict.batch_size, predict.workers, seed). Every slice gets the
model's own preprocessing and context (windows, size and neighbouring slices of cascade.json,
as `ich predict`); a study's probability per label is its series' (the sequence stage's output
when the run has one, else the maximum over its scored slices); the thresholds are the run's
(the same for slices and studies).
Out, in OUT_DIR only (never in RUN_DIR):
- metrics.json: {"studies": {"labels": {label: {"roc_auc", "roc_auc_ci", ...}}, "overall"},
  "slices": {...} (where the data set has slice labels), "dataset", "thresholds"};
- studies.csv: `study` (the data set's name for it), then one probability column per label;
- predictions.csv: study, file (relative to --data), image_id, series_id, the six probabilities;
- series.csv: every series seen, whether it was scored and why (not);
- failures.csv: path, reason for everything that could not be used; the rest is scored;
- report.html: the self-contained report (ich.evaluation.html).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger("ich")

SERIES_CSV = "series.csv"
SERIES_SUFFIX = "_series"  # a scored slice's column holding its series' probability
REPORT_HTML = "report.html"


def run_external(run_dir: Path, dataset: str, data: Path, out_dir: Path, cfg: dict) -> Path:
    """Score the run in `run_dir` on the data set and write OUT_DIR; return metrics.json's path.
    The Keras backend must be chosen first (the CLI does it)."""
    from ich.config import resolve_workers
    from ich.constants import FAILURES_CSV, LABELS, METRICS_JSON, PREDICTIONS_CSV, STUDIES_CSV
    from ich.data.datasets import DatasetError, load_dataset
    from ich.errors import StepError
    from ich.evaluation.inference import load_cascade
    from ich.evaluation.studies import aggregate_studies
    from ich.io import Timer, summary, write_csv, write_json
    from ich.steps.explain import _refuse_run_dir

    timer = Timer()
    run_dir, data, out_dir = Path(run_dir), Path(data), Path(out_dir)
    _refuse_run_dir(out_dir, run_dir)
    try:
        cascade = load_cascade(run_dir)
        ds = load_dataset(dataset, data)
    except (ValueError, DatasetError) as err:
        raise StepError(str(err)) from err
    log.info("evaluate: %s at %s: %d studies, %d slices to score, %d problems", dataset, data,
             ds.study_truth["study"].nunique(), len(ds.files), len(ds.failures))
    failures = list(ds.failures)
    scored, slices = predict_files(cascade, ds.files, int(cfg["predict"]["batch_size"]),
                                   resolve_workers(cfg["predict"]["workers"]), failures)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(pd.DataFrame(failures, columns=["path", "reason"]), out_dir / FAILURES_CSV)
    write_csv(ds.series, out_dir / SERIES_CSV)
    if scored.empty:
        raise StepError(f"nothing could be scored in {data}; reasons in {out_dir / FAILURES_CSV}")
    per_series = [f"{label}{SERIES_SUFFIX}" for label in LABELS]
    studies = aggregate_studies(scored, per_series, study="study", keep=["patient_id"])
    studies = studies.rename(columns=dict(zip(per_series, LABELS)))
    write_csv(studies[["study", *LABELS]], out_dir / STUDIES_CSV)
    table = scored.assign(file=[_relative(p, data) for p in scored["path"]])
    write_csv(table[["study", "file", "image_id", "series_id", *LABELS]], out_dir / PREDICTIONS_CSV)

    labels = ds.labels
    thresholds = cascade.thresholds
    bootstrap, seed = int(cfg["evaluate"]["bootstrap"]), int(cfg["seed"])
    missing = sorted(set(ds.study_truth["study"]) - set(studies["study"]))
    for study in missing:
        failures.append({"path": study, "reason": "no readable slice: the study is not scored"})
    if missing:
        write_csv(pd.DataFrame(failures, columns=["path", "reason"]), out_dir / FAILURES_CSV)
    joined = ds.study_truth.merge(studies, on="study", suffixes=("_true", ""))
    levels = {"studies": level_data("studies", joined, labels, joined["patient"])}
    if ds.slice_truth is not None:
        sl = table.merge(ds.slice_truth, on="path", suffixes=("", "_true"))
        patient = sl["study"].map(ds.study_truth.set_index("study")["patient"]).fillna(sl["study"])
        sl_labels = [label for label in labels if f"{label}_true" in sl.columns]
        if len(sl):
            levels["slices"] = level_data("slices", sl, sl_labels, patient)
    metrics = {}
    from ich.evaluation.metrics import evaluate_table

    for name, (y_true, y_prob, groups, lv_labels) in levels.items():
        metrics[name] = evaluate_table(y_true, y_prob, thresholds, groups, labels=lv_labels,
                                       bootstrap=bootstrap, seed=seed,
                                       count_name="n_studies" if name == "studies" else "n_images")
    metrics["dataset"] = {"name": dataset, "studies": int(len(joined)), "slices_scored": int(len(scored)),
                          "problems": len(failures), "labels": labels}
    metrics["thresholds"] = {"values": {k: float(thresholds[k]) for k in labels},
                             "method": cascade.meta.get("threshold_method"), "source": "the run (cascade.json)"}
    write_html_report(out_dir / REPORT_HTML, cascade, run_dir, metrics, levels, bootstrap, seed,
                      title=f"External evaluation on {dataset}",
                      test_set=f"{dataset} at {data.name}: {len(joined)} studies scored "
                               f"({len(scored)} slices); {len(failures)} files or studies could not "
                               "be used (failures.csv).",
                      examples=example_overlays(cascade, scored, slices, int(cfg["evaluate"]["report_examples"]),
                                                int(cfg["explain"]["feature_stride"])),
                      notes=external_notes(dataset))
    path = write_json(metrics, out_dir / METRICS_JSON)
    auc = metrics["studies"]["labels"].get("any", {})
    summary("evaluate", f"{dataset}: {len(joined)} studies, study AUC any {_fmt(auc.get('roc_auc'))} "
            f"{auc.get('roc_auc_ci')} -> {out_dir}", len(scored), "slices", timer)
    return path


def predict_files(cascade, files: pd.DataFrame, batch_size: int, workers: int, failures: list
                  ) -> tuple[pd.DataFrame, np.ndarray]:
    """Decode and predict the data set's chosen slices with the run's preprocessing and context.
    Out: (files' rows that were read, with the six probabilities added; their decoded uint8
    RGB slices). Unreadable files are appended to `failures`."""
    from ich.constants import LABELS
    from ich.data.sources import decode_all

    spec = cascade.spec
    rows, images, info = [], [], []
    paths = [Path(p) for p in files["path"]]
    for (path, image, meta), (_, row) in zip(decode_all(paths, spec.png_windows, spec.image_size, workers),
                                             files.iterrows()):
        if image is None:
            failures.append({"path": str(path), "reason": meta["reason"]})
            continue
        rows.append(row)
        images.append(image)
        info.append({"series_id": row["series_id"], "position": row["position"]})
    if not rows:
        return pd.DataFrame(columns=[*files.columns, *LABELS]), np.zeros((0,))
    table = pd.DataFrame(info)
    probs, runs, series = cascade.predict_slices(np.stack(images), table["series_id"],
                                                 table["position"], batch_size)
    scored = pd.DataFrame(rows).reset_index(drop=True)
    for j, label in enumerate(LABELS):
        scored[label] = probs[:, j]
    # Each slice also carries its series' result (the sequence stage's, or its highest slice):
    # a study is then the highest over its series.
    for j, label in enumerate(LABELS):
        column = np.empty(len(scored), dtype=np.float32)
        for k, run in enumerate(runs):
            column[run] = series[k, j]
        scored[f"{label}{SERIES_SUFFIX}"] = column
    return scored, np.stack(images)


def level_data(name: str, joined: pd.DataFrame, labels: list[str], groups) -> tuple:
    """(truth (N, L) float with NaN, probabilities (N, L), groups, labels) from a table holding
    `<label>_true` (or, for studies, the truth under the label's name with probabilities
    suffixed) columns."""
    truth_cols = [f"{label}_true" for label in labels]
    y_true = joined[truth_cols].to_numpy(dtype=np.float64)
    y_prob = joined[labels].to_numpy(dtype=np.float64)
    return y_true, y_prob, np.asarray(groups).astype(str), labels


def example_overlays(cascade, scored: pd.DataFrame, slices: np.ndarray, k: int, stride: int) -> list:
    """Grad-CAM overlays of `any` (at feature stride `stride`) on the highest-scoring slice of
    the k studies most likely positive, as report.html examples."""
    import cv2

    from ich.data.inputs import neighbour_rows
    from ich.evaluation.explain import overlay
    from ich.evaluation.html import Example
    from ich.steps.explain import label_heatmaps

    if k <= 0 or not len(scored):
        return []
    best = scored.loc[scored.groupby("study")["any"].idxmax()].sort_values("any", ascending=False).head(k)
    spec = cascade.spec
    neighbours = neighbour_rows(scored["series_id"], scored["position"], spec.offsets)
    rows = best.index.to_numpy()
    inputs = spec.assemble(slices[neighbours[rows]])
    heats = label_heatmaps(cascade, inputs, "any", stride)
    out = []
    for i, heat, (_, row) in zip(rows, heats, best.iterrows()):
        ok, data = cv2.imencode(".png", cv2.cvtColor(overlay(slices[i], heat), cv2.COLOR_RGB2BGR))
        if ok:
            out.append(Example(data.tobytes(), f"{row['study']}: p(any) {row['any']:.3f}"))
    return out


def write_html_report(path: Path, cascade, run_dir: Path, metrics: dict, levels: dict,
                      bootstrap: int, seed: int, title: str, test_set: str, examples: list,
                      notes: list[str], comparison: dict | None = None,
                      study_source: str | None = None) -> Path:
    """report.html from the levels' arrays and metrics (shared with `ich evaluate` on a run);
    `comparison` (column name -> metrics) adds the side-by-side table of the stages."""
    from ich.evaluation.html import Level, Report, write_html

    report_levels = [Level(name, lv_labels, y_true, y_prob, groups, metrics[name], bootstrap, seed)
                     for name, (y_true, y_prob, groups, lv_labels) in levels.items()]
    extra = {"study_source": study_source} if study_source else {}
    return write_html(path, Report(title=title, levels=report_levels,
                                   model_card=model_card(cascade.meta, run_dir), examples=examples,
                                   notes=notes, test_set=test_set, comparison=comparison or {},
                                   **extra))


def model_card(meta: dict, run_dir: Path) -> dict[str, object]:
    """What the model is and how it was trained: cascade.json and the run's resolved config
    (config.yaml beside the models, where `ich train` leaves it). File names only, never
    absolute paths: the report is meant to leave the machine."""
    import yaml

    from ich.constants import LABELS

    card: dict[str, object] = {}
    for stage in meta.get("stages", []):
        given = f" given {stage['given']}" if stage.get("given") else ""
        card[f"{stage['name']}"] = (f"{' + '.join(stage.get('backbones', [])) or '?'} -> "
                                    f"{', '.join(stage['labels'])}{given}")
    spec = meta.get("input", {})
    card["input"] = (f"{spec.get('image_size')} px; windows " + ", ".join(
        f"{c} {spec.get('windows', {}).get(c)}" for c in spec.get("channels", []))
        + f"; slice offsets {spec.get('offsets')}; channels per slice {spec.get('slice_channels')}")
    cfg_path = Path(run_dir) / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else None
    if cfg:
        card["training data"] = (f"{Path(cfg['paths']['labels_csv']).name}, balanced sample of up to "
                                 f"{cfg['sample']['per_label']} positives per subtype and as many negatives")
        card["split"] = f"train/val/test fractions {cfg['split']['fractions']}, patient-grouped"
        card["seed"] = cfg.get("seed")
        card["weights"] = cfg["model"].get("weights") or "random init"
    from ich.provenance import settings_rows

    card.update(settings_rows(run_dir))  # version, commit, devices, inputs' hashes, when, command
    card["backend"] = meta.get("backend", "?")
    card["mixed precision"] = meta.get("mixed_precision", "?")
    card["versions"] = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
    thresholds = meta.get("thresholds") or {}
    card["thresholds"] = (", ".join(f"{k} {float(thresholds[k]):.3f}" for k in LABELS if k in thresholds)
                          + f" ({meta.get('threshold_method') or 'not chosen'})")
    card["intended use"] = "research on intracranial hemorrhage detection; not for clinical use"
    return card


def external_notes(dataset: str) -> list[str]:
    """The report's notes for an external data set."""
    notes = ["A study's probability per label is the maximum over the slices of its scored series; "
             "the study is called positive when that maximum reaches the run's threshold.",
             "Intervals resample patients (in CQ500, one study per patient) with replacement."]
    if dataset == "cq500":
        notes += ["CQ500 truth: the majority of the three readers (ICH -> any, IPH, IVH, SDH, EDH, "
                  "SAH -> the subtypes). There are no slice labels.",
                  "Series: localizers/scouts and non-axial reformats are skipped; of several axial "
                  "series the one closest to 5 mm slices (the RSNA training thickness) is scored "
                  "(series.csv lists every series and why)."]
    return notes


def _relative(path: str, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return Path(path).name


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
