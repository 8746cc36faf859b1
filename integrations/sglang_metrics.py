"""What SGLang's ``--enable-storage-metrics`` shows for the kvstore HiCache backend.

SGLang's ``StorageMetricsCollector`` takes, per storage operation, the pages
moved and the bandwidth in GB/s, for prefetch (L3 to host: the ``get``
calls) and backup (host to L3: the ``set`` calls), and turns them into the
``sglang:prefetch_pgs``, ``sglang:backup_pgs``, ``sglang:prefetch_bandwidth``
and ``sglang:backup_bandwidth`` histograms; ``get_stats()`` hands over what
was recorded since the last call. Pages asked for and not found are counted
beside them (``misses``), with bytes and seconds, for the backend's own log
and ``totals()``. Samples are bounded (``MAX_SAMPLES`` per list): past that,
older samples are dropped, the totals stay exact.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from typing import Any

MAX_SAMPLES = 10_000  # per list between two get_stats() calls
OPERATIONS = ("prefetch", "backup")


@dataclass
class _Samples:
    pages: deque = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    bandwidth: deque = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))


class StorageCounters:
    """Per-operation samples for SGLang's metrics, and running totals (pages, misses, bytes, seconds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samples = {op: _Samples() for op in OPERATIONS}
        self._totals = {op: {"ops": 0, "pages": 0, "misses": 0, "bytes": 0, "seconds": 0.0} for op in OPERATIONS}

    def record(self, operation: str, pages: int, misses: int, nbytes: int, seconds: float) -> None:
        """One storage call: ``pages`` moved (``nbytes`` bytes, in ``seconds``), ``misses`` asked and not moved."""
        if operation not in self._samples:
            raise ValueError(f"operation: expected one of {OPERATIONS}, got {operation!r}")
        with self._lock:
            totals = self._totals[operation]
            totals["ops"] += 1
            totals["pages"] += pages
            totals["misses"] += misses
            totals["bytes"] += nbytes
            totals["seconds"] += seconds
            if pages:
                samples = self._samples[operation]
                samples.pages.append(pages)
                samples.bandwidth.append(nbytes / max(seconds, 1e-9) / 1e9)

    def take(self) -> Any:
        """The samples since the last call, as SGLang's ``StorageMetrics`` (pages per op, GB/s per op).

        SGLang's metrics module is imported here, not at import time: it pulls
        in SGLang's model configs (and torchvision), which a server collecting
        storage metrics has loaded already.
        """
        from sglang.srt.observability.metrics_collector import StorageMetrics

        with self._lock:
            prefetch, backup = self._samples["prefetch"], self._samples["backup"]
            metrics = StorageMetrics(prefetch_pgs=list(prefetch.pages), backup_pgs=list(backup.pages),
                                     prefetch_bandwidth=list(prefetch.bandwidth),
                                     backup_bandwidth=list(backup.bandwidth))
            self._samples = {op: _Samples() for op in OPERATIONS}
        return metrics

    def totals(self) -> dict[str, dict[str, float]]:
        """Running totals per operation: calls, pages moved, pages missed, bytes, seconds."""
        with self._lock:
            return {op: dict(t) for op, t in self._totals.items()}
