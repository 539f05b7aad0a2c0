"""Handing the heap memory a worker freed back to the operating system.

glibc's malloc keeps what a process frees for its next allocations: after a worker's heaviest
steps (a long prefill batch, 64 requests decoding at once) its RSS stays at that peak, though
the memory is free (docs/reliability.md, runs 3-5 of the chaos soak). ``release_free_memory``
asks the allocator to return it (glibc's ``malloc_trim(0)``: the free top of the heap and the
free pages inside it); ``can_release`` says whether this process's C library offers that (musl
and macOS do not: then nothing is released). It knows nothing of engines or when to release:
the engine loop decides that (``EngineLoop``, ``WorkerConfig.release_memory_every_s``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def can_release() -> bool:
    """Whether the C library can hand free heap memory back (glibc's malloc_trim)."""
    return _malloc_trim() is not None


def release_free_memory() -> bool:
    """Return the allocator's free memory to the OS; whether any was returned (False, too, where
    the C library cannot: see ``can_release``)."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
