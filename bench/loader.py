"""Loader throughput: decoding PNGs every epoch vs the packed memory-mapped cache, with and
without neighbouring-slice context gathered from it.

Writes synthetic 256x256 RGB PNGs (noise plus shapes, so they compress like real slices
rather than like flat images) to a temp dir, then times one epoch of ich.data.loading.Batches over
each source with one decoding thread (images/s per core), and the one-off pack build.

    .venv/bin/python bench/loader.py [--images 500] [--size 256] [--batch 32]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ich.data import loading  # noqa: E402
from ich.data.inputs import InputSpec, neighbour_rows  # noqa: E402

# Issue 12's goal for one core: 5x a GPU training step's throughput; no GPU figure is measured
# yet, so the stand-in of 2,000 images/s at 256 px applies: 10,000 images/s.
GPU_STANDIN = 2000
GPU_FACTOR = 5
CONTEXT_TARGET = GPU_FACTOR * GPU_STANDIN
EPOCHS = 3  # median of this many epochs per source: the machine is shared
CONTEXT_OFFSETS = (-1, 0, 1)
SLICES_PER_SERIES = 24


def synthetic_png(path: Path, size: int, rng: np.random.Generator) -> None:
    """One noisy 'head' image: an ellipse, a few blobs, Gaussian noise; written with cv2."""
    image = np.zeros((size, size, 3), np.uint8)
    centre = (size // 2, size // 2)
    cv2.ellipse(image, centre, (size * 2 // 5, size * 9 // 20), 0, 0, 360, (200, 120, 230), -1)
    cv2.ellipse(image, centre, (size * 7 // 20, size * 2 // 5), 0, 0, 360, (90, 110, 40), -1)
    for _ in range(4):
        x, y = (int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
        cv2.circle(image, (x, y), int(rng.integers(3, size // 12)), (250, 160, 60), -1)
    noise = rng.normal(0, 12, image.shape)
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    cv2.imwrite(str(path), image)


def epoch_rate(batches: loading.Batches) -> float:
    """Images per second of one pass over `batches`, median over EPOCHS passes."""
    rates = []
    for _ in range(EPOCHS):
        start = time.perf_counter()
        n = sum(len(batches[i][0]) for i in range(len(batches)))
        rates.append(n / (time.perf_counter() - start))
        batches.on_epoch_end()
    return sorted(rates)[len(rates) // 2]


def conversion_rate(channels: int, size: int, batch: int, batches: int) -> float:
    """Images/s of the uint8 -> float32 [0, 1] conversion alone on ready (batch, S, S, C)
    arrays: the floor any loader delivering float32 pays (memory bandwidth of one core)."""
    ready = np.random.default_rng(0).integers(0, 256, (batch, size, size, channels), dtype=np.uint8)
    start = time.perf_counter()
    for _ in range(batches):
        np.multiply(ready, np.float32(1.0 / 255.0), dtype=np.float32)
    return batches * batch / (time.perf_counter() - start)


def main() -> None:
    """Run the benchmark and print a small table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    from machine import describe  # bench/machine.py, beside this script

    print(describe(), flush=True)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "png").mkdir()
        paths = [work / "png" / f"ID_{i:06d}.png" for i in range(args.images)]
        for path in paths:
            synthetic_png(path, args.size, rng)
        mb = sum(p.stat().st_size for p in paths) / 2**20
        table = pd.DataFrame({"image_id": [p.stem for p in paths], "path": [str(p) for p in paths]})
        labels = np.zeros((len(paths), 1), np.float32)

        png = loading.Batches.from_paths(table["path"], labels, args.size, args.batch, shuffle=True,
                                      seed=0, decode_workers=1)
        png_rate = epoch_rate(png)

        start = time.perf_counter()
        images = loading.packed(work, "train", table, args.size, workers=1)
        build_s = time.perf_counter() - start
        packed = loading.Batches(images, labels, args.batch, shuffle=True, seed=0)
        packed_rate = epoch_rate(packed)

        # Neighbouring-slice context gathered from the same packed cache (no copy on disk):
        # series of SLICES_PER_SERIES slices, each input the slices at CONTEXT_OFFSETS.
        series = [f"S{i // SLICES_PER_SERIES}" for i in range(len(paths))]
        neighbours = neighbour_rows(series, np.arange(len(paths)) % SLICES_PER_SERIES, CONTEXT_OFFSETS)
        spec = InputSpec(image_size=args.size, windows={"blood": (80, 200), "brain": (40, 80),
                                                        "bone": (600, 2800)},
                         channels=("blood", "brain", "bone"), offsets=CONTEXT_OFFSETS)
        context = loading.Batches(images, labels, args.batch, shuffle=True, seed=0,
                                  neighbours=neighbours, spec=spec)
        context_rate = epoch_rate(context)
        # The 1st-place layout: the same three slices, one window each (3 channels).
        one = InputSpec(image_size=args.size, windows=spec.windows, channels=spec.channels,
                        offsets=CONTEXT_OFFSETS, slice_channels="blood")
        one_rate = epoch_rate(loading.Batches(images, labels, args.batch, shuffle=True, seed=0,
                                              neighbours=neighbours, spec=one))
        floor = {c: conversion_rate(c, args.size, args.batch, len(context)) for c in (3, spec.n_channels)}

    def verdict(rate: float) -> str:
        return f"goal >= {CONTEXT_TARGET:,}: {'met' if rate >= CONTEXT_TARGET else 'NOT met'}"

    print(f"{args.images} synthetic {args.size}x{args.size} RGB PNGs ({mb:.1f} MB), "
          f"batch {args.batch}, shuffled, 1 thread, median of {EPOCHS} epochs")
    print(f"{'source':<34}{'images/s':>10}{'ratio':>8}")
    print(f"{'png (decode every epoch)':<34}{png_rate:>10,.0f}{1.0:>8.1f}")
    print(f"{'packed memmap':<34}{packed_rate:>10,.0f}{packed_rate / png_rate:>8.1f}")
    print(f"{'packed + context, all windows':<34}{context_rate:>10,.0f}{context_rate / png_rate:>8.1f}"
          f"   ({spec.n_channels} channels, offsets {list(CONTEXT_OFFSETS)}; {verdict(context_rate)})")
    print(f"{'packed + context, one window':<34}{one_rate:>10,.0f}{one_rate / png_rate:>8.1f}"
          f"   ({one.n_channels} channels; {verdict(one_rate)})")
    for channels, rate in floor.items():
        print(f"{f'float32 conversion alone, {channels} ch':<34}{rate:>10,.0f}{rate / png_rate:>8.1f}"
              f"   (the floor of any float32 loader at {channels} channels)")
    print(f"pack build: {build_s:.2f} s ({args.images / build_s:,.0f} images/s), "
          f"paid once per split and size")


if __name__ == "__main__":
    main()
