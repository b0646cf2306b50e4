"""ich.saved_models: a saved model is read once per pipeline run, and again when its file changes."""

import types

import keras
import numpy as np

from ich import cli
from ich import config as config_mod
from ich import saved_models
from ich.saved_models import load_saved, reusing_loaded_models


def _save(path, bias: float):
    inputs = keras.Input((2,))
    dense = keras.layers.Dense(1, bias_initializer=keras.initializers.Constant(bias))
    keras.Model(inputs, dense(inputs)).save(path)


def _bias(model) -> float:
    return float(np.asarray(model.layers[-1].get_weights()[1])[0])


def test_outside_the_context_every_load_reads_the_file(tmp_path):
    _save(tmp_path / "m.keras", 1.0)
    first, second = load_saved(tmp_path / "m.keras"), load_saved(tmp_path / "m.keras")
    assert first is not second
    assert _bias(first) == _bias(second) == 1.0


def test_inside_the_context_an_unchanged_file_is_loaded_once(tmp_path, monkeypatch):
    path = tmp_path / "m.keras"
    _save(path, 1.0)
    reads = []
    real = keras.saving.load_model
    monkeypatch.setattr(keras.saving, "load_model", lambda p, **kw: reads.append(p) or real(p, **kw))
    with reusing_loaded_models():
        first = load_saved(path)
        with reusing_loaded_models():            # a step inside `ich run`: shares the run's models
            assert load_saved(path) is first
        assert load_saved(tmp_path / "." / "m.keras") is first   # the same file by another spelling
        assert len(reads) == 1
        # Retrained: written anew (a new file renamed over it, as the trainer saves).
        _save(tmp_path / "new.keras", 2.0)
        (tmp_path / "new.keras").replace(path)
        again = load_saved(path)
        assert again is not first and _bias(again) == 2.0
        assert len(reads) == 2
    # The context is left: its models are forgotten.
    assert saved_models._loaded is None
    assert load_saved(path) is not again


def test_a_pipeline_step_runs_inside_the_context(tmp_path, monkeypatch):
    cfg = config_mod.load(None, [f"paths.work_dir={tmp_path / 'work'}", f"paths.run_dir={tmp_path / 'run'}"])
    seen = []
    fake = types.SimpleNamespace(run=lambda cfg, force=False: seen.append(saved_models._loaded is not None))
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: fake)
    cli.run_step("split", cfg)
    assert seen == [True]
    assert saved_models._loaded is None
