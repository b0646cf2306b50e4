"""RandomWarp: one Keras layer for random flip, rotation, zoom, shift and elastic warping.

In: float (N, H, W, C) images (channels last). Out: the same shape, each image resampled once
(bilinear, zeros outside) through its own random affine map plus, with probability
elastic_p, a smooth random displacement field, flipped with probability 1/2 (the flip is a
reflection of the source coordinates, so it costs no pass over the pixels, which a separate
keras.layers.RandomFlip made twice: a flip and a select).
Identity at inference (training=False).

Why not keras.layers.RandomRotation/RandomZoom/RandomTranslation/RandomElasticTransform:
the first three mark themselves `supports_jit = False`, which silently turns off XLA for the
whole model (JAX then runs op by op), each resamples the image again (three blurs, three
times the cost), and RandomElasticTransform fails to trace under jax.jit in Keras 3.15. This
layer uses only keras.ops and a single gather-based resampling, so it traces on every backend.

On the torch backend two parts take torch's own kernels instead (same numbers within float
tolerance; tests/test_augment_online.py compares them with the keras.ops code): the resampling
is torch.nn.functional.grid_sample, and the elastic field is upsampled for the drawn images
only. The keras.ops gather (four take_along_axis with index normalisation, masks) and the
bicubic upsampling of every image's field, though only elastic_p of them use it, made the
online augmentation 16% of a stage-1 training step; 6% with these (bench/train_speed.py).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import keras
from keras import ops

# The elastic field is random noise on a coarse grid of this many control points per side,
# upsampled bicubically: a smooth field whose wiggles span about 1/8 of the image.
ELASTIC_GRID = 8
# The coordinate axes each flip mode reflects (keras.layers.RandomFlip's modes).
FLIP_AXES = {"none": "", "horizontal": "x", "vertical": "y", "horizontal_and_vertical": "yx"}


@keras.saving.register_keras_serializable(package="ich")
class RandomWarp(keras.layers.Layer):
    """Random rotation (fraction of a full turn), zoom and shift (fractions of the side),
    elastic displacement (probability elastic_p, at most elastic_scale of the side), and a flip
    (`flip` as keras.layers.RandomFlip's mode: each image flipped with probability 1/2, along
    both axes at once for horizontal_and_vertical, as that layer does).
    """

    def __init__(self, rotation: float = 0.0, zoom: float = 0.0, translate: float = 0.0,
                 elastic_p: float = 0.0, elastic_scale: float = 0.0, seed: int | None = None,
                 flip: str = "none", **kwargs):
        super().__init__(**kwargs)
        if flip not in FLIP_AXES:
            raise ValueError(f"RandomWarp: flip must be one of {sorted(FLIP_AXES)}, not {flip!r}")
        self.flip = flip
        self.rotation = float(rotation)
        self.zoom = float(zoom)
        self.translate = float(translate)
        self.elastic_p = float(elastic_p)
        self.elastic_scale = float(elastic_scale)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        # TensorFlow's XLA path is untested here; keep Keras' own conservative choice there.
        self.supports_jit = keras.backend.backend() != "tensorflow"

    def call(self, images, training=None):
        """Warp `images` when training; return them unchanged otherwise."""
        if not training or not (self.rotation or self.zoom or self.translate or FLIP_AXES[self.flip]
                                or (self.elastic_p and self.elastic_scale)):
            return images
        images = ops.cast(images, self.compute_dtype)
        n, height, width = ops.shape(images)[0], images.shape[1], images.shape[2]
        draws = self._draws(n, height, width)
        if keras.backend.backend() == "torch" and height > 1 and width > 1:
            return warp_torch(images, draws, self.flip, self.elastic_scale)
        return warp_ops(images, draws, self.flip, self.elastic_scale)

    def _uniform(self, n, limit):
        return keras.random.uniform((n,), -limit, limit, seed=self.seed_generator,
                                    dtype=self.compute_dtype)

    def _draws(self, n, height: int, width: int) -> "Draws":
        """This call's random numbers, in one fixed order (the same on every backend)."""
        angle = self._uniform(n, 2.0 * math.pi * self.rotation)
        scale = 1.0 + self._uniform(n, self.zoom)
        shift_y = self._uniform(n, self.translate * height)
        shift_x = self._uniform(n, self.translate * width)
        coarse = drawn = flips = None
        if self.elastic_p > 0 and self.elastic_scale > 0:
            coarse = keras.random.uniform((n, ELASTIC_GRID, ELASTIC_GRID, 2), -1.0, 1.0,
                                          seed=self.seed_generator, dtype=self.compute_dtype)
            drawn = keras.random.uniform((n,), 0.0, 1.0, seed=self.seed_generator,
                                         dtype=self.compute_dtype) < self.elastic_p
        if FLIP_AXES[self.flip]:
            flips = keras.random.uniform((n,), 0.0, 1.0, seed=self.seed_generator,
                                         dtype=self.compute_dtype) <= 0.5
        return Draws(angle, scale, shift_y, shift_x, coarse, drawn, flips)

    def compute_output_shape(self, input_shape):
        """Same shape as the input."""
        return input_shape

    def get_config(self):
        """Constructor arguments, for saving and loading .keras files."""
        return {**super().get_config(), "rotation": self.rotation, "zoom": self.zoom,
                "translate": self.translate, "elastic_p": self.elastic_p,
                "elastic_scale": self.elastic_scale, "seed": self.seed, "flip": self.flip}


