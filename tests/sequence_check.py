"""Load a saved sequence stage on another backend and write its outputs (run in a subprocess).

    KERAS_BACKEND=jax python tests/sequence_check.py MODEL.keras INPUTS.npz OUT.npz
"""

from __future__ import annotations

import sys

import numpy as np


def main(model_path: str, inputs_path: str, out_path: str) -> None:
    """Load MODEL.keras, predict the arrays of INPUTS.npz, save slices and study to OUT.npz."""
    import keras

    import ich.models.sequence  # noqa: F401  (registers the custom layers)

    model = keras.saving.load_model(model_path)
    inputs = dict(np.load(inputs_path))
    out = model.predict(inputs, verbose=0)
    np.savez(out_path, slices=np.asarray(out["slices"]), study=np.asarray(out["study"]),
             backend=keras.backend.backend())


if __name__ == "__main__":
    main(*sys.argv[1:4])
