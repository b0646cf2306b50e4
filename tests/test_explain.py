"""Grad-CAM: exact against plain CAM for pooled-then-dense heads, the feature-injection run of
stage 2, the lesion hit rate on `ich synth --masks` phantoms, and `ich explain` end to end on
torch and (in a subprocess) JAX."""

import os
import subprocess
import sys
from pathlib import Path

import cv2
import keras
import numpy as np
import pandas as pd
import pytest

from ich import config
from ich.backend import gradients
from ich.evaluation import explain, feature_maps
from ich.steps.explain import EXPLANATIONS_CSV, explain_paths
from ich.synth import generate
from blood_detector import build_blood_detector, lesion_slices
from tiny_cascade import ANY_WEIGHT, build_tiny, write_cascade

SIZE = 64


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return generate(root, patients=8, slices=10, seed=0, workers=1, size=SIZE, masks=True)


def test_backend_gradients_of_a_known_function():
    x = np.array([[1.0, -2.0], [0.5, 3.0]], dtype=np.float32)
    y = np.array([2.0, 1.0], dtype=np.float32)
    value, (gx, gy) = gradients(lambda t: keras.ops.sum(3.0 * t[0] ** 2 * t[1]), [x, y])
    # d/dx 3 x^2 y = 6 x y; d/dy = 3 x^2 summed over rows.
    assert value == pytest.approx(float(np.sum(3 * x ** 2 * y)))
    np.testing.assert_allclose(gx, 6 * x * y, rtol=1e-6)
    np.testing.assert_allclose(gy, 3 * (x ** 2).sum(axis=0), rtol=1e-6)


def test_gradcam_of_a_pooled_dense_head_is_plain_cam():
    stage1, _ = build_tiny(16)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 16, 16, 3)).astype(np.uint8)
    heat = explain.gradcam(stage1, images, 0)
    # The tiny stage 1 is pool -> dense with kernel (8, 0, 0): CAM = 8 * red.
    cam = explain.normalise(explain.class_activation_map(images / 255.0, [ANY_WEIGHT, 0.0, 0.0]))
    np.testing.assert_allclose(heat, cam, atol=1e-6)
    assert explain.peak(heat[0]) == explain.peak(images[0, ..., 0])


def test_gradcam_of_stage1s_last_map_is_plain_cam_and_both_stages_explain_at_stride_16():
    from ich.models.cascade import build_stage1, build_stage2

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    stage1 = build_stage1("EfficientNetV2B0", 32)
    (last,) = feature_maps.targets(stage1, 32)
    _, (features,) = feature_maps.run(stage1, x.astype("float32") / 255, [last])
    kernel = stage1.get_layer("any").get_weights()[0][:, 0]
    cam = np.maximum(explain.class_activation_map(keras.ops.convert_to_numpy(features), kernel), 0)
    expected = explain.normalise(explain.place(cam, last, (32, 32)))
    np.testing.assert_allclose(explain.gradcam(stage1, x, 0, stride=32), expected, atol=1e-4)

    stage2 = build_stage2(["EfficientNetV2B0", "ConvNeXtTiny"], 32, fusion_dim=32, attention_heads=2)
    for model, column in ((stage1, 0), (stage2, 3)):
        heat = explain.gradcam(model, x, column, stride=16)
        assert heat.shape == (2, 32, 32) and heat.max() <= 1.0 and heat.min() >= 0.0
        assert not np.allclose(heat, explain.gradcam(model, x, column, stride=32))


def test_heatmap_peak_falls_in_the_lesion_far_more_often_than_a_random_point(phantoms):
    images, masks, heads, _ = lesion_slices(phantoms, SIZE)
    assert len(images) >= 20
    heats = explain.gradcam(build_blood_detector(SIZE), images, 0)
    hit = explain.hit_rate(heats, masks)
    random_in_head = explain.random_hit_rate(masks, heads)
    assert random_in_head < 0.06
    assert hit >= 5 * random_in_head and hit >= 0.15, (hit, random_in_head)


