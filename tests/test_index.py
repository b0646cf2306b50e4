"""The header index: rows from headers, ordering along the slice normal (tilted series
included), neighbours with edge repetition, failures, resume, and grouping for predict."""

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset

from ich import config as config_mod
from ich.data.index import (dataset_values, group_for_predict, header_row, neighbours, orientation_class,
                            rank_series, read_header)
from ich.steps import index as index_step
from ich.steps import index_consolidation as consolidation
from ich.synth.storage import SliceTags, Storage, build_dataset, encode, write

TILT = math.radians(30.0)
# Rows along x, columns tilted about x: the GE convention (the shared series: 18.5 degrees).
TILTED = (1.0, 0.0, 0.0, 0.0, math.cos(TILT), -math.sin(TILT))
NORMAL = np.array([0.0, math.sin(TILT), math.cos(TILT)])
COLUMN = np.array(TILTED[3:])
STORAGE = Storage("int16", -1024, False, False, (40, 80))


def _write_slice(path, image_id, position, orientation=TILTED, series="ID_5e71e5", study="ID_57d1"):
    tags = SliceTags(image_id, "ID_patient", study, series, "9999.1", tuple(position), orientation, 0.5)
    write(build_dataset(encode(np.zeros((8, 8), np.int16), STORAGE), STORAGE, tags), path)


def _tilted_positions(n=6, gap=5.0):
    """Slice k lies k * gap along the normal, but each corner is shifted in-plane so that the
    z coordinate of ImagePositionPatient runs in a different order from the slices."""
    shifts = [0.0, 40.0, -30.0, 25.0, -45.0, 10.0][:n]
    return [k * gap * NORMAL + shift * COLUMN + np.array([-100.0, -120.0, 30.0])
            for k, shift in enumerate(shifts)]


def _cfg(tmp_path, source, **index):
    cfg = config_mod.load(None, [f"paths.dicom_dir={source}", f"paths.work_dir={tmp_path / 'work'}",
                                 "index.workers=1"])
    cfg["index"].update(index)
    return cfg


def test_header_row_projects_the_position_on_the_slice_normal():
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3"
    ds.Modality = "CT"
    ds.ImageOrientationPatient = list(TILTED)
    ds.ImagePositionPatient = [10.0, 20.0, 30.0]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows, ds.Columns, ds.PixelSpacing = 512, 490, [0.45, 0.45]
    row = header_row(dataset_values(ds), "sub/ID_abc.dcm")
    # normal = (0, sin 30, cos 30): 20 * 0.5 + 30 * 0.8660254
    assert row["position"] == pytest.approx(10.0 + 30.0 * 0.8660254, abs=1e-6)
    assert (row["normal_x"], row["normal_y"], row["normal_z"]) == pytest.approx((0.0, 0.5, 0.8660254))
    assert row["image_id"] == "ID_abc" and row["file"] == "sub/ID_abc.dcm"
    assert row["image_type"] == "ORIGINAL\\PRIMARY\\AXIAL"
    assert (row["rows"], row["columns"], row["pixel_spacing"]) == (512, 490, 0.45)
    assert row["orientation"] == "1\\0\\0\\0\\0.866025\\-0.5"


def test_header_row_without_geometry_gives_nan_not_an_error():
    ds = Dataset()
    ds.Modality = "CT"
    row = header_row(dataset_values(ds), "ID_x.dcm")
    assert math.isnan(row["position"]) and math.isnan(row["normal_z"])
    assert row["rows"] == 0 and row["series_id"] == ""


def test_rank_follows_the_normal_not_z_on_a_tilted_series():
    positions = _tilted_positions()
    z_order = np.argsort([p[2] for p in positions]).tolist()
    assert z_order != list(range(len(positions)))  # z alone would sort this series wrongly
    rows = []
    for k, p in enumerate(positions):
        rows.append({"image_id": f"ID_{(7 * k) % 6}{k}", "series_id": "S", "position": float(p @ NORMAL)})
    rows.append({"image_id": "ID_nopos", "series_id": "S", "position": math.nan})
    ranked = rank_series(pd.DataFrame(rows))
    assert ranked["rank"].tolist() == [0, 1, 2, 3, 4, 5, -1]
    assert ranked["series_size"].tolist() == [6] * 6 + [0]


