"""The one module that knows which Keras backend runs: selection, GPU detection, versions, seed.

In: a backend name from the config ("auto" | "torch" | "jax" | "tensorflow") and the "auto" /
true / false switches of mixed precision and XLA. Out: the resolved name (KERAS_BACKEND set before
Keras is imported), booleans, and a version dict recorded next to trained models.
Everything backend-specific (torch, jax, tensorflow imports) lives here and nowhere else.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys

from ich.constants import BACKENDS
DEFAULT = "torch"
# Distribution that provides each backend (for versions and install hints).
PACKAGE = {"torch": "torch", "jax": "jax", "tensorflow": "tensorflow"}


def select_backend(name: str = "auto") -> str:
    """Resolve `name`, set KERAS_BACKEND and return it.

    "auto" = the backend of an already imported keras, else $KERAS_BACKEND, else torch.
    Must run before anything imports keras: Keras reads the variable once, at import. Raises
    RuntimeError if keras is already loaded with another backend, ValueError for an unknown
    name and ImportError when the backend package is not installed.
    """
    if name == "auto":
        loaded = sys.modules.get("keras")
        name = loaded.backend.backend() if loaded else os.environ.get("KERAS_BACKEND") or DEFAULT
    if name not in BACKENDS:
        raise ValueError(f"unknown Keras backend {name!r}; valid: {list(BACKENDS)} or 'auto'")
    if "keras" in sys.modules:
        current = sys.modules["keras"].backend.backend()
        if current != name:
            raise RuntimeError(
                f"Keras is already imported with the {current!r} backend, but {name!r} was asked "
                f"for. Keras picks its backend once, at import: set KERAS_BACKEND={name} in the "
                f"environment (or train.backend: {current}) and start again.")
    if importlib.util.find_spec(PACKAGE[name]) is None:
        raise ImportError(
            f"Keras backend {name!r} needs the {PACKAGE[name]!r} package, which is not installed: "
            f"pip install 'ich[{name}]', or choose another train.backend")
    os.environ["KERAS_BACKEND"] = name
    return name


def current() -> str:
    """Name of the backend Keras uses (imports keras)."""
    import keras

    return keras.backend.backend()


def has_gpu() -> bool:
    """True when the active backend sees at least one GPU."""
    name = current()
    if name == "torch":
        import torch

        return bool(torch.cuda.is_available())
    if name == "jax":
        import jax

        try:
            return len(jax.devices("gpu")) > 0
        except RuntimeError:  # jax raises when no GPU platform is present
            return False
    if name == "tensorflow":
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU")) > 0
    return False


def resolve_mixed_precision(value) -> bool:
    """"auto" -> True on a GPU only (float16 on CPU is slower, not faster); bools pass through."""
    return has_gpu() if value == "auto" else bool(value)


def resolve_jit(value) -> bool:
    """"auto" -> True on a GPU only (compilation costs more than it saves on CPU); bools pass."""
    return has_gpu() if value == "auto" else bool(value)


def versions() -> dict:
    """{"ich": .., "keras": .., <backend>: ..} for the active backend, recorded with each model."""
    import keras

    import ich

    name = current()
    try:
        backend_version = importlib.metadata.version(PACKAGE[name])
    except importlib.metadata.PackageNotFoundError:
        backend_version = "unknown"
    return {"ich": ich.__version__, "keras": keras.__version__, name: backend_version}


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and the backend's generator so that runs repeat."""
    import keras

    keras.utils.set_random_seed(int(seed))


