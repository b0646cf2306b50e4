"""A run's cascade.json, read and checked, and the checks on what the cascade gives back.

In: a run directory (or an export folder) holding cascade.json; probabilities with their image
names; model inputs. Out: the parsed, checked description; ValueError naming the fault; and
`CascadeBase`, what a Keras cascade (ich.evaluation.inference) and an ONNX export
(ich.evaluation.onnx_cascade) share: the input description, thresholds, batching and input
conversion. Keras-free, so an ONNX export is read and run without a deep-learning backend.

cascade.json "stages" lists image stages (kind "image", the default: a model on one input
image) and at most one "sequence" stage, which runs over a series' per-slice features after
them; the image stages together give every label once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ich.constants import CASCADE_JSON, IMAGE, LABELS, SEQUENCE
from ich.data.inputs import InputSpec, neighbour_rows
from ich.data.series import series_runs
from ich.data.windowing import resize

from ich.evaluation.metrics import DEFAULT_THRESHOLD



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
        plain_file_name(stage.get("file", ""), f"{path}: stage {stage.get('name')}")  # issue 10
        kind = stage_kind(stage)
        if kind not in (IMAGE, SEQUENCE):
            raise ValueError(f"{path}: stage {stage.get('name')} has unknown kind {kind!r}")
        if kind == SEQUENCE:
            continue
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


def stage_kind(stage: dict) -> str:
    """A cascade.json stage entry's kind: "image" (the default) or "sequence"."""
    return str(stage.get("kind") or IMAGE)


def plain_file_name(name, where: str) -> str:
    """`name` if it is a plain file name (no folder part, not '.' or '..'), else ValueError:
    a cascade.json must name model files inside its own run directory."""
    text = str(name)
    if not text or text in (".", "..") or "/" in text or "\\" in text or Path(text).name != text:
        raise ValueError(f"{where}: model file {text!r} is not a plain file name inside the run "
                         "directory; cascade.json may only name files beside it")
    return text


def check_finite(probs: np.ndarray, ids, what: str) -> None:
    """Raise ValueError naming the images (up to ten) whose probabilities are NaN or infinite,
    e.g. from a model trained into overflow or a broken export, before any metric or file
    uses them."""
    bad = ~np.isfinite(np.asarray(probs, dtype=np.float64)).all(axis=1)
    if bad.any():
        names = [str(i) for i in np.asarray(list(ids), dtype=object)[bad][:10]]
        more = f" and {int(bad.sum()) - len(names)} more" if bad.sum() > len(names) else ""
        raise ValueError(f"{what}: the model gave NaN or infinite probabilities for "
                         f"{int(bad.sum())} image(s): {', '.join(names)}{more}; the model is "
                         "broken (retrain it, e.g. with a lower learning rate) or these inputs are")


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


