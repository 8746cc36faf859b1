"""The admission filter: how often a block has been seen, in a few bytes per counter.

A count-min sketch (TinyLFU's frequency estimator): ``DEPTH`` rows of 8-bit
counters indexed by slices of the block key, which is already a uniform
hash. The estimate is the minimum over the rows, so it can over-count
(a collision) but never under-count. Every ``sample`` sightings all counters
are halved, so old popularity fades and the sketch tracks the recent past.
"""

from __future__ import annotations

import threading

import numpy as np

DEPTH = 4
MAX_COUNT = 255


class AdmissionFilter:
    """Counts sightings of block keys; ``width`` counters per row (rounded up to a power of two)."""

    def __init__(self, width: int = 1 << 16, sample: int | None = None):
        if width < 1:
            raise ValueError(f"width: expected >= 1 counters, got {width}")
        self._width = 1 << (width - 1).bit_length()
        self._sample = sample if sample is not None else 10 * self._width
        self._rows = np.zeros((DEPTH, self._width), dtype=np.uint8)
        self._seen = 0
        self._lock = threading.Lock()

    def _slots(self, key: bytes) -> list[int]:
        if len(key) < 4 * DEPTH:
            raise ValueError(f"key: expected at least {4 * DEPTH} bytes, got {len(key)}")
        mask = self._width - 1
        return [int.from_bytes(key[4 * row:4 * row + 4], "little") & mask for row in range(DEPTH)]

    def record(self, key: bytes) -> int:
        """Count one sighting of ``key``; returns its estimated count including this one."""
        slots = self._slots(key)
        with self._lock:
            counts = [int(self._rows[row, slot]) for row, slot in enumerate(slots)]
            least = min(counts)
            for row, slot in enumerate(slots):
                # Conservative update: raise only the counters at the minimum (less over-counting).
                if counts[row] == least and least < MAX_COUNT:
                    self._rows[row, slot] = least + 1
            self._seen += 1
            if self._seen >= self._sample:
                self._rows >>= 1
                self._seen = 0
            return min(least + 1, MAX_COUNT)

    def estimate(self, key: bytes) -> int:
        """Estimated sightings of ``key`` (never fewer than recorded since the last halving)."""
        slots = self._slots(key)
        with self._lock:
            return min(int(self._rows[row, slot]) for row, slot in enumerate(slots))
