"""compute.scheduler: `ich preprocess` and the per-file work of preprocess on a real Dask cluster on 127.0.0.1 (one
`dask scheduler`, two `dask worker` processes) gives the same PNGs, byte for byte, and the same
rows as a local run; a truncated file gets its reason; a file that kills its worker is the only
one of its chunk marked failed; a worker that cannot see the folder is named."""

import shutil
from pathlib import Path

import pytest

pytest.importorskip("distributed")

from alt_rsna import write_alt_rsna  # noqa: E402
from dask_cluster import dask_cluster  # noqa: E402
from ich.cli import main  # noqa: E402
from ich.constants import FAILURES_CSV, IMAGES_CSV  # noqa: E402
from ich.errors import StepError  # noqa: E402
from ich.faults import ENV  # noqa: E402
from ich.distributed import Overdue, check_folders, map_files  # noqa: E402
from ich.steps import preprocess  # noqa: E402

POISON = "ID_poisoned"   # its decoder crashes (SIGSEGV), in the cluster's workers
HUNG = "ID_hung"         # its decoder hangs holding the GIL, as a stuck C decoder does
FAULTS = f"decode:{POISON}=crash,decode:{HUNG}=freeze"
TIMEOUT_S = 3            # roomy enough for a loaded machine's first file in a fresh worker
WINDOWS = [(80.0, 200.0), (40.0, 80.0), (600.0, 2800.0)]
SIZE = 32


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler and two nannied single-thread workers on 127.0.0.1, with a decoder crash or
    hang (inside read_hu) on the files POISON and HUNG; killed at the end."""
    with dask_cluster(tmp_path_factory.mktemp("dask"), FAULTS) as running:
        yield running


@pytest.fixture(scope="module")
def dicoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    truth = write_alt_rsna(root, n_patients=3, slices=3, size=64, seed=3)
    return truth


def _work(root: Path, dicom_dir: Path) -> Path:
    work = root / "work"
    (work / "png").mkdir(parents=True)
    shutil.copytree(dicom_dir, work / "dicom")
    return work


def _chunks(work: Path, size: int = 3) -> list[list[str]]:
    paths = [str(p) for p in sorted((work / "dicom").glob("*.dcm"))]
    return [paths[i:i + size] for i in range(0, len(paths), size)]


def _failure(work: Path):
    return lambda path, why: preprocess._failure(Path(path).stem, Path(path), work, why)


def _outputs(work: Path) -> dict[str, bytes]:
    """Every file of png/ (dot-files included) and the two manifests, by name."""
    files = {f"png/{p.name}": p.read_bytes() for p in (work / "png").iterdir()}
    return files | {name: (work / name).read_bytes() for name in (IMAGES_CSV, FAILURES_CSV)}


def _rows(results) -> list[dict]:
    return sorted((row for _, rows in results for row in rows), key=lambda r: r["image_id"])


def test_a_worker_is_overdue_when_nothing_left_it_for_its_largest_budget():
    # Budgets: "chunk" is 2 files x 3 s, "a" and "b" lone files of 3 s; "x" is another client's.
    budget = {"chunk": 6.0, "a": 3.0, "b": 3.0}.get
    watch = Overdue()
    assert watch.check({"w1": ["chunk", "x"], "w2": ["a"], "w9": ["x"]}, budget, 10.0) == []
    assert watch.check({"w1": ["chunk", "x"], "w2": ["a"]}, budget, 12.9) == []
    # w2: 13.5 - 10 = 3.5 s > 3 s with nothing gone, and "a" is all it holds.
    assert watch.check({"w1": ["chunk", "x"], "w2": ["a"]}, budget, 13.5) == [("w2", ["a"], True)]
    # "x" left w1 at 14: its count starts again (14 + 6 = 20); "b" arriving on w1 does not.
    assert watch.check({"w1": ["chunk"], "w3": ["b"]}, budget, 14.0) == []
    assert watch.check({"w1": ["chunk", "b"], "w3": ["b"]}, budget, 16.5) == []
    # w3: 17.5 - 14 = 3.5 s > 3 s; w1: 3.5 s < 6 s, the larger of its budgets.
    assert watch.check({"w1": ["chunk", "b"], "w3": ["b"]}, budget, 17.5) == [("w3", ["b"], True)]
    # w1: 20.5 - 14 = 6.5 s > 6 s, holding two keys: which one ran is not known.
    assert watch.check({"w1": ["b", "chunk"]}, budget, 20.5) == [("w1", ["b", "chunk"], False)]
    # A worker that holds none of ours is never overdue, however long.
    assert watch.check({"w9": ["x"]}, budget, 1000.0) == []


def test_dask_preprocess_matches_local_byte_for_byte(cluster, dicoms, tmp_path, caplog):
    address, client = cluster
    local, remote = _work(tmp_path / "local", dicoms["dicom_dir"]), _work(tmp_path / "dask", dicoms["dicom_dir"])
    expected = _rows((c, preprocess.process_chunk(c, str(local), WINDOWS, SIZE)) for c in _chunks(local))
    chunks = _chunks(remote)
    with caplog.at_level("INFO", logger="ich"):
        results = list(map_files(preprocess.process_chunk, chunks, address, (str(remote), WINDOWS, SIZE),
                                 inputs=[remote / "dicom"], outputs=[remote / "png"],
                                 failure=_failure(remote), init=preprocess._init_worker))
    assert sorted(map(tuple, (c for c, _ in results))) == sorted(map(tuple, chunks))
    assert _rows(results) == expected
    assert "dashboard http://" in caplog.text
    pngs = sorted(p.name for p in (local / "png").glob("*.png"))
    assert pngs and pngs == sorted(p.name for p in (remote / "png").glob("*.png"))
    for name in pngs:
        assert (local / "png" / name).read_bytes() == (remote / "png" / name).read_bytes(), name
    truncated = [i for i, kind in dicoms["bad"].items() if kind == "truncated"]
    assert truncated
    reasons = {r["image_id"]: r["reason"] for r in _rows(results)}
    for image_id in truncated:
        assert "truncated" in reasons[image_id], reasons[image_id]
    assert not list((remote / "png").glob(".ich-dask-check-*"))  # the check files are gone


def test_a_file_that_kills_its_worker_fails_alone(cluster, dicoms, tmp_path):
    from dask_tasks import crash_on_poison

    address, client = cluster
    work = _work(tmp_path, dicoms["dicom_dir"])
    first = sorted((work / "dicom").glob("*.dcm"))[1]
    poison = first.with_name("ID_poison.dcm")
    shutil.copy(first, poison)
    chunks = _chunks(work, size=4)
    results = list(map_files(crash_on_poison, chunks, address, (str(work), WINDOWS, SIZE),
                             inputs=[work / "dicom"], outputs=[work / "png"], failure=_failure(work)))
    rows = {r["image_id"]: r for r in _rows(results)}
    assert len(rows) == sum(len(c) for c in chunks)
    assert "crashed its worker process" in rows["ID_poison"]["reason"]
    done = [i for i, r in rows.items() if not r["reason"]]
    assert first.stem in done and (work / "png" / f"{first.stem}.png").is_file()
    client.wait_for_workers(2, timeout=60)  # the nannies restarted the killed workers


def test_a_folder_the_workers_do_not_see_is_named(cluster, tmp_path, monkeypatch):
    import ich.distributed

    address, client = cluster
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.dcm").write_bytes(b"x")
    check_folders(client, inputs=[tmp_path / "in"], outputs=[tmp_path])
    assert not list(tmp_path.glob(".ich-dask-check-*"))
    # A node-local folder of the same name: the workers find the folder, but not the check file
    # this machine wrote into it (here: a check file that was never written).
    monkeypatch.setattr(ich.distributed, "_write_token", lambda folder: ".ich-dask-check-elsewhere")
    with pytest.raises(StepError, match=rf"dask worker tcp://127.0.0.1:\d+ cannot use output folder "
                                        rf"{tmp_path}: not the folder this machine writes"):
        check_folders(client, outputs=[tmp_path])
    with pytest.raises(StepError, match="folder .*nowhere not found on this machine"):
        check_folders(client, inputs=[tmp_path / "nowhere"])


# Once flaky: about half the runs left `.ID_poisoned.png.<pid>.tmp.png` in png/. The fault's
# SIGSEGV went to the process (os.kill), the kernel gave it to another thread of the Dask
# worker, and the crashing thread ran on far enough to open its temporary PNG. The fault now
# signals its own thread, and preprocess removes the temporary PNGs of killed writers when it
# ends (a real out-of-memory or time-limit kill mid-write leaves them too).
def test_ich_preprocess_on_the_cluster_matches_a_local_run(cluster, dicoms, tmp_path):
    """`ich preprocess --set compute.scheduler=tcp://...` through the CLI: the PNGs byte for byte
    and images.csv as a local run's; a file that crashes its decoder is in failures.csv with the
    rest done; the scheduler is not part of the step's stamp."""
    address, client = cluster
    local, remote = _work(tmp_path / "local", dicoms["dicom_dir"]), _work(tmp_path / "dask", dicoms["dicom_dir"])
    good = sorted((remote / "dicom").glob("*.dcm"))[0]
    shutil.copy(good, remote / "dicom" / f"{POISON}.dcm")
    sets = ["--set", f"preprocess.image_size={SIZE}", "--set", "preprocess.chunk_size=4",
            "--set", "preprocess.workers=2"]
    assert main(["preprocess", "--set", f"paths.work_dir={local}"] + sets) == 0
    assert main(["preprocess", "--set", f"paths.work_dir={remote}", "--set",
                 f"compute.scheduler={address}"] + sets) == 0
    assert (remote / IMAGES_CSV).read_bytes() == (local / IMAGES_CSV).read_bytes()
    pngs = sorted(p.name for p in (local / "png").glob("*.png"))
    assert pngs and pngs == sorted(p.name for p in (remote / "png").glob("*.png"))
    for name in pngs:
        assert (local / "png" / name).read_bytes() == (remote / "png" / name).read_bytes(), name
    assert not list((remote / "png").glob(".*"))   # Path.glob("*.png") lists dot-files too
    local_failures = (local / FAILURES_CSV).read_text().splitlines()
    remote_failures = (remote / FAILURES_CSV).read_text().splitlines()
    poisoned = [line for line in remote_failures if line.startswith(f"{POISON},")]
    assert len(poisoned) == 1 and "decoder crashed its worker process" in poisoned[0], remote_failures
    assert sorted(set(remote_failures) - set(poisoned)) == sorted(local_failures)
    assert len(local_failures) > 1  # alt_rsna's bad files are failures on both sides
    # Where the work ran is not a setting of the result: a local rerun finds it up to date.
    before = (remote / IMAGES_CSV).stat().st_mtime_ns
    assert main(["preprocess", "--set", f"paths.work_dir={remote}"] + sets) == 0
    assert (remote / IMAGES_CSV).stat().st_mtime_ns == before


