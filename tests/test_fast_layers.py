"""ich.models.layers' fast Conv2D / DepthwiseConv2D / BatchNormalization / Dense against Keras' own.

The reference is the unoptimised path: the same network built from the plain Keras layers,
with the same weights and input. Torch (this process): forward in inference and in training
mode, the moving statistics after a training call, and the gradients, all within float
tolerance. JAX (a subprocess): the fast model saved here loads there (the layers are
registered) and its forward equals the torch reference outputs.
"""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from ich.models import layers as fast_layers
from ich.models.backbones import build_backbone

ATOL = 2e-5
CHECK = """
import sys, numpy as np, keras
import ich.models.layers  # registers the ich layers
model = keras.saving.load_model(sys.argv[1], compile=False)
x = np.load(sys.argv[2])
for training in (False, True):
    np.save(sys.argv[3] + f"_{int(training)}.npy", keras.ops.convert_to_numpy(model(x, training=training)))
print(keras.backend.backend(), sorted({type(l).__name__ for l in model.layers}))
"""


def small_network() -> keras.Model:
    """Every case of the fast paths: strided 'same' (asymmetric padding), 'valid', dilation,
    grouped-by-depth convolution with multiplier and bias, BatchNorm with and without
    centre/scale, an activation inside a conv, a dense layer over every pixel (ConvNeXt's)."""
    inputs = keras.Input((9, 10, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization(momentum=0.9)(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2)(x)
    x = keras.layers.BatchNormalization(center=False, scale=False, epsilon=1e-5)(x)
    x = keras.layers.Conv2D(6, 3, padding="valid", dilation_rate=1, activation="swish")(x)
    x = keras.layers.Conv2D(4, 2, padding="same", dilation_rate=2)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dense(5, activation="gelu")(x)
    return keras.Model(inputs, keras.layers.Dense(3, use_bias=False)(x))


def randomised(model: keras.Model, seed: int = 0, statistics_only: bool = False) -> keras.Model:
    """Give every weight (or only the BatchNorm statistics) random values: the defaults (zero
    mean, unit variance, zero bias) would hide a mix-up."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        if "variance" in w.path:
            w.assign(rng.uniform(0.5, 2.0, w.shape).astype("float32"))
        elif not statistics_only or "moving_mean" in w.path:
            w.assign(rng.normal(0, 0.5 if not statistics_only else 0.1, w.shape).astype("float32"))
    return model


def assert_close_to_scale(got, want, tolerance=1e-5):
    """Equal within `tolerance` of the largest magnitude: a deep float32 network's outputs
    differ by rounding in proportion to their scale."""
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= tolerance * max(np.abs(want).max(), 1.0), \
        (np.abs(got - want).max(), np.abs(want).max())


def no_dropout(model: keras.Model) -> keras.Model:
    """Zero every Dropout rate (EfficientNet's drop-connect): training mode becomes deterministic."""
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    return model


def numpy(t):
    return keras.ops.convert_to_numpy(t)


def test_the_fast_twins_replace_the_keras_layers_and_keep_the_weights():
    reference = randomised(small_network())
    fast = fast_layers.with_fast_layers(reference)
    kinds = [type(layer) for layer in fast.layers]
    assert fast_layers.FastConv2D in kinds and fast_layers.FastBatchNormalization in kinds
    assert fast_layers.FastDepthwiseConv2D in kinds and keras.layers.Conv2D not in kinds
    assert fast_layers.FastDense in kinds and keras.layers.Dense not in kinds
    for a, b in zip(reference.weights, fast.weights):
        assert a.path == b.path
        np.testing.assert_array_equal(numpy(a), numpy(b))


def test_small_network_forward_moving_statistics_and_gradients_match():
    import torch

    # Two builds with the same weights (with_fast_layers switches a model in place).
    reference = randomised(small_network())
    fast = fast_layers.with_fast_layers(randomised(small_network()))
    assert fast_layers.FastDense in {type(layer) for layer in fast.layers}
    assert not any(type(layer).__name__.startswith("Fast") for layer in reference.layers)
    x = np.random.default_rng(1).random((5, 9, 10, 3), dtype=np.float32)
    np.testing.assert_allclose(numpy(fast(x, training=False)), numpy(reference(x, training=False)),
                               atol=ATOL)
    grads = []
    for model in (reference, fast):
        inputs = torch.tensor(x, requires_grad=True)
        out = model(inputs, training=True)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads.append((numpy(out), inputs.grad.numpy(),
                      [numpy(w.value.grad) for w in model.trainable_weights]))
        for w in model.trainable_weights:
            w.value.grad = None
    (out_a, dx_a, dw_a), (out_b, dx_b, dw_b) = grads
    np.testing.assert_allclose(out_b, out_a, atol=ATOL)
    np.testing.assert_allclose(dx_b, dx_a, atol=ATOL)
    for a, b in zip(dw_a, dw_b):
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4)
    # The training call moved the statistics the same way (biased batch variance, momentum).
    for a, b in zip(reference.non_trainable_weights, fast.non_trainable_weights):
        np.testing.assert_allclose(numpy(b), numpy(a), atol=ATOL)


@pytest.mark.slow  # about 90 s on the shared 2-core machine: two EfficientNetV2B0 builds and a JAX process
def test_backbone_outputs_unchanged_on_torch_and_jax(tmp_path):
    # 64 px: at 32 px the last maps are 1x1 and training-mode BatchNorm over 3 values is
    # ill-conditioned, where Keras' E[x^2] - E[x]^2 and torch's one-pass variance part ways.
    shape = (64, 64, 3)
    # The unoptimised path: keras.applications' own layers, behind the same input scaling.
    plain = keras.applications.EfficientNetV2B0(include_top=False, weights=None, input_shape=shape)
    randomised(plain, seed=2, statistics_only=True)
    fast = no_dropout(build_backbone("EfficientNetV2B0", shape))
    inner = fast.layers[-1]
    inner.set_weights(plain.get_weights())
    no_dropout(plain)
    path = tmp_path / "fast.keras"
    fast.save(path)  # before any training call moves the statistics
    x = np.random.default_rng(3).random((3, *shape), dtype=np.float32)
    scaled = x * np.float32(255.0)  # build_backbone's Rescaling(255) in front of the network
    want = {training: numpy(plain(scaled, training=training)) for training in (False, True)}
    for training in (False, True):
        assert_close_to_scale(numpy(fast(x, training=training)), want[training],
                              1e-4 if training else 1e-5)

    # JAX: the fast model, saved on torch, loads and gives the reference outputs.
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                           os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", CHECK, str(path), str(tmp_path / "x.npy"),
                           str(tmp_path / "jax")], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("jax")
    for training in (False, True):
        got = np.load(tmp_path / f"jax_{int(training)}.npy")
        # Saved models keep the dropout rates: compare training mode only where they are zero.
        if not training:
            assert_close_to_scale(got, want[training])


@pytest.mark.parametrize("length, kernel, stride, dilation, want", [
    (9, 3, 2, 1, (1, 1)), (10, 3, 2, 1, (0, 1)), (10, 3, 1, 1, (1, 1)), (8, 2, 1, 2, (1, 1)),
    (7, 1, 2, 1, (0, 0)), (11, 5, 2, 1, (2, 2))])
def test_same_padding_pads_like_keras(length, kernel, stride, dilation, want):
    assert fast_layers.same_padding(length, kernel, stride, dilation) == want


def test_moving_statistics_under_stateless_call_match_the_stateful_update():
    # In place when stateful (lerp_), through assign in a stateless scope: the same numbers, and
    # the stateless call leaves the layer's own variables untouched.
    fast = fast_layers.with_fast_layers(randomised(small_network()))
    before = [numpy(w) for w in fast.non_trainable_weights]
    x = np.random.default_rng(4).random((5, 9, 10, 3), dtype=np.float32)
    _, updated = fast.stateless_call([w.value for w in fast.trainable_weights],
                                     [w.value for w in fast.non_trainable_weights], x, training=True)
    for w, want in zip(fast.non_trainable_weights, before):
        np.testing.assert_array_equal(numpy(w), want)
    fast(x, training=True)
    moved = 0
    for w, got, old in zip(fast.non_trainable_weights, updated, before):
        np.testing.assert_allclose(numpy(got), numpy(w), atol=ATOL)
        moved += not np.allclose(numpy(w), old)
    assert moved == len(before)


def test_prediction_follows_weight_changes_through_the_kernel_cache():
    # Without autograd the fast layers keep each kernel in torch's layout and reuse it until the
    # kernel changes: after an assign, and after an optimizer step, predictions must be those
    # of the new weights (Keras' own layers, same weights, as the reference).
    import torch

    fast = fast_layers.with_fast_layers(randomised(small_network(), seed=5))
    x = np.random.default_rng(6).random((3, 9, 10, 3), dtype=np.float32)

    def check():
        reference = small_network()
        reference.set_weights(fast.get_weights())
        with torch.no_grad():
            got, want = numpy(fast(x, training=False)), numpy(reference(x, training=False))
        np.testing.assert_allclose(got, want, atol=ATOL)
        return got

    first = check()
    with torch.inference_mode():
        again = numpy(fast(x, training=False))  # served from the cache
    np.testing.assert_array_equal(again, first)
    assert any("_ich_torch_kernel" in vars(layer) for layer in fast.layers)
    randomised(fast, seed=7)                       # assign: new kernels
    second = check()
    assert not np.allclose(second, first)
    fast.compile(keras.optimizers.SGD(0.5), "mse")
    fast.train_on_batch(x, np.zeros_like(second))  # an optimizer step: in place
    assert not np.allclose(check(), second)


@pytest.mark.parametrize("predict_first", [False, True])
def test_onnx_export_neither_keeps_nor_uses_cached_kernels(tmp_path, predict_first):
    # Found by bench/train_speed.py: an export before any prediction left the exporter's traced
    # tensors in the kernel cache (the next prediction returned a tensor subclass). After
    # predictions, the export must not change the cache either.
    import onnxruntime
    import torch

    from ich.backend import export_onnx

    fast = fast_layers.with_fast_layers(randomised(small_network(), seed=8))
    x = np.random.default_rng(9).random((2, 9, 10, 3), dtype=np.float32)
    with torch.no_grad():
        want = numpy(fast(x, training=False))
    for layer in fast.layers:
        vars(layer).pop("_ich_torch_kernel", None)
    if predict_first:
        fast.predict_on_batch(x)                        # fills the kernel cache
    export_onnx(fast, tmp_path / "m.onnx", (9, 10, 3), "image", "out")
    for _ in range(2):
        got = fast.predict_on_batch(x)
        assert type(got) is np.ndarray
        np.testing.assert_allclose(got, want, atol=ATOL)
    cached = [vars(layer)["_ich_torch_kernel"][2] for layer in fast.layers
              if "_ich_torch_kernel" in vars(layer)]
    assert cached and all(type(w) is torch.Tensor for w in cached)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"image": x})[0], want, atol=ATOL)


