"""A tiny saved cascade with known weights, for the evaluation and prediction tests.

Both stages honour the model interface (float32 (S, S, 3) in [0, 1] in; sigmoid out) but are a
global average pool and one Dense layer, so their outputs can be computed by hand:
p(any) = sigmoid(8 * mean(red) - 4) and p(subtype k | any) = sigmoid(6 * mean(red) - 3 + 0.5 k - 1).
A brighter red (blood window) channel means "more hemorrhage", which is what the synthetic test
images in these tests encode.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np

from ich.constants import CASCADE_JSON, LABELS, SEQUENCE_MODEL, STAGE1_MODEL, STAGE2_MODEL, SUBTYPES

ANY_WEIGHT, ANY_BIAS = 8.0, -4.0
SUB_WEIGHT = 6.0
SUB_BIAS = np.array([-3.0 + 0.5 * k - 1.0 for k in range(len(SUBTYPES))])


def _head(image_size: int, units: int, name: str) -> tuple[keras.Model, keras.layers.Dense]:
    inputs = keras.Input(shape=(image_size, image_size, 3), name=f"{name}_image")
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(inputs)  # the features a sequence stage takes
    dense = keras.layers.Dense(units, activation="sigmoid", name=f"{name}_out")
    model = keras.Model(inputs, dense(pooled), name=name)
    return model, dense


def build_tiny(image_size: int = 16) -> tuple[keras.Model, keras.Model]:
    """Stage 1 (N, 1) and stage 2 (N, 5) models with the hand-set weights above."""
    stage1, dense1 = _head(image_size, 1, "stage1")
    kernel1 = np.zeros((3, 1), dtype=np.float32)
    kernel1[0, 0] = ANY_WEIGHT
    dense1.set_weights([kernel1, np.array([ANY_BIAS], dtype=np.float32)])
    stage2, dense2 = _head(image_size, len(SUBTYPES), "stage2")
    kernel2 = np.zeros((3, len(SUBTYPES)), dtype=np.float32)
    kernel2[0, :] = SUB_WEIGHT
    dense2.set_weights([kernel2, SUB_BIAS.astype(np.float32)])
    return stage1, stage2


def expected_probs(images_uint8: np.ndarray) -> np.ndarray:
    """The cascade's (N, 6) output computed by hand in NumPy."""
    red = images_uint8[..., 0].astype(np.float64).mean(axis=(1, 2)) / 255.0
    p_any = 1 / (1 + np.exp(-(ANY_WEIGHT * red + ANY_BIAS)))
    p_cond = 1 / (1 + np.exp(-(SUB_WEIGHT * red[:, None] + SUB_BIAS[None, :])))
    return np.concatenate([p_any[:, None], p_any[:, None] * p_cond], axis=1)


def write_cascade(run_dir: Path, model1, model2, image_size: int, **meta) -> Path:
    """Save both stages and a cascade.json in the shared format into run_dir; return run_dir.
    `meta` overrides or adds cascade.json keys."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model1.save(run_dir / STAGE1_MODEL)
    model2.save(run_dir / STAGE2_MODEL)
    cascade = {
        "labels": list(LABELS),
        "input": {"image_size": image_size,
                  "windows": {"blood": [80, 200], "brain": [40, 80], "bone": [600, 2800]},
                  "channels": ["blood", "brain", "bone"], "offsets": [0], "slice_channels": "all"},
        "stages": [{"name": "stage1", "file": STAGE1_MODEL, "labels": ["any"], "given": None,
                    "backbones": ["tiny"]},
                   {"name": "stage2", "file": STAGE2_MODEL, "labels": list(SUBTYPES), "given": "any",
                    "backbones": ["tiny", "tiny"]}],
        "thresholds": {label: 0.5 for label in LABELS},
        "threshold_method": "youden",
        "backend": keras.backend.backend(),
        "versions": {"keras": keras.__version__},
        "mixed_precision": False,
    }
    cascade.update(meta)
    (run_dir / CASCADE_JSON).write_text(json.dumps(cascade, indent=2))
    return run_dir


def save_tiny_cascade(run_dir: Path, image_size: int = 16, sequence: bool = False, **meta) -> Path:
    """Build the hand-weighted tiny cascade and save it into run_dir; return run_dir.

    sequence: add an untrained sequence stage with attention pooling and zero attention
    scores: it keeps each slice's probabilities, and a series' probability is
    sigmoid(mean over its slices of logit(p)) (`expected_series`)."""
    stage1, stage2 = build_tiny(image_size)
    run_dir = write_cascade(run_dir, stage1, stage2, image_size, **meta)
    if sequence:
        from ich.models.sequence import build_sequence

        model = build_sequence(6, width=4, dilations=(1,), pooling="attention")
        scores = model.get_layer("attention_scores")
        scores.set_weights([np.zeros_like(w) for w in scores.get_weights()])
        model.save(Path(run_dir) / SEQUENCE_MODEL)
        cascade = json.loads((Path(run_dir) / CASCADE_JSON).read_text())
        cascade["stages"].append({"name": "sequence", "file": SEQUENCE_MODEL, "labels": list(LABELS),
                                  "given": None, "kind": "sequence", "pooling": "attention"})
        (Path(run_dir) / CASCADE_JSON).write_text(json.dumps(cascade, indent=2))
    return run_dir


def expected_series(probs: np.ndarray) -> np.ndarray:
    """The tiny sequence stage's (6,) output for a series whose slices have `probs` (T, 6)."""
    p = np.clip(np.asarray(probs, np.float64), 1e-4, 1 - 1e-4)
    return 1 / (1 + np.exp(-np.log(p / (1 - p)).mean(axis=0)))


def red_images(reds, size: int = 16, seed: int = 0) -> np.ndarray:
    """uint8 images (N, size, size, 3) whose red channel has mean value `reds[i]` (0-255)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(len(reds), size, size, 3)).astype(np.uint8)
    for i, red in enumerate(reds):
        images[i, ..., 0] = int(red)
    return images