def test_index_step_orders_a_synthetic_tilted_series(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    positions = _tilted_positions()
    names = [f"ID_{h}" for h in ("f0", "a1", "c2", "e3", "b4", "d5")]  # names do not sort like slices
    for name, p in zip(names, positions):
        _write_slice(source / f"{name}.dcm", name, p)
    out = index_step.run(_cfg(tmp_path, source))
    table = pd.read_parquet(out).set_index("image_id")
    assert [table.loc[n, "rank"] for n in names] == list(range(6))
    gaps = np.diff([table.loc[n, "position"] for n in names])
    np.testing.assert_allclose(gaps, 5.0, atol=1e-4)


def test_index_step_orders_the_real_tilted_ge_series(real_dicom_dir, tmp_path):
    series = real_dicom_dir / "ge_head_series"
    files = sorted(series.glob("*.dcm"))
    source = tmp_path / "src"
    source.mkdir()
    rng = np.random.default_rng(0)
    instance = {}
    for k, f in zip(rng.permutation(len(files)), files):  # renamed: names say nothing about order
        name = f"ID_{k:04d}"
        shutil.copy(f, source / f"{name}.dcm")
        instance[name] = int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber)
    table = pd.read_parquet(index_step.run(_cfg(tmp_path, source))).set_index("image_id")
    assert table["series_size"].eq(len(files)).all()
    assert table["normal_z"].lt(0.96).all()  # tilted: 18.5 degrees
    ranks = {name: int(table.loc[name, "rank"]) for name in instance}
    assert all(ranks[n] == instance[n] - 1 for n in instance)
    ordered = table.sort_values("rank")["position"].to_numpy()
    # 4 mm slices below, 7 mm above (the series changes thickness half way).
    np.testing.assert_allclose(np.diff(ordered)[:13], 4.0, atol=0.01)
    np.testing.assert_allclose(np.diff(ordered)[14:], 7.0, atol=0.01)


def test_neighbours_repeat_the_edge_slices():
    index = rank_series(pd.DataFrame({
        "image_id": ["a0", "a1", "a2", "b0", "x"], "series_id": ["A", "A", "A", "B", "B"],
        "position": [0.0, 5.0, 10.0, 3.0, math.nan]}))
    got = neighbours(index, ["a0", "a2", "b0", "x"], [-1, 1, 2])
    assert got["neighbour_id"].tolist() == ["a0", "a1", "a2", "a1", "a2", "a2",
                                            "b0", "b0", "b0", "x", "x", "x"]
    assert got["offset"].tolist() == [-1, 1, 2] * 4


def test_failures_are_recorded_and_the_rest_indexed(tmp_path):
    source = tmp_path / "src"
    (source / "nested").mkdir(parents=True)
    for k, p in enumerate(_tilted_positions(3)):
        _write_slice(source / f"ID_0c{k}.dcm", f"ID_0c{k}", p)
    (source / "ID_text.dcm").write_text("not a dicom file at all")
    good = (source / "ID_0c0.dcm").read_bytes()
    (source / "nested" / "ID_cut.dcm").write_bytes(good[:200])  # cut inside the header
    (source / "ID_short.dcm").write_bytes(good[:-10])  # cut inside the pixel data
    (source / "ID_empty.dcm").write_bytes(b"")
    (source / "notes.txt").write_text("ignored: not .dcm")
    cfg = _cfg(tmp_path, source)
    out = index_step.run(cfg)
    table = pd.read_parquet(out)
    assert sorted(table["image_id"]) == ["ID_0c0", "ID_0c1", "ID_0c2"]
    failures = pd.read_csv(tmp_path / "work" / "index_failures.csv").set_index("image_id")
    assert sorted(failures.index) == ["ID_cut", "ID_empty", "ID_short", "ID_text"]
    assert failures.loc["ID_cut", "file"] == "nested/ID_cut.dcm"
    assert all(isinstance(r, str) and r for r in failures["reason"])
    assert "DICM" in failures.loc["ID_text", "reason"]
    assert failures.loc["ID_cut", "reason"].startswith("no pixel data")
    assert failures.loc["ID_short", "reason"].startswith("pixel data cut short")


