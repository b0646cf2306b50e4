"""weighted_bce against hand-computed numbers."""

import math

import numpy as np
import pytest

import keras

from ich.models.losses import WeightedBCE, weighted_bce


def value(loss, y, p):
    return float(keras.ops.convert_to_numpy(loss(np.array(y, "float32"), np.array(p, "float32"))))


def test_hand_computed_two_labels():
    # Sample 1: y=(1,0), p=(0.8,0.1): (-2*ln0.8 - ln0.9)/2; sample 2: y=(0,1), p=(0.4,0.5): (-ln0.6 - 3*ln0.5)/2
    loss = weighted_bce([2.0, 3.0])
    s1 = (-2 * math.log(0.8) - math.log(0.9)) / 2
    s2 = (-math.log(0.6) - 3 * math.log(0.5)) / 2
    assert value(loss, [[1, 0], [0, 1]], [[0.8, 0.1], [0.4, 0.5]]) == pytest.approx((s1 + s2) / 2, rel=1e-6)


def test_unit_weights_equal_keras_bce():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (16, 5)).astype("float32")
    p = rng.uniform(0.01, 0.99, (16, 5)).astype("float32")
    ref = float(keras.ops.convert_to_numpy(keras.losses.BinaryCrossentropy()(y, p)))
    assert value(weighted_bce([1.0] * 5), y, p) == pytest.approx(ref, rel=1e-5)


def test_weight_only_scales_positive_terms():
    # All negatives: the positive weights must not matter.
    y, p = [[0, 0]], [[0.3, 0.6]]
    assert value(weighted_bce([5.0, 7.0]), y, p) == pytest.approx(value(weighted_bce([1.0, 1.0]), y, p))


def test_saturated_probabilities_stay_finite():
    loss = weighted_bce([10.0])
    out = value(loss, [[1], [0]], [[0.0], [1.0]])
    eps = keras.config.epsilon()
    assert math.isfinite(out)
    assert out == pytest.approx(-10 * math.log(eps) / 2 - math.log(eps) / 2, rel=1e-3)


def test_config_round_trip_and_registration():
    loss = weighted_bce([1.5, 2.5])
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(clone, WeightedBCE) and clone.pos_weight == [1.5, 2.5]


def test_bad_weights_and_label_count():
    with pytest.raises(ValueError, match="non-negative"):
        weighted_bce([1.0, -1.0])
    with pytest.raises(ValueError, match="3 positive weights"):
        value(weighted_bce([1.0, 1.0, 1.0]), [[1, 0]], [[0.5, 0.5]])


def test_positive_weights_hand_computed():
    from ich.training.stages import positive_weights

    labels = np.array([[1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 1, 0]])
    # column 0: 3 neg / 1 pos = 3 -> capped at 2.5; column 1: 2/2 = 1; column 2: no positives.
    np.testing.assert_allclose(positive_weights(labels, cap=2.5), [2.5, 1.0, 2.5])
    assert positive_weights(labels, cap=2.5).dtype == np.float32


def test_class_weights_balanced_hand_computed():
    from ich.training.stages import class_weights

    weights = class_weights(np.array([[1], [0], [0], [0]]))
    assert weights == pytest.approx({0: 4 / 6, 1: 2.0})
    assert class_weights(np.zeros(3)) is None
