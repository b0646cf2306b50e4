"""A leaner eager forward pass for the image stages' functional models on the torch backend.

In: a built keras.Model of Keras' functional kind (the stage models, the backbones inside
them). `with_fast_graph(model)` gives that model, in place, a call that walks Keras' own graph
of the model in Keras' own order, but runs each plain layer (convolution, BatchNorm,
activation, add, multiply, dropout, reshape, pooling, dense, rescaling, layer
normalisation, and ich's fast twins
of the first two) through its `call` directly instead of its full `__call__`, and runs the
functional models nested inside it (the backbones) the same way. Every other layer (the
online augmentation, attention, ich's own layers) still goes through `__call__`. Out: the same
tensors, bit for bit, when training (tests/test_fast_graph.py compares forward, gradients and
BatchNorm statistics with Keras' own call). When predicting (training=False, autograd off, not
traced), each convolution read only by a BatchNorm runs with that BatchNorm folded into its
kernel and bias (ich.models.layers.folded_conv_bn): the same function within float rounding;
and each SiLU or ReLU activation whose input only it reads, fresh from a convolution, BatchNorm,
or dense layer, overwrites that input (torch's in-place kernels, as timm's blocks run
theirs): the same values, one allocation and one full write of the feature map less.

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
import weakref
from dataclasses import dataclass
from typing import Callable

import keras

from ich.models import layers as fast_layers

# Layers whose `call` needs nothing from `__call__` beyond what the module docstring lists.
DIRECT_LAYERS = (
    keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.BatchNormalization,
    keras.layers.Activation, keras.layers.Add, keras.layers.Multiply, keras.layers.Dropout,
    keras.layers.Reshape, keras.layers.GlobalAveragePooling2D, keras.layers.Dense,
    keras.layers.Rescaling, keras.layers.LayerNormalization, keras.layers.GlobalAveragePooling1D,
    fast_layers.FastConv2D, fast_layers.FastDepthwiseConv2D, fast_layers.FastBatchNormalization,
    fast_layers.FastDense, fast_layers.FastDropout)


@dataclass(frozen=True)
class Rewrites:
    """What a prediction forward may do beyond Keras' own layers (the module docstring)."""

    fold: bool = True     # run each convolution + BatchNorm pair as one convolution
    inplace: bool = True  # let an activation overwrite the input only it reads


def with_fast_graph(model: keras.Model, fold_batchnorm: bool = True, inplace: bool = True) -> keras.Model:
    """`model` itself, whose forward pass on torch now calls its plain layers directly (see the
    module docstring); unchanged on other backends and for non-functional models.
    fold_batchnorm=False keeps every BatchNorm separate when predicting too, inplace=False every
    activation out of place (bench/train_speed.py measures what each gains)."""
    if keras.backend.backend() == "torch" and _is_functional(model) and _float32(model):
        rewrites = Rewrites(fold_batchnorm, inplace)

        def call(self, inputs, training=None, mask=None, **kwargs):
            return _fast_call(self, inputs, training, mask, rewrites, **kwargs)

        model.call = types.MethodType(call, model)
    return model


def _is_functional(model) -> bool:
    from keras.src.models.functional import Functional

    return isinstance(model, Functional) and hasattr(model, "_run_through_graph")


def _fast_call(self, inputs, training, mask, rewrites: Rewrites, **kwargs):
    """Functional.call through run_graph where it applies, Keras' own otherwise."""
    if mask is not None or kwargs:
        return type(self).call(self, inputs, training=training, mask=mask, **kwargs)
    return run_graph(self, inputs, bool(training), rewrites)


def _float32(model) -> bool:
    """True when every layer of `model` computes and stores float32 (no mixed precision)."""
    return all(layer.compute_dtype == "float32" and layer.variable_dtype == "float32"
               for layer in model._flatten_layers())


