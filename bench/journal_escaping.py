"""Benchmark: what the formula escaping of ich's journals costs (ich.journal.write_rows /
read_rows, which pass every cell through ich.io.safe_cell / read_cell) against the csv module's
plain DictWriter / DictReader on the same rows, in the same run, interleaved rounds. Prints
seconds of each, the ratio, and the extra seconds extrapolated to RSNA's 752,803 images.

    .venv/bin/python bench/journal_escaping.py [--rows 100000] [--columns 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

from machine import describe

RSNA_IMAGES = 752_803


def plain_write(path: Path, columns: list[str], rows: list[dict]) -> None:
    """The baseline writer: csv.DictWriter, no escaping."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plain_read(path: Path) -> int:
    """The baseline reader: csv.DictReader, no un-escaping. Returns the row count."""
    with path.open(newline="") as handle:
        return sum(1 for _ in csv.DictReader(handle))


def main() -> None:
    """Time both ways on the same rows and print the ratios."""
    from ich import journal

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--columns", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(describe())
    columns = [f"c{j}" for j in range(args.columns)]
    # Cells like ich's: ids and paths, a few starting with a formula character (escaped on disk).
    rows = [{c: (f"=ID_{i:08x}" if i % 100 == 0 else f"ID_{i:08x}_{c}") for c in columns}
            for i in range(args.rows)]
    best = {"ich write": float("inf"), "plain write": float("inf"),
            "ich read": float("inf"), "plain read": float("inf")}
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = Path(tmp) / "ich.csv", Path(tmp) / "plain.csv"
        for _ in range(args.rounds):
            for name, work in (("ich write", lambda: journal.write_rows(ours, columns, rows)),
                               ("plain write", lambda: plain_write(theirs, columns, rows)),
                               ("ich read", lambda: sum(1 for _ in journal.read_rows(ours, columns))),
                               ("plain read", lambda: plain_read(theirs))):
                start = time.perf_counter()
                work()
                best[name] = min(best[name], time.perf_counter() - start)
    extra = best["ich write"] - best["plain write"] + best["ich read"] - best["plain read"]
    print(f"{args.rows:,} rows x {args.columns} columns, best of {args.rounds} rounds:")
    for way in ("write", "read"):
        print(f"  {way}: ich {best['ich ' + way]:.2f} s, plain csv {best['plain ' + way]:.2f} s, "
              f"ratio {best['ich ' + way] / best['plain ' + way]:.2f}x")
    print(f"  extra for write + read at {RSNA_IMAGES:,} rows: {extra * RSNA_IMAGES / args.rows:.1f} s")


if __name__ == "__main__":
    main()
