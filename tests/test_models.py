"""Backbone registry, cascade models, custom layers, freezing, save/load (torch backend)."""

import numpy as np
import pytest

import keras

import ich.models  # noqa: F401  (registers custom objects)
from ich.constants import SUBTYPES
from ich.models.backbones import BACKBONES, build_backbone
from ich.models.cascade import (backbone_layers, build_stage1, build_stage2,
                                set_backbone_trainable)
from ich.models.layers import TokenEmbedding

SIZE = 32
DUAL = ["EfficientNetV2B0", "ConvNeXtTiny"]


@pytest.fixture(scope="module")
def stage1():
    keras.utils.set_random_seed(0)
    flip = keras.Sequential([keras.layers.RandomFlip("horizontal", seed=1)], name="augment")
    return build_stage1("EfficientNetV2B0", SIZE, None, dropout=0.3, augmentation=flip)


@pytest.fixture(scope="module")
def stage2():
    keras.utils.set_random_seed(0)
    return build_stage2(DUAL, SIZE, None, dropout=0.3, fusion_dim=32, attention_heads=4)


def images(n=4, seed=0):
    return np.random.default_rng(seed).random((n, SIZE, SIZE, 3), dtype=np.float32)


def test_registry_has_both_families():
    for name in ("EfficientNetV2B0", "EfficientNetV2B3", "EfficientNetV2S", "EfficientNetV2L",
                 "ConvNeXtTiny", "ConvNeXtLarge"):
        assert name in BACKBONES


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError, match="ConvNeXtTiny"):
        build_backbone("ResNet50", (SIZE, SIZE, 3), None)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.weights.h5"):
        build_backbone("EfficientNetV2B0", (SIZE, SIZE, 3), str(tmp_path / "nope.weights.h5"))
    with pytest.raises(FileNotFoundError, match="ConvNeXtTiny.weights.h5"):
        build_backbone("ConvNeXtTiny", (SIZE, SIZE, 3), str(tmp_path))


