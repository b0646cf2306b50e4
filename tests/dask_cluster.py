"""A Dask cluster on 127.0.0.1 for the tests: one `dask scheduler` and two nannied single-thread
`dask worker` processes, with ich's sources and tests/ on the workers' path and chosen faults
(ich.faults) in their environment. Each test module that needs one starts it once (a module
fixture), as starting it costs a few seconds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ich.faults import ENV

TESTS = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def dask_cluster(logs: Path, faults: str) -> Iterator[tuple[str, object]]:
    """(address, Client) of a scheduler and two workers whose processes have ICH_TEST_FAULTS =
    `faults`; every process is stopped at the end (workers first)."""
    from distributed import Client

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = str(Path(sys.executable).with_name("dask"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)]),
               # One worker death marks a task failed (default 3): the crash tests stay short.
               DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="1", **{ENV: faults})
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", ":0"], env=env,
                              stdout=subprocess.DEVNULL, stderr=open(logs / "scheduler.log", "w"))]
    time.sleep(2)
    for k in range(2):
        procs.append(subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--nworkers", "1",
                                       "--host", "127.0.0.1", "--dashboard-address", ":0"], env=env,
                                      stdout=subprocess.DEVNULL,
                                      stderr=open(logs / f"worker{k}.log", "w")))
    client = None
    try:
        client = Client(address, timeout="60s")
        client.wait_for_workers(2, timeout=120)
        yield address, client
    finally:
        if client is not None:
            client.close()
        # Workers first, the scheduler once they are gone: a nanny whose scheduler went first
        # waits for it to come back (40 s of teardown, when both were stopped at once).
        for group in (procs[1:], procs[:1]):
            for proc in group:
                proc.terminate()
            for proc in group:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
