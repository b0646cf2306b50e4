"""Experiment tracking after `train` and `evaluate`: TensorBoard hyperparameters and example
images, and optional MLflow logging (`tracking: mlflow`).

In: the config and the files the steps wrote (run_dir/history/<stage>_<phase>.csv, the models,
cascade.json, config.yaml, provenance.json, eval/metrics.json and the report). Out:
  run_dir/logs/hparams/       TensorBoard HPARAMS tab: the flattened config and best val AUCs
  run_dir/logs/examples/      TensorBoard IMAGES tab: a few training images with their labels
  MLflow (mlflow.tracking_uri, a local folder by default): one MLflow run per ich run dir with
    params (the flattened config), per-epoch metrics (<stage>/<column>, one step per epoch over
    both phases), the final test metrics (test/<label>/<metric>) and the model files.
  run_dir/tracking.json       what was logged already, so a skipped step logs nothing twice.

Everything is read back from the files the steps wrote, never from the training loop, so a
resumed (killed) run logs exactly the epochs its history holds.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from ich.constants import (CASCADE_JSON, EVAL_DIR, HISTORY_DIR, LABELS, LOGS_DIR, METRICS_JSON,
                           PNG_DIR, REPORT_MD, SPLITS_CSV, STAGE1_MODEL, STAGE2_MODEL)

log = logging.getLogger("ich")

TRACKING_JSON = "tracking.json"
RUN_CONFIG = "config.yaml"
PHASES = ("frozen", "finetune")
MODEL_FILES = (STAGE1_MODEL, STAGE2_MODEL, CASCADE_JSON, RUN_CONFIG, "provenance.json")
MLFLOW_PARAM_MAX = 6000  # MLflow refuses longer parameter values


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and None become strings (MLflow, TensorBoard)."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def epoch_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{"stage1/val_auc": [(step, value), ...], ...} from the history CSVs: the phases of a stage
    numbered one after the other, as on the TensorBoard curves."""
    import pandas as pd

    series: dict[str, list[tuple[int, float]]] = {}
    for stage_csvs in _history_by_stage(Path(run_dir)).items():
        stage, paths = stage_csvs
        offset = 0
        for path in paths:
            table = pd.read_csv(path)
            for i, row in enumerate(table.to_dict("records")):
                for column, value in row.items():
                    if column == "epoch" or not isinstance(value, (int, float)) or math.isnan(value):
                        continue
                    series.setdefault(f"{stage}/{column}", []).append((offset + i, float(value)))
            offset += len(table)
    return series


def best_val_auc(run_dir: Path) -> dict[str, float]:
    """{"best/stage1_val_auc": ..} over every epoch of each stage's history."""
    out = {}
    for key, points in epoch_metrics(run_dir).items():
        stage, column = key.split("/", 1)
        if column == "val_auc" and points:
            out[f"best/{stage}_val_auc"] = max(value for _, value in points)
    return out


