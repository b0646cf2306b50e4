"""ich.stamps: the identity of a folder is a digest of its listing, flat in memory."""

import hashlib

from ich import stamps


def _listing(entries):
    digest = hashlib.sha1()
    for name, size in sorted(entries):
        digest.update(f"{name}\0{size}\n".encode())
    return "dir:" + digest.hexdigest()


def test_folder_identity_is_the_digest_of_its_sorted_listing(tmp_path, monkeypatch):
    (tmp_path / "b.dcm").write_bytes(b"12345")
    (tmp_path / "a.dcm").write_bytes(b"")
    (tmp_path / "é.dcm").write_bytes(b"xy")
    (tmp_path / "Z.dcm").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / ".a.dcm.tmp").write_bytes(b"hidden")
    expected = _listing([("a.dcm", 0), ("b.dcm", 5), ("é.dcm", 2), ("Z.dcm", 1), ("sub", -1)])
    assert stamps.identity(tmp_path) == expected
    # Blocks of two entries, merged: the same digest as one block.
    monkeypatch.setattr(stamps, "_LIST_BLOCK", 2)
    assert stamps.identity(tmp_path) == expected


def test_folder_identity_changes_exactly_when_an_entry_is_added_removed_or_resized(tmp_path):
    (tmp_path / "a.dcm").write_bytes(b"1")
    (tmp_path / "b.dcm").write_bytes(b"22")
    before = stamps.identity(tmp_path)
    (tmp_path / "b.dcm").write_bytes(b"33")            # same size: same listing
    (tmp_path / ".c.dcm.tmp").write_bytes(b"temporary")  # dot-named: never an input
    assert stamps.identity(tmp_path) == before
    (tmp_path / "b.dcm").write_bytes(b"333")
    resized = stamps.identity(tmp_path)
    assert resized != before
    (tmp_path / "c.dcm").write_bytes(b"")
    added = stamps.identity(tmp_path)
    assert added not in (before, resized)
    (tmp_path / "c.dcm").unlink()
    assert stamps.identity(tmp_path) == resized
    assert stamps.identity(tmp_path / "missing") is None


def test_must_run_says_why_or_that_the_output_is_up_to_date(tmp_path, caplog):
    out = tmp_path / "out.csv"
    stamp = stamps.Stamp("split", tmp_path, settings={"seed": 1}, outputs=[out])
    with caplog.at_level("INFO", logger="ich"):
        assert stamps.must_run("split", stamp, False, out)
        out.write_text("x")
        stamps.record(stamp)
        assert not stamps.must_run("split", stamp, False, out)
        assert stamps.must_run("split", stamp, True, out)
        assert stamps.must_run("split", stamp, False, out, also="--retry-failed")
        other = stamps.Stamp("split", tmp_path, settings={"seed": 2}, outputs=[out])
        assert stamps.must_run("split", other, False, out, also="--retry-failed")
    assert [r.getMessage() for r in caplog.records] == [
        "split: running (never run)", f"split: {out} is up to date (use --force to redo)",
        "split: running (forced)", "split: running (--retry-failed)",
        "split: running (settings changed: seed)"]