class Draws(NamedTuple):
    """One call's random numbers: per image (N,) the rotation angle (radians), the zoom
    factor and the shift (pixels); the coarse elastic noise (N, g, g, 2) and which images are
    warped elastically (None without elastic); which are flipped (None without a flip)."""

    angle: object
    scale: object
    shift_y: object
    shift_x: object
    coarse: object
    drawn: object
    flips: object


def warp_ops(images, draws: Draws, flip: str, elastic_scale: float):
    """The warp in keras.ops (every backend): source coordinates of every output pixel under
    the affine map, plus the elastic field, reflected by the flip, then one bilinear sample."""
    height, width = images.shape[1], images.shape[2]
    src_y, src_x = affine_coordinates(draws, height, width, images.dtype)
    if draws.coarse is not None:
        make = drawn_field_torch if keras.backend.backend() == "torch" else drawn_field
        field = make(draws.coarse, draws.drawn, elastic_scale * max(height, width), height, width)
        src_y, src_x = src_y + field[..., 0], src_x + field[..., 1]
    if draws.flips is not None:
        src_y, src_x = flip_coordinates(src_y, src_x, draws.flips, flip, height, width)
    return bilinear_sample(images, src_y, src_x)


def affine_coordinates(draws: Draws, height: int, width: int, dtype):
    """Source coordinates (N, H, W) of every output pixel under each image's affine map:
    rotation and zoom about the image centre, then the shift."""
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    yy, xx = ops.meshgrid(ops.arange(height, dtype=dtype) - cy,
                          ops.arange(width, dtype=dtype) - cx, indexing="ij")

    def per_image(v):
        return ops.reshape(v, (-1, 1, 1))

    cos = per_image(ops.cos(draws.angle) * draws.scale)
    sin = per_image(ops.sin(draws.angle) * draws.scale)
    src_y = cos * yy - sin * xx + cy + per_image(draws.shift_y)
    src_x = sin * yy + cos * xx + cx + per_image(draws.shift_x)
    return src_y, src_x


