"""Train the sequence stage: a model over each series' slices, after the image stages.

In: the config (`sequence` section; train's patience and LR schedule), the sequence `Stage`,
the run directory holding the trained image stages, and the train and val splits
(ich.data.loading.SplitData). Out, in the run directory: sequence.keras (the best weights by
validation AUC, float32), history/sequence_train.csv, logs/sequence/, and while it trains
checkpoints/ and backup/ as for the image stages (a killed run resumes at its last epoch).

Its inputs are what the trained image stages make of every slice of a series (targets and
context slices alike; augmented copies have no series): their pooled features and their
probabilities, ordered by position along the slice normal. These are computed once per
training with the image stages in inference mode. Its labels are the six labels of every
slice, and of the series (any of its slices). The image stages saw the training slices while
they learnt, so their training-split outputs are more confident than on new scans; the
sequence stage starts as the identity on the cascade's probabilities (ich.models.sequence)
and early-stops on the validation split, where they are honest.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np

from ich import backend
from ich.constants import LABELS
from ich.data.series import PAD_LABEL, pack, series_labels, series_runs
from ich.data.inputs import InputSpec
from ich.evaluation.inference import predict_split, series_rows
from ich.errors import StepError
from ich.io import Timer, atomic_path, summary
from ich.saved_models import load_saved
from ich.models.sequence import training_model
from ich.stamps import Stamp
from ich.training.optimizer import adam
from ich.training.schedule import learning_rate
from ich.training.stages import Stage, stage_seed
from ich.training.trainer import CHECKPOINT_DIR, best_score, check_resume, fit_phase, load_best

log = logging.getLogger("ich")

PHASE = "train"  # the sequence stage has one phase: nothing in it is pretrained


class SeriesBatches(keras.utils.PyDataset):
    """Batches of series: ({"features", "mask", "probabilities"}, labels (b, T + 1, 6)).

    The arrays are padded to one length T for all batches (one traced shape on compiled
    backends); the labels hold each slice's six labels, then the series' own, PAD_LABEL at
    padded steps. Shuffled per epoch from (seed, epoch) when `shuffle`.
    """

    def __init__(self, arrays: dict, labels: np.ndarray, batch_size: int, shuffle: bool, seed: int):
        super().__init__()
        self.arrays, self.labels = arrays, labels
        self.batch_size, self.shuffle, self.seed = int(batch_size), shuffle, seed
        self.epoch = 0
        self.order = self._order()

    def _order(self) -> np.ndarray:
        n = len(self.labels)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __getitem__(self, index: int):
        rows = np.sort(self.order[index * self.batch_size:(index + 1) * self.batch_size])
        return {k: v[rows] for k, v in self.arrays.items()}, self.labels[rows]

    def on_epoch_end(self) -> None:
        """Reshuffle for the next epoch."""
        self.epoch += 1
        self.order = self._order()


def series_arrays(table, probs: np.ndarray, features: np.ndarray, length: int | None = None):
    """The sequence stage's inputs and labels for the rows of `table` (with series_id, position
    and the LABELS columns), given their cascade probabilities and features.

    Out: (arrays {"features" (S, T, D), "mask" (S, T), "probabilities" (S, T, 6)}, labels
    (S, T + 1, 6): each slice's, then the series'; PAD_LABEL where padded).
    """
    runs = series_runs(table["series_id"], table["position"])
    truth = table[list(LABELS)].to_numpy(dtype=np.float32)
    f, mask = pack(features, runs, length)
    p, _ = pack(probs, runs, length)
    y, _ = pack(truth, runs, length, fill=PAD_LABEL)
    labels = np.concatenate([y, series_labels(truth, runs)[:, None]], axis=1)
    return {"features": f, "mask": mask, "probabilities": p}, labels


def sequence_inputs(cascade, data, batch_size: int, split: str):
    """(table rows, cascade probabilities, features) of a split's slices that belong to a series,
    by the trained image stages (a Cascade)."""
    rows = series_rows(data)
    if len(rows) == 0:
        raise StepError(f"sequence: the {split} split has no slice with a series id (images.csv "
                        "lacks series_id): the sequence stage needs whole series; run `ich "
                        "preprocess --force` with this version, or drop sequence from train.stages")
    probs, features = predict_split(cascade, data, batch_size, f"{split} features", rows=rows,
                                    with_features=True)
    return data.table.iloc[rows].reset_index(drop=True), probs, features


def load_cascade_images(run_dir: Path, cfg: dict):
    """The run's image stages as a Cascade (the sequence stage, being trained, left out)."""
    from ich.evaluation.inference import Cascade
    from ich.training.stages import STAGES, image_stage_names, stage_entry

    stages = [stage_entry(cfg, STAGES[name]) for name in image_stage_names()]
    models = {s["name"]: load_saved(Path(run_dir) / s["file"]) for s in stages}
    return Cascade(models=models, meta={"stages": stages, "input": InputSpec.from_config(cfg).to_json()})


