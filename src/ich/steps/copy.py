"""Step 2, copy: only the sampled DICOMs, from paths.dicom_dir to work/dicom/, in threads.

In: work/sampled.csv and the source folder (752k files in one folder on RSNA, so files are
addressed by name, never listed). Out: work/dicom/<image_id>.dcm and work/missing.csv (sampled
IDs with no source file). Files already there with the source's size are skipped, so a killed
copy resumes; each copy lands under a temporary name and is renamed, so no half file remains,
and the temporary files of a killed run are deleted at the next start. Before each copy the
destination's free space is checked; a full disk or an I/O error stops the step with a message.
"""

from __future__ import annotations

import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from ich.errors import StepError
from ich.constants import DICOM_DIR, MISSING_CSV, SAMPLED_CSV
from ich.compute import is_machine_error, machine_message
from ich.io import Timer, atomic_path, progress, read_csv, require_free_space, summary, write_csv
from ich.stamps import Stamp, must_run, record

log = logging.getLogger("ich")

SKIPPED, COPIED, MISSING = "skipped", "copied", "missing"


def stamps(cfg: dict) -> list[Stamp]:
    """The copy depends on the source folder, the copy mode and sampled.csv (the source folder
    itself is not listed: on RSNA it holds 752,803 files)."""
    work = Path(cfg["paths"]["work_dir"])
    settings = {"dicom_dir": str(Path(cfg["paths"]["dicom_dir"]).resolve()), "mode": cfg["copy"]["mode"]}
    return [Stamp("copy", work, settings=settings, inputs=[work / SAMPLED_CSV],
                  outputs=[work / DICOM_DIR, work / MISSING_CSV])]


def run(cfg: dict, force: bool = False) -> Path:
    """Copy (or link) every sampled DICOM into work/dicom/; return that folder."""
    work = Path(cfg["paths"]["work_dir"])
    source_dir = Path(cfg["paths"]["dicom_dir"])
    sampled_csv, dest_dir = work / SAMPLED_CSV, work / DICOM_DIR
    mode, workers = cfg["copy"]["mode"], cfg["copy"]["workers"]
    if not sampled_csv.is_file():
        raise StepError(f"{sampled_csv} not found; run `ich sample` first")
    if not source_dir.is_dir():
        raise StepError(f"source DICOM folder {source_dir} not found; set paths.dicom_dir")
    ids = read_csv(sampled_csv, usecols=["image_id"])["image_id"].tolist()
    [stamp] = stamps(cfg)
    if not must_run("copy", stamp, force, dest_dir):
        return dest_dir

    dest_dir.mkdir(parents=True, exist_ok=True)
    for leftover in dest_dir.glob(".*.tmp*"):  # temporary files of a killed run
        leftover.unlink(missing_ok=True)
    timer = Timer()
    outcomes: dict[str, int] = {SKIPPED: 0, COPIED: 0, MISSING: 0}
    missing: list[dict] = []
    fallback_logged = False

    def task(image_id: str) -> tuple[str, str, str]:
        return copy_one(source_dir / f"{image_id}.dcm", dest_dir / f"{image_id}.dcm", mode)

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = pool.map(task, ids)
            for image_id, (outcome, detail, used_mode) in progress(zip(ids, results), total=len(ids),
                                                                   desc="copy", unit="file"):
                outcomes[outcome] += 1
                if outcome == MISSING:
                    missing.append({"image_id": image_id, "reason": detail})
                if used_mode != mode and not fallback_logged:
                    log.warning("copy: %s across file systems is impossible; copying instead", mode)
                    fallback_logged = True
    except OSError as err:
        if not is_machine_error(err):
            raise
        raise StepError(f"copy stopped: {machine_message(err)}. Files copied so far are kept: "
                        "fix the cause and run the same command again") from err
    write_csv(pd.DataFrame(missing, columns=["image_id", "reason"]), work / MISSING_CSV)
    if missing:
        log.warning("copy: %d sampled image(s) have no source file, listed in %s",
                    len(missing), work / MISSING_CSV)
    line = summary("copy", f"{outcomes[COPIED]:,} {mode} done, {outcomes[SKIPPED]:,} already there, "
                   f"{outcomes[MISSING]:,} missing", len(ids), "files", timer)
    record(stamp, line)
    return dest_dir


def copy_one(src: Path, dest: Path, mode: str) -> tuple[str, str, str]:
    """Bring `src` to `dest` by copy, hardlink or symlink; return (outcome, detail, mode used).

    Skips a `dest` that already holds the source's bytes (same size, or the right link).
    """
    try:
        size = src.stat().st_size
    except FileNotFoundError:
        return MISSING, f"no file {src}", mode
    except OSError as err:
        return MISSING, f"cannot read {src}: {err}", mode
    if _already_there(src, dest, size, mode):
        return SKIPPED, "", mode
    if mode == "hardlink":
        try:
            _replace_with_link(dest, lambda tmp: os.link(src, tmp))
            return COPIED, "", mode
        except OSError:
            mode = "copy"  # cross-device link: EXDEV
    if mode == "symlink":
        _replace_with_link(dest, lambda tmp: os.symlink(src.resolve(), tmp))
        return COPIED, "", mode
    require_free_space(dest.parent, size, f"a copy of {src.name}")
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return COPIED, "", mode


def _already_there(src: Path, dest: Path, size: int, mode: str) -> bool:
    if mode == "symlink":
        return dest.is_symlink() and Path(os.readlink(dest)) == src.resolve()
    return dest.exists() and not dest.is_symlink() and dest.stat().st_size == size


def _replace_with_link(dest: Path, make_link) -> None:
    tmp = dest.with_name(f".{dest.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    make_link(tmp)
    os.replace(tmp, dest)