def test_backbones_rescale_unit_input_to_255(stage1, stage2):
    # The wrapper's first layer after its input multiplies by 255; the inner model expects 0..255.
    for model in (stage1, stage2):
        for backbone in backbone_layers(model):
            rescale = backbone.layers[1]
            assert isinstance(rescale, keras.layers.Rescaling) and rescale.scale == 255.0
            assert backbone.output.shape[1:3] == (SIZE // 32, SIZE // 32)
            x = images(2)
            inner = backbone.layers[-1]  # the keras.applications model, fed 0..255 pixels
            np.testing.assert_allclose(keras.ops.convert_to_numpy(backbone(x)),
                                       keras.ops.convert_to_numpy(inner(255.0 * x)), rtol=1e-4, atol=1e-5)


def test_backbone_weights_from_file(tmp_path):
    source = BACKBONES["EfficientNetV2B0"](include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    for w in source.weights:
        w.assign(np.full(w.shape, 0.5, dtype="float32"))
    source.save_weights(tmp_path / "EfficientNetV2B0.weights.h5")
    # A folder of <name>.weights.h5 files: how stage 2 gets one file per architecture.
    model = build_backbone("EfficientNetV2B0", (SIZE, SIZE, 3), str(tmp_path))
    inner = model.layers[-1]
    assert all(np.allclose(keras.ops.convert_to_numpy(w), 0.5) for w in inner.weights)


def test_stage1_output(stage1):
    out = stage1.predict(images(), verbose=0)
    assert stage1.output.shape == (None, 1) and stage1.get_layer("any").dtype_policy.compute_dtype == "float32"
    assert out.shape == (4, 1) and out.dtype == np.float32
    assert np.all((out > 0) & (out < 1))


def test_stage2_output(stage2):
    out = stage2.predict(images(), verbose=0)
    assert out.shape == (4, len(SUBTYPES)) and out.dtype == np.float32
    assert np.all((out > 0) & (out < 1))
    assert [layer.name for layer in backbone_layers(stage2)] == [f"backbone_{n}" for n in DUAL]


def test_stage2_rejects_wrong_backbones():
    with pytest.raises(ValueError, match="EfficientNetV2"):
        build_stage2(["ConvNeXtTiny", "EfficientNetV2B0"], SIZE, None)
    with pytest.raises(ValueError, match="exactly two"):
        build_stage2(["EfficientNetV2B0"], SIZE, None)
    with pytest.raises(ValueError, match="divisible"):
        build_stage2(DUAL, SIZE, None, fusion_dim=30, attention_heads=4)


def test_stage2_fuses_grids_of_different_sizes():
    # At 80 px EfficientNet ('same' padding) gives a 3x3 grid, ConvNeXt (valid strides) 2x2.
    model = build_stage2(DUAL, 80, None, fusion_dim=16, attention_heads=2)
    assert model.get_layer("fuse_resize_1").output.shape[1:3] == (3, 3)
    assert model.predict(np.zeros((1, 80, 80, 3), "float32"), verbose=0).shape == (1, 5)


def test_heads_stay_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_stage1("EfficientNetV2B0", SIZE, None)
        assert model.get_layer("backbone_EfficientNetV2B0").dtype_policy.compute_dtype == "float16"
        assert model.output.dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_augmentation_sits_after_input_and_is_off_at_inference(stage1):
    assert stage1.layers[1].name == "augment"
    x = images(8)
    first = keras.ops.convert_to_numpy(stage1(x, training=False))
    np.testing.assert_allclose(stage1.predict(x, verbose=0), first, atol=1e-6)


def count(weights):
    return len(weights)


def test_freezing_pretrained_keeps_batchnorm_frozen(stage1):
    head = ["any"]  # Dense kernel + bias
    set_backbone_trainable(stage1, False)
    assert count(stage1.trainable_weights) == 2 * len(head)
    set_backbone_trainable(stage1, True, pretrained=True)
    backbone = stage1.get_layer("backbone_EfficientNetV2B0")
    bns = [l for l in backbone.layers[-1].layers if isinstance(l, keras.layers.BatchNormalization)]
    assert bns and all(not bn.trainable for bn in bns)
    # Every BN contributes gamma and beta to the frozen set; moving stats are never trainable.
    everything = len(backbone.weights) + 2
    assert count(stage1.trainable_weights) == everything - 4 * len(bns)
    set_backbone_trainable(stage1, True, pretrained=False)
    assert all(bn.trainable for bn in bns)
    assert count(stage1.trainable_weights) == everything - 2 * len(bns)


def test_freezing_stage2_leaves_fusion_trainable(stage2):
    set_backbone_trainable(stage2, False)
    names = {w.path.split("/")[0] for w in stage2.trainable_weights}
    assert not any(n.startswith("backbone_") for n in names)
    assert {"fuse_proj_0", "fuse_embedding", "attention", "subtypes"} <= names
    set_backbone_trainable(stage2, True, pretrained=False)


def test_save_load_same_predictions(stage2, tmp_path):
    x = images(3, seed=1)
    before = stage2.predict(x, verbose=0)
    path = tmp_path / "stage2.keras"
    stage2.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), before, rtol=1e-5, atol=1e-6)


def test_token_embedding_adds_table_and_round_trips():
    layer = TokenEmbedding()
    x = np.ones((2, 3, 4), "float32")
    out = keras.ops.convert_to_numpy(layer(x))
    table = keras.ops.convert_to_numpy(layer.embedding)
    np.testing.assert_allclose(out, np.broadcast_to(1 + table, out.shape), rtol=1e-6)
    clone = TokenEmbedding.from_config(layer.get_config())
    assert clone.name == layer.name