def test_overlay_and_hit_rate_by_hand():
    image = np.zeros((4, 4, 3), np.uint8)
    heat = np.zeros((4, 4), np.float32)
    heat[1, 2] = 1.0
    out = explain.overlay(image, heat)
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    assert out[1, 2].sum() > 0 and out[0, 0].sum() == 0  # no heat: the grey image (black) shows
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 1, 2] = True
    masks[1, 3, 3] = True
    assert explain.hit_rate(np.stack([heat, heat]), masks) == 0.5
    assert explain.random_hit_rate(masks) == pytest.approx(1 / 16)


def _explain_run(tmp_path):
    _, stage2 = build_tiny(SIZE)
    return write_cascade(tmp_path / "run", build_blood_detector(SIZE), stage2, SIZE,
                         thresholds={"any": 0.3, "epidural": 0.99, "intraparenchymal": 0.99,
                                     "intraventricular": 0.99, "subarachnoid": 0.99, "subdural": 0.0})


def test_ich_explain_writes_overlays_above_threshold(phantoms, tmp_path):
    run = _explain_run(tmp_path)
    cfg = config.load(None, ["predict.workers=1"])
    dicoms = sorted((phantoms / "stage_2_train").glob("*.dcm"))[:12]
    (tmp_path / "bad.dcm").write_bytes(b"not a dicom")
    path = explain_paths(dicoms + [tmp_path / "bad.dcm"], run, tmp_path / "out", cfg)
    table = pd.read_csv(path)
    assert list(table.columns) == ["image_id", "file", "label", "probability", "threshold", "overlay",
                                   "peak_row", "peak_col"]
    # subdural at threshold 0: every image; any: those at or above 0.3; no other label.
    assert (table["label"] == "subdural").sum() == 12
    assert set(table["label"]) <= {"any", "subdural"}
    assert (table.loc[table["label"] == "any", "probability"] >= 0.3).all()
    for name in table["overlay"]:
        image = cv2.imread(str(tmp_path / "out" / name))
        assert image.shape == (SIZE, SIZE, 3)
    failures = pd.read_csv(tmp_path / "out" / "failures.csv")
    assert failures["path"].tolist() == ["13/bad.dcm"]   # the 13th path given (ich.data.sources.display_names)
    # Outputs name files as given, never by an absolute path (folders may name patients).
    for name in ("failures.csv", "explanations.csv"):
        assert str(tmp_path) not in (tmp_path / "out" / name).read_text()
    assert set(table["file"]) == {f"{k}/{p.name}" for k, p in enumerate(dicoms, start=1)}
    from ich.errors import StepError

    with pytest.raises(StepError, match="run directory"):
        explain_paths(dicoms[:1], run, run / "explain", cfg)


@pytest.mark.slow  # a JAX process compiling Grad-CAM: ~40 s; JAX inference is in test_backends
@pytest.mark.skipif(sys.platform == "win32", reason="console script path differs on Windows")
def test_ich_explain_on_jax_matches_torch(phantoms, tmp_path):
    pytest.importorskip("jax")
    run = _explain_run(tmp_path)
    dicoms = [str(p) for p in sorted((phantoms / "stage_2_train").glob("*.dcm"))[:6]]
    explain_paths([Path(p) for p in dicoms], run, tmp_path / "torch", config.load(None, ["predict.workers=1"]))
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    cmd = [str(Path(sys.executable).with_name("ich")), "explain", *dicoms, "--model", str(run),
           "--out", str(tmp_path / "jax"), "--set", "predict.workers=1", "--set", "train.backend=jax"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    torch_table = pd.read_csv(tmp_path / "torch" / EXPLANATIONS_CSV)
    jax_table = pd.read_csv(tmp_path / "jax" / EXPLANATIONS_CSV)
    assert list(jax_table["overlay"]) == list(torch_table["overlay"]) and len(jax_table) >= 6
    np.testing.assert_allclose(jax_table["probability"], torch_table["probability"], atol=1e-5)
    for name in torch_table["overlay"]:
        a = cv2.imread(str(tmp_path / "torch" / name)).astype(int)
        b = cv2.imread(str(tmp_path / "jax" / name)).astype(int)
        assert np.abs(a - b).max() <= 2, name
