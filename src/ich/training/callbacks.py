"""Keras callbacks of one training phase, and the bookkeeping that lets a killed run resume.

In: the files of one (stage, phase): a best-model path, a CSV history, a TensorBoard folder and a
backup folder. Out: a list of callbacks for `model.fit`:
  TerminateOnNaN raising, so a NaN run stops with an error instead of looking finished
  ReduceLROnPlateau / EarlyStopping on train.monitor (val_auc, higher better, or val_loss,
                 lower better), their counters rebuilt from the CSV on resume (the former
                 first: it adds the epoch's learning rate to the logs); under a scheduled LR
                 (train.lr_schedule cosine) LearningRateLog takes its place
  CSVLogger      history/<stage>_<phase>.csv, appended to on resume
  BestModel      the best weights so far (by the monitor), written atomically, with their score in a
                 .json beside them, shared by both phases of a stage (phase 2 must beat phase 1)
  TensorBoardX   scalars per epoch (losses, AUC, LR) via tensorboardX: Keras's own TensorBoard
                 callback needs TensorFlow, which torch and jax installs do not have
  BackupAndRestore last, so that a backup is the commit point of an epoch: a run killed with
                 SIGKILL restarts at the epoch after its last backup, with weights, optimizer
                 state and learning rate as they were (checked on torch and jax, Keras 3.15).
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import keras

from ich.io import atomic_path, write_json

MONITOR = "val_auc"
# Which way is better for each monitor train.monitor may name.
MONITOR_MODES = {"val_auc": "max", "val_loss": "min"}
WEIGHTS_SUFFIX = ".weights.h5"
# File BackupAndRestore writes in its folder (Keras 3 internals); read only to trim the CSV.
_BACKUP_METADATA = "training_metadata.json"


class BestModel(keras.callbacks.Callback):
    """Save the model's weights whenever `monitor` beats the best so far, atomically, with a score.

    Unlike keras.callbacks.ModelCheckpoint, the best score survives a restart (it is read back
    from the score file beside the weights) so a resumed or second phase only overwrites a better
    model, and a kill during the save leaves the previous file intact. Weights only, without
    optimizer state: a third of the size, and loading them is several times faster than from a
    .keras archive (which the train step writes once, at the end, from these weights).
    """

    def __init__(self, path: str | Path, monitor: str = MONITOR, keep: str = "best"):
        super().__init__()
        if keep not in ("best", "last"):
            raise ValueError(f"BestModel: keep must be best or last, not {keep!r}")
        self.keep = keep
        self.path = Path(path)
        if not self.path.name.endswith(WEIGHTS_SUFFIX):
            raise ValueError(f"BestModel: {self.path} must end with {WEIGHTS_SUFFIX}")
        self.monitor = monitor
        self.sign = 1.0 if MONITOR_MODES[monitor] == "max" else -1.0   # compare sign * value, higher better
        score = read_best(self.path)
        self.best = score["value"] if score and score.get("monitor", MONITOR) == monitor else None

    def on_epoch_end(self, epoch, logs=None):
        """Save if logs[monitor] improved (keep "last": every epoch); a NaN score never counts as
        better and is never saved."""
        value = (logs or {}).get(self.monitor)
        if value is None or math.isnan(value):
            return
        if (self.keep == "best" and self.best is not None
                and not self.sign * value > self.sign * self.best):
            return
        self.best = float(value)
        # A functional view over the same layers: the model's weights without its optimizer.
        view = keras.Model(self.model.inputs, self.model.outputs, name=self.model.name)
        tmp = self.path.with_name(f".{self.path.name[:-len(WEIGHTS_SUFFIX)]}.{os.getpid()}.tmp{WEIGHTS_SUFFIX}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            view.save_weights(tmp)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        write_json({"monitor": self.monitor, "value": self.best, "epoch": int(epoch)},
                   score_path(self.path))


def score_path(weights_path: Path) -> Path:
    """The JSON beside a best-weights file that records its score."""
    weights_path = Path(weights_path)
    return weights_path.with_name(weights_path.name.removesuffix(WEIGHTS_SUFFIX) + ".json")


def read_best(weights_path: Path) -> dict | None:
    """{"monitor", "value", "epoch"} of the best weights at `weights_path`, or None if none."""
    score = score_path(weights_path)
    if not (Path(weights_path).is_file() and score.is_file()):
        return None
    return json.loads(score.read_text())


class TensorBoardX(keras.callbacks.Callback):
    """Per-epoch scalars (every log entry, plus the learning rate) to TensorBoard event files.

    `step_offset` numbers the epochs of a second phase after those of the first, so both phases
    of a stage draw one continuous curve.
    """

    def __init__(self, log_dir: str | Path, step_offset: int = 0):
        super().__init__()
        self.log_dir = str(log_dir)
        self.step_offset = int(step_offset)
        self.writer = None

    def on_train_begin(self, logs=None):
        """Open the writer (appending to any existing event files in log_dir)."""
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(self.log_dir)

    def on_epoch_end(self, epoch, logs=None):
        """Write each numeric log value and the current learning rate."""
        step = self.step_offset + epoch
        for key, value in (logs or {}).items():
            if isinstance(value, (int, float)) or hasattr(value, "__float__"):
                self.writer.add_scalar(f"epoch/{key}", float(value), step)
        if "learning_rate" not in (logs or {}):
            lr = keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
            self.writer.add_scalar("epoch/learning_rate", float(lr), step)
        self.writer.flush()

    def on_train_end(self, logs=None):
        """Close the writer."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class LearningRateLog(keras.callbacks.Callback):
    """Put the optimizer's learning rate at the end of each epoch into the logs, as
    ReduceLROnPlateau does, for the CSV history and TensorBoard when the LR follows a schedule."""

    def on_epoch_end(self, epoch, logs=None):
        """Add logs["learning_rate"] (the value the schedule gives at the current step)."""
        if logs is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class _Resumable:
    """Mixin: after on_train_begin resets the counters, set them to what the CSV history implies."""

    def __init__(self, *args, resume_best: float | None = None, resume_wait: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_best = resume_best
        self.resume_wait = resume_wait

    def on_train_begin(self, logs=None):
        """Reset as Keras does, then restore best and wait from the finished epochs."""
        super().on_train_begin(logs)
        if self.resume_best is not None:
            self.best = self.resume_best
            self.wait = self.resume_wait


class ResumableEarlyStopping(_Resumable, keras.callbacks.EarlyStopping):
    """EarlyStopping whose patience counter survives a restart."""


class ResumableReduceLROnPlateau(_Resumable, keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau whose patience counter survives a restart."""


def resume_epoch(backup_dir: str | Path) -> int:
    """The epoch a BackupAndRestore in `backup_dir` will resume at (0 when there is no backup)."""
    meta = Path(backup_dir) / _BACKUP_METADATA
    if not meta.is_file():
        return 0
    try:
        return int(json.loads(meta.read_text())["epoch"])
    except (ValueError, KeyError, TypeError):
        return 0


def trim_history(csv_path: str | Path, epochs: int) -> list[dict]:
    """Keep only rows of epochs < `epochs` in the CSV (a killed run may have logged an epoch
    whose backup never landed); return the kept rows as dicts."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        return []
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    kept = [row for row in rows if int(row["epoch"]) < epochs]
    if len(kept) != len(rows):
        with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as f:
            if kept:
                writer = csv.DictWriter(f, fieldnames=list(kept[0]))
                writer.writeheader()
                writer.writerows(kept)
    return kept


def patience_state(rows: list[dict], monitor: str = MONITOR) -> tuple[float | None, int]:
    """(best value, epochs since it) of `monitor` over history rows; (None, 0) when empty."""
    values = [float(row[monitor]) for row in rows if row.get(monitor) not in (None, "")]
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return None, 0
    best = (max if MONITOR_MODES[monitor] == "max" else min)(values)
    last_best = max(i for i, v in enumerate(values) if v == best)
    return best, len(values) - 1 - last_best


def phase_callbacks(*, best_path: Path, csv_path: Path, backup_dir: Path, log_dir: Path | None,
                    patience: int, lr_patience: int, lr_factor: float, min_lr: float,
                    step_offset: int = 0, monitor: str = MONITOR,
                    plateau: bool = True, keep: str = "best") -> list[keras.callbacks.Callback]:
    """All callbacks of one phase, in the order that makes resuming exact (see module doc).

    plateau False: the optimizer's LR is a schedule (ich.training.schedule), which
    ReduceLROnPlateau cannot set; the LR is only logged. On resume (a backup exists in
    backup_dir) the CSV is trimmed to the backed-up epochs and appended to, and the patience
    counters continue from it; otherwise the CSV starts afresh.
    log_dir None turns TensorBoard off. keep: which epoch's weights the phase leaves at best_path
    (BestModel): the best monitored one, or the last.
    """
    start = resume_epoch(backup_dir)
    rows = trim_history(csv_path, start) if start else []
    best, since = patience_state(rows, monitor)
    mode = MONITOR_MODES[monitor]
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    # First at epoch end: it puts the epoch's learning rate into the logs the CSV and
    # TensorBoard record. min_delta 0 so "better" means the same here, in EarlyStopping
    # and in BestModel; with patience p the wait after k flat epochs is k mod p, exactly
    # what Keras would hold had the run not been killed.
    learning_rate = (ResumableReduceLROnPlateau(monitor=monitor, mode=mode, patience=lr_patience,
                                                factor=lr_factor, min_lr=min_lr, min_delta=0.0,
                                                verbose=1, resume_best=best,
                                                resume_wait=since % max(lr_patience, 1))
                     if plateau else LearningRateLog())
    callbacks = [
        keras.callbacks.TerminateOnNaN(raise_error=True),
        learning_rate,
        ResumableEarlyStopping(monitor=monitor, mode=mode, patience=patience, verbose=1,
                               resume_best=best, resume_wait=since),
        keras.callbacks.CSVLogger(str(csv_path), append=bool(start)),
        BestModel(best_path, monitor, keep),
    ]
    if log_dir is not None:
        callbacks.append(TensorBoardX(log_dir, step_offset=step_offset))
    callbacks.append(keras.callbacks.BackupAndRestore(str(backup_dir), double_checkpoint=True))
    return callbacks
