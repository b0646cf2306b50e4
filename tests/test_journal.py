"""ich.journal: parts written sorted and whole, merged back one row per key with the last
written winning, the same whether the runs stay in memory or are spilled and merged in levels."""

import csv

import pytest

from ich import journal
from ich.errors import StepError

COLUMNS = ("image_id", "path", "reason")


def _table(path, rows, columns=COLUMNS):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def _fill(tmp_path):
    """A previous table and five parts; ids and winners worked out by hand below."""
    table = _table(tmp_path / "images.csv", [("a", "png/a.png", ""), ("c", "png/c.png", ""),
                                             ("e", "png/e.png", "")])
    j = tmp_path / ".journal"
    journal.write_part(j, "1-0", COLUMNS, [{"image_id": "d", "path": "p1", "reason": "bad"},
                                           {"image_id": "b", "path": "p1", "reason": ""}], "image_id")
    journal.write_part(j, "1-1", COLUMNS, [{"image_id": "c", "path": "p2", "reason": "truncated"}], "image_id")
    journal.write_part(j, "2-0", COLUMNS, [{"image_id": "d", "path": "p3", "reason": ""},
                                           {"image_id": "f", "path": "p3", "reason": ""}], "image_id")
    journal.write_part(j, "2-1", COLUMNS, [{"image_id": "b", "path": "p4", "reason": "late"}], "image_id")
    journal.write_part(j, "2-2", COLUMNS, [{"image_id": "g", "path": "p5", "reason": ""}], "image_id")
    return table, j


# a: table only; b: part 1-0 then 2-1 (2-1 wins); c: table then 1-1; d: 1-0 then 2-0;
# e: table only; f: 2-0; g: 2-2.
EXPECTED = [("a", "png/a.png", ""), ("b", "p4", "late"), ("c", "p2", "truncated"),
            ("d", "p3", ""), ("e", "png/e.png", ""), ("f", "p3", ""), ("g", "p5", "")]


def test_a_part_is_written_sorted_by_its_key(tmp_path):
    _, j = _fill(tmp_path)
    first = journal.parts(j)[0]
    assert first.name == "1-0.csv"
    assert [r["image_id"] for r in journal.read_rows(first, COLUMNS)] == ["b", "d"]
    assert [p.name for p in journal.parts(j)] == ["1-0.csv", "1-1.csv", "2-0.csv", "2-1.csv", "2-2.csv"]


def test_latest_keeps_the_last_written_row_of_each_key(tmp_path):
    table, j = _fill(tmp_path)
    rows = list(journal.latest([table], j, COLUMNS, "image_id"))
    assert [tuple(r[c] for c in COLUMNS) for r in rows] == EXPECTED


def test_spilled_runs_merged_in_levels_give_the_same_rows(tmp_path, monkeypatch):
    # Runs of 2 rows: parts (2, 1, 2, 1, 1 rows) make 3 runs, and a fan-in of 2 merges those
    # down a level first.
    monkeypatch.setattr(journal, "RUN_ROWS", 2)
    monkeypatch.setattr(journal, "FAN_IN", 2)
    table, j = _fill(tmp_path)
    rows = list(journal.latest([table], j, COLUMNS, "image_id"))
    assert [tuple(r[c] for c in COLUMNS) for r in rows] == EXPECTED
    assert not (j / journal.SCRATCH).exists()


def test_missing_columns_read_as_empty_and_missing_files_as_nothing(tmp_path):
    table = _table(tmp_path / "t.csv", [("x", "png/x.png")], columns=("image_id", "path"))
    assert list(journal.read_rows(table, COLUMNS)) == [{"image_id": "x", "path": "png/x.png", "reason": ""}]
    assert list(journal.read_rows(tmp_path / "absent.csv", COLUMNS)) == []
    assert list(journal.latest([tmp_path / "absent.csv"], tmp_path / "j", COLUMNS, "image_id")) == []


def test_an_unsorted_table_is_named(tmp_path):
    table = _table(tmp_path / "images.csv", [("b", "", ""), ("a", "", "")])
    with pytest.raises(StepError, match=r"images.csv is not sorted by image_id \(line 3\)"):
        list(journal.latest([table], tmp_path / "j", COLUMNS, "image_id"))


def test_write_rows_counts_and_reset_forgets_the_parts(tmp_path):
    assert journal.write_rows(tmp_path / "out.csv", COLUMNS, iter([{"image_id": "a", "extra": 1}])) == 1
    assert (tmp_path / "out.csv").read_text().splitlines() == ["image_id,path,reason", "a,,"]
    _, j = _fill(tmp_path)
    journal.reset(j)
    assert journal.parts(j) == []
