"""Offline augmentation: the copy plan (hand-computed), the pipeline, and the augment step."""

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from ich import config
from ich.data.offline_augment import augment_copy, copy_seed, offline_pipeline, plan_copies
from ich.cli import StepError
from ich.constants import AUGMENTED_CSV, AUGMENTED_DIR, IMAGES_CSV, LABELS, PNG_DIR, SPLITS_CSV
from tiny_workdir import ROWS, SIZE, image_for, make_workdir

# Label tuples in LABELS order (any, epidural, intraparenchymal, intraventricular, subarachnoid,
# subdural).
EPI = (1, 1, 0, 0, 0, 0)
SDH = (1, 0, 0, 0, 0, 1)
EPI_SDH = (1, 1, 0, 0, 0, 1)
NEG = (0, 0, 0, 0, 0, 0)


def table(rows: dict) -> pd.DataFrame:
    return pd.DataFrame([{"image_id": k, **dict(zip(LABELS, v))} for k, v in rows.items()])


def copies_per_source(plan: pd.DataFrame) -> dict:
    return plan.groupby("source_id").size().to_dict()


def final_counts(source: pd.DataFrame, plan: pd.DataFrame) -> dict:
    return (source[list(LABELS)].sum() + plan[list(LABELS)].sum()).to_dict()


def test_plan_counts_copies_of_multilabel_images_for_every_label():
    # epidural 2, subdural 3. Epidural first: A and B get one copy each (cap 1) -> epidural 4;
    # A's copy also carries subdural -> subdural 4 = target, so subdural needs no copy.
    src = table({"A": EPI_SDH, "B": EPI, "C": SDH, "D": SDH, "N": NEG})
    plan = plan_copies(src, target_per_label=4, max_copies_per_image=1, seed=0)
    assert copies_per_source(plan) == {"A": 1, "B": 1}
    counts = final_counts(src, plan)
    assert counts["epidural"] == 4 and counts["subdural"] == 4 and counts["any"] == 6


def test_plan_fills_the_rarest_label_first():
    # subdural (2) is rarer than epidural (3): subdural first gives A and D a copy (cap 1),
    # which also lifts epidural to 4 = target. Epidural first would have copied B or C
    # (with seed 0 it picks C, so this test fails for a fixed label order).
    src = table({"A": EPI_SDH, "B": EPI, "C": EPI, "D": SDH})
    plan = plan_copies(src, target_per_label=4, max_copies_per_image=1, seed=0)
    assert copies_per_source(plan) == {"A": 1, "D": 1}


def test_plan_honours_the_cap_per_image():
    # Two epidural images, cap 3: 6 copies at most, so epidural stops at 8 < target 10.
    src = table({"A": EPI, "B": EPI, "N": NEG})
    plan = plan_copies(src, target_per_label=10, max_copies_per_image=3, seed=0)
    assert copies_per_source(plan) == {"A": 3, "B": 3}
    assert sorted(plan.loc[plan["source_id"] == "A", "image_id"]) == ["A__aug1", "A__aug2", "A__aug3"]
    assert plan["copy"].tolist() == [1, 2, 3, 1, 2, 3]


def test_plan_spreads_copies_round_robin():
    # Three epidural images need 4 copies: a full round (1 each) plus one more.
    src = table({"A": EPI, "B": EPI, "C": EPI})
    plan = plan_copies(src, target_per_label=7, max_copies_per_image=5, seed=3)
    assert sorted(copies_per_source(plan).values()) == [1, 1, 2]
    # Need 2 of 3: two different images, one copy each.
    plan = plan_copies(src, target_per_label=5, max_copies_per_image=5, seed=3)
    assert sorted(copies_per_source(plan).values()) == [1, 1]


def test_plan_is_empty_when_targets_are_met():
    src = table({"A": EPI_SDH, "B": EPI_SDH, "N": NEG})
    plan = plan_copies(src, target_per_label=2, max_copies_per_image=5, seed=0)
    assert len(plan) == 0
    assert list(plan.columns) == ["image_id", "source_id", "copy", *LABELS]


