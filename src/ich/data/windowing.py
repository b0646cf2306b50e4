"""HU slice -> windowed, square, resized uint8 RGB image. Pure functions on arrays.

In: a float32 HU array (any shape rows x columns) and windows as (center, width) in HU.
Out: `window` gives float32 in [0, 1]; `hu_to_rgb` gives uint8 (size, size, 3), one window
per channel, the same function for preprocess and predict.

Order in `hu_to_rgb`: pad to square with air, window at full resolution, then downscale.
A window is a steep, clipped nonlinearity (brain: 80 HU wide). Resizing HU first would
average bone (~1000 HU) with brain or air into partial-volume values that do not exist in
the scan, and the window would then saturate them, thickening the skull into the brain by
a pixel; windowing first makes each output pixel the area mean of what that window shows at
full resolution, i.e. the downscaled picture a reader would see. It costs one cheap pass per
channel at full size (cv2 saturating arithmetic; bench/preprocess.py times it) and keeps the result
within one grey level of the exact float computation.
"""

from __future__ import annotations

import cv2
import numpy as np

AIR_HU = -1000.0


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window clipped to [0, 1]: (hu - (center - width/2)) / width, as float32."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    low = np.float32(center - width / 2.0)
    out = (np.asarray(hu, dtype=np.float32) - low) / np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out)


def pad_to_square(img: np.ndarray, fill: float = AIR_HU) -> np.ndarray:
    """Pad the shorter side with `fill`, centred (odd remainder at the bottom/right).

    Works for (H, W) and (H, W, C) arrays; a square input is returned unchanged.
    """
    h, w = img.shape[:2]
    if h == w:
        return img
    side = max(h, w)
    out = np.full((side, side) + img.shape[2:], fill, dtype=img.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = img
    return out


def resize(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize to `size` (an int for square, or (height, width)).

    Downscaling uses area averaging (no aliasing, no overshoot); upscaling uses bilinear
    interpolation (area interpolation would act like nearest neighbour there).
    """
    height, width = (size, size) if isinstance(size, int) else size
    if img.shape[:2] == (height, width):
        return img
    shrinking = height <= img.shape[0] and width <= img.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    # cv2 takes (width, height).
    return cv2.resize(img, (width, height), interpolation=interpolation)


def window_uint8(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """`window` scaled to 0..255 and rounded to the nearest integer, as uint8, in one pass."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    hu = np.ascontiguousarray(hu, dtype=np.float32)
    scale = 255.0 / width
    offset = -(center - width / 2.0) * scale
    # addWeighted with an 8-bit result rounds to nearest and saturates to 0..255: the
    # window's clip and the rounding happen in the same SIMD pass.
    return cv2.addWeighted(hu, scale, hu, 0.0, offset, dtype=cv2.CV_8U)


def hu_to_rgb(hu: np.ndarray, windows: list[tuple[float, float]], size: int) -> np.ndarray:
    """HU slice -> uint8 (size, size, len(windows)) image, one (center, width) window per channel.

    Non-square slices are padded with air to a square first, so anatomy keeps its aspect
    ratio; see the module docstring for why windowing comes before resizing.
    """
    if len(windows) == 0:
        raise ValueError("hu_to_rgb needs at least one (center, width) window")
    square = pad_to_square(np.asarray(hu, dtype=np.float32), fill=AIR_HU)
    channels = [window_uint8(square, center, width) for center, width in windows]
    stacked = cv2.merge(channels) if len(channels) > 1 else channels[0][..., None]
    out = resize(stacked, size)
    return out if out.ndim == 3 else out[..., None]
