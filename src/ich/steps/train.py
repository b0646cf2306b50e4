"""Step 6, train: the two-stage cascade from the split (and augmented) PNGs.

In: work_dir/splits.csv, png/, augmented.csv (ich.data.loading reads them); config sections model, train,
online_augment, data, seed, paths. Out, in run_dir:
  stage1.keras, stage2.keras  best checkpoints (by validation AUC), float32, no optimizer
  cascade.json                the shared cascade description (thresholds 0.5 until evaluate)
  config.yaml                 the resolved config of the run
  history/<stage>_<phase>.csv per-epoch losses, AUC and learning rate
  logs/<stage>/               TensorBoard event files
  checkpoints/, backup/       in-progress state: a killed run resumes at its last finished epoch

Stage 1 learns p(any) on every training image; stage 2 learns p(subtype | any) on the training
images positive for any. Each stage has two phases: "frozen" (head only, frozen_lr) and
"finetune" (whole network, finetune_lr, BatchNorm in inference mode). With model.weights null
(random init) the frozen phase is skipped: a head on frozen random features learns nothing worth
keeping, so the whole network trains from the first epoch with BatchNorm learning its statistics.
With model.stage2_from_stage1, stage 2's backbone of stage 1's architecture starts from trained
stage 1, which already tells blood from brain on every training image.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from pathlib import Path

import numpy as np

from ich import config as config_mod
from ich.errors import StepError
from ich.constants import (AUGMENTED_CSV, CASCADE_JSON, HISTORY_DIR, LABELS, LOGS_DIR, SPLITS_CSV,
                           STAGE1_MODEL, STAGE2_MODEL, SUBTYPES)
from ich.io import Timer, outdated, summary, write_json

log = logging.getLogger("ich")

STAGES = {"stage1": STAGE1_MODEL, "stage2": STAGE2_MODEL}
RUN_CONFIG = "config.yaml"        # resolved config of the run, in run_dir
CHECKPOINT_DIR = "checkpoints"    # best model of each stage while it trains
BACKUP_DIR = "backup"             # BackupAndRestore folders, phase done markers, config guards
PHASES = ("frozen", "finetune")


def run(cfg: dict, force: bool = False) -> Path:
    """Train the stages listed in train.stages; return the path of run_dir/cascade.json.

    A stage whose model file exists is skipped unless force; a stage interrupted before (even by
    SIGKILL) resumes at the epoch after the last one it finished.
    """
    from ich import backend

    try:
        name = backend.select_backend(cfg["train"]["backend"])
    except (RuntimeError, ImportError, ValueError) as err:
        raise StepError(f"train.backend: {err}") from err
    import keras

    train = cfg["train"]
    unknown = [s for s in train["stages"] if s not in STAGES]
    if unknown:
        raise StepError(f"train.stages: unknown stage(s) {unknown}; valid: {list(STAGES)}")
    run_dir = Path(cfg["paths"]["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    mixed = backend.resolve_mixed_precision(train["mixed_precision"])
    jit = backend.resolve_jit(train["jit_compile"])
    log.info("train: backend %s, mixed precision %s, jit_compile %s", name, mixed, jit)

    stale = stale_stages(cfg, run_dir)
    for stage in stale:
        log.info("train: %s is older than its training data; retraining it", run_dir / STAGES[stage])
    todo = [s for s in train["stages"] if force or s in stale or not (run_dir / STAGES[s]).is_file()]
    for stage in sorted(set(train["stages"]) - set(todo)):
        log.info("train: %s skipped, %s exists (use --force to retrain)", stage, run_dir / STAGES[stage])
    cascade_path = run_dir / CASCADE_JSON
    if not todo and cascade_path.is_file():
        return cascade_path  # keep the thresholds evaluate may have written into it

    config_mod.save(cfg, run_dir / RUN_CONFIG)
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    try:
        for stage in todo:
            if force or stage in stale:
                _clear_stage(run_dir, stage)
            _train_stage(cfg, stage, run_dir, jit)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    missing = [STAGES[s] for s in STAGES if not (run_dir / STAGES[s]).is_file()]
    if missing:
        raise StepError(f"{run_dir}: {', '.join(missing)} missing, so no cascade.json was written; "
                        f"add the stage(s) to train.stages and run `ich train` again")
    return write_json(cascade_description(cfg, mixed), cascade_path)


def stale_stages(cfg: dict, run_dir: Path) -> list[str]:
    """Stages whose finished model is older than what it was trained from.

    A re-split (or new augmented images) after training must not leave models trained on the
    old split in place: `ich run --from split --force` would otherwise evaluate them on test
    images they were trained on. Stage 2 also depends on stage 1 when it starts from it.
    """
    work = Path(cfg["paths"]["work_dir"])
    inputs = [work / SPLITS_CSV, work / AUGMENTED_CSV]
    stale = []
    for stage in STAGES:
        model = run_dir / STAGES[stage]
        if stage == "stage2" and cfg["model"]["stage2_from_stage1"]:
            inputs = inputs + [run_dir / STAGE1_MODEL]
        if model.is_file() and (outdated(model, inputs) or (stage == "stage2" and "stage1" in stale)):
            stale.append(stage)
    return stale


def cascade_description(cfg: dict, mixed_precision: bool) -> dict:
    """The cascade.json content (shared format) for the models trained with `cfg`."""
    from ich import backend

    pre, model = cfg["preprocess"], cfg["model"]
    return {
        "labels": list(LABELS),
        "subtypes": list(SUBTYPES),
        "image_size": int(model["image_size"]),
        "windows": {k: list(v) for k, v in pre["windows"].items()},
        "channels": list(pre["channels"]),
        "stage1": {"file": STAGE1_MODEL, "backbone": model["stage1_backbone"]},
        "stage2": {"file": STAGE2_MODEL, "backbones": list(model["stage2_backbones"])},
        "thresholds": {label: 0.5 for label in LABELS},
        "backend": backend.current(),
        "versions": backend.versions(),
        "mixed_precision": bool(mixed_precision),
    }


def build_model(cfg: dict, stage: str, augmentation=None):
    """Build the (uncompiled) model of `stage` from the model section of `cfg`."""
    from ich.models.cascade import build_stage1, build_stage2

    m = cfg["model"]
    try:
        if stage == "stage1":
            return build_stage1(m["stage1_backbone"], m["image_size"], m["weights"], m["dropout"],
                                augmentation=augmentation)
        return build_stage2(m["stage2_backbones"], m["image_size"], m["weights"], m["dropout"],
                            m["fusion_dim"], m["attention_heads"], augmentation=augmentation)
    except (ValueError, FileNotFoundError) as err:
        raise StepError(f"model section: {err}") from err


def _train_stage(cfg: dict, stage: str, run_dir: Path, jit: bool) -> None:
    import keras

    from ich import backend
    from ich.models.online_augment import online_augmentation
    from ich.models.cascade import set_backbone_trainable

    train = cfg["train"]
    backup = run_dir / BACKUP_DIR
    _guard_config(cfg, stage, backup)
    best_path = run_dir / CHECKPOINT_DIR / f"{stage}_best.weights.h5"
    seed = int(cfg["seed"]) + list(STAGES).index(stage)
    batches, val_batches, y_train = stage_data(cfg, stage, seed)
    backend.set_seed(seed)
    augmentation = online_augmentation(cfg["online_augment"], seed)
    model = build_model(cfg, stage, augmentation)
    if stage == "stage2" and cfg["model"]["stage2_from_stage1"]:
        _init_from_stage1(model, run_dir / STAGE1_MODEL, cfg["model"]["stage1_backbone"])
    pretrained = cfg["model"]["weights"] is not None
    loss, class_weight = _loss(cfg, stage, y_train)
    if train["steps_per_epoch"] is not None and int(train["steps_per_epoch"]) < len(batches):
        batches = _cap_epoch(batches, int(train["steps_per_epoch"]))
        per_epoch = len(batches) * int(train["batch_size"])
    else:
        per_epoch = len(y_train)

    timer, seen, offset = Timer(), 0, 0
    for phase in PHASES:
        epochs = phase_epochs(train, stage, phase)
        marker = backup / f"{stage}_{phase}.done.json"
        if marker.is_file():
            offset += json.loads(marker.read_text())["epochs"]
            log.info("train: %s phase %s already finished, skipped", stage, phase)
            continue
        if phase == "frozen" and not pretrained:
            log.info("train: %s phase frozen skipped: model.weights is null, so the backbone "
                     "trains from the first epoch (see ich.steps.train)", stage)
            continue
        if epochs <= 0:
            continue
        if best_path.is_file():
            _load_best(model, best_path)  # phase 2 starts from the best of phase 1
        set_backbone_trainable(model, phase == "finetune", pretrained=pretrained)
        lr = float(train["frozen_lr" if phase == "frozen" else "finetune_lr"])
        model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss, metrics=[_auc(stage)],
                      jit_compile=jit)
        done_epochs = _fit(model, cfg, stage, phase, run_dir, batches, val_batches, epochs,
                           class_weight, offset, best_path)
        seen += (done_epochs[1] - done_epochs[0]) * per_epoch
        write_json({"epochs": done_epochs[1], "best": _read_best(best_path)}, marker)
        offset += done_epochs[1]

    _export(cfg, stage, model, augmentation, best_path, run_dir / STAGES[stage])
    best = _read_best(best_path)
    summary(f"train {stage}", f"{seen} images seen ({len(y_train)} training images), "
            f"best val AUC {best['value']:.4f} -> {run_dir / STAGES[stage]}", seen, "images", timer)


def _init_from_stage1(model, stage1_path: Path, backbone: str) -> None:
    """Copy trained stage 1's backbone into stage 2's backbone of the same architecture.

    Stage 1 saw every training image, stage 2 only the positives: starting stage 2 from features
    that already tell blood from brain makes it learn the subtypes in fewer epochs (phantom set,
    96 px, random init, same seed: stage 2 val macro AUC after 5 epochs 0.57 without, 0.73
    with). A checkpoint or backup of stage 2, when resuming, is loaded afterwards and wins.
    """
    import keras

    from ich.models.backbones import PREFIX

    name = PREFIX + backbone
    if name not in [layer.name for layer in model.layers]:
        log.info("train: stage2 has no %s backbone; model.stage2_from_stage1 has nothing to copy", backbone)
        return
    if not stage1_path.is_file():
        log.info("train: %s not found; stage 2 starts without stage 1's backbone", stage1_path)
        return
    stage1 = keras.saving.load_model(stage1_path, compile=False)
    model.get_layer(name).set_weights(stage1.get_layer(name).get_weights())
    log.info("train: stage2 %s starts from trained stage 1 (%s)", backbone, stage1_path)


def phase_epochs(train: dict, stage: str, phase: str) -> int:
    """Epochs of one phase: frozen_epochs, or finetune_epochs unless stage 2 has its own."""
    if phase == "frozen":
        return int(train["frozen_epochs"])
    if stage == "stage2" and train["stage2_finetune_epochs"] is not None:
        return int(train["stage2_finetune_epochs"])
    return int(train["finetune_epochs"])


def _fit(model, cfg, stage, phase, run_dir, batches, val_batches, epochs, class_weight,
         offset, best_path) -> tuple[int, int]:
    """Run one phase with its callbacks; return (first epoch run now, epochs finished in all)."""
    from ich.training.callbacks import phase_callbacks, resume_epoch

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
        lr_factor=float(train["lr_factor"]), min_lr=float(train["min_lr"]), step_offset=offset)
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


def stage_data(cfg: dict, stage: str, seed: int):
    """(train batches, val batches, training labels) of a stage.

    Stage 1: every training image (+ augmented copies when augment.enabled) against `any`;
    stage 2: the rows positive for any, against the SUBTYPES columns (picked by index from the
    same packed cache as stage 1, so no second copy of the images is made).
    """
    from ich.data import loading

    work = Path(cfg["paths"]["work_dir"])
    size, bs = int(cfg["model"]["image_size"]), int(cfg["train"]["batch_size"])
    workers = config_mod.resolve_workers(cfg["data"]["workers"])
    columns = ["any"] if stage == "stage1" else list(SUBTYPES)
    out = []
    for split in ("train", "val"):
        try:
            table = loading.split_table(work, split, include_augmented=cfg["augment"]["enabled"])
        except ValueError as err:
            raise StepError(str(err)) from err
        rows = np.arange(len(table)) if stage == "stage1" else np.flatnonzero(table["any"].to_numpy() == 1)
        picked = table["any"].to_numpy()[rows]
        if len(rows) == 0 or (stage == "stage1" and len(np.unique(picked)) < 2):
            what = "images positive for any" if stage == "stage2" else "images with both classes of any"
            raise StepError(f"{stage}: the {split} split has no {what} ({len(table)} images in all); "
                            f"sample more images or change split.fractions")
        labels = table[columns].to_numpy(dtype=np.float32)
        shuffle = split == "train"
        if cfg["data"]["cache"] == "packed":
            images = loading.packed(work, split, table, size, workers)
            batches = loading.Batches(images, labels, bs, shuffle=shuffle, seed=seed, indices=rows)
        else:
            batches = loading.Batches.from_paths(table["path"].tolist(), labels, size, bs, shuffle=shuffle,
                                              seed=seed, decode_workers=workers, indices=rows)
        out += [batches]
        if split == "train":
            y_train = labels[rows]
    return out[0], out[1], y_train


def _loss(cfg: dict, stage: str, y_train):
    """(loss, class_weight) of a stage: BCE with balanced class weights for stage 1, per-label
    positive weights inside the BCE for stage 2 (class_weight would use the argmax label)."""
    import keras

    from ich.data import loading
    from ich.models.losses import weighted_bce

    train = cfg["train"]
    if stage == "stage1":
        weights = loading.class_weights(y_train[:, 0]) if train["class_weight"] == "balanced" else None
        return keras.losses.BinaryCrossentropy(), weights
    if train["pos_weight"] == "balanced":
        pos = [float(w) for w in loading.positive_weights(y_train, float(train["max_pos_weight"]))]
    else:
        pos = [1.0] * y_train.shape[1]
    log.info("train: stage2 positive weights %s", dict(zip(SUBTYPES, (round(w, 2) for w in pos))))
    return weighted_bce(pos), None


def _auc(stage: str):
    import keras

    if stage == "stage1":
        return keras.metrics.AUC(name="auc")
    # Mean of the per-subtype AUCs, so a rare subtype counts as much as a common one.
    return keras.metrics.AUC(name="auc", multi_label=True, num_labels=len(SUBTYPES))


def _export(cfg: dict, stage: str, model, augmentation, best_path: Path, final_path: Path) -> None:
    """Save the best weights as a float32 .keras model without the augmentation layers.

    The augmentation is needless at inference, and mixed_float16 layers are slow or unsupported
    on CPU. Under float32 the inference model is a re-wiring of the trained layers that skips the
    augmentation (no copy, no re-initialisation); under mixed precision it is a fresh float32
    build that receives the weights layer by layer (variables are float32 either way: exact).
    """
    import keras

    from ich.io import atomic_path

    if not best_path.is_file():
        raise StepError(f"{stage}: no epoch produced a finite validation AUC, so there is no best "
                        f"model to save; check the val split and rerun with --force")
    _load_best(model, best_path)
    policy = keras.mixed_precision.global_policy()
    if policy.name == "float32":
        def skip_augmentation(layer, *args, **kwargs):
            return args[0] if layer is augmentation else layer(*args, **kwargs)

        clean = keras.models.clone_model(model, clone_function=lambda layer: layer,
                                         call_function=skip_augmentation)
        # clone_model compiles the clone like the original, and a .keras file then names the
        # backend's optimizer class (torch_adam), which other backends cannot import (issue 9).
        clean = keras.Model(clean.inputs, clean.outputs, name=clean.name)
    else:
        keras.mixed_precision.set_global_policy("float32")
        try:
            clean = build_model(cfg, stage, augmentation=None)
        finally:
            keras.mixed_precision.set_global_policy(policy)
        trained = {layer.name: layer for layer in model.layers}
        for layer in clean.layers:
            if layer.weights:
                layer.set_weights(trained[layer.name].get_weights())
    with atomic_path(final_path) as tmp:
        clean.save(tmp)


def _cap_epoch(batches, steps: int):
    """A view of `batches` whose epochs are its first `steps` batches (train.steps_per_epoch).

    The training Batches reshuffle at every epoch end, so each capped epoch is a fresh random
    subset. (Keras's own steps_per_epoch instead walks on through the data across epochs and
    cuts the epoch that reaches the end short, with a warning.)
    """
    import keras

    class EpochCap(keras.utils.PyDataset):
        def __init__(self, inner, steps):
            super().__init__()
            self.inner, self.steps = inner, steps

        def __len__(self):
            return self.steps

        def __getitem__(self, index):
            return self.inner[index]

        def on_epoch_end(self):
            self.inner.on_epoch_end()

    return EpochCap(batches, steps)


def _load_best(model, best_path: Path) -> None:
    """Load the best model's weights into the training model (its optimizer state is not in the
    file on purpose: the next phase starts a fresh optimizer, so Keras's warning is noise)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(best_path)


