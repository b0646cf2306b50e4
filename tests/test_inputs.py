"""ich.data.inputs: the input description and neighbouring slices, against hand-built stacks."""

import numpy as np
import pytest

from ich import config
from ich.data.inputs import InputSpec, neighbour_rows

WINDOWS = {"blood": (80.0, 200.0), "brain": (40.0, 80.0), "bone": (600.0, 2800.0)}


def spec(**kw) -> InputSpec:
    return InputSpec(image_size=8, windows=WINDOWS, channels=("blood", "brain", "bone"), **kw)


def test_default_is_one_slice_three_windows_and_round_trips_json():
    default = InputSpec.from_config(config.load(None, []))
    assert default.offsets == (0,) and default.n_channels == 3 and not default.has_context
    assert default.png_windows == [WINDOWS["blood"], WINDOWS["brain"], WINDOWS["bone"]]
    nine = spec(offsets=(-1, 0, 1))
    assert InputSpec.from_json(nine.to_json()) == nine and nine.n_channels == 9


def test_neighbours_follow_position_not_table_order_and_repeat_at_edges():
    # Two series interleaved, positions out of order (a tilted series sorts the same way once
    # projected on its normal, which ich.data.dicom.slice_position does).
    series = ["A", "B", "A", "A", "B", ""]
    positions = [5.0, 1.0, -5.0, 0.0, 0.0, 3.0]
    got = neighbour_rows(series, positions, (-1, 0, 1))
    # Series A by position: row 2 (-5), row 3 (0), row 0 (5).
    np.testing.assert_array_equal(got[2], [2, 2, 3])
    np.testing.assert_array_equal(got[3], [2, 3, 0])
    np.testing.assert_array_equal(got[0], [3, 0, 0])
    # Series B: row 4 (0), row 1 (1).
    np.testing.assert_array_equal(got[4], [4, 4, 1])
    np.testing.assert_array_equal(got[1], [4, 1, 1])
    # No series: a series of its own.
    np.testing.assert_array_equal(got[5], [5, 5, 5])
    two = neighbour_rows(series, positions, (-2, 0))
    np.testing.assert_array_equal(two[0], [2, 0])


def test_assemble_equals_a_hand_built_stack():
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)   # (N, offsets, S, S, RGB)
    nine = spec(offsets=(-1, 0, 1)).assemble(stack)
    hand = np.concatenate([stack[:, 0], stack[:, 1], stack[:, 2]], axis=-1)
    np.testing.assert_array_equal(nine, hand)
    brain = spec(offsets=(-1, 0, 1), slice_channels="brain").assemble(stack)
    np.testing.assert_array_equal(brain, np.stack([stack[:, k, ..., 1] for k in range(3)], axis=-1))
    with pytest.raises(ValueError, match="expected"):
        spec().assemble(stack)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.int16])  # int16: the numpy path
def test_gather_equals_a_hand_built_stack(dtype):
    rng = np.random.default_rng(1)
    slices = rng.integers(0, 256, (6, 8, 8, 3)).astype(dtype)        # (U, S, S, RGB)
    index = np.array([[0, 1, 2], [2, 2, 5], [4, 3, 3]])               # repeats, out of order
    nine = spec(offsets=(-1, 0, 1)).gather(slices, index)
    hand = np.stack([np.concatenate([slices[a], slices[b], slices[c]], axis=-1) for a, b, c in index])
    assert nine.dtype == dtype and nine.shape == (3, 8, 8, 9)
    np.testing.assert_array_equal(nine, hand)
    bone = spec(offsets=(0, 1, -1), slice_channels="bone").gather(slices, index)
    np.testing.assert_array_equal(bone, np.stack([slices[row][..., 2].transpose(1, 2, 0) for row in index]))
    two = spec(offsets=(-2, 0)).gather(slices, index[:, :2])
    np.testing.assert_array_equal(two, hand[..., :6])
    single = spec().gather(slices, index[:, :1])
    np.testing.assert_array_equal(single, slices[index[:, 0]])
    np.testing.assert_array_equal(spec(slice_channels="brain").gather(slices, index[:, :1]),
                                  slices[index[:, 0]][..., 1:2])
    assert spec(offsets=(-1, 0, 1)).gather(slices, np.zeros((0, 3), int)).shape == (0, 8, 8, 9)
    with pytest.raises(ValueError, match="index"):
        spec(offsets=(-1, 0, 1)).gather(slices, index[:, :2])


def test_bad_descriptions_name_the_key():
    with pytest.raises(ValueError, match="offsets"):
        spec(offsets=(-1, 1))
    with pytest.raises(ValueError, match="slice_channels"):
        spec(slice_channels="lung")
    with pytest.raises(config.ConfigError, match="offsets"):
        config.load(None, ["input.offsets=[1, 1, 0]"])
