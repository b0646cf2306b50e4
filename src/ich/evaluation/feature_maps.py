"""Where Grad-CAM looks inside a stage model: the layer rule, each cell's place on the image,
and the model run with that layer's output read out or replaced.

In: a functional Keras stage model (backbones nested as models named PREFIX + name, see
ich.models.backbones; or any functional model with a GlobalAveragePooling2D) and a feature
stride. Out: `Target`s (the layer, its name, the geometry of its cells) and `run`, the model's
output with the targets' maps captured or substituted (what ich.evaluation.explain
differentiates through).

The layer rule (`targets`), per backbone of the model:
- stride 32, the stride of every registered backbone's output: the backbone's output, its last
  feature map (EfficientNetV2's top activation, ConvNeXt's final LayerNorm);
- a smaller stride (4, 8 or 16; `explain.feature_stride`, 8 by default): the output of the
  backbone's last residual block at that stride (its last sum of two maps there: the end of the
  stage that the next downsampling reads). EfficientNetV2B0: block3b_add at 8, block5e_add at
  16, block2b_add at 4; ConvNeXt: the last block of its second stage at 8 (third at 16, first at
  4). At 8: 12 x 12 cells at 96 px and 32 x 32 at 256 px, where the last map has 3 x 3 and 8 x 8.
  Why 8: bench/explain_hit_rate.py on the demo model (README, Measured).
A model without a backbone (hand-built test models) is explained at the input of its last
GlobalAveragePooling2D, whatever the stride.

Cell geometry: a cell is placed at the centre of its receptive field, found by walking the
graph from the layer back to the model input through every convolution, pooling, padding and
cropping (nested models included) and composing, per axis, input index = stride x cell index +
offset. Keras pads "same" as TensorFlow does, the extra pixel after, so each stride-2 3 x 3
convolution on an even side moves the centre half an input pixel down: EfficientNetV2B0's cell
i at stride 16 is centred on input pixel 16 i + 15 (32 i + 31 at stride 32), not on the middle
of its 16-pixel block (16 i + 7.5, where plain image resizing puts it). ConvNeXt's "valid"
patch convolutions keep the centres in the middle of the blocks (8 i + 3.5 at stride 8).
"""

from __future__ import annotations

from dataclasses import dataclass

# The output stride of every registered backbone (ich.models.backbones.BACKBONES): a target at
# this stride is the backbone's own output.
BACKBONE_STRIDE = 32
# Spatial axes of channels-last (N, H, W, C) feature maps.
SPATIAL_AXES = (1, 2)


@dataclass(frozen=True)
class Axis:
    """Cell i of a map lies centred on input pixel index `stride * i + offset` along one axis."""
    stride: float = 1.0
    offset: float = 0.0

    def then(self, inner: "Axis") -> "Axis":
        """The composition: `inner` maps cells to this layer's output indices, self maps those
        to its input's."""
        return Axis(self.stride * inner.stride, self.stride * inner.offset + self.offset)


@dataclass(frozen=True)
class Target:
    """One feature map Grad-CAM explains: `path` the layers from the stage model down to the one
    whose output is the map (empty: the model input itself), `name` the path's layer names
    joined by '/', `rows` and `cols` the cells' geometry on the model input."""
    path: tuple
    name: str
    rows: Axis
    cols: Axis


def targets(model, stride: int) -> list[Target]:
    """The feature maps of `model` Grad-CAM explains at `stride` (the layer rule above)."""
    import keras

    from ich.models.cascade import backbone_layers

    backbones = backbone_layers(model)
    if not backbones:
        pools = [layer for layer in model.layers if isinstance(layer, keras.layers.GlobalAveragePooling2D)]
        if not pools:
            raise ValueError(f"model {model.name!r} has no backbone and no GlobalAveragePooling2D: "
                             "nothing to explain")
        tensor = _node_of(pools[-1], model).input_tensors[0]
        op = tensor._keras_history.operation
        path = () if isinstance(op, keras.layers.InputLayer) else (op,)
        return [_target(model, path, tensor)]
    return [_backbone_target(model, backbone, stride) for backbone in backbones]


def run(model, x, chosen: list[Target], replace: list | None = None):
    """(the output of `model` on x, [each target's map]). With `replace` (one tensor per
    target), each target layer returns the given tensor instead of computing its own, so the
    output is a differentiable function of those tensors (the layers before a target still run;
    nothing depends on them). A target with an empty path is the input: x itself, or its
    replacement."""
    import keras

    inputs = [k for k, t in enumerate(chosen) if not t.path]
    x = keras.ops.convert_to_tensor(replace[inputs[0]] if replace is not None and inputs else x)
    captured = [x if not t.path else None for t in chosen]
    entries = [(t.path, k) for k, t in enumerate(chosen) if t.path]
    out = model._run_through_graph(x, operation_fn=_operation_fn(entries, captured, replace))
    return out, (list(replace) if replace is not None else captured)


def _operation_fn(entries: list, captured: list, replace):
    """Keras' `_run_through_graph` hook: each operation itself, except the first layer of a
    target's path (replaced or captured there, or run with the hook one level down)."""
    by_op = {}
    for path, k in entries:
        by_op.setdefault(id(path[0]), []).append((path[1:], k))

    def operation_fn(op):
        rests = by_op.get(id(op))
        if rests is None:
            return op
        if len(rests) == 1 and not rests[0][0]:
            k = rests[0][1]
            if replace is not None:
                return lambda *args, **kwargs: replace[k]

            def call(*args, **kwargs):
                captured[k] = op(*args, **kwargs)
                return captured[k]
            return call
        inner = _operation_fn(rests, captured, replace)
        return lambda inputs, *args, **kwargs: op._run_through_graph(inputs, operation_fn=inner)

    return operation_fn


