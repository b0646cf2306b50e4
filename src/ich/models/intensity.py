"""RandomIntensity: one Keras layer for random brightness, contrast and Gaussian blur.

In: float (N, H, W, C) images in [0, 1] (channels last). Out: the same shape, in [0, 1]: per
image a brightness shift, then a contrast stretch about its own per-channel mean, each clipped
to [0, 1], then, with probability blur_p, a 3x3 Gaussian blur (sigma drawn per batch in
(0, 1] px). Identity at inference (training=False).

Why not keras.layers.RandomBrightness, RandomContrast and RandomGaussianBlur: the numbers are
theirs (tests/test_augment_online.py compares them given the same draws), but as three layers
with a clip after each (and one more at the end) they made many passes over the batch and
blurred every image, though only blur_p of them keep it. Here the contrast is one multiply-add,
and on torch only the drawn images are blurred (elsewhere every image is, so that shapes stay
static under jit).
"""

from __future__ import annotations

import keras
from keras import ops

BLUR_KERNEL = (3, 3)


@keras.saving.register_keras_serializable(package="ich")
class RandomIntensity(keras.layers.Layer):
    """Random brightness shift in [-brightness, brightness], contrast factor in
    [1 - contrast, 1 + contrast], and a Gaussian blur with probability blur_p."""

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, blur_p: float = 0.0,
                 seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.blur_p = float(blur_p)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_jit = keras.backend.backend() != "tensorflow"

    def call(self, images, training=None):
        """Adjust `images` when training; return them unchanged otherwise."""
        if not training or not (self.brightness or self.contrast or self.blur_p):
            return images
        images = ops.cast(images, self.compute_dtype)
        n = ops.shape(images)[0]
        delta = factor = drawn = sigma = None
        if self.brightness:
            delta = self._uniform((n, 1, 1, 1), -self.brightness, self.brightness)
        if self.contrast:
            factor = self._uniform((n, 1, 1, 1), 1.0 - self.contrast, 1.0 + self.contrast)
        if self.blur_p:
            drawn = self._uniform((n,), 0.0, 1.0) < self.blur_p
            # + 1e-6 as Keras' own layer: a zero sigma divides by zero in the kernel.
            sigma = self._uniform((2,), 0.0, 1.0) + 1e-6
        return adjust(images, delta, factor, drawn, sigma)

    def _uniform(self, shape, low, high):
        return keras.random.uniform(shape, low, high, seed=self.seed_generator,
                                    dtype=self.compute_dtype)

    def compute_output_shape(self, input_shape):
        """Same shape as the input."""
        return input_shape

    def get_config(self):
        """Constructor arguments, for saving and loading .keras files."""
        return {**super().get_config(), "brightness": self.brightness, "contrast": self.contrast,
                "blur_p": self.blur_p, "seed": self.seed}


def adjust(images, delta=None, factor=None, drawn=None, sigma=None):
    """The transform given its draws (None skips that part): images + delta (N, 1, 1, 1)
    clipped to [0, 1]; then (x - mean) * factor + mean about each image's per-channel mean,
    clipped; then a 3x3 Gaussian blur of sigma (2,) (y, x) where drawn (N,) is true, clipped.
    On torch through adjust_torch, elsewhere adjust_ops."""
    if keras.backend.backend() == "torch":
        return adjust_torch(images, delta, factor, drawn, sigma)
    return adjust_ops(images, delta, factor, drawn, sigma)


def adjust_ops(images, delta=None, factor=None, drawn=None, sigma=None):
    """adjust in keras.ops (every backend)."""
    x = ops.convert_to_tensor(images)
    if delta is not None:
        x = ops.clip(x + ops.cast(delta, x.dtype), 0.0, 1.0)
    if factor is not None:
        factor = ops.cast(factor, x.dtype)
        mean = ops.mean(x, axis=(1, 2), keepdims=True)
        x = ops.clip(x * factor + mean * (1.0 - factor), 0.0, 1.0)
    if drawn is not None:
        x = blur_drawn(x, drawn, sigma)
    return x


def adjust_torch(images, delta=None, factor=None, drawn=None, sigma=None):
    """adjust in torch's own operators: torch.clamp_ in place instead of keras.ops.clip (which
    converts and allocates on every call), and the contrast as one fused multiply-add (addcmul).
    In-place work only touches tensors this function made (the augmentation sits on the input:
    nothing needs their gradient)."""
    import torch

    original = x = ops.convert_to_tensor(images)
    if delta is not None:
        x = (x + ops.convert_to_tensor(delta).to(x.dtype)).clamp_(0.0, 1.0)
    if factor is not None:
        factor = ops.convert_to_tensor(factor).to(x.dtype)
        mean = x.mean(dim=(1, 2), keepdim=True)
        x = torch.addcmul(mean * (1.0 - factor), x, factor).clamp_(0.0, 1.0)
    if drawn is not None:
        x = blur_drawn_torch(x, drawn, sigma, in_place=x is not original)
    return x


def blur_drawn(images, drawn, sigma):
    """Blur every image, keep the blurred ones where `drawn` (keras.ops: static shapes)."""
    blurred = ops.clip(ops.image.gaussian_blur(images, BLUR_KERNEL, sigma,
                                               data_format="channels_last"), 0.0, 1.0)
    return ops.where(ops.reshape(drawn, (-1, 1, 1, 1)), blurred, images)


def blur_drawn_torch(images, drawn, sigma, in_place: bool = False):
    """blur_drawn on torch, blurring only the drawn images (eager torch has no static shapes
    to keep, and ~1 - blur_p of the blurring was thrown away). in_place: write them into
    `images` (a tensor the caller made) instead of into a copy."""
    import torch

    index = torch.nonzero(ops.convert_to_tensor(drawn)).flatten()
    if not index.numel():
        return images
    out = images if in_place else images.clone()
    out[index] = ops.image.gaussian_blur(images[index], BLUR_KERNEL, sigma,
                                         data_format="channels_last").clamp_(0.0, 1.0)
    return out
