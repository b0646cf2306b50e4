"""ich.backend: backend selection rules, switches, versions (torch is loaded in this process)."""

import subprocess
import sys

import keras
import pytest

from ich import backend


def test_auto_follows_the_loaded_keras():
    assert backend.select_backend("auto") == keras.backend.backend() == "torch"


def test_other_backend_after_import_is_a_clear_error():
    with pytest.raises(RuntimeError, match="KERAS_BACKEND=jax"):
        backend.select_backend("jax")


def test_unknown_backend():
    with pytest.raises(ValueError, match="valid"):
        backend.select_backend("theano")


def test_switches_follow_the_device():
    gpu = backend.has_gpu()
    assert backend.resolve_mixed_precision("auto") is gpu and backend.resolve_jit("auto") is gpu
    assert backend.resolve_mixed_precision(True) is True and backend.resolve_jit(False) is False


def test_versions_name_the_backend_package():
    v = backend.versions()
    assert set(v) == {"ich", "keras", "torch"} and v["keras"] == keras.__version__


def test_selection_sets_the_variable_before_keras_loads():
    # A fresh interpreter without KERAS_BACKEND: auto must give torch, not Keras's default.
    code = ("import os; os.environ.pop('KERAS_BACKEND', None); from ich import backend; "
            "print(backend.select_backend('auto')); import keras; print(keras.backend.backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["torch", "torch"]


def test_set_seed_repeats_draws():
    import numpy as np

    backend.set_seed(3)
    a = (np.random.rand(), keras.ops.convert_to_numpy(keras.random.normal((2,))))
    backend.set_seed(3)
    b = (np.random.rand(), keras.ops.convert_to_numpy(keras.random.normal((2,))))
    assert a[0] == b[0] and (a[1] == b[1]).all()
