"""ich.training.callbacks: resume bookkeeping, best-model saving, TensorBoard, fit with a tiny model."""

import csv
import json
import math

import numpy as np
import pytest

import keras

from ich.training.callbacks import (BestModel, TensorBoardX, patience_state, phase_callbacks, read_best,
                           resume_epoch, trim_history)


def write_history(path, aucs):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "loss", "val_auc"])
        for i, a in enumerate(aucs):
            w.writerow([i, 0.5, a])


def test_patience_state_counts_epochs_since_best():
    rows = [{"val_auc": v} for v in ("0.6", "0.8", "0.7", "0.75")]
    assert patience_state(rows) == (0.8, 2)
    assert patience_state([{"val_auc": "0.9"}]) == (0.9, 0)
    assert patience_state([]) == (None, 0)
    assert patience_state([{"val_auc": "nan"}, {"val_auc": "0.5"}]) == (0.5, 0)
    # val_loss: lower is better.
    losses = [{"val_loss": v} for v in ("0.9", "0.4", "0.5", "0.45")]
    assert patience_state(losses, "val_loss") == (0.4, 2)


def test_trim_history_drops_epochs_without_backup(tmp_path):
    path = tmp_path / "h.csv"
    write_history(path, [0.5, 0.6, 0.7])
    kept = trim_history(path, 2)
    assert [r["epoch"] for r in kept] == ["0", "1"]
    with path.open() as f:
        assert len(list(csv.DictReader(f))) == 2
    assert trim_history(tmp_path / "missing.csv", 3) == []


def test_resume_epoch_reads_backup_metadata(tmp_path):
    assert resume_epoch(tmp_path) == 0
    (tmp_path / "training_metadata.json").write_text(json.dumps({"epoch": 3, "batch": 0}))
    assert resume_epoch(tmp_path) == 3


def tiny_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(1, activation="sigmoid", name="out")(inputs)
    model = keras.Model(inputs, outputs, name="tiny")
    model.compile(keras.optimizers.Adam(0.05), "binary_crossentropy", metrics=[keras.metrics.AUC(name="auc")])
    return model


def best_model(tmp_path):
    """(weights path, a tiny model, a BestModel on val_auc watching it)."""
    path = tmp_path / "best.weights.h5"
    model = tiny_model()
    cb = BestModel(path)
    cb.set_model(model)
    return path, model, cb


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_best_model_saves_only_improvements_and_remembers_them(tmp_path):
    path, model, cb = best_model(tmp_path)
    cb.on_epoch_end(0, {"val_auc": 0.7})
    assert read_best(path) == {"monitor": "val_auc", "value": 0.7, "epoch": 0}
    saved = model.get_layer("out").get_weights()
    model.get_layer("out").set_weights([w + 1 for w in saved])
    cb.on_epoch_end(1, {"val_auc": 0.6})
    cb.on_epoch_end(2, {"val_auc": float("nan")})
    assert read_best(path)["epoch"] == 0
    # A new callback (a resumed run, or the next phase) must beat 0.7 too.
    again = BestModel(path)
    assert again.best == 0.7
    model.load_weights(path)
    for got, want in zip(model.get_layer("out").get_weights(), saved):
        np.testing.assert_array_equal(got, want)
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
    with pytest.raises(ValueError, match="weights.h5"):
        BestModel(tmp_path / "best.keras")


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_best_model_on_val_loss_keeps_the_lowest_and_ignores_a_val_auc_score(tmp_path):
    path, model, auc = best_model(tmp_path)
    auc.on_epoch_end(0, {"val_auc": 0.9, "val_loss": 0.8})
    # A score file of another monitor (a run whose train.monitor changed) is no bar to beat.
    cb = BestModel(path, "val_loss")
    assert cb.best is None
    cb.set_model(model)
    cb.on_epoch_end(0, {"val_loss": 0.5})
    cb.on_epoch_end(1, {"val_loss": 0.6})
    cb.on_epoch_end(2, {"val_loss": 0.3})
    cb.on_epoch_end(3, {"val_loss": 0.3})
    assert read_best(path) == {"monitor": "val_loss", "value": 0.3, "epoch": 2}


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_best_model_keep_last_saves_every_epoch_with_a_finite_score(tmp_path):
    path, model, _ = best_model(tmp_path)
    cb = BestModel(path, "val_loss", keep="last")
    cb.set_model(model)
    cb.on_epoch_end(0, {"val_loss": 0.3})
    model.get_layer("out").set_weights([w + 1 for w in model.get_layer("out").get_weights()])
    last = model.get_layer("out").get_weights()
    cb.on_epoch_end(1, {"val_loss": 0.9})        # worse, kept: it is the last
    cb.on_epoch_end(2, {"val_loss": float("nan")})
    assert read_best(path) == {"monitor": "val_loss", "value": 0.9, "epoch": 1}
    model.get_layer("out").set_weights([w * 0 for w in last])
    model.load_weights(path)
    for got, want in zip(model.get_layer("out").get_weights(), last):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="keep must be best or last"):
        BestModel(path, keep="first")


