"""Registry of image backbones from keras.applications, wrapped to take [0, 1] RGB.

In: a backbone name, the input shape (S, S, 3) and weights (None | "imagenet" | path to a
.weights.h5 file saved from the same keras.applications model). Out: a keras.Model mapping
float32 images in [0, 1] to the last feature map (N, h, w, C), no pooling.

Both families ship their own ImageNet preprocessing (include_preprocessing=True) and expect
pixels in [0, 255] (keras 3.15 source): EfficientNetV2 B* rescales by 1/255 then normalises
with ImageNet mean/std (S/M/L rescale to [-1, 1]); ConvNeXt normalises with mean/std times 255.
So a Rescaling(255) in front keeps the whole path from [0, 1] inside the saved model.

Inputs of other than 3 channels (neighbouring slices, see ich.data.inputs): the families' own
preprocessing handles RGB only, so the backbone is built without it, behind the same scaling
written out for C channels (ImageNet mean and std repeated over the channels, or [-1, 1] for
EfficientNetV2 S/M/L). Pretrained weights still load: they are loaded into the 3-channel model
and copied over, with the stem kernel spread over the extra channels (`spread_stem`).

The built network's Conv2D, DepthwiseConv2D and BatchNormalization layers are swapped for
ich.models.layers' fast twins (same weights and config; a faster call on torch only).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import keras
import numpy as np

from ich.models.layers import with_fast_layers

def _small_convnext(name: str, depths: tuple, dims: tuple):
    """A keras.applications-style constructor for a ConvNeXt smaller than Tiny: the same blocks
    (keras.src.applications.convnext.ConvNeXt) with fewer and narrower stages. Keras ships no
    ImageNet weights for these, so `weights="imagenet"` raises; random init and .weights.h5
    files saved from the same constructor load as for the other backbones."""
    def constructor(include_top=True, include_preprocessing=True, weights=None, input_shape=None):
        if weights == "imagenet":
            raise ValueError(f"backbone {name} has no ImageNet weights in Keras; set model.weights "
                             f"to null (random init) or to a {WEIGHTS_SUFFIX} file saved from it, "
                             "or use ConvNeXtTiny (or larger) for ImageNet weights")
        from keras.src.applications.convnext import ConvNeXt

        return ConvNeXt(depths=list(depths), projection_dims=list(dims), name=name.lower(),
                        include_top=include_top, include_preprocessing=include_preprocessing,
                        weights=weights, input_shape=input_shape)
    return constructor


BACKBONES = {
    "EfficientNetV2B0": keras.applications.EfficientNetV2B0,
    "EfficientNetV2B1": keras.applications.EfficientNetV2B1,
    "EfficientNetV2B2": keras.applications.EfficientNetV2B2,
    "EfficientNetV2B3": keras.applications.EfficientNetV2B3,
    "EfficientNetV2S": keras.applications.EfficientNetV2S,
    "EfficientNetV2M": keras.applications.EfficientNetV2M,
    "EfficientNetV2L": keras.applications.EfficientNetV2L,
    "ConvNeXtTiny": keras.applications.ConvNeXtTiny,
    "ConvNeXtSmall": keras.applications.ConvNeXtSmall,
    "ConvNeXtBase": keras.applications.ConvNeXtBase,
    "ConvNeXtLarge": keras.applications.ConvNeXtLarge,
    # Smaller than Tiny, with the stage depths and widths of timm's convnext_pico and _nano
    # (random init only): for a CPU budget, where ConvNeXtTiny does most of stage 2's work.
    "ConvNeXtPico": _small_convnext("ConvNeXtPico", (2, 2, 6, 2), (64, 128, 256, 512)),
    "ConvNeXtNano": _small_convnext("ConvNeXtNano", (2, 2, 8, 2), (80, 160, 320, 640)),
}
# ImageNet statistics of [0, 1] RGB, which both families normalise with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# These EfficientNetV2 variants scale to [-1, 1] instead of normalising.
MINUS_ONE_TO_ONE = ("EfficientNetV2S", "EfficientNetV2M", "EfficientNetV2L")
RGB = 3
# Cascade code finds backbones inside a model by this name prefix (see cascade.set_backbone_trainable).
PREFIX = "backbone_"
WEIGHTS_SUFFIX = ".weights.h5"


def check_name(name: str) -> str:
    """Return `name` if it is a registered backbone, else raise ValueError listing valid ones."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    return name


