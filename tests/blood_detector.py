"""A hand-weighted blood detector and the lesion slices of an `ich synth --masks` set, for
checking that Grad-CAM points at the lesion (tests/test_explain.py, bench/explain_hit_rate.py).

The detector is a stage-1-shaped model (image -> convolutions -> global average pool -> dense
-> sigmoid p(any)) whose weights are set by hand from the windows (blood window in red: blood
of 40-90 HU maps to 0.3-0.55, brain to about 0.3, bone saturates at 1):
  1x1 convolution: u0 = relu(red - 0.38) (blood and brighter), u1 = relu(red - 0.9) (bone),
                   u2 = relu(red - 0.58) (brighter than blood: calcifications, partial bone);
  5x5 convolution: relu(u0 - 3 u2 - 10 * sum of u1 over the 5x5 neighbourhood), i.e. blood
                   brightness away from bone; then the pool and a dense layer with weight 20.
It knows nothing of the masks: a peak in the lesion means the explanation found what the model
responds to, and the model responds to blood.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

WINDOWS = [(80.0, 200.0), (40.0, 80.0), (600.0, 2800.0)]  # blood, brain, bone (the defaults)


def build_blood_detector(size: int):
    """The detector above as a keras.Model (N, size, size, 3) float in [0, 1] -> (N, 1)."""
    import keras

    inputs = keras.Input((size, size, 3), name="image")
    c1 = keras.layers.Conv2D(3, 1, activation="relu", name="intensity")
    c2 = keras.layers.Conv2D(1, 5, padding="same", activation="relu", name="blood")
    dense = keras.layers.Dense(1, activation="sigmoid", name="any")
    outputs = dense(keras.layers.GlobalAveragePooling2D(name="pool")(c2(c1(inputs))))
    model = keras.Model(inputs, outputs, name="stage1")
    k1 = np.zeros((1, 1, 3, 3), "float32")
    k1[0, 0, 0, :] = 1.0
    c1.set_weights([k1, np.array([-0.38, -0.9, -0.58], "float32")])
    k2 = np.zeros((5, 5, 3, 1), "float32")
    k2[2, 2, 0, 0] = 1.0
    k2[:, :, 1, 0] = -10.0
    k2[2, 2, 2, 0] = -3.0
    c2.set_weights([k2, np.zeros(1, "float32")])
    dense.set_weights([np.array([[20.0]], "float32"), np.array([-1.0], "float32")])
    return model


def lesion_slices(root: Path, size: int, label: str = "any"):
    """(images uint8 (N, size, size, 3), masks bool, heads bool, image ids) of the slices of an
    `ich synth --masks` folder positive for `label`, preprocessed as `ich predict` does; masks
    go through the same pad-to-square and resize (a model pixel is in the lesion when any
    blood falls in it), heads are the pixels above -200 HU (the random baseline's region)."""
    from ich.constants import SUBTYPES
    from ich.data.dicom import read_hu
    from ich.data.windowing import hu_to_rgb, pad_to_square

    root = Path(root)
    truth = pd.read_csv(root / "truth.csv")
    ids = truth.loc[truth[label] == 1, "image_id"].tolist()
    images, masks, heads = [], [], []
    for image_id in ids:
        hu, _ = read_hu(root / "stage_2_train" / f"{image_id}.dcm")
        images.append(hu_to_rgb(hu, WINDOWS, size))
        bits = cv2.imread(str(root / "masks" / f"{image_id}.png"), cv2.IMREAD_UNCHANGED)
        blood = bits > 0 if label == "any" else (bits & (1 << SUBTYPES.index(label))) > 0
        masks.append(_shrink(pad_to_square(blood.astype(np.float32), 0.0), size) > 0)
        heads.append(_shrink(pad_to_square((hu > -200).astype(np.float32), 0.0), size) > 0.5)
    return np.stack(images), np.stack(masks), np.stack(heads), ids


def _shrink(image: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
