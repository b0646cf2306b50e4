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
from ich.data.arrays import sorted_unique


def patient_label_matrix(patients: pd.Series, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Collapse image labels to one row per patient (max over the patient's images).

    Returns (unique patient ids, sorted; matrix of shape (n_patients, n_labels)).
    """
    _, patient_ids, matrix = _patient_codes(patients, labels)
    return patient_ids, matrix


def _patient_codes(patients, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(code of each image's patient, sorted unique patient ids, per-patient max of `labels`).

    On integer codes (issue 11: flat memory): no table indexed by patient id strings."""
    codes, patient_ids = pd.factorize(pd.Series(patients), sort=True)
    labels = np.asarray(labels)
    matrix = np.zeros((len(patient_ids), labels.shape[1]), dtype=labels.dtype)
    if len(labels):
        matrix[:] = labels.min(axis=0)  # the max over no images is never read: every patient has one
        np.maximum.at(matrix, codes, labels)
    return codes, np.asarray(patient_ids, dtype=object), matrix


def assign_splits(patients: pd.Series, labels: np.ndarray, fractions: tuple[float, float, float],
                  seed: int, unplaced: list | None = None) -> np.ndarray:
    """Split names ('train', 'val', 'test') for each image, grouped by patient and stratified.

    `fractions` are of patients, for train, val and test; a zero fraction yields an empty split.
    Needs at least one patient for each non-zero fraction. Every non-empty split then gets at
    least one positive patient for each label (column order: `any` first) wherever there are
    enough positive patients, by swapping patients between splits (sizes stay); the
    (label column, split) pairs that could not be covered are appended to `unplaced`.
    """
    codes, patient_ids, matrix = _patient_codes(patients, labels)
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
    missed = cover_positives(assignment, matrix, rng)
    if unplaced is not None:
        unplaced.extend(missed)
    return assignment[codes]


def cover_positives(assignment: np.ndarray, matrix: np.ndarray,
                    rng: np.random.Generator) -> list[tuple[int, str]]:
    """Swap patients (in place) so that each non-empty split has a positive patient per label.

    Labels are taken in column order and splits in SPLITS order. A split lacking a positive
    for label j takes one from a split that has two or more, giving back a patient negative for
    j; neither move may take the last positive of an already covered label from a split.
    Returns the (label column, split) pairs left without a positive patient (labels without
    any positive patient are not listed).
    """
    splits = [name for name in SPLITS if (assignment == name).any()]
    positive = np.asarray(matrix) > 0
    missed = []

    def sole_positive_of(i: int, split: str, upto: int) -> bool:
        """Is patient i the only positive of some label < upto (or label upto itself) in split?"""
        members = assignment == split
        for k in range(upto + 1):
            if positive[i, k] and (positive[:, k] & members).sum() == 1:
                return True
        return False

    for j in range(positive.shape[1]):
        if not positive[:, j].any():
            continue  # no positive patient at all: nothing to place
        for name in splits:
            if (positive[:, j] & (assignment == name)).any():
                continue
            donors = [i for i in rng.permutation(len(assignment))
                      if positive[i, j] and assignment[i] != name
                      and (positive[:, j] & (assignment == assignment[i])).sum() >= 2
                      and not sole_positive_of(i, assignment[i], j - 1)]
            partners = [i for i in rng.permutation(len(assignment))
                        if assignment[i] == name and not positive[i, j]
                        and not sole_positive_of(i, name, j - 1)]
            if not donors or not partners:
                missed.append((j, name))
                continue
            # The least positive patients move: they disturb the other labels' balance least.
            donor = min(donors, key=lambda i: positive[i].sum())
            partner = min(partners, key=lambda i: positive[i].sum())
            assignment[partner], assignment[donor] = assignment[donor], name
    return missed


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


def split_summary(split: np.ndarray, patients: np.ndarray, labels: np.ndarray,
                  label_columns: list[str]) -> pd.DataFrame:
    """Per split: images, patients and positives per label (rows in SPLITS order), of images
    given as arrays: `split` names, `patients` (ids or integer codes) and `labels` (one column
    per label_columns). On numpy arrays (issue 11: flat memory; a pandas frame of 752,803 split
    names and its per-split masks took about 90 MB)."""
    split, patients, labels = np.asarray(split), np.asarray(patients), np.asarray(labels)
    rows = []
    for name in SPLITS:
        member = split == name
        row = {"split": name, "images": int(member.sum()),
               "patients": len(sorted_unique(patients[member]))}
        row.update({label: int(labels[member, j].sum()) for j, label in enumerate(label_columns)})
        rows.append(row)
    return pd.DataFrame(rows)