def test_nine_channel_backbone_loads_rgb_weights_with_the_stem_spread(tmp_path):
    """Three neighbouring slices x three windows = 9 channels: RGB (ImageNet-shaped) weights
    still load, the stem kernel spread over the channels, so an input that repeats an RGB
    image gives the 9-channel backbone the RGB backbone's output."""
    from ich.models.backbones import BACKBONES, build_backbone, spread_stem

    for name in ("EfficientNetV2B0", "ConvNeXtTiny"):
        rgb = BACKBONES[name](include_top=False, weights=None, input_shape=(32, 32, 3))
        path = tmp_path / f"{name}.weights.h5"
        rgb.save_weights(path)
        three = build_backbone(name, (32, 32, 3), weights=str(path))
        nine = build_backbone(name, (32, 32, 9), weights=str(path))
        x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
        np.testing.assert_allclose(nine.predict(np.tile(x, (1, 1, 1, 3)), verbose=0),
                                   three.predict(x, verbose=0), rtol=1e-3, atol=1e-4)
    kernel = np.arange(2 * 2 * 3 * 1, dtype=np.float32).reshape(2, 2, 3, 1)
    spread = spread_stem(kernel, 4)
    assert spread.shape == (2, 2, 4, 1)
    np.testing.assert_allclose(spread[:, :, 3], kernel[:, :, 0] * 0.75)


def test_stage_models_take_the_channels_of_the_input_description():
    from ich import config
    from ich.data.inputs import InputSpec
    from ich.training.stages import STAGES, image_stage_names

    cfg = config.load(None, ["model.image_size=32", "model.fusion_dim=16", "model.attention_heads=2",
                             "input.offsets=[-1, 0, 1]", "input.slice_channels=brain"])
    spec = InputSpec.from_config(cfg)
    assert spec.n_channels == 3 and spec.shape == (32, 32, 3)
    cfg["input"]["slice_channels"] = "all"
    spec = InputSpec.from_config(cfg)
    assert spec.n_channels == 9
    for stage in (STAGES[name] for name in image_stage_names()):   # the sequence stage takes features
        model = stage.build(cfg, spec, None)
        assert tuple(model.input_shape) == (None, 32, 32, 9)
        out = model.predict(np.zeros((1, 32, 32, 9), np.float32), verbose=0)
        assert out.shape == (1, len(stage.labels))


def test_small_convnexts_are_narrower_tinies_without_imagenet_weights(tmp_path):
    """ConvNeXtPico / ConvNeXtNano: Tiny's blocks with fewer and narrower stages (timm's
    depths and widths), stride 32, random init or a weights file, never ImageNet."""
    tiny = build_backbone("ConvNeXtTiny", (SIZE, SIZE, 3), None)
    for name, width, blocks in (("ConvNeXtPico", 512, 12), ("ConvNeXtNano", 640, 14)):
        model = build_backbone(name, (SIZE, SIZE, 3), None)
        assert model.output.shape[1:] == (SIZE // 32, SIZE // 32, width)
        assert sum(1 for layer in model.layers[-1].layers
                   if layer.name.endswith("_depthwise_conv")) == blocks
        assert model.count_params() < 0.6 * tiny.count_params()  # 8.5M, 15.0M vs 27.8M
        source = BACKBONES[name](include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
        for w in source.weights:
            w.assign(np.full(w.shape, 0.25, dtype="float32"))
        source.save_weights(tmp_path / f"{name}.weights.h5")
        loaded = build_backbone(name, (SIZE, SIZE, 3), str(tmp_path)).layers[-1]
        assert all(np.allclose(keras.ops.convert_to_numpy(w), 0.25) for w in loaded.weights)
        with pytest.raises(ValueError, match=f"{name} has no ImageNet weights"):
            build_backbone(name, (SIZE, SIZE, 3), "imagenet")
    stage2 = build_stage2(["EfficientNetV2B0", "ConvNeXtNano"], SIZE, None, fusion_dim=32, attention_heads=4)
    assert stage2.predict(images(2), verbose=0).shape == (2, len(SUBTYPES))
