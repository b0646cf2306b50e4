"""An exported cascade (`ich export --format onnx`) run by onnxruntime, without Keras.

In: an export folder holding cascade.json (with an "export" entry) and cascade.onnx, then images
(N, S, S, C), uint8 (0-255) or float (0-1). Out: float32 (N, 6) probabilities in LABELS order,
the same numbers as ich.evaluation.inference.Cascade gives for the run it was exported from
(within float tolerance). The interface is Cascade's (ich.evaluation.cascade_file.CascadeBase),
so `ich predict` and evaluation use either. Imports neither Keras nor a deep-learning backend: a deployment needs numpy, opencv and onnxruntime only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ich.constants import CASCADE_JSON, LABELS
from ich.data.inputs import InputSpec
from ich.evaluation.cascade_file import CascadeBase

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
class OnnxCascade(CascadeBase):
    """An onnxruntime session over cascade.onnx and the export's cascade.json. The export holds
    the image stages; a run's sequence stage is not exported, so studies from an export are the
    maximum over their slices."""

    session: object = None  # onnxruntime.InferenceSession: images (N, S, S, C) float32 -> (N, 6)

    @property
    def sequence_stage(self) -> None:
        """None: the export runs the per-slice cascade only."""
        return None

    def predict_inputs(self, x: np.ndarray) -> np.ndarray:
        """float32 model inputs (k, S, S, C) -> (k, 6); the graph's batch dimension is dynamic,
        so batches are never padded."""
        (probs,) = self.session.run(None, {self.meta["export"]["input"]["name"]: x})
        return np.asarray(probs, dtype=np.float32)


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
