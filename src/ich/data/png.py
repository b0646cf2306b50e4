"""Read the pipeline's PNGs: 8-bit RGB, one CT window per channel.

Kept apart from ich.data.loading (which imports Keras) so that worker processes of augment and predict
decode PNGs without importing a deep-learning backend.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ich.data.windowing import resize


def read_png(path: str | Path, image_size: int | None = None) -> np.ndarray:
    """Decode one 8-bit RGB PNG (windowed CT, as `ich preprocess` writes them) to uint8 RGB.

    Resized to (image_size, image_size) with ich.data.windowing.resize when its size differs; kept
    as it is when image_size is None. Raises ValueError naming the file when it is missing,
    cannot be decoded, or is not 8-bit RGB (a grey or 16-bit PNG is not a windowed CT).
    """
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"{path}: missing or not a readable image; re-run `ich preprocess` "
                         "(or `ich augment` for augmented/ files) with --force")
    if image.dtype != np.uint8:
        raise ValueError(f"{path}: {image.dtype} PNG; expected 8-bit RGB of windowed CT (see work/png/)")
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        channels = 1 if image.ndim == 2 else image.shape[2]
        raise ValueError(f"{path}: {channels}-channel PNG; expected RGB with one CT window per "
                         "channel (as `ich preprocess` writes them)")
    image = cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2RGB)  # OpenCV reads BGR(A)
    if image_size is not None and image.shape[:2] != (image_size, image_size):
        image = resize(image, image_size)
    return image
