"""Grad-CAM's layer rule and cell geometry (ich.evaluation.feature_maps), by hand: which layer
each backbone is explained at, its map's size for a given input, where its cells sit on the
image, and the model run with a map read out or replaced."""

import keras
import numpy as np
import pytest

from ich.evaluation import feature_maps
from ich.evaluation.explain import interpolation_matrix, place
from ich.evaluation.feature_maps import Axis
from ich.models.cascade import build_stage1, build_stage2


def _cells(model, target, size):
    """(h, w) of a target's map for one input of side `size`."""
    x = np.zeros((1, size, size, model.inputs[0].shape[-1]), "float32")
    _, maps = feature_maps.run(model, x, [target])
    return tuple(maps[0].shape[1:3])


def test_the_layer_rule_at_strides_8_16_and_32_on_both_backbone_families():
    # 64 px: stride 8 -> 64 / 8 = 8 cells a side, 16 -> 4, 32 -> 2.
    keras.utils.set_random_seed(0)
    stage2 = build_stage2(["EfficientNetV2B0", "ConvNeXtTiny"], (64, 64, 9), fusion_dim=16, attention_heads=2)
    efficientnet, convnext = feature_maps.targets(stage2, 16)
    # EfficientNetV2B0: blocks 4-5 run at stride 16, block5 has five repeats (a to e).
    assert efficientnet.name == "backbone_EfficientNetV2B0/efficientnetv2-b0/block5e_add"
    assert _cells(stage2, efficientnet, 64) == (4, 4)
    # TensorFlow-style "same" padding puts a stride-2 3x3 window's centre half an input pixel
    # down: 1 + 2 + 4 + 8 = 15 px at stride 16 (cell 0 on pixel 15, not 7.5).
    assert efficientnet.rows == efficientnet.cols == Axis(16.0, 15.0)
    # ConvNeXt: 4x4 stem and 2x2 downsamplings, "valid": centres in the middle of the blocks.
    assert convnext.name.startswith("backbone_ConvNeXtTiny/convnext_tiny/")
    assert _cells(stage2, convnext, 64) == (4, 4)
    assert convnext.rows == Axis(16.0, 7.5)
    efficientnet, convnext = feature_maps.targets(stage2, 8)
    # Block 3 (two repeats) is EfficientNetV2B0's last at stride 8: centres 1 + 2 + 4 = 7 px down.
    assert efficientnet.name == "backbone_EfficientNetV2B0/efficientnetv2-b0/block3b_add"
    assert [_cells(stage2, t, 64) for t in (efficientnet, convnext)] == [(8, 8), (8, 8)]
    assert (efficientnet.rows, convnext.rows) == (Axis(8.0, 7.0), Axis(8.0, 3.5))
    last = feature_maps.targets(stage2, 32)
    assert [t.name for t in last] == ["backbone_EfficientNetV2B0", "backbone_ConvNeXtTiny"]
    assert [_cells(stage2, t, 64) for t in last] == [(2, 2), (2, 2)]
    assert [t.rows for t in last] == [Axis(32.0, 31.0), Axis(32.0, 15.5)]
    with pytest.raises(ValueError, match="no residual block .* at stride 64.*explain.feature_stride"):
        feature_maps.targets(stage2, 64)


def test_the_default_layer_of_stage1_is_12x12_at_96_px():
    from ich import config

    stride = config.load(None, [])["explain"]["feature_stride"]
    assert stride == 8
    stage1 = build_stage1("EfficientNetV2B0", 96)
    (target,) = feature_maps.targets(stage1, stride)
    assert target.name.endswith("/block3b_add") and _cells(stage1, target, 96) == (12, 12)


def test_label_heatmaps_explain_at_the_given_stride():
    from types import SimpleNamespace

    from ich.evaluation.explain import gradcam
    from ich.steps.explain import label_heatmaps

    keras.utils.set_random_seed(2)
    stage1 = build_stage1("EfficientNetV2B0", 32)
    cascade = SimpleNamespace(meta={"stages": [{"name": "stage1", "labels": ["any"]}]},
                              models={"stage1": stage1}, image_size=32)
    x = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    at_8 = label_heatmaps(cascade, x, "any", 8)
    np.testing.assert_allclose(at_8, gradcam(stage1, x, 0, 8), atol=1e-6)
    assert not np.allclose(at_8, label_heatmaps(cascade, x, "any", 32))