def _read_best(best_path: Path) -> dict:
    from ich.training.callbacks import read_best

    return read_best(best_path) or {"value": math.nan, "epoch": None}


def _guard_config(cfg: dict, stage: str, backup: Path) -> None:
    """Refuse to resume a stage whose saved state no longer fits the model being built.

    Only settings that change the network or its optimizer's structure are guarded (model,
    online_augment, mixed precision); epochs, learning rates or patience may change between a
    kill and the resume.
    """
    settings = _flatten({"model": cfg["model"], "online_augment": cfg["online_augment"],
                         "train": {"mixed_precision": cfg["train"]["mixed_precision"]}})
    path = backup / f"{stage}.config.json"
    if not path.is_file():
        write_json(settings, path)
        return
    before = json.loads(path.read_text())
    changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
    if changed:
        raise StepError(f"{stage}: an interrupted run of this stage used other settings "
                        f"({', '.join(changed)}); run `ich train --force` to start it over, or "
                        f"restore the old settings to resume")


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}, values normalised through JSON (tuples become lists)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.loads(json.dumps(value))
    return flat


def _clear_stage(run_dir: Path, stage: str) -> None:
    """Remove every artifact and in-progress file of `stage` (for --force)."""
    for path in [run_dir / STAGES[stage], run_dir / LOGS_DIR / stage,
                 *(run_dir / CHECKPOINT_DIR).glob(f"{stage}_best.*"),
                 *(run_dir / BACKUP_DIR).glob(f"{stage}[._]*"),
                 *(run_dir / HISTORY_DIR).glob(f"{stage}_*.csv")]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
