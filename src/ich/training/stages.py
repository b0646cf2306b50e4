"""The stage description: one entry per model of the cascade, read by training, evaluation and
inference. Adding a stage is adding an entry to STAGES.

In: the config and, for a stage's loss, its training labels. Out: `Stage` records with the
stage's labels, the label it is conditional on (its training rows are the images positive for
it, and at inference p(label) = p(given) * p(label | given)), its model builder, its loss, the
config values its model depends on (for the staleness rule), the stages it starts from, and
its phases' epochs and learning rates.

Stage 1 learns p(any) on every training image with balanced class weights. Stage 2 learns
p(subtype | any) on the images positive for any with per-label positive weights inside the
binary cross-entropy (Keras `class_weight` weights a multi-label output by its argmax); with
model.stage2_from_stage1 its backbone of stage 1's architecture starts from trained stage 1.
The sequence stage (kind "sequence", ich.training.sequence) runs after them over each series'
per-slice features and probabilities of the trained image stages, ordered by position, and
learns refined probabilities of all six labels per slice and per series.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from ich.constants import IMAGE, LABELS, MODEL_SUFFIX, SEQUENCE, SUBTYPES
from ich.data.inputs import InputSpec
from ich.models.backbones import PREFIX
from ich.models.cascade import build_stage1, build_stage2
from ich.models.losses import weighted_bce
from ich.saved_models import load_saved
from ich.models.sequence import MaskedAUC, build_sequence, masked_bce

log = logging.getLogger("ich")

PHASES = ("frozen", "finetune")
MONITOR = "val_auc"


@dataclass(frozen=True)
class Stage:
    """Everything training, evaluation and inference need to know about one stage."""

    name: str                      # also the model file stem, history and log prefix
    labels: tuple[str, ...]        # its outputs, in order
    given: str | None              # trained on rows positive for this label; p = p(given) * output
    build: Callable                # image: (cfg, spec, augmentation); sequence: (cfg, feature_dim) -> uncompiled keras.Model
    loss: Callable                 # (cfg, y_train) -> (loss, class_weight or None)
    settings: Callable             # cfg -> the config values its model depends on
    starts_from: Callable          # cfg -> names of stages whose trained model it starts from
    init: Callable | None = None   # (model, cfg, run_dir) -> None: weights taken from those stages
    kind: str = IMAGE              # image: a model on one input image; sequence: over a series' slices

    @property
    def file(self) -> str:
        """The stage's model file name inside the run directory."""
        return self.name + MODEL_SUFFIX

    def rows(self, table) -> np.ndarray:
        """Indices of the rows of a split table this stage trains and validates on."""
        if self.given is None:
            return np.arange(len(table))
        return np.flatnonzero(table[self.given].to_numpy() == 1)

    def metric(self) -> keras.metrics.Metric:
        """The monitored validation AUC: per-label mean for several labels, so a rare label
        counts as much as a common one."""
        if self.kind == SEQUENCE:
            return MaskedAUC(name="auc")
        if len(self.labels) == 1:
            return keras.metrics.AUC(name="auc")
        return keras.metrics.AUC(name="auc", multi_label=True, num_labels=len(self.labels))


def phase_epochs(cfg: dict, stage: Stage, phase: str) -> int:
    """Epochs of one phase: train.frozen_epochs, or train.finetune_epochs unless the stage has
    its own `train.<stage>_finetune_epochs`."""
    if phase == "frozen":
        return int(cfg["train"]["frozen_epochs"])
    return stage_own(cfg, stage, "finetune_epochs")


def stage_batch_size(cfg: dict, stage: Stage) -> int:
    """Images per training step of a stage: train.batch_size unless the stage has its own
    `train.<stage>_batch_size`."""
    return stage_own(cfg, stage, "batch_size")


def stage_own(cfg: dict, stage: Stage, key: str) -> int:
    """train.<stage>_<key> where the config sets it (not null), else train.<key>."""
    train = cfg["train"]
    own = train.get(f"{stage.name}_{key}")
    return int(own) if own is not None else int(train[key])


def stage_seed(cfg: dict, stage: Stage) -> int:
    """The seed of a stage's initialisation, shuffling and augmentation: distinct per stage."""
    return int(cfg["seed"]) + list(STAGES).index(stage.name)


