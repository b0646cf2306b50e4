"""ich.data.arrays: names, distinct values, codes and lookups on large columns, checked on
small hand-made ones."""

import os

import numpy as np
import pyarrow as pa

from ich.data.arrays import name_bytes, sorted_codes, sorted_lookup, sorted_unique


def test_sorted_unique_is_the_sorted_distinct_values():
    values = np.array([b"b", b"a", b"b", b"", b"ab", b"a"])
    assert sorted_unique(values).tolist() == [b"", b"a", b"ab", b"b"]
    assert sorted_unique(np.array([3, 1, 3, 2])).tolist() == [1, 2, 3]
    assert sorted_unique(np.array([b"x"])).tolist() == [b"x"]
    assert len(sorted_unique(np.array([], dtype="S1"))) == 0


def test_name_bytes_are_the_fsencoded_names():
    names = ["ID_1.dcm", "", "sub/é.dcm", "x", "a b.dcm"]
    expected = np.array([os.fsencode(name) for name in names])
    got = name_bytes(pa.array(names))
    assert got.dtype == expected.dtype == np.dtype("S10")   # é is two bytes
    assert got.tolist() == expected.tolist()
    # A slice (an offset into the buffers) and a chunked array.
    assert name_bytes(pa.array(names).slice(2, 2)).tolist() == [b"sub/\xc3\xa9.dcm", b"x"]
    assert name_bytes(pa.chunked_array([names[:2], names[2:]])).tolist() == expected.tolist()
    assert name_bytes(pa.array(["", ""])).tolist() == [b"", b""]
    assert len(name_bytes(pa.array([], pa.string()))) == 0


def test_sorted_codes_number_the_values_in_their_sort_order():
    codes, values = sorted_codes(pa.chunked_array([["b", "a", "b"], ["é", "Z"]]))
    assert values.to_pylist() == ["Z", "a", "b", "é"]   # code point order: Z < a < é
    assert codes.tolist() == [2, 1, 2, 3, 0]
    codes, values = sorted_codes(pa.array([], pa.string()))
    assert len(codes) == 0 and len(values) == 0


def test_sorted_lookup_finds_each_value_in_the_sorted_set():
    values = pa.array(["a", "c", "d", "f", "h"])
    found = sorted_lookup(values, pa.array(["b", "c", "f", "g", "h"]), block=2)
    assert found.tolist() == [-1, 1, -1, 2, 4]
    assert sorted_lookup(values, pa.array([], pa.string())).tolist() == [-1] * 5
    assert len(sorted_lookup(pa.array([], pa.string()), pa.array(["a"]))) == 0
    # Random sets, blocks of several sizes: the positions a dict of the set gives.
    rng = np.random.default_rng(0)
    pool = [f"ID_{k:03x}" for k in range(400)]
    for block in (1, 3, 64, 1000):
        keys = sorted(rng.choice(pool, 150, replace=False).tolist())
        wanted = sorted(rng.choice(pool, 200, replace=False).tolist())
        where = {key: i for i, key in enumerate(keys)}
        assert sorted_lookup(pa.array(wanted), pa.array(keys), block=block).tolist() == \
            [where.get(value, -1) for value in wanted]
