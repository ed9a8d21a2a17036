"""A CPU worker's C allocator: memory freed in one layer is reused by the next, not faulted in again.

torch takes a CPU tensor's memory from the C library's ``malloc``. glibc serves a large request
with fresh pages from ``mmap`` (above a threshold it raises by itself only up to the sizes it has
seen freed) and hands the top of its heap back to the system once more than a trim threshold of
it is free. A prefill makes and drops tensors of the same few sizes in every layer, so a worker
kept paying for the same pages: each one faulted in and zeroed by the kernel again, as system
time that counts in the layer's clock (thousands of minor faults in a layer at bench-attn's W=8
32K; ``docs/results.md``, session 26). :func:`retain_freed_memory` sets, once per process,
requests up to 32 MiB (the largest threshold glibc accepts) to come from the heap, and freed heap
memory to stay with the process for the next request. Measured (session 26): page faults per
prefill cut 10-50x and the prefill 1-3% faster, for 2% (bench-attn, W=8) to 4-7% (SmolLM2-135M,
8K, W=2) more peak memory per host, since a heap that is never trimmed keeps pieces a later
request of another size cannot use; and a worker's resident memory stays near its peak between
documents. So it is opt-in (``parallel.retain_freed_memory``), not the default.

Where the C library is not glibc (macOS, musl) nothing is changed and :func:`retain_freed_memory`
says so (a worker asked for it then refuses to start: ``apb.runtime.worker``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

#: glibc's ``mallopt`` parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit systems
MMAP_THRESHOLD = 32 * 2**20
#: free heap memory kept at the heap's top before any is returned: the largest ``mallopt`` takes
#: (its value is a C int), 2 GiB, far above a CPU layer's working set
TRIM_THRESHOLD = 2**31 - 1

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Set this process's allocator to keep freed memory (see the module doc); True where it was
    set (now or before), False where the C library is not glibc or refused a setting."""
    global _applied
    if _applied is None:
        _applied = _set_glibc()
    return _applied


def _set_glibc() -> bool:
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # 1 on success, 0 for a value out of glibc's range
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
