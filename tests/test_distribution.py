"""train.distribution: the batch check, the even per-process share of a global batch (by hand),
the torch backend's clear refusal, and (slow) data-parallel training on two virtual JAX CPU
devices whose first step's loss equals a one-device run with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ich import config
from ich.errors import StepError
from ich.training import distribution
from ich.training.distribution import ShardedBatches, check_batch, even_share

from test_train import history, make_work, tiny_cfg


def test_batch_must_split_over_the_devices():
    check_batch(8, 2)
    check_batch(8, 8)
    with pytest.raises(StepError, match=r"batch_size 10 .* multiple of the 4 devices.*8 or 12"):
        check_batch(10, 4)
    with pytest.raises(StepError, match=r"multiple of the 8 devices .*2 processes.*set train.batch_size 8 or 16"):
        check_batch(12, 8, processes=2)
    with pytest.raises(StepError, match="batch_size 3 .* 4 devices.*set train.batch_size 4$"):
        check_batch(3, 4)
    with pytest.raises(StepError, match="train.stage2_batch_size 6 .*set train.stage2_batch_size 4 or 8"):
        check_batch(6, 4, key="train.stage2_batch_size")


def test_even_share_cuts_training_and_pads_validation():
    rows = np.arange(10, 17)                     # 7 rows, 2 devices
    cut, w = even_share(rows, devices=2, processes=1, process_id=0, pad=False)
    assert cut.tolist() == [10, 11, 12, 13, 14, 15] and w.tolist() == [1] * 6
    padded, w = even_share(rows, devices=2, processes=1, process_id=0, pad=True)
    assert padded.tolist() == [10, 11, 12, 13, 14, 15, 16, 10] and w.tolist() == [1] * 7 + [0]
    # 4 devices in 2 processes: 7 rows padded to 8, process 1 takes the second half.
    second, w = even_share(rows, devices=4, processes=2, process_id=1, pad=True)
    assert second.tolist() == [14, 15, 16, 10] and w.tolist() == [1, 1, 1, 0]
    first, _ = even_share(rows, devices=4, processes=2, process_id=0, pad=False)
    assert first.tolist() == [10, 11]            # 7 cut to 4, first half


class FakeBatches:
    """The part of ich.data.loading.Batches that ShardedBatches reads: image i is full of i."""

    def __init__(self, n, batch_size):
        self.order = np.arange(n)[::-1].copy()
        self.batch_size = batch_size
        self.labels = np.arange(n, dtype=np.float32)[:, None]
        self.epochs = 0

    def __len__(self):
        return -(-len(self.order) // self.batch_size)

    def inputs(self, rows):
        return np.broadcast_to(np.asarray(rows, np.uint8)[:, None, None, None], (len(rows), 2, 2, 3))

    def on_epoch_end(self):
        self.epochs += 1


def test_sharded_batches_follow_the_global_order():
    # 7 rows, global batch 4, 2 devices: batches [6 5 4 3] and [2 1 0].
    train = ShardedBatches(FakeBatches(7, 4), devices=2)
    assert len(train) == 2
    x, y = train[1]
    assert y[:, 0].tolist() == [1, 2]            # [2 1 0] cut to [2 1], sorted for reading
    assert np.allclose(x[:, 0, 0, 0], np.array([1, 2]) / 255)
    val = ShardedBatches(FakeBatches(7, 4), devices=2, pad=True)
    x, y, w = val[1]
    assert y[:, 0].tolist() == [0, 1, 2, 2] and w.tolist() == [1, 1, 1, 0]
    # A last batch smaller than the device count is dropped from training, kept (padded) in val.
    assert len(ShardedBatches(FakeBatches(5, 4), devices=2)) == 1
    assert len(ShardedBatches(FakeBatches(5, 4), devices=2, pad=True)) == 2
    with pytest.raises(IndexError):
        train[2]
    train.on_epoch_end()
    assert train.inner.epochs == 1
    # Two processes, 4 devices: each gets half of every global batch.
    p0, p1 = (ShardedBatches(FakeBatches(8, 8), devices=4, processes=2, process_id=k) for k in (0, 1))
    assert sorted(p0[0][1][:, 0].tolist() + p1[0][1][:, 0].tolist()) == list(range(8))


def test_null_is_one_device_and_torch_points_to_jax(tmp_path):
    cfg = config.load(None, [])
    assert distribution.plan(cfg).describe() == "one device"
    cfg = config.load(None, ["train.distribution=data_parallel"])
    with pytest.raises(StepError, match="no data-parallel training on the torch backend.*train.backend jax"):
        distribution.plan(cfg)


def _train(tmp_path: Path, name: str, sets: dict) -> subprocess.CompletedProcess:
    cfg = tiny_cfg(tmp_path, **{"paths.run_dir": str(tmp_path / name), "train.stages": ["stage1"],
                                "train.backend": "jax", "train.finetune_epochs": 1,
                                "train.tensorboard": False, **sets})
    cfg_path = config.save(cfg, tmp_path / f"{name}.yaml")
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cmd = [str(Path(sys.executable).with_name("ich")), "train", "--config", str(cfg_path)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="console script path differs on Windows")
def test_data_parallel_on_two_jax_devices_matches_one_device(tmp_path):
    pytest.importorskip("jax")
    # 7 validation images: the one validation batch of 8 is padded (weight 0) to split over 2.
    make_work(tmp_path / "work", n_train=16, n_val=7)
    one = _train(tmp_path, "one", {"train.distribution": None})
    two = _train(tmp_path, "two", {"train.distribution": "data_parallel"})
    for done in (one, two):
        # Only stage 1 was asked for, so the step ends by saying stage2.keras is missing.
        assert done.returncode == 2 and "stage2.keras missing" in done.stderr, done.stderr[-3000:]
    assert "train: one device, global batch 8" in one.stderr
    assert "data parallel over 2 devices: cpu:0, cpu:1, global batch 8" in two.stderr, two.stderr[-3000:]
    (a,), (b,) = history(tmp_path / "one", "stage1_finetune"), history(tmp_path / "two", "stage1_finetune")
    # One step per epoch: the epoch's loss is the first step's, before any update.
    assert abs(float(a["loss"]) - float(b["loss"])) <= 1e-5, (a, b)
    assert abs(float(a["val_auc"]) - float(b["val_auc"])) <= 1e-3, (a, b)
    assert (tmp_path / "two" / "stage1.keras").is_file()
