"""One preallocated host region that hands out page-aligned extents, faulted in by a background thread.

A buffer the kernel has not backed yet costs a page fault per 4 KiB page on
first write (zeroing included): receiving a 32 MiB blob into fresh memory
runs at the speed of growing the process, not of copying bytes. The arena
is mapped once, at its full ``capacity_bytes`` (a ``region.HostRegion``),
and a thread faults it in slice by slice from the start while the owner
already serves; ``take`` only hands out extents of slices already faulted
in, so the hot path never faults and the faulting thread never writes into
an extent in use.

An extent goes back to the arena when the last view of it is gone (a weak
finalizer on the extent's array, whichever thread drops it), never while a
reply still sends it or a disk write still reads it. When no faulted extent
is free (before faulting is done, or under fragmentation), ``take`` answers
None and the caller allocates as before: the arena makes things faster,
never fails them.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from collections import deque

from kvstore.region import PAGE_BYTES, HostRegion

FAULT_SLICE_BYTES = 64 << 20  # faulted in per step of the background thread


def _pages(num_bytes: int) -> int:
    """``num_bytes`` rounded up to whole pages."""
    return -(-num_bytes // PAGE_BYTES) * PAGE_BYTES


class Arena:
    """``capacity_bytes`` of host memory carved into page-aligned extents (thread-safe).

    ``take(n)`` gives a writable ``memoryview`` of exactly ``n`` bytes or None;
    ``close()`` stops the faulting thread (extents in use stay valid: the
    region lives until the last of them is gone).
    """

    def __init__(self, capacity_bytes: int, fault_in_background: bool = True):
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise ValueError(f"capacity_bytes: expected an integer >= 0, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes - capacity_bytes % PAGE_BYTES
        self._memory = HostRegion(self.capacity_bytes, "host_bytes")
        self._lock = threading.Lock()
        self._starts: list[int] = []  # free extents' starts, sorted
        self._free: dict[int, int] = {}  # start -> bytes, free and faulted in
        self._returned: deque[tuple[int, int]] = deque()  # extents given back, merged on the next take
        self.faulted_bytes = 0
        self.taken_bytes = 0  # in extents handed out and not yet returned
        self.misses = 0  # takes answered None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if fault_in_background and self.capacity_bytes:
            self._thread = threading.Thread(target=self._fault_in, name="kvstore-arena-fault", daemon=True)
            self._thread.start()
        else:
            self._fault_in()

    def _fault_in(self) -> None:
        done = 0
        while done < self.capacity_bytes and not self._stop.is_set():
            end = min(done + FAULT_SLICE_BYTES, self.capacity_bytes)
            self._memory.fault_in(done, end)  # nobody holds these pages yet
            with self._lock:
                self._release(done, end - done)
                self.faulted_bytes = end
            done = end

    def take(self, num_bytes: int) -> memoryview | None:
        """A view of ``num_bytes`` bytes in faulted memory (contents undefined), or None if none is free."""
        size = _pages(max(num_bytes, 1))
        with self._lock:
            self._merge_returned()
            start = next((s for s in self._starts if self._free[s] >= size), None)
            if start is None:
                self.misses += 1
                return None
            extent = self._remove(start)
            if extent > size:
                self._insert(start + size, extent - size)
            self.taken_bytes += size
        array = self._memory.array[start:start + size]
        finalizer = weakref.finalize(array, self._returned.append, (start, size))
        finalizer.atexit = False
        return memoryview(array)[:num_bytes]

    # -- free list (under the lock) ---------------------------------------------------------------

    def _insert(self, start: int, size: int) -> None:
        bisect.insort(self._starts, start)
        self._free[start] = size

    def _remove(self, start: int) -> int:
        self._starts.pop(bisect.bisect_left(self._starts, start))
        return self._free.pop(start)

    def _merge_returned(self) -> None:
        while self._returned:
            start, size = self._returned.popleft()
            self.taken_bytes -= size
            self._release(start, size)

    def _release(self, start: int, size: int) -> None:
        """Make [start, start + size) free, merged with its free neighbours."""
        if start + size in self._free:
            size += self._remove(start + size)
        i = bisect.bisect_left(self._starts, start)
        if i > 0 and (before := self._starts[i - 1]) + self._free[before] == start:
            self._free[before] += size
        else:
            self._insert(start, size)

    def stats(self) -> dict[str, int]:
        """Bytes: ``capacity``, ``faulted`` in so far, ``taken`` (in extents in use), ``free`` (faulted, not
        taken), the ``largest_free`` extent; ``misses``: takes answered None."""
        with self._lock:
            self._merge_returned()
            return {"capacity": self.capacity_bytes, "faulted": self.faulted_bytes, "taken": self.taken_bytes,
                    "free": sum(self._free.values()), "largest_free": max(self._free.values(), default=0),
                    "misses": self.misses}

    def close(self) -> None:
        """Stop faulting in (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> "Arena":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
