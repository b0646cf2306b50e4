"""Registry of image backbones from keras.applications, wrapped to take [0, 1] RGB.

In: a backbone name, the input shape (S, S, 3) and weights (None | "imagenet" | path to a
.weights.h5 file saved from the same keras.applications model). Out: a keras.Model mapping
float32 images in [0, 1] to the last feature map (N, h, w, C), no pooling.

Both families ship their own ImageNet preprocessing (include_preprocessing=True) and expect
pixels in [0, 255] (keras 3.15 source): EfficientNetV2 B* rescales by 1/255 then normalises
with ImageNet mean/std (S/M/L rescale to [-1, 1]); ConvNeXt normalises with mean/std times 255.
So a Rescaling(255) in front keeps the whole path from [0, 1] inside the saved model.
"""

from __future__ import annotations

from pathlib import Path

import keras

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
}
# Cascade code finds backbones inside a model by this name prefix (see cascade.set_backbone_trainable).
PREFIX = "backbone_"
WEIGHTS_SUFFIX = ".weights.h5"


def check_name(name: str) -> str:
    """Return `name` if it is a registered backbone, else raise ValueError listing valid ones."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    return name


def build_backbone(name: str, input_shape: tuple[int, int, int], weights: str | None = None) -> keras.Model:
    """Build backbone `name` (include_top=False, no pooling) taking float32 [0, 1] RGB.

    weights: None (random init), "imagenet" (downloaded by Keras), the path of a .weights.h5
    file saved from `BACKBONES[name](include_top=False, weights=None)`, or a folder holding one
    such file per backbone named `<name>.weights.h5` (stage 2 needs two architectures), loaded
    after building. The returned model is named PREFIX + name and contains the [0, 1] -> [0, 255]
    rescaling.
    """
    constructor = BACKBONES[check_name(name)]
    from_file = weights not in (None, "imagenet")
    if from_file:
        weights = weights_file(name, weights)
    base = constructor(include_top=False, weights=None if from_file else weights,
                       input_shape=tuple(input_shape), include_preprocessing=True)
    if from_file:
        base.load_weights(str(weights))
    inputs = keras.Input(shape=tuple(input_shape), name=f"{PREFIX}{name}_input")
    x = keras.layers.Rescaling(255.0, name=f"{PREFIX}{name}_to_255")(inputs)
    return keras.Model(inputs, base(x), name=f"{PREFIX}{name}")


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