def _backbone_target(model, backbone, stride: int) -> Target:
    """The backbone's output at the backbone stride, else its last Add layer at `stride`."""
    import keras

    if stride == BACKBONE_STRIDE:
        return _target(model, (backbone,), _node_of(backbone, model).outputs[0])
    bases = [layer for layer in backbone.layers if isinstance(layer, keras.Model)]
    for base in bases:
        for op in reversed(base.operations):
            node = _node_of(op, base)
            if _is_residual_sum(op, node):
                candidate = _target(model, (backbone, base, op), node.outputs[0])
                if candidate.rows.stride == stride and candidate.cols.stride == stride:
                    return candidate
    raise ValueError(f"backbone {backbone.name!r} has no residual block (a sum of two maps) at stride {stride}; "
                     f"choose explain.feature_stride {BACKBONE_STRIDE} (its last feature map) or a stride "
                     "at which it has one (EfficientNetV2 and ConvNeXt: 4, 8, 16)")


def _is_residual_sum(op, node) -> bool:
    """A residual block's end: the sum of two maps of one shape, as a keras.layers.Add
    (EfficientNetV2) or as the `+` of two tensors, which Keras records as an operation named Add
    rather than a layer (ConvNeXt)."""
    maps = node.input_tensors
    return (type(op).__name__ == "Add" and len(maps) == 2 and len(maps[0].shape) == 4
            and tuple(maps[0].shape) == tuple(maps[1].shape))


def _target(model, path: tuple, tensor) -> Target:
    """A Target for the map `tensor` (the output of path[-1] in its own graph) of `model`."""
    rows, cols = _walk(tensor)
    owners = (model, *path[:-1])
    # Up the nesting: where each sub-model sits in its parent's graph moves its cells too.
    for parent, child in reversed(list(zip(owners[:-1], owners[1:]))):
        up_rows, up_cols = _walk(_node_of(child, parent).input_tensors[0])
        rows, cols = up_rows.then(rows), up_cols.then(cols)
    return Target(path, "/".join(layer.name for layer in path) or "input", rows, cols)


def _walk(tensor) -> tuple[Axis, Axis]:
    """Geometry (rows, cols) of `tensor`'s cells on the input of the graph it belongs to."""
    rows, cols = Axis(), Axis()
    while True:
        op, node_index, _ = tensor._keras_history
        node = op._inbound_nodes[node_index]
        if node.is_input:
            return rows, cols
        parent = _spatial_parent(node, op)
        step_rows, step_cols = _layer_geometry(op, parent.shape, tensor.shape)
        rows, cols = step_rows.then(rows), step_cols.then(cols)
        tensor = parent


def _spatial_parent(node, op):
    """The node's input the map's cells come from: the largest 4-D one (an Add's inputs are
    alike; squeeze-and-excitation multiplies by a 1 x 1 map)."""
    maps = [t for t in node.input_tensors if len(t.shape) == 4]
    if not maps:
        raise ValueError(f"Grad-CAM cannot follow layer {op.name!r} ({type(op).__name__}) back to the "
                         "image: none of its inputs is a (N, H, W, C) map")
    return max(maps, key=lambda t: (t.shape[1] or 0) * (t.shape[2] or 0))


def _layer_geometry(op, in_shape, out_shape) -> tuple[Axis, Axis]:
    """(rows, cols): output index -> input index of one layer."""
    import keras

    from ich.models.layers import same_padding

    if isinstance(op, keras.Sequential):
        op = op._functional
    if isinstance(op, keras.Model):
        return _walk(op.outputs[0])
    if isinstance(op, keras.layers.ZeroPadding2D):
        return tuple(Axis(1.0, -float(before)) for before, _ in op.padding)
    if isinstance(op, keras.layers.Cropping2D):
        return tuple(Axis(1.0, float(before)) for before, _ in op.cropping)
    windowed = getattr(op, "kernel_size", None) or getattr(op, "pool_size", None)
    if windowed is not None and not isinstance(op, keras.layers.Conv2DTranspose):
        dilation = getattr(op, "dilation_rate", (1, 1))
        axes = []
        for a, k, s, d in zip(SPATIAL_AXES, windowed, op.strides, dilation):
            before = same_padding(int(in_shape[a]), k, s, d)[0] if op.padding == "same" else 0
            axes.append(Axis(float(s), -before + (k - 1) * d / 2))
        return tuple(axes)
    if tuple(in_shape[1:3]) == tuple(out_shape[1:3]):
        return Axis(), Axis()       # pointwise along the map: norms, activations, 1 x 1 dense
    raise ValueError(f"Grad-CAM cannot place the cells of layer {op.name!r} ({type(op).__name__}, "
                     f"{tuple(in_shape)} -> {tuple(out_shape)}) on the image")


def _node_of(layer, model):
    """The node where `layer` was called in `model`'s graph (a layer used once there)."""
    for nodes in model._nodes_by_depth.values():
        for node in nodes:
            if node.operation is layer:
                return node
    raise ValueError(f"layer {layer.name!r} is not called in model {model.name!r}")
