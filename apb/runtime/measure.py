"""Honest clocks and peak memory on every device, behind one switch on the device type.

CUDA runs kernels asynchronously: a clock read without a synchronize measures their launch, and
memory must be read from the caching allocator. On the CPU neither needs anything, and the peak
resident set size of this process stands for device memory (Linux resets it through
``/proc/self/clear_refs``; elsewhere the peak covers the process's life and says so).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    """Wait until ``device`` has finished the work queued so far (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def syncer(device: torch.device):
    """A no-argument ``sync`` for ``device``, or None where a clock needs none."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> bool:
    """Start a new peak-memory window; False where only the process-lifetime peak exists."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS
        return True
    except OSError:
        return False


def minor_faults() -> int:
    """Minor page faults this process has taken so far: pages the system mapped for it (on first
    touch, zeroed), the cost :mod:`apb.runtime.allocator` keeps out of every layer."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peak_bytes(device: torch.device) -> int:
    """Peak memory since :func:`reset_peak`: max allocated on CUDA, peak RSS on a CPU host."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux
