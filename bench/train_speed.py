"""Training and inference images/s of ich's stages next to timm's native PyTorch models, on CPU.

    .venv/bin/python bench/train_speed.py                       # 128 px, batch 16, 3 rounds
    .venv/bin/python bench/train_speed.py --size 64 --rounds 2 --no-onnx
    .venv/bin/python bench/train_speed.py --set train.jit_compile=true   # ich with torch.compile

ich's side is built exactly as `ich train` builds it: the config (configs/base.yaml plus
--set), ich.models.online_augment's layers inside the model, the stage's builder (ich.training.stages),
loss (class weights for stage 1, per-label positive weights for stage 2), AUC metric, Adam at
train.finetune_lr, train.jit_compile resolved as `ich train` does, random init with the whole
network trainable (model.weights null: ich's finetune phase). It is timed once with online
augmentation on (what training costs) and once with it off (the difference is the
augmentation's cost). The reference is timm 1.0.31 in plain PyTorch: stage 1 =
tf_efficientnetv2_b0 (1 logit, BCEWithLogits; with Keras' stochastic depth, which
keras.applications' EfficientNetV2 trains with and timm's default leaves off), stage 2 = one nn.Module with
tf_efficientnetv2_b0 and convnext_tiny (timm's names of model.stage2_backbones: convnext_pico for the
demo's ConvNeXtPico) on the same input and the head ich has (1x1 projection
and LayerNorm per backbone, learned token embedding, one post-norm transformer block of the
same width, heads and MLP, mean pool, dropout, 5 logits), Adam at the same learning rate.
Inference (forward only): ich's predict path (`predict_on_batch` on the augmentation-free
stage model, as ich.evaluation.inference does), the same without its BatchNorm folding
(ich.models.graph, `fold_batchnorm=False`: what folding gains) and without its in-place
activations (`inplace=False`: what those gain), timm in eval mode under
inference_mode, and onnxruntime on the stage exported by ich.backend.export_onnx (the graph
`ich export` writes).

Every contender trains on the same random float32 batch, already in host memory, in one
process; rounds are interleaved (each round runs every contender once, in turn, starting one
later each round), so a load change on the shared machine hits all of them alike and no
contender keeps the place after another's steps; the median over rounds is printed. The
first steps of each contender (allocation, compilation) are not timed. The CPU model and core
count are printed first so that figures from different machines can be told apart. The
process keeps freed memory for reuse as `ich train` does (ich.allocator; --malloc-defaults
leaves glibc's thresholds alone, for what that gains).

timm is benchmark-only and loads without torchvision's compiled ops: see bench/timm_loader.py
for the one-line install (into .bench-deps/, never into the project's environment).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

OUTPUTS = {"stage1": 1, "stage2": 5}


def random_batch(batch: int, size: int, outputs: int, channels: int = 3, seed: int = 0):
    """(images float32 (N, S, S, C) in [0, 1], labels float32 (N, k) with both classes per label)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, (batch, outputs)).astype(np.float32)
    y[0], y[1] = 0.0, 1.0
    return rng.random((batch, size, size, channels), dtype=np.float32), y


def input_channels(cfg: dict) -> int:
    """The model input's channels under `cfg` (input.offsets x windows per slice: 3 or 9)."""
    from ich.data.inputs import InputSpec

    return InputSpec.from_config(cfg).n_channels


# ---------------------------------------------------------------------------------------- ich

def ich_config(size: int, batch: int, overrides: list[str]) -> dict:
    """The base config at this size and batch, plus the --set overrides."""
    from ich import config

    return config.load(None, [f"model.image_size={size}", f"train.batch_size={batch}",
                              "model.weights=null", *overrides])


