"""Provenance (run_dir/provenance.json) and tracking (TensorBoard hparams and images, MLflow on a
local store), on hand-made run files: no training runs here."""

import hashlib
import json
import struct
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest

from ich import config, provenance, tracking
from tiny_workdir import make_workdir

REPO = Path(__file__).resolve().parents[1]


def _fake_run(tmp_path: Path, **overrides) -> tuple[dict, Path]:
    """A work dir (tiny_workdir) and a run dir with the files train and evaluate write."""
    work = make_workdir(tmp_path)
    run = tmp_path / "run"
    (run / "history").mkdir(parents=True)
    pd.DataFrame({"epoch": [0], "auc": [0.6], "loss": [0.7], "val_auc": [0.55], "val_loss": [0.8],
                  "learning_rate": [1e-3]}).to_csv(run / "history" / "stage1_frozen.csv", index=False)
    pd.DataFrame({"epoch": [0, 1], "auc": [0.7, 0.8], "loss": [0.5, 0.4], "val_auc": [0.75, 0.7],
                  "val_loss": [0.6, 0.5], "learning_rate": [1e-4] * 2}).to_csv(
        run / "history" / "stage1_finetune.csv", index=False)
    pd.DataFrame({"epoch": [0], "auc": [0.6], "loss": [0.9], "val_auc": [0.65], "val_loss": [1.0],
                  "learning_rate": [1e-4]}).to_csv(run / "history" / "stage2_finetune.csv", index=False)
    for name in ("stage1.keras", "stage2.keras", "cascade.json", "config.yaml"):
        (run / name).write_text(name)
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(json.dumps(
        {"labels": {"any": {"roc_auc": 0.9, "f1": 0.5, "threshold": 0.4, "confusion": [[1, 2], [3, 4]]},
                    "epidural": {"roc_auc": None}},
         "overall": {"macro_roc_auc": 0.8, "weighted_log_loss": 0.3}}))
    (run / "eval" / "report.md").write_text("# report")
    labels = tmp_path / "labels.csv"
    labels.write_text("ID,Label\nID_a_any,1\n")
    sets = [f"paths.work_dir={work}", f"paths.run_dir={run}", f"paths.labels_csv={labels}",
            *[f"{key}={value}" for key, value in overrides.items()]]
    return config.load(None, sets), run


def test_provenance_records_versions_hashes_times_and_commit(tmp_path):
    cfg, run = _fake_run(tmp_path)
    start = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    path = provenance.write(cfg, run, start, start + timedelta(minutes=5), argv=["ich", "train"])
    record = json.loads(path.read_text())
    assert record["ich"] == "0.1.0" and record["backend"] == "torch"
    assert record["started"] == "2025-01-02T03:04:05+00:00" and record["ended"] == "2025-01-02T03:09:05+00:00"
    assert record["command"] == ["ich", "train"]
    assert record["packages"]["keras"] and record["packages"]["pydantic"]
    assert record["inputs"]["labels_csv"]["sha256"] == hashlib.sha256(b"ID,Label\nID_a_any,1\n").hexdigest()
    splits = Path(cfg["paths"]["work_dir"]) / "splits.csv"
    assert record["inputs"]["splits_csv"]["sha256"] == hashlib.sha256(splits.read_bytes()).hexdigest()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout (CI clones one); a bare source tree has no commit
        assert record["git_commit"].split("-")[0] == head.stdout.strip()
    rows = dict(provenance.settings_rows(run))
    assert rows["ich version"] == "0.1.0" and rows["backend"] == "torch"
    assert rows["labels CSV sha256"] == record["inputs"]["labels_csv"]["sha256"][:16]
    assert provenance.settings_rows(tmp_path) == []  # a run without provenance: no rows
    # The command as a report shows it: absolute paths by their last part only.
    provenance.write(cfg, run, start, start, argv=["/opt/venv/bin/ich", "train", "--config",
                                                    "/home/dr_smith/cfg.yaml", "--set",
                                                    "paths.run_dir=/data/jones/run"])
    assert dict(provenance.settings_rows(run))["command"] == (
        "ich train --config .../cfg.yaml --set paths.run_dir=.../run")


def test_epoch_metrics_number_both_phases_in_a_row(tmp_path):
    _, run = _fake_run(tmp_path)
    series = tracking.epoch_metrics(run)
    assert series["stage1/val_auc"] == [(0, 0.55), (1, 0.75), (2, 0.7)]
    assert series["stage2/loss"] == [(0, 0.9)]
    assert tracking.best_val_auc(run) == {"best/stage1_val_auc": 0.75, "best/stage2_val_auc": 0.65}


def _events(folder: Path) -> list:
    """Every Event proto in the TensorBoard files of `folder` (TFRecord framing, CRCs skipped)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[offset + 12:offset + 12 + length])
            events.append(event)
            offset += 12 + length + 4
    return events


def test_tensorboard_gets_hparams_and_example_images(tmp_path):
    cfg, run = _fake_run(tmp_path, **{"train.tensorboard_examples": 3})
    tracking.after_train(cfg, run)
    tags = {value.tag for event in _events(run / "logs") for value in event.summary.value}
    assert "_hparams_/session_start_info" in tags and "best/stage1_val_auc" in tags
    images = [value for event in _events(run / "logs" / "examples") for value in event.summary.value
              if value.HasField("image")]
    assert len(images) == 1 and images[0].image.width == 32 * 3  # 3 images side by side
    # Only new models are logged: a second call (train skipped) writes nothing more.
    before = len(list((run / "logs").rglob("events.out.tfevents.*")))
    tracking.after_train(cfg, run)
    assert len(list((run / "logs").rglob("events.out.tfevents.*"))) == before


def test_mlflow_local_store_gets_params_epochs_test_metrics_and_files(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="optional extra: pip install 'ich[mlflow]'")
    store = tmp_path / "mlruns"
    cfg, run = _fake_run(tmp_path, tracking="mlflow", **{"mlflow.tracking_uri": str(store),
                                                          "train.tensorboard": "false"})
    tracking.after_train(cfg, run)
    tracking.after_train(cfg, run)        # nothing new: nothing logged twice
    tracking.after_evaluate(cfg, run)
    run_id = json.loads((run / "tracking.json").read_text())["mlflow_run_id"]
    client = mlflow.tracking.MlflowClient(store.resolve().as_uri())
    logged = client.get_run(run_id)
    assert logged.data.params["train.batch_size"] == "32"
    assert logged.data.params["split.fractions"] == "[0.8, 0.1, 0.1]"
    history = client.get_metric_history(run_id, "stage1/val_auc")
    assert [(m.step, m.value) for m in history] == [(0, 0.55), (1, 0.75), (2, 0.7)]
    assert logged.data.metrics["best/stage2_val_auc"] == 0.65
    assert logged.data.metrics["test/any/roc_auc"] == 0.9
    assert logged.data.metrics["test/weighted_log_loss"] == 0.3
    assert "test/epidural/roc_auc" not in logged.data.metrics  # None: undefined, not logged
    files = {a.path for a in client.list_artifacts(run_id, "model")}
    assert {"model/stage1.keras", "model/stage2.keras", "model/cascade.json"} <= files
    assert {a.path for a in client.list_artifacts(run_id, "eval")} == {"eval/metrics.json", "eval/report.md"}
