"""Series of slices: which rows of a table form each series, in order, and their padded arrays.

In: per-row series ids and positions along the slice normal (a split table, or predict's
decoded slices), and per-row values (features, probabilities, labels). Out: the rows of each
series ordered by position (`series_runs`), and the fixed-length arrays the sequence stage
takes (`pack`: (S, T, D) zero-padded plus a (S, T) 0/1 mask) and their inverse (`unpack`).
Pure numpy, Keras-free; shared by the neighbouring-slice gather (ich.data.inputs), the
sequence stage's training and inference, and whole-study prediction.
"""

from __future__ import annotations

import numpy as np

PAD_LABEL = -1.0  # label of a padded step: the sequence stage's loss and metric skip it


def series_runs(series_ids, positions) -> list[np.ndarray]:
    """Row indices of each series, ordered by position (ties in table order).

    A row without a series id (empty or NaN) is a series of its own. Series come in the order
    of their sorted ids, so the result does not depend on the table's row order. A NaN position
    sorts as 0.
    """
    series = np.asarray(series_ids, dtype=object)
    position = np.asarray(positions, dtype=np.float64)
    n = len(series)
    if n == 0:
        return []
    missing = np.array([s is None or (isinstance(s, float) and np.isnan(s)) or s == "" for s in series],
                       dtype=bool)
    keys = np.where(missing, [f"\0row{i}" for i in range(n)], series.astype(str))
    position = np.where(np.isnan(position), 0.0, position)
    # Sort by series, then position, then table order: each series becomes one contiguous run.
    order = np.lexsort((np.arange(n), position, keys))
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    ends = np.r_[starts[1:], n]
    return [order[start:end] for start, end in zip(starts, ends)]


def pack(values: np.ndarray, runs: list[np.ndarray], length: int | None = None,
         fill: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(S, T, D) float32 values of each series' rows in order, padded with `fill`, and the
    (S, T) float32 mask (1 = a real slice). T = `length`, default the longest series; a series
    longer than `length` is a ValueError (never cut silently)."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim == 1:
        values = values[:, None]
    longest = max((len(run) for run in runs), default=0)
    t = longest if length is None else int(length)
    if longest > t:
        raise ValueError(f"a series has {longest} slices, more than the length {t} to pack into")
    out = np.full((len(runs), t, values.shape[1]), fill, dtype=np.float32)
    mask = np.zeros((len(runs), t), dtype=np.float32)
    for i, run in enumerate(runs):
        out[i, :len(run)] = values[run]
        mask[i, :len(run)] = 1.0
    return out, mask


def unpack(packed: np.ndarray, runs: list[np.ndarray], n_rows: int) -> np.ndarray:
    """The inverse of `pack`: (S, T, K) per-step values -> (n_rows, K) per table row. Rows in no
    run are NaN."""
    packed = np.asarray(packed)
    out = np.full((n_rows, packed.shape[-1]), np.nan, dtype=np.float32)
    for i, run in enumerate(runs):
        out[run] = packed[i, :len(run)]
    return out


def series_labels(labels: np.ndarray, runs: list[np.ndarray]) -> np.ndarray:
    """(S, K) label of each series: 1 where any of its slices is positive (a study is positive
    for a label when any slice is)."""
    labels = np.asarray(labels, dtype=np.float32)
    return np.stack([labels[run].max(axis=0) for run in runs]) if runs else np.zeros((0, labels.shape[1]), np.float32)
