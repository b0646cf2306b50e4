"""Training data: split tables, PNG decoding, the packed per-split cache, batches.

In: the work dir's splits.csv, images.csv and augmented.csv, the PNGs they point to, and the
input description (ich.data.inputs.InputSpec). Out: tables (image_id, absolute path, LABELS,
series_id, position, target), uint8 (N, S, S, 3) arrays or memory maps of a split's slices,
and keras.utils.PyDataset batches of float32 model inputs (N, S, S, C) in [0, 1] with float32
labels. Neighbouring slices are gathered at load time by row index into the split's one cache,
never duplicated on disk.
"""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import keras
import numpy as np
import pandas as pd

from ich.constants import AUGMENTED_CSV, IMAGES_CSV, LABELS, PACKED_DIR, SPLITS, SPLITS_CSV
from ich.data.inputs import PNG_CHANNELS, InputSpec, neighbour_rows
from ich.data.png import read_png
from ich.io import atomic_path, read_csv, require_free_space
from ich.stamps import Stamp, reason, record, record_path

# Images decoded per chunk while packing: bounds memory to chunk * S * S * 3 bytes.
PACK_CHUNK = 256
TARGET = "target"  # 0 for context-only rows (a neighbour of a sampled slice, never a training target)


def split_table(work_dir: Path, split: str, include_augmented: bool) -> pd.DataFrame:
    """Rows of one split: image_id, path (absolute PNG path, str), the LABELS columns, study_id,
    series_id and position (for neighbouring slices) and target (1 = a training target).

    In: the work dir holding splits.csv and images.csv (and augmented.csv, whose rows are added
    to the train split when `include_augmented`; an augmented copy is a series of its own).
    Rows that splits.csv marks `target` 0 are context only. Raises FileNotFoundError naming a
    missing file and the step that writes it; ValueError for an unknown split or images
    without a PNG.
    """
    work_dir = Path(work_dir)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")
    splits = _read_csv(work_dir / SPLITS_CSV, "split", ["image_id", "split", *LABELS])
    images = _read_csv(work_dir / IMAGES_CSV, "preprocess", ["image_id", "path"])
    for column, empty in (("series_id", ""), ("position", np.nan)):
        if column not in images.columns:
            images[column] = empty
    if TARGET not in splits.columns:
        splits[TARGET] = 1
    if "study_id" not in splits.columns:
        splits["study_id"] = ""
    rows = splits.loc[splits["split"] == split, ["image_id", *LABELS, TARGET, "study_id"]]
    table = rows.merge(images[["image_id", "path", "series_id", "position"]], on="image_id", how="left")
    lost = table.loc[table["path"].isna(), "image_id"].tolist()
    if lost:
        raise ValueError(f"{work_dir / SPLITS_CSV}: {len(lost)} {split} images have no row in "
                         f"{IMAGES_CSV} (first: {lost[:3]}); run `ich split --force` to rebuild it")
    if include_augmented and split == "train" and (work_dir / AUGMENTED_CSV).is_file():
        augmented = _read_csv(work_dir / AUGMENTED_CSV, "augment", ["image_id", "path", *LABELS])
        if len(augmented):  # header only when augmentation is off
            # Each copy is a series of its own: with context, its augmented neighbours (target 0).
            defaults = {TARGET: 1, "series_id": "", "position": np.nan}
            for column, value in defaults.items():
                if column not in augmented.columns:
                    augmented[column] = value
            extra = augmented[["image_id", *LABELS, "path", *defaults]].assign(study_id="")
            table = pd.concat([table, extra], ignore_index=True)
    table["path"] = [str(work_dir / p) for p in table["path"]]
    table[[*LABELS, TARGET]] = table[[*LABELS, TARGET]].astype(np.int64)
    for column in ("series_id", "study_id"):
        table[column] = table[column].fillna("").astype(str)
    return table[["image_id", "path", *LABELS, "study_id", "series_id", "position",
                  TARGET]].reset_index(drop=True)