def ich_training(cfg: dict, stage: str, augment: bool, x, y):
    """A zero-argument training step of ich's `stage`, compiled as `ich train` compiles it
    (ich.training.trainer.train_stage: the stage's builder, seed, loss, optimizer, metric,
    jit), run as model.fit runs each batch."""

    from ich import backend
    from ich.data.inputs import InputSpec
    from ich.models.cascade import set_backbone_trainable
    from ich.models.online_augment import online_augmentation
    from ich.training.optimizer import adam
    from ich.training.stages import get_stage, phase_lr, stage_seed
    from keras import ops as backend_ops
    from keras.src.trainers.data_adapters import data_adapter_utils

    cfg = copy.deepcopy(cfg)
    cfg["online_augment"]["enabled"] = augment
    description = get_stage(stage)
    seed = stage_seed(cfg, description)
    backend.set_seed(seed)
    augmentation = online_augmentation(cfg["online_augment"], seed)
    model = description.build(cfg, InputSpec.from_config(cfg), augmentation)
    set_backbone_trainable(model, True, pretrained=False)
    loss, class_weight = description.loss(cfg, y)
    model.compile(optimizer=adam(phase_lr(cfg, "finetune")), loss=loss,
                  metrics=[description.metric()],
                  jit_compile=backend.resolve_jit(cfg["train"]["jit_compile"]))
    # One train_on_batch builds the model, its optimizer and metrics and makes the train
    # function; each step then runs what model.fit runs per batch: the train function on one
    # batch of tensors, as fit's data loader hands them over (train_on_batch would also
    # rebuild its variable tracking and reset the metrics at every call, which fit does not).
    sample_weight = (data_adapter_utils.class_weight_to_sample_weights(y, class_weight)
                     if class_weight is not None else None)
    model.train_on_batch(x, y, sample_weight=sample_weight)
    batch = [tuple(None if a is None else backend_ops.convert_to_tensor(a)
                   for a in (x, y, sample_weight))]

    def step():
        return float(model.train_function(batch)["loss"])

    step.model = model  # what it trains, for tests
    return step


def ich_inference_model(cfg: dict, stage: str):
    """ich's stage as `ich predict` runs it: the float32 model without augmentation layers."""
    from ich import backend
    from ich.data.inputs import InputSpec
    from ich.training.stages import get_stage, stage_seed

    description = get_stage(stage)
    backend.set_seed(stage_seed(cfg, description))
    return description.build(cfg, InputSpec.from_config(cfg), None)


# --------------------------------------------------------------------------------------- timm

def keras_drop_path(timm_name: str) -> float:
    """The stochastic-depth rate Keras' application of the same architecture trains with, for
    timm's drop_path_rate (timm's default is 0): keras.applications' EfficientNetV2 drops whole
    residual blocks at drop_connect_rate (0.2) scaled by depth, as timm's drop path does;
    its ConvNeXtTiny at drop_path_rate 0. Read from Keras' own signatures."""
    import inspect

    from keras.src.applications import convnext, efficientnet_v2

    if timm_name.startswith("tf_efficientnetv2"):
        return inspect.signature(efficientnet_v2.EfficientNetV2).parameters["drop_connect_rate"].default
    return inspect.signature(convnext.ConvNeXt).parameters["drop_path_rate"].default


# timm's name of each ich backbone: the same depths and widths (ich.models.backbones).
TIMM_NAMES = {"EfficientNetV2B0": "tf_efficientnetv2_b0", "ConvNeXtPico": "convnext_pico",
              "ConvNeXtNano": "convnext_nano", "ConvNeXtTiny": "convnext_tiny",
              "ConvNeXtSmall": "convnext_small"}


def timm_names(backbones) -> list[str]:
    """timm's names of ich's `backbones` (model.stage2_backbones), so that `--set
    "model.stage2_backbones=[EfficientNetV2B0,ConvNeXtPico]"` (the demo's) compares like with like."""
    missing = [b for b in backbones if b not in TIMM_NAMES]
    if missing:
        raise SystemExit(f"train_speed: no timm counterpart for {missing}; known: {sorted(TIMM_NAMES)}")
    return [TIMM_NAMES[b] for b in backbones]


def timm_model(stage: str, cfg: dict):
    """timm's native model of `stage` ending in OUTPUTS[stage] logits (see the module docstring)."""
    import torch

    from timm_loader import load_timm

    timm = load_timm()
    channels = input_channels(cfg)
    if stage == "stage1":
        return timm.create_model("tf_efficientnetv2_b0", pretrained=False, num_classes=1,
                                 drop_rate=float(cfg["model"]["dropout"]), in_chans=channels,
                                 drop_path_rate=keras_drop_path("tf_efficientnetv2_b0"))
    dim, heads = int(cfg["model"]["fusion_dim"]), int(cfg["model"]["attention_heads"])
    size = int(cfg["model"]["image_size"])

    class Dual(torch.nn.Module):
        """Two timm backbones, ich's token fusion and transformer block, one linear head."""

        def __init__(self):
            super().__init__()
            self.backbones = torch.nn.ModuleList(
                timm.create_model(n, pretrained=False, num_classes=0, global_pool="",
                                  in_chans=channels, drop_path_rate=keras_drop_path(n))
                for n in timm_names(cfg["model"]["stage2_backbones"]))
            self.proj = torch.nn.ModuleList(torch.nn.Conv2d(b.num_features, dim, 1) for b in self.backbones)
            self.norm = torch.nn.ModuleList(torch.nn.LayerNorm(dim, eps=1e-6) for _ in self.backbones)
            tokens = 2 * (size // 32) ** 2
            self.embedding = torch.nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
            self.block = torch.nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0,
                                                          activation="gelu", batch_first=True,
                                                          norm_first=False, layer_norm_eps=1e-6)
            self.dropout = torch.nn.Dropout(float(cfg["model"]["dropout"]))
            self.head = torch.nn.Linear(dim, OUTPUTS[stage])

        def forward(self, x):
            tokens = []
            for backbone, proj, norm in zip(self.backbones, self.proj, self.norm):
                t = proj(backbone.forward_features(x)).flatten(2).transpose(1, 2)
                tokens.append(norm(t))
            t = self.block(torch.cat(tokens, dim=1) + self.embedding)
            return self.head(self.dropout(t.mean(dim=1)))

    return Dual()


