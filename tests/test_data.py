"""Data loading: split tables, PNG decoding, the packed cache, Batches, label weights."""

import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from ich.data import loading
from ich.constants import AUGMENTED_CSV, LABELS, PNG_DIR, SPLITS_CSV
from tiny_workdir import SIZE, image_for, make_workdir


@pytest.fixture
def work(tmp_path) -> Path:
    return make_workdir(tmp_path)


def add_augmented(work: Path) -> None:
    (work / "augmented").mkdir()
    cv2.imwrite(str(work / "augmented/ID_a__aug1.png"), image_for("ID_a__aug1"))
    row = {"image_id": "ID_a__aug1", "source_id": "ID_a", "path": "augmented/ID_a__aug1.png",
           **dict(zip(LABELS, (1, 1, 0, 0, 0, 1)))}
    pd.DataFrame([row]).to_csv(work / AUGMENTED_CSV, index=False)


def test_split_table_joins_paths_and_adds_augmented_rows_to_train_only(work):
    add_augmented(work)
    train = loading.split_table(work, "train", include_augmented=True)
    assert list(train.columns) == ["image_id", "path", *LABELS, "study_id", "series_id",
                                   "position", "target"]
    assert train["target"].tolist() == [1] * 7
    assert train["image_id"].tolist() == ["ID_a", "ID_b", "ID_c", "ID_d", "ID_e", "ID_f", "ID_a__aug1"]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in train["path"])
    assert train.loc[6, "path"] == str(work / "augmented/ID_a__aug1.png")
    assert train.loc[0, list(LABELS)].tolist() == [1, 1, 0, 0, 0, 1]
    assert len(loading.split_table(work, "train", include_augmented=False)) == 6
    val = loading.split_table(work, "val", include_augmented=True)
    assert val["image_id"].tolist() == ["ID_v1", "ID_v2"]


def test_split_table_errors_name_the_file_and_step(work):
    with pytest.raises(ValueError, match="unknown split"):
        loading.split_table(work, "training", include_augmented=False)
    (work / SPLITS_CSV).unlink()
    with pytest.raises(FileNotFoundError, match=r"splits\.csv.*ich split"):
        loading.split_table(work, "train", include_augmented=False)


def test_load_array_decodes_in_order_and_resizes(work):
    paths = [work / PNG_DIR / f"{i}.png" for i in ("ID_c", "ID_a")]
    array = loading.load_array(paths, SIZE, workers=2)
    assert array.shape == (2, SIZE, SIZE, 3) and array.dtype == np.uint8
    np.testing.assert_array_equal(array[0], image_for("ID_c"))
    np.testing.assert_array_equal(array[1], image_for("ID_a"))
    small = loading.load_array(paths, 16, workers=1)
    expected = cv2.resize(image_for("ID_c"), (16, 16), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(small[0], expected)


def test_load_array_names_a_bad_file(work):
    bad = work / PNG_DIR / "ID_b.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="ID_b.png"):
        loading.load_array([work / PNG_DIR / "ID_a.png", bad], SIZE, workers=2)
    with pytest.raises(ValueError, match="nowhere.png"):
        loading.load_array([work / "nowhere.png"], SIZE, workers=1)


def test_packed_cache_is_built_reused_and_rebuilt(work):
    table = loading.split_table(work, "train", include_augmented=False)
    images = loading.packed(work, "train", table, SIZE, workers=2)
    assert isinstance(images, np.memmap) and images.shape == (6, SIZE, SIZE, 3)
    assert not images.flags.writeable
    np.testing.assert_array_equal(images, loading.load_array(table["path"].tolist(), SIZE, 1))
    npy = work / "packed" / f"train_{SIZE}.npy"
    built = npy.stat().st_mtime_ns

    loading.packed(work, "train", table, SIZE)                     # same ids: reused
    assert npy.stat().st_mtime_ns == built

    fewer = table.iloc[1:].reset_index(drop=True)               # other ids: rebuilt
    again = loading.packed(work, "train", fewer, SIZE)
    assert again.shape[0] == 5
    np.testing.assert_array_equal(again[0], image_for("ID_b"))
    rebuilt = npy.stat().st_mtime_ns
    assert rebuilt > built

    # A rerun of preprocess (its record rewritten) means new PNGs: rebuilt again.
    record = work / ".done" / "preprocess.json"
    record.parent.mkdir(exist_ok=True)
    record.write_text('{"finished": "later"}')
    loading.packed(work, "train", fewer, SIZE)
    assert npy.stat().st_mtime_ns > rebuilt
    again = npy.stat().st_mtime_ns
    loading.packed(work, "train", fewer, SIZE)
    assert npy.stat().st_mtime_ns == again
    assert not list((work / "packed").glob(".*tmp*"))


def test_batches_gather_neighbouring_slices_into_channels():
    from ich.data.inputs import InputSpec

    # Five slices of one series given out of order; each slice's pixels hold its rank.
    positions = [20.0, 0.0, 10.0, 40.0, 30.0]
    rank = np.argsort(np.argsort(positions))
    images = np.zeros((5, 2, 2, 3), np.uint8)
    for i, r in enumerate(rank):
        images[i] = [10 * r, 10 * r + 1, 10 * r + 2]
    spec = InputSpec(image_size=2, windows={"a": (0, 1), "b": (0, 1), "c": (0, 1)},
                     channels=("a", "b", "c"), offsets=(-1, 0, 1))
    from ich.data.inputs import neighbour_rows
    neighbours = neighbour_rows(["S"] * 5, positions, spec.offsets)
    batches = loading.Batches(images, np.zeros(5), 5, shuffle=False, seed=0, neighbours=neighbours,
                              spec=spec)
    x, _ = batches[0]
    assert x.shape == (5, 2, 2, 9)
    got = np.rint(x[:, 0, 0] * 255).astype(int)
    # The slice at position 0 (row 1, rank 0): the edge repeats below it.
    np.testing.assert_array_equal(got[1], [0, 1, 2, 0, 1, 2, 10, 11, 12])
    # Row 0 (rank 2): ranks 1, 2, 3, all three windows of each.
    np.testing.assert_array_equal(got[0], [10, 11, 12, 20, 21, 22, 30, 31, 32])
    one = InputSpec(image_size=2, windows=spec.windows, channels=spec.channels, offsets=(-1, 0, 1),
                    slice_channels="b")
    x, _ = loading.Batches(images, np.zeros(5), 5, shuffle=False, seed=0, neighbours=neighbours,
                           spec=one)[0]
    np.testing.assert_array_equal(np.rint(x[0, 0, 0] * 255), [11, 21, 31])


def test_batches_context_batch_equals_a_hand_built_stack():
    from ich.data.inputs import InputSpec

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (12, 4, 4, 3), dtype=np.uint8)
    neighbours = np.array([[max(i - 1, 0), i, min(i + 1, 11)] for i in range(12)])
    spec = InputSpec(image_size=4, windows={"a": (0, 1), "b": (0, 1), "c": (0, 1)},
                     channels=("a", "b", "c"), offsets=(-1, 0, 1))
    batches = loading.Batches(images, np.arange(12.0), 5, shuffle=True, seed=4,
                              neighbours=neighbours, spec=spec, indices=np.arange(1, 11))
    for i in range(len(batches)):
        x, y = batches[i]
        rows = y[:, 0].astype(int)  # the label of row r is r
        hand = np.concatenate([images[neighbours[rows, k]] for k in range(3)], axis=-1)
        # v * float32(1 / 255), as before the gather was rewritten (division rounds differently)
        np.testing.assert_array_equal(x, hand.astype(np.float32) * np.float32(1 / 255))


