"""ich.models.graph: the torch forward that calls plain layers directly, against Keras' own call.

The reference is the same model object with the override removed (Keras' Functional.call),
or a twin with the same weights where a training call moves BatchNorm statistics. Training
forward, gradients and moving statistics must be identical: the fast path runs the same layer
code, only without __call__ around it. Prediction (autograd off) folds each convolution's
BatchNorm into it, so there the outputs agree within float rounding.
"""

import keras
import numpy as np
import pytest

from ich.models import graph
from ich.models.cascade import build_stage1, build_stage2
from ich.models.layers import TokenEmbedding


def numpy(t):
    return keras.ops.convert_to_numpy(t)


def network(seed: int = 0) -> keras.Model:
    """A nested functional model (like a backbone inside a stage) with every kind of node the
    fast path meets: direct layers with and without a training argument, merges, a layer that
    is not direct (TokenEmbedding, through __call__), dropout."""
    keras.utils.set_random_seed(seed)
    inner_in = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(6, 3, padding="same", use_bias=False)(inner_in)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("swish")(x)
    gate = keras.layers.Dense(6, activation="sigmoid")(keras.layers.GlobalAveragePooling2D(keepdims=True)(x))
    x = keras.layers.Add()([keras.layers.Multiply()([x, gate]), x])
    inner = keras.Model(inner_in, x, name="inner")
    inputs = keras.Input((8, 8, 4))
    y = inner(keras.layers.Rescaling(2.0)(inputs))
    tokens = TokenEmbedding()(keras.layers.Reshape((64, 6))(y))
    tokens = keras.layers.LayerNormalization()(tokens)
    pooled = keras.layers.Dropout(0.0)(keras.layers.GlobalAveragePooling1D()(tokens))
    return keras.Model(inputs, keras.layers.Dense(3, activation="sigmoid")(pooled))


def test_forward_gradients_and_statistics_equal_keras_call():
    import torch

    x = np.random.default_rng(1).random((5, 8, 8, 4), dtype=np.float32)
    fast, plain = graph.with_fast_graph(network()), network()
    assert "call" in vars(fast) and "call" not in vars(plain)
    plain.set_weights(fast.get_weights())
    np.testing.assert_array_equal(numpy(fast(x, training=False)), numpy(plain(x, training=False)))
    results = []
    for model in (fast, plain):
        inputs = torch.tensor(x, requires_grad=True)
        out = model(inputs, training=True)
        (out * torch.linspace(-1, 1, 3)).sum().backward()
        results.append((numpy(out), inputs.grad.numpy(),
                        [numpy(w.value.grad) for w in model.trainable_weights],
                        [numpy(w) for w in model.non_trainable_weights]))
    for a, b in zip(*results):
        for u, v in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            np.testing.assert_array_equal(u, v)
    # The training call moved the BatchNorm statistics (so the comparison above means something).
    assert not np.allclose(results[0][3][0], 0.0)


def test_the_fast_path_runs_in_the_stage_and_its_nested_model(monkeypatch):
    model = graph.with_fast_graph(network())
    x = np.random.default_rng(2).random((2, 8, 8, 4), dtype=np.float32)
    calls = []
    real = graph.run_graph
    monkeypatch.setattr(graph, "run_graph", lambda *a: calls.append(a[0].name) or real(*a))
    model.predict_on_batch(x)
    assert calls == [model.name, "inner"]  # the stage, then its nested model, both run by ich


def test_mixed_precision_models_keep_keras_call():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = graph.with_fast_graph(network())
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert "call" not in vars(model)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_stage_models_are_built_with_it_and_predict_as_before(stage):
    x = np.random.default_rng(3).random((2, 32, 32, 3), dtype=np.float32)
    if stage == "stage1":
        model = build_stage1("EfficientNetV2B0", 32)
    else:
        model = build_stage2(["EfficientNetV2B0", "ConvNeXtTiny"], 32, fusion_dim=32, attention_heads=2)
    assert "call" in vars(model)
    fast = numpy(model.predict_on_batch(x))
    del model.call  # Keras' own Functional.call on the same weights
    np.testing.assert_allclose(fast, numpy(model.predict_on_batch(x)), atol=1e-5)