def test_plan_copies_labels_from_the_source_and_depends_only_on_seed():
    src = table({"A": EPI_SDH, "B": EPI, "C": SDH, "N": NEG})
    plan = plan_copies(src, target_per_label=5, max_copies_per_image=2, seed=7)
    for _, row in plan.iterrows():
        source = src.set_index("image_id").loc[row["source_id"]]
        assert [row[name] for name in LABELS] == [source[name] for name in LABELS]
        assert row["image_id"] == f"{row['source_id']}__aug{row['copy']}"
    pd.testing.assert_frame_equal(plan, plan_copies(src, 5, 2, seed=7))


def params(**changes) -> dict:
    return {**config.load()["augment"], **changes}


def test_pipeline_is_deterministic_per_seed_and_keeps_shape():
    image = image_for("ID_x", 48)
    first = augment_copy(offline_pipeline(params(), 0), image, seed=11)
    again = augment_copy(offline_pipeline(params(), 5), image, seed=11)
    other = augment_copy(offline_pipeline(params(), 0), image, seed=12)
    assert first.shape == image.shape and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_copy_never_equals_its_source():
    # Only a horizontal flip, half the time: redraws must still yield the flipped image.
    only_flip = params(vflip_p=0.0, rotate_p=0.0, brightness_contrast_p=0.0, blur_p=0.0,
                       elastic_p=0.0)
    image = image_for("ID_x", 16)
    pipeline = offline_pipeline(only_flip, 0)
    for seed in range(6):
        np.testing.assert_array_equal(augment_copy(pipeline, image, seed), image[:, ::-1])


def test_copy_seed_is_stable_and_distinct():
    assert copy_seed(42, "ID_a", 1) == copy_seed(42, "ID_a", 1)
    assert len({copy_seed(42, "ID_a", k) for k in range(1, 50)}) == 49
    assert copy_seed(42, "ID_a", 1) != copy_seed(43, "ID_a", 1)


@pytest.fixture
def cfg(tmp_path):
    work = make_workdir(tmp_path)
    return config.load(overrides=[f"paths.work_dir={work}", "augment.target_per_label=4",
                                  "augment.max_copies_per_image=2", "augment.workers=1"])


def read_rgb(path):
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def test_step_augments_train_only_and_leaves_val_test_alone(cfg):
    from ich.steps import augment as step

    work = Path(cfg["paths"]["work_dir"])
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (work / PNG_DIR).iterdir()}
    out = step.run(cfg)
    assert out == work / AUGMENTED_CSV
    made = pd.read_csv(out)
    assert list(made.columns) == ["image_id", "source_id", "path", *LABELS, "target", "series_id", "position"]
    train_ids = {k for k, (split, _) in ROWS.items() if split == "train"}
    assert set(made["source_id"]) <= train_ids and len(made) > 0
    # train: epidural 2 (a, b), subdural 2 (a, c), intraparenchymal 1 (d); target 4, cap 2.
    counts = {name: int(made[name].sum()) for name in LABELS}
    assert counts["intraparenchymal"] == 2          # d, capped at 2 -> 3 < 4
    assert counts["epidural"] >= 2 and counts["subdural"] >= 2
    for _, row in made.iterrows():
        image = read_rgb(work / row["path"])
        assert image.shape == (SIZE, SIZE, 3)
        assert not np.array_equal(image, image_for(row["source_id"]))
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (work / PNG_DIR).iterdir()}
    assert after == before
    assert not any(name.startswith(("ID_v", "ID_t")) for name in os.listdir(work / AUGMENTED_DIR))


def test_step_resumes_and_skips(cfg, caplog):
    from ich.steps import augment as step

    work = Path(cfg["paths"]["work_dir"])
    step.run(cfg)
    made = pd.read_csv(work / AUGMENTED_CSV)
    first = work / made["path"].iloc[0]
    original = first.read_bytes()
    caplog.set_level("INFO", logger="ich")
    step.run(cfg)                                  # complete: skipped
    assert "up to date" in caplog.text
    first.unlink()
    (work / AUGMENTED_CSV).unlink()                # as if the run was killed before the end
    step.run(cfg)
    assert first.read_bytes() == original          # the same pixels, from the same seed
    pd.testing.assert_frame_equal(pd.read_csv(work / AUGMENTED_CSV), made)


