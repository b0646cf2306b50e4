"""Load a trained cascade and turn model inputs into the six probabilities.

In: a run directory holding cascade.json and one <stage>.keras per stage it lists (written by
`ich train`), then model inputs (N, S, S, C) as the input description assembles them, uint8
(0-255) or float (0-1), or a split's SplitData. Out: float32 (N, 6) probabilities in LABELS
order. Each image stage gives its labels; a stage conditional on a label (stage 2 on `any`)
gives p(label | given), turned into p(given) * p(label | given), so a subtype is never more
likely than `any`.

With a sequence stage in the run, `refine` takes the cascade's per-slice probabilities and
features (each image stage's pooled features, concatenated) of whole series, ordered by
position, and gives refined per-slice probabilities and one set per series. Nothing here
writes files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import pandas as pd

import ich.models  # noqa: F401  (registers the custom layers and losses before loading)
from ich.allocator import retain_freed_memory
from ich.constants import CASCADE_JSON, IMAGE, LABELS
from ich.data.series import pack, series_runs, unpack
from ich.evaluation.cascade_file import CascadeBase, batch_length, pad, read_cascade_json, stage_kind
from ich.io import progress
from ich.models.graph import with_fast_graph
from ich.saved_models import load_saved

FEATURE_LAYER = "pool"  # each image stage's pooled features, the sequence stage's input
SERIES_BATCH = 8        # series per forward pass of the sequence stage


@dataclass
class Cascade(CascadeBase):
    """The trained stages (by name, in cascade.json order) and their cascade.json metadata."""

    models: dict = field(default_factory=dict)   # stage name -> keras.Model (or anything with predict_on_batch)
    pad_batches = True
    _feature_models: dict = field(default_factory=dict, repr=False)

    def predict_inputs(self, x: np.ndarray) -> np.ndarray:
        """float32 model inputs (k, S, S, C) in [0, 1] -> (k, 6) probabilities, one batch."""
        return self._run(x, with_features=False)[0]

    def predict_features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One batch -> ((k, 6) probabilities, (k, D) features: each image stage's pooled
        features, concatenated; what the sequence stage takes)."""
        return self._run(x, with_features=True)

    def predict_with_features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """`predict_features` when the run has a sequence stage, else (probabilities, None):
        nothing extra is computed for a run that cannot use it."""
        return self._run(x, with_features=self.sequence_stage is not None)

    def _run(self, x: np.ndarray, with_features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        k = len(x)
        out = np.full((k, len(LABELS)), np.nan, dtype=np.float32)
        features = []
        for stage in self.image_stages:
            if with_features:
                feature, p = self._features_model(stage["name"]).predict_on_batch(x)
                features.append(np.asarray(feature, dtype=np.float32).reshape(len(feature), -1)[:k])
            else:
                p = self.models[stage["name"]].predict_on_batch(x)
            p = np.asarray(p, dtype=np.float32)[:k]
            columns = [LABELS.index(label) for label in stage["labels"]]
            if stage.get("given"):
                p = p * out[:, [LABELS.index(stage["given"])]]
            out[:, columns] = p.reshape(k, len(columns))
        return out, (np.concatenate(features, axis=1) if with_features else None)

    def _features_model(self, name: str) -> keras.Model:
        """The stage model with its pooled features as a second output (same layers, built once)."""
        if name not in self._feature_models:
            model = self.models[name]
            try:
                pooled = model.get_layer(FEATURE_LAYER).output
            except ValueError as err:
                raise ValueError(f"stage {name} has no {FEATURE_LAYER!r} layer to take features "
                                 "from; the sequence stage needs models built by `ich train`") from err
            self._feature_models[name] = with_fast_graph(
                keras.Model(model.inputs[0], [pooled, model.outputs[0]]))
        return self._feature_models[name]

    def refine(self, series_ids, positions, probs: np.ndarray, features: np.ndarray
               ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """The sequence stage over whole series.

        In: per-slice series ids, positions, cascade probabilities (N, 6) and features (N, D).
        Out: (refined per-slice probabilities (N, 6), the rows of each series in position order
        (ich.data.series.series_runs), per-series probabilities (n_series, 6)). Without a
        sequence stage the slices are unchanged and a series is the maximum over its slices.
        """
        stage = self.sequence_stage
        if stage is None or features is None or len(probs) == 0:
            return super().refine(series_ids, positions, probs, features)
        runs = series_runs(series_ids, positions)
        probs = np.asarray(probs, dtype=np.float32)
        model = self.models[stage["name"]]
        # One padded length for all: a compiled backend traces one shape; padding never
        # changes a series' outputs (ich.models.sequence).
        length = max(len(run) for run in runs)
        refined = np.full_like(probs, np.nan)
        study = np.empty((len(runs), len(LABELS)), dtype=np.float32)
        for start in range(0, len(runs), SERIES_BATCH):
            chunk = runs[start:start + SERIES_BATCH]
            f, mask = pack(features, chunk, length)
            p, _ = pack(probs, chunk, length)
            out = model.predict_on_batch({"features": f, "mask": mask, "probabilities": p})
            slices = unpack(np.asarray(out["slices"]), chunk, len(probs))
            rows = np.concatenate(chunk)
            refined[rows] = slices[rows]
            study[start:start + len(chunk)] = np.asarray(out["study"], dtype=np.float32)
        return refined, runs, study


def predict_split(cascade: Cascade, data, batch_size: int, split: str = "",
                  rows: np.ndarray | None = None, with_features: bool = False):
    """Probabilities (len(rows), 6) for rows of a split (ich.data.loading.SplitData; default its
    targets, in order), with a progress bar; with_features: also the (len(rows), D) features."""
    picked = data.targets if rows is None else np.asarray(rows, dtype=np.int64)
    batches = data.batches(LABELS, batch_size, cascade.spec, shuffle=False, seed=0, rows=picked)
    out = np.empty((len(picked), len(LABELS)), dtype=np.float32)
    features = None
    start = 0
    for index in progress(range(len(batches)), desc=f"predict {split}".strip(), unit="batch"):
        x, _ = batches[index]
        if with_features:
            probs, feature = cascade.predict_features(pad(x, batch_size))
            if features is None:
                features = np.empty((len(picked), feature.shape[1]), dtype=np.float32)
            features[start:start + len(x)] = feature[:len(x)]
        else:
            probs = cascade.predict_inputs(pad(x, batch_size))
        out[start:start + len(x)] = probs[:len(x)]
        start += len(x)
    return (out, features) if with_features else out


def series_rows(data) -> np.ndarray:
    """Rows of a split that belong to a series (targets and context slices): what the sequence
    stage sees. Augmented copies and slices without a series id are left out."""
    return np.flatnonzero(data.table["series_id"].astype(str).to_numpy() != "")


def refine_split(cascade: Cascade, data, batch_size: int, split: str = "") -> dict:
    """The whole-series view of a split: cascade and refined probabilities per target, and per
    series its study, labels and probabilities.

    Out: {"cascade": (n_targets, 6), "refined": (n_targets, 6) (the cascade's own where a
    target is in no series), "series": DataFrame of series_id, study_id, n_slices, the six
    probabilities and the six `<label>_true` labels, "series_max": the same with each series'
    highest cascade probability over its slices}. Without a sequence stage "refined" equals
    "cascade" and "series" equals "series_max".
    """
    table = data.table
    rows = np.union1d(series_rows(data), data.targets)
    if cascade.sequence_stage is not None:
        probs, features = predict_split(cascade, data, batch_size, split, rows=rows, with_features=True)
    else:
        probs, features = predict_split(cascade, data, batch_size, split, rows=rows), None
    part = table.iloc[rows].reset_index(drop=True)
    refined, runs, study = cascade.refine(part["series_id"], part["position"], probs, features)
    position = {row: i for i, row in enumerate(rows)}
    at = np.array([position[t] for t in data.targets], dtype=np.int64)
    truth = part[list(LABELS)].to_numpy(dtype=np.float32)
    highest = np.stack([probs[run].max(axis=0) for run in runs]) if runs else study
    return {"cascade": probs[at], "refined": refined[at],
            "series": series_table(part, runs, study, truth),
            "series_max": series_table(part, runs, highest, truth)}


def series_table(part: pd.DataFrame, runs: list[np.ndarray], probs: np.ndarray,
                 truth: np.ndarray) -> pd.DataFrame:
    """One row per series (rows `runs` of `part`): series_id, study_id, n_slices, the six
    probabilities and `<label>_true` (1 when any slice is positive)."""
    out = pd.DataFrame({"series_id": [part["series_id"].iloc[run[0]] for run in runs],
                        "study_id": [part["study_id"].iloc[run[0]] for run in runs],
                        "n_slices": [len(run) for run in runs]})
    for j, label in enumerate(LABELS):
        out[label] = probs[:, j] if len(runs) else []
    for j, label in enumerate(LABELS):
        out[f"{label}_true"] = [truth[run, j].max() for run in runs]
    return out


def load_cascade(run_dir: Path) -> Cascade:
    """Read run_dir/cascade.json and load every stage it names.

    Raises FileNotFoundError naming the missing file (and that `ich train` makes it), and
    ValueError when cascade.json is malformed or its label order is not this version's.
    """
    run_dir = Path(run_dir)
    meta = read_cascade_json(run_dir)
    retain_freed_memory()  # each batch's activations reuse the last batch's pages (ich.allocator)
    models = {}
    for stage in meta["stages"]:
        path = run_dir / stage["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {run_dir / CASCADE_JSON} names it as the "
                                    f"{stage['name']} model; run `ich train` to make it")
        model = load_saved(path)
        if stage_kind(stage) == IMAGE:
            shape = tuple(model.output_shape)
            if shape[-1] != len(stage["labels"]):
                raise ValueError(f"{path}: outputs {shape}, expected (None, {len(stage['labels'])}) "
                                 f"for {stage['name']}")
            model = with_fast_graph(model)
        models[stage["name"]] = model
    return Cascade(models=models, meta=meta)


def n_batches(n: int, batch_size: int) -> int:
    """How many batches `Cascade.iter_predict` makes for n images (for progress bars)."""
    return -(-n // batch_length(n, batch_size)) if n else 0
