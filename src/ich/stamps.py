"""One staleness rule for every step: rerun when the settings or the inputs it depends on changed.

In: a `Stamp` per unit of work (a step, or one stage of `train`): the config values its outputs
depend on, the files or folders it reads, and the files it writes. Out: `reason(stamp)`, None
when the unit is up to date, else why it must run ("never run", "output missing: X", "settings
changed: model.stage1_backbone", "input changed: splits.csv"); `record(stamp)` after success.

The record lives at `<folder>/.done/<name>.json` and holds the flattened settings (so a change
is named, not just detected) and an identity per input: the content hash of files up to
HASH_LIMIT bytes (a CSV rewritten with the same rows stays the same input), size and
modification time above it, and for folders a hash of their listing (names and sizes; a
folder of 750,000 DICOMs is listed, never read).
"""

from __future__ import annotations

import hashlib
import heapq
import importlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ich.constants import STEPS
from ich.io import write_json

STAMP_DIR = ".done"
# Files up to this size are identified by their content; larger ones by size and mtime.
HASH_LIMIT = 64 * 1024 * 1024
_READ_BLOCK = 1024 * 1024
_LIST_BLOCK = 65_536      # folder entries gathered per numpy block by listing_digest


@dataclass
class Stamp:
    """What one unit of work depends on and produces."""

    name: str                                     # "sample", "train.stage1", ...
    folder: Path                                  # the stamp is folder/.done/<name>.json
    settings: dict = field(default_factory=dict)  # config values the outputs depend on
    inputs: list[Path] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)

    @property
    def path(self) -> Path:
        """Where the record of the last successful run is kept."""
        return record_path(self.folder, self.name)

    def current(self) -> dict:
        """The settings (flattened) and input identities as they are now."""
        return {"settings": flatten(self.settings),
                "inputs": {_key(p, self.folder): identity(p) for p in self.inputs}}


def record_path(folder: str | Path, name: str) -> Path:
    """The record of unit `name` in `folder`: an input for the units downstream of it (a rerun
    of preprocess rewrites its record, which stales what was built from its PNGs)."""
    return Path(folder) / STAMP_DIR / f"{name}.json"


def must_run(step: str, stamp: Stamp, force: bool, output, also: str | None = None) -> bool:
    """Whether `step` must run, logged either way: "<step>: <output> is up to date (use --force
    to redo)", or "<step>: running (<why>)" with why = forced, the stamp's reason, or `also` (a
    reason to run of the step's own, such as --retry-failed) when the stamp has none."""
    why = "forced" if force else (reason(stamp) or also)
    if why is None:
        logging.getLogger("ich").info("%s: %s is up to date (use --force to redo)", step, output)
        return False
    logging.getLogger("ich").info("%s: running (%s)", step, why)
    return True


def reason(stamp: Stamp) -> str | None:
    """None when `stamp`'s outputs exist and were made from the same settings and inputs,
    else a short sentence saying why the work must be done."""
    try:
        before = json.loads(stamp.path.read_text())
    except FileNotFoundError:
        return "never run"
    except (OSError, json.JSONDecodeError):
        return f"its record {stamp.path} is unreadable"
    missing = [str(p) for p in stamp.outputs if not Path(p).exists()]
    if missing:
        return f"output missing: {', '.join(missing)}"
    return difference(before, stamp.current())


def difference(before: dict, now: dict) -> str | None:
    """Name the settings and inputs that differ between two `Stamp.current()` records."""
    parts = []
    settings_a, settings_b = before.get("settings", {}), now["settings"]
    changed = sorted(k for k in set(settings_a) | set(settings_b) if settings_a.get(k) != settings_b.get(k))
    if changed:
        parts.append(f"settings changed: {', '.join(changed)}")
    inputs_a, inputs_b = before.get("inputs", {}), now["inputs"]
    changed = sorted(k for k in set(inputs_a) | set(inputs_b) if inputs_a.get(k) != inputs_b.get(k))
    if changed:
        parts.append(f"input changed: {', '.join(changed)}")
    return "; ".join(parts) or None


def record(stamp: Stamp, summary_line: str = "") -> Path:
    """Record that `stamp`'s work finished now, from its current settings and inputs."""
    return write_json({**stamp.current(), "summary": summary_line,
                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, stamp.path)


def clear(stamp: Stamp) -> None:
    """Forget that `stamp`'s work finished (before redoing it)."""
    stamp.path.unlink(missing_ok=True)


def identity(path: str | Path) -> str | None:
    """A string that changes when the file or folder at `path` changes; None when it is absent."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    if path.is_dir():
        return f"dir:{listing_digest(path)}"
    if info.st_size > HASH_LIMIT:
        return f"size:{info.st_size}:mtime:{info.st_mtime_ns}"
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_READ_BLOCK), b""):
            digest.update(block)
    return f"sha1:{digest.hexdigest()}"


def listing_digest(folder: str | Path) -> str:
    """SHA-1 of a folder's listing: "name\\0size\\n" for each entry not starting with a dot, in
    name order (size -1 for a subfolder). It changes exactly when an entry is added, removed or
    changes size.

    Flat memory (issue 11): names and sizes are gathered in numpy blocks of _LIST_BLOCK entries
    (about 30 bytes an entry for RSNA's names, where a sorted list of (name, size) tuples took
    about 150), each block sorted on its own and the blocks merged by heapq.merge. Names are
    compared as their file-system bytes (UTF-8), which orders them as Python orders the names.
    """
    names: list[bytes] = []
    sizes: list[int] = []
    blocks: list[tuple[np.ndarray, np.ndarray]] = []

    def close_block() -> None:
        block = np.array(names, dtype=bytes)
        order = np.argsort(block, kind="stable")
        blocks.append((block[order], np.array(sizes, dtype=np.int64)[order]))
        names.clear()
        sizes.clear()

    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            names.append(os.fsencode(entry.name))
            sizes.append(entry.stat().st_size if entry.is_file() else -1)
            if len(names) == _LIST_BLOCK:
                close_block()
    if names:
        close_block()
    digest = hashlib.sha1()
    # Element by element from the arrays (never a list of the whole block); a numpy bytes
    # array drops trailing NUL bytes, which no file name has.
    for name, size in heapq.merge(*(zip(block, block_sizes) for block, block_sizes in blocks)):
        digest.update(b"%s\0%d\n" % (name, size))
    return digest.hexdigest()


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}, values normalised through JSON (tuples become lists)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.loads(json.dumps(value))
    return flat


def _key(path: Path, folder: Path) -> str:
    """Inputs inside the stamp's folder are named relative to it, so a moved folder stays fresh."""
    path = Path(path)
    try:
        return path.resolve().relative_to(Path(folder).resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def step_stamps(cfg: dict, step: str) -> list[Stamp]:
    """The stamps of pipeline step `step` (its module's `stamps(cfg)`)."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; valid: {', '.join(STEPS)}")
    return importlib.import_module(f"ich.steps.{step}").stamps(cfg)


def step_reason(cfg: dict, step: str) -> str | None:
    """None when `step` is up to date under `cfg`, else why it would run (the first stale unit)."""
    for stamp in step_stamps(cfg, step):
        why = reason(stamp)
        if why is not None:
            return why if stamp.name == step else f"{stamp.name}: {why}"
    return None