@pytest.mark.parametrize("noise_shape, seed", [((None, 1, 1, 1), 5), (None, 7), ((None, 1, 1, 4), 3)])
def test_fast_dropout_draws_keras_mask_and_matches_values_and_gradients(noise_shape, seed):
    import torch

    def layer():  # the same seed: both layers start on one seed stream
        return keras.layers.Dropout(0.3, noise_shape=noise_shape, seed=seed)

    reference, fast = layer(), fast_layers.with_fast_layers(keras.Sequential([layer()])).layers[0]
    assert type(fast) is fast_layers.FastDropout
    x = np.random.default_rng(4).normal(size=(6, 5, 5, 4)).astype(np.float32)
    outputs = []
    for dropout in (reference, fast):
        results = []
        for _ in range(3):  # the streams advance alike: a fresh mask each call, the same in both
            inputs = torch.tensor(x, requires_grad=True)
            out = dropout(inputs, training=True)
            (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
            results.append((numpy(out), inputs.grad.numpy()))
        outputs.append(results)
    for (out_a, dx_a), (out_b, dx_b) in zip(*outputs):
        np.testing.assert_allclose(out_b, out_a, rtol=1e-6)
        np.testing.assert_allclose(dx_b, dx_a, rtol=1e-6)
    dropped = [(out == 0).mean() for out, _ in outputs[1]]
    assert 0.0 < np.mean(dropped) < 0.7 and len({float(d) for d in dropped}) > 1
    np.testing.assert_array_equal(numpy(fast(x, training=False)), x)
