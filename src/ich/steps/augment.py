"""Step 5, augment: augmented copies of rare-subtype training images -> work/augmented/.

In: work/splits.csv (train rows only; val and test are never read), images.csv (series and
positions) and their PNGs in work/png/, the `augment` config section, input.offsets and the
seed. Out: work/augmented/<id>__aug<k>.png and work/augmented.csv (image_id, source_id, path
relative to work_dir, LABELS, target, series_id, position); with augment.enabled false, a
header-only augmented.csv.

Only training targets are augmented (context-only rows are never targets). With
neighbouring-slice offsets, each copy is made of the target and its neighbours at those
offsets (ordered by position in their series, edges repeating), transformed alike: they are
stacked along the channels and augmented once, then written as the copy (target 1, position 0)
and one context-only file per other offset, `<copy id>__m1.png` for offset -1 and so on
(target 0, position = the offset), all in a series of their own named by the copy's id.

Each copy is seeded from (seed, source id, k), so its pixels do not depend on the number of
workers, the order they run in or where they run: compute.scheduler null uses this machine's
process pool, "local" or a Dask scheduler's address that cluster (ich.distributed; the workers
must see work/png/ and work/augmented/), with the same PNGs byte for byte and the same
manifest. PNGs are written atomically; a killed run resumes and
makes only the copies still missing. A change to the pipeline settings (or to the source
PNGs) discards the old copies; a change to the plan alone (target, cap) keeps the ones
still planned. An unreadable source image is logged and recorded in
augmented/failures.csv, never fatal; so is a source whose worker dies (locally every source of
that task, "augmentation worker crashed with signal 11 (SIGSEGV)"; on Dask that source alone,
"augmentation worker crashed its worker process ...").
"""

from __future__ import annotations

import json
import logging
import functools
from pathlib import Path

import numpy as np
import pandas as pd

from ich import faults
from ich.data.labels import label_counts
from ich.data.offline_augment import augment_copy, copy_seed, offline_pipeline, plan_copies
from ich.compute import map_files
from ich.config import resolve_workers
from ich.errors import StepError
from ich.data.png import read_png
from ich.constants import AUGMENTED_CSV, AUGMENTED_DIR, IMAGES_CSV, LABELS, PNG_DIR, SPLITS_CSV
from ich.data.inputs import neighbour_rows
from ich.io import Timer, atomic_write_bytes, progress, read_csv, summary, write_csv
from ich.stamps import Stamp, must_run, reason, record, record_path

log = logging.getLogger("ich")

# Bump when the offline pipeline changes so old copies are not mistaken for current ones.
METHOD = "albumentations/v1"
OUT_COLUMNS = ["image_id", "source_id", "path", *LABELS, "target", "series_id", "position"]
# Keys of the `augment` section that decide a copy's pixels (the rest only decide the plan).
PIXEL_KEYS = ("hflip_p", "vflip_p", "rotate_limit", "rotate_p", "brightness_limit",
              "contrast_limit", "brightness_contrast_p", "blur_p", "elastic_p", "elastic_alpha",
              "elastic_sigma")
FAILURES_FILE = "failures.csv"     # in augmented/: source images that could not be augmented
_SOURCES_PER_TASK = 16             # amortises inter-process overhead
_COPIES_PER_WORKER = 200           # ~2 s of work per core at 256 px, about a worker's start-up
_FAILURES_LOGGED = 10


def stamps(cfg: dict) -> list[Stamp]:
    """Augmentation depends on the seed, the `augment` section (its worker count aside),
    splits.csv and the preprocessed PNGs (through preprocess's own record)."""
    work = Path(cfg["paths"]["work_dir"])
    settings = {"seed": cfg["seed"], "method": METHOD, "offsets": list(cfg["input"]["offsets"]),
                "augment": {k: v for k, v in cfg["augment"].items() if k != "workers"}}
    return [Stamp("augment", work, settings=settings,
                  inputs=[work / SPLITS_CSV, record_path(work, "preprocess")], outputs=[work / AUGMENTED_CSV])]


def pixel_stamp(cfg: dict) -> Stamp:
    """What the pixels of the copies in augmented/ depend on: a change here remakes every copy,
    while a change of the plan alone (target, cap) keeps the copies still planned."""
    work = Path(cfg["paths"]["work_dir"])
    settings = {"seed": cfg["seed"], "method": METHOD, "offsets": list(cfg["input"]["offsets"]),
                "pixels": {k: cfg["augment"][k] for k in PIXEL_KEYS}}
    return Stamp("augment.pixels", work, settings=settings, inputs=[record_path(work, "preprocess")],
                 outputs=[work / AUGMENTED_DIR])


def run(cfg: dict, force: bool = False) -> Path:
    """Make the augmented copies of the training split; return the augmented.csv path."""
    work = Path(cfg["paths"]["work_dir"])
    aug = cfg["augment"]
    splits_csv, out_csv, out_dir = work / SPLITS_CSV, work / AUGMENTED_CSV, work / AUGMENTED_DIR
    if not splits_csv.is_file():
        raise StepError(f"{splits_csv} not found; run `ich split` first")
    [stamp] = stamps(cfg)
    if not must_run("augment", stamp, force, out_csv):
        return out_csv

    timer = Timer()
    train = _train_rows(work, splits_csv)
    if not aug["enabled"]:
        write_csv(pd.DataFrame(columns=OUT_COLUMNS), out_csv)
        line = summary("augment", f"disabled (augment.enabled: false); wrote a header-only "
                       f"{out_csv.name}, {len(train):,} training images unchanged", 0, "images", timer)
        record(stamp, line)
        return out_csv

    offsets = [int(o) for o in cfg["input"]["offsets"]]
    targets = train[train["target"] == 1].reset_index(drop=True)
    plan = plan_copies(targets, int(aug["target_per_label"]), int(aug["max_copies_per_image"]),
                       int(cfg["seed"]))
    stacks = neighbour_ids(train, offsets)
    plan["path"] = [f"{AUGMENTED_DIR}/{i}.png" for i in plan["image_id"]]
    rows = copy_rows(plan, stacks, train.set_index("image_id"), offsets)
    _prepare_dir(out_dir, pixel_stamp(cfg), force, keep={Path(p).stem for p in rows["path"]})
    todo = plan[[not all((work / p).is_file() for p in rows.loc[rows["copy_of"] == i, "path"])
                 for i in plan["image_id"]]]
    # A worker process takes ~2 s to start (albumentations imports torch): worth it only
    # for a few hundred copies each.
    workers = max(1, min(resolve_workers(aug["workers"]), len(todo) // _COPIES_PER_WORKER))
    pngs = train.set_index("image_id")["png"]
    written, failures = _make_copies(todo, rows, work, {s: list(pngs[stacks[s]]) for s in todo["source_id"]},
                                     aug, int(cfg["seed"]), workers, cfg["compute"]["scheduler"])
    write_csv(pd.DataFrame(failures, columns=["image_id", "path", "reason"]),
              out_dir / FAILURES_FILE)
    failed = {f[0] for f in failures}
    made = plan[~plan["source_id"].isin(failed)]
    write_csv(rows.loc[rows["copy_of"].isin(set(made["image_id"])), OUT_COLUMNS], out_csv)

    _log_counts(targets, made)
    line = summary("augment", f"{len(made):,} copies of {made['source_id'].nunique():,} training "
                   f"images ({written:,} new, {len(plan) - len(todo):,} kept, "
                   f"{len(failed)} source(s) failed) with {workers} worker(s)", written, "images",
                   timer)
    record(stamp, line)
    return out_csv


def _train_rows(work: Path, splits_csv: Path) -> pd.DataFrame:
    """Train rows of splits.csv (image_id, LABELS, target, png path, and from images.csv
    series_id and position); rows without a PNG are dropped."""
    splits = read_csv(splits_csv, dtype={"image_id": str})
    missing = [c for c in ("image_id", "split", *LABELS) if c not in splits.columns]
    if missing:
        raise StepError(f"{splits_csv}: missing columns {missing}; run `ich split --force`")
    if "target" not in splits.columns:
        splits["target"] = 1
    train = splits.loc[splits["split"] == "train", ["image_id", *LABELS, "target"]].reset_index(drop=True)
    images_csv = work / IMAGES_CSV
    geometry = (read_csv(images_csv, dtype={"image_id": str, "series_id": str})
                if images_csv.is_file() else pd.DataFrame(columns=["image_id"]))
    for column, empty in (("series_id", ""), ("position", np.nan)):
        if column not in geometry.columns:
            geometry[column] = empty
    train = train.merge(geometry[["image_id", "series_id", "position"]].drop_duplicates("image_id"),
                        on="image_id", how="left")
    train["series_id"] = train["series_id"].fillna("").astype(str)
    train["png"] = [str(work / PNG_DIR / f"{i}.png") for i in train["image_id"]]
    present = np.array([Path(p).is_file() for p in train["png"]], dtype=bool)
    if not present.all():
        lost = train.loc[~present, "image_id"].tolist()
        log.warning("augment: %d training image(s) have no PNG in %s and are not augmented "
                    "(first: %s); run `ich preprocess`", len(lost), work / PNG_DIR, lost[:5])
    return train[present].reset_index(drop=True)


def neighbour_ids(train: pd.DataFrame, offsets: list[int]) -> dict[str, list[str]]:
    """For every training row, the image ids at `offsets` along its series (edges repeat; a row
    without a series is its own neighbour), as the model input gathers them."""
    rows = neighbour_rows(train["series_id"], train["position"], offsets)
    ids = train["image_id"].to_numpy()
    return {ids[i]: list(ids[r]) for i, r in enumerate(rows)}


def offset_tag(offset: int) -> str:
    """File-name tag of a context slice at `offset`: m1 for -1, p2 for +2."""
    return f"{'m' if offset < 0 else 'p'}{abs(offset)}"


def copy_rows(plan: pd.DataFrame, stacks: dict, train: pd.DataFrame, offsets: list[int]) -> pd.DataFrame:
    """augmented.csv's rows: per planned copy, the copy (target 1, position 0) and a context row
    per other offset (target 0, position = the offset, the neighbour's labels), each copy a
    series of its own; `copy_of` names the copy every row belongs to."""
    out = []
    for copy in plan.itertuples(index=False):
        for offset, neighbour in zip(offsets, stacks[copy.source_id]):
            centre = offset == 0
            image_id = copy.image_id if centre else f"{copy.image_id}__{offset_tag(offset)}"
            labels = {label: getattr(copy, label) for label in LABELS} if centre else \
                {label: int(train.at[neighbour, label]) for label in LABELS}
            out.append({"image_id": image_id, "source_id": copy.source_id if centre else neighbour,
                        "path": f"{AUGMENTED_DIR}/{image_id}.png", **labels, "target": int(centre),
                        "series_id": copy.image_id, "position": float(offset), "copy_of": copy.image_id})
    return pd.DataFrame(out, columns=[*OUT_COLUMNS, "copy_of"])


def _prepare_dir(out_dir: Path, pixels: Stamp, force: bool, keep: set[str]) -> None:
    """Empty out_dir when forced or made with other pixel settings; drop copies no longer planned."""
    out_dir.mkdir(parents=True, exist_ok=True)
    why = reason(pixels)
    reset = force or why is not None
    if reset and not force and why != "never run":
        log.info("augment: remaking every copy (%s)", why)
    removed = 0
    for png in out_dir.glob("*.png"):
        if reset or png.stem not in keep:
            png.unlink()
            removed += 1
    for leftover in out_dir.glob(".*.tmp*"):  # temporary files of a killed run
        leftover.unlink(missing_ok=True)
    if removed and not reset:
        log.info("augment: removed %d copies the current plan no longer needs", removed)
    record(pixels)


def _make_copies(todo: pd.DataFrame, rows: pd.DataFrame, work: Path, sources: dict, aug: dict,
                 seed: int, workers: int, scheduler: str | None = None
                 ) -> tuple[int, list[tuple[str, str, str]]]:
    """Write the copies in `todo` (each: its file per offset, from `rows`); `sources` maps a
    source id to its PNGs at the offsets. Return (copies written, failures as (source_id,
    source path, reason)).

    Where: in this process (one worker or one task), this machine's pool (ich.compute: a
    worker that dies fails its task's sources) or, with `scheduler` (compute.scheduler), the
    Dask cluster (ich.distributed, a task per _SOURCES_PER_TASK sources: a source that kills
    its worker is failed alone, the rest of its task done)."""
    tasks = []
    files = rows.groupby("copy_of", sort=False)["path"].apply(list)
    groups = [(source, [([str(work / p) for p in files[copy_id]], copy_seed(seed, source, int(k)))
                        for copy_id, k in zip(copies["image_id"], copies["copy"])])
              for source, copies in todo.groupby("source_id", sort=False)]
    for start in range(0, len(groups), _SOURCES_PER_TASK):
        chunk = groups[start:start + _SOURCES_PER_TASK]
        tasks.append([(source, sources[source], outs) for source, outs in chunk])
    written, failures = 0, []
    bar = progress(total=len(todo), desc="augment", unit="img")
    if scheduler is not None and tasks:
        from ich import distributed

        for _, results in distributed.map_files(
                augment_chunk, tasks, scheduler, (aug, seed), inputs=[work / PNG_DIR],
                outputs=[work / AUGMENTED_DIR], init=_init_worker, workers=workers,
                failure=lambda entry, why: (0, [(entry[0], entry[1][0], f"augmentation worker {why}")]),
                name=lambda entry: entry[0]):
            for made, failed in results:
                written += made
                bar.update(made)
                failures += failed
    elif workers <= 1 or len(tasks) <= 1:
        results = (augment_task(task, aug, seed) for task in tasks)
        for made, failed in results:
            written += made
            bar.update(made)
            failures += failed
    else:
        # ich.compute: a worker that dies costs only its task's sources, listed as failures.
        run_task = functools.partial(augment_task, aug=aug, seed=seed)
        for result in map_files(run_task, tasks, workers, initializer=_init_worker):
            if not result.ok:
                failures += [(source, paths[0], f"augmentation worker {result.failure}")
                             for source, paths, _ in result.item]
                continue
            made, failed = result.value
            written += made
            bar.update(made)
            failures += failed
    bar.close()
    for source, path, why in failures[:_FAILURES_LOGGED]:
        log.warning("augment: %s (%s): %s", source, path, why)
    if len(failures) > _FAILURES_LOGGED:
        log.warning("augment: ... and %d more failures", len(failures) - _FAILURES_LOGGED)
    return written, sorted(failures)


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already; OpenCV threads would oversubscribe


_PIPELINE: dict = {}   # per process: the pipeline, built once


def augment_task(task: list, aug: dict, seed: int) -> tuple[int, list[tuple[str, str, str]]]:
    """Worker (this machine's pool): augment_source for each entry of `task`, summed.

    Returns (copies written, failures as (source_id, path, reason)).
    """
    made, failures = 0, []
    for n, failed in augment_chunk(task, aug, seed):
        made += n
        failures += failed
    return made, failures


def augment_chunk(task: list, aug: dict, seed: int) -> list[tuple[int, list[tuple[str, str, str]]]]:
    """augment_source for each entry of `task`, one (copies written, failures) each: the unit
    of work handed to a Dask worker (ich.distributed.map_files), which fails an entry alone."""
    key = json.dumps(aug, sort_keys=True)
    if key not in _PIPELINE:
        _PIPELINE.clear()
        _PIPELINE[key] = offline_pipeline(aug, seed)
    return [augment_source(entry, _PIPELINE[key]) for entry in task]


def augment_source(entry: tuple, pipeline) -> tuple[int, list[tuple[str, str, str]]]:
    """Write the copies of one (source_id, source PNGs at the offsets, [(out paths at the
    offsets, copy seed)]): the slices stacked along the channels, augmented once (so alike),
    split back into one PNG each. Returns (copies written, failures as (source_id, path,
    reason)): an unreadable source or a failed encoding is a failure, never an exception."""
    import cv2

    source, source_paths, outs = entry
    faults.check("augment", source)   # tests: a source whose augmentation crashes its worker
    try:
        # Native size: copies keep the source's. One slice per offset, 3 channels each.
        stack = np.concatenate([read_png(path) for path in source_paths], axis=-1)
    except ValueError as err:
        return 0, [(source, source_paths[0], str(err))]
    made = 0
    for out_paths, copy_seed_value in outs:
        copy = augment_copy(pipeline, stack, copy_seed_value)
        encoded = [cv2.imencode(".png", cv2.cvtColor(copy[..., 3 * j:3 * j + 3], cv2.COLOR_RGB2BGR))
                   for j in range(len(out_paths))]
        if not all(ok for ok, _ in encoded):
            return made, [(source, source_paths[0], f"PNG encoding failed for {out_paths[0]}")]
        # A resumed run redoes any copy one of whose files is missing.
        for out_path, (_, data) in zip(out_paths, encoded):
            atomic_write_bytes(out_path, data.tobytes())
        made += 1
    return made, []


def _log_counts(train: pd.DataFrame, made: pd.DataFrame) -> None:
    """Log the training split's positives per label before and after augmentation."""
    before, extra = label_counts(train), label_counts(made)
    keys = [*LABELS, "images"]
    table = pd.DataFrame({"label": keys, "before": [before[k] for k in keys],
                          "after": [before[k] + extra[k] for k in keys]})
    for text in table.to_string(index=False).splitlines():
        log.info("augment: %s", text)
