"""Offline augmentation (step 5): the copy plan and the albumentations pipeline.

In: the training split's label table and uint8 RGB arrays. `plan_copies` decides which training
images get how many augmented copies so rare subtypes reach a target count; `offline_pipeline`
builds the transform; `augment_copy` makes one copy, seeded by `copy_seed` so a copy never
depends on which worker made it or in what order. Out: tables and uint8 arrays.
The online counterpart (Keras layers inside the model) is ich.models.online_augment.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from ich.constants import LABELS, SUBTYPES

# A copy identical to its source adds nothing; redraw (deterministically) up to this many times.
_MAX_REDRAWS = 8


def plan_copies(table: pd.DataFrame, target_per_label: int, max_copies_per_image: int,
                seed: int) -> pd.DataFrame:
    """Plan augmented copies so each subtype reaches `target_per_label` training images.

    In: `table` with image_id and LABELS columns (0/1), the training split. Subtypes are
    filled rarest first, recounting after each one, because a copy of a multi-label image
    raises every label it carries. Within a subtype, copies go round-robin over its positive
    images in a seeded order (one more copy each per round), never more than
    `max_copies_per_image` per source image in all.
    Out: one row per copy: image_id (`<source>__aug<k>`, k = 1, 2, ...), source_id, copy (k),
    and the LABELS of the source; sorted by source order in `table`, then k.
    """
    missing = [c for c in ("image_id", *LABELS) if c not in table.columns]
    if missing:
        raise ValueError(f"plan_copies: table lacks columns {missing}")
    labels = table[list(LABELS)].to_numpy(dtype=np.int64)
    counts = dict(zip(LABELS, labels.sum(axis=0).tolist()))
    copies = np.zeros(len(table), dtype=np.int64)
    rng = np.random.default_rng(seed)
    remaining = list(SUBTYPES)
    while remaining:
        # Recount every time: copies made for the previous label raised its co-labels.
        label = min(remaining, key=lambda name: (counts[name], SUBTYPES.index(name)))
        remaining.remove(label)
        need = target_per_label - counts[label]
        positives = np.flatnonzero(labels[:, LABELS.index(label)] == 1)
        order = positives[rng.permutation(len(positives))]
        while need > 0:
            open_rows = order[copies[order] < max_copies_per_image]
            if len(open_rows) == 0:
                break
            take = open_rows[:need]
            copies[take] += 1
            need -= len(take)
            for name, added in zip(LABELS, labels[take].sum(axis=0).tolist()):
                counts[name] += added
    return _copy_rows(table, labels, copies)


def _copy_rows(table: pd.DataFrame, labels: np.ndarray, copies: np.ndarray) -> pd.DataFrame:
    rows = np.repeat(np.arange(len(table)), copies)
    k = np.concatenate([np.arange(1, n + 1) for n in copies if n] or [np.zeros(0, np.int64)])
    source = table["image_id"].to_numpy()[rows].astype(str)
    out = pd.DataFrame({
        "image_id": [f"{s}__aug{i}" for s, i in zip(source, k)],
        "source_id": source,
        "copy": k.astype(np.int64),
    })
    for j, name in enumerate(LABELS):
        out[name] = labels[rows, j].astype(np.int64)
    return out


def copy_seed(seed: int, source_id: str, k: int) -> int:
    """A 32-bit seed for copy k of `source_id`, stable across processes and Python runs."""
    digest = hashlib.blake2b(f"{seed}:{source_id}:{k}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def offline_pipeline(params: dict, seed: int):
    """Build the offline albumentations.Compose from the config section `augment`.

    In: params with hflip_p, vflip_p, rotate_limit, rotate_p, brightness_limit,
    contrast_limit, brightness_contrast_p, blur_p, elastic_p, elastic_alpha, elastic_sigma.
    Out: a Compose on uint8 (H, W, 3) images, seeded with `seed`; areas moved in from outside
    the image are filled with 0 (air is black in every window).
    """
    import albumentations as A
    import cv2

    fill = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0}
    limit = float(params["rotate_limit"])
    return A.Compose([
        A.HorizontalFlip(p=params["hflip_p"]),
        A.VerticalFlip(p=params["vflip_p"]),
        A.Affine(rotate=(-limit, limit), p=params["rotate_p"], **fill),
        A.RandomBrightnessContrast(brightness_limit=params["brightness_limit"],
                                   contrast_limit=params["contrast_limit"],
                                   p=params["brightness_contrast_p"]),
        # blur_limit 0 lets the kernel follow sigma; sigma kept small so edges of thin
        # bleeds survive.
        A.GaussianBlur(blur_limit=0, sigma_limit=(0.3, 1.0), p=params["blur_p"]),
        A.ElasticTransform(alpha=params["elastic_alpha"], sigma=params["elastic_sigma"],
                           p=params["elastic_p"], **fill),
    ], seed=seed)


def augment_copy(pipeline, image: np.ndarray, seed: int) -> np.ndarray:
    """One augmented copy of uint8 `image`, fully determined by `seed`.

    Redraws (up to a few times, deterministically) when every transform happened to be
    skipped and the copy would equal its source.
    """
    pipeline.set_random_seed(seed)
    out = image
    for _ in range(_MAX_REDRAWS):
        out = pipeline(image=image)["image"]
        if not np.array_equal(out, image):
            break
    return np.ascontiguousarray(out)