def test_resume_after_a_kill_reads_only_the_rest(tmp_path, monkeypatch):
    source = tmp_path / "src"
    source.mkdir()
    for k in range(10):
        _write_slice(source / f"ID_{k:02d}.dcm", f"ID_{k:02d}", k * 5.0 * NORMAL)
    cfg = _cfg(tmp_path, source, chunk_size=3)
    real_chunk = index_step.read_chunk
    calls = []

    def dying(files, root):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is killed after two chunks reached the journal
        calls.append(list(files))
        return real_chunk(files, root)

    monkeypatch.setattr(index_step, "read_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        index_step.run(cfg)
    assert len(list((tmp_path / "work" / ".index" / "parts").glob("*.csv"))) == 2
    read_again = []
    monkeypatch.setattr(index_step, "read_chunk",
                        lambda files, root: read_again.extend(files) or real_chunk(files, root))
    table = pd.read_parquet(index_step.run(cfg))
    assert len(read_again) == 4 and not set(read_again) & {f for c in calls for f in c}
    assert table["rank"].tolist() == list(range(10))

    # Up to date: nothing is read; one new file: only that one is.
    read_again.clear()
    index_step.run(cfg)
    assert read_again == []
    _write_slice(source / "ID_10.dcm", "ID_10", 50.0 * NORMAL)
    table = pd.read_parquet(index_step.run(cfg))
    assert read_again == ["ID_10.dcm"] and table["rank"].tolist() == list(range(11))


def test_thread_pool_gives_the_same_index(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for k, p in enumerate(_tilted_positions()):
        _write_slice(source / f"ID_{k}.dcm", f"ID_{k}", p)
    one = pd.read_parquet(index_step.run(_cfg(tmp_path / "a", source)))
    threads = pd.read_parquet(index_step.run(_cfg(tmp_path / "b", source, workers=3, pool="thread", chunk_size=2)))
    pd.testing.assert_frame_equal(one, threads)


def test_read_header_names_the_file_relative_to_its_root(tmp_path):
    (tmp_path / "a").mkdir()
    _write_slice(tmp_path / "a" / "ID_1.dcm", "ID_1", (0.0, 0.0, 0.0))
    assert read_header(tmp_path / "a" / "ID_1.dcm", tmp_path)["file"] == "a/ID_1.dcm"


def test_orientation_classes():
    assert orientation_class(NORMAL) == "axial"
    assert orientation_class((1.0, 0.0, 0.0)) == "sagittal"
    assert orientation_class((0.0, -1.0, 0.0)) == "coronal"
    assert orientation_class((0.6, 0.6, 0.53)) == "oblique"
    assert orientation_class((math.nan, 0.0, 0.0)) == "unknown"


def _predict_rows():
    rows = []
    for study in ("ID_st2", "ID_st1"):
        for k in (3, 0, 2, 1):  # any order
            rows.append({"image_id": f"{study}_ax{k}", "study_id": study, "series_id": f"{study}_ax",
                         "modality": "CT", "image_type": "ORIGINAL\\PRIMARY\\AXIAL",
                         "orientation": "1\\0\\0\\0\\0.866\\-0.5", "normal_x": 0.0,
                         "normal_y": 0.5, "normal_z": 0.866, "position": 5.0 * k})
        rows.append({"image_id": f"{study}_scout", "study_id": study, "series_id": f"{study}_sc",
                     "modality": "CT", "image_type": "ORIGINAL\\PRIMARY\\LOCALIZER",
                     "orientation": "0\\1\\0\\0\\0\\-1", "normal_x": -1.0, "normal_y": 0.0,
                     "normal_z": 0.0, "position": 0.0})
        rows.append({"image_id": f"{study}_sag", "study_id": study, "series_id": f"{study}_sag",
                     "modality": "CT", "image_type": "DERIVED\\SECONDARY\\REFORMATTED",
                     "orientation": "0\\1\\0\\0\\0\\-1", "normal_x": -1.0, "normal_y": 0.0,
                     "normal_z": 0.0, "position": 2.0})
    rows.append({"image_id": "ID_mr", "study_id": "ID_st1", "series_id": "M", "modality": "MR",
                 "image_type": "", "orientation": "1\\0\\0\\0\\1\\0", "normal_x": 0.0,
                 "normal_y": 0.0, "normal_z": 1.0, "position": 0.0})
    rows.append({"image_id": "ID_nogeo", "study_id": "ID_st1", "series_id": "ID_st1_ax",
                 "modality": "CT", "image_type": "", "orientation": "", "normal_x": math.nan,
                 "normal_y": math.nan, "normal_z": math.nan, "position": math.nan})
    return rows


def test_group_for_predict_keeps_axial_series_sorted_and_names_the_rest():
    rows = _predict_rows()
    rng = np.random.default_rng(3)
    kept, skipped = group_for_predict([rows[i] for i in rng.permutation(len(rows))])
    assert kept["image_id"].tolist() == [f"ID_st1_ax{k}" for k in range(4)] + [f"ID_st2_ax{k}" for k in range(4)]
    assert kept["rank"].tolist() == [0, 1, 2, 3] * 2
    reasons = skipped.set_index("image_id")["reason"]
    assert sorted(reasons.index) == ["ID_mr", "ID_nogeo", "ID_st1_sag", "ID_st1_scout",
                                     "ID_st2_sag", "ID_st2_scout"]
    assert reasons["ID_st1_scout"].startswith("localizer")
    assert reasons["ID_st2_sag"].startswith("sagittal image, not axial")
    assert "not CT" in reasons["ID_mr"]
    assert "ImageOrientationPatient" in reasons["ID_nogeo"]


def _slow_rows(monkeypatch, files, root):
    """read_header's rows through pydicom only (the fast walker switched off)."""
    from ich.data import index as index_mod

    def unsupported(data):
        raise index_mod._Unsupported("test")

    with monkeypatch.context() as m:
        m.setattr(index_mod, "parse_header", unsupported)
        return [read_header(f, root) for f in files]


def test_fast_header_walker_agrees_with_pydicom_on_real_files(real_dicom_dir, monkeypatch):
    files = sorted(real_dicom_dir.rglob("*.dcm"))
    assert len(files) >= 30
    fast = [read_header(f, real_dicom_dir) for f in files]
    slow = _slow_rows(monkeypatch, files, real_dicom_dir)
    pd.testing.assert_frame_equal(pd.DataFrame(fast), pd.DataFrame(slow))


def test_fast_header_walker_agrees_with_pydicom_on_implicit_vr(tmp_path, monkeypatch):
    from pydicom.uid import ImplicitVRLittleEndian

    path = tmp_path / "ID_1.dcm"
    _write_slice(path, "ID_1", _tilted_positions(1)[0])
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=False, implicit_vr=True, little_endian=True)
    fast = read_header(path)
    assert fast == _slow_rows(monkeypatch, [path], None)[0]
    assert fast["position"] == pytest.approx(float(_tilted_positions(1)[0] @ NORMAL))
    assert fast["rows"] == 8


def _pandas_consolidation(work, journal_dir, seen, out, failures_csv):
    """The consolidation as it was before issue 11 (pandas over every journal row): the
    reference the columnar one must match."""
    from ich import journal
    from ich.io import read_csv

    frames = []
    if out.is_file():
        frames.append(pd.read_parquet(out).assign(reason=""))
    old_failures = list(journal.read_rows(failures_csv, consolidation.JOURNAL_COLUMNS))
    if old_failures:
        frames.append(pd.DataFrame(old_failures))
    for part in journal.parts(journal_dir):
        # ich.io.read_csv: the journal escaped the "=ID" patient ids on disk.
        frames.append(read_csv(part, dtype=str, keep_default_na=False))
    table = pd.concat(frames, ignore_index=True)
    table = table[table["file"].isin(seen)].drop_duplicates("file", keep="last")
    table["reason"] = table["reason"].fillna("").astype(str)
    good = table[table["reason"] == ""].copy()
    bad = table[table["reason"] != ""].copy()
    good = good.sort_values(["image_id", "file"], kind="stable")
    dup = good["image_id"].duplicated(keep="first")
    if dup.any():
        first = good.drop_duplicates("image_id").set_index("image_id")["file"]
        extra = good[dup].copy()
        extra["reason"] = [f"duplicate image id (also {first[i]})" for i in extra["image_id"]]
        bad = pd.concat([bad, extra], ignore_index=True)
        good = good[~dup]
    good = good[list(consolidation.INDEX_COLUMNS)].copy()
    for column in consolidation.INDEX_COLUMNS:
        if column in consolidation.FLOAT_COLUMNS:
            good[column] = pd.to_numeric(good[column], errors="coerce").astype("float64")
        elif column in consolidation.INT_COLUMNS:
            good[column] = pd.to_numeric(good[column], errors="coerce").fillna(0).astype("int32")
        else:
            good[column] = good[column].fillna("").astype(str)
    good = rank_series(good).sort_values("image_id", ignore_index=True)
    good.to_parquet(out, index=False)
    journal.write_rows(failures_csv, consolidation.FAILURE_COLUMNS, bad.sort_values("file").to_dict("records"))
    journal.reset(journal_dir)
    return len(good), len(bad), int(good.loc[good["series_id"] != "", "series_id"].nunique())


def _random_journal(work, rng, n_files=400, rounds=3):
    """Journal parts (and, with `rounds` > 1, an earlier consolidation) with what the index
    meets: files read twice, failures later read fine and the reverse, one image id in two
    subfolders, positions missing or tied, files without a series, odd patient ids."""
    from ich import journal

    journal_dir = work / index_step.JOURNAL_DIR
    files = [f"{'sub/' if k % 37 == 0 else ''}ID_{k % 350:04x}.dcm" for k in range(n_files)]
    for round_ in range(rounds):
        rows = []
        for file in rng.choice(files, size=n_files // 2, replace=True):
            if rng.random() < 0.1:
                rows.append(index_step._failure(file, f"bad header {rng.integers(9)}"))
                continue
            series = "" if rng.random() < 0.05 else f"ID_s{rng.integers(12)}"
            position = "" if rng.random() < 0.05 else ("nan" if rng.random() < 0.05 else
                                                       repr(float(rng.integers(6)) * 2.5 + rng.random() * (rng.random() < 0.5)))
            rows.append({"image_id": file.split("/")[-1][:-4], "file": file, "sop_uid": f"1.2.{rng.integers(99)}",
                         "patient_id": rng.choice(["ID_p1", "NA", "", "ID_p,2", "=ID"]), "study_id": f"ID_t{rng.integers(5)}",
                         "series_id": series, "modality": "CT", "image_type": "ORIGINAL\\PRIMARY\\AXIAL",
                         "orientation": "1\\0\\0\\0\\1\\0", "normal_x": "0.0", "normal_y": repr(rng.random()),
                         "normal_z": "1.0", "position": position, "rows": "512", "columns": str(rng.integers(500, 520)),
                         "pixel_spacing": repr(0.488 + rng.random() / 1000), "rank": "-1", "series_size": "0", "reason": ""})
        for seq, start in enumerate(range(0, len(rows), 64)):
            journal.write_part(journal_dir, f"{round_:020d}-{seq:07d}", consolidation.JOURNAL_COLUMNS,
                               rows[start:start + 64], "file")
        if round_ < rounds - 1:
            seen = np.unique(np.array([f.encode() for f in files]))
            consolidation.consolidate(work, journal_dir, seen, work / "index.parquet", work / "index_failures.csv")
    return files


def test_columnar_consolidation_gives_the_pandas_consolidations_rows(tmp_path):
    """Old and new outputs on a small, awkward set: identical index.parquet and failures."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        work_a = tmp_path / f"a{seed}"
        files = _random_journal(work_a, rng)
        work_b = tmp_path / f"b{seed}"
        shutil.copytree(work_a, work_b)
        still = [f for f in files if not f.endswith("7.dcm")]   # some files gone since
        seen = np.unique(np.array([f.encode() for f in still]))
        # The column store a killed consolidation left behind is rebuilt, then removed.
        (work_a / ".index" / consolidation.SCRATCH).mkdir()
        (work_a / ".index" / consolidation.SCRATCH / "file.arrow").write_bytes(b"half a file")
        new = consolidation.consolidate(work_a, work_a / ".index", seen, work_a / "index.parquet",
                                      work_a / "index_failures.csv")
        old = _pandas_consolidation(work_b, work_b / ".index", set(still), work_b / "index.parquet",
                                    work_b / "index_failures.csv")
        assert new == old
        pd.testing.assert_frame_equal(pd.read_parquet(work_a / "index.parquet"),
                                      pd.read_parquet(work_b / "index.parquet"))
        assert (work_a / "index_failures.csv").read_bytes() == (work_b / "index_failures.csv").read_bytes()
        assert "duplicate image id" in (work_a / "index_failures.csv").read_text()
        assert not (work_a / ".index" / consolidation.SCRATCH).exists()


@pytest.mark.parametrize("killed_at", ["index.parquet", "index_failures.csv"])
def test_a_kill_between_the_two_tables_leaves_no_mixed_pair_and_a_rerun_finishes(tmp_path, monkeypatch, killed_at):
    """The consolidation swaps in its two tables one rename at a time: a kill just before either
    rename leaves the old index.parquet or the new one, never beside the other run's failures
    (index_failures.csv is removed first), and the rerun writes what an uninterrupted run does.
    The second run makes a file that was good a duplicate (A/ID_00.dcm sorts first) and fails a
    new file: both would be misplaced by a mixed pair."""
    import os

    source = tmp_path / "src"
    source.mkdir()
    for k in range(3):
        _write_slice(source / f"ID_{k:02d}.dcm", f"ID_{k:02d}", k * 5.0 * NORMAL)
    (source / "ID_bad.dcm").write_text("not a dicom file")
    first = tmp_path / "first"
    index_step.run(_cfg(first, source))
    (source / "A").mkdir()
    _write_slice(source / "A" / "ID_00.dcm", "ID_00", 0.0 * NORMAL)
    (source / "ID_bad2.dcm").write_text("not a dicom file either")
    work = first / "work"
    old = {name: (work / name).read_bytes() for name in ("index.parquet", "index_failures.csv")}
    shutil.copytree(first, tmp_path / "whole")
    index_step.run(_cfg(tmp_path / "whole", source))
    whole = tmp_path / "whole" / "work"
    new = {name: (whole / name).read_bytes() for name in old}
    assert "ID_00.dcm,duplicate image id" in new["index_failures.csv"].decode()
    assert new != old

    killed = tmp_path / "killed"
    shutil.copytree(first, killed)
    target = killed / "work" / killed_at
    replace = os.replace

    def kill_before(src, dst, *args, **kwargs):
        if Path(dst) == target:
            raise KeyboardInterrupt   # the run is killed just before this rename
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", kill_before)
    with pytest.raises(KeyboardInterrupt):
        index_step.run(_cfg(killed, source))
    monkeypatch.setattr(os, "replace", replace)
    work = killed / "work"
    assert not (work / "index_failures.csv").exists()
    expected = old if killed_at == "index.parquet" else new
    assert (work / "index.parquet").read_bytes() == expected["index.parquet"]
    index_step.run(_cfg(killed, source))
    assert {name: (work / name).read_bytes() for name in old} == new


def test_a_header_reader_that_crashes_its_process_is_failed_alone(tmp_path, monkeypatch):
    """The local process pool: a segfault in one file's header reader breaks the pool and every
    chunk in flight; those are read again one file per process, the culprit is failed with the
    reason, and the index holds every other file, as a clean run gives it."""
    from ich.faults import ENV

    source, without = tmp_path / "src", tmp_path / "without"
    source.mkdir()
    without.mkdir()
    for k in range(12):
        _write_slice(source / f"ID_{k:02d}.dcm", f"ID_{k:02d}", k * 5.0 * NORMAL)
        if k != 7:
            _write_slice(without / f"ID_{k:02d}.dcm", f"ID_{k:02d}", k * 5.0 * NORMAL)
    monkeypatch.setenv(ENV, "header:ID_07=crash")
    out = index_step.run(_cfg(tmp_path / "poisoned", source, workers=2, pool="process", chunk_size=3))
    failures = pd.read_csv(tmp_path / "poisoned" / "work" / "index_failures.csv")
    assert failures[["image_id", "file", "reason"]].values.tolist() == [
        ["ID_07", "ID_07.dcm", "header reader crashed with signal 11 (SIGSEGV)"]]
    # The index is the one of a folder that never held the culprit (ranks and series sizes too).
    monkeypatch.delenv(ENV)
    clean = index_step.run(_cfg(tmp_path / "clean", without))
    pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(clean))
