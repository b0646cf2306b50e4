"""Explanations: Grad-CAM heatmaps of a stage's outputs, plain CAM, overlays, lesion hit rate.

In: a Keras stage model (float32 (N, S, S, 3) in [0, 1] -> (N, k) sigmoid), images (uint8 or
float), an output column. Out: heatmaps float32 (N, S, S) in [0, 1] (1 = most evidence for
the output), uint8 RGB overlays, and the hit statistics of heatmap peaks against masks.

Grad-CAM (Selvaraju et al. 2017): with feature maps A (h, w, C) and the gradient G of the
output's log-odds with respect to them, weights a_c = mean over (h, w) of G_c, map =
ReLU(sum_c a_c A_c), upsampled to the image and divided by its maximum. The feature maps are
the outputs of the model's backbones (both of them in stage 2, whose maps are summed after
upsampling), or, for a model without a backbone, the input of its last GlobalAveragePooling2D.
Gradients come from ich.backend.gradients, so torch, JAX and TensorFlow all work.

Plain CAM (Zhou et al. 2016): for a pooled-then-dense head (stage 1: backbone -> global
average pool -> dense), the logit is mean_hw(sum_c W_c A_c) + b exactly, so the map
sum_c W_c A_c is that logit's decomposition over positions; Grad-CAM's weights are then W / (h w),
the same map up to a positive factor (tested).

The gradient is taken of the probability and divided by p (1 - p) (which turns it into the
gradient of the log-odds without ever taking the log of a saturated 1.0); a positive factor
per image does not change a normalised map, but it keeps tiny gradients from underflowing.
"""

from __future__ import annotations

import cv2
import numpy as np

# Heatmap colours: OpenCV's JET map, blended over the grey blood window at this weight.
OVERLAY_ALPHA = 0.45
# Maps this close to zero everywhere carry no evidence: they stay all-zero, not rescaled noise.
EPS = 1e-12


def feature_tensors(model) -> list:
    """The symbolic feature maps Grad-CAM explains (see the module docstring)."""
    import keras

    from ich.models.cascade import backbone_layers

    backbones = backbone_layers(model)
    if backbones:
        # A nested model's `.output` is its own graph's; the tensor it produced where the
        # stage called it is the output of its (single) inbound node.
        return [b._inbound_nodes[-1].outputs[0] for b in backbones]
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.GlobalAveragePooling2D)]
    if not pools:
        raise ValueError(f"model {model.name!r} has no backbone and no GlobalAveragePooling2D: "
                         "nothing to explain")
    return [pools[-1].input]


def gradcam(model, images, column: int = 0, batch_size: int = 16) -> np.ndarray:
    """Grad-CAM of output `column` of `model` for images (N, S, S, 3) uint8 or float [0, 1].
    Out: float32 (N, S, S) heatmaps in [0, 1] at the image's resolution."""
    import keras

    x_all = _to_float(images)
    features = feature_tensors(model)
    from_input = len(features) == 1 and any(features[0] is t for t in model.inputs)
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    feature_model = None if from_input else keras.Model(inputs, features)
    out = np.zeros(x_all.shape[:3], dtype=np.float32)
    for start in range(0, len(x_all), batch_size):
        x = x_all[start:start + batch_size]
        maps = [x] if from_input else _as_list(feature_model.predict_on_batch(x))
        maps = [np.asarray(m, dtype=np.float32) for m in maps]
        probs = np.asarray(model.predict_on_batch(x), dtype=np.float64)[:, column]
        grads = _feature_gradients(model, x, features, maps, column, from_input)
        scale = 1.0 / np.maximum(probs * (1 - probs), EPS)
        heat = np.zeros(x.shape[:3], dtype=np.float64)
        for a, g in zip(maps, grads):
            g = g.astype(np.float64) * scale[:, None, None, None]
            weights = g.mean(axis=(1, 2))                              # (n, C)
            cam = np.maximum(np.einsum("nhwc,nc->nhw", a.astype(np.float64), weights), 0.0)
            heat += np.stack([_upsample(c, x.shape[1:3]) for c in cam])
        out[start:start + len(x)] = normalise(heat)
    return out


