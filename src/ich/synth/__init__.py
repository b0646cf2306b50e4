"""Phantom head CT in the exact RSNA 2019 file layout, for demos and tests.

In: a number of patients, slices per study, a seed (and the image size, the difficulty in
ich.synth.hardness, whether to write lesion masks). Out, under OUT_DIR:
  stage_2_train/ID_<9 hex>.dcm   one file per slice, RSNA tags and storage quirks
  stage_2_train.csv              ID,Label; six rows per image in RSNA order, a few duplicates
  truth.csv                      image_id, patient/study/series, position, storage, labels:
                                 for tests and inspection only, the pipeline never reads it
  masks/ID_<9 hex>.png           with masks=True (`ich synth --masks`): uint8, the slice's
                                 pixel grid, bit i set where the blood of SUBTYPES[i] shows
                                 (for checking where explanations point; never read by steps)
Every later step treats OUT_DIR exactly like the real data set.

Determinism: a plan drawn from the seed fixes ids, subtypes per patient and storage variants;
each patient is then rendered from its own SeedSequence(seed, spawn_key=(index,)), so the
same seed gives byte-identical files whatever the number of workers. A re-run regenerates
every file (atomically); files in stage_2_train/ that are not part of the set are left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ich.constants import LABELS, RSNA_ORDER, SUBTYPES
from ich.io import Timer, atomic_write_bytes, atomic_write_text, progress, summary, write_csv
from ich.synth.anatomy import sample_head
from ich.synth.hardness import extra_mimics, harden_lesions, parse_difficulty, sample_artifacts
from ich.synth.lesions import KIND_FRACTIONS, sample_lesions, sample_mimics
from ich.synth.storage import SliceTags, Storage, build_dataset, encode, sample_storage, storage_deck, write
from ich.synth.study import Scan, render_scan, sample_geometry

log = logging.getLogger("ich")

IMAGE_DIR = "stage_2_train"
LABELS_CSV = "stage_2_train.csv"
TRUTH_CSV = "truth.csv"
MASK_DIR = "masks"
SECOND_STUDY_FRACTION = 0.15     # patients scanned twice (RSNA patients have up to 15 studies)
NONSQUARE_FRACTION = 0.07
POSITIVE_CUT = 0.35             # fraction of bleeding patients removed at difficulty 1
DUPLICATE_EVERY = 250            # one image block listed twice per this many images (at least one)


@dataclass(frozen=True)
class StudyPlan:
    """Ids and storage of one study (one series)."""

    study_id: str
    series_id: str
    image_ids: tuple[str, ...]    # slice order, lowest first
    storage: Storage
    nonsquare: bool


@dataclass(frozen=True)
class PatientPlan:
    """What the seed fixes for one patient before rendering."""

    seed: int
    index: int
    patient_id: str
    kinds: tuple[str, ...]        # hemorrhage subtypes present
    studies: tuple[StudyPlan, ...]
    difficulty: float = 0.0       # ich.synth.hardness: 0 = the original phantoms


def _hex_ids(rng: np.random.Generator, n: int, digits: int, taken: set) -> list[str]:
    out = []
    while len(out) < n:
        value = f"ID_{int(rng.integers(0, 16 ** digits)):0{digits}x}"
        if value not in taken:
            taken.add(value)
            out.append(value)
    return out


def _pick(rng: np.random.Generator, n: int, fraction: float) -> set[int]:
    """round(fraction * n) distinct indices (at least one), so small sets still have each."""
    k = min(n, max(1, round(fraction * n)))
    return set(rng.choice(n, size=k, replace=False).tolist())


def plan_dataset(seed: int, patients: int, slices: int, difficulty: float = 0.0) -> list[PatientPlan]:
    """The seed's plan: ids, subtypes per patient, studies and storage variants; `difficulty`
    > 0 gives fewer patients with bleeds (and so other ids) as well as harder rendering."""
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    # Harder sets have fewer bleeding patients: ~19 % positive slices at difficulty 1 (RSNA: 14 %).
    cut = 1.0 - POSITIVE_CUT * difficulty
    kinds = {kind: _pick(rng, patients, f * cut) for kind, f in KIND_FRACTIONS.items()}
    twice = _pick(rng, patients, SECOND_STUDY_FRACTION) if patients > 1 else set()
    n_studies = [2 if i in twice else 1 for i in range(patients)]
    variants = iter(storage_deck(rng, sum(n_studies)))
    taken: set[str] = set()
    plans = []
    for i in range(patients):
        patient_id = _hex_ids(rng, 1, 8, taken)[0]
        studies = []
        for _ in range(n_studies[i]):
            study_id, series_id = _hex_ids(rng, 2, 10, taken)
            studies.append(StudyPlan(study_id, series_id, tuple(_hex_ids(rng, slices, 9, taken)),
                                     sample_storage(rng, next(variants)),
                                     bool(rng.random() < NONSQUARE_FRACTION)))
        plans.append(PatientPlan(seed, i, patient_id,
                                 tuple(k for k in SUBTYPES if i in kinds[k]), tuple(studies),
                                 float(difficulty)))
    return plans


def simulate_patient(plan: PatientPlan, slices: int, size: int = 512) -> Iterator[tuple[StudyPlan, Scan]]:
    """Render the patient's studies one by one: (study plan, scan). The follow-up study shows
    the same head and lesions, smaller, in a new position."""
    rng = np.random.default_rng(np.random.SeedSequence(plan.seed, spawn_key=(plan.index,)))
    head = sample_head(rng)
    lesions = sample_lesions(rng, plan.kinds, head)
    mimics = sample_mimics(rng, head)
    hard_rng = None
    if plan.difficulty > 0:
        # A stream of its own: difficulty 0 draws nothing from it and renders as before.
        hard_rng = np.random.default_rng(np.random.SeedSequence(plan.seed, spawn_key=(plan.index, 3)))
        lesions = harden_lesions(hard_rng, lesions, plan.difficulty)
        mimics = mimics + extra_mimics(hard_rng, head, plan.difficulty)
    for j, study in enumerate(plan.studies):
        if j:
            lesions = [lesion.evolve(rng) for lesion in lesions]
        geometry = sample_geometry(rng, head, size, slices, study.nonsquare)
        artifacts = sample_artifacts(hard_rng, plan.difficulty) if hard_rng is not None else None
        yield study, render_scan(head, lesions, mimics, geometry, slices, rng, artifacts)


def _media_uid(rng: np.random.Generator, prefix: str) -> str:
    """A numeric file-meta UID like the RSNA files' ('9999.' and 39 digits)."""
    digits = "".join(map(str, rng.integers(0, 10, size=38)))
    return f"{prefix}{int(rng.integers(1, 10))}{digits}"


