"""Tier health: a robust estimate of each tier's read bandwidth and error rate, and a breaker.

The breaker is for a medium that has really become slow (a RAID rebuild, a
throttled network filesystem) or that fails. It must not trip on one outlier,
nor on the process's own CPU starvation, so slowness is judged over a window
of reads, never on one read.

The rule (defaults in brackets; ``W = window_reads``)
-----------------------------------------------------
* Each successful read gives a cost ``seconds / nbytes`` (seconds per byte).
  ``seconds`` should be the time spent on the medium: time a read with
  ``ReadTimer``, which subtracts the thread's run-queue wait (below), and pass
  its ``seconds``; wall time also works, the window rule absorbs its outliers.
* Baseline: the median cost of the last ``baseline_reads`` [64] reads since
  the last (re)baseline. A median of 64 moves only once more than 32 of them
  have changed, so stalls do not drag it and a real slowdown does not hide in
  it before the breaker has judged it.
* A read is *slow* when its cost is at least ``slow_factor`` [10] times the
  baseline **and** it took at least ``min_slow_seconds`` [``MIN_SLOW_SECONDS``,
  5 ms; the store passes max(5 ms, 10 GIL switch intervals) = 50 ms]: shorter
  reads are scheduler noise, not the medium.
* The tier is *degraded* when at least ``W // 2 + 1`` [5] of the last ``W``
  [8] reads are slow, i.e. when the lower median of the window is slow. No
  judgement before ``W`` [8] reads since the last (re)baseline (warm-up).

  - So up to ``W // 2`` [4] stalls of any length in any ``W`` [8] consecutive
    reads never degrade a tier (a single 200 ms stall among 1 ms reads is
    nothing);
  - and a tier that turns ``slow_factor`` or more times slower for good, after
    a healthy history in which stalls are fewer than half of the baseline
    window, is degraded at the latest at its 5th slow read (exactly the 5th
    after clean reads; earlier when stalls sit among the 3 reads before it).

* Any exception (``record_error``) degrades the tier at once: a failure is
  not a statistic. A failed write (``record_write_error``) suspends writes
  alone for the back-off period: a full disk still reads.

Degraded, probing, re-baseline
------------------------------
A degraded tier is treated by the store as missing (lookups skip it, reads go
elsewhere, writes to it are dropped and counted) for ``degraded_seconds``
[30 s]. Then it is ``probing``: operations run against it again; the first
clean read or operation makes it ``healthy``, an error degrades it again with
a fresh back-off. If the degradation was for slowness, the windows are
cleared when probing starts: the tier re-learns its baseline from the probe
reads on (a fresh 8-read warm-up), so a tier that has become slower for good
costs one back-off period and is then used at its new speed (the planner sees
that speed in ``read_bandwidth`` and may prefer to recompute), instead of
being bypassed forever. A slowdown that comes back after re-baselining is
judged like the first: 5 slow reads of 8 against the new baseline. After an
error-only degradation the baseline is kept (an error says nothing of speed).

``read_bandwidth`` (bytes/s, for the planner) is ``1 / median cost`` of the
last ``W`` [8] reads: it follows a real change within ``W // 2 + 1`` [5] reads
and ignores up to ``W // 2 - 1`` [3] outliers either way. It keeps its last
value across a re-baseline until the first probe read.

Time on the medium: ``ReadTimer``
---------------------------------
On Linux, ``/proc/thread-self/schedstat`` gives (second field) the
nanoseconds the thread has waited on a run queue: runnable, but without a
CPU. ``ReadTimer`` reads it (one ``pread`` of a per-thread file descriptor,
about 2 us) before and after the read and reports ``wall - wait``, so a read
delayed because the process's cores are busy is not charged to the medium.
Where the file is missing or unreadable it reports wall time. Time a thread
spends asleep waiting for the GIL is not run-queue wait and stays counted;
``min_slow_seconds`` and the window rule absorb that.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable

HEALTHY, DEGRADED, PROBING = "healthy", "degraded", "probing"
# Weight of the newest sample in the moving error rate.
ALPHA = 0.2
# Reads in the short window judged for slowness (W); the tier is slow when more than half are slow reads.
WINDOW_READS = 8
# Reads whose median cost is the healthy baseline.
BASELINE_READS = 64
# Reads measured since the last (re)baseline before slowness is judged (W: the window's own size).
WARMUP_READS = WINDOW_READS
MIN_SLOW_SECONDS = 0.005
# A read estimate no read refreshed for this long, or for ``degraded_seconds`` if longer, is forgotten.
MIN_FORGET_SECONDS = 1.0


def slow_reads_to_trip(window_reads: int) -> int:
    """Slow reads among the last ``window_reads`` that degrade a tier: more than half."""
    return window_reads // 2 + 1


class TierHealth:
    """Health of one tier; thread-safe. ``clock`` returns seconds (monotonic).

    ``window_reads`` (W) and ``baseline_reads`` size the two windows of the
    rule in the module docstring; ``baseline_reads >= window_reads``.
    """

    def __init__(self, slow_factor: float = 10.0, degraded_seconds: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, min_slow_seconds: float = MIN_SLOW_SECONDS, *,
                 window_reads: int = WINDOW_READS, baseline_reads: int = BASELINE_READS):
        if window_reads < 1:
            raise ValueError(f"window_reads: expected >= 1, got {window_reads}")
        if baseline_reads < window_reads:
            raise ValueError(f"baseline_reads: expected >= window_reads ({window_reads}), got {baseline_reads}")
        self._slow_factor = slow_factor
        self._judges = slow_factor < math.inf  # an infinite factor (memory tiers) never judges slowness
        self._min_slow_seconds = min_slow_seconds
        self._degraded_seconds = degraded_seconds
        self._clock = clock
        self._window_reads = window_reads
        self._trip = slow_reads_to_trip(window_reads)
        self._lock = threading.Lock()
        self._state = HEALTHY
        self._until = 0.0
        self._recent: deque[tuple[float, float]] = deque(maxlen=window_reads)  # (seconds per byte, seconds)
        # The read estimate's own window: forgotten when stale, while ``_recent`` still judges slowness.
        self._costs: deque[float] = deque(maxlen=window_reads)  # seconds per byte
        self._baseline: deque[float] = deque(maxlen=baseline_reads)  # seconds per byte
        self._since_baseline = 0  # reads since the last (re)baseline
        self._rebaseline = False  # degraded for slowness: clear the windows when probing starts
        self._bandwidth = 0.0  # bytes per second, as of the last time it was asked for
        self._bandwidth_stale = False  # reads recorded since: recomputed when asked, not on every read
        self._last_read = 0.0  # clock of the last read recorded
        self._error_rate = 0.0
        self._errors = 0
        self._degradations = 0
        self._writes_until = 0.0  # writes are suspended until then (a write failed; reads go on)
        self._write_suspensions = 0

    def available(self) -> bool:
        """False while the tier is bypassed; a degraded tier whose back-off ran out is probed."""
        if self._state == HEALTHY:  # one attribute read under the GIL: the lookup hot path takes no lock
            return True
        with self._lock:
            if self._state == DEGRADED and self._clock() >= self._until:
                self._state = PROBING
                if self._rebaseline:  # the slow window is forgotten: the estimate is the prior's again
                    self._rebaseline = False
                    self._bandwidth, self._bandwidth_stale = 0.0, False
                    self._recent.clear()
                    self._costs.clear()
                    self._baseline.clear()
                    self._since_baseline = 0
            return self._state != DEGRADED

    def record_read(self, nbytes: int, seconds: float) -> bool:
        """A read of ``nbytes`` that took ``seconds`` (on the medium: see ``ReadTimer``) succeeded; True if
        it made the tier degraded for slowness (for the caller to say so)."""
        seconds = max(seconds, 1e-9)
        cost = seconds / max(nbytes, 1)
        with self._lock:
            self._last_read = self._clock()
            self._recent.append((cost, seconds))
            self._costs.append(cost)
            self._baseline.append(cost)
            self._since_baseline += 1
            self._bandwidth_stale = True
            self._error_rate *= 1 - ALPHA
            if self._state == PROBING:
                self._state = HEALTHY
            elif self._state == HEALTHY and self._is_slow():
                self._rebaseline = True
                self._degrade()
                return True
        return False

    def _is_slow(self) -> bool:
        """More than half of the last W reads are slow (the rule in the module docstring); under the lock."""
        if not self._judges or self._since_baseline < self._window_reads:
            return False
        long_reads = [cost for cost, seconds in self._recent if seconds >= self._min_slow_seconds]
        if len(long_reads) < self._trip:  # the common case: no median to compute
            return False
        threshold = self._slow_factor * statistics.median(self._baseline)
        return sum(cost >= threshold for cost in long_reads) >= self._trip

    def record_ok(self) -> None:
        """An operation without a bandwidth sample (a write, a lookup) succeeded."""
        with self._lock:
            self._error_rate *= 1 - ALPHA
            if self._state == PROBING:
                self._state = HEALTHY

    def record_error(self) -> None:
        """An operation raised: the tier is bypassed for the back-off period."""
        with self._lock:
            self._count_error()
            self._degrade()

    def record_write_error(self) -> None:
        """A write raised: writes to the tier are suspended for the back-off period, reads go on.

        A full disk (ENOSPC, a full LMDB map), a quota or a read-only mount
        fail writes while every block already there still reads; bypassing
        the tier for reads too made everything on it a miss for the back-off,
        and again after each retried write while the disk stayed full. A
        medium that has really failed fails its next read too, and is then
        bypassed whole.
        """
        with self._lock:
            self._count_error()
            if self._clock() >= self._writes_until:
                self._write_suspensions += 1
            self._writes_until = self._clock() + self._degraded_seconds

    def _count_error(self) -> None:
        """Under the lock: one more error, in the count and the moving rate."""
        self._errors += 1
        self._error_rate = (1 - ALPHA) * self._error_rate + ALPHA

    def writes_available(self) -> bool:
        """False while writes are suspended after a failed write (see ``record_write_error``)."""
        return self._writes_until == 0.0 or self._clock() >= self._writes_until

    def _degrade(self) -> None:
        if self._state != DEGRADED:
            self._degradations += 1
        self._state = DEGRADED
        self._until = self._clock() + self._degraded_seconds

    @property
    def read_bandwidth(self) -> float:
        """Bytes/s: 1 / the median cost of the last W reads; 0.0 before the first read."""
        with self._lock:
            return self._current_bandwidth()

    def _current_bandwidth(self) -> float:
        """Under the lock. A host-RAM hit reads a block in tens of microseconds, so the median is taken
        when the planner asks (once a request), not on every read.

        An estimate no read has refreshed for ``degraded_seconds`` (at least ``MIN_FORGET_SECONDS``) is
        forgotten, and the prior stands again:
        a planner that plans no read from a tier it thinks slow never learns it is fast again (a moment of
        4 stalled reads in 8 kept a recovered disk's plans at 0 tokens for good). The lower median: half
        the window stalled does not set the estimate (the mean of the two middle reads did)."""
        if self._costs and self._clock() - self._last_read >= max(self._degraded_seconds, MIN_FORGET_SECONDS):
            self._costs.clear()  # the estimate only: a tier read rarely is still judged on its slow reads
            self._bandwidth, self._bandwidth_stale = 0.0, False
        if self._bandwidth_stale and self._costs:
            self._bandwidth = 1.0 / statistics.median_low(self._costs)
        self._bandwidth_stale = False
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
            return {"state": state, "read_bandwidth": round(self._current_bandwidth()),
                    "error_rate": round(self._error_rate, 4), "errors": self._errors, "degradations": self._degradations,
                    "writes": "ok" if self._clock() >= self._writes_until else "suspended",
                    "write_suspensions": self._write_suspensions}



# -- time on the medium ---------------------------------------------------------------------------------

SCHEDSTAT_PATH = "/proc/thread-self/schedstat"


class _Schedstat:
    """One thread's schedstat file, opened once; ``fd`` is -1 where it cannot be read."""

    __slots__ = ("fd",)

    def __init__(self) -> None:
        self.fd = -1
        try:
            fd = os.open(SCHEDSTAT_PATH, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except (OSError, AttributeError):
            return
        self.fd = fd
        if self.wait_ns() is None:
            self.close()

    def wait_ns(self) -> int | None:
        """Nanoseconds this thread has waited on a run queue, or None where unknown."""
        if self.fd < 0:
            return None
        try:
            return int(os.pread(self.fd, 128, 0).split()[1])
        except (OSError, AttributeError, ValueError, IndexError):
            self.close()
            return None

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self) -> None:  # the thread ended: its locals go
        self.close()


class _ThreadSchedstat(threading.local):
    def __init__(self) -> None:
        self.stat = _Schedstat()


_thread_schedstat = _ThreadSchedstat()


def _reset_after_fork() -> None:
    global _thread_schedstat  # the inherited descriptors name the parent's threads
    _thread_schedstat = _ThreadSchedstat()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


class ReadTimer:
    """Times one read as time on the medium: wall time less this thread's run-queue wait.

    ``with ReadTimer() as timer: read()`` then ``health.record_read(nbytes,
    timer.seconds)``; or ``timer = ReadTimer().start()`` ... ``seconds =
    timer.stop()``. Start and stop on the same thread (the wait counted is the
    starting thread's). After ``stop``: ``seconds`` (medium), ``wall_seconds``
    and ``wait_seconds`` (run-queue wait subtracted; 0.0 where
    ``/proc/thread-self/schedstat`` cannot be read, so ``seconds`` is wall
    time). The wall clock is read outside the two schedstat reads, so only
    waits inside the timed span are subtracted and ``seconds`` errs towards
    wall time. Costs about two ``pread`` calls (a few microseconds).
    """

    __slots__ = ("_clock", "_stat", "_start", "_wait", "seconds", "wall_seconds", "wait_seconds")

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._stat: _Schedstat | None = None
        self._start = 0.0
        self._wait: int | None = None
        self.seconds = self.wall_seconds = self.wait_seconds = 0.0

    def start(self) -> ReadTimer:
        self._stat = _thread_schedstat.stat
        self._start = self._clock()
        self._wait = self._stat.wait_ns()
        return self

    def stop(self) -> float:
        """Seconds on the medium since ``start``: wall time less run-queue wait, never below 0."""
        wait = self._stat.wait_ns() if self._stat is not None and self._wait is not None else None
        wall = max(self._clock() - self._start, 0.0)
        waited = (wait - self._wait) / 1e9 if wait is not None and self._wait is not None else 0.0
        waited = min(max(waited, 0.0), wall)
        self.wall_seconds, self.wait_seconds, self.seconds = wall, waited, wall - waited
        return self.seconds

    def __enter__(self) -> ReadTimer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
