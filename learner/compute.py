"""How each genco process runs its numeric work: one compute thread, and freed memory kept for reuse.

Threads: with a second thread on a busy 2-core machine (the broker, other agents,
a parser process) every barrier waits for a descheduled thread, so a second OpenMP
thread slows training down instead of speeding it up. Each process here does one
thing at a time.

Memory: a training step allocates and frees the same tens of MB of tensors every
batch. With glibc's defaults large blocks go back to the kernel (munmap, heap
trimming) and the next batch faults them in again, page by page. Told to serve
blocks up to 32 MB from its heap and never to trim it, glibc keeps them, and a step
spends less time faulting pages. Peak memory is unchanged; the heap just does not
shrink between batches. The figures are in docs/decisions.md ("One compute thread per
process").
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
_MMAP_ABOVE = 32 << 20  # the ceiling of glibc's own adaptive threshold on 64-bit; a far higher one ran slower
_NEVER_TRIM = 2**31 - 1


def configure_compute() -> None:
    """One thread for torch's intra-op pool and numpy's BLAS; glibc keeps freed memory (no-op elsewhere)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)  # called, not entered: the limit holds for the life of the process
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc: its allocator has its own policy
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_ABOVE)
    mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
