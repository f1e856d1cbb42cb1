"""glibc malloc settings for the ``crdiff`` process: large temporaries are reused, not mapped afresh.

Why: on CPU, oneDNN reorders every convolution weight into a temporary on every call, and the 3x3
convolutions of SD1.5's 1280-channel blocks need 56-112 MiB each: 1.8 GB per UNet call, whatever the
resolution. glibc serves a block above its mmap threshold (dynamic, never above 32 MiB) with a fresh
``mmap`` and unmaps it on ``free``, so each call page-faults and zeroes those 1.8 GB again (about 464k
faults: at an 8x8 latent, more than the arithmetic). Blocks below the threshold are reused from the
heap, but the threshold moves with what the process happened to free, and the heap's top is given back
to the OS whenever more than twice the threshold is free, so any allocation that stays resident (the
dual UNet's masked copies, a loaded model) changed the speed of every later call, plain UNet included.

The fix: ``M_MMAP_MAX = 0`` (every block comes from the heap, where a freed block is reused by the next
call) and ``M_TRIM_THRESHOLD = 1 GiB`` (the heap's top is not returned after every call only to be
faulted in again). That is what a caching allocator does: PyTorch's CUDA allocator keeps freed blocks
the same way, and jemalloc/tcmalloc keep their own caches. The price is that memory freed after a peak
stays with the process (up to the trim threshold above the heap's live top) instead of going back to
the OS between calls. Threads other than the main one may still map blocks above 64 MiB (glibc's
per-thread heaps are at most that large). Not every freed block is reused: PyTorch asks for 64-byte aligned
blocks, for which glibc requests a little more than the block and gives the small tail back to its
thread cache, where it keeps the freed block from merging with its neighbour; so one block of one size
allocated and freed over and over, with nothing else around it, can grow the heap every time. The
UNet's temporaries reach a steady state after its second call (no fresh pages after that, measured in
benchmarks/bench_dual_unet.py and tests/test_malloc_tuning.py). Left alone: other C libraries (no ``mallopt``), and a process
whose user configured glibc malloc through the environment (``MALLOC_*_`` variables, ``GLIBC_TUNABLES``).
"""

from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
TRIM_THRESHOLD = 1 << 30


def user_configured() -> bool:
    """True when the environment already sets glibc malloc parameters (the user's choice wins)."""
    return "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ)


def reuse_large_blocks() -> bool:
    """Apply the settings above to this process; returns whether they were applied."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or user_configured():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
