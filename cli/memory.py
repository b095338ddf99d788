"""Freed memory kept for reuse: glibc's malloc settings for probe.py's large, short-lived CPU tensors.

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and unmaps it on
free, so each new large tensor starts on untouched pages and the kernel zeroes them one 4 KiB fault at a
time. fmprobe's hot loops make such tensors over and over: a 559-query x 60,000-bank score block of the kNN
(134 MB, 18 of them a layer), the silhouettes' distance blocks, the large activations of an extraction batch. On the 2-core
machine the full-size ``configs/probe_real.yaml`` run took 218 million page faults and 458 s of system time.

``keep_freed_memory()`` turns mmap off for allocations (``M_MMAP_MAX = 0``: they come from the heap) and lets up
to ``trim_threshold`` bytes of freed memory stay at the top of the heap (``M_TRIM_THRESHOLD``), so the next
block reuses pages that are already mapped. Measured on 2 cores (Fashion-MNIST, EfficientNet-Lite0's features):
a block's kNN over 60,000 bank rows 1.96 -> 1.38 s, its hierarchy metrics 1.11 -> 0.53 s, the extraction of all
blocks of 70,000 images 67 -> 46 s; probe.py with every metric but the linear probe on every block of Lite0
and its random init (cached features) 162 -> 129 s, system time 63 -> 4 s, page faults 34 -> 1.5 million.
Only where memory comes from changes, not what is computed. The cost is a higher resident size: memory freed
below the heap's top is kept for reuse, not returned, and a block freed and asked for again at the same size
does not fit its own hole (torch's 64-byte alignment asks a little more), so a loop of one size grows the heap
a few times before it settles (that probe.py run's peak RSS 3.75 -> 4.08 GB).

``python probe.py`` calls it at start, as a command only (``probe.main()`` called from a test or a notebook leaves
that process's allocator alone; train.py does not call it: its allocations are steadier and were not measured);
``FMPROBE_SYSTEM_MALLOC=1`` leaves glibc's defaults alone. Off glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform

ENV = "FMPROBE_SYSTEM_MALLOC"
_M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1  # mallopt takes a C int


def keep_freed_memory(trim_threshold: int = 1 << 30) -> bool:
    """Serve large allocations from the heap and keep up to ``trim_threshold`` freed bytes mapped.

    Returns whether the settings were applied (False off glibc, with ``FMPROBE_SYSTEM_MALLOC=1``, or when
    glibc refuses them). Applies to the whole process and to the DataLoader workers it forks afterwards.
    """
    if not 0 <= trim_threshold <= _INT_MAX:
        raise ValueError(f"trim_threshold must be in [0, {_INT_MAX}] bytes (a C int), got {trim_threshold}")
    if os.environ.get(ENV, "").strip() not in ("", "0") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not mallopt(_M_MMAP_MAX, 0):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
