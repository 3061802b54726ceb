"""Large host buffers reused instead of mapped afresh (glibc's malloc).

By default glibc serves every allocation above 32 MiB-ish (its adaptive mmap threshold)
with a fresh ``mmap`` and returns it to the kernel on ``free``; the next batch's tensor of
the same size then takes a page fault per 4 KiB page as it is first written. A sweep
allocates the same large tensors job after job (stacked image batches, feature maps,
distance matrices), and in virtual machines a page fault costs tens of microseconds:
stacking one batch of 16 images of 224 px (9.6 MB) was measured at 175 ms that way and
1 ms with the buffer reused. :func:`reuse_freed_memory` raises the mmap threshold so such
buffers come from the heap and stay there for reuse, and bounds what free memory the heap
may keep at its top. The memo calls :func:`give_back` when it frees memory for a host
that runs short, so that memory really returns to the kernel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Allocations below this come from the heap (and are reused after ``free``).
MMAP_THRESHOLD = 256 * 2**20
#: Free memory the heap may keep at its top before giving it back.
TRIM_THRESHOLD = 512 * 2**20


@cache
def _libc() -> ctypes.CDLL | None:
    """The C library, where it has ``mallopt`` (looked up once: ``find_library`` runs
    ``ldconfig``)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") else None


def reuse_freed_memory() -> bool:
    """Apply the thresholds above to this process (glibc only); True when applied."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def give_back() -> None:
    """Return the heap's free memory to the kernel (``malloc_trim``), where glibc has it."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