@pytest.mark.slow  # waits out the file timeout on a cluster: ~25 s; test_robustness hangs a file locally
@pytest.mark.timeout(240)
def test_a_file_that_hangs_its_decoder_times_out_on_the_cluster_as_locally(cluster, dicoms, tmp_path,
                                                                          monkeypatch, caplog):
    """preprocess.file_timeout_s on Dask: a decoder that hangs holding the GIL (the worker's own
    threads frozen) costs its file only, with the local pool's reason; every output is the local
    run's byte for byte; a rerun does not retry the file, --retry-failed does."""
    from dask_tasks import set_faults

    address, client = cluster
    local, remote = _work(tmp_path / "local", dicoms["dicom_dir"]), _work(tmp_path / "dask", dicoms["dicom_dir"])
    good = sorted((local / "dicom").glob("*.dcm"))[0]
    for work in (local, remote):
        shutil.copy(good, work / "dicom" / f"{HUNG}.dcm")
    # chunk_size 2: the hung file shares a chunk, which overruns 2 x 3 s and is redone file by file.
    sets = ["--set", f"preprocess.image_size={SIZE}", "--set", "preprocess.chunk_size=2",
            "--set", "preprocess.workers=2", "--set", f"preprocess.file_timeout_s={TIMEOUT_S}"]
    dask = ["--set", f"compute.scheduler={address}"]
    monkeypatch.setenv(ENV, FAULTS)   # the local pool's workers inherit it
    assert main(["preprocess", "--set", f"paths.work_dir={local}"] + sets) == 0
    monkeypatch.delenv(ENV)
    with caplog.at_level("WARNING", logger="ich"):
        assert main(["preprocess", "--set", f"paths.work_dir={remote}"] + dask + sets) == 0
    assert "a chunk of 2 files over 2 x 3 s, redone one file at a time" in caplog.text
    failures = (remote / FAILURES_CSV).read_text()
    assert f"{HUNG},dicom/{HUNG}.dcm,decoder timed out after {TIMEOUT_S} s" in failures.splitlines()
    expected = _outputs(local)
    assert _outputs(remote) == expected   # every PNG, images.csv and failures.csv
    assert f"png/{good.stem}.png" in expected and f"png/{HUNG}.png" not in expected

    # A plain rerun does not try the file again (it would hang again: the workers still have
    # the fault); --retry-failed does, and with the fault gone the file is done.
    before = (remote / IMAGES_CSV).stat().st_mtime_ns
    assert main(["preprocess", "--set", f"paths.work_dir={remote}"] + dask + sets) == 0
    assert (remote / IMAGES_CSV).stat().st_mtime_ns == before
    client.run(set_faults, None)
    try:
        assert main(["preprocess", "--set", f"paths.work_dir={remote}", "--retry-failed"] + dask + sets) == 0
    finally:
        client.run(set_faults, FAULTS)
    assert f"{HUNG},dicom/{HUNG}.dcm" not in (remote / FAILURES_CSV).read_text()
    assert f"\n{HUNG}," in (remote / IMAGES_CSV).read_text()
    # Same pixels as the file it copies, so the same PNG bytes.
    assert (remote / "png" / f"{HUNG}.png").read_bytes() == expected[f"png/{good.stem}.png"]
    client.wait_for_workers(2, timeout=60)   # the nannies restarted the frozen workers