def write_patient(plan: PatientPlan, slices: int, size: int, image_dir: Path,
                  mask_dir: Path | None = None) -> list[dict]:
    """Render and write all slices of one patient (and, with `mask_dir`, each slice's blood
    mask as <image_id>.png there); return their truth rows."""
    rows = []
    uid_rng = np.random.default_rng(np.random.SeedSequence(plan.seed, spawn_key=(plan.index, 1)))
    for study, scan in simulate_patient(plan, slices, size):
        g = scan.geometry
        prefix = "9999." if uid_rng.random() < 0.8 else "1.2.840.4267.32."
        normal = g.normal
        for k, image_id in enumerate(study.image_ids):
            position = g.position(k)
            tags = SliceTags(image_id, plan.patient_id, study.study_id, study.series_id,
                             _media_uid(uid_rng, prefix), position, g.orientation, g.spacing)
            write(build_dataset(encode(scan.hu[k], study.storage), study.storage, tags),
                  image_dir / f"{image_id}.dcm")
            if mask_dir is not None:
                _write_mask(scan.masks[k], mask_dir / f"{image_id}.png")
            subtype = dict(zip(SUBTYPES, scan.labels[k].tolist()))
            row = {"image_id": image_id, "patient_id": plan.patient_id,
                   "study_id": study.study_id, "series_id": study.series_id, "slice": k,
                   "position": round(float(np.dot(position, normal)), 4), "rows": g.rows,
                   "columns": g.cols, "pixel_spacing": round(g.spacing, 6),
                   "storage": study.storage.describe()}
            row.update({label: int(any(subtype.values())) if label == "any" else subtype[label]
                        for label in LABELS})
            rows.append(row)
    return rows


