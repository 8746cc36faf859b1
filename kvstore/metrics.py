"""Thread-safe event counters behind ``stats()``."""

from __future__ import annotations

import threading
from collections import Counter


class Counters:
    """Named integer counters that many threads may bump at once."""

    def __init__(self, *names: str):
        self._lock = threading.Lock()
        self._values: Counter[str] = Counter({name: 0 for name in names})

    def add(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to counter ``name`` (created at 0 if new)."""
        with self._lock:
            self._values[name] += amount

    def get(self, name: str) -> int:
        with self._lock:
            return self._values[name]

    def snapshot(self) -> dict[str, int]:
        """A consistent copy of every counter."""
        with self._lock:
            return dict(self._values)
