"""Load a trained cascade and turn model inputs into the six probabilities.

In: a run directory holding cascade.json and one <stage>.keras per stage it lists (written by
`ich train`), then model inputs (N, S, S, C) as the input description assembles them, uint8
(0-255) or float (0-1), or a split's SplitData. Out: float32 (N, 6) probabilities in LABELS
order. Each stage gives its labels; a stage conditional on a label (stage 2 on `any`) gives
p(label | given), turned into p(given) * p(label | given), so a subtype is never more likely
than `any`. Nothing here writes files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import keras
import numpy as np

import ich.models  # noqa: F401  (registers the custom layers and losses before loading)
from ich.constants import CASCADE_JSON, LABELS
from ich.data.inputs import InputSpec
from ich.data.windowing import resize
from ich.evaluation.metrics import DEFAULT_THRESHOLD
from ich.io import progress


@dataclass
class Cascade:
    """The trained stages (by name, in cascade.json order) and their cascade.json metadata."""

    models: dict                      # stage name -> keras.Model (or anything with predict_on_batch)
    meta: dict = field(default_factory=dict)

    @property
    def spec(self) -> InputSpec:
        """The input description the models were trained with."""
        return InputSpec.from_json(self.meta["input"])

    @property
    def image_size(self) -> int:
        """Side of the square model input in pixels."""
        return self.spec.image_size

    @property
    def thresholds(self) -> dict[str, float]:
        """Decision threshold per label (chosen on val at the end of `ich train`)."""
        saved = self.meta.get("thresholds") or {}
        return {label: float(saved.get(label, DEFAULT_THRESHOLD)) for label in LABELS}

    def predict(self, images, batch_size: int = 32) -> np.ndarray:
        """Probabilities (N, 6) float32 in LABELS order for model inputs (N, S, S, C)."""
        out = np.empty((len(images), len(LABELS)), dtype=np.float32)
        for start, probs in self.iter_predict(images, batch_size):
            out[start:start + len(probs)] = probs
        return out

    def iter_predict(self, images, batch_size: int = 32) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (index of the batch's first input, probabilities (k, 6)) batch by batch.

        Works on a memory-mapped array without loading it whole. The last batch is padded to
        the batch size so that compiled backends (JAX, XLA) reuse one traced shape.
        """
        _check_images(images, self.spec.n_channels)
        n = len(images)
        if n == 0:
            return
        size = _batch_size(n, batch_size)
        for start in range(0, n, size):
            x = to_model_input(np.asarray(images[start:start + size]), self.image_size)
            yield start, self.predict_inputs(_pad(x, size))[:len(x)]

    def predict_inputs(self, x: np.ndarray) -> np.ndarray:
        """float32 model inputs (k, S, S, C) in [0, 1] -> (k, 6) probabilities, one batch."""
        k = len(x)
        out = np.full((k, len(LABELS)), np.nan, dtype=np.float32)
        for stage in self.meta["stages"]:
            p = np.asarray(self.models[stage["name"]].predict_on_batch(x), dtype=np.float32)[:k]
            columns = [LABELS.index(label) for label in stage["labels"]]
            if stage.get("given"):
                p = p * out[:, [LABELS.index(stage["given"])]]
            out[:, columns] = p.reshape(k, len(columns))
        return out


def to_model_input(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, C) uint8 or float in [0, 1] -> float32 (N, size, size, C) in [0, 1]."""
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


def predict_split(cascade: Cascade, data, batch_size: int, split: str = "") -> np.ndarray:
    """(N targets, 6) probabilities for a split's targets (ich.data.loading.SplitData), in the
    order of data.targets, with a progress bar."""
    batches = data.batches(LABELS, batch_size, cascade.spec, shuffle=False, seed=0)
    out = np.empty((len(data.targets), len(LABELS)), dtype=np.float32)
    start = 0
    for index in progress(range(len(batches)), desc=f"predict {split}".strip(), unit="batch"):
        x, _ = batches[index]
        probs = cascade.predict_inputs(_pad(x, batch_size))[:len(x)]
        out[start:start + len(x)] = probs
        start += len(x)
    return out


def load_cascade(run_dir: Path) -> Cascade:
    """Read run_dir/cascade.json and load every stage it names.

    Raises FileNotFoundError naming the missing file (and that `ich train` makes it), and
    ValueError when cascade.json is malformed or its label order is not this version's.
    """
    run_dir = Path(run_dir)
    meta = read_cascade_json(run_dir)
    models = {}
    for stage in meta["stages"]:
        path = run_dir / stage["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {run_dir / CASCADE_JSON} names it as the "
                                    f"{stage['name']} model; run `ich train` to make it")
        # compile=False: inference needs neither the optimizer nor the (custom) training loss.
        model = keras.saving.load_model(path, compile=False)
        shape = tuple(model.output_shape)
        if shape[-1] != len(stage["labels"]):
            raise ValueError(f"{path}: outputs {shape}, expected (None, {len(stage['labels'])}) "
                             f"for {stage['name']}")
        models[stage["name"]] = model
    return Cascade(models=models, meta=meta)


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
    for key in ("input", "stages"):
        if key not in meta:
            raise ValueError(f"{path}: key {key!r} missing; retrain with `ich train --force`")
    if "labels" in meta and tuple(meta["labels"]) != LABELS:
        raise ValueError(f"{path}: labels {meta['labels']} differ from this version's {list(LABELS)}")
    covered = []
    for stage in meta["stages"]:
        if stage.get("given") and stage["given"] not in covered:
            raise ValueError(f"{path}: stage {stage['name']} is conditional on {stage['given']!r}, "
                             "which no earlier stage predicts")
        covered += stage["labels"]
    if sorted(covered) != sorted(LABELS):
        raise ValueError(f"{path}: its stages give {covered}, not each of {list(LABELS)} once")
    try:
        InputSpec.from_json(meta["input"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: bad input description ({err})") from err
    return meta


def n_batches(n: int, batch_size: int) -> int:
    """How many batches `Cascade.iter_predict` makes for n images (for progress bars)."""
    return -(-n // _batch_size(n, batch_size)) if n else 0


def _batch_size(n: int, batch_size: int) -> int:
    # Never larger than n: padding 5 images to a batch of 32 would waste the CPU's time.
    return max(1, min(int(batch_size), n))


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    """Pad a short last batch with zeros to `size` rows: compiled backends keep one shape."""
    if len(x) >= size:
        return x
    return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), dtype=x.dtype)])


def _check_images(images, channels: int) -> None:
    shape = getattr(images, "shape", None)
    if shape is None or len(shape) != 4 or shape[-1] != channels:
        raise ValueError(f"model inputs must be an array (N, S, S, {channels}) as the run's input "
                         f"description assembles them; got shape {shape}")