def test_tensorboard_writes_event_file(tmp_path):
    model = tiny_model()
    cb = TensorBoardX(tmp_path / "logs", step_offset=5)
    cb.set_model(model)
    cb.on_train_begin()
    cb.on_epoch_end(0, {"loss": 0.3, "val_auc": 0.8})
    cb.on_train_end()
    files = list((tmp_path / "logs").glob("events.out.tfevents.*"))
    assert files and files[0].stat().st_size > 0


def data(n=64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")
    return x, y


def callbacks(tmp_path, **kw):
    return phase_callbacks(best_path=tmp_path / "best.weights.h5", csv_path=tmp_path / "h.csv",
                           backup_dir=tmp_path / "backup", log_dir=tmp_path / "logs", patience=10,
                           lr_patience=1, lr_factor=0.5, min_lr=1e-6, **kw)


class Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 3:
            raise KeyboardInterrupt


def test_interrupted_fit_resumes_with_optimizer_lr_and_history(tmp_path):
    x, y = data()
    model = tiny_model()
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, validation_data=(x, y), epochs=6, batch_size=16, verbose=0,
                  callbacks=callbacks(tmp_path) + [Interrupt()])
    iterations = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    lr = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    assert resume_epoch(tmp_path / "backup") == 3 and iterations == 12

    fresh = tiny_model()  # a new process would rebuild and recompile the model
    seen = []
    probe = keras.callbacks.LambdaCallback(on_train_begin=lambda logs: seen.append(
        (int(keras.ops.convert_to_numpy(fresh.optimizer.iterations)),
         float(keras.ops.convert_to_numpy(fresh.optimizer.learning_rate)))))
    history = fresh.fit(x, y, validation_data=(x, y), epochs=6, batch_size=16, verbose=0,
                        callbacks=callbacks(tmp_path) + [probe])
    assert len(history.history["loss"]) == 3  # epochs 3, 4, 5 only
    assert seen[0] == (iterations, pytest.approx(lr))  # optimizer state and LR came back
    with (tmp_path / "h.csv").open() as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1, 2, 3, 4, 5]
    assert not (tmp_path / "backup").exists()  # removed once the phase finished
    assert math.isfinite(read_best(tmp_path / "best.weights.h5")["value"])


def test_nan_loss_raises(tmp_path):
    x, y = data()
    x[5, 0] = np.nan
    model = tiny_model()
    model.compile(keras.optimizers.Adam(0.05), "mse", metrics=[keras.metrics.AUC(name="auc")])
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        model.fit(x, y, validation_data=(x, y), epochs=2, batch_size=64, verbose=0,
                  callbacks=callbacks(tmp_path))


def test_resumed_early_stopping_counts_epochs_from_before_the_kill():
    from ich.training.callbacks import ResumableEarlyStopping

    cb = ResumableEarlyStopping(monitor="val_auc", mode="max", patience=3, resume_best=0.8, resume_wait=2)
    cb.set_model(tiny_model())
    cb.on_train_begin()
    cb.on_epoch_end(5, {"val_auc": 0.79})  # third flat epoch in all: stop
    assert cb.model.stop_training
    fresh = ResumableEarlyStopping(monitor="val_auc", mode="max", patience=3)
    fresh.set_model(tiny_model())
    fresh.on_train_begin()
    fresh.on_epoch_end(5, {"val_auc": 0.79})
    assert not fresh.model.stop_training
