"""ich.training.optimizer.adam (torch's fused kernel) against Keras' own Adam on torch."""

import keras
import numpy as np
import pytest

from ich.training.optimizer import adam


def small_model(seed: int) -> keras.Model:
    """Weights of several shapes and sizes (a conv kernel, biases, a dense matrix)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(2)(x))


@pytest.mark.parametrize("schedule", [False, True])
def test_fused_adam_follows_keras_adam(schedule):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 6, 6, 3)).astype("float32")
    y = rng.normal(size=(8, 2)).astype("float32")

    def rate():
        if not schedule:
            return 1e-2
        return keras.optimizers.schedules.CosineDecay(1e-2, 20, alpha=0.1)

    models = {}
    for name, optimizer in (("keras", keras.optimizers.Adam(rate())), ("fused", adam(rate()))):
        model = small_model(1)
        model.compile(optimizer=optimizer, loss="mse")
        for _ in range(12):  # past the first steps, where the bias corrections matter most
            model.train_on_batch(x, y)
        models[name] = model
    assert type(models["fused"].optimizer) is type(models["keras"].optimizer)
    assert int(models["fused"].optimizer.iterations) == 12
    for a, b in zip(models["keras"].weights, models["fused"].weights):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(b), keras.ops.convert_to_numpy(a),
                                   rtol=1e-5, atol=1e-6)
    # The moments average gradients, which rounding in the weights moves a little more.
    for a, b in zip(models["keras"].optimizer.variables, models["fused"].optimizer.variables):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(b), keras.ops.convert_to_numpy(a),
                                   rtol=1e-3, atol=1e-6)
    # The weights moved: a comparison of two untouched models would pass too.
    assert np.abs(keras.ops.convert_to_numpy(models["fused"].weights[0])
                  - keras.ops.convert_to_numpy(small_model(1).weights[0])).max() > 1e-2


def test_fused_adam_saves_as_keras_adam():
    ours = keras.saving.serialize_keras_object(adam(1e-3))
    theirs = keras.saving.serialize_keras_object(keras.optimizers.Adam(1e-3))
    ours["config"].pop("name"), theirs["config"].pop("name")
    assert ours == theirs
