"""ich.io: atomic writes leave the file with the mode a plain open() gives (the umask's), not
mkstemp's private 0600."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
WRITE = """
import os, sys
os.umask(int(sys.argv[1], 8))          # before ich.io reads it at import
from ich.io import atomic_write_text, write_json
atomic_write_text(sys.argv[2] + "/a.txt", "x")
write_json({"a": 1}, sys.argv[2] + "/b.json")
with open(sys.argv[2] + "/plain.txt", "w") as handle:
    handle.write("x")
"""


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
@pytest.mark.parametrize("umask, mode", [("022", 0o644), ("077", 0o600), ("002", 0o664)])
def test_an_atomic_write_gets_the_umasks_mode(tmp_path, umask, mode):
    env = dict(os.environ, PYTHONPATH=SRC)
    subprocess.run([sys.executable, "-c", WRITE, umask, str(tmp_path)], check=True, env=env)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"a.txt": mode, "b.json": mode, "plain.txt": mode}


def test_write_csv_in_blocks_writes_the_bytes_of_one_to_csv(tmp_path, monkeypatch):
    import pandas as pd

    from ich import io

    frame = pd.DataFrame({"a": ["=x", "b,c", 'd"e', None, "-1.5"] * 3, "b": [0.1 * k for k in range(15)]})
    io.write_csv(frame, tmp_path / "whole.csv")
    monkeypatch.setattr(io, "CSV_BLOCK_ROWS", 4)
    io.write_csv(frame, tmp_path / "blocks.csv")
    assert (tmp_path / "whole.csv").read_bytes() == (tmp_path / "blocks.csv").read_bytes()
    io.write_csv(frame.iloc[:0], tmp_path / "empty.csv")
    assert (tmp_path / "empty.csv").read_text() == "a,b\n"


# Values that a spreadsheet would run, values that look escaped already, and plain ones.
TRICKY = ["=HYPERLINK(\"x\")", "'=x", "''", "'", "-1.5", "'-1.5", "+3", "-", "@a", "\tx", "abc",
          "'abc", "ID_=x"]


def test_formula_cells_are_escaped_on_disk_and_read_back_as_they_were(tmp_path):
    import pandas as pd
    import pyarrow.csv as pacsv

    from ich import io, journal

    # On disk: a leading apostrophe before =, +, -, @, tab (numbers left alone), and one more
    # before an apostrophe that would otherwise be taken for the escape.
    assert [io.safe_cell(v) for v in TRICKY] == [
        "'=HYPERLINK(\"x\")", "''=x", "'''", "'", "-1.5", "''-1.5", "+3", "'-", "'@a", "'\tx", "abc",
        "'abc", "ID_=x"]
    frame = pd.DataFrame({"patient_id": TRICKY, "n": range(len(TRICKY))})
    io.write_csv(frame, tmp_path / "t.csv")
    assert "\n=" not in (tmp_path / "t.csv").read_text()
    back = io.read_csv(tmp_path / "t.csv", dtype={"patient_id": str})
    assert back["patient_id"].tolist() == TRICKY and back["n"].tolist() == list(range(len(TRICKY)))
    table = io.read_arrow_cells(pacsv.read_csv(tmp_path / "t.csv"))
    assert table["patient_id"].to_pylist() == TRICKY
    # The journals (preprocess, index) escape and unescape alike.
    journal.write_rows(tmp_path / "j.csv", ["patient_id"], [{"patient_id": v} for v in TRICKY])
    assert "\n=" not in (tmp_path / "j.csv").read_text()
    assert [row["patient_id"] for row in journal.read_rows(tmp_path / "j.csv", ["patient_id"])] == TRICKY


def test_arrow_columns_without_an_escaped_cell_are_kept_as_they_are(tmp_path):
    """read_arrow_cells copies only the columns that hold an escaped cell."""
    import pyarrow as pa

    from ich import io

    table = pa.table({"plain": ["ID_1", "-1.5", None], "escaped": ["ID_1", "'=x", None], "n": [1, 2, 3]})
    back = io.read_arrow_cells(table)
    assert back["plain"].chunks[0].buffers()[2].address == table["plain"].chunks[0].buffers()[2].address
    assert back["escaped"].to_pylist() == ["ID_1", "=x", None]
    assert back["plain"].to_pylist() == ["ID_1", "-1.5", None]