def run_graph(model, inputs, training: bool, rewrites: Rewrites = Rewrites()):
    """The outputs of functional `model` on `inputs`: each node of its plan run in order (when
    predicting, with its convolution + BatchNorm pairs folded and its activations in place where
    `rewrites` allow)."""
    from keras.src import tree

    plan = _plan(model)
    values = dict(zip(plan.input_ids, tree.flatten(model._standardize_inputs(inputs))))
    predicting = _predicting(training)
    folding = rewrites.fold and plan.folds and predicting
    inplacing = rewrites.inplace and predicting
    for step in plan.steps:
        args, kwargs = step.fill(values)
        if inplacing and step.inplace is not None and fast_layers._torch_fast(args[0]):
            outputs = step.inplace(args[0])
        elif folding and step.fold is not None and fast_layers._torch_fast(args[0]):
            outputs = fast_layers.folded_conv_bn(step.layer, step.fold, args[0])
        elif folding and step.folded_away and fast_layers._torch_fast(args[0]):
            outputs = args[0]  # this BatchNorm is inside the convolution before it
        else:
            outputs = step.run(args, kwargs, training, rewrites)
        if len(step.output_ids) == 1 and not isinstance(outputs, (list, tuple, dict)):
            values[step.output_ids[0]] = outputs
        else:
            values.update(zip(step.output_ids, tree.flatten(outputs)))
    outputs = tree.pack_sequence_as(model._outputs_struct, [values[i] for i in plan.output_ids])
    if isinstance(outputs, (list, tuple)) and len(outputs) == 1:
        return outputs[0]  # Keras' unpack_singleton
    return outputs


def _predicting(training: bool) -> bool:
    """True for a prediction forward (inference mode, autograd off, not traced): where a
    convolution and the BatchNorm after it run as one (ich.models.layers.folded_conv_bn).
    Tracers (ONNX export, torch.compile) see the layers as they are and fold by themselves."""
    import torch

    return (not training and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not torch.compiler.is_exporting())


@dataclass
class _Step:
    """One node of a functional model: how its arguments are filled in and its layer run."""

    fill: Callable      # values (id of a graph tensor -> tensor) -> (args, kwargs)
    run: Callable       # (args, kwargs, training, rewrites) -> outputs
    output_ids: list
    layer: object = None
    input_ids: tuple = ()
    fold: object = None          # the BatchNorm folded into this convolution when predicting
    folded_away: bool = False    # this BatchNorm is folded into the convolution before it
    inplace: Callable = None     # this activation's in-place kernel, when it may overwrite its input


@dataclass
class _Plan:
    """A functional model's nodes in Keras' execution order (deepest first), made once."""

    input_ids: list
    steps: list
    output_ids: list
    folds: int = 0               # convolution + BatchNorm pairs that run as one when predicting


_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _plan(model) -> _Plan:
    """The cached plan of `model`: Keras' own order and skipping rule (a node whose inputs the
    model's inputs do not reach is not run), with the arguments' structure worked out here
    once instead of by keras.tree at every node of every call."""
    if model not in _PLANS:
        known = {id(x) for x in model.inputs}
        steps = []
        for depth in sorted(model._nodes_by_depth, reverse=True):
            for node in model._nodes_by_depth[depth]:
                if not node.operation or node.is_input:
                    continue
                if any(id(x) not in known for x in node.input_tensors):
                    continue
                outputs = [id(x) for x in node.outputs]
                known.update(outputs)
                tensor_kwargs = _holds_tensors(node.arguments.kwargs)
                steps.append(_Step(_filler(node.arguments, tensor_kwargs),
                                   _runner(node.operation, tensor_kwargs), outputs, node.operation,
                                   tuple(id(x) for x in node.input_tensors)))
        plan = _Plan([id(x) for x in model.inputs], steps, [id(x) for x in model.outputs])
        plan.folds = _pair_folds(plan)
        _mark_inplace(plan)
        _PLANS[model] = plan
    return _PLANS[model]


def _pair_folds(plan: _Plan) -> int:
    """Mark each convolution whose output only a BatchNorm reads (and that the model does not
    output) for folding; return how many pairs."""
    from collections import Counter

    readers = Counter(i for step in plan.steps for i in step.input_ids)
    readers.update(plan.output_ids)
    producer = {step.output_ids[0]: step for step in plan.steps if len(step.output_ids) == 1}
    pairs = 0
    for step in plan.steps:
        conv = producer.get(step.input_ids[0]) if len(step.input_ids) == 1 else None
        if (conv is not None and readers[step.input_ids[0]] == 1 and conv.fold is None
                and fast_layers.can_fold(conv.layer, step.layer)):
            conv.fold, step.folded_away = step.layer, True
            pairs += 1
    return pairs


