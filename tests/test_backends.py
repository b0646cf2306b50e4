"""Models are portable across Keras backends: trained and saved on torch, loaded on JAX.

Keras fixes its backend once per process, so JAX and TensorFlow run in subprocesses
(tests/backend_check.py). The real cascade builders are used at 32 px with random weights,
except in the fast JAX smoke: building and compiling EfficientNetV2 + ConvNeXt takes JAX minutes
on 2 CPU cores, so the normal suite trains tiny stages there and the real ones run under `slow`.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backend_check import BATCH, cascade_probs, fixed_images, train_tiny_cascade
from ich.evaluation.inference import load_cascade

SCRIPT = Path(__file__).with_name("backend_check.py")


def _run(backend: str, *args: str, timeout: int = 300) -> str:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2",
               JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{backend} subprocess failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory):
    """A real cascade trained two steps and saved on torch, with its in-memory predictions and
    those of the saved files loaded back (torch)."""
    run_dir = tmp_path_factory.mktemp("torch_run")
    stage1, stage2 = train_tiny_cascade(run_dir)
    x = fixed_images().astype("float32") / 255
    in_memory = cascade_probs(np.asarray(stage1.predict(x, verbose=0))[:, 0],
                        np.asarray(stage2.predict(x, verbose=0)))
    loaded = load_cascade(run_dir).predict(fixed_images(), batch_size=BATCH)
    return run_dir, in_memory, loaded


def test_torch_cascade_round_trip(torch_run):
    _, in_memory, loaded = torch_run
    np.testing.assert_allclose(loaded, in_memory, atol=1e-5)


@pytest.mark.slow  # a JAX process building the cascade: ~50 s on a 2-core Zen 1; test_jax_end_to_end_smoke_tiny is the fast check
def test_torch_model_predicts_the_same_on_jax(torch_run, tmp_path):
    run_dir, _, torch_probs = torch_run
    np.save(tmp_path / "images.npy", fixed_images())
    _run("jax", "predict", str(run_dir), str(tmp_path / "images.npy"), str(tmp_path / "jax.npy"))
    np.testing.assert_allclose(np.load(tmp_path / "jax.npy"), torch_probs, atol=1e-4)


def test_jax_end_to_end_smoke_tiny(tmp_path):
    assert _run("jax", "smoke", str(tmp_path), "tiny").strip().endswith("ok")


@pytest.mark.slow
def test_jax_end_to_end_smoke_real_builders(tmp_path):
    assert _run("jax", "smoke", str(tmp_path), "real", timeout=1200).strip().endswith("ok")


@pytest.mark.tensorflow
def test_tensorflow_end_to_end_smoke(tmp_path):
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed (make test-all installs it)")
    assert _run("tensorflow", "smoke", str(tmp_path), "real", timeout=1200).strip().endswith("ok")
