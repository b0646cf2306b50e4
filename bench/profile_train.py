"""Where a training step's time goes: ich's stage next to timm's, under torch.profiler.

    .venv/bin/python bench/profile_train.py                      # stage 1, 128 px, batch 16
    .venv/bin/python bench/profile_train.py --stage stage2 --steps 2
    .venv/bin/python bench/profile_train.py --set online_augment.enabled=false
    .venv/bin/python bench/profile_train.py --predict --stage stage2   # forward only
    .venv/bin/python bench/profile_train.py --shapes-of aten::mul --shapes-of aten::silu

Both steps are bench/train_speed.py's (ich's built as `ich train` builds it, timm's native
model with the same batch, size, optimizer and loss). Each is warmed up, timed unprofiled
(the wall time per step the figures below are shares of), then run --steps times under
torch.profiler with record_shapes. With --predict both sides run their prediction forward
instead (bench/train_speed.py's: ich's `predict_on_batch` on the augmentation-free stage, timm
in eval mode under inference_mode). Printed for each side:

- the top aten operators by self CPU time (time inside the operator itself, not its children);
- a summary by kind: convolutions (forward and backward), batch normalisation (timm: the fused
  native kernels; Keras computes it from elementwise ops, so those land in "elementwise"),
  elementwise and reductions, copies and layout conversions (aten::copy_, clone, contiguous,
  _to_copy: channels-last <-> channels-first and dtype casts), the optimizer (_foreach_*),
  gathers (the augmentation's resampling), and "outside operators": wall time not spent inside
  any aten operator (Python: Keras' per-layer call machinery, the autograd engine's own work,
  the train step's bookkeeping);
- for ich only, self time per Keras layer class (each layer's __call__ is wrapped in a profiler
  range for the run, so a layer's self time is its Python work outside its operators and
  sub-layers) and the online augmentation's whole share (its forward; its backward is nothing
  since the augmentation holds no weights and sits on the input).

Profiling adds overhead per operator, so shares, not absolute times, are the finding; the
unprofiled wall time per step is printed beside them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Operator name -> kind, first match wins (substring of the aten name).
KINDS = (
    ("convolution", ("convolution", "conv2d", "mkldnn_conv", "_conv_depthwise", "thnn_conv")),
    ("batchnorm (native)", ("batch_norm",)),
    ("matmul / linear", ("addmm", "aten::mm", "bmm", "matmul", "linear", "baddbmm")),
    ("optimizer (_foreach)", ("_foreach",)),
    ("copy / layout / cast", ("aten::copy_", "aten::clone", "contiguous", "_to_copy", "aten::to",
                              "empty_strided")),
    ("gather (resample)", ("gather", "take_along", "index", "scatter")),
    ("reduction", ("sum", "mean", "aten::var", "std", "amax", "max", "min", "norm")),
)
ELEMENTWISE = "elementwise / other"
LAYER = "layer:"


def kind(name: str) -> str:
    """The kind of an aten operator name (see KINDS); elementwise / other by default."""
    for label, keys in KINDS:
        if any(k in name for k in keys):
            return label
    return ELEMENTWISE


def annotate_keras_layers():
    """Wrap every Keras layer call in a torch.profiler range named layer:<class>; returns
    the function that undoes it (the unprofiled timing runs without the wrapper)."""
    import keras
    import torch

    original = keras.layers.Layer.__call__

    def call(self, *args, **kwargs):
        with torch.profiler.record_function(f"{LAYER}{type(self).__name__}"):
            return original(self, *args, **kwargs)

    keras.layers.Layer.__call__ = call

    def restore():
        keras.layers.Layer.__call__ = original

    return restore


def wall_per_step(step, steps: int) -> float:
    """Seconds per call of `step`, median of `steps` calls."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def profile(step, steps: int):
    """key_averages of `steps` calls of `step` under torch.profiler (CPU, record_shapes)."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        for _ in range(steps):
            step()
    return prof.key_averages(), prof.key_averages(group_by_input_shape=True)


def report(title: str, events, by_shape, steps: int, wall: float, top: int,
           shapes_of: tuple = ()) -> None:
    """Print the top operators, the summary by kind, for Keras the per-layer table, and the
    time by input shapes of each operator named in `shapes_of`."""
    aten = [e for e in events if e.key.startswith("aten::")]
    total_self = sum(e.self_cpu_time_total for e in events) / steps / 1e6   # s per step
    aten_self = sum(e.self_cpu_time_total for e in aten) / steps / 1e6
    print(f"\n=== {title}: {wall * 1e3:.0f} ms per step unprofiled; profiled {total_self * 1e3:.0f} ms "
          f"per step, of which {aten_self * 1e3:.0f} ms inside aten operators")
    print(f"{'top aten operators by self CPU':<44}{'ms/step':>9}{'share':>7}{'calls/step':>11}")
    for e in sorted(aten, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"  {e.key[:42]:<42}{e.self_cpu_time_total / steps / 1e3:>9.1f}"
              f"{e.self_cpu_time_total / steps / 1e6 / total_self:>7.0%}{e.count / steps:>11.0f}")
    kinds = defaultdict(float)
    calls = defaultdict(int)
    for e in aten:
        kinds[kind(e.key)] += e.self_cpu_time_total / steps / 1e6
        calls[kind(e.key)] += e.count // steps
    kinds["outside operators (Python, autograd engine)"] = total_self - aten_self
    print(f"{'by kind':<44}{'ms/step':>9}{'share':>7}{'op calls':>11}")
    for label, seconds in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {label:<42}{seconds * 1e3:>9.1f}{seconds / total_self:>7.0%}{calls.get(label, 0):>11}")
    print(f"  aten operator calls per step: {sum(e.count for e in aten) // steps}")
    layers = [e for e in events if e.key.startswith(LAYER)]
    if layers:
        print(f"{'Keras layers by self time (Python outside ops)':<44}{'ms/step':>9}{'share':>7}{'calls/step':>11}")
        for e in sorted(layers, key=lambda e: -e.self_cpu_time_total)[:top]:
            print(f"  {e.key[len(LAYER):][:42]:<42}{e.self_cpu_time_total / steps / 1e3:>9.1f}"
                  f"{e.self_cpu_time_total / steps / 1e6 / total_self:>7.0%}{e.count / steps:>11.0f}")
        augment = [e for e in layers if e.key == f"{LAYER}Sequential"]
        if augment:
            seconds = augment[0].cpu_time_total / steps / 1e6
            print(f"  online augmentation (Sequential, whole forward): {seconds * 1e3:.1f} ms/step, "
                  f"{seconds / total_self:.0%}")
    copies = [e for e in by_shape if e.key in ("aten::copy_", "aten::_to_copy", "aten::clone")]
    print("largest copies by input shapes (layout conversions show as NHWC<->NCHW pairs):")
    for e in sorted(copies, key=lambda e: -e.self_cpu_time_total)[:5]:
        print(f"  {e.key:<16}{e.self_cpu_time_total / steps / 1e3:>8.1f} ms/step  "
              f"{e.count // steps:>4} calls  {str(e.input_shapes)[:80]}")
    for name in shapes_of:
        rows = [e for e in by_shape if e.key == name]
        print(f"{name} by input shapes ({len(rows)} distinct):")
        for e in sorted(rows, key=lambda e: -e.self_cpu_time_total)[:top]:
            print(f"  {e.self_cpu_time_total / steps / 1e3:>8.1f} ms/step  "
                  f"{e.count // steps:>4} calls  {str(e.input_shapes)[:90]}")


def main(argv=None) -> int:
    """Profile both sides of one stage and print the tables; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", default="stage1", choices=["stage1", "stage2"])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per side")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=15, help="rows of the operator tables")
    parser.add_argument("--predict", action="store_true", help="profile the prediction forward")
    parser.add_argument("--shapes-of", action="append", default=[], metavar="OP",
                        help="also print OP's (aten::mul, say) time by input shapes; repeatable")
    import train_speed

    train_speed.add_torch_arguments(parser)
    args = parser.parse_args(argv)
    if not train_speed.start_torch(args, "the torch profiler needs it"):
        return 2
    import keras
    import torch
    cfg = train_speed.ich_config(args.size, args.batch, args.set)
    print(f"{args.stage}, {args.size} px, batch {args.batch}, float32, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), keras {keras.__version__}", flush=True)
    x, y = train_speed.random_batch(args.batch, args.size, train_speed.OUTPUTS[args.stage],
                                    train_speed.input_channels(cfg))
    if args.predict:
        model = train_speed.ich_inference_model(cfg, args.stage)
        sides = {"ich": lambda: model.predict_on_batch(x),
                 "timm": train_speed.timm_inference(args.stage, cfg, x)}
    else:
        sides = {"ich": train_speed.ich_training(cfg, args.stage,
                                                 bool(cfg["online_augment"]["enabled"]), x, y),
                 "timm": train_speed.timm_training(args.stage, cfg, x, y)}
    what = "prediction forward" if args.predict else "train step"
    for name, step in sides.items():
        for _ in range(args.warmup):
            step()
        wall = wall_per_step(step, args.steps)
        restore = annotate_keras_layers() if name == "ich" else (lambda: None)
        events, by_shape = profile(step, args.steps)
        restore()
        report(f"{name} {args.stage} {what}", events, by_shape, args.steps, wall, args.top,
               tuple(args.shapes_of))
    return 0


if __name__ == "__main__":
    sys.exit(main())
