"""ich.compute.map_files: isolation of crashes and hangs, order, errors, machine failures."""

import errno
import os
import signal
import time

import pytest

from ich.compute import (Result, TaskError, is_machine_error, machine_message, map_files)


def square_or_fault(x):
    """Test worker: 'crash' kills its process with SIGSEGV, 'hang' sleeps, 'raise' raises."""
    if x == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if x == "hang":
        time.sleep(600)
    if x == "raise":
        raise OSError(errno.ENOSPC, "No space left on device", "out.png")
    if x == "slow":
        time.sleep(0.3)
        return -1
    return x * x


@pytest.mark.parametrize("workers", [1, 2])
def test_crash_and_hang_cost_only_their_item(workers):
    items = [1, 2, "crash", 3, "hang", 4, 5]
    results = list(map_files(square_or_fault, items, workers=workers, timeout_s=1.5))
    by_item = {r.item: r for r in results}
    assert sorted(r.index for r in results) == list(range(len(items)))   # each item once
    assert {k: r.value for k, r in by_item.items() if r.ok} == {1: 1, 2: 4, 3: 9, 4: 16, 5: 25}
    assert by_item["crash"].failure == "crashed with signal 11 (SIGSEGV)"
    assert by_item["hang"].failure == "timed out after 1.5 s"


def test_items_sent_to_a_worker_that_just_died_go_to_another_unblamed():
    # The race behind a flaky BrokenPipeError: the worker crashed between the parent's last look
    # and its next send.
    import multiprocessing

    from ich.compute import _Worker

    worker = _Worker(multiprocessing.get_context("spawn"), square_or_fault, None)
    worker.process.kill()
    worker.process.join()
    worker.send(0, 1)
    worker.send(1, 2)
    assert list(worker.queue) == [(0, 1), (1, 2)] and not worker.culprit()
    worker.kill()


def test_ordered_yields_in_input_order():
    items = ["slow", 1, 2, 3, "slow", 4]
    results = list(map_files(square_or_fault, items, workers=2, ordered=True))
    assert [r.index for r in results] == list(range(len(items)))
    assert [r.value for r in results] == [-1, 1, 4, 9, -1, 16]


def test_exception_in_function_stops_the_map_and_names_the_item():
    with pytest.raises(TaskError) as info:
        list(map_files(square_or_fault, [1, "raise", 2], workers=1))
    assert info.value.item == "raise"
    assert is_machine_error(info.value)
    assert machine_message(info.value) == "disk full (No space left on device: out.png)"


def test_machine_errors_are_told_apart_from_file_errors():
    assert is_machine_error(MemoryError())
    assert is_machine_error(OSError(errno.EIO, "I/O error"))
    assert is_machine_error(OSError(errno.EMFILE, "Too many open files"))
    assert not is_machine_error(OSError(errno.ENOENT, "No such file"))
    assert not is_machine_error(ValueError("not a DICOM file"))


def test_unknown_scheduler_lists_valid_ones():
    with pytest.raises(ValueError, match="valid: local"):
        map_files(square_or_fault, [1], scheduler="tcp://nowhere:8786")


def test_no_items_starts_nothing():
    assert list(map_files(square_or_fault, [], workers=4)) == []
    assert Result(0, 1, 1).ok and not Result(0, 1, failure="x").ok