# Layers whose output, when predicting, is a tensor they allocated (never a view of their input
# or a weight): an activation that alone reads it may overwrite it. A BatchNorm folded away
# passes on its convolution's output, which only that BatchNorm reads (_pair_folds).
FRESH_OUTPUT_LAYERS = (
    keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.BatchNormalization,
    keras.layers.Dense)


def _inplace_kernels() -> dict:
    """Keras activation function -> the torch kernel that computes it in place."""
    import torch

    return {keras.activations.silu: lambda x: torch.nn.functional.silu(x, inplace=True),
            keras.activations.relu: torch.relu_}


def _mark_inplace(plan: _Plan) -> None:
    """Give each Activation step whose input only it reads (not a model output), made by a
    FRESH_OUTPUT_LAYERS step of this plan, its in-place kernel. An input coming from outside
    the plan (the model's input, a nested model's output) is never overwritten."""
    from collections import Counter

    if keras.backend.backend() != "torch":
        return
    kernels = _inplace_kernels()
    readers = Counter(i for step in plan.steps for i in step.input_ids)
    readers.update(plan.output_ids)
    producer = {step.output_ids[0]: step for step in plan.steps if len(step.output_ids) == 1}
    for step in plan.steps:
        if type(step.layer) is not keras.layers.Activation or len(step.input_ids) != 1:
            continue
        source = producer.get(step.input_ids[0])
        if (source is not None and readers[step.input_ids[0]] == 1
                and isinstance(source.layer, FRESH_OUTPUT_LAYERS)
                and step.layer.activation in kernels):
            step.inplace = kernels[step.layer.activation]


def _holds_tensors(kwargs: dict) -> bool:
    """True when a node's keyword arguments hold a graph tensor (a mask, say)."""
    from keras.src import tree
    from keras.src.backend import KerasTensor

    return any(isinstance(v, KerasTensor) for v in tree.flatten(kwargs))


def _filler(arguments, tensor_kwargs: bool) -> Callable:
    """values -> (args, kwargs) for one node: direct look-ups for one tensor or a list of tensors
    (every node of the backbones) with tensor-free keyword arguments (`mask=None`), Keras' own
    fill_in otherwise. "training" is left out: the runner passes the call's own."""
    from keras.src.backend import KerasTensor

    kwargs = {k: v for k, v in arguments.kwargs.items() if k != "training"}
    tensor_free = not tensor_kwargs
    args = arguments.args
    if tensor_free and len(args) == 1 and isinstance(args[0], KerasTensor):
        one = id(args[0])
        return lambda values: ((values[one],), kwargs)
    if (tensor_free and len(args) == 1 and isinstance(args[0], list)
            and all(isinstance(x, KerasTensor) for x in args[0])):
        many = [id(x) for x in args[0]]
        return lambda values: (([values[i] for i in many],), kwargs)

    def generic(values):
        args, kwargs = arguments.fill_in(values)
        return args, {k: v for k, v in kwargs.items() if k != "training"}
    return generic


def _runner(layer, tensor_kwargs: bool) -> Callable:
    """(args, kwargs, training, rewrites) -> outputs for one node's layer: nested functional models by
    run_graph, DIRECT_LAYERS by their call (with `training` where the call takes it), anything
    else by __call__ with `training`, as Keras' Functional.call propagates it (to every layer:
    its __call__ hands it on to the layers inside)."""
    if _is_functional(layer) and not tensor_kwargs:
        return lambda args, kwargs, training, rewrites: run_graph(layer, args[0], training, rewrites)
    if type(layer) in DIRECT_LAYERS and layer.activity_regularizer is None:
        if layer._call_has_training_arg:
            return lambda args, kwargs, training, rewrites: layer.call(*args, **kwargs, training=training)
        return lambda args, kwargs, training, rewrites: layer.call(*args, **kwargs)
    # getattr: a node can also be a keras.ops operation (`x + y` in a functional model), no layer
    if "training" in getattr(layer, "_call_context_args", ()):
        return lambda args, kwargs, training, rewrites: layer(*args, **kwargs, training=training)
    return lambda args, kwargs, training, rewrites: layer(*args, **kwargs)
