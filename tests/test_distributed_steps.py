"""compute.scheduler for the other per-file steps: `ich index`, `ich augment` and `ich predict`
on a Dask cluster on 127.0.0.1 (one `dask scheduler`, two `dask worker` processes) write the
files a local run writes, and a poisoned file (ich.faults: its worker crashes) is named in the
failures with the rest done. The poisoned file is unreadable for the local run too, so every
output is compared whole: only that file's reason differs (the crash's words on Dask). Also
map_files' order and window, which predict and the index rely on."""

import shutil
from pathlib import Path

import pytest

pytest.importorskip("distributed")

from alt_rsna import write_alt_rsna  # noqa: E402
from dask_cluster import dask_cluster  # noqa: E402
from ich import config  # noqa: E402
from ich.cli import main  # noqa: E402
from ich.constants import (AUGMENTED_CSV, AUGMENTED_DIR, FAILURES_CSV, INDEX_FAILURES_CSV,  # noqa: E402
                           INDEX_PARQUET, LABELS, PNG_DIR, PREDICTIONS_CSV, SKIPPED_CSV,
                           SPLITS_CSV, STUDIES_CSV, SUBMISSION_CSV, IMAGES_CSV)
from ich.distributed import map_files  # noqa: E402
from tiny_workdir import make_workdir  # noqa: E402

POISON = "ID_poisoned"
# The same name crashes each step's worker: its header reader, its augmentation, its decoder.
FAULTS = f"header:{POISON}=crash,augment:{POISON}=crash,decode:{POISON}=crash"
CRASH = "crashed its worker process on every worker that tried"
SIZE = 16


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two nannied workers on 127.0.0.1 whose processes crash on POISON; killed at the end."""
    with dask_cluster(tmp_path_factory.mktemp("dask"), FAULTS) as running:
        yield running


@pytest.fixture(scope="module")
def dicoms(tmp_path_factory):
    """alt_rsna's folder (good slices, a truncated file, a non-DICOM, an MR slice, a header
    without pixels) plus POISON.dcm, which is no DICOM at all."""
    truth = write_alt_rsna(tmp_path_factory.mktemp("src"), n_patients=3, slices=3, size=32, seed=5)
    (truth["dicom_dir"] / f"{POISON}.dcm").write_text("not a DICOM file: a poisoned header reader\n")
    return truth["dicom_dir"]


def _files(folder: Path, names) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in names}


def _without_poison(lines: list[str]) -> tuple[list[str], list[str]]:
    """(the lines naming POISON, the others)."""
    return [line for line in lines if POISON in line], [line for line in lines if POISON not in line]


def test_ordered_map_yields_in_order_with_a_bounded_window(cluster):
    from dask_tasks import echo_late_first

    address, client = cluster
    drawn = []

    def chunks():
        for k in range(8):
            drawn.append(k)
            yield [k]

    out = []
    for chunk, result in map_files(echo_late_first, chunks(), address, (1.0,), ordered=True,
                                   per_thread=1, client=client):
        out.append(result)
        # per_thread 1 x 2 worker threads: at most 2 chunks out besides those already yielded.
        assert len(drawn) <= len(out) + 2, (drawn, out)
    assert out == [[k] for k in range(8)]
    # Unordered, chunk 0 (1 s late) comes after some later ones.
    drawn.clear()
    firsts = [result[0] for _, result in map_files(echo_late_first, chunks(), address, (1.0,),
                                                   per_thread=1, client=client)]
    assert sorted(firsts) == list(range(8)) and firsts[0] != 0


def test_ich_index_on_the_cluster_matches_a_local_run(cluster, dicoms, tmp_path):
    address, client = cluster
    sets = ["--set", f"paths.dicom_dir={dicoms}", "--set", "index.chunk_size=2", "--set", "index.workers=1"]
    local, remote = tmp_path / "local", tmp_path / "dask"
    assert main(["index", "--set", f"paths.work_dir={local}"] + sets) == 0
    assert main(["index", "--set", f"paths.work_dir={remote}", "--set", f"compute.scheduler={address}"] + sets) == 0
    assert (remote / INDEX_PARQUET).read_bytes() == (local / INDEX_PARQUET).read_bytes()
    [poisoned], rest = _without_poison((remote / INDEX_FAILURES_CSV).read_text().splitlines())
    [local_poisoned], local_rest = _without_poison((local / INDEX_FAILURES_CSV).read_text().splitlines())
    assert rest == local_rest and len(rest) > 3   # alt_rsna's bad files fail on both sides
    # Quoted: the reason holds a comma.
    assert poisoned == f'{POISON},{POISON}.dcm,"header reader {CRASH} (a segfault, or out of memory)"'
    assert "DICM" in local_poisoned
    # Where it ran is no setting of the result: a local rerun is up to date.
    before = (remote / INDEX_PARQUET).stat().st_mtime_ns
    assert main(["index", "--set", f"paths.work_dir={remote}"] + sets) == 0
    assert (remote / INDEX_PARQUET).stat().st_mtime_ns == before
    client.wait_for_workers(2, timeout=60)   # the nanny restarted the crashed worker


def _augment_workdir(root: Path) -> Path:
    """tiny_workdir's work dir plus a training target POISON (epidural) whose PNG is no PNG."""
    work = make_workdir(root)
    with open(work / SPLITS_CSV, "a") as handle:
        handle.write(f"{POISON},train,P{POISON},{','.join(['1', '1'] + ['0'] * (len(LABELS) - 2))}\n")
    with open(work / IMAGES_CSV, "a") as handle:
        handle.write(f"{POISON},P{POISON},{PNG_DIR}/{POISON}.png\n")
    (work / PNG_DIR / f"{POISON}.png").write_bytes(b"not a png")
    return work


