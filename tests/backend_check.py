"""Cross-backend checks run in a subprocess (Keras picks its backend once per process).

    KERAS_BACKEND=jax python tests/backend_check.py predict RUN_DIR IMAGES.npy OUT.npy
        load the cascade in RUN_DIR and write its predictions for IMAGES.npy to OUT.npy
    KERAS_BACKEND=jax python tests/backend_check.py smoke RUN_DIR real|tiny
        build a cascade (real: the project's builders at 32 px; tiny: tests/tiny_cascade.py's
        pool + dense stages, seconds to compile), train two steps, save, load, predict; print "ok"

Also imported by tests/test_backends.py for `train_tiny_cascade`, so every backend trains the
same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SIZE = 32  # the smallest input both backbone families accept (stride 32)
STEPS = 2
BATCH = 4


def train_tiny_cascade(run_dir: Path, seed: int = 0, kind: str = "real") -> tuple[object, object]:
    """Build both stages at SIZE px with random init, train each STEPS steps on random data and
    save them with cascade.json in run_dir. kind "real": the project's builders (stage 1
    EfficientNetV2B0; stage 2 EfficientNetV2B0 + ConvNeXtTiny); "tiny": tiny_cascade's models."""
    import keras

    from tiny_cascade import build_tiny, write_cascade

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, size=(STEPS * BATCH, SIZE, SIZE, 3)).astype("float32")
    if kind == "real":
        from ich.models.cascade import build_stage1, build_stage2

        stage1 = build_stage1("EfficientNetV2B0", SIZE, weights=None)
        stage2 = build_stage2(["EfficientNetV2B0", "ConvNeXtTiny"], SIZE, weights=None,
                              fusion_dim=16, attention_heads=2)
    else:
        stage1, stage2 = build_tiny(SIZE)
    for model, width in ((stage1, 1), (stage2, 5)):
        y = rng.integers(0, 2, size=(len(x), width)).astype("float32")
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    write_cascade(run_dir, stage1, stage2, SIZE)
    return stage1, stage2


def cascade_probs(p_any, p_subtypes) -> np.ndarray:
    """The cascade's (N, 6) output from its stages' outputs, by hand: subtypes times p(any)."""
    p_any = np.asarray(p_any, dtype=np.float32).reshape(-1, 1)
    return np.concatenate([p_any, p_any * np.asarray(p_subtypes, dtype=np.float32)], axis=1)


def fixed_images(n: int = 3, seed: int = 1) -> np.ndarray:
    """Fixed uint8 images (n, SIZE, SIZE, 3) for comparing predictions across backends."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, SIZE, SIZE, 3)).astype(np.uint8)


def _predict(run_dir: str, images: str, out: str) -> None:
    from ich.evaluation.inference import load_cascade

    np.save(out, load_cascade(Path(run_dir)).predict(np.load(images), batch_size=BATCH))


def _smoke(run_dir: str, kind: str) -> None:
    from ich.evaluation.inference import load_cascade

    stage1, stage2 = train_tiny_cascade(Path(run_dir), kind=kind)
    images = fixed_images()
    x = images.astype("float32") / 255
    before = cascade_probs(np.asarray(stage1.predict(x, verbose=0))[:, 0], np.asarray(stage2.predict(x, verbose=0)))
    after = load_cascade(Path(run_dir)).predict(images, batch_size=BATCH)
    assert after.shape == (len(images), 6) and np.isfinite(after).all(), after
    np.testing.assert_allclose(after, before, atol=1e-5)
    print("ok")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # for tiny_cascade
    command, *args = sys.argv[1:]
    {"predict": _predict, "smoke": _smoke}[command](*args)
