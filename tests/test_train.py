"""Step train end to end on a tiny work dir (32 px PNGs): files, exported models, skip logic,
config guard, clear errors. Helpers here are shared with test_train_resume.py."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import keras

from ich import config
from ich.cli import StepError
from ich.constants import (CASCADE_JSON, IMAGES_CSV, LABELS, SPLITS_CSV, STAGE1_MODEL, STAGE2_MODEL,
                           SUBTYPES)

SIZE = 32


def make_work(work: Path, n_train: int = 16, n_val: int = 8, seed: int = 0) -> Path:
    """splits.csv, images.csv and PNGs: positives carry a bright red square, one subtype or two."""
    import cv2

    rng = np.random.default_rng(seed)
    (work / "png").mkdir(parents=True)
    rows, images = [], []
    for i in range(n_train + n_val):
        image_id = f"ID_{i:06x}"
        labels = dict.fromkeys(LABELS, 0)
        img = (rng.random((SIZE, SIZE, 3)) * 60).astype(np.uint8)
        if i % 2 == 0:
            labels["any"] = 1
            for k in {i % 5, (i // 2) % 5}:
                labels[SUBTYPES[k]] = 1
                img[4 * k:4 * k + 6, 4:12, 0] = 255
        path = f"png/{image_id}.png"
        cv2.imwrite(str(work / path), img[..., ::-1])
        rows.append({"image_id": image_id, "split": "train" if i < n_train else "val",
                     "patient_id": f"P{i}", **labels})
        images.append({"image_id": image_id, "path": path})
    write(work / SPLITS_CSV, rows)
    write(work / IMAGES_CSV, images)
    return work


def write(path, rows):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def tiny_cfg(tmp_path: Path, **sets) -> dict:
    overrides = {
        "paths.work_dir": str(tmp_path / "work"), "paths.run_dir": str(tmp_path / "run"),
        "model.image_size": SIZE, "model.fusion_dim": 16, "model.attention_heads": 2,
        "train.batch_size": 8, "train.frozen_epochs": 1, "train.finetune_epochs": 2,
        "train.steps_per_epoch": 1, "train.early_stopping_patience": 50, "augment.enabled": False,
    }
    overrides.update(sets)
    return config.load(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def history(run_dir: Path, name: str) -> list[dict]:
    with (run_dir / "history" / f"{name}.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One in-process run with random init (frozen phase skipped)."""
    from ich.steps import train

    tmp = tmp_path_factory.mktemp("train")
    make_work(tmp / "work")
    cfg = tiny_cfg(tmp)
    path = train.run(cfg)
    return cfg, Path(cfg["paths"]["run_dir"]), path


def test_writes_models_cascade_and_logs(trained):
    cfg, run_dir, path = trained
    assert path == run_dir / CASCADE_JSON
    cascade = json.loads(path.read_text())
    assert cascade["labels"] == list(LABELS) and cascade["subtypes"] == list(SUBTYPES)
    assert cascade["image_size"] == SIZE and cascade["channels"] == ["blood", "brain", "bone"]
    assert cascade["stage1"] == {"file": STAGE1_MODEL, "backbone": "EfficientNetV2B0"}
    assert cascade["stage2"]["backbones"] == ["EfficientNetV2B0", "ConvNeXtTiny"]
    assert cascade["thresholds"] == dict.fromkeys(LABELS, 0.5)
    assert cascade["backend"] == "torch" and "torch" in cascade["versions"]
    assert cascade["mixed_precision"] is False and cascade["windows"]["blood"] == [80, 200]
    assert (run_dir / "config.yaml").is_file()
    assert config.load(run_dir / "config.yaml")["model"]["image_size"] == SIZE
    for stage in ("stage1", "stage2"):
        rows = history(run_dir, f"{stage}_finetune")
        assert [int(r["epoch"]) for r in rows] == [0, 1] and "val_auc" in rows[0]
        assert not (run_dir / "history" / f"{stage}_frozen.csv").exists()  # weights null: skipped
        assert list((run_dir / "logs" / stage).glob("events.out.tfevents.*"))


def test_saved_models_are_clean_float32_and_predict(trained):
    import ich.models  # noqa: F401

    _, run_dir, _ = trained
    x = np.random.default_rng(1).random((3, SIZE, SIZE, 3), dtype=np.float32)
    for name, width in ((STAGE1_MODEL, 1), (STAGE2_MODEL, 5)):
        model = keras.saving.load_model(run_dir / name, compile=False)
        assert "online_augment" not in [layer.name for layer in model.layers]
        assert all(layer.dtype_policy.name == "float32" for layer in model.layers)
        out = model.predict(x, verbose=0)
        assert out.shape == (3, width) and np.all((out > 0) & (out < 1))
    # The exported stage 1 holds the best checkpoint's weights: its head kernel (the only
    # (1280, 1) array) equals the one in the best-weights file.
    import h5py

    final = keras.saving.load_model(run_dir / STAGE1_MODEL, compile=False)
    kernel = keras.ops.convert_to_numpy(final.get_layer("any").kernel)
    found = []
    with h5py.File(run_dir / "checkpoints" / "stage1_best.weights.h5") as f:
        f.visititems(lambda name, obj: found.append(obj[()]) if getattr(obj, "shape", None) == kernel.shape else None)
    assert len(found) == 1
    np.testing.assert_array_equal(found[0], kernel)


