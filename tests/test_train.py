"""Step train end to end on a tiny work dir (32 px PNGs): files, exported models, the staleness
rule, clear errors. Helpers here are shared with test_train_resume.py."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import keras

from ich import config
from ich.errors import StepError
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
        # Series of four slices (one patient and study each), for the sequence stage.
        rows.append({"image_id": image_id, "split": "train" if i < n_train else "val",
                     "patient_id": f"P{i // 4}", "study_id": f"ST{i // 4}", **labels})
        images.append({"image_id": image_id, "path": path, "series_id": f"SE{i // 4}",
                       "position": float(i % 4)})
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
        "sequence.width": 8, "sequence.dilations": [1], "sequence.epochs": 2,
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
    assert cascade["labels"] == list(LABELS)
    assert cascade["input"] == {"image_size": SIZE, "channels": ["blood", "brain", "bone"],
                                "windows": {"blood": [80.0, 200.0], "brain": [40.0, 80.0],
                                            "bone": [600.0, 2800.0]},
                                "offsets": [0], "slice_channels": "all"}
    stages = {s["name"]: s for s in cascade["stages"]}
    assert stages["stage1"] == {"name": "stage1", "file": STAGE1_MODEL, "labels": ["any"],
                                "given": None, "backbones": ["EfficientNetV2B0"]}
    assert stages["stage2"]["backbones"] == ["EfficientNetV2B0", "ConvNeXtTiny"]
    assert stages["stage2"]["given"] == "any" and stages["stage2"]["labels"] == list(SUBTYPES)
    # Thresholds chosen on val when training ended (Youden's J by default), not left at 0.5.
    assert cascade["threshold_method"] == "youden"
    assert set(cascade["thresholds"]) == set(LABELS)
    assert all(0.0 <= t <= 1.0 for t in cascade["thresholds"].values())
    assert cascade["backend"] == "torch" and "torch" in cascade["versions"]
    assert cascade["mixed_precision"] is False
    assert (run_dir / "config.yaml").is_file()
    assert config.load(run_dir / "config.yaml")["model"]["image_size"] == SIZE
    for stage in ("stage1", "stage2"):
        rows = history(run_dir, f"{stage}_finetune")
        assert [int(r["epoch"]) for r in rows] == [0, 1] and "val_auc" in rows[0]
        assert not (run_dir / "history" / f"{stage}_frozen.csv").exists()  # weights null: skipped
        assert list((run_dir / "logs" / stage).glob("events.out.tfevents.*"))
    # The sequence stage: over the series of four slices, after the image stages.
    assert stages["sequence"] == {"name": "sequence", "file": "sequence.keras", "labels": list(LABELS),
                                  "given": None, "kind": "sequence", "pooling": "max"}
    assert [s["name"] for s in cascade["stages"]] == ["stage1", "stage2", "sequence"]
    assert [int(r["epoch"]) for r in history(run_dir, "sequence_train")] == [0, 1]
    assert set(cascade["cascade_thresholds"]) == set(LABELS)  # the image stages' own, for the report


def test_sequence_stage_loads_and_refines_whole_series(trained):
    from ich.data.loading import load_split
    from ich.evaluation.inference import load_cascade, refine_split

    cfg, run_dir, _ = trained
    cascade = load_cascade(run_dir)
    assert cascade.sequence_stage["name"] == "sequence"
    val = load_split(Path(cfg["paths"]["work_dir"]), "val", cascade.spec, "packed", 1)
    out = refine_split(cascade, val, 8, "val")
    assert out["refined"].shape == out["cascade"].shape == (8, 6)
    assert np.isfinite(out["refined"]).all()
    # Two val series of four slices; the series label is any of its slices'.
    assert list(out["series"]["series_id"]) == ["SE4", "SE5"] and list(out["series"]["n_slices"]) == [4, 4]
    truth = val.table[list(LABELS)].to_numpy()
    np.testing.assert_array_equal(out["series"][[f"{l}_true" for l in LABELS]].to_numpy(),
                                  [truth[:4].max(axis=0), truth[4:].max(axis=0)])
    np.testing.assert_allclose(out["series_max"][list(LABELS)].to_numpy(),
                               [out["cascade"][:4].max(axis=0), out["cascade"][4:].max(axis=0)], atol=1e-6)


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


def test_reruns_exactly_what_changed(trained, caplog):
    """An unchanged rerun skips; another threshold method re-chooses only the thresholds."""
    from ich.steps import train

    cfg, run_dir, path = trained
    times = {name: (run_dir / name).stat().st_mtime_ns for name in (STAGE1_MODEL, STAGE2_MODEL, "sequence.keras")}
    before = json.loads(path.read_text())
    with caplog.at_level("INFO", logger="ich"):
        assert train.run(cfg) == path
    assert "stage1 is up to date" in caplog.text and "stage2 is up to date" in caplog.text
    assert json.loads(path.read_text()) == before
    assert {n: (run_dir / n).stat().st_mtime_ns for n in times} == times

    caplog.clear()
    f1 = config.load(run_dir / "config.yaml", ["evaluate.threshold_method=f1"])
    with caplog.at_level("INFO", logger="ich"):
        train.run(f1)
    assert "settings changed: threshold_method" in caplog.text
    assert json.loads(path.read_text())["threshold_method"] == "f1"
    assert {n: (run_dir / n).stat().st_mtime_ns for n in times} == times


@pytest.mark.slow
def test_a_stage2_setting_retrains_stage2_and_sequence_only(trained, caplog):
    """A stage-2-only setting retrains stage 2 (and the sequence stage, which starts from its
    features) and keeps stage 1. Slow (two stages retrained): the stamp rule itself is checked
    fast by test_stage_stamps_name_the_setting_and_input_that_changed."""
    from ich.steps import train

    cfg, run_dir, path = trained
    times = {name: (run_dir / name).stat().st_mtime_ns for name in (STAGE1_MODEL, STAGE2_MODEL, "sequence.keras")}
    wider = config.load(run_dir / "config.yaml", ["evaluate.threshold_method=f1", "model.fusion_dim=32"])
    with caplog.at_level("INFO", logger="ich"):
        train.run(wider)
    assert "training stage2 (settings changed: fusion_dim)" in caplog.text
    assert "stage1 is up to date" in caplog.text
    assert (run_dir / STAGE1_MODEL).stat().st_mtime_ns == times[STAGE1_MODEL]
    assert (run_dir / STAGE2_MODEL).stat().st_mtime_ns > times[STAGE2_MODEL]
    # The sequence stage starts from stage 2's features: it is retrained too.
    assert "training sequence (" in caplog.text
    assert (run_dir / "sequence.keras").stat().st_mtime_ns > times["sequence.keras"]


def test_stage_stamps_name_the_setting_and_input_that_changed(tmp_path):
    from ich.stamps import reason, record
    from ich.steps.train import stage_stamp
    from ich.training.stages import STAGES

    make_work(tmp_path / "work")
    cfg = tiny_cfg(tmp_path)
    (tmp_path / "run").mkdir()
    for stage in STAGES.values():
        (tmp_path / "run" / stage.file).write_text("model")
        record(stage_stamp(cfg, stage))
        assert reason(stage_stamp(cfg, stage)) is None
    lr = tiny_cfg(tmp_path, **{"train.finetune_lr": 0.01})
    assert reason(stage_stamp(lr, STAGES["stage1"])) == "settings changed: train.finetune_lr"
    # Runs recorded before train.monitor existed followed val_auc: the default is not recorded.
    assert "monitor" not in stage_stamp(cfg, STAGES["stage1"]).settings["train"]
    loss = tiny_cfg(tmp_path, **{"train.monitor": "val_loss"})   # another best model: retrain
    assert {reason(stage_stamp(loss, s)) for s in STAGES.values()} == {"settings changed: train.monitor"}
    backbone = tiny_cfg(tmp_path, **{"model.stage1_backbone": "EfficientNetV2B1"})
    assert reason(stage_stamp(backbone, STAGES["stage1"])) == "settings changed: backbone"
    assert reason(stage_stamp(backbone, STAGES["stage2"])) is None
    (tmp_path / "run" / STAGE1_MODEL).write_text("retrained")   # stage 2 starts from stage 1
    assert reason(stage_stamp(cfg, STAGES["stage2"])) == "input changed: stage1.keras"
    with (tmp_path / "work" / SPLITS_CSV).open("a") as f:
        f.write("ID_new,train,P99,0,0,0,0,0,0\n")
    assert "input changed: " in reason(stage_stamp(cfg, STAGES["stage1"]))
    assert "splits.csv" in reason(stage_stamp(cfg, STAGES["stage1"]))


def test_val_split_without_positives_is_a_clear_error(tmp_path):
    from ich.data.inputs import InputSpec
    from ich.steps.train import stage_data
    from ich.training.stages import STAGES

    work = make_work(tmp_path / "work")
    with (work / SPLITS_CSV).open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if row["split"] == "val":
            row.update(dict.fromkeys(LABELS, 0))
    write(work / SPLITS_CSV, rows)
    with pytest.raises(StepError, match="val split has no images positive for any"):
        cfg = tiny_cfg(tmp_path)
        stage_data(cfg, STAGES["stage2"], InputSpec.from_config(cfg))


def test_export_of_a_mixed_precision_model_is_float32(tmp_path):
    """GPU runs train under mixed_float16; the saved model must be plain float32 for CPU use."""
    import ich.models  # noqa: F401
    from ich.data.inputs import InputSpec
    from ich.models.online_augment import online_augmentation
    from ich.training.callbacks import BestModel
    from ich.training.stages import STAGES
    from ich.training.trainer import export

    cfg = tiny_cfg(tmp_path)
    spec = InputSpec.from_config(cfg)
    stage = STAGES["stage1"]
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        augmentation = online_augmentation(cfg["online_augment"], 0)
        model = stage.build(cfg, spec, augmentation)
        assert model.get_layer("backbone_EfficientNetV2B0").dtype_policy.name == "mixed_float16"
        best = tmp_path / "best.weights.h5"
        saver = BestModel(best)
        saver.set_model(model)
        saver.on_epoch_end(0, {"val_auc": 0.5})
        export(model, augmentation, best, tmp_path / STAGE1_MODEL, lambda: stage.build(cfg, spec, None))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    loaded = keras.saving.load_model(tmp_path / STAGE1_MODEL, compile=False)
    assert [layer.name for layer in loaded.layers][:2] == ["image", "backbone_EfficientNetV2B0"]
    assert all(layer.dtype_policy.name == "float32" for layer in loaded.layers)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded.get_layer("any").kernel),
                                  keras.ops.convert_to_numpy(model.get_layer("any").kernel))


def test_steps_per_epoch_cap_takes_a_fresh_random_subset_each_epoch():
    from ich.data.loading import Batches
    from ich.training.trainer import EpochCap

    images = np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1).repeat(3, axis=-1)
    inner = Batches(images, np.zeros((40, 1), "float32"), batch_size=4, shuffle=True, seed=0)
    capped = EpochCap(inner, 3)
    assert len(capped) == 3
    first = [tuple(capped[i][0][:, 0, 0, 0]) for i in range(3)]
    capped.on_epoch_end()
    second = [tuple(capped[i][0][:, 0, 0, 0]) for i in range(3)]
    assert first != second and len(capped) == 3


def test_phase_epochs_stage2_override():
    from ich.training.stages import STAGES, phase_epochs

    cfg = config.load(None, ["train.frozen_epochs=1", "train.finetune_epochs=8"])
    assert [phase_epochs(cfg, STAGES[s], p) for s in ("stage1", "stage2")
            for p in ("frozen", "finetune")] == [1, 8, 1, 8]
    cfg["train"]["stage2_finetune_epochs"] = 3
    assert phase_epochs(cfg, STAGES["stage1"], "finetune") == 8
    assert phase_epochs(cfg, STAGES["stage2"], "finetune") == 3


def test_stage2_batch_size_sets_stage_2_batches_only_and_keeps_old_stamps_while_null(tmp_path):
    from ich.data.inputs import InputSpec
    from ich.steps.train import stage_data, stage_stamp
    from ich.training.stages import STAGES

    make_work(tmp_path / "work")
    cfg = tiny_cfg(tmp_path)
    spec = InputSpec.from_config(cfg)
    assert cfg["train"]["stage2_batch_size"] is None
    before = {name: stage_stamp(cfg, STAGES[name]).settings for name in ("stage1", "stage2")}
    assert before["stage2"]["train"]["batch_size"] == 8
    cfg["train"]["stage2_batch_size"] = 3
    stage1 = stage_data(cfg, STAGES["stage1"], spec)[0]
    stage2 = stage_data(cfg, STAGES["stage2"], spec)[0]
    assert stage1.batch_size == 8 and len(stage1[0][0]) == 8      # 16 training images
    assert stage2.batch_size == 3 and len(stage2) == 3            # the 8 positives: 3 + 3 + 2
    after = {name: stage_stamp(cfg, STAGES[name]).settings for name in ("stage1", "stage2")}
    assert after["stage1"] == before["stage1"]
    assert after["stage2"]["train"]["batch_size"] == 3 and after["stage2"] != before["stage2"]


def test_check_resume_keeps_state_of_the_same_run_and_drops_that_of_a_resplit(tmp_path, caplog):
    """The resume rule in-process (the SIGKILL version is test_train_resume's slow test): the
    in-progress state of a stage is kept while its settings and inputs are those it started
    with, and dropped, with the reason logged, once splits.csv changes."""
    from ich.steps.train import stage_stamp
    from ich.training.stages import STAGES
    from ich.training.trainer import BACKUP_DIR, CHECKPOINT_DIR, check_resume

    work = make_work(tmp_path / "work")
    cfg = tiny_cfg(tmp_path)
    run_dir, stage = tmp_path / "run", STAGES["stage1"]
    best = run_dir / CHECKPOINT_DIR / "stage1_best.weights.h5"
    best.parent.mkdir(parents=True)
    best.write_bytes(b"weights")
    check_resume(stage, stage_stamp(cfg, stage), run_dir)       # no record: start fresh
    assert not best.exists() and (run_dir / BACKUP_DIR / "stage1.started.json").is_file()
    best.write_bytes(b"weights")
    check_resume(stage, stage_stamp(cfg, stage), run_dir)       # the same run: kept
    assert best.is_file()
    with (work / SPLITS_CSV).open("a") as f:
        f.write("ID_new,train,P99,ST99,0,0,0,0,0,0\n")
    with caplog.at_level("WARNING", logger="ich"):
        check_resume(stage, stage_stamp(cfg, stage), run_dir)
    assert "other settings or data (input changed: " in caplog.text and "splits.csv" in caplog.text
    assert not best.exists()
