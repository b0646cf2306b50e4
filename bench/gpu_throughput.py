"""Benchmark: training images/s of the ich cascade (Keras 3) next to timm's native PyTorch
models of the same architectures, on the same GPU, in one run.

    .venv/bin/python bench/gpu_throughput.py                 # 256 px, batch 32, mixed precision
    .venv/bin/python bench/gpu_throughput.py --jit           # Keras with jit_compile=True
    .venv/bin/python bench/gpu_throughput.py --dry-run       # CPU, tiny sizes: checks the code paths
    .venv/bin/python bench/gpu_throughput.py --cpu --image-size 96 128   # Keras side only, on CPU

Rows: stage 1 (EfficientNetV2B0 vs timm tf_efficientnetv2_b0) and stage 2 (EfficientNetV2B0 +
ConvNeXtTiny with the attention fusion vs timm tf_efficientnetv2_b0 + convnext_tiny pooled,
concatenated and fed to one linear layer: the fusion block is well under 1% of the FLOPs, so the
backbones set the pace). Both sides train on the same random batches already in host memory,
Adam, float16 autocast, random init; the first steps (compilation, cuDNN autotuning) are not
timed. Needs a GPU, the torch backend for Keras, and timm (pip install timm); --dry-run runs
everything on CPU at 32 px and, where timm is absent, times a small stand-in torch model instead
so that the PyTorch loop itself is exercised.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402

TIMM_NAMES = {"stage1": ["tf_efficientnetv2_b0"], "stage2": ["tf_efficientnetv2_b0", "convnext_tiny"]}
OUTPUTS = {"stage1": 1, "stage2": 5}


def keras_images_per_s(stage: str, size: int, batch: int, steps: int, warmup: int, mixed: bool,
                       jit: bool) -> float:
    """Training images/s of ich's stage model in Keras (random init, random data)."""
    import keras

    from ich.models.losses import weighted_bce
    from ich.models.cascade import build_stage1, build_stage2

    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    keras.utils.set_random_seed(0)
    if stage == "stage1":
        model = build_stage1("EfficientNetV2B0", size, None)
        loss = keras.losses.BinaryCrossentropy()
    else:
        model = build_stage2(["EfficientNetV2B0", "ConvNeXtTiny"], size, None)
        loss = weighted_bce([1.0] * 5)
    model.compile(keras.optimizers.Adam(1e-4), loss, jit_compile=jit)
    x, y = random_batch(batch, size, OUTPUTS[stage])
    for _ in range(warmup):
        model.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        logs = model.train_on_batch(x, y, return_dict=True)
    float(logs["loss"])  # forces the last step to finish before the clock stops
    seconds = time.perf_counter() - start
    keras.mixed_precision.set_global_policy("float32")
    return steps * batch / seconds


def torch_model(stage: str, stand_in: bool):
    """timm's model(s) of the stage as one nn.Module ending in OUTPUTS[stage] logits."""
    import torch

    if stand_in:
        # Only to exercise the loop where timm is absent: never reported as a timm number.
        return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                   torch.nn.Linear(16, OUTPUTS[stage]))
    import timm

    if stage == "stage1":
        return timm.create_model(TIMM_NAMES[stage][0], pretrained=False, num_classes=1)

    class Dual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbones = torch.nn.ModuleList(
                timm.create_model(n, pretrained=False, num_classes=0) for n in TIMM_NAMES[stage])
            width = sum(b.num_features for b in self.backbones)
            self.head = torch.nn.Linear(width, OUTPUTS[stage])

        def forward(self, x):
            return self.head(torch.cat([b(x) for b in self.backbones], dim=1))

    return Dual()