def test_ich_augment_on_the_cluster_matches_a_local_run(cluster, tmp_path):
    address, client = cluster
    local, remote = _augment_workdir(tmp_path / "local"), _augment_workdir(tmp_path / "dask")
    sets = ["--set", "augment.target_per_label=6", "--set", "augment.max_copies_per_image=2",
            "--set", "augment.workers=1"]
    assert main(["augment", "--set", f"paths.work_dir={local}"] + sets) == 0
    assert main(["augment", "--set", f"paths.work_dir={remote}", "--set", f"compute.scheduler={address}"] + sets) == 0
    pngs = sorted(p.name for p in (local / AUGMENTED_DIR).glob("*.png"))
    assert len(pngs) > 4 and pngs == sorted(p.name for p in (remote / AUGMENTED_DIR).glob("*.png"))
    assert _files(remote / AUGMENTED_DIR, pngs) == _files(local / AUGMENTED_DIR, pngs)
    assert not list((remote / AUGMENTED_DIR).glob(".*"))
    assert (remote / AUGMENTED_CSV).read_bytes() == (local / AUGMENTED_CSV).read_bytes()
    assert POISON not in (local / AUGMENTED_CSV).read_text()
    failures = "augmented/failures.csv"
    [poisoned], rest = _without_poison((remote / failures).read_text().splitlines())
    [local_poisoned], local_rest = _without_poison((local / failures).read_text().splitlines())
    assert rest == local_rest == ["image_id,path,reason"]
    assert poisoned.startswith(f'{POISON},{remote / PNG_DIR / POISON}.png,"augmentation worker {CRASH}')
    client.wait_for_workers(2, timeout=60)


def test_ich_predict_on_the_cluster_matches_a_local_run(cluster, dicoms, tmp_path, monkeypatch):
    from ich.data import sources
    from tiny_cascade import save_tiny_cascade

    address, client = cluster
    run_dir = save_tiny_cascade(tmp_path / "run", image_size=SIZE,
                                thresholds={label: 0.3 for label in LABELS})
    # Tasks of 2 files, 4 per worker thread: several tasks, finishing in any order.
    monkeypatch.setattr(sources, "DASK_CHUNK", 2)
    args = ["predict", str(dicoms), "--model", str(run_dir), "--set", "predict.batch_size=2",
            "--set", "predict.workers=1"]
    assert main(args + ["--out", str(tmp_path / "local")]) == 0
    assert main(args + ["--out", str(tmp_path / "dask"), "--set", f"compute.scheduler={address}"]) == 0
    local, remote = tmp_path / "local", tmp_path / "dask"
    names = [PREDICTIONS_CSV, SUBMISSION_CSV, STUDIES_CSV, SKIPPED_CSV]
    assert _files(remote, names) == _files(local, names)
    [poisoned], rest = _without_poison((remote / FAILURES_CSV).read_text().splitlines())
    [local_poisoned], local_rest = _without_poison((local / FAILURES_CSV).read_text().splitlines())
    assert rest == local_rest and len(rest) > 2
    assert poisoned.startswith(f'{POISON}.dcm,"decoder {CRASH}')
    assert "DICOM" in local_poisoned
    assert len((local / PREDICTIONS_CSV).read_text().splitlines()) > 5
    client.wait_for_workers(2, timeout=60)


