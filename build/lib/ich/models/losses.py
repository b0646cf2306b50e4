"""Losses of the cascade.

In: per-label positive weights. Out: a serialisable Keras loss for multi-label sigmoid outputs.
Stage 1 uses plain binary cross-entropy with Keras class_weight (one label, so class_weight is
exact there); stage 2 is multi-label, where Keras class_weight would weight each sample by the
argmax of its label vector, so the per-label positive weights go inside the loss instead.
"""

from __future__ import annotations

from typing import Sequence

import keras


@keras.saving.register_keras_serializable(package="ich")
class WeightedBCE(keras.losses.Loss):
    """Binary cross-entropy on probabilities with a positive weight per label.

    loss(y, p) = mean over labels of -(w_k * y_k * log p_k + (1 - y_k) * log(1 - p_k)),
    with p clipped to [eps, 1 - eps] so that saturated sigmoids give large but finite losses.
    Returns one value per sample; the usual Keras reduction (mean over the batch) follows.
    """

    def __init__(self, pos_weight: Sequence[float], epsilon: float | None = None,
                 name: str = "weighted_bce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.pos_weight = [float(w) for w in pos_weight]
        if any(not w >= 0 for w in self.pos_weight):
            raise ValueError(f"pos_weight must be non-negative numbers, got {self.pos_weight}")
        self.epsilon = float(epsilon) if epsilon is not None else keras.config.epsilon()

    def call(self, y_true, y_pred):
        """Per-sample weighted BCE of y_true (N, k) in {0, 1} against probabilities y_pred (N, k)."""
        y_pred = keras.ops.convert_to_tensor(y_pred)
        dtype = "float32"  # exact even when the model computes in float16
        y_pred = keras.ops.clip(keras.ops.cast(y_pred, dtype), self.epsilon, 1.0 - self.epsilon)
        y_true = keras.ops.cast(y_true, dtype)
        weight = keras.ops.convert_to_tensor(self.pos_weight, dtype=dtype)
        if y_pred.shape[-1] is not None and y_pred.shape[-1] != len(self.pos_weight):
            raise ValueError(f"WeightedBCE has {len(self.pos_weight)} positive weights but the "
                             f"model predicts {y_pred.shape[-1]} labels")
        per_label = -(weight * y_true * keras.ops.log(y_pred)
                      + (1.0 - y_true) * keras.ops.log(1.0 - y_pred))
        return keras.ops.mean(per_label, axis=-1)

    def get_config(self):
        """Arguments needed to rebuild the loss when a saved model is loaded."""
        config = super().get_config()
        config.update({"pos_weight": self.pos_weight, "epsilon": self.epsilon})
        return config


def weighted_bce(pos_weight: Sequence[float]) -> WeightedBCE:
    """A WeightedBCE with one positive weight per label (1.0 everywhere = plain BCE)."""
    return WeightedBCE(pos_weight)