def test_step_output_does_not_depend_on_worker_count(cfg, monkeypatch):
    from ich.steps import augment as step

    monkeypatch.setattr(step, "_SOURCES_PER_TASK", 1)   # several tasks ...
    monkeypatch.setattr(step, "_COPIES_PER_WORKER", 1)  # ... and worth a pool: it is used
    work = Path(cfg["paths"]["work_dir"])
    step.run(cfg)
    one = {p.name: p.read_bytes() for p in (work / AUGMENTED_DIR).glob("*.png")}
    config.set_key(cfg, "augment.workers", 2)
    step.run(cfg, force=True)
    two = {p.name: p.read_bytes() for p in (work / AUGMENTED_DIR).glob("*.png")}
    assert one == two and len(one) > 0


def test_step_disabled_writes_header_only(cfg):
    from ich.steps import augment as step

    config.set_key(cfg, "augment.enabled", False)
    out = step.run(cfg)
    assert out.read_text().strip() == ",".join(["image_id", "source_id", "path", *LABELS, "target", "series_id", "position"])


def test_step_without_splits_says_which_step_to_run(cfg):
    from ich.steps import augment as step

    (Path(cfg["paths"]["work_dir"]) / SPLITS_CSV).unlink()
    with pytest.raises(StepError, match="ich split"):
        step.run(cfg)


def test_step_records_an_unreadable_source_and_goes_on(cfg):
    from ich.steps import augment as step

    work = Path(cfg["paths"]["work_dir"])
    (work / PNG_DIR / "ID_d.png").write_bytes(b"not a png")
    made = pd.read_csv(step.run(cfg))
    assert "ID_d" not in set(made["source_id"]) and len(made) > 0
    failures = pd.read_csv(work / AUGMENTED_DIR / step.FAILURES_FILE)
    assert failures["image_id"].tolist() == ["ID_d"]


def test_with_neighbouring_slices_a_copy_and_its_neighbours_are_transformed_alike(tmp_path):
    """input.offsets [-1, 0, 1]: each copy comes with its neighbours' copies under the same
    transform (a flip here), as context rows of a series of its own; loading gathers them."""
    from ich.data.inputs import InputSpec
    from ich.data.loading import load_split
    from ich.steps import augment as step

    work = make_workdir(tmp_path)
    images = pd.read_csv(work / IMAGES_CSV)
    images["series_id"] = "SE1"                       # the six train images: one series
    images["position"] = np.arange(len(images), dtype=float)[::-1]   # in reverse table order
    images.to_csv(work / IMAGES_CSV, index=False)
    cfg = config.load(overrides=[f"paths.work_dir={work}", "augment.target_per_label=4",
                                 "augment.max_copies_per_image=1", "augment.workers=1",
                                 "input.offsets=[-1, 0, 1]", "augment.hflip_p=1.0",
                                 "augment.vflip_p=0.0", "augment.rotate_p=0.0",
                                 "augment.brightness_contrast_p=0.0", "augment.blur_p=0.0",
                                 "augment.elastic_p=0.0"])
    made = pd.read_csv(step.run(cfg))
    copies = made[made["target"] == 1]
    assert len(copies) and len(made) == 3 * len(copies)
    train = pd.read_csv(work / "splits.csv")
    train = train[train["split"] == "train"]
    order = list(images.set_index("image_id").loc[train["image_id"], "position"].sort_values().index)
    for copy in copies.itertuples():
        rows = made[made["series_id"] == copy.image_id].sort_values("position")
        assert list(rows["position"]) == [-1.0, 0.0, 1.0] and list(rows["target"]) == [0, 1, 0]
        k = order.index(copy.source_id)
        expected = [order[max(k - 1, 0)], copy.source_id, order[min(k + 1, len(order) - 1)]]
        assert list(rows["source_id"]) == expected
        for row in rows.itertuples():
            np.testing.assert_array_equal(read_rgb(work / row.path),
                                          read_rgb(work / PNG_DIR / f"{row.source_id}.png")[:, ::-1])
    spec = InputSpec.from_config(config.load(overrides=["input.offsets=[-1, 0, 1]", "model.image_size=32"]))
    data = load_split(work, "train", spec, "png", 1, include_augmented=True)
    table = data.table
    first = copies.iloc[0]
    row = int(np.flatnonzero(table["image_id"] == first["image_id"])[0])
    assert row in set(data.targets)
    gathered = table["image_id"].to_numpy()[data.neighbours[row]]
    rows = made[made["series_id"] == first["image_id"]].sort_values("position")
    assert list(gathered) == list(rows["image_id"])
