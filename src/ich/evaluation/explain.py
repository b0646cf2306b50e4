"""Explanations: Grad-CAM heatmaps of a stage's outputs, plain CAM, overlays, lesion hit rate.

In: a Keras stage model (float32 (N, S, S, 3) in [0, 1] -> (N, k) sigmoid), images (uint8 or
float), an output column. Out: heatmaps float32 (N, S, S) in [0, 1] (1 = most evidence for
the output), uint8 RGB overlays, and the hit statistics of heatmap peaks against masks.

Grad-CAM (Selvaraju et al. 2017): with feature maps A (h, w, C) and the gradient G of the
output's log-odds with respect to them, weights a_c = mean over (h, w) of G_c, map =
ReLU(sum_c a_c A_c), placed on the image (bilinear between the cells' receptive-field
centres, `place`) and divided by its maximum. Which maps: ich.evaluation.feature_maps.targets
at a feature stride (explain.feature_stride, 8 by default): each backbone's last residual
block at that stride, or at 32 its last feature map (both backbones in stage 2, whose placed
maps are summed); a model without a backbone at the input of its last GlobalAveragePooling2D.
Gradients come from ich.backend.gradients, so torch, JAX and TensorFlow all work.

Plain CAM (Zhou et al. 2016): for a pooled-then-dense head (stage 1: backbone -> global
average pool -> dense), the logit is mean_hw(sum_c W_c A_c) + b exactly, so the map
sum_c W_c A_c is that logit's decomposition over positions; Grad-CAM's weights on the
backbone's last map (stride 32) are then W / (h w), the same map up to a positive factor
(tested). At a smaller stride the rest of the network is not linear in the map, and Grad-CAM
(the gradient-weighted map of the block there) is what is used.

The gradient is taken of the probability and divided by p (1 - p) (which turns it into the
gradient of the log-odds without ever taking the log of a saturated 1.0); a positive factor
per image does not change a normalised map, but it keeps tiny gradients from underflowing.
"""

from __future__ import annotations

import cv2
import numpy as np

from ich.evaluation.feature_maps import BACKBONE_STRIDE, run, targets

# Heatmap colours: OpenCV's JET map, blended over the grey blood window at this weight.
OVERLAY_ALPHA = 0.45
# Maps this close to zero everywhere carry no evidence: they stay all-zero, not rescaled noise.
EPS = 1e-12


def gradcam(model, images, column: int = 0, stride: int = BACKBONE_STRIDE, batch_size: int = 16) -> np.ndarray:
    """Grad-CAM of output `column` of `model` for images (N, S, S, C) uint8 or float [0, 1], on
    the feature maps ich.evaluation.feature_maps.targets chooses at `stride`.
    Out: float32 (N, S, S) heatmaps in [0, 1] at the image's resolution."""
    x_all = _to_float(images)
    chosen = targets(model, stride)
    out = np.zeros(x_all.shape[:3], dtype=np.float32)
    for start in range(0, len(x_all), batch_size):
        x = x_all[start:start + batch_size]
        heat = np.zeros(x.shape[:3], dtype=np.float64)
        for target, cam in zip(chosen, cell_maps(model, x, column, chosen)):
            heat += place(cam, target, x.shape[1:3])
        out[start:start + len(x)] = normalise(heat)
    return out


def cell_maps(model, x: np.ndarray, column: int, chosen: list) -> list[np.ndarray]:
    """Grad-CAM at the cells of each target, before placing on the image: for float32 model
    inputs x (n, S, S, C), one float64 (n, h, w) map per target, ReLU(sum_c a_c A_c)."""
    import keras

    out, maps = run(model, x, chosen)
    maps = [np.asarray(keras.ops.convert_to_numpy(m), dtype=np.float32) for m in maps]
    probs = np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float64)[:, column]
    grads = _feature_gradients(model, x, chosen, maps, column)
    scale = 1.0 / np.maximum(probs * (1 - probs), EPS)
    cams = []
    for a, g in zip(maps, grads):
        weights = (g.astype(np.float64) * scale[:, None, None, None]).mean(axis=(1, 2))  # (n, C)
        cams.append(np.maximum(np.einsum("nhwc,nc->nhw", a.astype(np.float64), weights), 0.0))
    return cams


def place(cams: np.ndarray, target, shape) -> np.ndarray:
    """Cell maps (n, h, w) of `target` -> (n, H, W) on the model input: bilinear between the
    cells' receptive-field centres (target.rows / .cols), constant beyond the outermost ones."""
    rows = interpolation_matrix(int(shape[0]), cams.shape[1], target.rows)
    cols = interpolation_matrix(int(shape[1]), cams.shape[2], target.cols)
    return np.einsum("Yh,nhw,Xw->nYX", rows, np.asarray(cams, np.float64), cols)


def interpolation_matrix(pixels: int, cells: int, axis) -> np.ndarray:
    """(pixels, cells) weights of linear interpolation along one axis: pixel y takes cell
    position u = (y - axis.offset) / axis.stride, clipped to [0, cells - 1], shared between the
    cells floor(u) and floor(u) + 1 (each row sums to 1)."""
    u = np.clip((np.arange(pixels) - axis.offset) / axis.stride, 0, cells - 1)
    low = np.floor(u).astype(int)
    high = np.minimum(low + 1, cells - 1)
    weights = np.zeros((pixels, cells))
    np.add.at(weights, (np.arange(pixels), low), 1 - (u - low))
    np.add.at(weights, (np.arange(pixels), high), u - low)
    return weights


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


def _feature_gradients(model, x, chosen, maps, column):
    """d p[:, column] / d feature maps, per image (the sum over the batch: images are
    independent at inference, so each image's gradient is its own)."""
    import keras

    from ich.backend import gradients

    def head(tensors):
        out, _ = run(model, x, chosen, replace=tensors)
        return keras.ops.sum(keras.ops.cast(out[:, column], "float32"))

    _, grads = gradients(head, maps)
    return grads


def _to_float(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, S, S, C) model inputs; got shape {images.shape}")
    return images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)


def _upsample(cam: np.ndarray, shape) -> np.ndarray:
    if cam.shape[:2] == tuple(shape[:2]):
        return cam
    return cv2.resize(np.asarray(cam, np.float32), (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_LINEAR)
