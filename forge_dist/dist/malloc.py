"""Pin glibc's mmap threshold so that freed large tensors go back to the OS.

glibc serves an allocation at or above its mmap threshold (128 KiB at start) with its own
``mmap`` and returns it with ``munmap`` on free. But its threshold is dynamic: after the first
free of such a block it rises to that block's size (up to 32 MiB on 64-bit), and from then on
blocks below it come from the heap, whose freed memory stays resident unless it happens to lie at
the top. A training process frees many partition- and parameter-sized tensors (ZeRO-3's gathered
parameters, its flattened gradient partitions and AdamW's temporaries): measured on ZeRO-3 at
DP=2 (docs/BENCHMARKS.md), the dynamic threshold keeps about 2.3x the live tensor bytes
resident after a step. Setting the threshold (``mallopt(M_MMAP_THRESHOLD)``, or the
``MALLOC_MMAP_THRESHOLD_`` environment variable, which glibc reads at start) turns the dynamic
rule off. 1 MiB keeps activations and small tensors on the heap (no page faults per step for
them) and returns every larger freed tensor at once.

    pin_mmap_threshold()   # once per process, before the model is built (train/launch.py)
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_MMAP_THRESHOLD = -3  # glibc malloc.h
DEFAULT_THRESHOLD = 1 << 20
ENV = "MALLOC_MMAP_THRESHOLD_"


def pin_mmap_threshold(nbytes: int = DEFAULT_THRESHOLD) -> bool:
    """Set glibc's mmap threshold to ``nbytes`` in this process (a no-op returning False off glibc,
    or when the user set ``MALLOC_MMAP_THRESHOLD_``, which glibc already applied)."""
    if os.environ.get(ENV) or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):
        return False