def warp_torch(images, draws: Draws, flip: str, elastic_scale: float):
    """warp_ops on torch, with the map built as grid_sample's own grid: the affine map, the
    flip (a reflection: a sign) and grid_sample's [-1, 1] normalisation compose into one
    (N, 2, 3) matrix per image, from which torch.nn.functional.affine_grid writes the whole
    grid in one pass; the elastic field is added for the drawn images only. warp_ops builds
    the same grid in about twenty elementwise passes over (N, H, W) coordinates. Same numbers
    within float rounding (tests/test_augment_online.py).

    With align_corners=True a normalised coordinate u stands for pixel (u + 1) (W - 1) / 2, so
    x_src = s yy + c xx + cx + tx, with xx = u (W - 1) / 2 and yy = v (H - 1) / 2, becomes
    u_src = c u + s (H - 1) / (W - 1) v + 2 tx / (W - 1); likewise v_src.
    """
    import torch

    images = ops.convert_to_tensor(images)
    n, height, width = images.shape[0], images.shape[1], images.shape[2]

    def tensor(v):
        return ops.convert_to_tensor(v).float()

    cos = torch.cos(tensor(draws.angle)) * tensor(draws.scale)
    sin = torch.sin(tensor(draws.angle)) * tensor(draws.scale)
    theta = torch.stack([   # (N, 2, 3): the rows of u_src and v_src
        torch.stack([cos, sin * ((height - 1) / (width - 1)),
                     tensor(draws.shift_x) * (2.0 / (width - 1))], -1),
        torch.stack([-sin * ((width - 1) / (height - 1)), cos,
                     tensor(draws.shift_y) * (2.0 / (height - 1))], -1)], 1)
    signs = None
    if draws.flips is not None:
        # A flip reflects the source coordinate about the centre, u -> -u: the row's sign.
        sign = torch.where(ops.convert_to_tensor(draws.flips), -1.0, 1.0)
        ones = torch.ones_like(sign)
        axes = FLIP_AXES[flip]
        signs = torch.stack([sign if "x" in axes else ones, sign if "y" in axes else ones], -1)
        theta = theta * signs[:, :, None]
    grid = torch.nn.functional.affine_grid(theta, [n, 1, height, width], align_corners=True)
    if draws.coarse is not None:
        index = torch.nonzero(ops.convert_to_tensor(draws.drawn)).flatten()
        if index.numel():
            amplitude = elastic_scale * max(height, width)
            field = ops.image.resize(ops.convert_to_tensor(draws.coarse)[index], (height, width),
                                     interpolation="bicubic", data_format="channels_last")
            # (dy, dx) in pixels -> (du, dv) normalised, reflected with the rest of the map.
            scale = torch.tensor([2.0 / (width - 1), 2.0 / (height - 1)]) * amplitude
            if signs is not None:
                scale = scale * signs[index][:, None, None, :]
            grid[index] += field.float().flip(-1) * scale
    out = torch.nn.functional.grid_sample(images.permute(0, 3, 1, 2).float(), grid,
                                          mode="bilinear", padding_mode="zeros", align_corners=True)
    # contiguous: see bilinear_sample_torch.
    return out.permute(0, 2, 3, 1).contiguous().to(images.dtype)


def flip_coordinates(src_y, src_x, flips, mode: str, height: int, width: int):
    """Source coordinates (N, H, W) that read the flipped image where `flips` (N,) is true:
    sampling the original at these equals flipping it first and then sampling at src_y, src_x
    (a flip maps pixel x to width - 1 - x). `mode` as keras.layers.RandomFlip's."""
    where = ops.reshape(flips, (-1, 1, 1))
    axes = FLIP_AXES[mode]
    if "y" in axes:
        src_y = ops.where(where, (height - 1) - src_y, src_y)
    if "x" in axes:
        src_x = ops.where(where, (width - 1) - src_x, src_x)
    return src_y, src_x


def drawn_field(coarse, drawn, amplitude: float, height: int, width: int):
    """The elastic field (N, H, W, 2): the coarse noise (N, g, g, 2) upsampled bicubically and
    scaled by `amplitude` pixels where `drawn` (N,) is true, zero elsewhere (keras.ops: every
    image is upsampled, so that shapes stay static under jit)."""
    field = ops.image.resize(coarse, (height, width), interpolation="bicubic",
                             data_format="channels_last")
    scale = ops.cast(ops.where(drawn, amplitude, 0.0), field.dtype)
    return field * ops.reshape(scale, (-1, 1, 1, 1))


