"""The input description: what one model input is made of, read by every layer that builds one.

In: the config (preprocess.windows and .channels: the three windows each PNG holds as RGB;
model.image_size; input.offsets: which neighbouring slices of the same series join the target
slice; input.slice_channels: every window of each slice, or one named window per slice) or the
`input` record of a run's cascade.json. Out: an `InputSpec`, its JSON record, and pure array
functions: `neighbour_rows` (which rows of a table are each row's neighbours) and
`InputSpec.assemble` (gathered uint8 slices -> the model's channels).

Default: offsets [0] and all windows: today's one slice, three windows, three channels. The
1st-place RSNA layout is offsets [-1, 0, 1] with slice_channels set to one window (3 channels);
offsets [-1, 0, 1] with all windows gives 9 channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ich.data.series import series_runs

ALL_WINDOWS = "all"
PNG_CHANNELS = 3  # a preprocessed PNG is RGB: one window per channel
# Element types cv2.mixChannels interleaves (the fast path of InputSpec.gather).
MIX_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))


@dataclass(frozen=True)
class InputSpec:
    """Windows, channel layout, neighbouring-slice offsets and image size of a model input."""

    image_size: int
    windows: dict          # name -> (center, width) in HU
    channels: tuple        # the window of each PNG channel (R, G, B)
    offsets: tuple = (0,)  # slice offsets along the series, 0 = the target slice
    slice_channels: str = ALL_WINDOWS  # "all", or the one window taken from every slice

    def __post_init__(self):
        if len(self.channels) != PNG_CHANNELS:
            raise ValueError(f"input: channels {list(self.channels)} must name {PNG_CHANNELS} windows (R, G, B)")
        for name in self.channels:
            if name not in self.windows:
                raise ValueError(f"input: channel window {name!r} is not defined; windows: {sorted(self.windows)}")
        if 0 not in self.offsets or len(set(self.offsets)) != len(self.offsets):
            raise ValueError(f"input.offsets {list(self.offsets)} must hold 0 (the target slice) once, "
                             "and no offset twice")
        if self.slice_channels != ALL_WINDOWS and self.slice_channels not in self.channels:
            raise ValueError(f"input.slice_channels {self.slice_channels!r} must be 'all' or one of "
                             f"the PNG channels {list(self.channels)}")

    @classmethod
    def from_config(cls, cfg: dict) -> "InputSpec":
        """The input description of an experiment config."""
        pre, inp = cfg["preprocess"], cfg["input"]
        return cls(image_size=int(cfg["model"]["image_size"]),
                   windows={k: tuple(float(x) for x in v) for k, v in pre["windows"].items()
                            if k in pre["channels"]},
                   channels=tuple(pre["channels"]), offsets=tuple(int(o) for o in inp["offsets"]),
                   slice_channels=str(inp["slice_channels"]))

    @classmethod
    def from_json(cls, record: dict) -> "InputSpec":
        """Rebuild from `to_json()` (the `input` key of cascade.json)."""
        return cls(image_size=int(record["image_size"]),
                   windows={k: tuple(float(x) for x in v) for k, v in record["windows"].items()},
                   channels=tuple(record["channels"]), offsets=tuple(int(o) for o in record["offsets"]),
                   slice_channels=str(record["slice_channels"]))

    def to_json(self) -> dict:
        """A JSON-ready record of every field."""
        return {"image_size": self.image_size,
                "windows": {k: list(v) for k, v in self.windows.items()},
                "channels": list(self.channels), "offsets": list(self.offsets),
                "slice_channels": self.slice_channels}

    @property
    def png_windows(self) -> list[tuple[float, float]]:
        """(center, width) of each PNG channel, in channel order (what preprocessing writes)."""
        return [tuple(self.windows[name]) for name in self.channels]

    @property
    def picked(self) -> list[int]:
        """The PNG channels taken from each slice."""
        if self.slice_channels == ALL_WINDOWS:
            return list(range(PNG_CHANNELS))
        return [self.channels.index(self.slice_channels)]

    @property
    def n_channels(self) -> int:
        """Channels of the model input: offsets x channels taken per slice."""
        return len(self.offsets) * len(self.picked)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The model input shape (S, S, C), channels last."""
        return (self.image_size, self.image_size, self.n_channels)

    @property
    def has_context(self) -> bool:
        """True when the input holds slices other than the target."""
        return self.offsets != (0,)

    def assemble(self, stack: np.ndarray) -> np.ndarray:
        """(N, len(offsets), S, S, 3) slices of each input -> (N, S, S, C), same dtype.

        Channels run offset by offset in `offsets` order, the picked windows inside each.
        """
        stack = np.asarray(stack)
        if stack.ndim != 5 or stack.shape[1] != len(self.offsets) or stack.shape[-1] != PNG_CHANNELS:
            raise ValueError(f"assemble: expected (N, {len(self.offsets)}, S, S, {PNG_CHANNELS}), "
                             f"got {stack.shape}")
        n, k = stack.shape[:2]
        return self.gather(stack.reshape(n * k, *stack.shape[2:]), np.arange(n * k).reshape(n, k))

    def gather(self, slices: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Model inputs (N, S, S, C) from `slices` (U, S, S, 3) and `index` (N, len(offsets)):
        input i is made of slices[index[i, 0]], slices[index[i, 1]], ... (channels as in
        `assemble`). Same dtype as `slices`.

        The channel interleave is the costly part of a context input: as a numpy transpose
        it copies 1 or 3 bytes at a time (about 10x the cost of the gather itself), so
        uint8/float32 slices go through cv2.mixChannels, one call per input.
        """
        slices = np.asarray(slices)
        index = np.asarray(index, dtype=np.int64)
        if slices.ndim != 4 or slices.shape[-1] != PNG_CHANNELS:
            raise ValueError(f"gather: expected slices (U, S, S, {PNG_CHANNELS}), got {slices.shape}")
        if index.ndim != 2 or index.shape[1] != len(self.offsets):
            raise ValueError(f"gather: expected index (N, {len(self.offsets)}), got {index.shape}")
        picked = self.picked
        if index.shape[1] == 1 and len(picked) == PNG_CHANNELS:
            return slices[index[:, 0]]  # one slice, every window: the slice itself
        n, k, (h, w) = len(index), index.shape[1], slices.shape[1:3]
        if slices.dtype not in MIX_DTYPES or not len(index):
            stack = slices[index][..., picked]  # (N, K, S, S, P)
            return np.ascontiguousarray(stack.transpose(0, 2, 3, 1, 4).reshape(n, h, w, k * len(picked)))
        slices = np.ascontiguousarray(slices)
        out = np.empty((n, h, w, k * len(picked)), slices.dtype)
        # (source channel across the K slices given, destination channel) pairs, flattened.
        pairs = [v for j in range(k) for p, c in enumerate(picked)
                 for v in (PNG_CHANNELS * j + c, len(picked) * j + p)]
        for i, rows in enumerate(index):
            cv2.mixChannels([slices[r] for r in rows], [out[i]], pairs)
        return out


def neighbour_rows(series_ids, positions, offsets) -> np.ndarray:
    """(N, len(offsets)) row indices: for each row, the rows at `offsets` along its series.

    Rows are ordered inside a series by `positions` (ImagePositionPatient on the slice normal,
    so tilted series sort right), ties kept in table order. At a series' edges the edge slice
    repeats. A row without a series id (empty or NaN) is a series of its own: every offset
    points at itself.
    """
    offsets = np.asarray(list(offsets), dtype=np.int64)
    n = len(np.asarray(series_ids, dtype=object))
    out = np.repeat(np.arange(n)[:, None], len(offsets), axis=1)
    for run in series_runs(series_ids, positions):
        rank = np.arange(len(run))
        for j, offset in enumerate(offsets):
            out[run, j] = run[np.clip(rank + offset, 0, len(run) - 1)]
    return out
