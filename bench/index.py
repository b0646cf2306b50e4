"""Benchmark: the index step against a plain `pydicom.dcmread` loop, same files, same run.

Data: phantom head CT slices in the RSNA format from ich.synth (512x512 by default, like RSNA),
or any folder of .dcm files with --dir. Baseline, one process: `pydicom.dcmread(f)` on every
file (the whole file, pixel data included, as a notebook would to get the headers), then the
same fields taken from the dataset. Step: ich.steps.index end to end (listing, workers,
journal, consolidation into index.parquet), with workers=1 and with workers=auto. Each runs
in its own subprocess, from a cold start of the Python process; prints files/s, peak RSS and
the ratios against the baseline.

    .venv/bin/python bench/index.py [--files 2000] [--size 512] [--dir FOLDER] [--workers auto]

The page cache is warm for every variant after the data is written (or after the first
pass): this measures parsing, not the disk. On RSNA (752,803 files, ~450 GB) on a network
disk, reading is the limit: try index.pool=thread there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PEAK_RSS = """
def peak_rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

BASELINE = PEAK_RSS + """
import json, sys, time, warnings
from pathlib import Path
import numpy as np, pydicom
warnings.simplefilter("ignore")
files = sorted(Path(sys.argv[1]).glob("*.dcm"))
t, rows = time.perf_counter(), []
for f in files:
    try:
        ds = pydicom.dcmread(f)
        o = [float(v) for v in ds.ImageOrientationPatient]
        n = np.cross(o[:3], o[3:])
        rows.append((f.stem, ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                     float(np.dot(n, [float(v) for v in ds.ImagePositionPatient])), ds.Rows, ds.Columns))
    except Exception:
        pass
seconds = time.perf_counter() - t
print(json.dumps({"files": len(rows), "seconds": seconds, "rss_mb": peak_rss_mb()}))
"""

STEP = PEAK_RSS + """
import json, logging, resource, sys, time
from ich import config
from ich.steps import index
cfg = config.load(None, [f"paths.dicom_dir={sys.argv[1]}", f"paths.work_dir={sys.argv[2]}",
                         f"index.workers={sys.argv[3]}", f"index.pool={sys.argv[4]}"])
t = time.perf_counter()
out = index.run(cfg, force=True)
seconds = time.perf_counter() - t
import pyarrow.parquet as pq
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"files": pq.read_metadata(out).num_rows, "seconds": seconds,
                  "rss_mb": peak_rss_mb() + children}))
"""


def _run(code: str, *args: str) -> dict:
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"benchmark subprocess failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Write (or take) the files, time the three variants, print a table of files/s and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2000, help="phantom slices to write (ignored with --dir)")
    parser.add_argument("--size", type=int, default=512, help="phantom image side (RSNA: 512)")
    parser.add_argument("--dir", help="a folder of .dcm files to index instead of phantoms")
    parser.add_argument("--workers", default="auto", help="workers of the parallel variant")
    args = parser.parse_args()
    from machine import describe  # bench/machine.py, beside this script

    print(describe(), flush=True)
    sys.path.insert(0, str(REPO / "src"))
    with tempfile.TemporaryDirectory(prefix="ich-bench-index-") as tmp:
        tmp = Path(tmp)
        if args.dir:
            source = Path(args.dir)
        else:
            from ich.synth import generate

            slices = 24
            patients = max(1, round(args.files / slices / 1.15))  # ~15 % of patients have two studies
            generate(tmp / "synth", patients=patients, slices=slices, seed=0, size=args.size)
            source = tmp / "synth" / "stage_2_train"
        _run(BASELINE, str(source))  # warm the page cache once, untimed
        base = _run(BASELINE, str(source))
        one = _run(STEP, str(source), str(tmp / "w1"), "1", "process")
        many = _run(STEP, str(source), str(tmp / "wn"), str(args.workers), "process")
        threads = _run(STEP, str(source), str(tmp / "wt"), str(args.workers), "thread")
    rate = {name: r["files"] / r["seconds"] for name, r in
            (("baseline", base), ("one", one), ("many", many), ("threads", threads))}
    print(f"{'variant':44s} {'files':>7s} {'files/s':>9s} {'x baseline':>10s} {'peak RSS MB':>11s}")
    for key, label, r in (("baseline", "pydicom.dcmread loop (whole file)", base),
                          ("one", "ich index, 1 process", one),
                          ("many", f"ich index, workers={args.workers} processes", many),
                          ("threads", f"ich index, workers={args.workers} threads", threads)):
        print(f"{label:44s} {r['files']:7d} {rate[key]:9.0f} {rate[key] / rate['baseline']:10.2f} "
              f"{r['rss_mb']:11.0f}")


if __name__ == "__main__":
    main()