def phase_lr(cfg: dict, phase: str) -> float:
    """Adam learning rate of a phase (train.frozen_lr or train.finetune_lr)."""
    return float(cfg["train"][f"{phase}_lr"])


def common_settings(cfg: dict, stage: Stage) -> dict:
    """Config values every stage's model depends on: the input, initial weights, online
    augmentation, the training data and recipe. Worker counts, TensorBoard and backend stay
    out: they change how fast, not what is learnt."""
    train = cfg["train"]
    keys = ("frozen_lr", "finetune_lr", "steps_per_epoch", "early_stopping_patience",
            "lr_patience", "lr_factor", "min_lr", "frozen_epochs", "mixed_precision")
    return {"seed": cfg["seed"], "input": InputSpec.from_config(cfg).to_json(),
            "weights": cfg["model"]["weights"], "dropout": cfg["model"]["dropout"],
            "online_augment": cfg["online_augment"], "augment_enabled": cfg["augment"]["enabled"],
            # The stage's own batch under the old key: runs recorded before stage2_batch_size
            # stay up to date while it is null.
            "train": {"batch_size": stage_batch_size(cfg, stage), **{k: train[k] for k in keys},
                      **later_settings(cfg)},
            "epochs": {phase: phase_epochs(cfg, stage, phase) for phase in PHASES}}


# Recipe keys added after runs were first recorded, with the value those runs trained with.
_LATER_KEYS = {"monitor": "val_auc", "lr_schedule": "plateau", "warmup_epochs": 0, "keep": "best"}


def later_settings(cfg: dict) -> dict:
    """train.monitor, lr_schedule, warmup_epochs and keep for a stage's settings, each only
    when it differs from what runs recorded before the key existed trained with: those runs stay
    up to date instead of retraining."""
    train = cfg["train"]
    return {key: train[key] for key, old in _LATER_KEYS.items() if train[key] != old}


def class_weights(y: np.ndarray) -> dict[int, float] | None:
    """Balanced class weights {0: w0, 1: w1} (scikit-learn: N / (2 * count)); None when a
    class never occurs (nothing to balance)."""
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if len(np.unique(y)) < 2:
        return None
    weights = compute_class_weight("balanced", classes=np.array([0, 1]), y=y)
    return {0: float(weights[0]), 1: float(weights[1])}


def positive_weights(labels: np.ndarray, cap: float) -> np.ndarray:
    """Per-column positive weight n_neg / n_pos for a weighted BCE, capped at `cap`.

    In: 0/1 labels (N, k). Out: float32 (k,). A column without positives gets `cap`.
    """
    labels = np.asarray(labels)
    if labels.ndim == 1:
        labels = labels[:, None]
    pos = labels.sum(axis=0).astype(np.float64)
    neg = len(labels) - pos
    ratio = np.divide(neg, pos, out=np.full_like(pos, np.inf), where=pos > 0)
    return np.minimum(ratio, cap).astype(np.float32)


def _build_stage1(cfg: dict, spec: InputSpec, augmentation=None) -> keras.Model:
    m = cfg["model"]
    return build_stage1(m["stage1_backbone"], spec.shape, m["weights"], m["dropout"],
                        augmentation=augmentation)


def _build_stage2(cfg: dict, spec: InputSpec, augmentation=None) -> keras.Model:
    m = cfg["model"]
    return build_stage2(m["stage2_backbones"], spec.shape, m["weights"], m["dropout"],
                        m["fusion_dim"], m["attention_heads"], augmentation=augmentation)


def _loss_stage1(cfg: dict, y_train: np.ndarray):
    weights = class_weights(y_train[:, 0]) if cfg["train"]["class_weight"] == "balanced" else None
    return keras.losses.BinaryCrossentropy(), weights


def _loss_stage2(cfg: dict, y_train: np.ndarray):
    train = cfg["train"]
    if train["pos_weight"] == "balanced":
        pos = [float(w) for w in positive_weights(y_train, float(train["max_pos_weight"]))]
    else:
        pos = [1.0] * y_train.shape[1]
    log.info("train: stage2 positive weights %s", dict(zip(SUBTYPES, (round(w, 2) for w in pos))))
    return weighted_bce(pos), None