def timm_training(stage: str, cfg: dict, x_np, y_np):
    """A zero-argument training step of timm's model: Adam, BCEWithLogits, float32."""
    import torch

    torch.manual_seed(int(cfg["seed"]))
    model = timm_model(stage, cfg).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=float(cfg["train"]["finetune_lr"]))
    criterion = torch.nn.BCEWithLogitsLoss()

    def step():
        # From the same NHWC host array each step, as Keras receives it (a view, no copy).
        x = torch.from_numpy(x_np).permute(0, 3, 1, 2)
        y = torch.from_numpy(y_np)
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def timm_inference(stage: str, cfg: dict, x_np):
    """A zero-argument forward pass of timm's model in eval mode, probabilities as numpy."""
    import torch

    torch.manual_seed(int(cfg["seed"]))
    model = timm_model(stage, cfg).eval()

    def step():
        with torch.inference_mode():
            return torch.sigmoid(model(torch.from_numpy(x_np).permute(0, 3, 1, 2))).numpy()

    return step


def onnx_inference(model, x_np, folder: Path):
    """Export `model` with ich's exporter; a zero-argument onnxruntime run of it."""
    import onnxruntime

    from ich.backend import export_onnx
    from ich.export import INPUT_NAME, OPSET, OUTPUT_NAME

    path = folder / f"{model.name}.onnx"
    export_onnx(model, path, tuple(x_np.shape[1:]), INPUT_NAME, OUTPUT_NAME, OPSET)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def step():
        return session.run(None, {INPUT_NAME: x_np})[0]

    return step


# ------------------------------------------------------------------------------------ timing

def interleaved(contenders: dict, batch: int, rounds: int, steps: int, warmup: int) -> dict:
    """Median images/s of each zero-argument step function, rounds interleaved. Each round
    starts one contender later (a rotation): a contender's place in the round moved its
    figure by 5-15% here (the one run straight after another model's steps was the slowest),
    so every contender takes every place equally often over len(contenders) rounds."""
    for step in contenders.values():
        for _ in range(warmup):
            step()
    rates = {name: [] for name in contenders}
    order = list(contenders.items())
    for r in range(rounds):
        for name, step in order[r % len(order):] + order[:r % len(order)]:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            rates[name].append(steps * batch / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def add_torch_arguments(parser) -> None:
    """--threads and --set, shared with bench/profile_train.py."""
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own, one per core); 1 is "
                             "steadier on a machine other jobs share: a descheduled thread stalls "
                             "every parallel operator, and the side issuing more operators pays more")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="ich config override (e.g. train.jit_compile=true); repeatable")
    parser.add_argument("--malloc-defaults", action="store_true",
                        help="leave glibc's malloc thresholds as they are instead of setting them as "
                             "`ich train` and `ich predict` do (ich.allocator): what that setting gains, "
                             "in a separate run (it holds for the whole process, both sides)")


