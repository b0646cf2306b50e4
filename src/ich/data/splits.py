"""Patient-grouped, multi-label-stratified train/val/test assignment.

In: one patient id and one label vector per image. Out: a split name per image. Every image of a
patient lands in the same split (RSNA patients have up to 15 studies: splitting by image or
study leaks). Within that constraint, splits are stratified on per-patient label vectors
(1 where any of the patient's images is positive) by iterative stratification (Sechidis et al.
2011, the `iterative-stratification` package), which keeps rare labels such as epidural
represented in every split.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

from ich.constants import SPLITS


def patient_label_matrix(patients: pd.Series, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Collapse image labels to one row per patient (max over the patient's images).

    Returns (unique patient ids, matrix of shape (n_patients, n_labels)).
    """
    frame = pd.DataFrame(np.asarray(labels), index=np.asarray(patients))
    grouped = frame.groupby(level=0, sort=True).max()
    return grouped.index.to_numpy(), grouped.to_numpy()


def assign_splits(patients: pd.Series, labels: np.ndarray, fractions: tuple[float, float, float],
                  seed: int) -> np.ndarray:
    """Split names ('train', 'val', 'test') for each image, grouped by patient and stratified.

    `fractions` are of patients, for train, val and test; a zero fraction yields an empty split.
    Needs at least one patient for each non-zero fraction.
    """
    patient_ids, matrix = patient_label_matrix(patients, labels)
    needed = sum(f > 0 for f in fractions)
    if len(patient_ids) < needed:
        raise ValueError(f"{len(patient_ids)} patient(s) cannot fill {needed} non-empty splits; "
                         "add data or set split.fractions with zeros")
    _, val_frac, test_frac = fractions
    rng = np.random.default_rng(seed)
    assignment = np.full(len(patient_ids), "train", dtype=object)
    rest = np.arange(len(patient_ids))
    # Test first, then val out of what remains, each with its share of the remainder.
    for name, frac, remaining in (("test", test_frac, 1.0), ("val", val_frac, 1.0 - test_frac)):
        share = frac / remaining if remaining > 0 else 0.0
        n_take = int(round(share * len(rest)))
        if frac > 0:
            n_take = min(max(n_take, 1), len(rest) - (1 if fractions[0] > 0 else 0))
        if n_take <= 0:
            continue
        if n_take >= len(rest):
            assignment[rest] = name
            rest = rest[:0]
            continue
        splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=n_take, random_state=seed)
        keep, take = next(splitter.split(np.zeros(len(rest)), matrix[rest]))
        keep, take = _exact_size(keep, take, n_take, rng)
        assignment[rest[take]] = name
        rest = rest[keep]
    by_patient = dict(zip(patient_ids, assignment))
    return np.array([by_patient[p] for p in np.asarray(patients)], dtype=object)


def _exact_size(keep: np.ndarray, take: np.ndarray, n_take: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Move random patients between `keep` and `take` until `take` has n_take of them.

    Iterative stratification can miss the requested size on small or uniform label matrices
    (it returned an empty test set for 10 patients who were all positive for `any`).
    """
    if len(take) < n_take:
        moved = rng.choice(len(keep), size=n_take - len(take), replace=False)
        take = np.concatenate([take, keep[moved]])
        keep = np.delete(keep, moved)
    elif len(take) > n_take:
        moved = rng.choice(len(take), size=len(take) - n_take, replace=False)
        keep = np.concatenate([keep, take[moved]])
        take = np.delete(take, moved)
    return keep, take


def split_summary(frame: pd.DataFrame, label_columns: list[str]) -> pd.DataFrame:
    """Per split: images, patients and positives per label (rows in SPLITS order)."""
    rows = []
    for name in SPLITS:
        part = frame[frame["split"] == name]
        row = {"split": name, "images": len(part), "patients": part["patient_id"].nunique()}
        row.update({label: int(part[label].sum()) for label in label_columns})
        rows.append(row)
    return pd.DataFrame(rows)