def torch_images_per_s(stage: str, size: int, batch: int, steps: int, warmup: int, mixed: bool,
                       device: str, stand_in: bool) -> float:
    """Training images/s of the native PyTorch model: autocast float16, GradScaler, channels_last."""
    import torch

    torch.manual_seed(0)
    model = torch_model(stage, stand_in).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device, enabled=mixed)
    criterion = torch.nn.BCEWithLogitsLoss()
    x_np, y_np = random_batch(batch, size, OUTPUTS[stage])
    # Same host arrays as Keras gets, copied to the device each step as Keras does.
    x_host = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    y_host = torch.from_numpy(y_np)

    def step():
        x, y = x_host.to(device, non_blocking=True), y_host.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.float16, enabled=mixed):
            loss = criterion(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    model.train()
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.detach().item()
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def random_batch(batch: int, size: int, outputs: int):
    rng = np.random.default_rng(0)
    return (rng.random((batch, size, size, 3), dtype=np.float32),
            rng.integers(0, 2, (batch, outputs)).astype(np.float32))


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, nargs="+", default=[256])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--jit", action="store_true", help="Keras jit_compile=True (torch.compile)")
    parser.add_argument("--no-mixed", action="store_true", help="float32 on both sides")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, 32 px, batch 2, 2 steps: checks the code paths, numbers meaningless")
    parser.add_argument("--cpu", action="store_true",
                        help="Keras side only, on CPU, float32 (no timm comparison): what the demo gets")
    args = parser.parse_args(argv)
    from machine import describe  # bench/machine.py, beside this script

    print(describe(), flush=True)
    if args.cpu:
        return cpu_table(args)

    import keras
    import torch

    if keras.backend.backend() != "torch":
        print(f"error: run with KERAS_BACKEND=torch (now {keras.backend.backend()}): the comparison "
              f"is Keras-on-torch against native torch on the same card", file=sys.stderr)
        return 2
    try:
        import timm  # noqa: F401
        have_timm = True
    except ImportError:
        have_timm = False
    if args.dry_run:
        size, batch, steps, warmup, mixed, device = 32, 2, 2, 1, False, "cpu"
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA GPU visible to torch; this benchmark measures GPU training "
                  "(use --dry-run to check it on CPU)", file=sys.stderr)
            return 2
        if not have_timm:
            print("error: timm is not installed (pip install timm); it provides the native "
                  "PyTorch reference models", file=sys.stderr)
            return 2
        size, batch, steps, warmup = args.image_size[0], args.batch, args.steps, args.warmup
        mixed, device = not args.no_mixed, "cuda"
    stand_in = args.dry_run and not have_timm
    card = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (dry run)"
    print(f"{card}: {size} px, batch {batch}, {steps} timed steps after {warmup}, "
          f"mixed precision {mixed}, Keras jit_compile {args.jit}, keras {keras.__version__}, "
          f"torch {torch.__version__}")
    if stand_in:
        print("timm not installed: the PyTorch column times a small stand-in model (dry run only)")

    rows = []
    for stage in ("stage1", "stage2"):
        k = keras_images_per_s(stage, size, batch, steps, warmup, mixed, args.jit)
        t = torch_images_per_s(stage, size, batch, steps, warmup, mixed, device, stand_in)
        rows.append((stage, "+".join(TIMM_NAMES[stage]) if not stand_in else "stand-in", k, t))
    print(f"{'stage':<8}{'torch model':<36}{'keras img/s':>12}{'torch img/s':>12}{'keras/torch':>12}")
    for stage, name, k, t in rows:
        print(f"{stage:<8}{name:<36}{k:>12.1f}{t:>12.1f}{k / t:>12.2f}")
    return 0


def cpu_table(args) -> int:
    """Keras training images/s of both stages on CPU (float32, no jit) at each --image-size."""
    import keras

    print(f"CPU, {os.cpu_count()} cores visible, Keras {keras.__version__} on {keras.backend.backend()}: "
          f"batch {args.batch}, {args.steps} timed steps after {args.warmup}")
    print(f"{'stage':<8}{'px':>6}{'train img/s':>13}")
    for size in args.image_size:
        for stage in ("stage1", "stage2"):
            rate = keras_images_per_s(stage, size, args.batch, args.steps, args.warmup, False, False)
            print(f"{stage:<8}{size:>6}{rate:>13.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
