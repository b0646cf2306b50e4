"""Step train on the JAX backend (in a subprocess: Keras picks its backend once per process):
a tiny stage 1 trains, is saved, and the saved model loads and predicts here on torch."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import keras

from ich import config
from ich.constants import STAGE1_MODEL

from test_train import history, make_work, tiny_cfg

SIZE = 32


@pytest.mark.slow  # JAX compiles the real backbone for ~2 minutes on 2 cores; the fast suite's JAX checks are in test_backends
@pytest.mark.skipif(sys.platform == "win32", reason="console script path differs on Windows")
def test_stage1_trains_on_jax_and_loads_on_torch(tmp_path):
    pytest.importorskip("jax")
    make_work(tmp_path / "work")
    cfg = tiny_cfg(tmp_path, **{"train.stages": ["stage1"], "train.backend": "jax"})
    cfg_path = config.save(cfg, tmp_path / "cfg.yaml")
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    cmd = [str(Path(sys.executable).with_name("ich")), "train", "--config", str(cfg_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    # Only stage 1 was asked for, so the step ends by saying stage2.keras is missing.
    assert done.returncode == 2 and "stage2.keras missing" in done.stderr, done.stderr[-3000:]
    assert "backend jax" in done.stderr
    run_dir = Path(cfg["paths"]["run_dir"])
    assert [int(r["epoch"]) for r in history(run_dir, "stage1_finetune")] == [0, 1]

    import ich.models  # noqa: F401

    model = keras.saving.load_model(run_dir / STAGE1_MODEL, compile=False)
    out = model.predict(np.zeros((2, SIZE, SIZE, 3), "float32"), verbose=0)
    assert out.shape == (2, 1) and np.all((out > 0) & (out < 1))
