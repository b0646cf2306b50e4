"""splits: patient grouping, stratification, fractions, determinism."""

import numpy as np
import pandas as pd
import pytest

from ich.data.splits import assign_splits, patient_label_matrix, split_summary


def test_patient_label_matrix_is_max_over_images():
    ids, matrix = patient_label_matrix(pd.Series(["b", "a", "b"]), np.array([[1, 0], [0, 0], [0, 1]]))
    assert ids.tolist() == ["a", "b"]
    assert matrix.tolist() == [[0, 0], [1, 1]]


def random_dataset(n_images=3000, n_patients=600, seed=0):
    rng = np.random.default_rng(seed)
    patients = pd.Series([f"P{p}" for p in rng.integers(0, n_patients, n_images)])
    labels = (rng.random((n_images, 6)) < [0.4, 0.03, 0.15, 0.15, 0.15, 0.15]).astype(int)
    return patients, labels


def test_no_patient_in_two_splits_and_fractions():
    patients, labels = random_dataset()
    splits = assign_splits(patients, labels, (0.8, 0.1, 0.1), seed=0)
    frame = pd.DataFrame({"patient_id": patients, "split": splits})
    assert frame.groupby("patient_id")["split"].nunique().max() == 1
    share = frame.drop_duplicates("patient_id")["split"].value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.8, abs=0.02)
    assert share["val"] == pytest.approx(0.1, abs=0.02)
    assert share["test"] == pytest.approx(0.1, abs=0.02)


def test_rare_label_reaches_every_split():
    patients, labels = random_dataset()
    splits = assign_splits(patients, labels, (0.8, 0.1, 0.1), seed=0)
    frame = pd.DataFrame(labels, columns=list("abcdef")).assign(split=splits, patient_id=patients)
    table = split_summary(splits, patients, labels, list("abcdef")).set_index("split")
    # Patient-level positives of the rare label split close to 80/10/10.
    rare = frame[frame.b == 1].drop_duplicates("patient_id")["split"].value_counts(normalize=True)
    assert rare["val"] == pytest.approx(0.1, abs=0.04) and rare["test"] == pytest.approx(0.1, abs=0.04)
    assert (table["b"] > 0).all()


def test_seeded():
    patients, labels = random_dataset(500, 100)
    a = assign_splits(patients, labels, (0.8, 0.1, 0.1), seed=5)
    b = assign_splits(patients, labels, (0.8, 0.1, 0.1), seed=5)
    c = assign_splits(patients, labels, (0.8, 0.1, 0.1), seed=6)
    assert (a == b).all() and not (a == c).all()


def test_tiny_and_zero_fractions():
    patients = pd.Series(["p1", "p2", "p3"])
    labels = np.array([[1, 0], [0, 0], [1, 1]])
    assert sorted(assign_splits(patients, labels, (0.8, 0.1, 0.1), 0)) == ["test", "train", "val"]
    assert set(assign_splits(patients, labels, (1.0, 0.0, 0.0), 0)) == {"train"}
    with pytest.raises(ValueError, match="2 patient"):
        assign_splits(pd.Series(["p1", "p1", "p2"]), np.zeros((3, 2)), (0.8, 0.1, 0.1), 0)


def test_uniform_labels_still_fill_every_split():
    # Iterative stratification alone returns an empty split here (every patient positive for `any`).
    patients = pd.Series([f"p{k % 10}" for k in range(28)])
    labels = np.zeros((28, 6), dtype=int)
    labels[:, 0] = 1
    labels[np.arange(28), 1 + np.arange(28) % 5] = 1
    splits = assign_splits(patients, labels, (0.8, 0.1, 0.1), seed=42)
    per_patient = pd.DataFrame({"p": patients, "s": splits}).drop_duplicates("p")["s"].value_counts()
    assert per_patient.to_dict() == {"train": 8, "val": 1, "test": 1}


def _twelve_patients():
    """Twelve patients of two images each; patients 0-5 positive for `any` (and subdural)."""
    patients = pd.Series([f"P{i:02d}" for i in range(12) for _ in range(2)])
    labels = np.zeros((24, 6), dtype=int)
    for i in range(6):
        labels[2 * i, 0] = labels[2 * i, 5] = 1
    labels[0, 1] = 1          # epidural: one patient only, so it cannot reach every split
    return patients, labels


@pytest.mark.parametrize("seed", range(12))
def test_twelve_patients_six_positive_every_split_gets_a_positive(seed):
    patients, labels = _twelve_patients()
    unplaced: list = []
    split = assign_splits(patients, labels, (0.8, 0.1, 0.1), seed, unplaced)
    for name in ("train", "val", "test"):
        part = split == name
        assert labels[part, 0].any(), f"{name} has no positive patient for any (seed {seed})"
        assert labels[part, 5].any(), f"{name} has no positive patient for subdural (seed {seed})"
    assert pd.Series(split).groupby(patients.to_numpy()).nunique().max() == 1   # patients whole
    assert sorted(pd.Series(split).value_counts().to_dict().items()) == \
        [("test", 2), ("train", 20), ("val", 2)]                            # sizes unchanged
    # The one epidural patient can be in one split only: the other two are reported.
    assert sorted(j for j, _ in unplaced) == [1, 1]
    assert {name for _, name in unplaced} | {split[0]} == {"train", "val", "test"}


def _grouped_patient_matrix(patients, labels):
    """The per-patient matrix as it was computed before issue 11 (pandas groupby on the ids)."""
    frame = pd.DataFrame(np.asarray(labels), index=np.asarray(patients))
    grouped = frame.groupby(level=0, sort=True).max()
    return grouped.index.to_numpy(), grouped.to_numpy()


