"""The per-file work on a Dask cluster (compute.scheduler), for when one machine's pool is not
enough: a LocalCluster on this machine, or a running scheduler reached at tcp://host:8786
(started by hand, by dask-jobqueue on SLURM/PBS/LSF, or by dask-kubernetes).

In: a per-chunk function (picklable by reference: a module-level function of ich, which the
workers import), the chunks (lists of file paths), its extra arguments, the folders it reads and
writes, and how to describe a file that could not be done. Out: `map_files` yields
(chunk, result) as chunks finish, in any order (or in the chunks' order, `ordered`, for predict,
whose batches must be those of a local run), exactly what the local pool yields, so the
caller's journal, progress bar and resume are unchanged. The chunks may be a stream (the index
step's listing): with `per_thread`, only a few chunks per worker thread are out at a time.
Used by every per-file step: preprocess, the header index, offline augmentation and predict's
decoding.

Isolation: a worker that dies (a segfault in a pixel decoder, out of memory) takes its running
task with it; the scheduler reruns the task on another worker, and only after
distributed.scheduler.allowed-failures such deaths (3 by default) marks it failed with
KilledWorker. Those reruns are Dask's business, not failures. A chunk that fails that way (or
raises) is split into one task per file, so only the file that kills workers gets a failure
row (`failure(path, reason)`), and the rest of its chunk is done; a file whose task raises a
failure of the machine (disk full, I/O error, out of memory: ich.compute.is_machine_error)
stops the map with ich.compute.TaskError, as the local pool does. Workers restart only under a
nanny (the default of `dask worker` and of every cluster manager); without one, each death
leaves one worker fewer.

The time limit (`timeout_s`, preprocess.file_timeout_s): a running Dask task cannot be
interrupted, so the process that runs it is replaced. This process reads the scheduler's task
lists (Client.processing) about once a second; a worker that holds a task of this map and has
finished nothing for longer than that task's budget (a chunk: its files x the limit, so no chunk
of files that each keep to the limit is cut short; a file alone: the limit) is overdue. Its
tasks of this map are cancelled (so Dask does not rerun them elsewhere), the worker is
restarted through its nanny (Client.restart_workers: the nanny asks it to stop and kills it
after 4 s), a chunk is redone one file at a time, and a file that overran alone on its worker
gets ich.compute.timeout_reason's failure ("timed out after 60 s", the local pool's words).
Why so, and not a child process per file inside the task: Dask's worker processes are daemonic
(distributed.worker.daemon), so multiprocessing may not start children there, and a fresh
interpreter per task (subprocess) would cost more than the task's files; a stuck C decoder
often holds the GIL, which freezes the worker's own threads (a watchdog, its event loop, its
heartbeats) but not the scheduler, this process's clock or the nanny, a separate process.
The price: a hang in a chunk is noticed after chunk size x limit, and a restart also stops the
other tasks that worker holds (Dask reruns them, as after any worker death), so single-threaded
workers on a cluster of its own suit it best (bench/slurm_preprocess.py starts those). A worker
without a nanny cannot be restarted: the file still gets its failure and the run goes on, and
the warning says that the hung thread stays until the worker is restarted by hand.

Before any task, every worker proves it sees the same folders as this process: it reads a
token file written here into each output folder (so a node-local /tmp of the same name is
caught) and finds the first entries of each input folder. The dashboard address is logged.
Dask is an extra: pip install 'ich[dask]'.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import queue
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ich.compute import TaskError, is_machine_error, timeout_reason
from ich.errors import StepError

log = logging.getLogger("ich")

TOKEN_PREFIX = ".ich-dask-check-"
_INPUT_SAMPLES = 3          # entries of each input folder a worker must find
_POLL_S = 1.0               # how often the task lists are read, at most (a quarter of the limit if less)
_RESTART_TIMEOUT_S = 60     # for a nanny to stop (killing it after 4 s) and restart its worker
_FETCH_THREADS = 4          # results fetched at once (each waits while its worker is frozen)


def local_cluster_size(workers: int) -> dict:
    """LocalCluster arguments: `workers` single-threaded worker processes (the pixel code is
    single-threaded, like the local pool's), each under a nanny that restarts it."""
    return {"n_workers": max(1, int(workers)), "threads_per_worker": 1, "processes": True}


def connect(scheduler: str, workers: int = 1):
    """A dask.distributed Client for compute.scheduler: "local" starts a LocalCluster of
    `workers` processes here; "tcp://host:port" (or any Dask address) joins a running scheduler.
    StepError when Dask is not installed or the scheduler cannot be reached."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as err:
        raise StepError(f"compute.scheduler {scheduler!r} needs Dask: pip install 'ich[dask]', "
                        f"or set compute.scheduler null for the local process pool") from err
    if scheduler == "local":
        cluster = LocalCluster(**local_cluster_size(workers), dashboard_address=":0")
        client = Client(cluster)
    else:
        try:
            client = Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as err:
            raise StepError(f"compute.scheduler: cannot reach the Dask scheduler at {scheduler} "
                            f"({err}); start it (`dask scheduler`) or fix the address") from err
    log.info("dask: scheduler %s, %d workers, dashboard %s", client.scheduler.address,
             len(client.scheduler_info(n_workers=-1)["workers"]), client.dashboard_link)
    return client


def check_folders(client, inputs: Iterable[str | Path] = (), outputs: Iterable[str | Path] = ()) -> None:
    """StepError naming the folder and the worker when a worker does not see `inputs` (readable,
    the same first entries as here) or `outputs` (the same folder: it reads a token written here,
    and may write)."""
    inputs = [Path(p).resolve() for p in inputs]
    outputs = [Path(p).resolve() for p in outputs]
    for folder in inputs + outputs:
        if not folder.is_dir():
            raise StepError(f"dask: folder {folder} not found on this machine")
    expected = {str(p): sorted(e.name for e in _first_entries(p)) for p in inputs}
    tokens = {}
    for folder in outputs:
        tokens[str(folder)] = _write_token(folder)
    try:
        if not client.scheduler_info(n_workers=-1)["workers"]:
            client.wait_for_workers(1, timeout=60)
        try:
            answers = client.run(_worker_sees, expected, tokens)
        except (ImportError, ModuleNotFoundError) as err:
            raise StepError(f"dask: the workers cannot import ich ({err}); install ich (pip install "
                            f"'ich[dask]') in the workers' environment") from err
    finally:
        for folder, name in tokens.items():
            (Path(folder) / name).unlink(missing_ok=True)
    for worker, problems in sorted(answers.items()):
        if problems:
            raise StepError(f"dask worker {worker} cannot use {problems[0]}; every worker must see "
                            f"the work folder at the same path (a shared file system), or set "
                            f"compute.scheduler null")


def _write_token(folder: Path) -> str:
    """Write a uniquely named check file into `folder`; return its name."""
    name = f"{TOKEN_PREFIX}{uuid.uuid4().hex}"
    (folder / name).write_text(name)
    return name


def _first_entries(folder: Path) -> list:
    entries = []
    with os.scandir(folder) as it:
        for entry in it:
            if not entry.name.startswith("."):
                entries.append(entry)
                if len(entries) == _INPUT_SAMPLES:
                    break
    return entries


def _worker_sees(expected: dict, tokens: dict) -> list[str]:
    """Runs on each worker: the problems it has with the folders (empty when none)."""
    problems = []
    for folder, names in expected.items():
        if not os.path.isdir(folder):
            problems.append(f"input folder {folder}: not found on this worker")
        elif any(not os.path.exists(os.path.join(folder, n)) for n in names):
            problems.append(f"input folder {folder}: this worker sees other files there")
    for folder, name in tokens.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            problems.append(f"output folder {folder}: not the folder this machine writes "
                            f"(its check file {name} is not there)")
        elif not os.access(folder, os.W_OK):
            problems.append(f"output folder {folder}: not writable on this worker")
    return problems


try:  # Dask is an extra: without it this module still imports, and connect() says what to install.
    from distributed.diagnostics.plugin import WorkerPlugin as _PluginBase
except ImportError:
    _PluginBase = object


class InitPlugin(_PluginBase):
    """A Dask WorkerPlugin calling `init()` in every worker process, restarted ones included."""

    def __init__(self, init: Callable[[], None]):
        self.init = init

    def setup(self, worker):
        """Run the per-process initialiser (Dask calls this when the plugin reaches a worker)."""
        self.init()


def map_files(fn: Callable, chunks: Iterable[list], scheduler: str, args: tuple = (),
              *, inputs: Iterable[str | Path] = (), outputs: Iterable[str | Path] = (),
              failure: Callable[[Any, str], object] | None = None,
              init: Callable[[], None] | None = None, workers: int = 1,
              timeout_s: float | None = None, client=None, ordered: bool = False,
              per_thread: int | None = None,
              name: Callable[[Any], str] = os.path.basename) -> Iterator[tuple[list, list]]:
    """Run `fn(chunk, *args)` for every chunk on the Dask cluster of `scheduler`, yielding
    (chunk, result) as each finishes, in any order (in the order of `chunks` with `ordered`).

    `fn` returns one item per file of its chunk (a list); `failure(path, reason)` makes the item
    of a file that could not be done: a chunk whose task kills workers, raises or runs past its
    time budget is rerun one file per task, one task at a time, and a file that fails alone gets
    `failure(path, reason)` (without `failure`, StepError). `timeout_s` (None or <= 0: no limit)
    is the time limit of one file: a chunk's task may run len(chunk) x timeout_s, a lone file's
    timeout_s; past it the worker is restarted through its nanny and the reason is
    ich.compute.timeout_reason's ("timed out after 60 s"). A file whose task raises a failure of
    the machine (ich.compute.is_machine_error: disk full, I/O error, out of memory) is no
    failure of the file: TaskError(path, error) stops the map, as in the local pool. `init` runs
    once in every worker process (e.g. cv2.setNumThreads(1)); `inputs` and `outputs` are checked
    first (check_folders). `workers` sizes a "local" cluster; `client` reuses an open Client
    instead of connecting.

    `chunks` is read lazily: with `per_thread`, at most that many chunks per worker thread of
    the cluster (counted about once a second, so workers that join later are used) are
    submitted and not yet yielded, so a streamed listing stays streamed and, with `ordered`,
    the results held back for order are bounded; without it every chunk is submitted at once.
    The items of a chunk are file paths, or anything `name(item)` names in the log (a file's
    name by default).
    """
    own = client is None
    if own:
        client = connect(scheduler, workers)
    try:
        check_folders(client, inputs, outputs)
        if init is not None:
            client.register_plugin(InitPlugin(init), name=f"ich-init-{uuid.uuid4().hex[:8]}")
        run = _Run(client, fn, args, failure, timeout_s or None, name)
        yield from run.results(chunks, ordered, per_thread)
    finally:
        if own:
            cluster = getattr(client, "cluster", None)
            client.close()
            if cluster is not None:
                cluster.close()


@dataclass
class _Task:
    """One submitted task: a whole chunk (index None) or one file of it redone alone."""

    future: Any
    chunk: list[str]
    index: int | None = None


class _Run:
    """The bookkeeping of one map_files call: its tasks, the chunks being redone file by file,
    the chunks still to submit and held back for order, and the time limit."""

    def __init__(self, client, fn: Callable, args: tuple, failure, timeout_s: float | None,
                 name: Callable[[Any], str] = os.path.basename):
        self.client, self.fn, self.args, self.failure, self.timeout_s = client, fn, args, failure, timeout_s
        self.name = name
        # Keys of our own choosing, so that Client.processing's lists can be read as our tasks.
        self.tag = f"ich-{getattr(fn, '__name__', 'task')}-{uuid.uuid4().hex[:8]}"
        self.count = itertools.count()
        self.tasks: dict[str, _Task] = {}
        self.done: queue.SimpleQueue = queue.SimpleQueue()   # (future, result) as they arrive
        # Results are fetched in threads of their own: a result held by a worker that a stuck
        # decoder froze cannot be fetched until that worker is restarted (Dask then recomputes
        # it), and the loop that restarts it must not be the one waiting for it.
        self.fetcher = ThreadPoolExecutor(_FETCH_THREADS, thread_name_prefix="ich-dask-fetch")
        self.pending: dict[int, list] = {}   # id(chunk) being redone -> results by file, None until known
        self.waiting: deque = deque()        # (chunk, index) of files still to redo alone
        self.singles = 0                     # lone-file tasks in flight (at most one)
        self.watch = Overdue() if timeout_s else None
        self.source: Iterator | None = None  # chunks not yet submitted (None: all are)
        self.open = 0                        # chunks submitted and not yet yielded
        self.per_thread: int | None = None
        self.threads, self.threads_at = 1, -math.inf   # the cluster's thread count, and when read
        self.ordered = False
        self.submitted = 0                   # chunks drawn from `source` so far
        self.seq: dict[int, int] = {}        # id(chunk) -> its place in `chunks`
        self.held: dict[int, tuple] = {}     # place -> (chunk, result), finished out of order
        self.next_out = 0

    def submit(self, chunk: list[str], index: int | None = None) -> None:
        files = list(chunk) if index is None else [chunk[index]]
        key = f"{self.tag}-{next(self.count)}"
        future = self.client.submit(self.fn, files, *self.args, key=key, pure=False)
        self.tasks[key] = _Task(future, chunk, index)
        if index is not None:
            self.singles += 1
        future.add_done_callback(self.on_done)

    def on_done(self, future) -> None:
        try:
            self.fetcher.submit(self.fetch, future)
        except RuntimeError:   # the map has ended (closed early): nobody waits for this result
            pass

    def fetch(self, future) -> None:
        try:
            self.done.put((future, future.result()))
        except BaseException:  # noqa: BLE001 - failed or cancelled: finished() reads its status
            self.done.put((future, None))

    def budget(self, key: str) -> float | None:
        """Seconds the task of `key` may run (None: not a task of this map)."""
        task = self.tasks.get(key)
        if task is None:
            return None
        return self.timeout_s * (len(task.chunk) if task.index is None else 1)

    def results(self, chunks: Iterable[list], ordered: bool = False,
                per_thread: int | None = None) -> Iterator[tuple[list, list]]:
        """(chunk, result) for every chunk, as they finish or, with `ordered`, in order."""
        self.source, self.ordered, self.per_thread = iter(chunks), ordered, per_thread
        try:
            yield from self._results()
        finally:
            self.fetcher.shutdown(wait=False, cancel_futures=True)
            if self.tasks:   # closed early (an error, a kill): the cluster need not finish them
                self.client.cancel([task.future for task in self.tasks.values()])

    def feed(self) -> None:
        """Submit chunks until the window (per_thread x the cluster's threads) is full."""
        while self.source is not None and (self.per_thread is None or self.open < self.window()):
            chunk = next(self.source, None)
            if chunk is None:
                self.source = None
                return
            chunk = list(chunk)
            self.seq[id(chunk)] = self.submitted
            self.submitted += 1
            self.open += 1
            self.submit(chunk)

    def window(self) -> int:
        # Read at most once a second: workers join a dask-jobqueue cluster as their jobs start.
        if time.monotonic() - self.threads_at > _POLL_S:
            try:
                self.threads = max(1, sum(self.client.nthreads().values()))
            except (OSError, TimeoutError) as err:   # the scheduler busy: keep the last count
                log.debug("dask: no thread count from the scheduler (%s)", err)
            self.threads_at = time.monotonic()
        return self.per_thread * self.threads

    def emit(self, chunk: list, result: list) -> Iterator[tuple[list, list]]:
        """Yield a finished chunk (ordered: it and the held ones after it, once every earlier
        chunk is out; until then it stays in the window), refilling the window first."""
        place = self.seq.pop(id(chunk))
        if not self.ordered:
            self.open -= 1
            self.feed()
            yield chunk, result
            return
        self.held[place] = (chunk, result)
        while self.next_out in self.held:
            out = self.held.pop(self.next_out)
            self.next_out += 1
            self.open -= 1
            self.feed()
            yield out

    def _results(self) -> Iterator[tuple[list, list]]:
        self.feed()
        poll_s = min(_POLL_S, self.timeout_s / 4) if self.timeout_s else None
        next_look = time.monotonic() + (poll_s or 0.0)
        while self.tasks:
            try:
                wait_s = None if poll_s is None else max(0.0, next_look - time.monotonic())
                future, value = self.done.get(timeout=wait_s)
            except queue.Empty:
                future = value = None
            task = self.tasks.get(future.key) if future is not None else None
            if task is not None and task.future is future:   # not one cancelled at its limit
                del self.tasks[future.key]
                yield from self.finished(task, value)
            if poll_s is not None and time.monotonic() >= next_look:
                yield from self.look()
                next_look = time.monotonic() + poll_s

    def finished(self, task: _Task, value) -> Iterator[tuple[list[str], list]]:
        future = task.future
        if task.index is None:
            if value is not None:
                yield from self.emit(task.chunk, value)
            else:
                log.warning("dask: a chunk of %d files failed (%s); redoing it one file at a time",
                            len(task.chunk), _reason(future))
                self.redo(task.chunk)
            return
        self.singles -= 1
        if value is not None:
            yield from self.settle(task, value[0])
            return
        err = future.exception() if future.status == "error" else None
        if err is not None and is_machine_error(err):
            # Disk full, I/O error, memory: the machine's fault, never the file's.
            raise TaskError(task.chunk[task.index], err) from err
        yield from self.settle(task, self.fail(task.chunk[task.index], _reason(future)))

    def redo(self, chunk: list[str]) -> None:
        """Redo `chunk` one file at a time."""
        self.pending[id(chunk)] = [None] * len(chunk)
        self.waiting.extend((chunk, index) for index in range(len(chunk)))
        self.submit_next()

    def submit_next(self) -> None:
        # One file at a time: a file that kills its worker must not take innocent tasks
        # queued on that worker with it (Dask counts them suspicious, and after three such
        # deaths gives up on them too).
        if self.waiting and not self.singles:
            self.submit(*self.waiting.popleft())

    def fail(self, path, why: str):
        """The item of a file that failed alone (StepError without a `failure` function)."""
        if self.failure is None:
            raise StepError(f"dask: {path} failed: {why}")
        log.warning("dask: %s failed on its own: %s", self.name(path), why)
        return self.failure(path, why)

    def settle(self, task: _Task, item) -> Iterator[tuple[list[str], list]]:
        """Record one redone file's item; yield its chunk once every file of it is known."""
        results = self.pending[id(task.chunk)]
        results[task.index] = item
        self.submit_next()
        if all(r is not None for r in results):
            del self.pending[id(task.chunk)]
            yield from self.emit(task.chunk, results)

    def look(self) -> Iterator[tuple[list[str], list]]:
        """Restart every worker that holds a task of ours past its budget; redo or fail those."""
        try:
            processing = self.client.processing()
        except (OSError, TimeoutError) as err:   # the scheduler busy or away: look again later
            log.debug("dask: no task list from the scheduler (%s)", err)
            return
        for worker, keys, alone in self.watch.check(processing, self.budget, time.monotonic()):
            tasks = [self.tasks.pop(key) for key in keys]
            # Cancelled first, so that Dask does not rerun them elsewhere when the worker goes.
            self.client.cancel([task.future for task in tasks])
            log.warning("dask: worker %s ran past the time limit (%s); restarting it", worker,
                        ", ".join(_describe(task, self.timeout_s, self.name) for task in tasks))
            _restart(self.client, worker)
            why = timeout_reason(self.timeout_s)
            for task in tasks:
                if task.index is None and alone and len(task.chunk) == 1:
                    yield from self.emit(task.chunk, [self.fail(task.chunk[0], why)])   # a chunk of one is its file
                elif task.index is None:
                    self.redo(task.chunk)
                else:
                    self.singles -= 1
                    if alone:
                        yield from self.settle(task, self.fail(task.chunk[task.index], why))
                    else:
                        # Perhaps only queued behind the task that hung: again, unblamed.
                        self.waiting.appendleft((task.chunk, task.index))
            self.submit_next()


class Overdue:
    """Which workers hold tasks past their time budget, judged from the scheduler's task lists
    (Client.processing) and this process's clock alone, so that a worker a stuck decoder froze
    (the GIL held: no heartbeat, no event loop) is caught like any other.

    A worker progresses when a task leaves its list; it is overdue when it holds a task of ours
    and none has left it for longer than the largest budget among ours there. Which of its tasks
    was running is known only when it holds one ("alone"); the caller blames a file only then.
    """

    def __init__(self):
        self._since: dict[str, tuple[float, frozenset]] = {}   # worker -> (last progress, its keys)

    def check(self, processing: dict[str, list], budget: Callable[[str], float | None],
              now: float) -> list[tuple[str, list[str], bool]]:
        """(worker, our keys on it, whether that one key is all it holds) for every overdue worker.

        `processing`: worker -> the keys it holds (Client.processing()); `budget(key)`: seconds
        a task of ours may run, None for any other key; `now`: time.monotonic(), the clock of
        every call. A worker seen for the first time starts its count now.
        """
        overdue, since = [], {}
        for worker, keys in processing.items():
            keys = frozenset(keys)
            ours = {key: budget(key) for key in keys}
            ours = {key: b for key, b in ours.items() if b is not None}
            if not ours:
                continue
            start, before = self._since.get(worker, (now, keys))
            if before - keys:   # a task left it since the last look
                start = now
            since[worker] = (start, keys)
            if now - start > max(ours.values()):
                overdue.append((worker, sorted(ours), len(keys) == 1))
        self._since = since
        return overdue


def _describe(task: _Task, timeout_s: float, name: Callable[[Any], str] = os.path.basename) -> str:
    if task.index is None:
        return (f"a chunk of {len(task.chunk)} files over {len(task.chunk)} x {timeout_s:g} s, "
                f"redone one file at a time")
    return f"{name(task.chunk[task.index])} over {timeout_s:g} s"


def _restart(client, worker: str) -> None:
    """Restart `worker` through its nanny, which kills the process if it does not stop (a thread
    cannot be interrupted, and a stuck decoder may hold the GIL)."""
    try:
        status = client.restart_workers([worker], timeout=_RESTART_TIMEOUT_S, raise_for_error=False)
    except ValueError:   # no nanny: Dask cannot restart it
        log.warning("dask: worker %s has no nanny, so it cannot be restarted: the task that ran "
                    "past its limit keeps one of its threads until the worker is restarted by "
                    "hand (`dask worker` starts a nanny unless told --no-nanny)", worker)
        return
    except (OSError, TimeoutError) as err:
        log.warning("dask: restarting worker %s failed (%s)", worker, err)
        return
    if any(value != "OK" for value in status.values()):
        log.warning("dask: restarting worker %s: %s", worker, status)


def _reason(future) -> str:
    """A failure reason for a failed task: a worker death or the exception it raised."""
    from distributed import KilledWorker

    if future.status == "cancelled":
        return "the task was cancelled by the cluster"
    if future.status != "error":
        return "its result could not be fetched"
    err = future.exception()
    if isinstance(err, KilledWorker):
        return ("crashed its worker process on every worker that tried (a segfault, or out of "
                "memory)")
    return f"raised {type(err).__name__}: {err}"