def test_metrics(metrics: dict) -> dict[str, float]:
    """The numbers of metrics.json as flat MLflow keys: test/<label>/<metric>, test/<overall>."""
    flat = {}
    for label, values in metrics.get("labels", {}).items():
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
                flat[f"test/{label}/{name}"] = float(value)
    for name, value in metrics.get("overall", {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"test/{name}"] = float(value)
    return flat


def after_train(cfg: dict, run_dir: str | Path) -> None:
    """TensorBoard hparams and examples, then MLflow, for newly trained models (else nothing)."""
    run_dir = Path(run_dir)
    state = _state(run_dir)
    stamp = _stamp(run_dir, [STAGE1_MODEL, STAGE2_MODEL])
    if stamp is None or state.get("trained") == stamp:
        return
    if cfg["train"]["tensorboard"]:
        write_tensorboard(cfg, run_dir)
    if cfg["tracking"] == "mlflow":
        state["mlflow_run_id"] = mlflow_log_training(cfg, run_dir, state.get("mlflow_run_id"))
    state["trained"] = stamp
    _save_state(run_dir, state)


def after_evaluate(cfg: dict, run_dir: str | Path) -> None:
    """MLflow: the final test metrics and the report, once per new metrics.json."""
    run_dir = Path(run_dir)
    state = _state(run_dir)
    stamp = _stamp(run_dir, [f"{EVAL_DIR}/{METRICS_JSON}"])
    if cfg["tracking"] != "mlflow" or stamp is None or state.get("evaluated") == stamp:
        return
    state["mlflow_run_id"] = mlflow_log_evaluation(cfg, run_dir, state.get("mlflow_run_id"))
    state["evaluated"] = stamp
    _save_state(run_dir, state)


def write_tensorboard(cfg: dict, run_dir: Path) -> None:
    """The HPARAMS entry (config + best val AUCs) and up to train.tensorboard_examples images."""
    from tensorboardX import SummaryWriter

    logs = run_dir / LOGS_DIR
    hparams = {key: value for key, value in flatten(cfg).items() if not key.startswith("paths.")}
    with SummaryWriter(str(logs / "hparams")) as writer:
        writer.add_hparams(hparams, best_val_auc(run_dir) or {"best/none": 0.0}, name=run_dir.name)
    images, captions = example_images(cfg, int(cfg["train"]["tensorboard_examples"]))
    if len(images):
        with SummaryWriter(str(logs / "examples")) as writer:
            writer.add_images("train examples (R blood, G brain, B bone)", images, 0,
                              dataformats="NHWC")
            writer.add_text("train examples", "  \n".join(captions), 0)


def example_images(cfg: dict, n: int):
    """Up to n training PNGs (uint8 NHWC, in splits.csv order, positives first) with captions."""
    import numpy as np

    from ich.data.png import read_png
    from ich.io import read_csv

    work = Path(cfg["paths"]["work_dir"])
    if n <= 0 or not (work / SPLITS_CSV).is_file():
        return np.zeros((0, 1, 1, 3), np.uint8), []
    splits = read_csv(work / SPLITS_CSV)
    train = splits[splits["split"] == "train"].sort_values("any", ascending=False, kind="stable")
    images, captions = [], []
    for row in train.head(n).to_dict("records"):
        path = work / PNG_DIR / f"{row['image_id']}.png"
        if not path.is_file():
            continue
        images.append(read_png(path))
        positive = [label for label in LABELS if row.get(label) == 1]
        captions.append(f"{len(images)}. {row['image_id']}: {', '.join(positive) or 'no hemorrhage'}")
    if not images:
        return np.zeros((0, 1, 1, 3), np.uint8), []
    side = min(image.shape[0] for image in images)
    return np.stack([image[:side, :side] for image in images]), captions


def mlflow_log_training(cfg: dict, run_dir: Path, run_id: str | None) -> str:
    """Params, per-epoch metrics, best val AUCs and the model files; return the MLflow run id."""
    mlflow = _mlflow(cfg)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_dir.name) as run:
        params = {key: str(value)[:MLFLOW_PARAM_MAX] for key, value in flatten(cfg).items()}
        if run_id is None:
            mlflow.log_params(params)
        for key, points in epoch_metrics(run_dir).items():
            for step, value in points:
                mlflow.log_metric(key, value, step=step)
        if best := best_val_auc(run_dir):
            mlflow.log_metrics(best)
        for name in MODEL_FILES:
            if (run_dir / name).is_file():
                mlflow.log_artifact(str(run_dir / name), artifact_path="model")
        log.info("tracking: MLflow run %s (%s): params, %d metric series, model files", run.info.run_id,
                 cfg["mlflow"]["tracking_uri"], len(epoch_metrics(run_dir)))
        return run.info.run_id


def mlflow_log_evaluation(cfg: dict, run_dir: Path, run_id: str | None) -> str:
    """The test metrics of eval/metrics.json and the report files; return the MLflow run id."""
    mlflow = _mlflow(cfg)
    eval_dir = run_dir / EVAL_DIR
    metrics = json.loads((eval_dir / METRICS_JSON).read_text())
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_dir.name) as run:
        mlflow.log_metrics(test_metrics(metrics))
        for name in (METRICS_JSON, REPORT_MD):
            if (eval_dir / name).is_file():
                mlflow.log_artifact(str(eval_dir / name), artifact_path="eval")
        log.info("tracking: MLflow run %s: %d test metrics", run.info.run_id, len(test_metrics(metrics)))
        return run.info.run_id


def _mlflow(cfg: dict):
    try:
        import mlflow
    except ImportError as err:
        from ich.errors import StepError

        raise StepError("tracking: mlflow needs the mlflow package: pip install 'ich[mlflow]', "
                        "or set tracking: none") from err
    uri = str(cfg["mlflow"]["tracking_uri"])
    if "://" not in uri and not uri.startswith(("file:", "sqlite:", "databricks")):
        # A plain folder: MLflow's local file store. MLflow 3 keeps it in maintenance mode and
        # asks for an explicit opt-in; a folder beside the runs is what `tracking: mlflow` means.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = Path(uri).resolve().as_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg["mlflow"]["experiment"])
    return mlflow


def _history_by_stage(run_dir: Path) -> dict[str, list[Path]]:
    stages: dict[str, list[Path]] = {}
    for stage in ("stage1", "stage2"):
        paths = [run_dir / HISTORY_DIR / f"{stage}_{phase}.csv" for phase in PHASES]
        paths = [p for p in paths if p.is_file() and p.stat().st_size]
        if paths:
            stages[stage] = paths
    return stages


def _stamp(run_dir: Path, names: list[str]) -> list[int] | None:
    times = [(run_dir / name).stat().st_mtime_ns for name in names if (run_dir / name).is_file()]
    return times or None


def _state(run_dir: Path) -> dict:
    path = run_dir / TRACKING_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_state(run_dir: Path, state: dict) -> None:
    from ich.io import write_json

    write_json(state, run_dir / TRACKING_JSON)
