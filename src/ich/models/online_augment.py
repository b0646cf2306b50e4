"""Online augmentation: Keras layers the model applies right after its input, in training only.

In: the config section `online_augment` and a seed. Out: a keras.Sequential on float32
(N, S, S, C) images in [0, 1] of two layers, ich.models.warp.RandomWarp (flip, rotation, zoom,
shift, elastic: one resampling) and ich.models.intensity.RandomIntensity (brightness, contrast,
blur); random in training, the identity at inference. As Keras' six separate layers (flip,
warp, brightness, contrast, blur, a final clip) the same transforms took 18% of a stage-1
training step at 96 px x 9 channels, 10% as these two (bench/train_speed.py); given the same
draws their numbers are equal (tests/test_augment_online.py).
"""

from __future__ import annotations

import keras

from ich.models.intensity import RandomIntensity
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

    layers = []
    geometry = {key: params[key] for key in ("flip", "rotation", "zoom", "translate",
                                             "elastic_p", "elastic_scale")}
    elastic = geometry["elastic_p"] > 0 and geometry["elastic_scale"] > 0
    if elastic or geometry["flip"] != "none" or any(geometry[key] > 0 for key in
                                                    ("rotation", "zoom", "translate")):
        layers.append(RandomWarp(**geometry, **common()))
    intensity = {key: params[key] for key in ("brightness", "contrast", "blur_p")}
    if any(value > 0 for value in intensity.values()):
        # It clips its output to [0, 1] itself.
        layers.append(RandomIntensity(**intensity, **common()))
    elif layers:
        # Resampling [0, 1] stays in [0, 1] but for rounding: clip (ReLU with max_value 1 is a
        # built-in, serializable clip).
        layers.append(keras.layers.ReLU(max_value=1.0, name="clip_unit", dtype="float32"))
    if not layers:
        return None
    return keras.Sequential(layers, name="online_augment")
