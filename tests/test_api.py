"""The Python API (ich.api, re-exported from ich): the docs/api.md example, custom objects
registered for plain Keras, and the light `import ich`.

The example and the registration checks run in subprocesses: `import ich` must be the first
thing a fresh interpreter does, as in a notebook.
"""

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path, timeout: int = 600) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), KERAS_BACKEND="torch")
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout + done.stderr


def doc_blocks() -> list[str]:
    """The ```python blocks of docs/api.md, in order."""
    return re.findall(r"```python\n(.*?)```", (REPO / "docs" / "api.md").read_text(), re.S)


# Real architectures, a whole run: minutes on 2 shared cores, so `make test-all` only; the fast
# tests below cover each API function on the tiny cascade.
@pytest.mark.slow
def test_docs_api_example_runs(tmp_path):
    blocks = doc_blocks()
    assert len(blocks) == 3
    out = _python("\n".join(blocks), cwd=tmp_path)
    # The steps' summary lines reach stderr through the handler the API adds.
    assert "split:" in out and "train stage1:" in out
    assert "test ROC AUC (any):" in out
    assert "(None, 5)" in out
    for name in ("stage1.keras", "stage2.keras", "cascade.json", "eval/metrics.json"):
        assert (tmp_path / "runs" / "phantoms" / name).is_file(), name


def test_import_ich_is_light_and_registers_with_keras(tmp_path):
    code = (
        "import sys, ich\n"
        "assert 'keras' not in sys.modules and 'ich.models' not in sys.modules\n"
        "import keras\n"
        "from keras.src.saving.object_registration import GLOBAL_CUSTOM_OBJECTS as R\n"
        "print(sorted(k for k in R if k.startswith('ich>')))\n")
    assert ("['ich>FastBatchNormalization', 'ich>FastConv2D', 'ich>FastDense', 'ich>FastDepthwiseConv2D', "
            "'ich>FastDropout', 'ich>MaskedAUC', 'ich>MaskedAttentionPool', 'ich>MaskedMaxPool', 'ich>MaskedSequence', "
            "'ich>ProbabilityLogits', 'ich>RandomIntensity', 'ich>RandomWarp', 'ich>TokenEmbedding', "
            "'ich>WeightedBCE', "
            "'ich>masked_bce']"
            ) in _python(code, tmp_path)


def test_a_run_with_a_sequence_stage_loads_in_a_fresh_process(tmp_path):
    # `ich evaluate` / `ich predict` on their own, not after training in the same process.
    from tiny_cascade import save_tiny_cascade

    save_tiny_cascade(tmp_path / "run", sequence=True)
    load = ("import ich\n"
            "from ich.evaluation.inference import load_cascade\n"
            "print('stages', sorted(load_cascade('run').models))\n")
    assert "stages ['sequence', 'stage1', 'stage2']" in _python(load, tmp_path)


def test_plain_keras_loads_a_model_with_custom_layers_after_import_ich(tmp_path):
    save = (
        "import keras, numpy as np\n"
        "from ich.models.layers import TokenEmbedding\n"
        "from ich.models.losses import weighted_bce\n"
        "x = keras.Input((4, 3)); y = keras.layers.Dense(1, activation='sigmoid')(TokenEmbedding()(x))\n"
        "m = keras.Model(x, keras.layers.Flatten()(y))\n"
        "m.compile(optimizer='adam', loss=weighted_bce([2.0] * 4))\n"
        "m.fit(np.ones((2, 4, 3)), np.ones((2, 4)), verbose=0)\n"
        "m.save('m.keras')\n"
        "np.save('ref.npy', m.predict(np.ones((1, 4, 3)), verbose=0))\n")
    _python(save, tmp_path)
    load = ("import ich, keras, numpy as np\n"
            "m = keras.saving.load_model('m.keras')\n"
            "np.testing.assert_allclose(m.predict(np.ones((1, 4, 3)), verbose=0), np.load('ref.npy'), atol=1e-6)\n"
            "print('loaded', type(m.loss).__name__)\n")
    assert "loaded WeightedBCE" in _python(load, tmp_path)


def test_exported_stage_has_no_optimizer(tmp_path):
    """trainer.export writes models without optimizer state: a torch Adam in the file would stop
    it loading on JAX ("... keras.src.backend.torch.optimizers.torch_adam cannot be imported")."""
    import keras

    from ich.training.trainer import export

    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(
        keras.layers.GlobalAveragePooling2D()(inputs)))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    model.fit(np.ones((2, 8, 8, 3)), np.ones((2, 1)), verbose=0)
    best = tmp_path / "best.weights.h5"
    model.save_weights(best)
    export(model, None, best, tmp_path / "stage1.keras", rebuild=None)
    with zipfile.ZipFile(tmp_path / "stage1.keras") as archive:
        config = archive.read("config.json").decode()
        assert "optimizer" not in config.lower()
        assert not json.loads(config).get("compile_config")   # absent or {}: nothing to compile
        assert not any("optimizer" in name for name in archive.namelist())
    # Plain Keras on JAX loads it, compile=True (the default) included.
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO / "src"))
    done = subprocess.run([sys.executable, "-c", "import ich, keras; m = keras.saving.load_model("
                           f"{str(tmp_path / 'stage1.keras')!r}); print(keras.backend.backend(), m.output_shape)"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "jax (None, 1)" in done.stdout


def test_predict_on_arrays_returns_a_table(tmp_path):
    import ich
    from tiny_cascade import save_tiny_cascade

    run_dir = save_tiny_cascade(tmp_path / "run", image_size=16)
    images = np.zeros((3, 16, 16, 3), dtype=np.uint8)
    images[0, ..., 0] = 255                        # bright red: "blood"
    table = ich.predict(run_dir, images, ich.load_config())
    assert list(table.columns[:6]) == ["any", "epidural", "intraparenchymal", "intraventricular",
                                       "subarachnoid", "subdural"]
    assert table["any"][0] == pytest.approx(1 / (1 + np.exp(-4)), abs=1e-5)   # sigmoid(8 - 4)
    assert table["any"][1] == pytest.approx(1 / (1 + np.exp(4)), abs=1e-5)    # sigmoid(-4)
    assert table["any_pred"].tolist() == [1, 0, 0]


def test_api_rejects_unknown_steps():
    import ich

    with pytest.raises(ValueError, match="unknown step 'trian'"):
        ich.run({}, last="trian")


def test_api_evaluate_returns_the_metrics_dict_and_predicts_pngs(tmp_path):
    import ich
    from test_evaluate import SIZE, make_work_dir
    from tiny_cascade import save_tiny_cascade

    work = make_work_dir(tmp_path)
    run = save_tiny_cascade(tmp_path / "run", image_size=SIZE)
    cfg = ich.load_config(None, [f"paths.work_dir={work}", f"paths.run_dir={run}", "data.workers=1",
                                 "predict.workers=1", "evaluate.report_examples=2"])
    metrics = ich.evaluate(cfg)
    assert metrics == json.loads((run / "eval" / "metrics.json").read_text())
    assert 0 <= metrics["labels"]["any"]["roc_auc"] <= 1
    table = ich.predict(ich.load_model(run), [work / "png"], cfg)
    assert len(table) == 50 and {"image_id", "any", "any_pred"} <= set(table.columns)
