"""ich.training.schedule: the cosine LR against hand-computed values, and a killed phase that
resumes on the same curve."""

import csv

import numpy as np
import pytest

import keras

from ich.training.callbacks import LearningRateLog, ResumableReduceLROnPlateau, phase_callbacks
from ich.training.schedule import cuts_on_plateau, learning_rate

COSINE = {"lr_schedule": "cosine", "warmup_epochs": 0.5, "min_lr": 1e-5}


def lr_at(schedule, step):
    return float(keras.ops.convert_to_numpy(schedule(step)))


def test_plateau_is_the_constant_phase_lr():
    train = {**COSINE, "lr_schedule": "plateau"}
    assert learning_rate(train, 1e-3, 3, 4) == 1e-3 and cuts_on_plateau(train)
    assert not cuts_on_plateau(COSINE)


def test_cosine_warms_up_then_decays_to_min_lr_by_the_last_step():
    # 3 epochs x 4 steps = 12 steps; warm-up 0.5 epoch = 2 steps, then 10 steps of decay.
    schedule = learning_rate(COSINE, 1e-3, 3, 4)
    assert lr_at(schedule, 0) == pytest.approx(1e-5)
    assert lr_at(schedule, 1) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)    # 0.000505
    assert lr_at(schedule, 2) == pytest.approx(1e-3)                        # the peak
    # Half way through the decay (step 2 + 5): cos(pi / 2) = 0, so half way from peak to floor.
    assert lr_at(schedule, 7) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(schedule, 12) == pytest.approx(1e-5)
    assert lr_at(schedule, 50) == pytest.approx(1e-5)                       # stays at the floor


def test_cosine_without_warm_up_starts_at_the_peak_and_warm_up_leaves_one_decay_step():
    plain = learning_rate({**COSINE, "warmup_epochs": 0}, 1e-3, 2, 5)
    assert lr_at(plain, 0) == pytest.approx(1e-3)
    assert lr_at(plain, 5) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(plain, 10) == pytest.approx(1e-5)
    greedy = learning_rate({**COSINE, "warmup_epochs": 9}, 1e-3, 2, 5)       # more than the phase
    assert lr_at(greedy, 9) == pytest.approx(1e-3) and lr_at(greedy, 10) == pytest.approx(1e-5)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="'linear' is not one of plateau, cosine"):
        learning_rate({**COSINE, "lr_schedule": "linear"}, 1e-3, 2, 5)


def fit(tmp_path, epochs_before_kill=None):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")

    def compiled():
        inputs = keras.Input((4,))
        model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(inputs))
        model.compile(keras.optimizers.Adam(learning_rate({**COSINE, "warmup_epochs": 1}, 0.05, 6, 4)),
                      "binary_crossentropy", metrics=[keras.metrics.AUC(name="auc")])
        return model

    def callbacks():
        return phase_callbacks(best_path=tmp_path / "best.weights.h5", csv_path=tmp_path / "h.csv",
                               backup_dir=tmp_path / "backup", log_dir=None, patience=10,
                               lr_patience=1, lr_factor=0.5, min_lr=1e-3, plateau=False)

    class Kill(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == epochs_before_kill:
                raise KeyboardInterrupt

    if epochs_before_kill is not None:
        with pytest.raises(KeyboardInterrupt):
            compiled().fit(x, y, validation_data=(x, y), epochs=6, batch_size=16, verbose=0,
                           callbacks=callbacks() + [Kill()])
    kinds = {type(cb) for cb in callbacks()}
    assert LearningRateLog in kinds and ResumableReduceLROnPlateau not in kinds
    compiled().fit(x, y, validation_data=(x, y), epochs=6, batch_size=16, verbose=0,
                   callbacks=callbacks())
    with (tmp_path / "h.csv").open() as f:
        return [float(row["learning_rate"]) for row in csv.DictReader(f)]


def test_a_killed_cosine_phase_resumes_on_the_same_curve(tmp_path):
    whole = fit(tmp_path / "whole")
    # The LR logged after epoch k is the schedule's at step 4 (k + 1): warm-up ends at step 4.
    # 6 epochs x 4 steps, 1 epoch of warm-up: 20 steps of decay from 0.05 to min_lr 1e-5.
    expected = [1e-5 + (0.05 - 1e-5) * 0.5 * (1 + np.cos(np.pi * 4 * k / 20)) for k in range(6)]
    assert whole == pytest.approx(expected, rel=1e-5, abs=1e-8)
    assert fit(tmp_path / "killed", epochs_before_kill=3) == pytest.approx(whole, rel=1e-6)
