"""The one way `ich` runs a function over many files in other processes, each file isolated.

In: a picklable function of one item (a path, or a small tuple), the items, a worker count and
a per-item time limit. Out: `map_files(...)` yields one `Result` per item as it finishes (or in
item order with `ordered=True`): the function's return value, or `failure` saying why the attempt
died ("crashed with signal 11 (SIGSEGV)", "timed out after 30 s"). An exception raised by the
function itself is not a per-item outcome: it stops the map and is raised in the caller as
`TaskError` (functions turn per-file problems into return values and raise only for problems of
the machine: disk full, I/O error, too many open files, out of memory; see `is_machine_error`).

Why processes even for one worker: a pixel decoder that segfaults (pylibjpeg-openjpeg on some
JPEG 2000 streams), is killed for memory or hangs takes down only its own process; the parent
names the item it was working on, starts a fresh worker and goes on. Each worker handles one
item at a time, with the next one already queued behind it (so it never waits for the parent),
which is what makes the item at fault knowable: it is the oldest one the worker has not answered.

Backends: `scheduler` null or "local" here is this process pool. The Dask path of the
`compute.scheduler` setting (a LocalCluster, or `tcp://...`) is ich.distributed.map_files: it
runs chunks of files per task and yields (chunk, rows), with machine errors raised as the
TaskError of this module; steps choose between the two (steps/preprocess.py).
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import signal
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Iterable, Iterator

log = logging.getLogger("ich")

# errno values that are about the machine, not the file being processed: retrying later works.
MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM,
                  errno.EROFS}
_MACHINE_WORDS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                  errno.EIO: "I/O error", errno.EMFILE: "too many open files",
                  errno.ENFILE: "too many open files in the system", errno.ENOMEM: "out of memory",
                  errno.EROFS: "read-only file system"}
# Items queued per worker: the one it works on and the next, so it never waits for the parent.
_DEPTH = 2
# With ordered=True, results held back for order are bounded: at most this many items per
# worker are dispatched ahead of the oldest unfinished one.
_ORDER_WINDOW = 8
_STOP_GRACE_S = 5.0


@dataclass(frozen=True)
class Result:
    """One item's outcome: `value` as the function returned it, or `failure` (why it died)."""

    index: int                 # position of the item in the input order
    item: Any
    value: Any = None
    failure: str = ""          # "" when the function returned

    @property
    def ok(self) -> bool:
        """True when the function returned for this item."""
        return not self.failure


class TaskError(RuntimeError):
    """The function raised for `item` (in a worker); `error` is that exception."""

    def __init__(self, item: Any, error: BaseException):
        super().__init__(f"{item}: {type(error).__name__}: {error}")
        self.item, self.error = item, error


class WorkerStartError(RuntimeError):
    """A worker process died before it could take any work (a broken environment, not a file)."""


def is_machine_error(err: BaseException) -> bool:
    """True for failures of the machine rather than of the file: out of memory, disk full, I/O
    errors, too many open files. These stop a step and are never recorded against an image."""
    if isinstance(err, TaskError):
        err = err.error
    if isinstance(err, MemoryError):
        return True
    return isinstance(err, OSError) and err.errno in MACHINE_ERRNOS


def machine_message(err: BaseException) -> str:
    """A short description of a machine failure, e.g. 'disk full (No space left on device: x.png)'."""
    if isinstance(err, TaskError):
        err = err.error
    if isinstance(err, MemoryError):
        return "out of memory"
    words = _MACHINE_WORDS.get(getattr(err, "errno", None), type(err).__name__)
    detail = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    name = getattr(err, "filename", None)
    return f"{words} ({detail}{': ' + str(name) if name else ''})"


def timeout_reason(timeout_s: float) -> str:
    """The failure of an item killed at its time limit: 'timed out after 60 s' (one wording for
    the local pool and the Dask path, ich.distributed)."""
    return f"timed out after {timeout_s:g} s"


def map_files(fn: Callable[[Any], Any], items: Iterable[Any], workers: int = 1,
              timeout_s: float | None = None, initializer: Callable[[], None] | None = None,
              ordered: bool = False, scheduler: str | None = None) -> Iterator[Result]:
    """Run `fn(item)` for every item in `workers` isolated processes; yield a `Result` each.

    `timeout_s` (None or <= 0: no limit) bounds each item's time in its worker; an item over it
    has its worker killed and gets failure "timed out after S s". A worker that dies gives its
    item failure "crashed with signal N (NAME)" (or "exited with code N"). `fn` and `initializer`
    must be importable module-level functions (or functools.partial of one): workers are spawned.
    An exception raised by `fn` stops the map: TaskError in the caller.
    """
    backend = SCHEDULERS.get(scheduler or "local")
    if backend is None:
        raise ValueError(f"compute scheduler {scheduler!r} is not available; valid: "
                         f"{', '.join(sorted(SCHEDULERS))}")
    return backend(fn, list(items), max(1, int(workers)), timeout_s or None, initializer, ordered)


def _serve(conn, fn, initializer) -> None:
    """Worker loop: announce readiness, then answer (index, item) messages until None."""
    # Ctrl-C reaches the whole process group; the parent decides what stops, and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent is gone
            return
        if message is None:
            return
        index, item = message
        try:
            value = fn(item)
        except BaseException as err:  # noqa: BLE001 - reported to the parent, which decides
            _send_error(conn, index, err)
            continue
        try:
            conn.send((index, True, value))
        except Exception as err:  # noqa: BLE001 - an unpicklable result is the function's bug
            _send_error(conn, index, err)