def _read_csv(path: Path, step: str, columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `ich {step}` first")
    table = read_csv(path, dtype={"image_id": str, "path": str, "series_id": str, "study_id": str})
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; run `ich {step} --force` to rewrite it")
    return table


def load_array(paths: Sequence[str | Path], image_size: int, workers: int) -> np.ndarray:
    """Decode PNGs into one uint8 array (N, image_size, image_size, 3), in the order given.

    Uses `workers` threads (OpenCV releases the GIL while decoding). A missing or corrupt PNG
    raises ValueError naming the file.
    """
    out = np.empty((len(paths), image_size, image_size, PNG_CHANNELS), dtype=np.uint8)
    _fill(out, paths, image_size, workers)
    return out


def _fill(out: np.ndarray, paths: Sequence[str | Path], image_size: int, workers: int) -> None:
    def decode(i: int) -> None:
        out[i] = read_png(paths[i], image_size)

    if workers <= 1 or len(paths) <= 1:
        for i in range(len(paths)):
            decode(i)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # list() re-raises the first decoding error in this thread.
        list(pool.map(decode, range(len(paths))))


def packed(work_dir: Path, split: str, table: pd.DataFrame, image_size: int,
           workers: int = 1) -> np.memmap:
    """The split's images as a read-only uint8 memory map (N, image_size, image_size, 3).

    Cached at work_dir/packed/<split>_<size>.npy. Reused while the stamp rule says so: the same
    image ids in the same order, and the same preprocess and augment records (a rerun of either
    rewrites PNGs); otherwise rebuilt in chunks (flat memory) into a temp file renamed into place.
    """
    work_dir = Path(work_dir)
    npy = work_dir / PACKED_DIR / f"{split}_{image_size}.npy"
    ids = table["image_id"].astype(str).tolist()
    paths = table["path"].astype(str).tolist()
    stamp = Stamp(f"packed.{split}_{image_size}", work_dir,
                  settings={"ids": hashlib.sha1("\n".join(ids).encode()).hexdigest(), "n": len(ids)},
                  inputs=[record_path(work_dir, "preprocess"), record_path(work_dir, "augment")],
                  outputs=[npy])
    if reason(stamp) is None:
        cached = np.load(npy, mmap_mode="r")
        if cached.shape == (len(ids), image_size, image_size, PNG_CHANNELS) and cached.dtype == np.uint8:
            return cached
    # issue 10: a full disk under a memory map is a bus error, not an exception, so check the
    # space first; and drop the temporary caches of killed builds (atomic_path's names).
    for leftover in npy.parent.glob(f".{npy.name}.*.tmp.npy"):
        leftover.unlink(missing_ok=True)
    require_free_space(npy.parent, len(ids) * image_size * image_size * PNG_CHANNELS,
                       f"the packed {split} cache")
    with atomic_path(npy) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                          shape=(len(ids), image_size, image_size, PNG_CHANNELS))
        for start in range(0, len(ids), PACK_CHUNK):
            stop = min(start + PACK_CHUNK, len(ids))
            array[start:stop] = load_array(paths[start:stop], image_size, workers)
        array.flush()
        del array
    record(stamp)
    return np.load(npy, mmap_mode="r")


class PngImages:
    """Array-like view of PNG files: `images[indices]` decodes them into uint8 (n, S, S, 3)."""

    def __init__(self, paths: Sequence[str | Path], image_size: int, workers: int = 1):
        self.paths = [str(p) for p in paths]
        self.image_size = image_size
        self.workers = workers
        self.shape = (len(self.paths), image_size, image_size, PNG_CHANNELS)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, indices) -> np.ndarray:
        picked = [self.paths[i] for i in np.atleast_1d(np.asarray(indices))]
        return load_array(picked, self.image_size, self.workers)


