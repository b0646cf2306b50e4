"""Training on several devices (train.distribution) through Keras 3's own distribution API.

In: the config (train.distribution: null | data_parallel, train.batch_size = the GLOBAL batch)
and the backend Keras runs on. Out: a `Plan` (devices, processes, this process's share of each
batch), a context (`Plan.active()`) inside which every stage is built, compiled and fitted, and
`Plan.feed(batches, train)`, which turns the step's global batches into what each process feeds.

  jax         keras.distribution.DataParallel over every device of every process. Several hosts
              (processes) join first through keras.distribution.initialize, which reads
              KERAS_DISTRIBUTION_JOB_ADDRESSES (the coordinator "host:port" first),
              KERAS_DISTRIBUTION_NUM_PROCESSES and KERAS_DISTRIBUTION_PROCESS_ID; it must run
              before JAX touches a device, so `plan(cfg)` is the first thing step train does.
              Each process feeds its slice of every global batch (Keras assembles the global
              array from the processes' local parts), so a global batch holds exactly the images
              one device would see in that step: the loss of a step is the same number.
  tensorflow  tf.distribute.MirroredStrategy over the local GPUs; TensorFlow splits each global
              batch among the replicas itself.
  torch       the installed Keras has no torch distribution (keras.src.backend.distribution_lib
              is None there): a StepError says to use the JAX backend.

A sharded batch must split evenly over the devices. Training batches are cut to a multiple of
the device count (the last, partial batch of an epoch loses at most devices - 1 images, a
different few each epoch since the order is reshuffled). Validation batches are padded to a
multiple instead, with sample weight 0 on the padding, so the validation AUC (the monitored
metric) counts exactly the validation images; only val_loss of the last batch is diluted by the
padding rows (Keras divides by the batch size).

With several processes only process 0 writes the run directory; process k writes its
(identical) copy under run_dir/process-k, so processes never race on a file and each finds the
stage-1 model stage 2 starts from.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from ich.errors import StepError

log = logging.getLogger("ich")

KINDS = (None, "data_parallel")
# The variables keras.distribution.initialize reads (its docstring); set on every host.
MULTI_HOST_ENV = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                  "KERAS_DISTRIBUTION_PROCESS_ID")


@dataclass
class Plan:
    """How training is spread: over `devices` devices in `processes` processes."""

    kind: str | None = None          # None (one device) or "data_parallel"
    backend: str = "torch"
    devices: int = 1                 # all devices of all processes (model replicas)
    processes: int = 1
    process_id: int = 0
    names: list[str] = field(default_factory=list)  # the devices, for the log
    _distribution: object = None     # keras.distribution.DataParallel (jax)
    _strategy: object = None         # tf.distribute.MirroredStrategy (tensorflow)

    @property
    def sharded(self) -> bool:
        """True when this process must feed its own even share of each global batch (JAX)."""
        return self._distribution is not None

    @contextlib.contextmanager
    def active(self):
        """Inside: models are built, compiled and fitted over the plan's devices. Outside (the
        thresholds' inference, the tests) everything runs on one device again."""
        if self._strategy is not None:
            with self._strategy.scope():
                yield self
        elif self._distribution is not None:
            previous = keras.distribution.distribution()
            keras.distribution.set_distribution(self._distribution)
            try:
                yield self
            finally:
                keras.distribution.set_distribution(previous)
        else:
            yield self

    def feed(self, batches, train: bool):
        """What this process feeds fit: `batches` of the global batch size as they are on one
        device or under TensorFlow; under JAX their even, per-process share (`ShardedBatches`)."""
        if not self.sharded:
            return batches
        return ShardedBatches(batches, self.devices, self.processes, self.process_id, pad=not train)

    def run_dir(self, run_dir: str | Path) -> Path:
        """The folder this process writes: run_dir itself for process 0, else run_dir/process-k."""
        run_dir = Path(run_dir)
        return run_dir if self.process_id == 0 else run_dir / f"process-{self.process_id}"

    def describe(self) -> str:
        """One line for the log: what runs where."""
        if self.kind is None:
            return "one device"
        hosts = f" in {self.processes} processes (this is process {self.process_id})" if self.processes > 1 else ""
        return f"data parallel over {self.devices} devices{hosts}: {', '.join(self.names)}"


def check_batch(batch_size: int, devices: int, processes: int = 1,
                key: str = "train.batch_size") -> None:
    """StepError unless the global batch (config `key`) splits evenly over the devices (and so
    the processes)."""
    if devices < 1:
        raise StepError("train.distribution: no device found to train on")
    if batch_size % devices:
        lower = batch_size - batch_size % devices
        choices = f"{lower} or {lower + devices}" if lower else str(devices)
        raise StepError(
            f"{key} {batch_size} is the global batch and must be a multiple of the "
            f"{devices} devices of train.distribution data_parallel"
            f"{f' ({processes} processes)' if processes > 1 else ''}; set {key} {choices}")


