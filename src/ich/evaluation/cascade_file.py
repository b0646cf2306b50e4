"""A run's cascade.json, read and checked, and the checks on what the cascade gives back.

In: a run directory (or an export folder) holding cascade.json; probabilities with their image
names. Out: the parsed, checked description; ValueError naming the fault. Keras-free, so an
ONNX export is read and run without a deep-learning backend.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ich.constants import CASCADE_JSON, LABELS
from ich.data.inputs import InputSpec


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