def _toy():
    """image 8x8 -> 3x3 'same' stride 2 (even side: pad 0 before, 1 after) -> 1-px zero padding
    -> 2x2 'valid' stride 2, every kernel ones and no activation, so a cell's gradient on the
    input is its receptive field."""
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(1, 3, strides=2, padding="same", use_bias=False, kernel_initializer="ones")(inputs)
    x = keras.layers.ZeroPadding2D(1)(x)
    x = keras.layers.Conv2D(1, 2, strides=2, use_bias=False, kernel_initializer="ones", name="last")(x)
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def test_cell_geometry_is_the_receptive_field_centre():
    model = _toy()
    (target,) = feature_maps.targets(model, 16)   # no backbone: the pooled map, any stride
    assert target.name == "last"
    # conv 1: cell j centred on input 2j + 1; padding: index k of the padded map is k - 1 of
    # the conv's; conv 2: k = 2i + 0.5. So input = 2 (2i + 0.5 - 1) + 1 = 4i + 0.
    assert target.rows == target.cols == Axis(4.0, 0.0)
    from ich.backend import gradients

    x = np.zeros((1, 8, 8, 1), "float32")
    for i in range(3):
        _, (g,) = gradients(lambda t, i=i: keras.ops.sum(feature_maps.run(model, t[0], [target])[1][0][0, i, 1]),
                            [x])
        rows = np.flatnonzero(np.abs(g[0, :, :, 0]).sum(axis=1))
        # Receptive field of cell i: conv-1 cells 2i - 1 and 2i (the padding where < 0), i.e.
        # input rows 4i - 2 .. 4i + 2, clipped to the image: its middle is the centre 4i.
        assert (rows.min(), rows.max()) == (max(4 * i - 2, 0), min(4 * i + 2, 7))


def test_interpolation_between_cell_centres_by_hand():
    # Two cells centred on pixels 1.5 and 5.5 of 8: constant outside them, linear between.
    weights = interpolation_matrix(8, 2, Axis(4.0, 1.5))
    np.testing.assert_allclose(weights[[0, 1, 3, 5, 7]],
                               [[1, 0], [1, 0], [0.625, 0.375], [0.125, 0.875], [0, 1]])
    np.testing.assert_allclose(weights.sum(axis=1), 1)
    cams = np.array([[[0.0, 4.0], [8.0, 12.0]]])          # one image, 2x2 cells
    target = feature_maps.Target((), "input", Axis(4.0, 1.5), Axis(4.0, 1.5))
    heat = place(cams, target, (8, 8))
    assert heat[0, 0, 0] == 0.0 and heat[0, 7, 7] == 12.0
    assert heat[0, 3, 3] == pytest.approx(0.625 * (0.625 * 0 + 0.375 * 4) + 0.375 * (0.625 * 8 + 0.375 * 12))


def test_run_reads_and_replaces_an_inner_map():
    keras.utils.set_random_seed(1)
    stage1 = build_stage1("EfficientNetV2B0", 32)
    x = np.random.default_rng(0).random((2, 32, 32, 3)).astype("float32")
    (target,) = feature_maps.targets(stage1, 16)
    out, (inner,) = feature_maps.run(stage1, x, [target])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), stage1.predict(x, verbose=0), atol=1e-5)
    same, _ = feature_maps.run(stage1, x, [target], replace=[inner])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(same), keras.ops.convert_to_numpy(out), atol=1e-6)
    # The given map, not the layer's own, is what the rest of the network sees.
    other, _ = feature_maps.run(stage1, x, [target], replace=[inner * 0.0])
    zero, _ = feature_maps.run(stage1, np.zeros_like(x), [target], replace=[inner * 0.0])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(other), keras.ops.convert_to_numpy(zero), atol=1e-6)
    assert np.abs(keras.ops.convert_to_numpy(other) - keras.ops.convert_to_numpy(out)).max() > 1e-6


def test_half_pixel_centres_are_what_an_image_resize_does():
    # cv2.resize maps output pixel y to source (y + 0.5) / s - 0.5: cell i centred on
    # s i + s / 2 - 0.5, the placement bench/explain_hit_rate.py compares against.
    import cv2

    cams = np.random.default_rng(2).random((1, 3, 3))
    target = feature_maps.Target((), "input", Axis(32.0, 15.5), Axis(32.0, 15.5))
    resized = cv2.resize(cams[0].astype(np.float32), (96, 96), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(place(cams, target, (96, 96))[0], resized, atol=1e-5)
