"""Load a trained cascade and turn images into the six probabilities.

In: a run directory holding cascade.json, stage1.keras and stage2.keras (written by `ich train`),
then images (N, S, S, 3) RGB, uint8 (0-255) or float (0-1). Out: float32 (N, 6) probabilities in
LABELS order: p(any) from stage 1, and for each subtype p(any) * p(subtype | any) from stage 2,
so a subtype is never more likely than `any`. Nothing here writes files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ich.constants import CASCADE_JSON, LABELS, SUBTYPES
from ich.data.windowing import resize


@dataclass
class Cascade:
    """The two trained stages and their cascade.json metadata."""

    stage1: object  # keras.Model: (N, S, S, 3) float32 in [0, 1] -> (N, 1) p(any)
    stage2: object  # keras.Model: same input -> (N, 5) p(subtype | any), SUBTYPES order
    meta: dict = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        """Side of the square model input in pixels."""
        return int(self.meta["image_size"])

    @property
    def thresholds(self) -> dict[str, float]:
        """Decision threshold per label (0.5 each until `ich evaluate` picks them on val)."""
        from ich.evaluation.metrics import DEFAULT_THRESHOLD

        saved = self.meta.get("thresholds") or {}
        return {label: float(saved.get(label, DEFAULT_THRESHOLD)) for label in LABELS}

    def predict(self, images, batch_size: int = 32) -> np.ndarray:
        """Probabilities (N, 6) float32 in LABELS order for images (N, S, S, 3), uint8 or float."""
        out = np.empty((len(images), len(LABELS)), dtype=np.float32)
        for start, probs in self.iter_predict(images, batch_size):
            out[start:start + len(probs)] = probs
        return out

    def iter_predict(self, images, batch_size: int = 32) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (index of the batch's first image, probabilities (k, 6)) batch by batch.

        Works on a memory-mapped array without loading it whole. The last batch is padded to
        the batch size so that compiled backends (JAX, XLA) reuse one traced shape.
        """
        _check_images(images)
        n = len(images)
        if n == 0:
            return
        size = _batch_size(n, batch_size)
        for start in range(0, n, size):
            x = to_model_input(np.asarray(images[start:start + size]), self.image_size)
            k = len(x)
            if k < size:
                x = np.concatenate([x, np.zeros((size - k, *x.shape[1:]), dtype=x.dtype)])
            p_any = np.asarray(self.stage1.predict_on_batch(x), dtype=np.float32)[:k, 0]
            p_sub = np.asarray(self.stage2.predict_on_batch(x), dtype=np.float32)[:k]
            yield start, combine(p_any, p_sub)


def combine(p_any: np.ndarray, p_subtype_given_any: np.ndarray) -> np.ndarray:
    """(N,) p(any) and (N, 5) p(subtype | any) -> (N, 6) in LABELS order, subtypes multiplied."""
    p_any = np.asarray(p_any, dtype=np.float32).reshape(-1)
    cond = np.asarray(p_subtype_given_any, dtype=np.float32)
    if cond.shape != (len(p_any), len(SUBTYPES)):
        raise ValueError(f"stage 2 gave shape {cond.shape}; expected ({len(p_any)}, {len(SUBTYPES)})")
    return np.concatenate([p_any[:, None], p_any[:, None] * cond], axis=1)


def to_model_input(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, 3) uint8 or float in [0, 1] -> float32 (N, size, size, 3) in [0, 1]."""
    if images.dtype == np.uint8:
        x = images.astype(np.float32) / 255.0
    else:
        x = images.astype(np.float32, copy=False)
        if x.size and (x.min() < 0 or x.max() > 1.0 + 1e-6):
            raise ValueError(f"float images must lie in [0, 1]; got [{x.min():.3g}, {x.max():.3g}] "
                             "(pass uint8 0-255 images as uint8)")
    if x.shape[1:3] != (size, size):
        x = np.stack([resize(img, size) for img in x])
    return x


def load_cascade(run_dir: Path) -> Cascade:
    """Read run_dir/cascade.json and load both stages it names.

    Raises FileNotFoundError naming the missing file (and that `ich train` makes it), and
    ValueError when cascade.json is malformed or its label order is not this version's.
    An `ich export --format onnx` folder loads as an onnx_cascade.OnnxCascade (same interface,
    no Keras import).
    """
    from ich.evaluation import onnx_cascade

    if onnx_cascade.is_export(run_dir):
        return onnx_cascade.load_onnx_cascade(run_dir)
    import keras

    import ich.models  # noqa: F401  (registers the custom layers before loading)

    run_dir = Path(run_dir)
    meta = read_cascade_json(run_dir)
    models = []
    for stage, outputs in (("stage1", 1), ("stage2", len(SUBTYPES))):
        path = run_dir / meta[stage]["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {run_dir / CASCADE_JSON} names it as the "
                                    f"{stage} model; run `ich train` to make it")
        # compile=False: inference needs neither the optimizer nor the (custom) training loss.
        model = keras.saving.load_model(path, compile=False)
        shape = tuple(model.output_shape)
        if shape[-1] != outputs:
            raise ValueError(f"{path}: outputs {shape}, expected (None, {outputs}) for {stage}")
        models.append(model)
    return Cascade(stage1=models[0], stage2=models[1], meta=meta)


def read_cascade_json(run_dir: Path) -> dict:
    """The parsed run_dir/cascade.json, checked for the keys inference needs."""
    path = Path(run_dir) / CASCADE_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `ich train` first (it writes the models "
                                f"and {CASCADE_JSON} into {run_dir})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    for key in ("image_size", "stage1", "stage2"):
        if key not in meta:
            raise ValueError(f"{path}: key {key!r} missing; retrain with `ich train --force`")
    for key, expected in (("labels", LABELS), ("subtypes", SUBTYPES)):
        if key in meta and tuple(meta[key]) != expected:
            raise ValueError(f"{path}: {key} {meta[key]} differ from this version's {list(expected)}")
    return meta


def n_batches(n: int, batch_size: int) -> int:
    """How many batches `Cascade.iter_predict` makes for n images (for progress bars)."""
    return -(-n // _batch_size(n, batch_size)) if n else 0


def _batch_size(n: int, batch_size: int) -> int:
    # Never larger than n: padding 5 images to a batch of 32 would waste the CPU's time.
    return max(1, min(int(batch_size), n))


def _check_images(images) -> None:
    shape = getattr(images, "shape", None)
    if shape is None or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"images must be an array (N, S, S, 3) RGB; got shape {shape}")
