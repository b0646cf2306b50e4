"""Import timm, the benchmarks' native-PyTorch reference, beside the CPU-only torch 2.13.0.

timm is a benchmark-only dependency. `import timm` imports every model module, and some of
them import timm.data, which imports torchvision (transforms, datasets, ops.misc). timm's model
code itself uses nothing of torchvision's compiled operators. PyPI's torchvision wheels,
including 0.28.0 (the release built for torch 2.13.0), link their `_C` extension against the
CUDA build of torch (libtorch_cuda.so, libc10_cuda.so); beside the CPU wheel it fails to load.
torchvision tolerates that (it then has no detection ops), except that its
_meta_registrations.py registers fake kernels for `torchvision::nms` and `torchvision::qnms`
unconditionally, which raises "operator torchvision::nms does not exist" at import.

So: install both without dependencies into a folder of their own, never into the project's
environment (where `import torchvision` would then raise for anything that tries it):

    python -m pip install --no-deps --target .bench-deps timm==1.0.31 torchvision==0.28.0

`load_timm()` puts .bench-deps (or $ICH_BENCH_DEPS) on sys.path and imports timm; only where
torchvision's import fails on those two schemas does it declare them (no kernel: calling nms
raises, and no classification model calls it) and import again. timm's optional
huggingface_hub and safetensors are not needed for random-init models. torch is never replaced.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEPS = Path(os.environ.get("ICH_BENCH_DEPS", Path(__file__).resolve().parents[1] / ".bench-deps"))
INSTALL = "python -m pip install --no-deps --target .bench-deps timm==1.0.31 torchvision==0.28.0"
# Operators torchvision registers fake kernels for whether or not its extension loaded.
UNCONDITIONAL_OPS = ("nms", "qnms")
SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def load_timm():
    """Return the imported timm module; raises ImportError with the install line if absent."""
    if DEPS.is_dir() and str(DEPS) not in sys.path:
        sys.path.insert(0, str(DEPS))
    import torch

    try:
        import torchvision  # noqa: F401
    except ImportError as err:
        raise ImportError(f"timm needs torchvision beside it for the benchmark: {INSTALL}") from err
    except RuntimeError as err:
        if "torchvision::nms does not exist" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        for op in UNCONDITIONAL_OPS:
            torch.library.define(f"torchvision::{op}", SCHEMA)
        import torchvision  # noqa: F401
    try:
        import timm
    except ImportError as err:
        raise ImportError(f"timm is not installed: {INSTALL}") from err
    return timm
