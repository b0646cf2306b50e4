"""The Python API for notebooks and scripts, re-exported from `ich` (see docs/api.md).

In: a config (a packaged name, a YAML path or None for the defaults, plus `section.key=value`
overrides), run directories, DICOM/PNG paths or image arrays. Out: the plain config dict, the
paths the steps write, a loaded cascade, predictions as a pandas DataFrame, the metrics dict.

The Keras backend is chosen when this module loads, before anything imports Keras: the
KERAS_BACKEND variable when set, else the first installed of torch, jax, tensorflow; a config
whose train.backend names one (load_config) then selects that one, if Keras is not yet loaded.
Log lines of the `ich` logger show in a notebook: a handler is added when none is configured.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from ich import backend as backend_mod
from ich import config as config_mod
from ich.constants import LABELS, STEPS
from ich.errors import StepError
from ich.saved_models import reusing_loaded_models

log = logging.getLogger("ich")


def _choose_backend_at_import() -> None:
    if "keras" in sys.modules or os.environ.get("KERAS_BACKEND"):
        return
    for name in backend_mod.VALID:
        if importlib.util.find_spec(backend_mod.PACKAGE[name]) is not None:
            os.environ["KERAS_BACKEND"] = name
            return


def _show_logs() -> None:
    # A notebook has no handler anywhere: Python's last resort would show warnings only.
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        if log.level == logging.NOTSET:
            log.setLevel(logging.INFO)


_choose_backend_at_import()
_show_logs()


def load_config(config: str | Path | None = None, overrides: Iterable[str] = ()) -> dict:
    """The resolved config: base defaults, then `config` (a packaged name such as "demo", or a
    YAML path), then `overrides` ("train.batch_size=8", ...), validated (ConfigError if not).

    A train.backend other than "auto" is selected here when Keras has not been imported yet.
    """
    cfg = config_mod.load(config, list(overrides))
    if cfg["train"]["backend"] != "auto" and "keras" not in sys.modules:
        backend_mod.select_backend(cfg["train"]["backend"])
    return cfg


def run_step(cfg: dict, name: str, force: bool = False) -> Path:
    """Run one step (sample, copy, preprocess, split, augment, train, evaluate); return its main
    output path. A finished, up-to-date step is skipped unless force."""
    from ich.cli import run_step as cli_run_step

    if name not in STEPS:
        raise ValueError(f"unknown step {name!r}; valid: {', '.join(STEPS)}")
    return cli_run_step(name, cfg, force=force)


def run(cfg: dict, first: str = STEPS[0], last: str = STEPS[-1], force: bool = False) -> dict[str, Path]:
    """Run the steps from `first` to `last` in order (like `ich run --from --to`); return
    {step: output path}. force redoes `first`; later steps rerun when their inputs changed."""
    for name in (first, last):
        if name not in STEPS:
            raise ValueError(f"unknown step {name!r}; valid: {', '.join(STEPS)}")
    if STEPS.index(first) > STEPS.index(last):
        raise ValueError(f"first step {first!r} comes after last step {last!r}")
    steps = STEPS[STEPS.index(first):STEPS.index(last) + 1]
    with reusing_loaded_models():   # a model one step loads is not read again by the next
        return {name: run_step(cfg, name, force=force and name == first) for name in steps}


def load_model(run_dir: str | Path):
    """The trained cascade of `run_dir` (cascade.json, stage1.keras, stage2.keras) as a
    ich.evaluation.inference.Cascade: `.predict(images)`, `.thresholds`, `.meta`."""
    from ich.evaluation.inference import load_cascade

    cascade = load_cascade(Path(run_dir))
    cascade.run_dir = Path(run_dir)  # predict() on paths reads the run again through it
    return cascade


def __getattr__(name: str):
    if name == "Cascade":  # the type load_model returns, without importing it eagerly
        from ich.evaluation.inference import Cascade

        return Cascade
    raise AttributeError(f"module 'ich.api' has no attribute {name!r}")


def predict(model, inputs, cfg: dict | None = None, out_dir: str | Path | None = None,
            batch_size: int | None = None):
    """Predictions of `model` (a run directory or a load_model result) as a DataFrame.

    `inputs` is either an image array (N, S, S, 3) RGB, uint8 or float in [0, 1], windowed like
    work/png/, each image scored alone (a series of its own: a context model's neighbours are the
    image itself; rows in input order: the six probabilities, then `<label>_pred` 0/1 calls at
    the run's thresholds), or DICOM/PNG files and folders (one path or a list): then the rows of
    predictions.csv of `ich predict`, written to out_dir (a temporary folder when None) with
    submission.csv, studies.csv and failures.csv. `cfg` (default: the defaults) gives
    predict.batch_size and predict.workers.
    """
    import pandas as pd

    cfg = cfg if cfg is not None else load_config()
    if isinstance(inputs, np.ndarray):
        cascade = model if hasattr(model, "predict") else load_model(model)
        probs, _, _ = cascade.predict_slices(inputs, [""] * len(inputs), [0.0] * len(inputs),
                                             int(batch_size or cfg["predict"]["batch_size"]))
        table = pd.DataFrame(probs, columns=list(LABELS))
        for label in LABELS:
            table[f"{label}_pred"] = (table[label] >= cascade.thresholds[label]).astype(int)
        return table
    from ich.io import read_csv
    from ich.steps.predict import predict_paths

    run_dir = Path(getattr(model, "run_dir", model))
    paths = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    if batch_size is not None:
        cfg = {**cfg, "predict": {**cfg["predict"], "batch_size": int(batch_size)}}
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="ich_predict_") as tmp:
            return read_csv(predict_paths(paths, run_dir, Path(tmp), cfg))
    return read_csv(predict_paths(paths, run_dir, Path(out_dir), cfg))


def evaluate(cfg: dict, force: bool = False) -> dict:
    """Evaluate the run of cfg.paths.run_dir on the test split (`ich evaluate`); return the
    metrics dict of run_dir/eval/metrics.json (per label and overall)."""
    path = run_step(cfg, "evaluate", force=force)
    return json.loads(Path(path).read_text())


__all__ = ["load_config", "run", "run_step", "load_model", "predict", "evaluate", "StepError"]
