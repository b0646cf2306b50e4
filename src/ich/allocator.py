"""Host memory for model work: keep freed memory in the process instead of handing it back.

In: nothing (the C library of this process). Out: glibc's malloc, for the rest of the
process, serves blocks up to 32 MB from its heap and gives freed memory back to the operating
system only when more than 1 GB of it lies free at the heap's end.

Why (bench/train_speed.py, stage 1 at 128 px, batch 16, 2 cores): a training step allocates
and frees hundreds of megabytes of activations. With glibc's defaults the top of the heap is
returned to the kernel at the end of each step (its trim threshold follows the largest block
freed, at most 64 MB), and the next step's first write to every page of it is a page fault
the kernel serves by zeroing the page: ich's step took 5,000-7,600 minor faults and 40-80 ms
of system time, timm's about 300 and 2 ms (whose allocation pattern happened to stay under
the threshold). This is the remedy PyTorch's CPU performance guide gives (a caching
allocator such as jemalloc or tcmalloc), done in-process with glibc's own mallopt so that
nothing needs preloading. Blocks over 32 MB are still mapped per allocation (glibc's upper
limit for its heap). Elsewhere (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (malloc.h); setting either turns off glibc's moving thresholds.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's largest accepted M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2): blocks up to this
# size come from the heap, where freed ones are reused.
MMAP_THRESHOLD = 32 << 20
# Free memory at the heap's end kept for reuse: above a training step's churn at the sizes
# ich trains at on CPU.
TRIM_THRESHOLD = 1 << 30

_done = False


def retain_freed_memory() -> bool:
    """Set glibc's thresholds (see the module docstring) once per process; True when they are
    set (now or before), False where the C library is not glibc."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mmap first: once the trim threshold is set, the mmap threshold stops moving too.
    _done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _done
