"""A hand-made work dir for data and augment tests: splits.csv, images.csv and small PNGs.

Built directly (no other step runs), so these tests do not depend on sample/preprocess/split.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from ich.constants import IMAGES_CSV, LABELS, PNG_DIR, SPLITS_CSV

SIZE = 32
# image_id: (split, labels in LABELS order)
ROWS = {
    "ID_a": ("train", (1, 1, 0, 0, 0, 1)),   # epidural + subdural
    "ID_b": ("train", (1, 1, 0, 0, 0, 0)),   # epidural
    "ID_c": ("train", (1, 0, 0, 0, 0, 1)),   # subdural
    "ID_d": ("train", (1, 0, 1, 0, 0, 0)),   # intraparenchymal
    "ID_e": ("train", (0, 0, 0, 0, 0, 0)),
    "ID_f": ("train", (0, 0, 0, 0, 0, 0)),
    "ID_v1": ("val", (1, 1, 0, 0, 0, 0)),
    "ID_v2": ("val", (0, 0, 0, 0, 0, 0)),
    "ID_t1": ("test", (1, 1, 0, 0, 0, 1)),
    "ID_t2": ("test", (0, 0, 0, 0, 0, 0)),
}


def image_for(image_id: str, size: int = SIZE) -> np.ndarray:
    """A distinct, asymmetric uint8 RGB test image for `image_id`."""
    seed = sum(ord(c) for c in image_id)
    image = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    image[: size // 4, : size // 2] = 255   # a bright block in one corner: flips change it
    return image


def make_workdir(root: Path, size: int = SIZE) -> Path:
    """Write splits.csv, images.csv and png/<id>.png under root/work; return the work dir."""
    work = root / "work"
    (work / PNG_DIR).mkdir(parents=True)
    splits, images = [], []
    for image_id, (split, labels) in ROWS.items():
        rel = f"{PNG_DIR}/{image_id}.png"
        cv2.imwrite(str(work / rel), cv2.cvtColor(image_for(image_id, size), cv2.COLOR_RGB2BGR))
        splits.append({"image_id": image_id, "split": split, "patient_id": f"P{image_id}",
                       **dict(zip(LABELS, labels))})
        images.append({"image_id": image_id, "patient_id": f"P{image_id}", "path": rel})
    pd.DataFrame(splits).to_csv(work / SPLITS_CSV, index=False)
    pd.DataFrame(images).to_csv(work / IMAGES_CSV, index=False)
    return work