def start_torch(args, why: str) -> bool:
    """Print the machine, apply --threads; False (with a message saying `why`) unless Keras
    runs on torch."""
    import keras
    import torch

    from machine import describe  # bench/machine.py, beside this script

    from ich.allocator import retain_freed_memory

    print(describe(), flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    # For the whole process, as `ich train` and `ich predict` set it: timm's side runs under it
    # too (its step took ~300 page faults without it, so it changes little there).
    retained = not args.malloc_defaults and retain_freed_memory()
    print(f"host memory: {'freed memory retained (ich.allocator)' if retained else 'glibc malloc defaults'}")
    if keras.backend.backend() != "torch":
        print(f"error: run with KERAS_BACKEND=torch (now {keras.backend.backend()}): {why}",
              file=sys.stderr)
        return False
    return True


def main(argv=None) -> int:
    """Run the benchmark and print the tables; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median taken)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per contender and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contender first")
    parser.add_argument("--stages", nargs="+", default=["stage1", "stage2"], choices=list(OUTPUTS))
    parser.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime column")
    parser.add_argument("--no-inference", action="store_true", help="training only")
    parser.add_argument("--no-training", action="store_true", help="inference only")
    add_torch_arguments(parser)
    args = parser.parse_args(argv)
    if not start_torch(args, "the comparison is Keras-on-torch against native torch"):
        return 2
    import keras
    import torch
    from timm_loader import load_timm

    from ich.models.graph import with_fast_graph

    try:
        timm = load_timm()
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from ich import backend

    cfg = ich_config(args.size, args.batch, args.set)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), keras "
          f"{keras.__version__}, timm {timm.__version__}")
    print(f"{args.size} px x {input_channels(cfg)} channels, batch {args.batch}, float32, Adam, "
          f"random init; {args.rounds} "
          f"interleaved rounds x {args.steps} steps after {args.warmup} warm-up; ich jit_compile "
          f"{backend.resolve_jit(cfg['train']['jit_compile'])}", flush=True)

    train_rows, infer_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            x, y = random_batch(args.batch, args.size, OUTPUTS[stage], input_channels(cfg))
            if not args.no_training:
                train_rows.append((stage, training_rates(cfg, stage, x, y, args)))
            if args.no_inference:
                continue
            model = ich_inference_model(cfg, stage)
            unfolded = with_fast_graph(ich_inference_model(cfg, stage), fold_batchnorm=False)
            out_of_place = with_fast_graph(ich_inference_model(cfg, stage), inplace=False)
            contenders = {"ich": lambda m=model: np.asarray(m.predict_on_batch(x)),
                          "ich_unfolded": lambda m=unfolded: np.asarray(m.predict_on_batch(x)),
                          "ich_out_of_place": lambda m=out_of_place: np.asarray(m.predict_on_batch(x)),
                          "timm": timm_inference(stage, cfg, x)}
            if not args.no_onnx:
                contenders["onnx"] = onnx_inference(model, x, Path(tmp))
            rates = interleaved(contenders, args.batch, args.rounds, args.steps, args.warmup)
            infer_rows.append((stage, rates))
            print(f"  {stage} inference done: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()),
                  flush=True)
    print_tables(train_rows, infer_rows)
    print(f"\nload average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


def training_rates(cfg: dict, stage: str, x, y, args) -> dict:
    """Images/s of ich's training step with and without online augmentation, and of timm's."""
    rates = interleaved({
        "ich": ich_training(cfg, stage, True, x, y),
        "ich_no_aug": ich_training(cfg, stage, False, x, y),
        "timm": timm_training(stage, cfg, x, y),
    }, args.batch, args.rounds, args.steps, args.warmup)
    print(f"  {stage} training done: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()),
          flush=True)
    return rates


def print_tables(train_rows: list, infer_rows: list) -> None:
    """The training and inference tables: images/s and the ratios to timm."""
    if train_rows:
        print("\ntraining, images/s (ich with online augmentation; augmentation cost = 1 - ich / ich without it)")
        print(f"{'stage':<8}{'ich':>9}{'ich no aug':>12}{'timm':>9}{'ich/timm':>10}"
              f"{'no-aug/timm':>13}{'aug cost':>10}")
    for stage, r in train_rows:
        print(f"{stage:<8}{r['ich']:>9.1f}{r['ich_no_aug']:>12.1f}{r['timm']:>9.1f}"
              f"{r['ich'] / r['timm']:>10.2f}{r['ich_no_aug'] / r['timm']:>13.2f}"
              f"{1 - r['ich'] / r['ich_no_aug']:>10.0%}")
    if infer_rows:
        print("\ninference (forward only), images/s")
        print(f"{'stage':<8}{'ich':>9}{'unfolded':>10}{'out of pl':>10}{'timm':>9}{'onnxrt':>9}"
              f"{'ich/timm':>10}{'unfolded/timm':>15}{'out-of-pl/timm':>16}{'onnxrt/timm':>13}")
        for stage, r in infer_rows:
            onnx = r.get("onnx", float("nan"))
            print(f"{stage:<8}{r['ich']:>9.1f}{r['ich_unfolded']:>10.1f}{r['ich_out_of_place']:>10.1f}"
                  f"{r['timm']:>9.1f}{onnx:>9.1f}{r['ich'] / r['timm']:>10.2f}"
                  f"{r['ich_unfolded'] / r['timm']:>15.2f}{r['ich_out_of_place'] / r['timm']:>16.2f}"
                  f"{onnx / r['timm']:>13.2f}")


if __name__ == "__main__":
    sys.exit(main())
