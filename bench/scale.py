"""Peak memory of the main process for the bookkeeping of index, sample, preprocess and split at 100k
and at full RSNA size (752,803 images), on simulated files: no pixels.

    python bench/scale.py                      # 100,000 and 752,803 images
    python bench/scale.py --sizes 20000 100000 # quicker
    python bench/scale.py --keep /tmp/scale    # keep the simulated work folders (a rerun
                                               # reuses their file entries, rewrites the rest)

For each size N it writes, in a temporary folder: the RSNA long labels CSV (6 N rows, RSNA's
ID format, subtype order and rough prevalences), work/dicom/ and work/png/ with one empty file
per image (hard links of a few empty files: an entry each, no data), and a preprocess journal
of N rows in chunks of 64 (the rows process_chunk returns, with RSNA-like patient, study and
series ids) with its pixel-settings record, and a header-index journal of N rows in chunks of
256 (the rows read_chunk returns), as runs killed just before consolidation leave them. Then
each step runs in its own fresh process, as `ich <step>` would:

  index       ich.steps.index.run: lists the folder, reads the journal (nothing is left to
              read) and consolidates it into index.parquet (ranked) and index_failures.csv

  sample      ich.steps.sample.run, sample.per_label = N (every image: the worst case for split)
  preprocess  ich.steps.preprocess.run: lists the DICOMs, reads the journal (nothing is left to
              convert) and consolidates it into images.csv and failures.csv
  split       ich.steps.split.run on images.csv and sampled.csv

and reports its peak resident memory (ru_maxrss) and the part above the process's memory after
its imports. The CPU model and core count are printed first. The goal (issue 11): every peak well under 1 GB, 750k/100k <= 1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = (100_000, 752_803)
CHUNK = 64                       # preprocess.chunk_size: rows per journal part
IMAGES_PER_PATIENT = 40          # RSNA: 752,803 images of 18,938 patients
IMAGES_PER_SERIES = 35           # RSNA: about 21,744 series (one per study)
# Positive rates of RSNA stage 2 (any, then RSNA_ORDER's subtypes, roughly).
RATES = {"epidural": 0.004, "intraparenchymal": 0.048, "intraventricular": 0.035,
         "subarachnoid": 0.048, "subdural": 0.063}
PHASES = ("index", "sample", "preprocess", "split")
INDEX_CHUNK = 256                # index.chunk_size: files per journal part
LINKS_PER_FILE = 60_000         # ext4 allows 65,000 hard links to one file


def image_ids(n: int) -> np.ndarray:
    """n distinct RSNA-like ids: ID_ and 9 hex digits."""
    rng = np.random.default_rng(0)
    values = rng.choice(16 ** 9, size=n, replace=False)
    return np.array([f"ID_{v:09x}" for v in values])


def simulate(root: Path, n: int, files: bool = True) -> list[str]:
    """Write the simulated inputs for n images under root (the labels CSV; with `files` also
    the DICOM and PNG entries and the preprocess journal); return the config overrides."""
    from ich import journal
    from ich.constants import DICOM_DIR, PNG_DIR, RSNA_ORDER
    from ich.steps import preprocess

    rng = np.random.default_rng(1)
    ids = image_ids(n)
    work = root / "work"
    root.mkdir(parents=True, exist_ok=True)
    labels = rng.random((n, len(RATES))) < np.array(list(RATES.values()))
    labels = np.concatenate([labels, labels.any(axis=1, keepdims=True)], axis=1).astype(np.int8)
    with open(root / "stage_2_train.csv", "w") as handle:
        handle.write("ID,Label\n")
        for start in range(0, n, 50_000):
            block = [f"{image_id}_{sub},{labels[i, j]}\n" for i, image_id in enumerate(ids[start:start + 50_000], start)
                     for j, sub in enumerate(RSNA_ORDER)]
            handle.write("".join(block))
    cfg = config_for(root, n)
    if not files:
        return cfg
    for folder, suffix in ((DICOM_DIR, ".dcm"), (PNG_DIR, ".png")):
        if (work / folder / f"{ids[-1]}{suffix}").exists():
            continue  # kept from an earlier --keep run: the entries are the same
        (work / folder).mkdir(parents=True)
        for i, image_id in enumerate(ids):
            if i % LINKS_PER_FILE == 0:
                blank = root / f"blank-{folder}-{i}"
                blank.touch()
            os.link(blank, work / folder / f"{image_id}{suffix}")
    # Everything but the folder entries is written afresh (a kept folder's tables and journals
    # were consolidated by the last run).
    for name in (".done", preprocess.JOURNAL_DIR, ".index"):
        shutil.rmtree(work / name, ignore_errors=True)
    for name in ("index.parquet", "index_failures.csv", "images.csv", "failures.csv", "labels.csv",
                 "sampled.csv", "splits.csv"):
        (work / name).unlink(missing_ok=True)
    parts = work / preprocess.JOURNAL_DIR / "parts"
    parts.mkdir(parents=True)
    series = rng.permutation(n) // IMAGES_PER_SERIES
    for seq, start in enumerate(range(0, n, CHUNK)):
        rows = []
        for i in range(start, min(n, start + CHUNK)):
            s = int(series[i])
            rows.append({"image_id": ids[i], "patient_id": f"ID_{s * IMAGES_PER_SERIES // IMAGES_PER_PATIENT:08x}",
                         "study_id": f"ID_{s:010x}", "series_id": f"ID_{s:010x}",
                         "position": f"{float(i % IMAGES_PER_SERIES * 5.0 - 80.0)}", "rows": "512",
                         "columns": "512", "pixel_spacing": "0.488281", "storage": "MONOCHROME2",
                         "path": f"{PNG_DIR}/{ids[i]}.png", "reason": ""})
        journal.write_part(parts.parent, f"{1:020d}-{seq:07d}", preprocess._JOURNAL_COLUMNS, rows, "image_id")
    from ich import config
    from ich.stamps import record

    record(preprocess.pixel_stamp(config.load(None, cfg)))
    simulate_index_journal(work, ids, series)
    return cfg


def simulate_index_journal(work: Path, ids: np.ndarray, series: np.ndarray) -> None:
    """The header-index journal of every file of work/dicom/, as read_chunk writes it."""
    from ich import journal
    from ich.io import write_json
    from ich.steps import index

    parts = work / index.JOURNAL_DIR / "parts"
    parts.mkdir(parents=True)
    write_json({"method": index.METHOD}, work / index.JOURNAL_DIR / "settings.json")
    for seq, start in enumerate(range(0, len(ids), INDEX_CHUNK)):
        rows = []
        for i in range(start, min(len(ids), start + INDEX_CHUNK)):
            s = int(series[i])
            rows.append({"image_id": ids[i], "file": f"{ids[i]}.dcm", "sop_uid": ids[i],
                         "patient_id": f"ID_{s * IMAGES_PER_SERIES // IMAGES_PER_PATIENT:08x}",
                         "study_id": f"ID_{s:010x}", "series_id": f"ID_{s:010x}", "modality": "CT",
                         "image_type": "ORIGINAL\\PRIMARY\\AXIAL", "orientation": "1\\0\\0\\0\\1\\0",
                         "normal_x": "0.0", "normal_y": "0.0", "normal_z": "1.0",
                         "position": f"{float(i % IMAGES_PER_SERIES * 5.0 - 80.0)}", "rows": "512",
                         "columns": "512", "pixel_spacing": "0.488281", "rank": "-1", "series_size": "0",
                         "reason": ""})
        journal.write_part(parts.parent, f"{1:020d}-{seq:07d}", index._JOURNAL_COLUMNS, rows, "file")


def config_for(root: Path, n: int) -> list[str]:
    """--set style overrides of the simulated run."""
    return [f"paths.labels_csv={root / 'stage_2_train.csv'}", f"paths.work_dir={root / 'work'}",
            f"paths.dicom_dir={root / 'work' / 'dicom'}", f"sample.per_label={n}",
            "preprocess.workers=1", "index.workers=1"]


def measure(phase: str, overrides: list[str]) -> dict:
    """Run one step in this process (the child); its peak RSS and the RSS after imports, in MB."""
    import logging
    import resource

    from ich import config
    from ich.steps import index, preprocess, sample, split  # noqa: F401  (imports counted in the baseline)

    logging.basicConfig(level=logging.WARNING)
    cfg = config.load(None, overrides)
    baseline = _rss_mb()
    start = time.perf_counter()
    steps = {"index": index, "sample": sample, "preprocess": preprocess, "split": split}
    # index and preprocess resume from their journals (no --force); sample and split redo.
    steps[phase].run(cfg, force=phase in ("sample", "split"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {"phase": phase, "peak_mb": round(peak, 1), "after_imports_mb": round(baseline, 1),
            "seconds": round(time.perf_counter() - start, 1)}


def machine() -> str:
    """The CPU model and core count, for reading the figures."""
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU: {model}, {os.cpu_count()} cores ({usable} usable by this process)"


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    """Simulate each size, run each phase in a child process, print the peaks and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES),
                        help="steps to measure (split needs preprocess before it)")
    parser.add_argument("--keep", type=Path, help="write the simulated folders here and keep them")
    parser.add_argument("--child", nargs=2, metavar=("PHASE", "OVERRIDES_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child[0], json.loads(args.child[1]))))
        return 0

    print(machine(), flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="ich-scale-") as tmp:
        base = args.keep or Path(tmp)
        for n in args.sizes:
            root = base / f"n{n}"
            t0 = time.perf_counter()
            overrides = simulate(root, n, files=args.phases != ["sample"])
            print(f"simulated {n:,} images in {time.perf_counter() - t0:.0f} s under {root}", flush=True)
            for phase in args.phases:
                done = subprocess.run([sys.executable, __file__, "--child", phase, json.dumps(overrides)],
                                      capture_output=True, text=True)
                if done.returncode:
                    sys.stderr.write(done.stderr)
                    return done.returncode
                row = json.loads(done.stdout.strip().splitlines()[-1])
                results[(phase, n)] = row
                print(f"  {phase:<10} {n:>9,} images: peak {row['peak_mb']:7.1f} MB "
                      f"({row['peak_mb'] - row['after_imports_mb']:6.1f} MB above the "
                      f"{row['after_imports_mb']:.0f} MB after imports), {row['seconds']} s", flush=True)
    small, large = min(args.sizes), max(args.sizes)
    if small != large:
        print(f"\nratio of peaks, {large:,} / {small:,} images:")
        for phase in args.phases:
            a, b = results[(phase, small)]["peak_mb"], results[(phase, large)]["peak_mb"]
            print(f"  {phase:<10} {b / a:5.2f}  ({a:.0f} -> {b:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
