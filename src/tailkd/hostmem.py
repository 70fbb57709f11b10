"""Host memory: let a CPU process reuse the memory its tensors free instead of faulting in fresh pages.

glibc's malloc serves every request above 32 MiB (its largest ``M_MMAP_THRESHOLD``) with a fresh ``mmap`` and hands
it back to the kernel with ``munmap`` when freed, so each such tensor pays a page fault and the kernel's zeroing for
every 4 KiB page it touches — the logits-sized buffers of every chunk and step ([n, V] float32 at V = 49152: ~100 MB
per 512 tokens). `keep_freed_memory` turns that off for the process (``M_MMAP_MAX = 0``: large blocks come from the
heap; ``M_TRIM_THRESHOLD`` = 2 GiB: freed memory stays mapped for the next request), the remedy PyTorch's CPU tuning
guides reach with jemalloc/tcmalloc. Reuse starts once the heap's free region holds a step's blocks: torch's blocks
are 64-byte aligned, for which glibc's memalign (before 2.38) asks 96 bytes more than the block it freed, so the
first steps may still grow the heap by a block or two. Measured on the 2-core CPU (2026-12-01, bench/RESULTS.md):
the README's `tailkd distill` 1 min 41 s → 1 min 20–22 s (system time 45 s → 4–6 s), peak RSS 2.55 → 2.71–2.83 GB;
the chunked loss layer at V = 151936 (N = 512, d = 256, one thread) kd 2.94 → 2.49 s, tad 2.65 → 2.09 s. Results are
bit for bit the same (allocations stay 64-byte aligned). The cost: the process keeps its freed heap mapped.

The ``tailkd`` command applies it before a subcommand runs on a machine without a CUDA device (`tailkd.cli.entry`;
every process of a torchrun launch); where a GPU computes, the host's large blocks are few (loading, checkpoints)
and better given back. A program that calls tailkd's functions may call it itself, first. ``TAILKD_MALLOC=system``
keeps glibc's defaults (``keep``, or unset: the default; anything else is an error), as does any malloc setting of
the user's own (``GLIBC_TUNABLES`` with glibc.malloc, glibc's ``MALLOC_*_`` variables and ``MALLOC_ARENA_MAX`` /
``MALLOC_ARENA_TEST``, an allocator in ``LD_PRELOAD``); elsewhere than Linux with glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

from tailkd.errors import TailkdError

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # bytes of free memory at the heap's top before glibc gives it back (mallopt's int max)
GLIBC_ARENA_ENV = ("MALLOC_ARENA_MAX", "MALLOC_ARENA_TEST")  # glibc's malloc variables without the trailing "_"
MALLOC_ENV = "TAILKD_MALLOC"  # system: glibc's defaults; keep (or unset): freed memory kept for reuse


def _users_own_setting() -> bool:
    """Whether the environment keeps the allocator as it is: ``TAILKD_MALLOC=system``, or a malloc setting of the
    user's own. An unknown ``TAILKD_MALLOC`` is an error."""
    choice = os.environ.get(MALLOC_ENV, "").strip().lower()
    if choice not in ("", "keep", "system"):
        raise TailkdError(f"{MALLOC_ENV}={choice!r} must be 'system' (glibc's malloc defaults) or 'keep' (freed "
                          "memory kept for reuse, the default); unset it for the default")
    return (choice == "system" or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
            or any(name.startswith("MALLOC_") and name.endswith("_") or name in GLIBC_ARENA_ENV for name in os.environ)
            or any(lib in os.environ.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc", "mimalloc")))


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module's docstring); True where it now does. Call it before
    the work starts: blocks already mapped are unaffected. Raises `TailkdError` for an unknown ``TAILKD_MALLOC``."""
    if _users_own_setting() or sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
