"""The machine a benchmark ran on, as one line printed first by every bench script.

Figures from different machines can then be told apart: CPU model (lscpu's "Model name", else
/proc/cpuinfo, else the platform string) with family and model numbers where the name is as
vague as a VM's "AMD EPYC", the cores this process may use, the widest vector extension
(AVX-512 / AVX2 / neither: what decides convolution speed on CPU) and the load average at the
start (the machine is shared: a busy start explains a slow figure).

    from machine import describe
    print(describe())
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def _lscpu() -> dict:
    """lscpu's "Key: value" lines as a dict; empty where lscpu is missing or fails."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _cpuinfo() -> dict:
    """The first processor's fields of /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def vector_extension(flags: str) -> str:
    """The widest of AVX-512 (avx512f), AVX2 and plain SSE in a CPU flags string."""
    names = set(flags.split())
    if "avx512f" in names:
        return "AVX-512"
    if "avx2" in names:
        return "AVX2"
    return "no AVX2"


def cores() -> int:
    """CPU cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def describe() -> str:
    """One line: CPU model (family/model), cores usable, vector extension, load average."""
    lscpu, cpuinfo = _lscpu(), _cpuinfo()
    model = lscpu.get("Model name") or cpuinfo.get("model name") or platform.processor() or "unknown CPU"
    family = lscpu.get("CPU family") or cpuinfo.get("cpu family")
    number = lscpu.get("Model") or cpuinfo.get("model")
    if family and number:
        model += f" (family {family}, model {number})"
    flags = lscpu.get("Flags") or cpuinfo.get("flags") or ""
    try:
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "unknown"
    return f"machine: {model}, {cores()} cores, {vector_extension(flags)}, load average {load}"


if __name__ == "__main__":
    print(describe())
