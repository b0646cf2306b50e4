"""The per-file work on a Dask cluster (compute.scheduler), for when one machine's pool is not
enough: a LocalCluster on this machine, or a running scheduler reached at tcp://host:8786
(started by hand, by dask-jobqueue on SLURM/PBS/LSF, or by dask-kubernetes).

In: a per-chunk function (picklable by reference: a module-level function of ich, which the
workers import), the chunks (lists of file paths), its extra arguments, the folders it reads and
writes, and how to describe a file that could not be done. Out: `map_files` yields
(chunk, result) as chunks finish, in any order, exactly what the local pool yields, so the
caller's journal, progress bar and resume are unchanged.

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

Before any task, every worker proves it sees the same folders as this process: it reads a
token file written here into each output folder (so a node-local /tmp of the same name is
caught) and finds the first entries of each input folder. The dashboard address is logged.
Dask is an extra: pip install 'ich[dask]'.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from ich.compute import TaskError, is_machine_error
from ich.errors import StepError

log = logging.getLogger("ich")

TOKEN_PREFIX = ".ich-dask-check-"
_INPUT_SAMPLES = 3          # entries of each input folder a worker must find


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


def map_files(fn: Callable, chunks: Sequence[list[str]], scheduler: str, args: tuple = (),
              *, inputs: Iterable[str | Path] = (), outputs: Iterable[str | Path] = (),
              failure: Callable[[str, str], object] | None = None,
              init: Callable[[], None] | None = None, workers: int = 1,
              client=None) -> Iterator[tuple[list[str], list]]:
    """Run `fn(chunk, *args)` for every chunk on the Dask cluster of `scheduler`, yielding
    (chunk, result) as each finishes, in any order.

    `fn` returns one item per file of its chunk (a list); `failure(path, reason)` makes the item
    of a file that could not be done: a chunk whose task kills workers or raises is rerun one
    file per task, one task at a time, and a file that fails alone gets `failure(path, reason)` (without `failure`,
    StepError). A file whose task raises a failure of the machine (ich.compute.is_machine_error:
    disk full, I/O error, out of memory) is no failure of the file: TaskError(path, error) stops
    the map, as in the local pool. `init` runs once in every worker process (e.g. cv2.setNumThreads(1)); `inputs`
    and `outputs` are checked first (check_folders). `workers` sizes a "local" cluster; `client`
    reuses an open Client instead of connecting.
    """
    from distributed import as_completed

    own = client is None
    if own:
        client = connect(scheduler, workers)
    try:
        check_folders(client, inputs, outputs)
        if init is not None:
            client.register_plugin(InitPlugin(init), name=f"ich-init-{uuid.uuid4().hex[:8]}")
        # pure=False: the same chunk submitted twice (a rerun) is a new task, never a cached result.
        futures = {client.submit(fn, list(chunk), *args, pure=False): list(chunk) for chunk in chunks}
        singles: dict = {}          # future of one file of a failed chunk -> (its chunk, index)
        pending: dict = {}          # failed chunk id -> [results by file], None until known
        waiting: deque = deque()    # (chunk, index) of files still to redo alone
        queue = as_completed(list(futures))

        def submit_next() -> None:
            # One file at a time: a file that kills its worker must not take innocent tasks
            # queued on that worker with it (Dask counts them suspicious, and after three such
            # deaths gives up on them too).
            if waiting and not singles:
                chunk, index = waiting.popleft()
                single = client.submit(fn, [chunk[index]], *args, pure=False)
                singles[single] = (chunk, index)
                queue.add(single)

        for future in queue:
            if future in futures:
                chunk = futures.pop(future)
                if future.status == "finished":
                    yield chunk, future.result()
                    continue
                why = _reason(future)
                log.warning("dask: a chunk of %d files failed (%s); redoing it one file at a time",
                            len(chunk), why)
                pending[id(chunk)] = [None] * len(chunk)
                waiting.extend((chunk, index) for index in range(len(chunk)))
                submit_next()
                continue
            chunk, index = singles.pop(future)
            results = pending[id(chunk)]
            if future.status == "finished":
                results[index] = future.result()[0]
            else:
                err = future.exception()
                if is_machine_error(err):
                    # Disk full, I/O error, memory: the machine's fault, never the file's.
                    raise TaskError(chunk[index], err) from err
                why = _reason(future)
                if failure is None:
                    raise StepError(f"dask: {chunk[index]} failed: {why}")
                log.warning("dask: %s failed on its own: %s", chunk[index], why)
                results[index] = failure(chunk[index], why)
            submit_next()
            if all(r is not None for r in results):
                del pending[id(chunk)]
                yield chunk, results
    finally:
        if own:
            cluster = getattr(client, "cluster", None)
            client.close()
            if cluster is not None:
                cluster.close()


def _reason(future) -> str:
    """A failure reason for a failed task: a worker death or the exception it raised."""
    from distributed import KilledWorker

    err = future.exception()
    if isinstance(err, KilledWorker):
        return ("the worker process died while converting it (a crash in a decoder, or out of "
                "memory), on every worker that tried")
    return f"{type(err).__name__}: {err}"
