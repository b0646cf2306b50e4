"""Fault injection for tests only: make chosen files crash, hang or fail in worker processes.

Workers are spawned processes, which a test's monkeypatch cannot reach; the environment can.
`ICH_TEST_FAULTS` holds comma-separated `stage:name=action` entries, e.g.
`decode:ID_a=crash,decode:ID_b=hang,write:ID_c=enospc`; `check(stage, name)` performs the action
when the entry matches. Stages: `decode` (ich.data.dicom.read_hu, name = file stem), `header`
(ich.data.index.read_header, name = file stem), `augment` (one source image of the augment
step, name = its image id) and `write` (a preprocess PNG, name = image id, with its temporary
file open). Actions: crash (SIGSEGV to
the calling thread: nothing after it runs, as with a real segfault), hang (sleeps for ever,
the GIL released), freeze (hangs holding the GIL, as a C decoder stuck in a loop does: no other
thread of the process runs either, a Dask worker's event loop included), sleep (2 s, to keep a
run busy), enospc / eio (OSError), memory (MemoryError). Unset (always, outside tests) it costs
one environment lookup.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import threading
import time

ENV = "ICH_TEST_FAULTS"
_SLEEP_S = 2.0
_parsed: tuple[str, dict] = ("", {})


def _faults() -> dict[tuple[str, str], str]:
    global _parsed
    text = os.environ.get(ENV, "")
    if text != _parsed[0]:
        table = {}
        for entry in filter(None, (e.strip() for e in text.split(","))):
            where, _, action = entry.partition("=")
            stage, _, name = where.partition(":")
            table[(stage, name)] = action
        _parsed = (text, table)
    return _parsed[1]


def check(stage: str, name: str) -> None:
    """Perform the fault `ICH_TEST_FAULTS` names for (stage, name), if any."""
    if not os.environ.get(ENV):
        return
    action = _faults().get((stage, name))
    if action == "crash":
        # To this thread, not the process: os.kill lets the kernel pick any thread of a
        # multi-threaded process (a Dask worker), and this one ran on meanwhile, far enough to
        # leave a temporary PNG behind (the flaky orphan of tests/test_distributed.py).
        if hasattr(signal, "pthread_kill"):
            signal.pthread_kill(threading.get_ident(), signal.SIGSEGV)
        else:  # Windows: no threads to choose from
            os.kill(os.getpid(), signal.SIGSEGV)
        while True:  # a real segfault runs nothing after it, wherever the signal landed
            time.sleep(60)
    elif action == "hang":
        while True:
            time.sleep(60)
    elif action == "freeze":
        # libc's sleep called through PyDLL keeps the GIL, as a stuck C decoder does.
        libc_sleep = ctypes.PyDLL(None).sleep
        while True:
            libc_sleep(3600)
    elif action == "sleep":
        time.sleep(_SLEEP_S)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
    elif action == "eio":
        raise OSError(errno.EIO, os.strerror(errno.EIO), name)
    elif action == "memory":
        raise MemoryError(f"injected for {name}")
