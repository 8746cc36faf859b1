"""Tier health: a moving estimate of each tier's read bandwidth and error rate, and a breaker.

A tier that raises, or serves a read ``slow_factor`` times slower than its
moving bandwidth estimate, is marked ``degraded``: the store treats it as
missing (lookups skip it, reads go elsewhere, writes to it are dropped and
counted) for ``degraded_seconds``. After that it is ``probing``: the next
operations run against it again; a clean read makes it ``healthy``, another
error or slow read degrades it for another period. Slow reads still move the
estimate, so a tier that has become slower for good stops tripping after a
few probes instead of being bypassed forever.

Reads shorter than ``min_slow_seconds`` (default ``MIN_SLOW_SECONDS``) are
never judged slow: at that scale the time is scheduler noise, not the medium.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

HEALTHY, DEGRADED, PROBING = "healthy", "degraded", "probing"
# Weight of the newest sample in the moving averages.
ALPHA = 0.2
# Reads measured before a tier's estimate is trusted to judge slowness.
WARMUP_READS = 4
MIN_SLOW_SECONDS = 0.005


class TierHealth:
    """Health of one tier; thread-safe. ``clock`` returns seconds (monotonic)."""

    def __init__(self, slow_factor: float = 10.0, degraded_seconds: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, min_slow_seconds: float = MIN_SLOW_SECONDS):
        self._slow_factor = slow_factor
        self._min_slow_seconds = min_slow_seconds
        self._degraded_seconds = degraded_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._state = HEALTHY
        self._until = 0.0
        self._bandwidth = 0.0  # bytes per second
        self._reads = 0
        self._error_rate = 0.0
        self._errors = 0
        self._degradations = 0

    def available(self) -> bool:
        """False while the tier is bypassed; a degraded tier whose back-off ran out is probed."""
        if self._state == HEALTHY:  # one attribute read under the GIL: the lookup hot path takes no lock
            return True
        with self._lock:
            if self._state == DEGRADED and self._clock() >= self._until:
                self._state = PROBING
            return self._state != DEGRADED

    def record_read(self, nbytes: int, seconds: float) -> None:
        """A read of ``nbytes`` that took ``seconds`` succeeded."""
        bandwidth = nbytes / max(seconds, 1e-9)
        with self._lock:
            slow = (self._reads >= WARMUP_READS and seconds >= self._min_slow_seconds
                    and bandwidth * self._slow_factor < self._bandwidth)
            self._bandwidth = bandwidth if self._reads == 0 else (1 - ALPHA) * self._bandwidth + ALPHA * bandwidth
            self._reads += 1
            self._error_rate *= 1 - ALPHA
            if slow:
                self._degrade()
            elif self._state == PROBING:
                self._state = HEALTHY

    def record_ok(self) -> None:
        """An operation without a bandwidth sample (a write, a lookup) succeeded."""
        with self._lock:
            self._error_rate *= 1 - ALPHA
            if self._state == PROBING:
                self._state = HEALTHY

    def record_error(self) -> None:
        """An operation raised: the tier is bypassed for the back-off period."""
        with self._lock:
            self._errors += 1
            self._error_rate = (1 - ALPHA) * self._error_rate + ALPHA
            self._degrade()

    def _degrade(self) -> None:
        if self._state != DEGRADED:
            self._degradations += 1
        self._state = DEGRADED
        self._until = self._clock() + self._degraded_seconds

    @property
    def read_bandwidth(self) -> float:
        """Moving estimate of read bandwidth in bytes/s; 0.0 before the first read."""
        return self._bandwidth

    @property
    def state(self) -> str:
        self.available()
        with self._lock:
            return self._state

    def snapshot(self) -> dict[str, object]:
        """State, read bandwidth estimate (bytes/s), error rate (moving), errors and degradations."""
        state = self.state
        with self._lock:
            return {"state": state, "read_bandwidth": round(self._bandwidth), "error_rate": round(self._error_rate, 4),
                    "errors": self._errors, "degradations": self._degradations}
