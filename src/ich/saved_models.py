"""Loading the saved stage models, each file once per pipeline run.

In: a `.keras` file a run saved. `load_saved(path)` is `keras.saving.load_model(path,
compile=False)` (inference and feature extraction need neither the optimizer nor the custom
training loss). Inside `reusing_loaded_models()`, which `ich run` and every pipeline step wrap
themselves in (ich.cli.run_step, ich.api.run), a file this process has already loaded and that
is unchanged since (same inode, size and modification time: the run's models are written by
atomic rename, so a retrained model is a new inode) comes back as the same model object instead
of being read again. Leaving the outermost context forgets every model.

Why: deserialising a stage rebuilds its ~270 layers, about 5 s per model on 2 CPU cores, and
one demo run loaded stage 1 four times and stage 2 three times (stage 2's initialisation, the
sequence stage's features, the validation thresholds, the evaluation), over 40 s of a
ten-minute budget. Safe because no step changes a loaded model: they predict with it or copy
its weights out (stage 2's initialisation from stage 1, ich.training.stages). Outside the
context nothing is cached, so a caller of the Python API who edits or trains a loaded model
never gets that object back from a later load.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# No Keras import at module level: ich.cli enters the context before it knows whether the step
# needs Keras, and the data steps start without importing it.
_loaded: dict | None = None   # (path, inode, size, mtime) -> model; None: outside the context


@contextmanager
def reusing_loaded_models() -> Iterator[None]:
    """Within this context `load_saved` returns an unchanged file's model from memory; nested
    uses share the outermost one's models, which are dropped when it exits."""
    global _loaded
    if _loaded is not None:
        yield
        return
    _loaded = {}
    try:
        yield
    finally:
        _loaded = None


def load_saved(path: Path):
    """The keras.Model saved at `path`, uncompiled (see the module docstring for when it is the
    same object as an earlier load)."""
    import keras

    path = Path(path)
    if _loaded is None:
        return keras.saving.load_model(path, compile=False)
    info = path.stat()
    key = (str(path.resolve()), info.st_ino, info.st_size, info.st_mtime_ns)
    if key not in _loaded:
        _loaded[key] = keras.saving.load_model(path, compile=False)
    return _loaded[key]
