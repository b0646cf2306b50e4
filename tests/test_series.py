"""Series of slices (ich.data.series): ordering, packing and study labels, by hand."""

import numpy as np
import pytest

from ich.data.series import PAD_LABEL, pack, series_labels, series_runs, unpack


def test_runs_order_by_position_and_rows_without_series_stand_alone():
    ids = ["b", "a", "b", "", "a", "b"]
    pos = [3.0, -1.0, 1.0, 0.0, -2.0, np.nan]   # NaN sorts as 0
    runs = series_runs(ids, pos)
    assert [list(r) for r in runs] == [[3], [4, 1], [5, 2, 0]]


def test_ties_keep_table_order():
    assert [list(r) for r in series_runs(["s", "s", "s"], [1.0, 1.0, 0.0])] == [[2, 0, 1]]


def test_pack_pads_and_masks_and_unpack_inverts():
    values = np.arange(10, dtype=np.float32).reshape(5, 2)
    runs = [np.array([3, 1]), np.array([0, 2, 4])]
    packed, mask = pack(values, runs)
    assert packed.shape == (2, 3, 2)
    np.testing.assert_array_equal(packed[0], [[6, 7], [2, 3], [0, 0]])
    np.testing.assert_array_equal(packed[1], [[0, 1], [4, 5], [8, 9]])
    np.testing.assert_array_equal(mask, [[1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(unpack(packed, runs, 5), values)
    labels, _ = pack(values, runs, length=4, fill=PAD_LABEL)
    assert labels.shape == (2, 4, 2) and np.all(labels[0, 2:] == PAD_LABEL)


def test_pack_refuses_to_cut_a_series():
    with pytest.raises(ValueError, match="3 slices"):
        pack(np.zeros((3, 1)), [np.arange(3)], length=2)


def test_series_label_is_any_slice_positive():
    labels = np.array([[0, 1], [1, 0], [0, 0]], np.float32)
    out = series_labels(labels, [np.array([0, 1]), np.array([2])])
    np.testing.assert_array_equal(out, [[1, 1], [0, 0]])
