"""The CPU memory a generation frees is kept for its next tensors instead of being handed back to the system.

glibc's malloc serves each request above its mmap threshold (32 MB at most) with a fresh mapping and unmaps it on
free, so every large activation of a long prefill (a layer's MLP input on 8 rows of 1,450 tokens: hundreds of MB)
is faulted in again, page by page, at every layer. With mmap off for malloc and the heap's trimming raised, freed
blocks are reused: the process keeps its peak of memory and stops faulting (docs/benchmarks.md, "Freed memory
kept"). Elsewhere than glibc (musl, macOS, Windows) nothing changes.
"""

from __future__ import annotations

import ctypes

# mallopt's parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# The largest value mallopt takes (a C int): the heap's free top is handed back only beyond 2 GB.
TRIM_THRESHOLD = 2**31 - 1

_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to reuse freed memory (once per process); True where it took the settings."""
    global _kept
    if _kept is None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            _kept = bool(libc.gnu_get_libc_version) and bool(
                libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        except (OSError, AttributeError):  # not glibc
            _kept = False
    return _kept