def plan(cfg: dict) -> Plan:
    """The Plan of train.distribution on the active backend; joins the other hosts first when
    the KERAS_DISTRIBUTION_* variables are set (JAX). StepError for an unknown value, a backend
    without distribution, or a batch that does not split over the devices."""
    kind = cfg["train"].get("distribution")
    if kind not in KINDS:
        raise StepError(f"train.distribution: unknown value {kind!r}; valid: null, data_parallel")
    name = keras.backend.backend()
    if kind is None:
        return Plan(None, name)
    # Every stage's global batch must split over the devices (stage 2 may have its own).
    sizes = {key: int(cfg["train"][key]) for key in ("batch_size", "stage2_batch_size")
             if cfg["train"].get(key) is not None}
    if name == "jax":
        return _jax_plan(sizes)
    if name == "tensorflow":
        return _tensorflow_plan(sizes)
    raise StepError(
        f"train.distribution data_parallel: Keras {keras.__version__} has no data-parallel "
        f"training on the {name} backend (only JAX and TensorFlow have a keras.distribution "
        f"implementation). Use JAX: pip install 'ich[jax]' (jax[cuda12] on GPUs) and set "
        f"train.backend jax, or set train.distribution null to train on one device")


def _jax_plan(batch_sizes: dict[str, int]) -> Plan:
    processes_env = os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES")
    if processes_env and int(processes_env) > 1:
        missing = [v for v in MULTI_HOST_ENV if not os.environ.get(v)]
        if missing:
            raise StepError(f"train.distribution: KERAS_DISTRIBUTION_NUM_PROCESSES is "
                            f"{processes_env} but {', '.join(missing)} is not set; set all of "
                            f"{', '.join(MULTI_HOST_ENV)} on every host (docs/scale.md)")
        keras.distribution.initialize()  # reads the three variables; before any JAX computation
    from keras.src.backend.jax import distribution_lib as jax_lib

    devices = keras.distribution.list_devices()
    processes, process_id = jax_lib.num_processes(), jax_lib.process_id()
    for key, batch_size in batch_sizes.items():
        check_batch(batch_size, len(devices), processes, f"train.{key}")
    return Plan("data_parallel", "jax", len(devices), processes, process_id, list(devices),
                _distribution=keras.distribution.DataParallel(devices=devices))


def _tensorflow_plan(batch_sizes: dict[str, int]) -> Plan:
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy()
    devices = list(strategy.extended.worker_devices)
    for key, batch_size in batch_sizes.items():
        check_batch(batch_size, strategy.num_replicas_in_sync, key=f"train.{key}")
    return Plan("data_parallel", "tensorflow", strategy.num_replicas_in_sync, 1, 0, devices,
                _strategy=strategy)


def even_share(rows: np.ndarray, devices: int, processes: int, process_id: int,
               pad: bool) -> tuple[np.ndarray, np.ndarray]:
    """This process's part of one global batch, made to split evenly over the devices.

    In: the rows of the global batch in order. Out: (rows, weights) of process `process_id`:
    the batch is cut (pad False) or padded with its first row at weight 0 (pad True) to a
    multiple of `devices`, then split into `processes` equal consecutive parts.
    Example: rows [0..6], 2 devices, 1 process: cut -> [0..5]; padded -> [0..6, 0], the last
    weight 0.
    """
    rows = np.asarray(rows, dtype=np.int64)
    weights = np.ones(len(rows), dtype=np.float32)
    extra = len(rows) % devices
    if extra and pad:
        fill = devices - extra
        rows = np.concatenate([rows, np.full(fill, rows[0], dtype=np.int64)])
        weights = np.concatenate([weights, np.zeros(fill, dtype=np.float32)])
    elif extra:
        rows, weights = rows[:len(rows) - extra], weights[:len(weights) - extra]
    part = len(rows) // processes
    return (rows[process_id * part:(process_id + 1) * part],
            weights[process_id * part:(process_id + 1) * part])


class ShardedBatches(keras.utils.PyDataset):
    """A view of ich.data.loading.Batches (global batch size) yielding this process's even share
    of each global batch (`even_share`); validation batches also yield the padding's weights.

    Every process walks the same global order (same seed, same reshuffle per epoch), so the
    processes' shares of batch i together are exactly global batch i. A training epoch whose last
    batch has fewer rows than devices ends one batch earlier.
    """

    def __init__(self, inner, devices: int, processes: int = 1, process_id: int = 0,
                 pad: bool = False):
        super().__init__()
        self.inner, self.devices, self.processes, self.process_id, self.pad = (
            inner, devices, processes, process_id, pad)

    def __len__(self):
        n, size = len(self.inner.order), self.inner.batch_size
        if not self.pad and n % size and n % size < self.devices:
            return n // size
        return len(self.inner)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range 0..{len(self) - 1}")
        size = self.inner.batch_size
        rows, weights = even_share(self.inner.order[index * size:(index + 1) * size],
                                   self.devices, self.processes, self.process_id, self.pad)
        # Sorted rows read a memory map front to back; the share's content is unchanged.
        order = np.argsort(rows, kind="stable")
        rows, weights = rows[order], weights[order]
        x = self.inner.inputs(rows).astype(np.float32)
        x *= 1.0 / 255.0
        y = self.inner.labels[rows]
        return (x, y, weights) if self.pad else (x, y)

    def on_epoch_end(self):
        """Reshuffle the wrapped batches (the same way in every process)."""
        self.inner.on_epoch_end()
