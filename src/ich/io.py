"""Atomic file writes and step bookkeeping shared by every step.

A step writes to a temporary file in the destination folder and renames it into place, so a
run killed at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger("ich")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_csv(df, path: str | Path) -> Path:
    """Write a pandas DataFrame as CSV atomically (no index column)."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def write_json(obj, path: str | Path) -> Path:
    """Write JSON atomically, indented for people to read."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class Timer:
    """Wall-clock seconds since creation; `rate(n)` gives items per second."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        """Seconds elapsed."""
        return time.perf_counter() - self.start

    def rate(self, n: int) -> float:
        """Items per second for `n` items."""
        return n / max(self.seconds, 1e-9)


def summary(step: str, text: str, n: int, unit: str, timer: Timer) -> str:
    """Log and return the one summary line every step ends with: counts, seconds, items/s."""
    line = f"{step}: {text} in {timer.seconds:.1f} s ({timer.rate(n):,.1f} {unit}/s)"
    log.info(line)
    return line


def progress(iterable=None, total: int | None = None, desc: str = "", unit: str = "it"):
    """A tqdm progress bar on stderr, shown on terminals and hidden in logs and CI."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=None, dynamic_ncols=True,
                smoothing=0.05)