@dataclass
class CascadeBase:
    """What every loaded cascade shares: its cascade.json (`meta`), the input description,
    thresholds, and batch-by-batch prediction of model inputs. Subclasses say how one batch of
    float32 inputs becomes (k, 6) probabilities (`predict_inputs`) and whether a short last batch
    is padded (`pad_batches`: compiled backends keep one traced shape)."""

    meta: dict = field(default_factory=dict)
    pad_batches = False

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

    @property
    def image_thresholds(self) -> dict[str, float]:
        """Thresholds for the image stages' own output: cascade_thresholds when the run has a
        sequence stage (its `thresholds` are for the refined output), else the thresholds."""
        saved = self.meta.get("cascade_thresholds")
        return {label: float(saved[label]) for label in LABELS} if saved else self.thresholds

    @property
    def image_stages(self) -> list[dict]:
        """cascade.json's image stages, in order."""
        return [s for s in self.meta["stages"] if stage_kind(s) == IMAGE]

    @property
    def sequence_stage(self) -> dict | None:
        """cascade.json's sequence stage, or None when the run has none."""
        return next((s for s in self.meta["stages"] if stage_kind(s) == SEQUENCE), None)

    def predict_inputs(self, x: np.ndarray) -> np.ndarray:
        """float32 model inputs (k, S, S, C) in [0, 1] -> (k, 6) probabilities, one batch."""
        raise NotImplementedError

    def predict_with_features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """One batch -> (probabilities, per-slice features or None when this cascade has no
        sequence stage to take them)."""
        return self.predict_inputs(x), None

    def refine(self, series_ids, positions, probs: np.ndarray, features: np.ndarray | None
               ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """(per-slice probabilities, the rows of each series in position order, per-series
        probabilities). Without a sequence stage (here): the slices unchanged, and each series
        the maximum over its slices."""
        runs = series_runs(series_ids, positions)
        probs = np.asarray(probs, dtype=np.float32)
        series = (np.stack([probs[run].max(axis=0) for run in runs]) if runs
                  else np.zeros((0, len(LABELS)), np.float32))
        return probs.copy(), runs, series

    def predict_slices(self, slices: np.ndarray, series_ids, positions, batch_size: int = 32
                       ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """Whole series of decoded slices -> what `refine` returns.

        In: uint8 (N, S, S, 3) slices as preprocessing writes them, their series ids and
        positions along the slice normal. Each slice's input gathers its neighbours at the
        input description's offsets along its series (edges repeat; a slice without a series
        id is its own), then the image stages and, where the run has one, the sequence stage.
        """
        slices = np.asarray(slices)
        n = len(slices)
        neighbours = neighbour_rows(series_ids, positions, self.spec.offsets)
        probs = np.empty((n, len(LABELS)), dtype=np.float32)
        features = None
        size = batch_length(n, batch_size)
        for start in range(0, n, size):
            inputs = self.spec.assemble(slices[neighbours[start:start + size]])
            x = to_model_input(inputs, self.image_size)
            p, f = self.predict_with_features(pad(x, size) if self.pad_batches else x)
            probs[start:start + len(x)] = p[:len(x)]
            if f is not None:
                if features is None:
                    features = np.empty((n, f.shape[1]), dtype=np.float32)
                features[start:start + len(x)] = f[:len(x)]
        return self.refine(series_ids, positions, probs, features)

    def predict(self, images, batch_size: int = 32) -> np.ndarray:
        """Probabilities (N, 6) float32 in LABELS order for model inputs (N, S, S, C)."""
        out = np.empty((len(images), len(LABELS)), dtype=np.float32)
        for start, probs in self.iter_predict(images, batch_size):
            out[start:start + len(probs)] = probs
        return out

    def iter_predict(self, images, batch_size: int = 32) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (index of the batch's first input, probabilities (k, 6)) batch by batch; works
        on a memory-mapped array without loading it whole."""
        check_images(images, self.spec.n_channels)
        n = len(images)
        if n == 0:
            return
        size = batch_length(n, batch_size)
        for start in range(0, n, size):
            x = to_model_input(np.asarray(images[start:start + size]), self.image_size)
            padded = pad(x, size) if self.pad_batches else x
            yield start, self.predict_inputs(padded)[:len(x)]


def batch_length(n: int, batch_size: int) -> int:
    """The batch size used for n inputs: never larger than n (padding 5 images to a batch of 32
    would waste the CPU's time)."""
    return max(1, min(int(batch_size), n))


def pad(x: np.ndarray, size: int) -> np.ndarray:
    """Pad a short last batch with zeros to `size` rows: compiled backends keep one shape."""
    if len(x) >= size:
        return x
    return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), dtype=x.dtype)])


def check_images(images, channels: int) -> None:
    """ValueError unless `images` is an (N, S, S, channels) array."""
    shape = getattr(images, "shape", None)
    if shape is None or len(shape) != 4 or shape[-1] != channels:
        raise ValueError(f"model inputs must be an array (N, S, S, {channels}) as the run's input "
                         f"description assembles them; got shape {shape}")
