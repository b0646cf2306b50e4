"""Array helpers for large columns: no Python object per value, no hash table per value.

In: numpy arrays and Arrow string arrays of up to millions of values (file names, image ids).
Out: sorted numpy bytes arrays, the form the steps use to compare names with `searchsorted`
(about 20 bytes a name, where a Python string takes about 70 and a set entry more).
"""

from __future__ import annotations

import numpy as np


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """The distinct values of a 1-d array, sorted: `np.unique` by sorting a copy. (numpy 2's
    `np.unique` uses a hash table for bytes, which takes about 4 times the array and leaves
    most of it in the process's heap after.)"""
    values = np.sort(values)
    if len(values) < 2:
        return values
    keep = np.empty(len(values), dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def name_bytes(strings) -> np.ndarray:
    """The UTF-8 bytes of each string of an Arrow string array as a numpy bytes array (what
    `os.fsencode` gives for each name), built from the array's buffers: no Python object per
    name. Names hold no NUL byte (numpy's bytes drop trailing NULs)."""
    import pyarrow as pa

    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    strings = strings.cast(pa.large_string())   # int64 offsets whatever the input
    n = len(strings)
    if not n:
        return np.array([], dtype="S1")
    _, offsets_buffer, data_buffer = strings.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[strings.offset:strings.offset + n + 1]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    width = max(int(lengths.max()), 1)
    grid = np.zeros((n, width), dtype=np.uint8)
    # Row-major: the cells of each name's bytes, name after name, are the data buffer's order.
    grid[np.arange(width) < lengths[:, None]] = data[offsets[0]:offsets[-1]]
    return grid.view(f"S{width}").ravel()


def sorted_codes(strings) -> tuple[np.ndarray, object]:
    """(code of each value, the distinct values sorted) of an Arrow string array, the codes
    numbered in the values' sort order (UTF-8 bytes, which is code point order): sorting by
    code sorts by value. A dictionary encoding, not a hash table of Python strings."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    encoded = pc.dictionary_encode(strings)
    order = pc.sort_indices(encoded.dictionary).to_numpy()
    code_of = np.empty(len(order), dtype=np.int64)
    code_of[order] = np.arange(len(order))
    return code_of[encoded.indices.to_numpy(zero_copy_only=False)], encoded.dictionary.take(order)


def sorted_lookup(values, sorted_set, block: int = 65_536) -> np.ndarray:
    """For each of the sorted Arrow strings `values`, its position in the sorted Arrow strings
    `sorted_set` (no nulls, no repeats in either), -1 where it is not there.

    `pyarrow.compute.index_in` a block of `values` at a time, each against only the stretch of
    `sorted_set` between the block's first and last value: the hash table is of a block, not
    of the whole set (which took about 90 bytes a value at RSNA's size)."""
    import bisect

    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(sorted_set, pa.ChunkedArray):
        sorted_set = sorted_set.combine_chunks()
    found = np.full(len(values), -1, dtype=np.int64)
    for start in range(0, len(values), block):
        part = values.slice(start, block)
        # str order is code point order, which is the UTF-8 byte order Arrow sorts by.
        lo = bisect.bisect_left(sorted_set, part[0].as_py(), key=lambda s: s.as_py())
        hi = bisect.bisect_right(sorted_set, part[-1].as_py(), lo=lo, key=lambda s: s.as_py())
        where = pc.index_in(part, value_set=sorted_set.slice(lo, hi - lo))
        hit = where.is_valid().to_numpy(zero_copy_only=False)
        found[start:start + len(part)][hit] = where.filter(where.is_valid()).to_numpy() + lo
    return found
