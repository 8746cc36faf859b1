"""Fault injection around a real tier: a delay on reads, an OSError on every call, a gate on writes.

The wrapped tier does the real work; only the injected fault is added, the
way a slow NFS mount, a failing disk or a stalled writer would show up.
"""

from __future__ import annotations

import errno
import threading
import time
from typing import Any


class FaultyTier:
    """Delegates to ``inner``; ``delay`` seconds before each read, ``fail`` raises EIO, ``gate`` holds writes."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.delay = 0.0
        self.fail = False
        self.gate = threading.Event()
        self.gate.set()
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def capacity_bytes(self) -> int:
        return self.inner.capacity_bytes

    @property
    def on_evict(self):
        return self.inner.on_evict

    @on_evict.setter
    def on_evict(self, callback) -> None:
        self.inner.on_evict = callback

    def _fault(self) -> None:
        if self.fail:
            raise OSError(errno.EIO, "injected I/O error")

    def contains(self, key: bytes) -> bool:
        self._fault()
        return self.inner.contains(key)

    def get_into(self, key: bytes, out) -> bool:
        self._fault()
        self.reads += 1
        if self.delay:
            time.sleep(self.delay)
        return self.inner.get_into(key, out)

    def put_many(self, items) -> int:
        self.gate.wait()
        self._fault()
        return self.inner.put_many(items)
