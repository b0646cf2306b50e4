"""An exported cascade (`ich export --format onnx`) run by onnxruntime, without Keras.

In: an export folder holding cascade.json (with an "export" entry) and cascade.onnx, then images
(N, S, S, C), uint8 (0-255) or float (0-1). Out: float32 (N, 6) probabilities in LABELS order,
the same numbers as ich.evaluation.inference.Cascade gives for the run it was exported from
(within float tolerance). The interface is Cascade's: predict, iter_predict, image_size,
thresholds, meta, so `ich predict` and evaluation use either. Imports neither Keras nor a
deep-learning backend: a deployment needs numpy, opencv and onnxruntime only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ich.constants import CASCADE_JSON, LABELS
from ich.data.inputs import InputSpec
from ich.data.windowing import resize

FORMAT = "onnx"


def is_export(folder: str | Path) -> bool:
    """True when `folder` holds an ONNX export's cascade.json (not a training run's)."""
    path = Path(folder) / CASCADE_JSON
    if not path.is_file():
        return False
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False  # a broken file is reported by the loader that owns the folder
    return isinstance(meta, dict) and (meta.get("export") or {}).get("format") == FORMAT


@dataclass
class OnnxCascade:
    """An onnxruntime session over cascade.onnx and the export's cascade.json."""

    session: object  # onnxruntime.InferenceSession: images (N, S, S, C) float32 -> (N, 6)
    meta: dict = field(default_factory=dict)

    @property
    def spec(self) -> InputSpec:
        """The input description the exported models were trained with."""
        return InputSpec.from_json(self.meta["input"])

    @property
    def image_size(self) -> int:
        """Side of the square model input in pixels."""
        return self.spec.image_size

    @property
    def thresholds(self) -> dict[str, float]:
        """Decision threshold per label, as the run had them when it was exported."""
        from ich.evaluation.metrics import DEFAULT_THRESHOLD

        saved = self.meta.get("thresholds") or {}
        return {label: float(saved.get(label, DEFAULT_THRESHOLD)) for label in LABELS}

    def predict(self, images, batch_size: int = 32) -> np.ndarray:
        """Probabilities (N, 6) float32 in LABELS order for images (N, S, S, C), uint8 or float."""
        out = np.empty((len(images), len(LABELS)), dtype=np.float32)
        for start, probs in self.iter_predict(images, batch_size):
            out[start:start + len(probs)] = probs
        return out

    def iter_predict(self, images, batch_size: int = 32) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (index of the batch's first image, probabilities (k, 6)) batch by batch.

        The graph's batch dimension is dynamic, so the last batch is not padded.
        """
        channels = self.spec.n_channels
        shape = getattr(images, "shape", None)
        if shape is None or len(shape) != 4 or shape[-1] != channels:
            raise ValueError(f"model inputs must be an array (N, S, S, {channels}) as the run's "
                             f"input description assembles them; got shape {shape}")
        n = len(images)
        size = max(1, min(int(batch_size), n))
        name = self.meta["export"]["input"]["name"]
        for start in range(0, n, size):
            x = to_model_input(np.asarray(images[start:start + size]), self.image_size)
            (probs,) = self.session.run(None, {name: x})
            yield start, np.asarray(probs, dtype=np.float32)


def load_onnx_cascade(folder: str | Path, threads: int | None = None) -> OnnxCascade:
    """Open the export in `folder`: cascade.json, then the ONNX file it names, in onnxruntime.

    threads: onnxruntime's intra-op threads (None = its default, one per core). Raises
    FileNotFoundError naming a missing file, ValueError for a cascade.json that is not an ONNX
    export's or whose label order differs, ImportError (with the install hint) without onnxruntime.
    """
    folder = Path(folder)
    path = folder / CASCADE_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: make the export with `ich export RUN_DIR "
                                f"--format onnx --out {folder}`")
    try:
        meta = json.loads(path.read_text())
        InputSpec.from_json(meta["input"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a readable export description ({err}); run `ich export` again") from err
    export = meta.get("export") or {}
    if export.get("format") != FORMAT:
        raise ValueError(f"{folder / CASCADE_JSON} is not an ONNX export's (export.format is "
                         f"{export.get('format')!r}); make one with `ich export RUN_DIR --format onnx`")
    if tuple(export.get("output", {}).get("labels", ())) != LABELS:
        raise ValueError(f"{folder / CASCADE_JSON}: export output labels "
                         f"{export.get('output', {}).get('labels')} differ from {list(LABELS)}")
    model = folder / export["file"]
    if not model.is_file():
        raise FileNotFoundError(f"{model} not found: {folder / CASCADE_JSON} names it as the "
                                f"exported cascade; run `ich export` again")
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError("running an ONNX export needs onnxruntime: pip install 'ich[onnx]'") from err
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    # Every provider this onnxruntime build has, best first (CUDA in onnxruntime-gpu, then CPU).
    session = onnxruntime.InferenceSession(str(model), sess_options=options,
                                           providers=onnxruntime.get_available_providers())
    return OnnxCascade(session=session, meta=meta)


def to_model_input(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, C) uint8 or float in [0, 1] -> float32 (N, size, size, C) in [0, 1].

    The same conversion as ich.evaluation.inference.to_model_input, here so that running an
    export never imports that (Keras) module.
    """
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
