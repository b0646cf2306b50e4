"""ich.allocator: freed memory stays in the process, so re-allocating it costs no page faults."""

import subprocess
import sys

import pytest

# Allocates and frees ~150 MB of 1-4 MB blocks (a training step's activations) a few times,
# then prints the minor page faults of the repeats: each first write to a page handed back to
# the kernel is one. numpy, not torch: numpy's array objects live in Python's own arenas, so
# the C heap holds nothing but the blocks and glibc's defaults trim its top every step (torch's
# small allocations could sit above the blocks and keep it, depending on what ran before).
CHURN = """
import resource, sys
import numpy as np
from ich.allocator import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory() and retain_freed_memory()  # the second call: already set
def step():
    blocks = [np.ones(262144 * (1 + i % 4), dtype=np.float32) for i in range(60)]
    del blocks
for _ in range(2):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def faults_per_step(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_retained_memory_is_reused_without_page_faults():
    plain, retained = faults_per_step("defaults"), faults_per_step("retain")
    # Measured: 29,935 faults a step with glibc's defaults, none retained.
    assert plain > 2000, plain
    assert retained < plain / 5, (retained, plain)
