"""Online augmentation: Keras layers the model applies right after its input, in training only.

In: the config section `online_augment` and a seed. Out: a keras.Sequential on float32
(N, S, S, C) images in [0, 1] (flip, ich.models.warp.RandomWarp for rotation/zoom/shift/elastic,
brightness, contrast, blur); random in training, the identity at inference.
"""

from __future__ import annotations

import keras

from ich.models.warp import RandomWarp


def online_augmentation(params: dict, seed: int):
    """Build the online augmentation from the config section `online_augment`, or None.

    In: params with enabled, flip, rotation, zoom, translate, elastic_p, elastic_scale,
    brightness, contrast, blur_p. Out: a keras.Sequential for float32 (N, S, S, 3) images in
    [0, 1]; random in training, the identity at inference (training=False); output clipped to
    [0, 1]. Every layer traces under XLA/jax.jit. None when disabled or every transform is off.
    """
    if not params["enabled"]:
        return None
    seeds = iter(range(seed, seed + 16))

    def common():
        # Distinct seeds so the layers' random draws are not correlated. float32 even under
        # mixed precision: resampling in float16 loses detail.
        return {"seed": next(seeds), "dtype": "float32"}

    unit = {"value_range": (0.0, 1.0)}
    layers = []
    if params["flip"] != "none":
        layers.append(keras.layers.RandomFlip(params["flip"], **common()))
    geometry = {key: params[key] for key in ("rotation", "zoom", "translate", "elastic_p",
                                             "elastic_scale")}
    elastic = geometry["elastic_p"] > 0 and geometry["elastic_scale"] > 0
    if elastic or any(geometry[key] > 0 for key in ("rotation", "zoom", "translate")):
        layers.append(RandomWarp(**geometry, **common()))
    if params["brightness"] > 0:
        layers.append(keras.layers.RandomBrightness(params["brightness"], **unit, **common()))
    if params["contrast"] > 0:
        layers.append(keras.layers.RandomContrast(params["contrast"], **unit, **common()))
    if params["blur_p"] > 0:
        # factor (p, p) makes p the exact probability; a single float would draw it from [0, p].
        layers.append(keras.layers.RandomGaussianBlur((params["blur_p"], params["blur_p"]),
                                                      **unit, **common()))
    if not layers:
        return None
    # ReLU with max_value 1 is a built-in, serializable clip to [0, 1].
    layers.append(keras.layers.ReLU(max_value=1.0, name="clip_unit", dtype="float32"))
    return keras.Sequential(layers, name="online_augment")