def test_batches_shapes_range_len_and_last_partial_batch():
    images = np.arange(7 * 2 * 2 * 3, dtype=np.uint8).reshape(7, 2, 2, 3)
    labels = np.arange(7, dtype=np.float32)[:, None]
    batches = loading.Batches(images, labels, batch_size=3, shuffle=False, seed=0)
    assert len(batches) == 3 == math.ceil(7 / 3)
    sizes = [len(batches[i][0]) for i in range(len(batches))]
    assert sizes == [3, 3, 1]
    x, y = batches[2]
    assert x.dtype == np.float32 and y.dtype == np.float32
    np.testing.assert_allclose(x, images[6:] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y, [[6.0]])
    assert 0.0 <= x.min() and x.max() <= 1.0
    with pytest.raises(IndexError):
        batches[3]


def epoch(batches) -> list:
    return [batches[i][1][:, 0].tolist() for i in range(len(batches))]


def test_batches_shuffle_is_deterministic_per_seed_and_epoch():
    images = np.zeros((10, 1, 1, 3), np.uint8)
    labels = np.arange(10, dtype=np.float32)
    a = loading.Batches(images, labels, 4, shuffle=True, seed=5)
    b = loading.Batches(images, labels, 4, shuffle=True, seed=5)
    first = epoch(a)
    assert first == epoch(b)
    assert sorted(sum(first, [])) == list(range(10))          # every row once per epoch
    a.on_epoch_end()
    second = epoch(a)
    assert second != first and sorted(sum(second, [])) == list(range(10))
    b.on_epoch_end()
    assert epoch(b) == second
    assert epoch(loading.Batches(images, labels, 4, shuffle=True, seed=6)) != first


def test_batches_read_a_memmap_subset_and_from_paths(work):
    table = loading.split_table(work, "train", include_augmented=False)
    labels = table[list(LABELS)].to_numpy(np.float32)
    images = loading.packed(work, "train", table, SIZE)
    subset = loading.Batches(images, labels, 2, shuffle=False, seed=0, indices=np.array([3, 1]))
    assert len(subset) == 1
    x, y = subset[0]
    np.testing.assert_array_equal(y, labels[[1, 3]])
    np.testing.assert_allclose(x * 255.0, images[[1, 3]], atol=1e-3)
    lazy = loading.Batches.from_paths(table["path"], labels, SIZE, 4, shuffle=True, seed=1,
                                   decode_workers=2)
    eager = loading.Batches(images, labels, 4, shuffle=True, seed=1)
    for i in range(len(eager)):
        np.testing.assert_array_equal(lazy[i][0], eager[i][0])
        np.testing.assert_array_equal(lazy[i][1], eager[i][1])


def test_batches_feed_keras_fit():
    import keras

    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 1] * 5, np.float32)
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, outputs)
    model.compile("adam", "binary_crossentropy")
    batches = loading.Batches(images, labels, 4, shuffle=True, seed=0)
    history = model.fit(batches, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2
    # Keras calls on_epoch_end after each epoch (and once more when fit starts): reshuffled.
    assert batches.epoch >= 2
