"""Calls in flight on a tier's native resources, so ``close`` frees them only once no call uses them.

An LMDB environment closed while another thread decodes straight out of its
memory map (a ``get`` racing the store's ``close``) crashed the process
with SIGSEGV. A call that starts after ``close`` began is told so and
answers as a miss; ``close`` waits for the calls already inside.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class InUse:
    """A count of the calls inside a resource, and whether it is closing."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._calls = 0
        self._closing = False

    @contextmanager
    def hold(self) -> Iterator[bool]:
        """Yields True while the resource stays open for this call; False if it is closing (do nothing)."""
        with self._lock:
            if self._closing:
                held = False
            else:
                self._calls += 1
                held = True
        try:
            yield held
        finally:
            if held:
                with self._lock:
                    self._calls -= 1
                    if not self._calls:
                        self._cond.notify_all()

    def close(self) -> bool:
        """Refuse new calls and wait for those inside; False if another close came first."""
        with self._lock:
            if self._closing:
                return False
            self._closing = True
            while self._calls:
                self._cond.wait()
            return True