def _send_error(conn, index: int, err: BaseException) -> None:
    try:
        conn.send((index, False, err))
    except Exception:  # noqa: BLE001 - the exception itself would not pickle
        conn.send((index, False, RuntimeError(f"{type(err).__name__}: {err}")))


class _Worker:
    """One spawned worker process, its pipe and the items it holds, oldest first."""

    def __init__(self, ctx, fn, initializer):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, fn, initializer), daemon=True)
        self.process.start()
        child.close()
        self.queue: deque[tuple[int, Any]] = deque()
        self.ready = False
        self.head_since = 0.0   # when the oldest queued item started running (once ready)
        self.undelivered = 0    # items at the queue's tail that never reached the pipe

    def send(self, index: int, item: Any) -> None:
        if not self.queue:
            self.head_since = time.monotonic()
        self.queue.append((index, item))
        try:
            self.conn.send((index, item))
        except (BrokenPipeError, ConnectionResetError):
            # It died since the last look (a crash on the item it runs): its sentinel says so at
            # the next wait, and the items it never got go back to the queue, unblamed.
            self.undelivered += 1

    def culprit(self) -> bool:
        """Whether the head of the queue reached the worker (so its death is that item's)."""
        return len(self.queue) > self.undelivered

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


def _death(process) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        note = "; killed, out of memory?" if -code == signal.SIGKILL else ""
        return f"crashed with signal {-code} ({name}{note})"
    return f"exited with code {code}"


def _local(fn, items: list, workers: int, timeout_s: float | None, initializer,
           ordered: bool) -> Iterator[Result]:
    """The process-pool backend of map_files."""
    if not items:
        return
    # spawn: workers start clean (no inherited threads, locks or Keras state) on every OS.
    ctx = multiprocessing.get_context("spawn")
    todo: deque[tuple[int, Any]] = deque(enumerate(items))
    pool: list[_Worker] = []
    held: dict[int, Result] = {}   # ordered mode: finished, waiting for earlier items
    next_out = 0
    window = workers * _ORDER_WINDOW

    def finish(result: Result) -> Iterator[Result]:
        nonlocal next_out
        if not ordered:
            yield result
            return
        held[result.index] = result
        while next_out in held:
            yield held.pop(next_out)
            next_out += 1

    def retire(worker: _Worker) -> None:
        """Put the items a dead worker still held (after its culprit) back at the front."""
        todo.extendleft(reversed(worker.queue))
        worker.queue.clear()
        worker.kill()
        pool.remove(worker)

    try:
        while todo or any(w.queue for w in pool):
            while len(pool) < min(workers, len(todo) + sum(len(w.queue) for w in pool)):
                pool.append(_Worker(ctx, fn, initializer))
            for worker in pool:
                while (len(worker.queue) < _DEPTH and todo
                       and (not ordered or todo[0][0] < next_out + window)):
                    worker.send(*todo.popleft())
            now = time.monotonic()
            deadlines = [w.head_since + timeout_s for w in pool if w.ready and w.queue and timeout_s]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else None
            ready = set(wait([w.conn for w in pool] + [w.process.sentinel for w in pool],
                             timeout=wait_s))
            for worker in list(pool):
                dead = worker.process.sentinel in ready
                if not dead and worker.conn not in ready:
                    if (timeout_s and worker.ready and worker.queue
                            and time.monotonic() - worker.head_since >= timeout_s):
                        index, item = worker.queue.popleft()
                        retire(worker)
                        yield from finish(Result(index, item, failure=timeout_reason(timeout_s)))
                    continue
                try:
                    while worker.conn.poll():
                        message = worker.conn.recv()
                        if message[0] == "ready":
                            worker.ready, worker.head_since = True, time.monotonic()
                            continue
                        index, ok, value = message
                        _, item = worker.queue.popleft()
                        worker.head_since = time.monotonic()
                        if not ok:
                            raise TaskError(item, value) from value
                        yield from finish(Result(index, item, value))
                except (EOFError, OSError):
                    dead = True
                if dead:
                    # Its last answers were read above; what it still held died with it.
                    worker.process.join()
                    if not worker.ready:
                        raise WorkerStartError(f"a worker process died while starting "
                                               f"({_death(worker.process)}); see the messages above")
                    if worker.culprit():
                        index, item = worker.queue.popleft()
                        result = Result(index, item, failure=_death(worker.process))
                        retire(worker)
                        yield from finish(result)
                    else:
                        retire(worker)
    finally:
        _stop(pool)


def _stop(pool: list[_Worker]) -> None:
    """Idle workers are asked to exit; busy ones (an error or a closed generator) are killed."""
    for worker in pool:
        if worker.queue or not worker.process.is_alive():
            worker.kill()
            continue
        try:
            worker.conn.send(None)
        except OSError:
            pass
    deadline = time.monotonic() + _STOP_GRACE_S
    for worker in pool:
        worker.process.join(max(0.0, deadline - time.monotonic()))
        worker.kill()


SCHEDULERS: dict[str, Callable[..., Iterator[Result]]] = {"local": _local}