def build_backbone(name: str, input_shape: tuple[int, int, int], weights: str | None = None) -> keras.Model:
    """Build backbone `name` (include_top=False, no pooling) taking float32 [0, 1] input.

    input_shape is (S, S, C) for any C >= 1. weights: None (random init), "imagenet"
    (downloaded by Keras), the path of a .weights.h5 file saved from
    `BACKBONES[name](include_top=False, weights=None)` (3 channels), or a folder holding one
    such file per backbone named `<name>.weights.h5` (stage 2 needs two architectures). The
    returned model is named PREFIX + name and contains the scaling its weights expect.
    """
    input_shape = tuple(input_shape)
    inputs = keras.Input(shape=input_shape, name=f"{PREFIX}{name}_input")
    if input_shape[-1] == RGB:
        base = _pretrained(name, input_shape, weights)
        x = keras.layers.Rescaling(255.0, name=f"{PREFIX}{name}_to_255")(inputs)
    else:
        with warnings.catch_warnings():
            # Keras warns for inputs other than 1 or 3 channels; here they are meant.
            warnings.filterwarnings("ignore", message="This model usually expects 1 or 3 input channels")
            base = BACKBONES[check_name(name)](include_top=False, weights=None,
                                               input_shape=input_shape, include_preprocessing=False)
        if weights is not None:
            copy_weights(_pretrained(name, (*input_shape[:2], RGB), weights), base)
        x = _scaling(name, input_shape[-1])(inputs)
    # The same network with torch fast paths for its convolutions and BatchNorm (ich.models.layers).
    base = with_fast_layers(base)
    return keras.Model(inputs, base(x), name=f"{PREFIX}{name}")


def _pretrained(name: str, input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
    """The keras.applications model with its own preprocessing and the given weights loaded."""
    constructor = BACKBONES[check_name(name)]
    from_file = weights not in (None, "imagenet")
    base = constructor(include_top=False, weights=None if from_file else weights,
                       input_shape=tuple(input_shape), include_preprocessing=True)
    if from_file:
        base.load_weights(str(weights_file(name, weights)))
    return base


def _scaling(name: str, channels: int) -> keras.layers.Layer:
    """[0, 1] input of `channels` channels -> the range the family's weights were trained on."""
    if name in MINUS_ONE_TO_ONE:
        return keras.layers.Rescaling(2.0, offset=-1.0, name=f"{PREFIX}{name}_scaling")
    mean = [IMAGENET_MEAN[c % RGB] for c in range(channels)]
    variance = [IMAGENET_STD[c % RGB] ** 2 for c in range(channels)]
    return keras.layers.Normalization(mean=mean, variance=variance, name=f"{PREFIX}{name}_scaling")


def spread_stem(kernel: np.ndarray, channels: int) -> np.ndarray:
    """An RGB stem kernel (k, k, 3, F) -> (k, k, channels, F): input channel c takes the kernel
    of RGB channel c mod 3, scaled by 3 / channels, so a C-channel input that repeats an RGB
    image gives the stem the same response as the RGB image did."""
    kernel = np.asarray(kernel)
    picked = kernel[:, :, [c % RGB for c in range(channels)], :]
    return (picked * (RGB / channels)).astype(kernel.dtype)


def copy_weights(source: keras.Model, target: keras.Model) -> None:
    """Copy every weight of `source` (RGB) into `target` (same architecture, C channels),
    spreading the one kernel whose input-channel axis differs (the stem)."""
    src, dst = source.weights, target.weights
    if len(src) != len(dst):
        raise ValueError(f"copy_weights: {source.name} has {len(src)} weights, {target.name} {len(dst)}")
    for a, b in zip(src, dst):
        value = keras.ops.convert_to_numpy(a)
        if tuple(a.shape) != tuple(b.shape):
            if len(a.shape) != 4 or tuple(a.shape[:2]) + (a.shape[3],) != tuple(b.shape[:2]) + (b.shape[3],):
                raise ValueError(f"copy_weights: {a.path} {a.shape} does not fit {b.path} {b.shape}")
            value = spread_stem(value, b.shape[2])
        b.assign(value)


def weights_file(name: str, weights: str | Path) -> Path:
    """The .weights.h5 file for backbone `name`: `weights` itself, or `<name>.weights.h5` inside
    it when it is a folder. Raises FileNotFoundError saying what was looked for."""
    path = Path(weights)
    if path.is_dir():
        path = path / f"{name}{WEIGHTS_SUFFIX}"
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone weights {path} not found; set model.weights to null, imagenet, a "
            f"{WEIGHTS_SUFFIX} file or a folder holding {name}{WEIGHTS_SUFFIX}")
    return path
