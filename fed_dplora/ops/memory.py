"""Handing memory that was freed back to the operating system (glibc's `malloc_trim`).

A long-lived process that trains and evaluates on tensors of changing shapes (Poisson
batch sizes, records of varying length, one site after another) frees most of what it
allocates, but glibc keeps the freed chunks in its heap: the process's resident memory
then climbs for many rounds. One simulated worker's life (`python -m
experiments.bench_worker_memory`: 100 demo sites, 5 train and 5 evaluate a round) grew
+9.7% from round 2 to round 16 without a trim and +1.6% with one after each message,
ending 31% lower, for 1.5% of its time (docs/performance.md, section 4).
Elsewhere (musl, macOS) there is no `malloc_trim` and this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # the process's own C library
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Return the heap's free pages to the OS; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