def _settings_stage1(cfg: dict) -> dict:
    return {**common_settings(cfg, STAGES["stage1"]), "backbone": cfg["model"]["stage1_backbone"],
            "class_weight": cfg["train"]["class_weight"]}


def _settings_stage2(cfg: dict) -> dict:
    m, train = cfg["model"], cfg["train"]
    return {**common_settings(cfg, STAGES["stage2"]), "backbones": m["stage2_backbones"],
            "fusion_dim": m["fusion_dim"], "attention_heads": m["attention_heads"],
            "from_stage1": m["stage2_from_stage1"], "pos_weight": train["pos_weight"],
            "max_pos_weight": train["max_pos_weight"]}


def _stage2_starts_from(cfg: dict) -> tuple[str, ...]:
    return ("stage1",) if cfg["model"]["stage2_from_stage1"] else ()


def _init_stage2(model: keras.Model, cfg: dict, run_dir: Path) -> None:
    """Copy trained stage 1's backbone into stage 2's backbone of the same architecture.

    Stage 1 saw every training image, stage 2 only the positives: starting stage 2 from features
    that already tell blood from brain makes it learn the subtypes in fewer epochs (see
    docs/architecture.md). A checkpoint or backup of stage 2, when resuming, is loaded
    afterwards and wins.
    """
    name = PREFIX + cfg["model"]["stage1_backbone"]
    if name not in [layer.name for layer in model.layers]:
        log.info("train: stage2 has no %s backbone; model.stage2_from_stage1 has nothing to copy", name)
        return
    stage1 = load_saved(Path(run_dir) / STAGES["stage1"].file)
    model.get_layer(name).set_weights(stage1.get_layer(name).get_weights())
    log.info("train: stage2 %s starts from trained stage 1", name)


def _build_sequence(cfg: dict, feature_dim: int) -> keras.Model:
    seq = cfg["sequence"]
    return build_sequence(feature_dim, with_probabilities=True, width=int(seq["width"]),
                          kernel_size=int(seq["kernel_size"]), dilations=tuple(seq["dilations"]),
                          dropout=float(seq["dropout"]), pooling=seq["pooling"])


def _settings_sequence(cfg: dict) -> dict:
    train = cfg["train"]
    keys = ("early_stopping_patience", "lr_patience", "lr_factor", "min_lr")
    return {"seed": cfg["seed"], "sequence": cfg["sequence"],
            # train.keep is for the image stages only (see ich.training.sequence).
            "train": {**{k: train[k] for k in keys},
                      **{k: v for k, v in later_settings(cfg).items() if k != "keep"}}}


def stage_entry(cfg: dict, stage: Stage) -> dict:
    """A stage's entry in cascade.json (what inference needs to run it)."""
    if stage.kind == SEQUENCE:
        return {"name": stage.name, "file": stage.file, "labels": list(stage.labels),
                "given": None, "kind": SEQUENCE, "pooling": cfg["sequence"]["pooling"]}
    model = cfg["model"]
    backbones = {"stage1": [model["stage1_backbone"]], "stage2": list(model["stage2_backbones"])}
    return {"name": stage.name, "file": stage.file, "labels": list(stage.labels),
            "given": stage.given, "backbones": backbones.get(stage.name, [])}


def image_stage_names() -> tuple[str, ...]:
    """The image stages of STAGES, in order: every run has them; the sequence stage is optional."""
    return tuple(name for name, stage in STAGES.items() if stage.kind == IMAGE)


STAGES = {
    "stage1": Stage("stage1", labels=("any",), given=None, build=_build_stage1, loss=_loss_stage1,
                    settings=_settings_stage1, starts_from=lambda cfg: ()),
    "stage2": Stage("stage2", labels=SUBTYPES, given="any", build=_build_stage2, loss=_loss_stage2,
                    settings=_settings_stage2, starts_from=_stage2_starts_from, init=_init_stage2),
    # Over every image stage's features: they all must be trained first.
    "sequence": Stage("sequence", labels=LABELS, given=None, build=_build_sequence,
                      loss=lambda cfg, y: (masked_bce, None), settings=_settings_sequence,
                      starts_from=lambda cfg: image_stage_names(), kind=SEQUENCE),
}


def get_stage(name: str) -> Stage:
    """The stage called `name`; ValueError listing the valid ones otherwise."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; valid: {', '.join(STAGES)}")
    return STAGES[name]
