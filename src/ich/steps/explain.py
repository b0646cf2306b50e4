"""`ich explain PATH... --model RUN_DIR --out DIR`: Grad-CAM overlays for DICOMs or PNGs.

In: paths (as `ich predict` takes them: DICOM files, folders, windowed RGB PNGs), a run
directory (cascade.json and the stage models) and the config (predict.batch_size,
predict.workers, explain.feature_stride). Out, in DIR:
- <image_id>_<label>.png: the blood window in grey with the label's Grad-CAM heatmap on top,
  for each image and each label at or above its threshold (`every_label`: all six labels);
  `any` is explained through stage 1, each subtype through its output of stage 2;
- explanations.csv: image_id, file name, label, probability, threshold, overlay file name,
  peak_row, peak_col (the heatmap's maximum, in model-input pixels);
- failures.csv: path, reason for inputs that could not be read.
DICOMs get the training preprocessing of the model (windows and size from cascade.json),
exactly as in `ich predict`. Nothing is written into RUN_DIR.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("ich")

EXPLANATIONS_CSV = "explanations.csv"


def explain_paths(paths: list[Path], run_dir: Path, out_dir: Path, cfg: dict,
                  every_label: bool = False) -> Path:
    """Write overlays for every readable image under `paths`; return explanations.csv's path.
    The Keras backend must be chosen before this is called (the CLI does it)."""
    import pandas as pd

    from ich.config import resolve_workers
    from ich.constants import FAILURES_CSV
    from ich.data.inputs import neighbour_rows
    from ich.data.sources import decode_all, display_names, find_inputs
    from ich.errors import StepError
    from ich.evaluation.inference import load_cascade
    from ich.io import Timer, summary, write_csv

    timer = Timer()
    out_dir = Path(out_dir)
    _refuse_run_dir(out_dir, run_dir)
    roots = [Path(p) for p in paths]
    files, failures = find_inputs(roots)
    for failure in failures:            # a missing argument is shown by its name only
        failure["path"] = Path(failure["path"]).name
    shown = display_names(roots, files)  # never an absolute path (issue 10: folders name patients)
    try:
        cascade = load_cascade(Path(run_dir))
    except ValueError as err:
        raise StepError(str(err)) from err
    spec = cascade.spec
    images, info_rows, names = [], [], []
    for path, image, info in decode_all(files, spec.png_windows, spec.image_size,
                                        resolve_workers(cfg["predict"]["workers"])):
        if image is None:
            failures.append({"path": shown[path], "reason": info["reason"]})
            log.warning("explain: skipped %s: %s", shown[path], info["reason"])
            continue
        images.append(image)
        info_rows.append(info)
        names.append(shown[path])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(pd.DataFrame(failures, columns=["path", "reason"]), out_dir / FAILURES_CSV)
    if not images:
        raise StepError(f"nothing to explain: no readable DICOM or RGB PNG among the inputs; "
                        f"reasons in {out_dir / FAILURES_CSV}")
    slices = np.stack(images)
    table = pd.DataFrame(info_rows)
    # The model's inputs, with neighbouring slices where the run uses them (as `ich predict`).
    neighbours = (neighbour_rows(table.get("series_id", pd.Series([""] * len(table))),
                                 table.get("position", pd.Series([np.nan] * len(table))), spec.offsets)
                  if spec.has_context else np.arange(len(slices))[:, None])
    inputs = spec.assemble(slices[neighbours])
    probs = cascade.predict(inputs, batch_size=int(cfg["predict"]["batch_size"]))
    ids = [str(r["image_id"]) for r in info_rows]
    rows = write_overlays(out_dir, cascade, inputs, slices, ids, names, probs, cascade.image_thresholds,
                          int(cfg["explain"]["feature_stride"]), every_label)
    path = write_csv(pd.DataFrame(rows, columns=["image_id", "file", "label", "probability", "threshold",
                                                 "overlay", "peak_row", "peak_col"]),
                     out_dir / EXPLANATIONS_CSV)
    summary("explain", f"{len(rows)} overlays for {len(images)} images ({len(failures)} failed) "
            f"-> {out_dir}", len(images), "images", timer)
    return path


def write_overlays(out_dir: Path, cascade, inputs: np.ndarray, slices: np.ndarray, ids, names,
                   probs: np.ndarray, thresholds: dict, stride: int, every_label: bool = False) -> list[dict]:
    """Compute the heatmaps each input needs (`inputs`: the model's, `slices`: each target
    slice's RGB windows, drawn under the heat; `stride`: explain.feature_stride), write the
    overlays, return the table rows."""
    import cv2

    from ich.constants import LABELS
    from ich.evaluation.explain import overlay, peak
    from ich.io import atomic_write_bytes

    rows = []
    for j, label in enumerate(LABELS):
        wanted = np.flatnonzero(np.ones(len(inputs), bool) if every_label else probs[:, j] >= thresholds[label])
        if not len(wanted):
            continue
        heats = label_heatmaps(cascade, inputs[wanted], label, stride)
        for i, heat in zip(wanted, heats):
            name = f"{ids[i]}_{label}.png"
            ok, data = cv2.imencode(".png", cv2.cvtColor(overlay(slices[i], heat), cv2.COLOR_RGB2BGR))
            if ok:
                atomic_write_bytes(Path(out_dir) / name, data.tobytes())
            r, c = peak(heat)
            rows.append({"image_id": ids[i], "file": names[i], "label": label,
                         "probability": float(probs[i, j]), "threshold": float(thresholds[label]),
                         "overlay": name, "peak_row": r, "peak_col": c})
    return rows


def label_heatmaps(cascade, inputs: np.ndarray, label: str, stride: int) -> np.ndarray:
    """Grad-CAM heatmaps (N, S, S) of one label from the stage that predicts it (cascade.json's
    stage list): `any` from stage 1, a subtype from its column of stage 2 (p(subtype | any):
    where the model sees that kind of blood), each backbone explained at feature stride
    `stride` (explain.feature_stride; the layer rule is ich.evaluation.feature_maps')."""
    from ich.evaluation.explain import gradcam
    from ich.evaluation.cascade_file import to_model_input

    model, column = label_output(cascade, label)
    return gradcam(model, to_model_input(np.asarray(inputs), cascade.image_size), column, stride)


def label_output(cascade, label: str):
    """(the stage model that predicts `label`, its output column), from cascade.json's stages."""
    for stage in cascade.meta["stages"]:
        if label in stage["labels"]:
            return cascade.models[stage["name"]], list(stage["labels"]).index(label)
    raise ValueError(f"no stage of the cascade predicts {label!r}")


def _refuse_run_dir(out_dir: Path, run_dir: Path) -> None:
    from ich.errors import StepError

    out, run = Path(out_dir).resolve(), Path(run_dir).resolve()
    if out == run or run in out.parents:
        raise StepError(f"--out {out_dir} lies inside the model's run directory {run_dir}; "
                        "choose a folder outside it (a run directory is never written to)")
