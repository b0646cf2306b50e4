"""Benchmark: stage 1's train step with ich's torch fast layers against Keras's own layers.

Both models are built in one process (the fast twins switched off for one of them), then
stepped in interleaved rounds on the same batch; prints each median and the ratio.

    KERAS_BACKEND=torch .venv/bin/python bench/fast_layers.py [--size 128] [--batch 16] [--rounds 8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from machine import describe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    print(describe())
    import torch

    import ich.models.backbones as backbones
    from ich.models.cascade import build_stage1

    torch.set_num_threads(1)  # steadier on a shared machine
    switch = backbones.with_fast_layers
    models = {}
    for fast in (False, True):
        backbones.with_fast_layers = switch if fast else (lambda model: model)
        model = build_stage1("EfficientNetV2B0", (args.size, args.size, 3), None, 0.3)
        model.compile(optimizer="adam", loss="binary_crossentropy")
        models["fast layers" if fast else "keras layers"] = model
    backbones.with_fast_layers = switch
    rng = np.random.default_rng(0)
    x = rng.random((args.batch, args.size, args.size, 3), dtype=np.float32)
    y = rng.integers(0, 2, (args.batch, 1)).astype(np.float32)
    times = {name: [] for name in models}
    for model in models.values():
        model.train_on_batch(x, y)  # warm-up
    for _ in range(args.rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times[name].append(time.perf_counter() - start)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    for name, value in medians.items():
        print(f"{name:<14}{value:8.3f} s/step (median of {args.rounds})")
    print(f"speed-up {medians['keras layers'] / medians['fast layers']:.2f}x")


if __name__ == "__main__":
    main()
