"""Benchmark: parse an RSNA-sized long CSV (752,803 images x 6 rows) to the wide table.

Compares ich.data.labels (pyarrow + numpy) with the notebook way (pandas read_csv, str.split on the
ID, drop_duplicates, pivot_table), in the same run, on the same file; prints seconds, rows/s,
peak RSS of each (each in its own subprocess) and the ratio.

    .venv/bin/python bench/sample.py [--images 752803]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

RSNA_ORDER = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")

ICH = """
import time, resource, sys
from ich.data.labels import read_long_csv, long_to_wide
t = time.perf_counter()
wide = long_to_wide(read_long_csv(sys.argv[1]))
print({"seconds": time.perf_counter() - t, "images": len(wide),
       "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
"""

NOTEBOOK = """
import time, resource, sys
import pandas as pd
t = time.perf_counter()
df = pd.read_csv(sys.argv[1]).drop_duplicates()
df[["image_id", "subtype"]] = df["ID"].str.rsplit("_", n=1, expand=True)
wide = df.pivot_table(index="image_id", columns="subtype", values="Label").reset_index()
print({"seconds": time.perf_counter() - t, "images": len(wide),
       "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
"""


def write_csv(path: Path, n_images: int, seed: int = 0) -> int:
    """An RSNA-like long CSV with unique ids, realistic positive rates and 4 duplicated images."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(16 ** 8, size=n_images, replace=False) * 16 + 5
    labels = (rng.random((n_images, 5)) < [0.004, 0.048, 0.035, 0.048, 0.063]).astype(int)
    labels = np.column_stack([labels, labels.max(axis=1)])
    with path.open("w") as f:
        f.write("ID,Label\n")
        for k in list(range(n_images)) + [0, 1, 2, 3]:
            f.write("".join(f"ID_{ids[k]:09x}_{s},{labels[k, j]}\n" for j, s in enumerate(RSNA_ORDER)))
    return (n_images + 4) * 6


def measure(code: str, csv: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", code, str(csv)], check=True, capture_output=True, text=True)
    return eval(out.stdout.strip().splitlines()[-1])  # our own dict literal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=752_803)
    args = parser.parse_args()
    from machine import describe  # bench/machine.py, beside this script

    print(describe(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "stage_2_train.csv"
        rows = write_csv(csv, args.images)
        results = {"ich.data.labels": measure(ICH, csv), "notebook pandas": measure(NOTEBOOK, csv)}
    print(f"{rows:,} rows, {args.images:,} images")
    print(f"{'method':<18}{'seconds':>10}{'rows/s':>14}{'peak RSS MB':>14}")
    for name, r in results.items():
        assert r["images"] == args.images, r
        print(f"{name:<18}{r['seconds']:>10.2f}{rows / r['seconds']:>14,.0f}{r['rss_mb']:>14,.0f}")
    ratio = results["notebook pandas"]["seconds"] / results["ich.data.labels"]["seconds"]
    print(f"speed-up: {ratio:.1f}x")
    print(json.dumps({"speedup": ratio}))


if __name__ == "__main__":
    main()
