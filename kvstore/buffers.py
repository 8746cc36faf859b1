"""Large host buffers that cost no more than the bytes written into them.

A fresh ``bytearray`` or ``torch.empty`` of tens of MiB faults in every
4 KiB page on first touch (on a shared VM about 2 us a page: 17-20 ms for
32 MiB, more than copying the bytes). numpy asks the kernel for transparent
huge pages on large arrays and does not zero-fill, so buffers a request
allocates (a staging area, a received blob) come from here.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# From this size up, buffers come from numpy (below it the allocator's reuse is cheaper).
LARGE_BYTES = 1 << 20


def alloc_bytes(num_bytes: int) -> bytearray | memoryview:
    """A writable, uninitialised buffer of ``num_bytes`` (a ``bytearray`` when small)."""
    if num_bytes < LARGE_BYTES:
        return bytearray(num_bytes)
    return memoryview(np.empty(num_bytes, dtype=np.uint8)).cast("B")


def empty_host(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, from huge pages when it is large."""
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if nbytes < LARGE_BYTES:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(np.empty(nbytes, dtype=np.uint8)).view(dtype).view(shape)
