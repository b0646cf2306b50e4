"""bench/machine.py: the one line every benchmark prints first (CPU model, cores, vector width)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import machine  # noqa: E402


def test_vector_extension_picks_the_widest():
    assert machine.vector_extension("fpu sse2 avx avx2 fma avx512f avx512bw") == "AVX-512"
    assert machine.vector_extension("fpu sse2 avx avx2 fma") == "AVX2"
    assert machine.vector_extension("fpu sse2 avx") == "no AVX2"
    # a flag that merely starts like one does not count
    assert machine.vector_extension("avx512_bf16") == "no AVX2"


def test_describe_names_cores_and_load():
    line = machine.describe()
    assert line.startswith("machine: ")
    assert f"{machine.cores()} cores" in line and "load average" in line
