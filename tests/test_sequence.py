"""The sequence stage: masking, padding invariance, hand-checked pooling, learning from
neighbours, and save/load on torch and JAX with the same outputs."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from ich.models.sequence import MaskedMaxPool, build_sequence, receptive_field

D = 8
SCRIPT = Path(__file__).with_name("sequence_check.py")


def _batch(lengths, t, seed=0):
    rng = np.random.default_rng(seed)
    n = len(lengths)
    mask = np.zeros((n, t), np.float32)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    features = rng.normal(size=(n, t, D)).astype(np.float32) * mask[:, :, None]
    probabilities = rng.uniform(0, 1, size=(n, t, 6)).astype(np.float32) * mask[:, :, None]
    return {"features": features, "mask": mask, "probabilities": probabilities}


def _trained_like(model, seed=0):
    """Random non-zero weights everywhere (a fresh model has a zero head)."""
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(scale=0.3, size=w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def test_untrained_stage_reproduces_the_cascade():
    model = build_sequence(D, width=16)
    batch = _batch([5, 3], 6)
    out = model.predict(batch, verbose=0)
    expected = np.clip(batch["probabilities"], 1e-4, 1 - 1e-4) * batch["mask"][:, :, None]
    np.testing.assert_allclose(out["slices"], expected, atol=1e-5)
    np.testing.assert_allclose(out["study"][0], expected[0, :5].max(axis=0), atol=1e-5)
    np.testing.assert_allclose(out["study"][1], expected[1, :3].max(axis=0), atol=1e-5)


@pytest.mark.parametrize("pooling", ["max", "attention"])
def test_padding_changes_nothing(pooling):
    model = _trained_like(build_sequence(D, width=16, pooling=pooling))
    short = _batch([7], 7, seed=3)
    padded = {k: np.concatenate([v, np.zeros((1, 5) + v.shape[2:], v.dtype)], axis=1)
              for k, v in short.items()}
    a, b = model.predict(short, verbose=0), model.predict(padded, verbose=0)
    np.testing.assert_allclose(b["slices"][:, :7], a["slices"], atol=1e-5)
    assert np.all(b["slices"][:, 7:] == 0)
    np.testing.assert_allclose(b["study"], a["study"], atol=1e-5)


def test_masked_max_pool_by_hand():
    x = np.array([[[0.1, 0.9], [0.7, 0.2], [0.95, 0.99]]], np.float32)
    mask = np.array([[1, 1, 0]], np.float32)  # the brightest step is padding
    out = np.asarray(MaskedMaxPool()(x, mask))
    np.testing.assert_allclose(out, [[0.7, 0.9]])


def test_receptive_field_covers_a_series():
    assert receptive_field(3, (1, 2, 4, 8)) == 15


def test_it_learns_from_neighbouring_slices():
    """Slice t is positive when slice t-1 carried the signal: only context can tell."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    n, t = 64, 8
    signal = (rng.random((n, t)) < 0.3).astype(np.float32)
    features = rng.normal(scale=0.1, size=(n, t, D)).astype(np.float32)
    features[:, :, 0] += signal
    target = np.zeros((n, t, 6), np.float32)
    target[:, 1:, :] = signal[:, :-1, None]
    mask = np.ones((n, t), np.float32)
    model = build_sequence(D, with_probabilities=False, width=16, dilations=(1, 2))
    model.compile(keras.optimizers.Adam(2e-2), loss={"slices": "binary_crossentropy",
                                                     "study": "binary_crossentropy"})
    model.fit({"features": features, "mask": mask}, {"slices": target, "study": target.max(axis=1)},
              epochs=30, batch_size=64, verbose=0)
    out = model.predict({"features": features, "mask": mask}, verbose=0)["slices"]
    accuracy = ((out[:, 1:, 0] > 0.5) == (target[:, 1:, 0] > 0.5)).mean()
    assert accuracy > 0.95


def test_save_load_on_torch_and_jax_give_the_same_outputs(tmp_path):
    model = _trained_like(build_sequence(D, width=16, pooling="attention"), seed=5)
    batch = _batch([6, 2, 4], 6, seed=7)
    expected = model.predict(batch, verbose=0)
    path = tmp_path / "sequence.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    again = loaded.predict(batch, verbose=0)
    for key in ("slices", "study"):
        np.testing.assert_allclose(again[key], expected[key], atol=1e-6)

    np.savez(tmp_path / "inputs.npz", **batch)
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, str(SCRIPT), str(path), str(tmp_path / "inputs.npz"),
                           str(tmp_path / "jax.npz")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    jax_out = np.load(tmp_path / "jax.npz")
    assert str(jax_out["backend"]) == "jax"
    for key in ("slices", "study"):
        np.testing.assert_allclose(jax_out[key], expected[key], atol=1e-4)


def test_masked_bce_skips_padded_entries_by_hand():
    from ich.models.sequence import masked_bce

    y = np.array([[[1.0, -1.0], [0.0, -1.0]]], np.float32)
    p = np.array([[[0.8, 0.01], [0.4, 0.99]]], np.float32)
    expected = -(np.log(0.8) + np.log(0.6)) / 2
    assert float(masked_bce(y, p)) == pytest.approx(expected, rel=1e-5)


def test_masked_auc_equals_scikit_learn_on_the_real_entries():
    from sklearn.metrics import roc_auc_score

    from ich.models.sequence import MaskedAUC

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (4, 5, 6)).astype(np.float32)
    p = rng.random((4, 5, 6)).astype(np.float32)
    y[0, 3:] = -1
    y[2, 1:] = -1
    metric = MaskedAUC(num_thresholds=2000)
    metric.update_state(y, p)
    real = y >= 0
    assert float(metric.result()) == pytest.approx(roc_auc_score(y[real], p[real]), abs=2e-3)


def test_cascade_refine_with_an_untrained_stage_keeps_the_cascade():
    """Cascade.refine packs series by position, runs the stage and puts every slice back in
    its row: with a fresh stage (the identity on the cascade) the rows come back unchanged."""
    from ich.evaluation.inference import Cascade

    model = build_sequence(D, width=8)
    meta = {"stages": [{"name": "sequence", "file": "sequence.keras", "labels": [], "kind": "sequence"}]}
    cascade = Cascade(models={"sequence": model}, meta=meta)
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.01, 0.99, (5, 6)).astype(np.float32)
    features = rng.normal(size=(5, D)).astype(np.float32)
    refined, runs, study = cascade.refine(["x", "y", "x", "x", "y"], [2, 0, 0, 1, -1], probs, features)
    np.testing.assert_allclose(refined, probs, atol=1e-5)
    assert [list(r) for r in runs] == [[2, 3, 0], [4, 1]]
    np.testing.assert_allclose(study, [probs[[0, 2, 3]].max(axis=0), probs[[1, 4]].max(axis=0)], atol=1e-5)
