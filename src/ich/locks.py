"""One `ich` at a time per folder: a lock per work directory, run directory and predict output.

In: a folder. Out: `hold(folder)`, a context manager that owns `folder/.ich.lock` while the block
runs, or raises LockError at once naming the holder (process id, host, start time, command).

The lock is an OS file lock (fcntl.flock) on that file, which the kernel releases when the
holder dies however it dies (SIGKILL, power cut on a local disk): the file a killed run leaves
behind is taken over without a word, since nothing holds it any more. The file also records the
holder, for the message. Where flock is unavailable (Windows) the record itself is the lock,
and a record whose process is gone on this host is taken over (logged as stale).
Re-entrant within one process: `ich run` takes the work-directory lock once per step.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger("ich")

LOCK_NAME = ".ich.lock"
_held: dict[Path, list] = {}   # folder -> [open file or None, depth]


class LockError(RuntimeError):
    """Another `ich` holds the folder; the message names it."""


def holder_text(info: dict) -> str:
    """'pid 123 on host h since 2024-01-01T10:00:00 (ich preprocess ...)' from a lock record."""
    text = f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {info.get('started', '?')}"
    return text + (f" ({info['command']})" if info.get("command") else "")


@contextmanager
def hold(folder: str | Path, what: str = "folder") -> Iterator[Path]:
    """Own `folder`'s lock for the block (creating the folder); LockError if another holds it."""
    folder = Path(folder).resolve()
    if folder in _held:
        _held[folder][1] += 1
        try:
            yield folder / LOCK_NAME
        finally:
            _held[folder][1] -= 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    handle = _acquire_flock(path, what) if fcntl is not None else _acquire_record(path, what)
    _held[folder] = [handle, 1]
    try:
        yield path
    finally:
        del _held[folder]
        _release(path, handle)


def _record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(["ich", *sys.argv[1:]])[:300]}


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def _refuse(path: Path, what: str, info: dict) -> LockError:
    return LockError(f"{what} {path.parent} is in use by another ich: {holder_text(info)}. Wait for "
                     f"it to finish, or stop it; if that process is gone, delete {path}")


def _acquire_flock(path: Path, what: str):
    handle = open(path, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.close()
        if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise _refuse(path, what, _read(path)) from None
        raise
    # Ours now: whatever the file says is a killed run's record, replaced by ours.
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(_record()) + "\n")
    handle.flush()
    return handle


def _acquire_record(path: Path, what: str):
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = _read(path)
            if info.get("host") == socket.gethostname() and not _alive(info.get("pid")):
                log.warning("taking over the stale lock of a run that is gone: %s", holder_text(info))
                path.unlink(missing_ok=True)
                continue
            raise _refuse(path, what, info) from None
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(_record()) + "\n")
        return None
    raise _refuse(path, what, _read(path))


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _release(path: Path, handle) -> None:
    if handle is None:
        path.unlink(missing_ok=True)
        return
    # Empty the record before unlocking, so a reader never names a finished run as the holder.
    # The file stays: deleting it while another process waits on it would let two hold it.
    try:
        handle.seek(0)
        handle.truncate()
    finally:
        handle.close()