def train_sequence(cfg: dict, stage: Stage, run_dir: Path, stamp: Stamp, splits: dict) -> None:
    """Train the sequence stage on the train split's series, early-stopped on val's, and save
    run_dir/sequence.keras. `splits` maps "train" and "val" to SplitData."""
    run_dir = Path(run_dir)
    timer = Timer()
    seq = cfg["sequence"]
    batch = int(cfg["predict"]["batch_size"])
    cascade = load_cascade_images(run_dir, cfg)
    train_table, train_p, train_f = sequence_inputs(cascade, splits["train"], batch, "train")
    val_table, val_p, val_f = sequence_inputs(cascade, splits["val"], batch, "val")
    length = max(len(r) for table in (train_table, val_table)
                 for r in series_runs(table["series_id"], table["position"]))
    x_train, y_train = series_arrays(train_table, train_p, train_f, length)
    x_val, y_val = series_arrays(val_table, val_p, val_f, length)
    log.info("train: sequence over %d training and %d validation series (up to %d slices, %d "
             "features per slice)", len(y_train), len(y_val), length, train_f.shape[1])

    check_resume(stage, stamp, run_dir)
    seed = stage_seed(cfg, stage)
    backend.set_seed(seed)
    # float32 whatever the policy: the model is small, and its masking constants need the range.
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        model = stage.build(cfg, train_f.shape[1])
        fitted = training_model(model)
        loss, _ = stage.loss(cfg, y_train)
        batches = SeriesBatches(x_train, y_train, int(seq["batch_size"]), shuffle=True, seed=seed)
        rate = learning_rate(cfg["train"], float(seq["lr"]), int(seq["epochs"]), len(batches))
        fitted.compile(optimizer=adam(rate), loss=loss, metrics=[stage.metric()])
        best_path = run_dir / CHECKPOINT_DIR / f"{stage.name}_best.weights.h5"
        val_batches = SeriesBatches(x_val, y_val, int(seq["batch_size"]), shuffle=False, seed=seed)
        # Its best epoch whatever train.keep says: it stops early, patience epochs past its best.
        first, done = fit_phase(fitted, cfg, stage.name, PHASE, run_dir, batches, val_batches,
                                int(seq["epochs"]), None, 0, best_path, keep="best")
        if not best_path.is_file():
            raise StepError(f"{stage.name}: no epoch produced a finite validation AUC; check that "
                            "the val split holds series with both classes, then rerun with --force")
        load_best(fitted, best_path)
        with atomic_path(run_dir / stage.file) as tmp:
            model.save(tmp)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    best = best_score(best_path)
    summary(f"train {stage.name}", f"{done - first} epochs over {len(y_train)} series, best "
            f"{cfg['train']['monitor']} {best['value']:.4f} -> {run_dir / stage.file}", (done - first) * len(y_train),
            "series", timer)
