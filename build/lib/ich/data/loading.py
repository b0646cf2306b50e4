"""Training data: split tables, PNG decoding, the packed per-split cache, batches, label weights.

In: the work dir's splits.csv, images.csv and augmented.csv, and the PNGs they point to.
Out: tables (image_id, absolute path, LABELS), uint8 (N, S, S, 3) arrays or memory maps,
and keras.utils.PyDataset batches of float32 images in [0, 1] with float32 labels.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import keras
import numpy as np
import pandas as pd

from ich.constants import AUGMENTED_CSV, IMAGES_CSV, LABELS, PACKED_DIR, SPLITS_CSV
from ich.io import outdated
from ich.data.png import read_png  # noqa: F401  (part of this module's API)

SPLITS = ("train", "val", "test")
# Images decoded per chunk while packing: bounds memory to chunk * S * S * 3 bytes.
PACK_CHUNK = 256


def split_table(work_dir: Path, split: str, include_augmented: bool) -> pd.DataFrame:
    """Rows of one split: image_id, path (absolute PNG path, str) and the LABELS columns.

    In: the work dir holding splits.csv and images.csv (and augmented.csv, whose rows are added
    to the train split when `include_augmented`). Raises FileNotFoundError naming a missing
    file and the step that writes it; ValueError for an unknown split or images without a PNG.
    """
    work_dir = Path(work_dir)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")
    splits = _read_csv(work_dir / SPLITS_CSV, "split", ["image_id", "split", *LABELS])
    images = _read_csv(work_dir / IMAGES_CSV, "preprocess", ["image_id", "path"])
    rows = splits.loc[splits["split"] == split, ["image_id", *LABELS]]
    table = rows.merge(images[["image_id", "path"]], on="image_id", how="left")
    lost = table.loc[table["path"].isna(), "image_id"].tolist()
    if lost:
        raise ValueError(f"{work_dir / SPLITS_CSV}: {len(lost)} {split} images have no row in "
                         f"{IMAGES_CSV} (first: {lost[:3]}); run `ich split --force` to rebuild it")
    if include_augmented and split == "train" and (work_dir / AUGMENTED_CSV).is_file():
        augmented = _read_csv(work_dir / AUGMENTED_CSV, "augment", ["image_id", "path", *LABELS])
        if len(augmented):  # header only when augmentation is off
            table = pd.concat([table, augmented[["image_id", *LABELS, "path"]]], ignore_index=True)
    table["path"] = [str(work_dir / p) for p in table["path"]]
    table[list(LABELS)] = table[list(LABELS)].astype(np.int64)
    return table[["image_id", "path", *LABELS]].reset_index(drop=True)


def _read_csv(path: Path, step: str, columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `ich {step}` first")
    table = pd.read_csv(path, dtype={"image_id": str, "path": str})
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; run `ich {step} --force` to rewrite it")
    return table


def load_array(paths: Sequence[str | Path], image_size: int, workers: int) -> np.ndarray:
    """Decode PNGs into one uint8 array (N, image_size, image_size, 3), in the order given.

    Uses `workers` threads (OpenCV releases the GIL while decoding). A missing or corrupt PNG
    raises ValueError naming the file.
    """
    out = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
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

    Cached at work_dir/packed/<split>_<size>.npy with <split>_<size>.ids.txt (image ids in
    row order). The cache is reused when its ids equal table.image_id and no PNG is newer than
    it; otherwise it is rebuilt in chunks (flat memory) into a temp file renamed into place.
    """
    from ich.io import atomic_path, atomic_write_text

    folder = Path(work_dir) / PACKED_DIR
    npy = folder / f"{split}_{image_size}.npy"
    ids_file = folder / f"{split}_{image_size}.ids.txt"
    ids = table["image_id"].astype(str).tolist()
    paths = table["path"].astype(str).tolist()
    if _cache_fresh(npy, ids_file, ids, paths, image_size):
        return np.load(npy, mmap_mode="r")
    ids_file.unlink(missing_ok=True)  # the ids are the commit mark: drop them first
    with atomic_path(npy) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                          shape=(len(ids), image_size, image_size, 3))
        for start in range(0, len(ids), PACK_CHUNK):
            stop = min(start + PACK_CHUNK, len(ids))
            array[start:stop] = load_array(paths[start:stop], image_size, workers)
        array.flush()
        del array
    atomic_write_text(ids_file, "".join(f"{i}\n" for i in ids))
    return np.load(npy, mmap_mode="r")


