"""bench/gpu_throughput.py runs its code paths on CPU (--dry-run) and refuses clearly without a GPU."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_throughput.py"


@pytest.mark.slow  # builds and steps both full-size stages on CPU: about two minutes
def test_dry_run_prints_the_table():
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("stage")]
    assert [r[0] for r in rows[1:]] == ["stage1", "stage2"]
    assert all(float(r[-1]) >= 0 for r in rows[1:])


def test_without_gpu_it_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA GPU" in done.stderr
