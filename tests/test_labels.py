"""labels: long CSV -> wide table, duplicates, conflicts, balanced sampling (hand-made tables)."""

import numpy as np
import pandas as pd
import pytest

from ich.data import labels
from ich.constants import LABELS, RSNA_ORDER


def write_long(path, rows):
    """rows: list of (image_id, {subtype: label}) -> RSNA long CSV in RSNA row order."""
    lines = ["ID,Label"]
    for image_id, labs in rows:
        lines += [f"{image_id}_{s},{labs.get(s, 0)}" for s in RSNA_ORDER]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_long_to_wide_hand_made(tmp_path):
    csv = write_long(tmp_path / "l.csv", [
        ("ID_00000000b", {"subdural": 1, "any": 1}),
        ("ID_00000000a", {}),
        ("ID_00000000c", {"epidural": 1, "intraventricular": 1, "any": 1}),
    ])
    wide = labels.long_to_wide(labels.read_long_csv(csv))
    assert list(wide.columns) == ["image_id", *LABELS]
    assert wide["image_id"].tolist() == ["ID_00000000a", "ID_00000000b", "ID_00000000c"]
    assert wide.iloc[0, 1:].tolist() == [0, 0, 0, 0, 0, 0]
    assert wide.iloc[1, 1:].tolist() == [1, 0, 0, 0, 0, 1]
    assert wide.iloc[2, 1:].tolist() == [1, 1, 0, 1, 0, 0]


def test_exact_duplicates_are_dropped(tmp_path):
    csv = write_long(tmp_path / "l.csv", [("ID_0a", {"any": 1, "subdural": 1}), ("ID_0b", {}),
                                          ("ID_0a", {"any": 1, "subdural": 1})])
    table = labels.read_long_csv(csv)
    assert labels.duplicate_row_count(table) == 6
    wide = labels.long_to_wide(table)
    assert len(wide) == 2 and wide.loc[wide.image_id == "ID_0a", "subdural"].item() == 1


def test_conflicting_duplicates_name_the_ids(tmp_path):
    csv = write_long(tmp_path / "l.csv", [("ID_0a", {"any": 1, "subdural": 1}), ("ID_0a", {})])
    with pytest.raises(labels.LabelError, match="conflicting.*ID_0a"):
        labels.long_to_wide(labels.read_long_csv(csv))


@pytest.mark.parametrize("body, message", [
    ("ID_0a_epidural,0\nnonsense,1\n", "row 2.*nonsense"),
    ("ID_0a_epidurall,0\n", "unknown subtype"),
    ("ID_0a_epidural,2\n", "Label 2"),
    ("ID_0a_epidural,0\n", "lack some of the six"),
])
def test_bad_rows_are_named(tmp_path, body, message):
    csv = tmp_path / "l.csv"
    csv.write_text("ID,Label\n" + body)
    with pytest.raises(labels.LabelError, match=message):
        labels.long_to_wide(labels.read_long_csv(csv))


def test_missing_file_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="paths.labels_csv"):
        labels.read_long_csv(tmp_path / "nope.csv")


def make_wide(n_per_label: dict, n_neg: int) -> pd.DataFrame:
    rows, k = [], 0
    for label, n in n_per_label.items():
        for _ in range(n):
            row = dict.fromkeys(LABELS, 0)
            row.update({label: 1, "any": 1, "image_id": f"ID_{k:09x}"})
            rows.append(row)
            k += 1
    for _ in range(n_neg):
        rows.append({**dict.fromkeys(LABELS, 0), "image_id": f"ID_{k:09x}"})
        k += 1
    return pd.DataFrame(rows)[["image_id", *LABELS]]


def test_balanced_sample_counts_and_seed():
    wide = make_wide({"epidural": 3, "intraparenchymal": 20, "intraventricular": 20,
                      "subarachnoid": 20, "subdural": 20}, n_neg=50)
    sample = labels.balanced_sample(wide, per_label=10, seed=1)
    counts = labels.label_counts(sample)
    # All 3 epidurals (fewer than 10 exist), 10 of each other subtype, 10 negatives.
    assert counts["epidural"] == 3
    assert [counts[s] for s in LABELS[2:]] == [10, 10, 10, 10]
    assert counts["negatives"] == 10 and counts["images"] == 53
    assert sample["image_id"].is_monotonic_increasing
    again = labels.balanced_sample(wide, per_label=10, seed=1)
    other = labels.balanced_sample(wide, per_label=10, seed=2)
    assert again.equals(sample) and not other.equals(sample)


def test_sample_multilabel_images_counted_once_and_exclusions():
    wide = make_wide({"subdural": 4}, n_neg=4)
    wide.loc[0, "epidural"] = 1  # one image positive for two subtypes
    sample = labels.balanced_sample(wide, per_label=10, seed=0, exclude=["ID_000000007"])
    assert len(sample) == 7 and "ID_000000007" not in set(sample.image_id)


def test_any_mismatch_detected():
    wide = make_wide({"subdural": 2}, n_neg=1)
    wide.loc[1, "any"] = 0
    assert labels.any_mismatches(wide).tolist() == ["ID_000000001"]
