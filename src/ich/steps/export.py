"""`ich export RUN_DIR --format onnx --out DIR`: the trained cascade as one deployable graph.

In: a run directory (cascade.json, stage1.keras, stage2.keras from `ich train`, thresholds from
`ich evaluate` when it ran). Out, in DIR:
  cascade.onnx    (--format onnx) float32 images (N, S, S, C) in [0, 1] -> "probabilities" (N, 6)
                  in LABELS order; the batch dimension is dynamic
  saved_model/    (--format saved_model, where TensorFlow is installed) the same function as a
                  TensorFlow SavedModel, endpoint `serve`
  cascade.json    the run's cascade.json (input description, thresholds) plus an "export" entry
                  (ich.export.export_description)
Before cascade.json is written, the export is run on CHECK_IMAGES random images and compared
with the Keras cascade; a difference above TOLERANCE fails the export (StepError) and leaves no
cascade.json, so `ich predict --model DIR` never sees a wrong export. `ich predict --model DIR`
runs an ONNX export through onnxruntime without importing Keras
(ich.evaluation.onnx_cascade).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

log = logging.getLogger("ich")

CHECK_IMAGES = 4
TOLERANCE = 1e-4  # largest allowed |export - Keras| on a probability


def run_export(run_dir: str | Path, out_dir: str | Path, fmt: str = "onnx") -> Path:
    """Export the cascade of `run_dir` into `out_dir` in format `fmt`; return out_dir/cascade.json."""
    from ich import backend
    from ich.errors import StepError
    from ich.export import FORMATS

    if fmt not in FORMATS:
        raise StepError(f"--format {fmt!r} is not known; valid: {', '.join(FORMATS)}")
    try:
        # A SavedModel is written by TensorFlow; ONNX by whichever backend is selected.
        backend.select_backend("tensorflow" if fmt == "saved_model" else "auto")
    except (RuntimeError, ImportError, ValueError) as err:
        raise StepError(f"ich export --format {fmt}: {err}") from err
    import keras

    from ich.constants import CASCADE_JSON
    from ich.evaluation.inference import load_cascade
    from ich.export import ONNX_FILE, SAVED_MODEL_DIR, cascade_model, export_description
    from ich.io import Timer, summary, write_json

    timer = Timer()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.resolve() == run_dir.resolve():
        raise StepError(f"--out {out_dir} is the run directory; export into a folder of its own")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")  # exports are float32 graphs
    try:
        try:
            cascade = load_cascade(run_dir)
            model = cascade_model(cascade.models, cascade.image_stages)
        except ValueError as err:
            raise StepError(str(err)) from err
        shape = tuple(int(d) for d in model.input_shape[1:])
        images = np.random.default_rng(0).random((CHECK_IMAGES, *shape), dtype=np.float32)
        expected = cascade.predict(images, batch_size=CHECK_IMAGES)
        out_dir.mkdir(parents=True, exist_ok=True)
        stale = out_dir / CASCADE_JSON
        if stale.exists():
            stale.unlink()  # until the new export is checked, the folder is no export
        if fmt == "onnx":
            file = ONNX_FILE
            got = _write_onnx(model, out_dir / ONNX_FILE, shape, images)
        else:
            file = SAVED_MODEL_DIR
            got = _write_saved_model(model, out_dir / SAVED_MODEL_DIR, images)
    except RuntimeError as err:
        raise StepError(f"ich export --format {fmt}: {err}") from err
    finally:
        keras.mixed_precision.set_global_policy(previous)

    diff = float(np.max(np.abs(got - expected)))
    if not diff <= TOLERANCE:
        raise StepError(f"the {fmt} export in {out_dir} differs from the Keras cascade by {diff:.3g} "
                        f"(allowed {TOLERANCE:g}) on {CHECK_IMAGES} random images; it was not "
                        f"marked as an export. Report this with the versions in {run_dir / CASCADE_JSON}")
    meta = export_description(cascade.meta, fmt, file, shape, backend.versions(), diff)
    path = write_json(meta, out_dir / CASCADE_JSON)
    summary("export", f"{run_dir} -> {out_dir / file} ({fmt}, input {shape}, max |export - keras| "
            f"{diff:.2g})", 1, "models", timer)
    return path


def _write_onnx(model, path: Path, shape: tuple, images: np.ndarray) -> np.ndarray:
    """Export `model` to `path` atomically and return onnxruntime's outputs for `images`."""
    from ich import backend
    from ich.export import INPUT_NAME, OPSET, OUTPUT_NAME
    from ich.io import atomic_path

    try:
        import onnxruntime
    except ImportError as err:
        raise RuntimeError("ONNX export needs onnx, onnxscript and onnxruntime: "
                           "pip install 'ich[onnx]'") from err
    with atomic_path(path) as tmp:
        backend.export_onnx(model, tmp, shape, INPUT_NAME, OUTPUT_NAME, OPSET)
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {INPUT_NAME: images})
    return np.asarray(got, dtype=np.float32)


def _write_saved_model(model, folder: Path, images: np.ndarray) -> np.ndarray:
    """Export `model` as a SavedModel folder (replacing an old one) and return its outputs."""
    from ich import backend

    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    backend.export_saved_model(model, tmp)
    got = backend.run_saved_model(tmp, images)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return np.asarray(got, dtype=np.float32)