def conv_bn_network() -> keras.Model:
    """Pairs that fold (conv + BN, depthwise with bias + BN without scale) and one that must
    not: a convolution whose output a second layer also reads."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((9, 9, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("swish")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, use_bias=True)(x)
    x = keras.layers.BatchNormalization(scale=False, epsilon=1e-3)(x)
    shared = keras.layers.Conv2D(16, 1)(x)
    y = keras.layers.BatchNormalization()(shared)
    return keras.Model(inputs, keras.layers.Add()([y, shared]))


def test_prediction_folds_batchnorm_into_convolutions_and_follows_weight_changes():
    import torch

    from ich.models.layers import with_fast_layers

    model = graph.with_fast_graph(with_fast_layers(conv_bn_network()))
    rng = np.random.default_rng(5)
    for w in model.weights:  # statistics far from the defaults, so that folding matters
        w.assign(rng.uniform(0.5, 2.0, w.shape).astype("float32") if "variance" in w.path
                 else rng.normal(0, 0.5, w.shape).astype("float32"))
    assert graph._plan(model).folds == 2
    x = rng.random((4, 9, 9, 3), dtype=np.float32)

    def keras_prediction():
        with torch.no_grad():
            return numpy(type(model).call(model, keras.ops.convert_to_tensor(x), training=False))

    for _ in range(2):
        with torch.no_grad():
            folded = numpy(model(x, training=False))
        np.testing.assert_allclose(folded, keras_prediction(), atol=2e-5)
        assert any("_ich_folded" in vars(layer) for layer in model.layers)
        model(x, training=True)  # moves the moving statistics: the folded weights must follow
    # With autograd on, nothing is folded: the graph's own BatchNorm runs.
    np.testing.assert_array_equal(numpy(model(x, training=False)), numpy(
        type(model).call(model, keras.ops.convert_to_tensor(x), training=False)))


def test_fold_batchnorm_false_predicts_exactly_as_keras():
    import torch

    from ich.models.layers import with_fast_layers

    model = graph.with_fast_graph(with_fast_layers(conv_bn_network()), fold_batchnorm=False)
    x = np.random.default_rng(6).random((2, 9, 9, 3), dtype=np.float32)
    with torch.no_grad():
        got = numpy(model(x, training=False))
        want = numpy(type(model).call(model, keras.ops.convert_to_tensor(x), training=False))
    np.testing.assert_array_equal(got, want)
    assert not any("_ich_folded" in vars(layer) for layer in model.layers)


def inplace_network() -> keras.Model:
    """Activations that may overwrite their input (after conv + BN, after a dense layer) and
    ones that must not: on the model's input, on a tensor a second layer reads, GELU (no
    in-place kernel)."""
    keras.utils.set_random_seed(7)
    inputs = keras.Input((6, 6, 3))
    on_input = keras.layers.Activation("relu", name="on_input")(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same")(on_input)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("swish", name="after_bn")(x)
    shared = keras.layers.Conv2D(4, 1)(x)
    read_twice = keras.layers.Activation("relu", name="read_twice")(shared)
    x = keras.layers.Add()([read_twice, shared])
    x = keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(x))
    x = keras.layers.Activation("relu", name="after_dense")(x)
    return keras.Model(inputs, keras.layers.Activation("gelu", name="gelu")(x))


def test_prediction_runs_activations_in_place_only_where_nothing_else_reads_the_input():
    import torch

    from ich.models.layers import with_fast_layers

    model = graph.with_fast_graph(with_fast_layers(inplace_network()))
    marked = {step.layer.name for step in graph._plan(model).steps if step.inplace is not None}
    assert marked == {"after_bn", "after_dense"}
    x = torch.tensor(np.random.default_rng(8).normal(size=(3, 6, 6, 3)).astype("float32"))
    before = x.clone()
    with torch.no_grad():
        got = numpy(model(x, training=False))
        want = numpy(type(model).call(model, x, training=False))
    np.testing.assert_allclose(got, want, atol=1e-5)
    torch.testing.assert_close(x, before, rtol=0, atol=0)  # the caller's input is never written
    # With autograd on nothing runs in place (backward needs the inputs): Keras' values exactly.
    np.testing.assert_array_equal(numpy(model(x, training=False)),
                                  numpy(type(model).call(model, x, training=False)))
