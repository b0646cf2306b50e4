"""ich export: the cascade as one ONNX graph, run by onnxruntime without Keras, equal to Keras.

The fast tests export tests/tiny_cascade.py's hand-weighted stages (seconds), so the exported
numbers are also checked against probabilities computed by hand; the slow one exports the real
EfficientNetV2 + ConvNeXt cascade (the torch exporter traces it in over a minute on 2 cores).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from ich.cli import main
from ich.constants import CASCADE_JSON, LABELS, PREDICTIONS_CSV
from ich.errors import StepError
from ich.evaluation.inference import load_cascade
from ich.evaluation.onnx_cascade import OnnxCascade, is_export, load_onnx_cascade
from ich.steps.predict import load_any_cascade
from ich.export import ONNX_FILE
from ich.steps.export import run_export
from tiny_cascade import expected_probs, red_images, save_tiny_cascade

SIZE = 16
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    thresholds = {label: 0.2 + 0.05 * k for k, label in enumerate(LABELS)}
    return save_tiny_cascade(tmp_path_factory.mktemp("run"), image_size=SIZE, thresholds=thresholds)


@pytest.fixture(scope="module")
def export_dir(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    assert run_export(run_dir, out, "onnx") == out / CASCADE_JSON
    return out


def test_export_writes_graph_and_description(run_dir, export_dir):
    assert (export_dir / ONNX_FILE).is_file()
    meta = json.loads((export_dir / CASCADE_JSON).read_text())
    run_meta = json.loads((run_dir / CASCADE_JSON).read_text())
    # The run's input description and thresholds travel with the export unchanged.
    for key in ("input", "stages", "thresholds", "labels"):
        assert meta[key] == run_meta[key]
    export = meta["export"]
    assert export["format"] == "onnx" and export["file"] == ONNX_FILE
    assert export["input"]["shape"] == [None, SIZE, SIZE, 3] and export["input"]["dtype"] == "float32"
    assert export["output"]["labels"] == list(LABELS)
    assert export["max_abs_diff_vs_keras"] <= 1e-4
    assert is_export(export_dir) and not is_export(run_dir)


def test_onnx_predictions_equal_keras_and_hand_computed(run_dir, export_dir):
    onnx = load_any_cascade(export_dir)  # dispatches on the folder's content
    assert isinstance(onnx, OnnxCascade)
    keras_cascade = load_cascade(run_dir)
    images = red_images([0, 40, 90, 128, 170, 210, 255])
    got = onnx.predict(images, batch_size=3)  # batches of 3, 3 and 1: the batch is dynamic
    np.testing.assert_allclose(got, keras_cascade.predict(images, batch_size=4), atol=1e-4)
    np.testing.assert_allclose(got, expected_probs(images), atol=1e-5)
    assert got.dtype == np.float32 and got.shape == (7, 6)
    # Same interface as the Keras cascade: thresholds, size, float input, resizing, bad input.
    assert onnx.thresholds == keras_cascade.thresholds and onnx.image_size == SIZE
    np.testing.assert_allclose(onnx.predict(images.astype(np.float32) / 255), got, atol=1e-6)
    large = red_images([30, 220], size=40)
    np.testing.assert_allclose(onnx.predict(large), expected_probs(large), atol=1e-5)
    assert onnx.predict(np.zeros((0, SIZE, SIZE, 3), np.uint8)).shape == (0, 6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        onnx.predict(np.full((1, SIZE, SIZE, 3), 2.0, np.float32))


def _pngs(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(red_images([10, 80, 150, 240, 120], size=SIZE, seed=3)):
        path = folder / f"ID_{i:09x}.png"
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


def test_cli_export_then_predict_equals_run_predict(run_dir, tmp_path):
    pngs = _pngs(tmp_path / "png")
    out = tmp_path / "exported"
    assert main(["-q", "export", str(run_dir), "--format", "onnx", "--out", str(out)]) == 0
    assert main(["-q", "predict", *map(str, pngs), "--model", str(out), "--out", str(tmp_path / "a")]) == 0
    assert main(["-q", "predict", *map(str, pngs), "--model", str(run_dir), "--out", str(tmp_path / "b")]) == 0
    a, b = pd.read_csv(tmp_path / "a" / PREDICTIONS_CSV), pd.read_csv(tmp_path / "b" / PREDICTIONS_CSV)
    assert list(a.columns) == list(b.columns) and list(a["image_id"]) == list(b["image_id"])
    np.testing.assert_allclose(a[list(LABELS)].to_numpy(), b[list(LABELS)].to_numpy(), atol=1e-4)
    pred = [f"{label}_pred" for label in LABELS]
    assert (a[pred].to_numpy() == b[pred].to_numpy()).all()


def test_predict_on_export_imports_no_keras(export_dir, tmp_path):
    pngs = _pngs(tmp_path / "png")
    # Keras, torch, JAX and TensorFlow made unimportable: the export must still predict.
    code = ("import sys\n"
            "BLOCKED = ('keras', 'torch', 'jax', 'tensorflow')\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in BLOCKED:\n"
            "            raise ImportError(f'{name} is blocked by the test')\n"
            "sys.meta_path.insert(0, Block())\n"
            "from ich.cli import main\n"
            f"code = main(['predict', *{[str(p) for p in pngs]!r}, '--model', {str(export_dir)!r}, "
            f"'--out', {str(tmp_path / 'out')!r}])\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in BLOCKED], 'a backend was imported'\n"
            "sys.exit(code)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    pred = pd.read_csv(tmp_path / "out" / PREDICTIONS_CSV)
    images = np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in pngs])
    np.testing.assert_allclose(pred[list(LABELS)].to_numpy(), expected_probs(images), atol=1e-5)


def test_export_errors_name_the_fix(run_dir, export_dir, tmp_path):
    with pytest.raises(StepError, match="valid: onnx, saved_model"):
        run_export(run_dir, tmp_path / "x", "torchscript")
    with pytest.raises(StepError, match="folder of its own"):
        run_export(run_dir, run_dir, "onnx")
    with pytest.raises(FileNotFoundError, match="ich train"):
        run_export(tmp_path / "no_run", tmp_path / "y", "onnx")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CASCADE_JSON).write_text((export_dir / CASCADE_JSON).read_text())
    with pytest.raises(FileNotFoundError, match="ich export"):
        load_onnx_cascade(broken)
    with pytest.raises(ValueError, match="not an ONNX export"):
        load_onnx_cascade(run_dir)


@pytest.mark.slow
def test_real_cascade_export_equals_keras(tmp_path):
    from backend_check import fixed_images, train_tiny_cascade

    run = tmp_path / "run"
    train_tiny_cascade(run)  # EfficientNetV2B0 and EfficientNetV2B0 + ConvNeXtTiny at 32 px
    run_export(run, tmp_path / "export", "onnx")
    images = fixed_images()
    np.testing.assert_allclose(load_onnx_cascade(tmp_path / "export").predict(images),
                               load_cascade(run).predict(images), atol=1e-4)


@pytest.mark.tensorflow
def test_saved_model_export_on_tensorflow(run_dir, tmp_path):
    code = ("import sys, numpy as np\n"
            "from ich.steps.export import run_export\n"
            "from ich.backend import run_saved_model\n"
            f"run_export({str(run_dir)!r}, {str(tmp_path / 'sm')!r}, 'saved_model')\n"
            "x = np.load(sys.argv[1])\n"
            f"np.save(sys.argv[2], run_saved_model({str(tmp_path / 'sm' / 'saved_model')!r}, x))\n")
    images = red_images([0, 128, 255])
    np.save(tmp_path / "x.npy", images.astype(np.float32) / 255)
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO / "tests")]))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected_probs(images), atol=1e-5)
    assert json.loads((tmp_path / "sm" / CASCADE_JSON).read_text())["export"]["format"] == "saved_model"


def test_export_description_leaves_the_sequence_stage_in_the_run():
    from ich.export import export_description

    meta = {"stages": [{"name": "stage1", "file": "stage1.keras", "labels": ["any"]},
                       {"name": "sequence", "file": "sequence.keras", "kind": "sequence"}],
            "thresholds": {"any": 0.7}, "cascade_thresholds": {"any": 0.4}}
    out = export_description(meta, "onnx", "cascade.onnx", (16, 16, 3), {}, 0.0)
    assert [s["name"] for s in out["stages"]] == ["stage1"]
    assert out["export"]["not_exported"] == ["sequence"]
    assert out["thresholds"] == {"any": 0.4}       # the image stages' own, chosen on val
    assert meta["thresholds"] == {"any": 0.7}      # the run's description is not changed