def test_scheduler_local_indexes_on_a_local_cluster_of_its_own(dicoms, tmp_path, caplog):
    """compute.scheduler local: a LocalCluster of index.workers processes, started and closed
    by the step (no fault in this process's environment, so the poisoned file is a plain
    non-DICOM here): both tables are those of the local pool, byte for byte."""
    sets = ["--set", f"paths.dicom_dir={dicoms}", "--set", "index.chunk_size=4", "--set", "index.workers=2"]
    local, remote = tmp_path / "local", tmp_path / "dask"
    assert main(["index", "--set", f"paths.work_dir={local}"] + sets) == 0
    with caplog.at_level("INFO", logger="ich"):
        assert main(["index", "--set", f"paths.work_dir={remote}", "--set", "compute.scheduler=local"] + sets) == 0
    assert "2 workers, dashboard http://" in caplog.text
    names = [INDEX_PARQUET, INDEX_FAILURES_CSV]
    assert _files(remote, names) == _files(local, names)


def test_a_killed_index_on_the_cluster_resumes_with_the_rest(cluster, dicoms, tmp_path, monkeypatch):
    """The run is killed (in this process, with tasks still out on the cluster) after two chunks
    reached the journal; the rerun reads only the files not journalled and writes the tables of
    an uninterrupted run."""
    from ich import journal
    from ich.steps import index as index_step

    address, client = cluster
    sets = ["--set", f"paths.dicom_dir={dicoms}", "--set", "index.chunk_size=2", "--set", "index.workers=1"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(["index", "--set", f"paths.work_dir={whole}"] + sets) == 0
    dask = ["--set", f"paths.work_dir={killed}", "--set", f"compute.scheduler={address}"] + sets
    write_part = journal.write_part
    parts = []

    def dying(*args, **kwargs):
        if len(parts) == 2:
            raise KeyboardInterrupt
        parts.append(write_part(*args, **kwargs))
        return parts[-1]

    monkeypatch.setattr(journal, "write_part", dying)
    assert main(["index"] + dask) != 0   # the CLI's "interrupted; finished work is kept"
    monkeypatch.setattr(journal, "write_part", write_part)
    done = {row["file"] for part in parts for row in journal.read_rows(part, ("file",))}
    assert len(done) == 4
    read = []
    chunk = index_step.read_chunk
    # The chunks the rerun hands out are counted here, as the workers get them.
    monkeypatch.setattr(index_step, "read_chunk", lambda files, root: read.extend(files) or chunk(files, root))
    monkeypatch.setattr(index_step, "_dask_results", _counting(index_step._dask_results, read))
    assert main(["index"] + dask) == 0
    assert read and not set(read) & done
    names = [INDEX_PARQUET, INDEX_FAILURES_CSV]
    got, expected = _files(killed, names), _files(whole, names)
    assert got[INDEX_PARQUET] == expected[INDEX_PARQUET]
    assert _without_poison(got[INDEX_FAILURES_CSV].decode().splitlines())[1] == \
        _without_poison(expected[INDEX_FAILURES_CSV].decode().splitlines())[1]
    client.wait_for_workers(2, timeout=60)


def _counting(dask_results, seen: list):
    """_dask_results, recording the files of every chunk it is handed (workers are other
    processes: a monkeypatched read_chunk would not reach them)."""
    def wrapped(chunks, *args):
        def recorded():
            for files in chunks:
                seen.extend(files)
                yield files
        return dask_results(recorded(), *args)
    return wrapped