def test_second_run_skips_and_keeps_evaluated_thresholds(trained, caplog):
    from ich.steps import train

    cfg, run_dir, path = trained
    cascade = json.loads(path.read_text())
    cascade["thresholds"]["any"] = 0.31  # as evaluate would
    path.write_text(json.dumps(cascade))
    stamp = (run_dir / STAGE2_MODEL).stat().st_mtime_ns
    with caplog.at_level("INFO", logger="ich"):
        assert train.run(cfg) == path
    assert "stage2 skipped" in caplog.text
    assert json.loads(path.read_text())["thresholds"]["any"] == 0.31
    assert (run_dir / STAGE2_MODEL).stat().st_mtime_ns == stamp


def test_changed_model_settings_refuse_to_resume(tmp_path):
    from ich.steps.train import _guard_config

    cfg = tiny_cfg(tmp_path)
    _guard_config(cfg, "stage1", tmp_path)
    cfg["train"]["finetune_epochs"] = 9  # may change between a kill and the resume
    _guard_config(cfg, "stage1", tmp_path)
    cfg["model"]["image_size"] = 64
    with pytest.raises(StepError, match="model.image_size"):
        _guard_config(cfg, "stage1", tmp_path)


def test_val_split_without_positives_is_a_clear_error(tmp_path):
    from ich.steps.train import stage_data

    work = make_work(tmp_path / "work")
    with (work / SPLITS_CSV).open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if row["split"] == "val":
            row.update(dict.fromkeys(LABELS, 0))
    write(work / SPLITS_CSV, rows)
    with pytest.raises(StepError, match="val split has no images positive for any"):
        stage_data(tiny_cfg(tmp_path), "stage2", seed=0)


def test_export_of_a_mixed_precision_model_is_float32(tmp_path):
    """GPU runs train under mixed_float16; the saved model must be plain float32 for CPU use."""
    import ich.models  # noqa: F401
    from ich.models.online_augment import online_augmentation
    from ich.training.callbacks import BestModel
    from ich.steps.train import _export, build_model

    cfg = tiny_cfg(tmp_path)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        augmentation = online_augmentation(cfg["online_augment"], 0)
        model = build_model(cfg, "stage1", augmentation)
        assert model.get_layer("backbone_EfficientNetV2B0").dtype_policy.name == "mixed_float16"
        best = tmp_path / "best.weights.h5"
        saver = BestModel(best)
        saver.set_model(model)
        saver.on_epoch_end(0, {"val_auc": 0.5})
        _export(cfg, "stage1", model, augmentation, best, tmp_path / STAGE1_MODEL)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    loaded = keras.saving.load_model(tmp_path / STAGE1_MODEL, compile=False)
    assert [layer.name for layer in loaded.layers][:2] == ["image", "backbone_EfficientNetV2B0"]
    assert all(layer.dtype_policy.name == "float32" for layer in loaded.layers)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded.get_layer("any").kernel),
                                  keras.ops.convert_to_numpy(model.get_layer("any").kernel))


def test_steps_per_epoch_cap_takes_a_fresh_random_subset_each_epoch():
    from ich.data.loading import Batches
    from ich.steps.train import _cap_epoch

    images = np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1).repeat(3, axis=-1)
    inner = Batches(images, np.zeros((40, 1), "float32"), batch_size=4, shuffle=True, seed=0)
    capped = _cap_epoch(inner, 3)
    assert len(capped) == 3
    first = [tuple(capped[i][0][:, 0, 0, 0]) for i in range(3)]
    capped.on_epoch_end()
    second = [tuple(capped[i][0][:, 0, 0, 0]) for i in range(3)]
    assert first != second and len(capped) == 3


def test_phase_epochs_stage2_override():
    from ich.steps.train import phase_epochs

    train = config.load(None, ["train.frozen_epochs=1", "train.finetune_epochs=8"])["train"]
    assert [phase_epochs(train, s, p) for s in ("stage1", "stage2") for p in ("frozen", "finetune")] == [1, 8, 1, 8]
    train["stage2_finetune_epochs"] = 3
    assert phase_epochs(train, "stage1", "finetune") == 8
    assert phase_epochs(train, "stage2", "finetune") == 3


def test_models_older_than_their_data_are_stale(tmp_path):
    import os

    from ich.steps.train import stale_stages

    cfg = config.load(None, [f"paths.work_dir={tmp_path / 'work'}", f"paths.run_dir={tmp_path / 'run'}"])
    (tmp_path / "work").mkdir()
    (tmp_path / "run").mkdir()
    splits, stage1, stage2 = (tmp_path / "work" / SPLITS_CSV, tmp_path / "run" / STAGE1_MODEL,
                              tmp_path / "run" / STAGE2_MODEL)
    for path, mtime in ((splits, 100), (stage1, 200), (stage2, 300)):
        path.write_text("x")
        os.utime(path, (mtime, mtime))
    assert stale_stages(cfg, tmp_path / "run") == []
    os.utime(splits, (250, 250))  # re-split after stage 1 was trained
    assert stale_stages(cfg, tmp_path / "run") == ["stage1", "stage2"]
    os.utime(splits, (100, 100))
    os.utime(stage1, (400, 400))  # stage 1 retrained: stage 2 started from the old one
    assert stale_stages(cfg, tmp_path / "run") == ["stage2"]
    cfg["model"]["stage2_from_stage1"] = False
    assert stale_stages(cfg, tmp_path / "run") == []
