"""ich.data.png.read_png: RGB order, resizing, and clear errors for PNGs that are not windowed CT."""

import cv2
import numpy as np
import pytest

from ich.data.png import read_png


def test_rgb_order_and_sizes(tmp_path):
    rgb = np.zeros((8, 6, 3), np.uint8)
    rgb[..., 0] = 200  # red = blood window
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    native = read_png(path)
    assert native.shape == (8, 6, 3) and (native[..., 0] == 200).all() and native[..., 1:].max() == 0
    assert read_png(path, 4).shape == (4, 4, 3)


@pytest.mark.parametrize("image, message", [
    (np.zeros((4, 4), np.uint8), "1-channel PNG"),
    (np.zeros((4, 4, 3), np.uint16), "uint16 PNG"),
])
def test_not_windowed_ct_is_named(tmp_path, image, message):
    path = tmp_path / "b.png"
    cv2.imwrite(str(path), image)
    with pytest.raises(ValueError, match=f"b.png: {message}"):
        read_png(path, 4)


def test_missing_file_says_what_to_rerun(tmp_path):
    with pytest.raises(ValueError, match="missing.png: missing or not a readable image.*ich preprocess"):
        read_png(tmp_path / "missing.png", 4)