def test_patient_codes_give_the_groupby_matrix_in_the_same_patient_order():
    rng = np.random.default_rng(3)
    names = np.array(["ID_b", "ID_a", "ID_Z", "ID_é", "ID_10", "ID_9", "=p", "ID_a "])
    patients = pd.Series(rng.choice(names, size=500), dtype="str")
    labels = rng.integers(0, 2, size=(500, 6)).astype(np.int64)
    ids, matrix = patient_label_matrix(patients, labels)
    ref_ids, ref_matrix = _grouped_patient_matrix(patients, labels)
    assert ids.tolist() == ref_ids.tolist()
    np.testing.assert_array_equal(matrix, ref_matrix)


def _pandas_split(work, cfg, out):
    """The split step as it was before issue 11: pandas reads, merge, dict map."""
    from ich.constants import LABELS
    from ich.io import write_csv

    images = pd.read_csv(work / "images.csv", usecols=["image_id", "patient_id", "study_id"], dtype=str)
    labels = pd.read_csv(work / "sampled.csv", dtype={"image_id": str})
    frame = images.merge(labels, on="image_id", how="inner", validate="one_to_one")
    targets = frame[frame["target"] == 1]
    assigned = assign_splits(targets["patient_id"], targets[list(LABELS)].to_numpy(),
                             tuple(cfg["split"]["fractions"]), cfg["seed"])
    frame["split"] = frame["patient_id"].map(dict(zip(targets["patient_id"], assigned)))
    frame = frame[frame["split"].notna()]
    frame = frame[["image_id", "split", "patient_id", "study_id", *LABELS, "target"]].sort_values("image_id")
    write_csv(frame, out)


def _split_inputs(work, rng, n=300):
    """images.csv and the sampled table (not written) of a small, awkward set: unlabelled
    images, context rows, images out of order, a missing study id, formula-like ids."""
    from ich.constants import LABELS

    work.mkdir()
    ids = [f"ID_{k:05x}" for k in rng.permutation(n)]
    images = pd.DataFrame({"image_id": ids, "patient_id": [f"ID_p{k % 40}" for k in range(n)],
                           "study_id": [f"ID_s{k % 55}" if k % 50 else "" for k in range(n)],
                           "position": rng.random(n)})
    images.loc[3, "patient_id"] = "-p3"
    images.to_csv(work / "images.csv", index=False)
    sampled = pd.DataFrame({"image_id": ids[:-20]})   # 20 images without labels
    for label in LABELS:
        sampled[label] = rng.integers(0, 2, len(sampled)).astype(np.int8)
    sampled["target"] = (rng.random(len(sampled)) < 0.8).astype(np.int8)
    sampled.loc[3, "target"] = 1   # the patient "-p3" has a target
    return sampled


def test_split_step_writes_what_the_pandas_merge_wrote(tmp_path):
    """Old and new split step on a small, awkward set: the same splits.csv, byte for byte."""
    from ich import config as config_mod
    from ich.io import write_csv
    from ich.steps import split as split_step

    work = tmp_path / "work"
    sampled = _split_inputs(work, np.random.default_rng(7))
    write_csv(sampled.sort_values("image_id"), work / "sampled.csv")
    cfg = config_mod.load(None, [f"paths.work_dir={work}"])
    split_step.run(cfg, force=True)
    _pandas_split(work, cfg, tmp_path / "reference.csv")
    assert (work / "splits.csv").read_bytes() == (tmp_path / "reference.csv").read_bytes()
    assert ",'-p3," in (work / "splits.csv").read_text()   # a formula-like id is escaped (ich.io.safe_cell)


def test_split_step_keeps_labels_that_are_not_small_integers(tmp_path):
    """Label cells that int8 cannot hold (300 in a context row, 0.5 in another) send the read
    back to inferred types: the values are written as pandas wrote them (0.5, 1.0, 300)."""
    from ich import config as config_mod
    from ich.io import write_csv
    from ich.steps import split as split_step

    work = tmp_path / "work"
    sampled = _split_inputs(work, np.random.default_rng(8))
    context = sampled.index[sampled["target"] == 0]
    sampled["epidural"] = sampled["epidural"].astype(np.int64)
    sampled.loc[context[0], "epidural"] = 300
    sampled["subdural"] = sampled["subdural"].astype(np.float64)
    sampled.loc[context[1], "subdural"] = 0.5
    write_csv(sampled, work / "sampled.csv")
    cfg = config_mod.load(None, [f"paths.work_dir={work}"])
    split_step.run(cfg, force=True)
    _pandas_split(work, cfg, tmp_path / "reference.csv")
    written = (work / "splits.csv").read_text()
    assert written == (tmp_path / "reference.csv").read_text()
    assert ",300," in written and ",0.5," in written and ",1.0," in written


def test_split_step_names_a_missing_label_column_and_an_empty_image_id(tmp_path):
    from ich import config as config_mod
    from ich.errors import StepError
    from ich.io import write_csv
    from ich.steps import split as split_step

    work = tmp_path / "work"
    sampled = _split_inputs(work, np.random.default_rng(9))
    cfg = config_mod.load(None, [f"paths.work_dir={work}"])
    write_csv(sampled.drop(columns="subarachnoid"), work / "sampled.csv")
    with pytest.raises(StepError, match="sampled.csv has no column subarachnoid"):
        split_step.run(cfg, force=True)
    sampled.loc[5, "image_id"] = ""
    write_csv(sampled, work / "sampled.csv")
    with pytest.raises(StepError, match="sampled.csv: empty image_id in data row 6"):
        split_step.run(cfg, force=True)
    write_csv(pd.concat([sampled.iloc[6:], sampled.iloc[6:7]]), work / "sampled.csv")
    with pytest.raises(StepError, match="sampled.csv lists an image_id more than once"):
        split_step.run(cfg, force=True)
