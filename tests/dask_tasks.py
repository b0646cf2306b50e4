"""Per-chunk functions for the Dask tests; workers import them from here (tests/ on their path)."""

import os
from pathlib import Path

from ich.faults import ENV
from ich.steps.preprocess import process_chunk


def crash_on_poison(paths, work_dir, windows, size):
    """process_chunk, except that a file whose name contains "poison" kills the worker process
    (as a segfault inside a decoder would)."""
    if any("poison" in Path(p).name for p in paths):
        os._exit(13)
    return process_chunk(paths, work_dir, windows, size)


def set_faults(value):
    """Set (or, with None, clear) the faults of this worker process; Client.run calls it on every
    worker. A worker its nanny restarts gets the nanny's environment back."""
    if value is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = value


def echo_late_first(items, delay_s):
    """Each item back, after `delay_s` when the chunk holds item 0: the first chunk finishes
    after later ones, so an ordered map must hold those back."""
    import time

    if 0 in items:
        time.sleep(delay_s)
    return list(items)