class Batches(keras.utils.PyDataset):
    """Batches of (float32 model inputs in [0, 1], float32 labels) for Keras fit/predict.

    In: `images` uint8 (N, S, S, 3) slices, array-like (array, np.memmap or PngImages);
    `labels` (M, k), one row per candidate input; `neighbours` (M, len(spec.offsets)) rows of
    `images` that make up each input (default: input m is slice m alone, M == N); `spec` the
    input description that assembles the gathered slices into channels (default: the three
    PNG channels of one slice); `indices` optionally picks the inputs used (e.g. the positives
    for stage 2) without copying anything. Shuffled per epoch from (seed, epoch) when
    `shuffle`; the last partial batch is kept; len = ceil(n / batch_size). Extra keyword
    arguments (workers, use_multiprocessing, max_queue_size) go to keras.utils.PyDataset.
    """

    def __init__(self, images, labels: np.ndarray, batch_size: int, shuffle: bool, seed: int,
                 indices: np.ndarray | None = None, neighbours: np.ndarray | None = None,
                 spec: InputSpec | None = None, **pydataset_kwargs):
        super().__init__(**pydataset_kwargs)
        labels = np.asarray(labels, dtype=np.float32)
        if labels.ndim == 1:
            labels = labels[:, None]
        if neighbours is None:
            if len(labels) != len(images):
                raise ValueError(f"Batches: {len(images)} images but {len(labels)} label rows")
            neighbours = np.arange(len(labels))[:, None]
        neighbours = np.asarray(neighbours, dtype=np.int64)
        if neighbours.ndim != 2 or len(neighbours) != len(labels):
            raise ValueError(f"Batches: neighbours {neighbours.shape} must be ({len(labels)}, offsets)")
        if spec is not None and neighbours.shape[1] != len(spec.offsets):
            raise ValueError(f"Batches: {neighbours.shape[1]} slices per input but the input "
                             f"description has offsets {list(spec.offsets)}")
        if batch_size < 1:
            raise ValueError(f"Batches: batch_size must be at least 1, got {batch_size}")
        self.images = images
        self.labels = labels
        self.neighbours = neighbours
        self.spec = spec
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = seed
        self.rows = np.arange(len(labels)) if indices is None else np.asarray(indices, np.int64)
        self.epoch = 0
        self.order = self._order()

    @classmethod
    def from_paths(cls, paths: Sequence[str | Path], labels: np.ndarray, image_size: int,
                   batch_size: int, shuffle: bool, seed: int, decode_workers: int = 1,
                   **kwargs) -> "Batches":
        """Batches decoding PNGs on the fly (data.cache: png), `decode_workers` threads a batch."""
        return cls(PngImages(paths, image_size, decode_workers), labels, batch_size, shuffle,
                   seed, **kwargs)

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return self.rows
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.rows)

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def inputs(self, rows: np.ndarray) -> np.ndarray:
        """uint8 model inputs (len(rows), S, S, C) of the given input rows, in that order."""
        needed = self.neighbours[rows]                           # (b, K) rows of `images`
        unique, inverse = np.unique(needed, return_inverse=True)  # sorted: a memmap read front to back
        slices = np.asarray(self.images[unique])                 # (u, S, S, 3), each slice read once
        index = inverse.reshape(needed.shape)
        if self.spec is None:
            return slices[index[:, 0]]
        return self.spec.gather(slices, index)

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range 0..{len(self) - 1}")
        # Sorted rows read a memory map front to back; the batch's content is unchanged.
        rows = np.sort(self.order[index * self.batch_size:(index + 1) * self.batch_size])
        # One pass uint8 -> float32 in [0, 1] (astype then *= would write the batch twice).
        x = np.multiply(self.inputs(rows), np.float32(1.0 / 255.0), dtype=np.float32)
        return x, self.labels[rows]

    def on_epoch_end(self) -> None:
        """Advance the epoch counter and reshuffle (deterministically from seed and epoch).

        Keras calls this after every epoch and once when fit starts; it is the safe hook
        (on_epoch_begin runs after prefetching workers have started).
        """
        self.epoch += 1
        self.order = self._order()


@dataclass
class SplitData:
    """One split ready for a model: its table, slices, and each target's neighbours."""

    table: pd.DataFrame        # split_table rows (targets and context-only rows)
    images: object             # uint8 (N, S, S, 3) slices of every row (np.memmap or PngImages)
    neighbours: np.ndarray     # (N, len(offsets)) rows of `images` forming each row's input
    targets: np.ndarray        # rows that are inputs (target 1)

    def batches(self, columns: Sequence[str], batch_size: int, spec: InputSpec, shuffle: bool,
                seed: int, rows: np.ndarray | None = None) -> Batches:
        """Batches over `rows` of the targets (default all of them) against label `columns`."""
        labels = self.table[list(columns)].to_numpy(dtype=np.float32)
        picked = self.targets if rows is None else np.asarray(rows, dtype=np.int64)
        return Batches(self.images, labels, batch_size, shuffle=shuffle, seed=seed, indices=picked,
                       neighbours=self.neighbours, spec=spec)


def load_split(work_dir: Path, split: str, spec: InputSpec, cache: str, workers: int,
               include_augmented: bool = False) -> SplitData:
    """The split of work_dir as SplitData: slices from the packed cache (cache "packed") or
    decoded per batch (cache "png"); neighbours along each series from the input description."""
    table = split_table(work_dir, split, include_augmented=include_augmented)
    if cache == "packed":
        images = packed(work_dir, split, table, spec.image_size, workers)
    else:
        images = PngImages(table["path"].tolist(), spec.image_size, workers)
    neighbours = neighbour_rows(table["series_id"], table["position"], spec.offsets)
    targets = np.flatnonzero(table[TARGET].to_numpy() == 1)
    return SplitData(table, images, neighbours, targets)
