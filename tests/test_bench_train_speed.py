"""bench/train_speed.py's ich side (timm is benchmark-only and absent here): the step it times is
a real training step of the stage, and the reference's stochastic depth is Keras' own."""

import sys
from pathlib import Path

import keras
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import train_speed  # noqa: E402


def test_timm_reference_gets_the_stochastic_depth_of_keras_applications():
    # keras.applications' EfficientNetV2 trains with drop_connect_rate 0.2, ConvNeXtTiny with none.
    assert train_speed.keras_drop_path("tf_efficientnetv2_b0") == 0.2
    assert train_speed.keras_drop_path("convnext_tiny") == 0.0


def test_ich_step_trains_the_stage_as_fit_does():
    cfg = train_speed.ich_config(32, 4, ["train.finetune_lr=0.01"])
    x, y = train_speed.random_batch(4, 32, 1)
    step = train_speed.ich_training(cfg, "stage1", True, x, y)
    model = step.model
    before = [keras.ops.convert_to_numpy(w).copy() for w in model.trainable_weights]
    iterations = int(model.optimizer.iterations)
    losses = [step() for _ in range(3)]
    assert all(np.isfinite(losses))
    assert int(model.optimizer.iterations) == iterations + 3  # one optimizer update per step
    moved = [np.abs(keras.ops.convert_to_numpy(w) - b).max() for w, b in zip(model.trainable_weights, before)]
    assert max(moved) > 1e-4


def test_timm_counterparts_follow_the_configured_stage2_backbones():
    assert train_speed.timm_names(["EfficientNetV2B0", "ConvNeXtPico"]) == ["tf_efficientnetv2_b0", "convnext_pico"]
    assert train_speed.timm_names(["EfficientNetV2B0", "ConvNeXtTiny"]) == ["tf_efficientnetv2_b0", "convnext_tiny"]
    with pytest.raises(SystemExit, match="ResNet50"):
        train_speed.timm_names(["ResNet50"])
