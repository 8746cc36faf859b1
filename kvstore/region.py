"""Host memory mapped at once and backed by the kernel later, range by range, without touching its contents.

A large buffer that is allocated and then written page by page pays a page
fault per 4 KiB page on the hot path (zeroing included). ``HostRegion`` maps
the whole size up front (no memory is used yet) and ``fault_in(start, end)``
has the kernel back a range: ``MADV_POPULATE_WRITE`` (Linux 5.14+; about
0.7 s per GiB here, three times cheaper than writing the pages, and it never
changes a byte, so it may run beside readers and writers of neighbouring
bytes). On older kernels it writes zeros over exactly ``[start, end)``,
which the caller must own. The arena of the cache server and the host tier's
slot pool are both such regions, faulted in by a background thread.
"""

from __future__ import annotations

import mmap

import numpy as np

PAGE_BYTES = mmap.PAGESIZE
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Python names it from 3.13


class HostRegion:
    """``num_bytes`` of anonymous memory as a writable uint8 numpy ``array`` (shared by every view of it)."""

    def __init__(self, num_bytes: int, setting: str = "num_bytes"):
        """``setting``: the configuration field that sized it, named if the memory cannot be reserved."""
        if isinstance(num_bytes, bool) or not isinstance(num_bytes, int) or num_bytes < 0:
            raise ValueError(f"{setting}: expected an integer >= 0, got {num_bytes!r}")
        self.num_bytes = num_bytes
        try:
            self._map = mmap.mmap(-1, num_bytes) if num_bytes else None
        except OSError as error:  # more than the machine (or its overcommit policy) will reserve
            raise OSError(error.errno, f"{setting}: could not reserve {num_bytes} bytes of memory: "
                                       f"{error.strerror}") from None
        self.array = np.frombuffer(self._map, dtype=np.uint8) if self._map is not None else np.empty(0, np.uint8)
        self._populate = self._map is not None and hasattr(self._map, "madvise")
        if self._populate:
            self._map.madvise(mmap.MADV_HUGEPAGE)  # fewer faults where the kernel has huge pages to give

    def fault_in(self, start: int, end: int) -> None:
        """Back ``[start, end)`` with memory; its bytes are unchanged (zeros where never written)."""
        if end <= start:
            return
        if self._populate:
            first = start - start % PAGE_BYTES
            try:
                self._map.madvise(_MADV_POPULATE_WRITE, first, end - first)
                return
            except OSError:  # a kernel before 5.14
                self._populate = False
        self.array[start:end].fill(0)
