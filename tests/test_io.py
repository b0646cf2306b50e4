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
