"""long_to_wide parses the long table in slices (flat memory): the result does not depend on
where the slices cut, duplicates and conflicts are found across slices, and a bad row is named
by its row in the whole file."""

import pyarrow as pa
import pytest

from ich.constants import LABELS, RSNA_ORDER
from ich.data import labels


def long_table(rows):
    return pa.table({"ID": pa.array([r[0] for r in rows], pa.string()),
                     "Label": pa.array([r[1] for r in rows], pa.int8())})


def rows_of(image_id, positives=()):
    return [(f"{image_id}_{sub}", int(sub in positives or (sub == "any" and bool(positives))))
            for sub in RSNA_ORDER]


ROWS = (rows_of("ID_00c", ["subdural"]) + rows_of("ID_00a") + rows_of("ID_0b", ["epidural", "subdural"])
        + rows_of("ID_00a"))   # ID_00a listed twice, as 4 images are in RSNA


@pytest.mark.parametrize("slice_rows", [1, 4, 7, 500_000])
def test_slices_give_the_same_table(monkeypatch, slice_rows):
    monkeypatch.setattr(labels, "_SLICE_ROWS", slice_rows)
    wide = labels.long_to_wide(long_table(ROWS))
    assert wide["image_id"].tolist() == ["ID_00a", "ID_00c", "ID_0b"]
    assert list(wide.columns) == ["image_id", *LABELS]
    by_id = wide.set_index("image_id")
    assert by_id.loc["ID_00a"].tolist() == [0] * 6
    assert by_id.loc["ID_00c", "subdural"] == 1 and by_id.loc["ID_00c", "any"] == 1
    assert by_id.loc["ID_0b", ["any", "epidural", "subdural", "subarachnoid"]].tolist() == [1, 1, 1, 0]
    assert labels.duplicate_row_count(long_table(ROWS)) == 6   # ID_00a's six rows, again
    assert labels.duplicate_row_count(long_table(ROWS[:12])) == 0


def test_conflict_across_slices_and_row_numbers(monkeypatch):
    monkeypatch.setattr(labels, "_SLICE_ROWS", 4)
    conflicting = ROWS + [("ID_00c_subdural", 0)]
    with pytest.raises(labels.LabelError, match="conflicting duplicate labels for 1 image.*ID_00c"):
        labels.long_to_wide(long_table(conflicting))
    bad = ROWS[:9] + [("ID_zz_any", 1)] + ROWS[9:]
    with pytest.raises(labels.LabelError, match=r"data row 10 has ID 'ID_zz_any'"):
        labels.long_to_wide(long_table(bad))
    with pytest.raises(labels.LabelError, match="1 image.* lack some .*ID_00d"):
        labels.long_to_wide(long_table(ROWS + [("ID_00d_any", 0)]))


@pytest.mark.parametrize("block_bytes", [64, 1 << 24])
def test_read_wide_streams_the_csv_into_the_same_table(tmp_path, monkeypatch, block_bytes):
    """The streamed reader (record batches of block_bytes) gives long_to_wide's table of the
    whole file, its row count and its duplicated rows; a bad row is named by its row in the
    whole file; a header alone gives an empty table."""
    import pandas as pd

    csv = tmp_path / "train.csv"
    csv.write_text("ID,Label\n" + "".join(f"{i},{v}\n" for i, v in ROWS * 30))
    monkeypatch.setattr(labels, "_BLOCK_BYTES", block_bytes)
    wide, rows, duplicates = labels.read_wide(csv)
    pd.testing.assert_frame_equal(wide, labels.long_to_wide(labels.read_long_csv(csv)))
    assert (rows, duplicates) == (len(ROWS) * 30, len(ROWS) * 30 - 18)
    csv.write_text("ID,Label\n" + "".join(f"{i},{v}\n" for i, v in ROWS * 30) + "ID_x_dural,1\n")
    with pytest.raises(labels.LabelError, match=f"data row {len(ROWS) * 30 + 1} "):
        labels.read_wide(csv)
    csv.write_text("ID,Label\n")
    wide, rows, duplicates = labels.read_wide(csv)
    assert (len(wide), rows, duplicates) == (0, 0, 0) and list(wide.columns) == ["image_id", *LABELS]


@pytest.mark.parametrize("block_bytes", [7, 64, 1 << 24])
def test_read_wide_cuts_blocks_at_line_ends_whatever_the_file_looks_like(tmp_path, monkeypatch, block_bytes):
    """Blocks cut by hand at line ends: Windows line ends, a byte-order mark, an extra column
    before ID and no line end after the last row give the table of the whole file."""
    import pandas as pd

    monkeypatch.setattr(labels, "_BLOCK_BYTES", block_bytes)
    csv = tmp_path / "train.csv"
    body = "".join(f"x{k},{i},{v}\r\n" for k, (i, v) in enumerate(ROWS * 3))
    csv.write_bytes(("\ufeffextra,ID,Label\r\n" + body).rstrip("\r\n").encode())
    wide, rows, duplicates = labels.read_wide(csv)
    plain = tmp_path / "plain.csv"
    plain.write_text("ID,Label\n" + "".join(f"{i},{v}\n" for i, v in ROWS * 3))
    pd.testing.assert_frame_equal(wide, labels.read_wide(plain)[0])
    assert (rows, duplicates) == (len(ROWS) * 3, len(ROWS) * 3 - 18)
    csv.write_bytes(b"")
    with pytest.raises(labels.LabelError, match="empty file"):
        labels.read_wide(csv)
    csv.write_text("ID,Lable\nID_00a_any,1\n")
    with pytest.raises(labels.LabelError, match="expected an RSNA CSV with columns ID,Label"):
        labels.read_wide(csv)
