"""ich.data.windowing: hand-computed window values, padding, resizing, RGB channel order."""

import numpy as np
import pytest

from ich.data.windowing import AIR_HU, hu_to_rgb, pad_to_square, resize, window, window_uint8

BLOOD, BRAIN, BONE = (80, 200), (40, 80), (600, 2800)


def test_window_hand_computed():
    hu = np.array([-100, 0, 20, 40, 60, 80, 500], dtype=np.float32)
    # brain (40, 80): low = 0, so value = hu / 80, clipped to [0, 1]
    np.testing.assert_allclose(window(hu, *BRAIN), [0, 0, 0.25, 0.5, 0.75, 1, 1])
    # blood (80, 200): low = -20; bone (600, 2800): low = -800
    np.testing.assert_allclose(window(np.float32([30, -20, 180]), *BLOOD), [0.25, 0, 1])
    np.testing.assert_allclose(window(np.float32([600, -1000, 2000]), *BONE), [0.5, 0, 1])
    assert window(hu, *BRAIN).dtype == np.float32


def test_window_rejects_non_positive_width():
    with pytest.raises(ValueError, match="width"):
        window(np.zeros(3), 40, 0)


def test_window_uint8_rounds_to_nearest():
    hu = np.float32([[20, 21, -5, 90]])
    # 20 -> 0.25 * 255 = 63.75 -> 64 ; 21 -> 66.94 -> 67 ; clipped ends -> 0 and 255
    np.testing.assert_array_equal(window_uint8(hu, *BRAIN), [[64, 67, 0, 255]])
    assert window_uint8(hu, *BRAIN).dtype == np.uint8


def test_pad_to_square_centres_and_keeps_dtype():
    img = np.arange(8, dtype=np.float32).reshape(2, 4)
    out = pad_to_square(img)
    assert out.shape == (4, 4) and out.dtype == np.float32
    np.testing.assert_array_equal(out[1:3], img)
    assert (out[0] == AIR_HU).all() and (out[3] == AIR_HU).all()
    tall = np.ones((3, 2, 3), dtype=np.uint8)
    padded = pad_to_square(tall, fill=0)
    # odd remainder goes right: column 0..1 are the image, column 2 is fill
    assert padded.shape == (3, 3, 3)
    assert (padded[:, :2] == 1).all() and (padded[:, 2] == 0).all()
    square = np.zeros((5, 5))
    assert pad_to_square(square) is square


def test_resize_area_mean_when_shrinking_and_smooth_when_growing():
    img = np.float32([[0, 2, 4, 4], [2, 4, 4, 4], [8, 8, 1, 1], [8, 8, 1, 3]])
    np.testing.assert_allclose(resize(img, 2), [[2, 4], [8, 1.5]])
    grown = resize(np.float32([[0, 10], [10, 20]]), (4, 4))
    assert grown.shape == (4, 4)
    # bilinear: values strictly between the corners appear (nearest neighbour would not)
    assert len(np.unique(grown)) > 4
    assert resize(img, (4, 4)) is img


def test_hu_to_rgb_channel_order():
    hu = np.full((8, 8), 100.0, np.float32)
    rgb = hu_to_rgb(hu, [BLOOD, BRAIN, BONE], 4)
    assert rgb.shape == (4, 4, 3) and rgb.dtype == np.uint8
    # blood (100+20)/200 = 0.6 -> 153 ; brain 100 >= 80 -> 255 ; bone 900/2800 * 255 = 81.96 -> 82
    np.testing.assert_array_equal(rgb[0, 0], [153, 255, 82])
    np.testing.assert_array_equal(hu_to_rgb(hu, [BONE, BLOOD, BRAIN], 4)[0, 0], [82, 153, 255])


def test_hu_to_rgb_pads_with_air_and_keeps_aspect_ratio():
    hu = np.full((32, 64), 60.0, np.float32)   # wide: 32 rows of tissue, 64 columns
    rgb = hu_to_rgb(hu, [BLOOD, BRAIN, BONE], 32)
    brain = rgb[..., 1]
    # padded to 64x64 (16 air rows above and below), then halved: tissue in rows 8..23
    assert (brain[8:24] == 191).all()        # 60/80 * 255 = 191.25
    assert (rgb[:8] == 0).all() and (rgb[24:] == 0).all()


def test_hu_to_rgb_matches_exact_float_computation():
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1200, 2000, (64, 48)).astype(np.float32)
    windows = [BLOOD, BRAIN, BONE]
    got = hu_to_rgb(hu, windows, 16).astype(int)
    square = np.full((64, 64), AIR_HU, np.float32)
    square[:, 8:56] = hu
    for channel, (center, width) in enumerate(windows):
        w = np.clip((square - (center - width / 2)) / width, 0, 1)
        expected = np.round(w.reshape(16, 4, 16, 4).mean(axis=(1, 3)) * 255)
        assert np.abs(got[..., channel] - expected).max() <= 1