def class_activation_map(features: np.ndarray, kernel_column: np.ndarray) -> np.ndarray:
    """Plain CAM: (N, h, w, C) feature maps and a dense head's kernel column (C,) ->
    (N, h, w) sum_c W_c A_c (the logit's share per position; its spatial mean plus the bias is
    the logit)."""
    return np.einsum("nhwc,c->nhw", np.asarray(features, np.float64), np.asarray(kernel_column, np.float64))


def normalise(maps: np.ndarray) -> np.ndarray:
    """Each map divided by its maximum (float32, in [0, 1]); all-zero maps stay zero."""
    maps = np.maximum(np.asarray(maps, dtype=np.float64), 0.0)
    peak = maps.reshape(len(maps), -1).max(axis=1)
    safe = np.where(peak > EPS, peak, 1.0)
    return (maps / safe[:, None, None] * (peak > EPS)[:, None, None]).astype(np.float32)


def overlay(image: np.ndarray, heat: np.ndarray, channel: int = 0) -> np.ndarray:
    """uint8 RGB: one window of the input (channel 0 = blood) as grey with the heatmap in JET
    colours blended on top, stronger where the heat is higher."""
    grey = np.asarray(image)[..., channel]
    grey = grey if grey.dtype == np.uint8 else np.clip(grey * 255, 0, 255).astype(np.uint8)
    base = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    heat = _upsample(np.asarray(heat, np.float32), grey.shape)
    colour = cv2.cvtColor(cv2.applyColorMap(np.uint8(np.clip(heat, 0, 1) * 255), cv2.COLORMAP_JET),
                          cv2.COLOR_BGR2RGB).astype(np.float32)
    alpha = OVERLAY_ALPHA * np.clip(heat, 0, 1)[..., None]
    return np.clip(base * (1 - alpha) + colour * alpha, 0, 255).astype(np.uint8)


def peak(heat: np.ndarray) -> tuple[int, int]:
    """(row, column) of a heatmap's maximum (the first one on ties)."""
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(heat)), heat.shape))


def hit_rate(heats: np.ndarray, masks: np.ndarray) -> float:
    """Fraction of images whose heatmap peak lies inside the mask (masks (N, S, S) bool)."""
    hits = [bool(m[peak(h)]) for h, m in zip(heats, masks)]
    return float(np.mean(hits)) if hits else float("nan")


def random_hit_rate(masks: np.ndarray, regions: np.ndarray | None = None) -> float:
    """Expected hit rate of a point drawn uniformly at random (inside `regions`, e.g. the head,
    when given): the mean over images of mask area / region area."""
    masks = np.asarray(masks, bool)
    regions = np.ones_like(masks) if regions is None else np.asarray(regions, bool)
    area = regions.reshape(len(regions), -1).sum(axis=1)
    inside = (masks & regions).reshape(len(masks), -1).sum(axis=1)
    return float(np.mean(inside / np.maximum(area, 1)))


def _feature_gradients(model, x, features, maps, column, from_input):
    """d p[:, column] / d feature maps, per image (the sum over the batch: images are
    independent at inference, so each image's gradient is its own)."""
    import keras

    from ich.backend import gradients

    def head(tensors):
        if from_input:
            out = model(tensors[0], training=False)
        else:
            out = _run_from_features(model, x, features, tensors)
        return keras.ops.sum(keras.ops.cast(out[:, column], "float32"))

    _, grads = gradients(head, maps)
    return grads


def _run_from_features(model, x, features, tensors):
    """The model's output with its feature layers' outputs replaced by `tensors`.

    Keras has no public "call from an intermediate layer"; a functional model runs its graph
    through `_run_through_graph(inputs, operation_fn)`, and swapping each backbone for a
    function that returns the given tensor makes the rest of the graph a differentiable
    function of the features. tests/test_explain.py checks that this reproduces the model's
    output, so a Keras change that breaks it fails loudly there.
    """
    replaced = {id(f._keras_history.operation): t for f, t in zip(features, tensors)}

    def operation_fn(op):
        if id(op) in replaced:
            value = replaced[id(op)]
            return lambda *args, **kwargs: value
        return op

    import keras

    return model._run_through_graph(keras.ops.convert_to_tensor(x), operation_fn=operation_fn)


def _to_float(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, S, S, C) model inputs; got shape {images.shape}")
    return images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)


def _upsample(cam: np.ndarray, shape) -> np.ndarray:
    if cam.shape[:2] == tuple(shape[:2]):
        return cam
    return cv2.resize(np.asarray(cam, np.float32), (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_LINEAR)


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
