"""Peak memory that stays flat over long evaluations (docs/bench.md, "Memory against the number of images").

glibc's malloc raises its mmap threshold each time a large mmapped block is freed (up to 32 MB on 64-bit). After the
first batches, every image's tensors (input, raw maps, native outputs) come from the heap instead, between small
long-lived blocks, and freed heap between live blocks is never returned to the system: RSS grew ~70 KB per image
with no Python object growing, and malloc_trim gave it back. A fixed threshold keeps large buffers mmapped, so
freeing one returns it.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's malloc.h; setting it also turns the dynamic threshold off
LARGE_BUFFER_BYTES = 128 * 1024  # glibc's own starting threshold, kept fixed


def keep_large_buffers_mapped() -> bool:
    """Fixes glibc's mmap threshold for this process; True if set. Elsewhere (macOS, musl, Windows) a no-op, and a
    MALLOC_MMAP_THRESHOLD_ the user exported is theirs to keep."""
    if not sys.platform.startswith('linux') or 'MALLOC_MMAP_THRESHOLD_' in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(M_MMAP_THRESHOLD, LARGE_BUFFER_BYTES) == 1
