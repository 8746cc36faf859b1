"""Thread-safe event counters behind ``stats()``, and the limit on how often an event is logged."""

from __future__ import annotations

import threading
import time
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


class LogLimit:
    """At most one log line per ``interval`` seconds for a kind of event, with the count of those since."""

    def __init__(self, interval: float):
        self._interval = interval
        self._lock = threading.Lock()
        self._logged_at = float("-inf")
        self._unlogged = 0

    def due(self, count: int = 1) -> int:
        """Note ``count`` more events; if a line is due now, the events it reports (these and those not logged
        since the last line), else 0."""
        now = time.monotonic()
        with self._lock:
            self._unlogged += count
            if now - self._logged_at < self._interval:
                return 0
            events, self._unlogged, self._logged_at = self._unlogged, 0, now
            return events
