"""A leaner eager forward pass for the image stages' functional models on the torch backend.

In: a built keras.Model of Keras' functional kind (the stage models, the backbones inside
them). `with_fast_graph(model)` gives that model, in place, a call that walks Keras' own graph
of the model in Keras' own order, but runs each plain layer (convolution, BatchNorm,
activation, add, multiply, dropout, reshape, pooling, dense, rescaling, layer
normalisation, and ich's fast twins
of the first two) through its `call` directly instead of its full `__call__`, and runs the
functional models nested inside it (the backbones) the same way. Every other layer (the
online augmentation, attention, ich's own layers) still goes through `__call__`. Out: the same
tensors, bit for bit (tests/test_fast_graph.py compares forward, gradients and BatchNorm
statistics with Keras' own call).

Why (bench/train_speed.py, 128 px, batch 16, one thread): on torch eager, Keras' per-layer
`__call__` (input conversion, call-spec binding, training-argument resolution, mask
propagation, name and autocast scopes) is Python work on each of EfficientNetV2B0's ~270
layers at every forward; timm's modules have none of it. It made ich's stage-1 forward about a
third slower than timm's with the operators themselves taking the same time.

What `__call__` does that a direct `call` skips, and why each is safe here: input conversion
and autocasting (the fast path runs only when every layer computes and stores in float32: no
mixed precision), masks (none of these layers takes one; a call with a mask uses Keras' own
path), activity regularisers (a layer with one is not called directly), distribution
relayouts (Keras has no keras.distribution on torch), building (the model is built), and the
training argument (passed explicitly to every layer whose call takes it, as Keras would
propagate it). Anywhere else (JAX, TensorFlow, symbolic calls) Keras' own call runs. Nothing
changes in a saved file: the override is an attribute of the model object, not of its class.
"""

from __future__ import annotations

import types

import keras

from ich.models import layers as fast_layers

# Layers whose `call` needs nothing from `__call__` beyond what the module docstring lists.
DIRECT_LAYERS = (
    keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.BatchNormalization,
    keras.layers.Activation, keras.layers.Add, keras.layers.Multiply, keras.layers.Dropout,
    keras.layers.Reshape, keras.layers.GlobalAveragePooling2D, keras.layers.Dense,
    keras.layers.Rescaling, keras.layers.LayerNormalization, keras.layers.GlobalAveragePooling1D,
    fast_layers.FastConv2D, fast_layers.FastDepthwiseConv2D, fast_layers.FastBatchNormalization)


def with_fast_graph(model: keras.Model) -> keras.Model:
    """`model` itself, whose forward pass on torch now calls its plain layers directly (see the
    module docstring); unchanged on other backends and for non-functional models."""
    if keras.backend.backend() == "torch" and _is_functional(model) and _float32(model):
        model.call = types.MethodType(_fast_call, model)
    return model


def _is_functional(model) -> bool:
    from keras.src.models.functional import Functional

    return isinstance(model, Functional) and hasattr(model, "_run_through_graph")


def _fast_call(self, inputs, training=None, mask=None, **kwargs):
    """Functional.call through run_graph where it applies, Keras' own otherwise."""
    if mask is not None or kwargs:
        return type(self).call(self, inputs, training=training, mask=mask, **kwargs)
    return run_graph(self, inputs, bool(training))


def _float32(model) -> bool:
    """True when every layer of `model` computes and stores float32 (no mixed precision)."""
    return all(layer.compute_dtype == "float32" and layer.variable_dtype == "float32"
               for layer in model._flatten_layers())


def run_graph(model, inputs, training: bool):
    """The outputs of functional `model` on `inputs`, each node computed by `_runner`."""
    inputs = model._standardize_inputs(inputs)
    outputs = model._run_through_graph(inputs, operation_fn=lambda op: _runner(op, training))
    if isinstance(outputs, (list, tuple)) and len(outputs) == 1:
        return outputs[0]  # Keras' unpack_singleton
    return outputs


def _runner(layer, training: bool):
    """How one node's layer is run: nested functional models by run_graph, DIRECT_LAYERS by
    their call (with `training` where the call takes it), anything else by __call__ with
    `training` propagated as Keras' Functional.call propagates it."""
    if _is_functional(layer):
        return lambda *args, **kwargs: run_graph(layer, args[0], training)
    # getattr: a node can also be a keras.ops operation (`x + y` in a functional model), no layer
    takes_training = getattr(layer, "_call_has_training_arg", False)
    if type(layer) in DIRECT_LAYERS and layer.activity_regularizer is None:
        if takes_training:
            return lambda *args, **kwargs: layer.call(*args, **{**kwargs, "training": training})
        return layer.call
    if takes_training:
        return lambda *args, **kwargs: layer(*args, **{**kwargs, "training": training})
    return layer
