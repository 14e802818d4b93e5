"""CPU speed: the memory format the networks run in, and how malloc treats their activations.

Each of these earns its place by a same-process on/off measurement in the default precision
(docs/benchmarks.md): channels-last (NHWC) and keeping freed memory both make the CPU step faster.
"""
from __future__ import annotations

import ctypes
import os

import torch


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def default_channels_last(device: torch.device) -> bool:
    """NHWC on the CPU, where oneDNN's convolutions ran the step faster (docs/benchmarks.md); GPUs keep NCHW."""
    return device.type == "cpu"


def glibc() -> ctypes.CDLL | None:
    """The C library if it is GNU's (Linux), whose malloc can be tuned; else None."""
    try:
        is_glibc = bool(os.confstr("CS_GNU_LIBC_VERSION"))  # "glibc 2.36"; None or an error elsewhere
    except (ValueError, OSError, AttributeError):
        return None
    return ctypes.CDLL(None) if is_glibc else None


def keep_freed_memory(device: torch.device, keep: bool = True) -> bool:
    """Training on a CPU under glibc: allocate from malloc's heap and keep freed memory for reuse.

    By default glibc serves large blocks (the activations) with fresh pages from the kernel and
    returns them when they are freed, so every step page-faults and zeroes the same buffers
    again. Keeping them makes the step faster for more resident memory, which then stays at its
    peak (docs/benchmarks.md). keep=False instead maps every block from 128 KiB up on its own and
    returns it when freed, so that resident memory follows the tensors alive (bench.py measures
    peak memory so). Returns whether it applied.
    """
    libc = glibc() if device.type == "cpu" else None
    if libc is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's malloc.h
    if keep:
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 128 << 10)) and bool(libc.mallopt(M_MMAP_MAX, 1 << 20))