def _write_mask(mask: np.ndarray, path: Path) -> None:
    import cv2

    ok, data = cv2.imencode(".png", np.ascontiguousarray(mask, dtype=np.uint8))
    if not ok:
        raise OSError(f"could not encode the mask {path}")
    atomic_write_bytes(path, data.tobytes())


def _write_patient_task(args) -> list[dict]:
    return write_patient(*args)


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already; cv2 threads would oversubscribe


def labels_csv_text(truth_rows: list[dict], rng: np.random.Generator) -> str:
    """The RSNA long CSV: images in random order, six rows each in RSNA_ORDER, and a few
    image blocks listed twice with the same labels (as in the real file)."""
    order = rng.permutation(len(truth_rows)).tolist()
    n_dup = min(len(order), max(1, len(order) // DUPLICATE_EVERY))
    for src in rng.choice(len(truth_rows), size=n_dup, replace=False).tolist():
        order.insert(int(rng.integers(0, len(order) + 1)), src)
    lines = ["ID,Label"]
    for i in order:
        row = truth_rows[i]
        lines.extend(f"{row['image_id']}_{label},{row[label]}" for label in RSNA_ORDER)
    return "\n".join(lines) + "\n"


def generate(out_dir: Path, patients: int, slices: int, seed: int, workers="auto",
             size: int = 512, difficulty=0.0, masks: bool = False) -> Path:
    """Write a phantom data set in the RSNA layout under `out_dir` (see the module doc) and
    return `out_dir`. `size` is the image side (512 like RSNA; smaller for fast tests);
    `workers` processes render patients in parallel ('auto' = all cores); `difficulty`
    (ich.synth.hardness: 0 / 'easy' = the original phantoms ... 1 / 'hard'); `masks` also writes
    out_dir/masks/<image_id>.png (the images and labels are the same either way)."""
    from ich.errors import StepError
    from ich.config import resolve_workers

    if patients < 1 or slices < 1:
        raise StepError(f"synth needs --patients >= 1 and --slices >= 1, got {patients} and {slices}")
    if size < 64 or size % 2:
        raise StepError(f"synth image size must be an even number >= 64, got {size}")
    try:
        difficulty = parse_difficulty(difficulty)
    except ValueError as err:
        raise StepError(f"synth: {err}") from err
    timer = Timer()
    out_dir = Path(out_dir)
    image_dir = out_dir / IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    plans = plan_dataset(seed, patients, slices, difficulty)
    expected = {f"{i}.dcm" for p in plans for s in p.studies for i in s.image_ids}
    foreign = sum(1 for f in image_dir.glob("*.dcm") if f.name not in expected)
    if foreign:
        log.warning("synth: %d .dcm files in %s are not part of this set (another seed or size?); "
                    "left alone, but not listed in %s", foreign, image_dir, LABELS_CSV)
    n_workers = max(1, min(resolve_workers(workers), patients))
    mask_dir = out_dir / MASK_DIR if masks else None
    if mask_dir is not None:
        mask_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(plan, slices, size, image_dir, mask_dir) for plan in plans]
    rows: list[dict] = []
    bar = progress(total=len(expected), desc="synth", unit="img")
    if n_workers == 1:
        _init_worker()
        results = map(_write_patient_task, tasks)
        for r in results:
            rows.extend(r)
            bar.update(len(r))
    else:
        from ich.compute import map_files

        for result in map_files(_write_patient_task, tasks, n_workers, initializer=_init_worker,
                                ordered=True):
            if not result.ok:
                raise StepError(f"synth: the worker writing patient {result.item[0].patient_id} "
                                f"{result.failure}; run the same command again")
            rows.extend(result.value)
            bar.update(len(result.value))
    bar.close()
    csv_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(patients, 2)))
    atomic_write_text(out_dir / LABELS_CSV, labels_csv_text(rows, csv_rng))
    import pandas as pd

    write_csv(pd.DataFrame(rows), out_dir / TRUTH_CSV)
    counts = ", ".join(f"{label} {sum(r[label] for r in rows)}" for label in LABELS)
    n_studies = sum(len(p.studies) for p in plans)
    positive = sum(r["any"] for r in rows) / max(len(rows), 1)
    summary("synth", f"{len(rows)} images, {n_studies} studies of {patients} patients "
            f"({size} px, difficulty {difficulty:g}, {100 * positive:.1f}% positive slices; positive: {counts}) -> {out_dir}", len(rows), "images", timer)
    return out_dir