def drawn_field_torch(coarse, drawn, amplitude: float, height: int, width: int):
    """drawn_field on torch, upsampling only the drawn images (eager torch has no static
    shapes to keep, and ~1 - elastic_p of the upsampling was thrown away)."""
    import torch

    field = torch.zeros((coarse.shape[0], height, width, coarse.shape[-1]), dtype=coarse.dtype,
                        device=coarse.device)
    index = torch.nonzero(drawn).flatten()
    if index.numel():
        field[index] = ops.image.resize(coarse[index], (height, width), interpolation="bicubic",
                                        data_format="channels_last") * amplitude
    return field


def bilinear_sample(images, src_y, src_x):
    """Sample channels-last `images` (N, H, W, C) at float coordinates src_y, src_x (N, H, W).

    Bilinear; points outside the image read 0 (air is black in every CT window). On torch
    through grid_sample (bilinear_sample_torch), elsewhere bilinear_sample_ops.
    """
    if keras.backend.backend() == "torch" and images.shape[1] > 1 and images.shape[2] > 1:
        return bilinear_sample_torch(images, src_y, src_x)
    return bilinear_sample_ops(images, src_y, src_x)


def bilinear_sample_torch(images, src_y, src_x):
    """bilinear_sample by torch.nn.functional.grid_sample, the same interpolation: with
    align_corners=True, -1 and 1 are the centres of the first and last pixels, and
    padding_mode="zeros" reads 0 for every corner outside the image, as the masks of
    bilinear_sample_ops do. grid_sample works in float32 here (mixed precision included)."""
    import torch

    images = ops.convert_to_tensor(images)
    height, width = images.shape[1], images.shape[2]
    grid = torch.stack([ops.convert_to_tensor(src_x).float() * (2.0 / (width - 1)) - 1.0,
                        ops.convert_to_tensor(src_y).float() * (2.0 / (height - 1)) - 1.0], dim=-1)
    out = torch.nn.functional.grid_sample(images.permute(0, 3, 1, 2).float(), grid,
                                          mode="bilinear", padding_mode="zeros", align_corners=True)
    # contiguous: a channels-last *view* of grid_sample's NCHW output would carry that memory
    # format into the backbone, whose convolutions and BatchNorm then all ran NCHW (the
    # augmentation's share of a step rose to 30% in bench/train_speed.py, against 6% with it).
    return out.permute(0, 2, 3, 1).contiguous().to(images.dtype)


def bilinear_sample_ops(images, src_y, src_x):
    """bilinear_sample in keras.ops (every backend): four gathers, weights masked outside."""
    images = ops.convert_to_tensor(images)
    src_y = ops.convert_to_tensor(src_y, dtype=images.dtype)
    src_x = ops.convert_to_tensor(src_x, dtype=images.dtype)
    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    flat = ops.reshape(images, (-1, height * width, channels))
    y0, x0 = ops.floor(src_y), ops.floor(src_x)
    wy, wx = src_y - y0, src_x - x0
    out = None
    for dy, dx, weight in ((0, 0, (1 - wy) * (1 - wx)), (0, 1, (1 - wy) * wx),
                           (1, 0, wy * (1 - wx)), (1, 1, wy * wx)):
        yy, xx = y0 + dy, x0 + dx
        inside = (yy >= 0) & (yy <= height - 1) & (xx >= 0) & (xx <= width - 1)
        index = ops.clip(yy, 0, height - 1) * width + ops.clip(xx, 0, width - 1)
        index = ops.reshape(ops.cast(index, "int32"), (-1, height * width, 1))
        values = ops.take_along_axis(flat, ops.repeat(index, channels, axis=2), axis=1)
        weight = ops.where(inside, weight, 0.0)
        term = ops.reshape(values, ops.shape(images)) * ops.expand_dims(weight, -1)
        out = term if out is None else out + term
    return out
