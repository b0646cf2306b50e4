"""Online augmentation: Keras layers inside the model, active in training only."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from ich import config
from ich.models.online_augment import online_augmentation
from ich.models import intensity, warp
from ich.models.intensity import RandomIntensity
from ich.models.warp import RandomWarp, bilinear_sample, flip_coordinates


def params(**changes) -> dict:
    return {**config.load()["online_augment"], **changes}


def batch(n=4, size=32) -> np.ndarray:
    x = np.random.default_rng(0).random((n, size, size, 3)).astype("float32")
    x[:, : size // 4] = 1.0           # bright rows at the top: any flip/shift changes them
    return x


def numpy(x) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


def test_disabled_or_all_off_gives_none():
    assert online_augmentation(params(enabled=False), 0) is None
    off = params(flip="none", rotation=0.0, zoom=0.0, translate=0.0, brightness=0.0,
                 contrast=0.0, blur_p=0.0, elastic_p=0.0)
    assert online_augmentation(off, 0) is None


def test_identity_at_inference():
    x = batch()
    augment = online_augmentation(params(), 0)
    np.testing.assert_array_equal(numpy(augment(x, training=False)), x)


def test_training_changes_the_batch_within_unit_range():
    x = batch()
    augment = online_augmentation(params(elastic_p=0.5), 0)
    y = numpy(augment(x, training=True))
    assert y.shape == x.shape and y.dtype == np.float32
    assert 0.0 <= y.min() and y.max() <= 1.0
    assert not np.allclose(y, x)


def test_brightness_cannot_leave_unit_range():
    x = np.ones((2, 8, 8, 3), "float32")
    strong = params(flip="none", rotation=0.0, zoom=0.0, translate=0.0, contrast=0.0, blur_p=0.0,
                    elastic_p=0.0, brightness=0.9)
    y = numpy(online_augmentation(strong, 1)(x, training=True))
    assert 0.0 <= y.min() and y.max() <= 1.0


def test_warp_with_zero_ranges_is_exact_identity():
    x = batch()
    np.testing.assert_array_equal(numpy(RandomWarp(seed=0)(x, training=True)), x)


def test_bilinear_sample_hand_computed():
    image = np.array([[0.0, 2.0], [4.0, 6.0]], "float32").reshape(1, 2, 2, 1)
    yy, xx = np.meshgrid(np.arange(2.0), np.arange(2.0), indexing="ij")
    # Half a pixel to the right: the mean of two neighbours; past the edge the far one is 0.
    out = numpy(bilinear_sample(image, yy[None], xx[None] + 0.5))[0, ..., 0]
    np.testing.assert_allclose(out, [[1.0, 1.0], [5.0, 3.0]])
    # 90 degrees about the centre: (y, x) reads (x, 1 - y).
    out = numpy(bilinear_sample(image, xx[None], 1.0 - yy[None]))[0, ..., 0]
    np.testing.assert_allclose(out, [[2.0, 6.0], [0.0, 4.0]])


def test_torch_grid_sample_equals_the_keras_ops_gather():
    # The torch fast path against the keras.ops code every other backend runs: coordinates
    # inside, between pixels, on the edges and outside (which read 0), a non-square image.
    rng = np.random.default_rng(5)
    images = rng.random((3, 11, 14, 3), dtype=np.float32)
    src_y = rng.uniform(-2.0, 12.5, (3, 11, 14)).astype("float32")
    src_x = rng.uniform(-2.0, 15.5, (3, 11, 14)).astype("float32")
    src_y[0, 0, :4], src_x[0, 0, :4] = [0.0, 10.0, 0.0, 10.0], [0.0, 0.0, 13.0, 13.0]  # corners
    out = warp.bilinear_sample_torch(images, src_y, src_x)
    assert out.is_contiguous()  # channels-last memory: a view of NCHW would slow the backbone
    fast = numpy(out)
    plain = numpy(warp.bilinear_sample_ops(images, src_y, src_x))
    assert fast.shape == plain.shape == images.shape
    np.testing.assert_allclose(fast, plain, atol=2e-6)
    assert (plain == 0).any() and np.allclose(fast[0, 0, 0], images[0, 0, 0])


def test_torch_field_of_the_drawn_images_equals_the_keras_ops_field():
    rng = np.random.default_rng(6)
    coarse = rng.uniform(-1, 1, (5, warp.ELASTIC_GRID, warp.ELASTIC_GRID, 2)).astype("float32")
    drawn = keras.ops.convert_to_tensor(np.array([True, False, True, False, False]))
    fast = numpy(warp.drawn_field_torch(keras.ops.convert_to_tensor(coarse), drawn, 2.5, 24, 20))
    plain = numpy(warp.drawn_field(coarse, drawn, 2.5, 24, 20))
    assert fast.shape == plain.shape == (5, 24, 20, 2)
    np.testing.assert_allclose(fast, plain, atol=1e-6)
    assert not fast[1].any() and fast[0].any()
    none = keras.ops.convert_to_tensor(np.zeros(5, bool))
    assert not numpy(warp.drawn_field_torch(keras.ops.convert_to_tensor(coarse), none, 2.5, 24, 20)).any()


@pytest.mark.parametrize("flip", ["none", "horizontal", "vertical", "horizontal_and_vertical"])
def test_torch_warp_grid_equals_the_keras_ops_coordinates(flip):
    # warp_torch (one affine grid, the elastic field added for the drawn images) against
    # warp_ops (every coordinate pass in keras.ops) for the same draws: a non-square image,
    # large angles, zooms and shifts, elastic for some images, each flip mode.
    rng = np.random.default_rng(8)
    n, height, width = 6, 13, 17
    images = rng.random((n, height, width, 3), dtype=np.float32)

    def tensor(a):
        return keras.ops.convert_to_tensor(np.asarray(a))

    draws = warp.Draws(
        angle=tensor(rng.uniform(-1.0, 1.0, n).astype("float32")),
        scale=tensor(rng.uniform(0.7, 1.3, n).astype("float32")),
        shift_y=tensor(rng.uniform(-3, 3, n).astype("float32")),
        shift_x=tensor(rng.uniform(-3, 3, n).astype("float32")),
        coarse=tensor(rng.uniform(-1, 1, (n, warp.ELASTIC_GRID, warp.ELASTIC_GRID, 2)).astype("float32")),
        drawn=tensor(np.array([True, False, True, False, False, True])),
        flips=None if flip == "none" else tensor(np.array([True, True, False, True, False, False])))
    fast = numpy(warp.warp_torch(images, draws, flip, 0.1))
    plain = numpy(warp.warp_ops(images, draws, flip, 0.1))
    assert fast.shape == plain.shape == images.shape
    np.testing.assert_allclose(fast, plain, atol=2e-5)
    # The draws moved the images, and the elastic field moved the drawn ones further.
    assert np.abs(plain - images).mean() > 0.05
    still = draws._replace(coarse=None, drawn=None)
    assert np.abs(numpy(warp.warp_torch(images, still, flip, 0.1))[0] - fast[0]).max() > 1e-3


def keras_intensity(images, delta, factor, drawn, sigma):
    """Keras' own three layers, as the online augmentation ran them before RandomIntensity,
    applied with the given draws."""
    unit = {"value_range": (0.0, 1.0)}
    x = keras.layers.RandomBrightness(0.1, **unit).transform_images(
        keras.ops.convert_to_tensor(images), {"rgb_delta": delta})
    x = keras.layers.RandomContrast(0.1, **unit).transform_images(x, {"contrast_factor": factor})
    return keras.layers.RandomGaussianBlur(0.1, **unit).transform_images(
        x, {"should_apply_blur": keras.ops.convert_to_tensor(drawn), "blur_factor": sigma})


def intensity_draws(n=5):
    rng = np.random.default_rng(8)
    delta = rng.uniform(-0.3, 0.3, (n, 1, 1, 1)).astype("float32")   # strong: clipping happens
    factor = np.array([1.4, 0.6, 1.3, 1.2, 1.5][:n], "float32").reshape(n, 1, 1, 1)
    drawn = np.array([True, False, True, False, False][:n])
    sigma = np.array([0.7, 0.4], "float32")
    return delta, factor, drawn, sigma


def intensity_images():
    images = np.random.default_rng(9).random((5, 12, 10, 9)).astype("float32")
    images[:, :2], images[:, -2:] = 1.0, 0.0   # stretched past 1 and below 0: both clips act
    return images


def test_intensity_equals_keras_brightness_contrast_and_blur_given_the_same_draws():
    images = intensity_images()
    draws = intensity_draws()
    expected = numpy(keras_intensity(images, *draws))
    assert (expected == 0).any() and (expected == 1).any()     # both clips were exercised
    for implementation in (intensity.adjust_ops, intensity.adjust):   # adjust: torch's own ops
        out = numpy(implementation(images, *draws))
        assert out.shape == images.shape and out.dtype == np.float32
        np.testing.assert_allclose(out, expected, atol=2e-6)
    # Not blurred where not drawn: images 1, 3, 4 equal brightness and contrast alone.
    plain = numpy(intensity.adjust(images, *draws[:2]))
    np.testing.assert_allclose(plain[[1, 3, 4]], expected[[1, 3, 4]], atol=2e-6)
    assert not np.allclose(plain[0], expected[0], atol=1e-3)


def test_intensity_layer_stays_in_unit_range_and_varies_per_image():
    layer = RandomIntensity(brightness=0.5, contrast=0.5, blur_p=0.5, seed=2)
    x = np.full((16, 8, 8, 3), 0.5, "float32")
    y = numpy(layer(x, training=True))
    assert 0.0 <= y.min() and y.max() <= 1.0
    assert len(np.unique(y.mean(axis=(1, 2, 3)).round(5))) > 8
    np.testing.assert_array_equal(numpy(layer(x, training=False)), x)


@pytest.mark.parametrize("mode", ["horizontal", "vertical", "horizontal_and_vertical"])
def test_flip_folded_into_the_coordinates_equals_flipping_first(mode):
    rng = np.random.default_rng(10)
    images = rng.random((4, 9, 7, 3)).astype("float32")
    src_y = rng.uniform(0.0, 8.0, (4, 9, 7)).astype("float32")
    src_x = rng.uniform(0.0, 6.0, (4, 9, 7)).astype("float32")
    flips = np.array([True, False, True, False])
    axes = {"horizontal": (2,), "vertical": (1,), "horizontal_and_vertical": (1, 2)}[mode]
    flipped = np.where(flips[:, None, None, None], np.flip(images, axes), images)
    expected = numpy(bilinear_sample(flipped, src_y, src_x))
    out = numpy(bilinear_sample(images, *flip_coordinates(src_y, src_x, keras.ops.convert_to_tensor(flips),
                                                          mode, 9, 7)))
    np.testing.assert_allclose(out, expected, atol=2e-6)


def test_warp_flip_alone_flips_about_half_of_the_images():
    x = batch(n=32)
    y = numpy(RandomWarp(flip="horizontal", seed=4)(x, training=True))
    same = [np.allclose(y[i], x[i], atol=1e-5) for i in range(32)]
    mirrored = [np.allclose(y[i], x[i, :, ::-1], atol=1e-5) for i in range(32)]
    assert all(a or b for a, b in zip(same, mirrored))
    assert 6 <= sum(mirrored) <= 26
    with pytest.raises(ValueError, match="flip must be one of"):
        RandomWarp(flip="sideways")


def test_elastic_displacement_stays_small():
    size = 64
    yy, xx = np.mgrid[0:size, 0:size].astype("float32")
    coords = np.stack([yy, xx, np.zeros_like(yy)], -1)[None].repeat(4, 0) / size
    out = numpy(RandomWarp(elastic_p=1.0, elastic_scale=0.02, seed=3)(coords, training=True))
    shift = np.hypot(out[..., 0] - coords[..., 0], out[..., 1] - coords[..., 1])[:, 4:-4, 4:-4]
    shift *= size
    # at most ~0.02 * 64 = 1.3 px (bicubic may overshoot the coarse grid a little)
    assert 0.05 < shift.mean() and shift.max() < 1.5 * 0.02 * size


def test_survives_save_and_load_inside_a_model(tmp_path):
    inputs = keras.Input((32, 32, 3))
    x = online_augmentation(params(elastic_p=0.2), 7)(inputs)
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    path = tmp_path / "tiny.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = batch(size=32)
    np.testing.assert_allclose(numpy(loaded(x, training=False)), numpy(model(x, training=False)),
                               rtol=1e-6)
    augment = loaded.get_layer("online_augment")
    assert [type(layer).__name__ for layer in augment.layers] == \
        [type(layer).__name__ for layer in model.get_layer("online_augment").layers]
    warp = next(layer for layer in augment.layers if isinstance(layer, RandomWarp))
    assert warp.elastic_p == pytest.approx(0.2) and warp.rotation == pytest.approx(0.04)
    assert warp.flip == "horizontal"
    adjust = next(layer for layer in augment.layers if isinstance(layer, RandomIntensity))
    assert adjust.brightness == pytest.approx(0.1) and adjust.blur_p == pytest.approx(0.1)
    assert not np.allclose(numpy(augment(x, training=True)), x)


JAX_SCRIPT = """
import warnings, numpy as np, keras
from ich import config
from ich.models.online_augment import online_augmentation
inputs = keras.Input((16, 16, 3))
x = online_augmentation(config.load()["online_augment"] | {"elastic_p": 0.5}, 0)(inputs)
outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(x))
model = keras.Model(inputs, outputs)
model.compile("adam", "binary_crossentropy", jit_compile=True)
with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)   # "Model doesn't support jit_compile=True"
    model.fit(np.random.rand(8, 16, 16, 3).astype("float32"), np.ones((8, 1), "float32"),
              batch_size=4, epochs=1, verbose=0)
print("jit ok")
# The keras.ops intensity path on JAX against Keras' own layers, given the same draws.
from test_augment_online import intensity_draws, keras_intensity
from ich.models.intensity import adjust
from test_augment_online import intensity_images
images = intensity_images()
np.testing.assert_allclose(np.asarray(adjust(images, *intensity_draws())),
                           np.asarray(keras_intensity(images, *intensity_draws())), atol=2e-6)
print("intensity ok")
"""


def test_traces_under_jax_jit():
    pytest.importorskip("jax")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", JAX_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=300, cwd=Path(__file__).parent)
    assert result.returncode == 0 and "intensity ok" in result.stdout, result.stderr[-3000:]