def _cache_fresh(npy: Path, ids_file: Path, ids: list[str], paths: list[str],
                 image_size: int) -> bool:
    if not (npy.is_file() and ids_file.is_file()):
        return False
    if ids_file.read_text().splitlines() != ids:
        return False
    cached = np.load(npy, mmap_mode="r")
    if cached.shape != (len(ids), image_size, image_size, 3) or cached.dtype != np.uint8:
        return False
    # A PNG rewritten after packing (e.g. preprocess --force with other windows) stales it.
    return not outdated(npy, paths)


class PngImages:
    """Array-like view of PNG files: `images[indices]` decodes them into uint8 (n, S, S, 3)."""

    def __init__(self, paths: Sequence[str | Path], image_size: int, workers: int = 1):
        self.paths = [str(p) for p in paths]
        self.image_size = image_size
        self.workers = workers
        self.shape = (len(self.paths), image_size, image_size, 3)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, indices) -> np.ndarray:
        picked = [self.paths[i] for i in np.atleast_1d(np.asarray(indices))]
        return load_array(picked, self.image_size, self.workers)


class Batches(keras.utils.PyDataset):
    """Batches of (float32 images / 255 in [0, 1], float32 labels) for Keras fit/predict.

    In: `images` uint8 (N, S, S, 3) array-like (array, np.memmap or PngImages), `labels`
    (N, k); `indices` optionally picks the rows used (e.g. the positives for stage 2) without
    copying the images. Shuffled per epoch from (seed, epoch) when `shuffle`; the last
    partial batch is kept; len = ceil(n / batch_size). Extra keyword arguments (workers,
    use_multiprocessing, max_queue_size) go to keras.utils.PyDataset.
    """

    def __init__(self, images, labels: np.ndarray, batch_size: int, shuffle: bool, seed: int,
                 indices: np.ndarray | None = None, **pydataset_kwargs):
        super().__init__(**pydataset_kwargs)
        labels = np.asarray(labels, dtype=np.float32)
        if labels.ndim == 1:
            labels = labels[:, None]
        if len(labels) != len(images):
            raise ValueError(f"Batches: {len(images)} images but {len(labels)} label rows")
        if batch_size < 1:
            raise ValueError(f"Batches: batch_size must be at least 1, got {batch_size}")
        self.images = images
        self.labels = labels
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

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range 0..{len(self) - 1}")
        # Sorted rows read a memory map front to back; the batch's content is unchanged.
        rows = np.sort(self.order[index * self.batch_size:(index + 1) * self.batch_size])
        x = np.asarray(self.images[rows], dtype=np.float32)
        x *= 1.0 / 255.0
        return x, self.labels[rows]

    def on_epoch_end(self) -> None:
        """Advance the epoch counter and reshuffle (deterministically from seed and epoch).

        Keras calls this after every epoch and once when fit starts; it is the safe hook
        (on_epoch_begin runs after prefetching workers have started).
        """
        self.epoch += 1
        self.order = self._order()


def positive_weights(labels: np.ndarray, cap: float) -> np.ndarray:
    """Per-column positive weight n_neg / n_pos for a weighted BCE, capped at `cap`.

    In: 0/1 labels (N, k). Out: float32 (k,). A column without positives gets `cap`.
    """
    labels = np.asarray(labels)
    if labels.ndim == 1:
        labels = labels[:, None]
    pos = labels.sum(axis=0).astype(np.float64)
    neg = len(labels) - pos
    ratio = np.divide(neg, pos, out=np.full_like(pos, np.inf), where=pos > 0)
    return np.minimum(ratio, cap).astype(np.float32)


def class_weights(y: np.ndarray) -> dict[int, float]:
    """Balanced class weights {0: w0, 1: w1} for binary labels: N / (2 * count of the class).

    In: 0/1 labels (N,) or (N, 1). A class that never occurs gets weight 1.0.
    """
    y = np.asarray(y).reshape(-1).astype(np.int64)
    weights = {}
    for cls in (0, 1):
        count = int((y == cls).sum())
        weights[cls] = len(y) / (2.0 * count) if count else 1.0
    return weights