def export_onnx(model, path, input_shape: tuple, input_name: str, output_name: str,
                opset: int | None = None) -> None:
    """Write the float32 Keras `model` (one input, one output) as an ONNX graph to `path`.

    input_shape is the shape of one input sample (without the batch); the batch dimension stays
    dynamic. torch: the dynamo exporter on the model in inference mode (Keras's own
    `model.export(format="onnx")` traces nested functional models with TorchScript on a dynamic
    batch, which fails on the cascade's weights). JAX and TensorFlow: Keras's exporter, which
    needs jax2onnx or tf2onnx installed.
    """
    import keras

    name = current()
    if name != "torch":
        spec = keras.InputSpec(shape=(None, *input_shape), dtype="float32", name=input_name)
        keras.Model(model.inputs, model.outputs).export(
            str(path), format="onnx", input_signature=[spec], opset_version=opset, verbose=False)
        return
    import warnings

    import torch

    class Inference(torch.nn.Module):
        """The Keras model called with training=False, so dropout and augmentation stay off."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images):
            return self.inner(images, training=False)

    module = Inference(model).eval()
    # Batch 2: torch.export specialises sizes 0 and 1, so the example must not fix the batch.
    example = torch.zeros((2, *input_shape), dtype=torch.float32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter about pytree and constant folding
        program = torch.onnx.export(
            module, (example,), dynamo=True, opset_version=opset, input_names=[input_name],
            output_names=[output_name], dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False)
        program.optimize()
    program.save(str(path))


def export_saved_model(model, path) -> None:
    """Write the Keras `model` as a TensorFlow SavedModel folder at `path` (endpoint `serve`).

    Needs TensorFlow installed and the tensorflow (or jax) backend; raises RuntimeError naming
    the fix otherwise.
    """
    if importlib.util.find_spec("tensorflow") is None:
        raise RuntimeError("--format saved_model needs TensorFlow: pip install 'ich[tensorflow]'")
    if current() not in ("tensorflow", "jax"):
        raise RuntimeError(f"--format saved_model runs on the tensorflow backend, not {current()!r}: "
                           f"run it with KERAS_BACKEND=tensorflow")
    model.export(str(path), format="tf_saved_model", verbose=False)


def run_saved_model(path, images):
    """Outputs of the SavedModel at `path` (its `serve` endpoint) for a float32 batch, as numpy."""
    import numpy as np
    import tensorflow as tf

    return np.asarray(tf.saved_model.load(str(path)).serve(tf.constant(images)))


def gradients(fn, inputs: list) -> tuple[float, list]:
    """Value and gradients of a scalar function of arrays, on the active backend.

    In: `fn(tensors) -> scalar tensor`, taking a list of backend tensors (built from `inputs`,
    a list of NumPy arrays) and using Keras layers or keras.ops; out: (the value as a float,
    [d value / d input as a NumPy array of the input's shape, one per input]). Used by
    Grad-CAM (ich.evaluation.explain): each backend differentiates in its own way (torch's
    autograd, jax.grad, TensorFlow's GradientTape), and this is the one place that knows how.
    """
    import numpy as np

    name = current()
    if name == "torch":
        import keras
        import torch

        tensors = [keras.ops.convert_to_tensor(np.asarray(a)).detach().requires_grad_(True) for a in inputs]
        value = fn(tensors)
        grads = torch.autograd.grad(value, tensors, allow_unused=True)
        return float(value.detach().cpu()), [
            np.zeros_like(np.asarray(a)) if g is None else g.detach().cpu().numpy()
            for a, g in zip(inputs, grads)]
    if name == "jax":
        import jax
        import jax.numpy as jnp

        value, grads = jax.value_and_grad(fn)([jnp.asarray(a) for a in inputs])
        return float(value), [np.asarray(g) for g in grads]
    if name == "tensorflow":
        import tensorflow as tf

        tensors = [tf.convert_to_tensor(np.asarray(a)) for a in inputs]
        with tf.GradientTape() as tape:
            for t in tensors:
                tape.watch(t)
            value = fn(tensors)
        grads = tape.gradient(value, tensors)
        return float(value.numpy()), [np.zeros_like(np.asarray(a)) if g is None else g.numpy()
                                      for a, g in zip(inputs, grads)]
    raise ValueError(f"gradients: unsupported backend {name!r}; valid: {list(BACKENDS)}")
