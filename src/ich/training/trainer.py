"""Train one stage of the cascade: its phases, callbacks, resume, and the exported model.

In: the config, a `Stage` (ich.training.stages), the input description, the run directory,
and the stage's training and validation batches. Out, in the run directory:
  <stage>.keras                 the best weights (by train.monitor: val AUC or val loss), float32, no optimizer,
                                no augmentation layers
  history/<stage>_<phase>.csv   per-epoch losses, AUC and learning rate
  logs/<stage>/                 TensorBoard event files
  checkpoints/, backup/         in-progress state: a killed run resumes at its last finished epoch

Each stage has two phases: "frozen" (head only, frozen_lr) and "finetune" (whole network,
finetune_lr, BatchNorm in inference mode for pretrained weights). With model.weights null
(random init) the frozen phase is skipped: a head on frozen random features learns nothing worth
keeping, so the whole network trains from the first epoch with BatchNorm learning its statistics.
A resumed stage first checks that its settings and inputs (the split above all) are those its
in-progress state was made with; otherwise it starts the stage fresh and says why.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import warnings
from pathlib import Path

import keras

from ich import backend
from ich.constants import HISTORY_DIR, LOGS_DIR
from ich.data.inputs import InputSpec
from ich.errors import StepError
from ich.io import Timer, atomic_path, summary, write_json
from ich.models.cascade import set_backbone_trainable
from ich.models.online_augment import online_augmentation
from ich.stamps import Stamp, difference
from ich.training.callbacks import phase_callbacks, read_best, resume_epoch
from ich.training.optimizer import adam
from ich.training.schedule import cuts_on_plateau, learning_rate
from ich.training.stages import (PHASES, Stage, phase_epochs, phase_lr, stage_batch_size,
                                 stage_seed)

log = logging.getLogger("ich")

CHECKPOINT_DIR = "checkpoints"    # best model of each stage while it trains
BACKUP_DIR = "backup"             # BackupAndRestore folders, phase done markers, what a stage started from


def train_stage(cfg: dict, stage: Stage, spec: InputSpec, run_dir: Path, stamp: Stamp,
                data: tuple, jit: bool) -> None:
    """Train `stage` (resuming when its in-progress state matches `stamp`) and export its model.

    `data` is (train batches, val batches, training labels); `stamp` the stage's staleness
    record (ich.stamps), compared with the one saved when the interrupted run started.
    """
    run_dir = Path(run_dir)
    backup = run_dir / BACKUP_DIR
    check_resume(stage, stamp, run_dir)
    best_path = run_dir / CHECKPOINT_DIR / f"{stage.name}_best.weights.h5"
    seed = stage_seed(cfg, stage)
    batches, val_batches, y_train = data
    backend.set_seed(seed)
    augmentation = online_augmentation(cfg["online_augment"], seed)
    try:
        model = stage.build(cfg, spec, augmentation)
    except (ValueError, FileNotFoundError) as err:
        raise StepError(f"model section: {err}") from err
    if stage.init is not None and stage.starts_from(cfg):
        stage.init(model, cfg, run_dir)
    pretrained = cfg["model"]["weights"] is not None
    loss, class_weight = stage.loss(cfg, y_train)
    train = cfg["train"]
    if train["steps_per_epoch"] is not None and int(train["steps_per_epoch"]) < len(batches):
        batches = EpochCap(batches, int(train["steps_per_epoch"]))
        per_epoch = len(batches) * stage_batch_size(cfg, stage)
    else:
        per_epoch = len(y_train)

    timer, seen, offset = Timer(), 0, 0
    for phase in PHASES:
        epochs = phase_epochs(cfg, stage, phase)
        marker = backup / f"{stage.name}_{phase}.done.json"
        if marker.is_file():
            offset += json.loads(marker.read_text())["epochs"]
            log.info("train: %s phase %s already finished, skipped", stage.name, phase)
            continue
        if phase == "frozen" and not pretrained:
            log.info("train: %s phase frozen skipped: model.weights is null, so the backbone "
                     "trains from the first epoch (see ich.training.trainer)", stage.name)
            continue
        if epochs <= 0:
            continue
        if best_path.is_file():
            load_best(model, best_path)  # phase 2 starts from the best of phase 1
        set_backbone_trainable(model, phase == "finetune", pretrained=pretrained)
        rate = learning_rate(train, phase_lr(cfg, phase), epochs, len(batches))
        model.compile(optimizer=adam(rate), loss=loss,
                      metrics=[stage.metric()], jit_compile=jit)
        first, done = fit_phase(model, cfg, stage.name, phase, run_dir, batches, val_batches, epochs,
                           class_weight, offset, best_path)
        seen += (done - first) * per_epoch
        write_json({"epochs": done, "best": best_score(best_path)}, marker)
        offset += done

    final = run_dir / stage.file
    export(model, augmentation, best_path, final, rebuild=lambda: stage.build(cfg, spec, None))
    best = best_score(best_path)
    epoch = best.get("epoch")
    kept = ("best" if train["keep"] == "best" else
            f"last (epoch {epoch + 1})" if epoch is not None else "last")
    summary(f"train {stage.name}", f"{seen} images seen ({len(y_train)} training images), "
            f"{kept} {train['monitor']} {best['value']:.4f} -> {final}", seen, "images", timer)


def clear_stage(run_dir: Path, stage: Stage) -> None:
    """Remove every artifact and in-progress file of `stage` (retraining it from scratch)."""
    run_dir = Path(run_dir)
    for path in [run_dir / stage.file, run_dir / LOGS_DIR / stage.name,
                 *(run_dir / CHECKPOINT_DIR).glob(f"{stage.name}_best.*"),
                 *(run_dir / BACKUP_DIR).glob(f"{stage.name}[._]*"),
                 *(run_dir / HISTORY_DIR).glob(f"{stage.name}_*.csv")]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def check_resume(stage: Stage, stamp: Stamp, run_dir: Path) -> None:
    """Resume only the run this stage's in-progress state was started for.

    The settings and inputs of an interrupted run are saved when it starts; if they differ now
    (above all a new split: resuming would keep a "best" model chosen on patients that may now
    be test patients), the in-progress state is dropped and the stage starts fresh.
    """
    started = Path(run_dir) / BACKUP_DIR / f"{stage.name}.started.json"
    now = stamp.current()
    if started.is_file():
        try:
            why = difference(json.loads(started.read_text()), now)
        except json.JSONDecodeError:
            why = f"{started} is unreadable"
        if why is None:
            return
        log.warning("train: %s: the interrupted run was made with other settings or data (%s); "
                    "starting the stage fresh", stage.name, why)
        clear_stage(run_dir, stage)
    elif any((Path(run_dir) / CHECKPOINT_DIR).glob(f"{stage.name}_best.*")):
        log.warning("train: %s: in-progress state without a record of what it was made with; "
                    "starting the stage fresh", stage.name)
        clear_stage(run_dir, stage)
    write_json(now, started)


def fit_phase(model, cfg, stage, phase, run_dir, batches, val_batches, epochs, class_weight,
              offset, best_path, keep: str | None = None) -> tuple[int, int]:
    """Run one phase with its callbacks; return (first epoch run now, epochs finished in all).
    keep: the epoch whose weights best_path holds afterwards, best or last (None: train.keep)."""
    train = cfg["train"]
    backup_dir = run_dir / BACKUP_DIR / f"{stage}_{phase}"
    start = resume_epoch(backup_dir)
    if start:
        log.info("train: %s phase %s resumes at epoch %d of %d", stage, phase, start + 1, epochs)
    callbacks = phase_callbacks(
        best_path=best_path, csv_path=run_dir / HISTORY_DIR / f"{stage}_{phase}.csv",
        backup_dir=backup_dir,
        log_dir=run_dir / LOGS_DIR / stage if train["tensorboard"] else None,
        patience=int(train["early_stopping_patience"]), lr_patience=int(train["lr_patience"]),
        lr_factor=float(train["lr_factor"]), min_lr=float(train["min_lr"]), step_offset=offset,
        monitor=train["monitor"], plateau=cuts_on_plateau(train), keep=keep or train["keep"])
    # BackupAndRestore leaves a resumed fit's start epoch on the model, and Keras prefers it to
    # fit's own initial_epoch: clear it, or the next phase would skip as many epochs.
    model._initial_epoch = None
    try:
        history = model.fit(batches, validation_data=val_batches, epochs=epochs,
                            class_weight=class_weight,
                            callbacks=callbacks, verbose=1 if sys.stdout.isatty() else 2)
    except RuntimeError as err:
        # TerminateOnNaN raises the first; torch's BCE the second when probabilities are NaN.
        if "NaN or Inf loss" in str(err) or "input should be between 0 and 1" in str(err):
            raise StepError(
                f"{stage} phase {phase}: the loss became NaN/Inf ({err}). Lower "
                f"train.{phase}_lr or set train.mixed_precision false, then run `ich train "
                f"--force`") from err
        raise
    return start, start + len(history.history.get("loss", []))


def export(model, augmentation, best_path: Path, final_path: Path, rebuild) -> None:
    """Save the best weights as a float32 .keras model without the augmentation layers.

    The augmentation is needless at inference, and mixed_float16 layers are slow or unsupported
    on CPU. Under float32 the inference model is a re-wiring of the trained layers that skips the
    augmentation (no copy, no re-initialisation); under mixed precision it is a fresh float32
    build (`rebuild()`) that receives the weights layer by layer (variables are float32 either
    way: exact).
    """
    if not best_path.is_file():
        raise StepError(f"{final_path.stem}: no epoch produced a finite validation AUC, so there "
                        f"is no best model to save; check the val split and rerun with --force")
    load_best(model, best_path)
    policy = keras.mixed_precision.global_policy()
    if policy.name == "float32":
        def skip_augmentation(layer, *args, **kwargs):
            return args[0] if layer is augmentation else layer(*args, **kwargs)

        clean = keras.models.clone_model(model, clone_function=lambda layer: layer,
                                         call_function=skip_augmentation)
        # clone_model compiles the clone like the original, and a .keras file then names the
        # backend's optimizer class (torch_adam), which other backends cannot import.
        outputs = clean.outputs[0] if len(clean.outputs) == 1 else clean.outputs  # not a 1-list
        clean = keras.Model(clean.inputs[0], outputs, name=clean.name)
    else:
        keras.mixed_precision.set_global_policy("float32")
        try:
            clean = rebuild()
        finally:
            keras.mixed_precision.set_global_policy(policy)
        trained = {layer.name: layer for layer in model.layers}
        for layer in clean.layers:
            if layer.weights:
                layer.set_weights(trained[layer.name].get_weights())
    with atomic_path(final_path) as tmp:
        clean.save(tmp)


class EpochCap(keras.utils.PyDataset):
    """A view of `batches` whose epochs are its first `steps` batches (train.steps_per_epoch).

    The training Batches reshuffle at every epoch end, so each capped epoch is a fresh random
    subset. (Keras's own steps_per_epoch instead walks on through the data across epochs and
    cuts the epoch that reaches the end short, with a warning.)
    """

    def __init__(self, inner, steps: int):
        super().__init__()
        self.inner, self.steps = inner, steps

    def __len__(self):
        return self.steps

    def __getitem__(self, index):
        return self.inner[index]

    def on_epoch_end(self):
        """Reshuffle the wrapped batches."""
        self.inner.on_epoch_end()


def load_best(model, best_path: Path) -> None:
    """Load the best model's weights into the training model (its optimizer state is not in the
    file on purpose: the next phase starts a fresh optimizer, so Keras's warning is noise)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(best_path)


def best_score(best_path: Path) -> dict:
    """{"value", "epoch"} of the best model saved at best_path (value NaN when none is)."""
    return read_best(best_path) or {"value": math.nan, "epoch": None}
