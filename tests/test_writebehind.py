"""WriteBehind: bounded per-target queues, one worker each, batching, block/drop, flush, close, releases.

Workers are held back with Events, never with sleeps; the only timed waits
are short bounded checks that something is still blocked.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import torch

from kvstore.writebehind import BATCH, WriteBehind

STILL_BLOCKED = 0.1  # seconds a blocked call is given to (wrongly) return
LONG = 10.0  # an upper bound no correct run comes near


def key(i: int) -> bytes:
    return i.to_bytes(32, "little")


def block(i: int) -> torch.Tensor:
    return torch.full((4,), float(i))


class Writer:
    """A writer that records every call; ``hold()`` makes it wait at the next call until ``go()``."""

    def __init__(self, fail_on: set[bytes] | None = None):
        self.calls: list[list[bytes]] = []
        self.blocks: dict[bytes, torch.Tensor] = {}
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on = fail_on or set()
        self.released_before_write: list[bytes] = []
        self.releases: Releases | None = None
        self._lock = threading.Lock()

    def hold(self) -> None:
        self.gate.clear()
        self.entered.clear()

    def go(self) -> None:
        self.gate.set()

    def __call__(self, items) -> None:
        self.entered.set()
        if not self.gate.wait(LONG):
            raise AssertionError("writer held too long")
        with self._lock:
            keys = [k for k, _ in items]
            self.calls.append(keys)
            for k, b in items:
                self.blocks[k] = b
                if self.releases is not None and self.releases.count(k):
                    self.released_before_write.append(k)
        if self.fail_on.intersection(keys):
            raise OSError("disk on fire")

    def written(self) -> Counter:
        with self._lock:
            return Counter(k for call in self.calls for k in call)


class Releases:
    """Counts release callbacks per key (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: Counter = Counter()

    def callback(self, k: bytes):
        def release() -> None:
            with self._lock:
                self._counts[k] += 1
        return release

    def count(self, k: bytes) -> int:
        with self._lock:
            return self._counts[k]

    def all(self) -> Counter:
        with self._lock:
            return Counter(self._counts)


@pytest.fixture
def make_wb():
    """``make_wb(writers, max_blocks, on_full)``; every writer is let go and every instance closed at teardown."""
    made: list[tuple[WriteBehind, dict]] = []

    def factory(writers: dict, max_blocks: int = 8, on_full: str = "block") -> WriteBehind:
        wb = WriteBehind(writers, max_blocks=max_blocks, on_full=on_full)
        made.append((wb, writers))
        return wb

    yield factory
    for wb, writers in made:
        for writer in writers.values():
            if isinstance(writer, Writer):
                writer.go()
        wb.close()


def start_held(wb: WriteBehind, writer: Writer, target: str, k: bytes, releases: Releases | None = None) -> None:
    """Submit ``k`` and wait until the worker is inside the (held) writer with it."""
    writer.hold()
    release = releases.callback(k) if releases is not None else None
    assert wb.submit(target, k, block(0), release)
    assert writer.entered.wait(LONG)


def kvstore_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("kvstore-write-")}


# -- validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_blocks", [0, -1])
def test_max_blocks_validated(max_blocks):
    with pytest.raises(ValueError) as info:
        WriteBehind({"t": Writer()}, max_blocks=max_blocks)
    assert str(info.value).startswith("max_blocks:") and str(max_blocks) in str(info.value)


def test_on_full_validated():
    with pytest.raises(ValueError) as info:
        WriteBehind({"t": Writer()}, max_blocks=1, on_full="wait")
    assert str(info.value).startswith("on_full:") and "'wait'" in str(info.value)


# -- exactly once ----------------------------------------------------------------------------------------


def test_every_job_written_once_and_released_once(make_wb):
    writers = {"lmdb": Writer(), "files": Writer()}
    wb = make_wb(writers, max_blocks=4)
    releases = Releases()
    for writer in writers.values():
        writer.releases = releases
    per_thread, threads_n = 50, 4
    barrier = threading.Barrier(threads_n)
    results: list[bool] = []
    errors: list[BaseException] = []

    def submitter(t: int) -> None:
        try:
            barrier.wait(LONG)
            for i in range(t * per_thread, (t + 1) * per_thread):
                for target in ("lmdb", "files"):
                    # One release per (target, key): count them under a target-specific key.
                    results.append(wb.submit(target, key(i), block(i), releases.callback(target.encode() + key(i))))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LONG)
    assert errors == []
    assert wb.flush(timeout=LONG)
    total = per_thread * threads_n
    assert results == [True] * (2 * total)
    expected = Counter({key(i): 1 for i in range(total)})
    for writer in writers.values():
        assert writer.written() == expected
        assert writer.released_before_write == []  # a source is held until its write is done
        for i in range(total):
            assert torch.equal(writer.blocks[key(i)], block(i))
    assert releases.all() == Counter({t.encode() + key(i): 1 for t in ("lmdb", "files") for i in range(total)})
    assert wb.counters.snapshot() == {"queued": 2 * total, "written": 2 * total, "dropped": 0, "coalesced": 0,
                                      "failed": 0}
    assert wb.depth() == {"lmdb": 0, "files": 0}
    assert not any(wb.pending(t, key(i)) for t in ("lmdb", "files") for i in range(total))


def test_coalesced_duplicate_written_once_released_at_once(make_wb):
    writer = Writer()
    wb = make_wb({"t": writer, "u": Writer()})
    releases = Releases()
    start_held(wb, writer, "t", key(0), releases)
    first, second = releases.callback(b"first"), releases.callback(b"second")
    assert wb.submit("t", key(1), block(1), first)
    assert wb.pending("t", key(1))
    assert wb.submit("t", key(1), block(1), second) is True  # already waiting: not queued twice
    assert releases.count(b"second") == 1  # released at once, nothing to hold
    assert releases.count(b"first") == 0  # still waiting for its write
    assert wb.depth()["t"] == 1
    assert wb.counters.get("coalesced") == 1
    assert wb.submit("u", key(1), block(1))  # the same key for another tier is its own job
    assert wb.counters.get("coalesced") == 1
    writer.go()
    assert wb.flush(timeout=LONG)
    assert writer.written() == Counter({key(0): 1, key(1): 1})
    assert releases.all() == Counter({key(0): 1, b"first": 1, b"second": 1})
    assert not wb.pending("t", key(1))
    assert wb.counters.get("written") == 3
    # Once written, the key may be queued again (it is no longer pending).
    assert wb.submit("t", key(1), block(1))
    assert wb.flush(timeout=LONG)
    assert writer.written()[key(1)] == 2
    assert wb.counters.get("coalesced") == 1


# -- batching and depth ----------------------------------------------------------------------------------


def test_jobs_queued_behind_a_busy_worker_are_batched(make_wb):
    writer = Writer()
    wb = make_wb({"t": writer}, max_blocks=8)
    start_held(wb, writer, "t", key(0))
    for i in range(1, 6):
        assert wb.submit("t", key(i), block(i))
    assert wb.depth() == {"t": 5}
    assert all(wb.pending("t", key(i)) for i in range(6))
    writer.go()
    assert wb.flush(timeout=LONG)
    assert writer.calls == [[key(0)], [key(i) for i in range(1, 6)]]  # one call for the five, in order
    assert wb.depth() == {"t": 0}
    assert not any(wb.pending("t", key(i)) for i in range(6))


def test_batches_hold_at_most_batch_jobs(make_wb):
    writer = Writer()
    wb = make_wb({"t": writer}, max_blocks=64)
    start_held(wb, writer, "t", key(0))
    n = 2 * BATCH + 3
    for i in range(1, n + 1):
        assert wb.submit("t", key(i), block(i))
    assert wb.depth() == {"t": n}
    writer.go()
    assert wb.flush(timeout=LONG)
    assert [len(call) for call in writer.calls] == [1, BATCH, BATCH, 3]
    assert [k for call in writer.calls for k in call] == [key(i) for i in range(n + 1)]


def test_depth_per_target(make_wb):
    held, free = Writer(), Writer()
    wb = make_wb({"held": held, "free": free})
    assert wb.depth() == {"held": 0, "free": 0}
    start_held(wb, held, "held", key(0))
    wb.submit("held", key(1), block(1))
    wb.submit("held", key(2), block(2))
    wb.submit("free", key(3), block(3))
    deadline = time.monotonic() + LONG
    while wb.pending("free", key(3)) and time.monotonic() < deadline:  # bounded polling
        time.sleep(0.001)
    assert wb.depth() == {"held": 2, "free": 0}  # the free worker drained its queue; the held one did not
    assert wb.flush(timeout=STILL_BLOCKED) is False
    assert free.written() == Counter({key(3): 1})
    assert not wb.pending("free", key(3))
    assert wb.pending("held", key(1)) and not wb.pending("free", key(1))


# -- full queues -----------------------------------------------------------------------------------------


def test_block_policy_blocks_submitter_until_drained(make_wb):
    writer = Writer()
    wb = make_wb({"t": writer}, max_blocks=2, on_full="block")
    releases = Releases()
    start_held(wb, writer, "t", key(0), releases)
    assert wb.submit("t", key(1), block(1), releases.callback(key(1)))
    assert wb.submit("t", key(2), block(2), releases.callback(key(2)))
    assert wb.depth() == {"t": 2}  # full
    returned = threading.Event()
    result: list[bool] = []

    def submit_third() -> None:
        result.append(wb.submit("t", key(3), block(3), releases.callback(key(3))))
        returned.set()

    thread = threading.Thread(target=submit_third)
    thread.start()
    assert not returned.wait(STILL_BLOCKED)  # blocked while the writer is held and the queue is full
    assert thread.is_alive()
    assert result == [] and wb.depth() == {"t": 2}
    assert releases.count(key(3)) == 0
    writer.go()
    assert returned.wait(LONG)
    thread.join(LONG)
    assert result == [True]
    assert wb.flush(timeout=LONG)
    assert writer.written() == Counter({key(i): 1 for i in range(4)})
    assert releases.all() == Counter({key(i): 1 for i in range(4)})
    assert wb.counters.get("dropped") == 0


def test_drop_policy_drops_and_counts_when_full(make_wb):
    writer = Writer()
    wb = make_wb({"t": writer}, max_blocks=1, on_full="drop")
    releases = Releases()
    start_held(wb, writer, "t", key(0), releases)
    assert wb.submit("t", key(1), block(1), releases.callback(key(1))) is True
    assert wb.submit("t", key(2), block(2), releases.callback(key(2))) is False  # full: dropped, not blocked
    assert wb.submit("t", key(3), block(3), releases.callback(key(3))) is False
    assert wb.counters.get("dropped") == 2
    assert releases.count(key(2)) == 1 and releases.count(key(3)) == 1  # a dropped job is released at once
    assert not wb.pending("t", key(2))
    assert wb.depth() == {"t": 1}
    writer.go()
    assert wb.flush(timeout=LONG)
    assert writer.written() == Counter({key(0): 1, key(1): 1})
    assert releases.all() == Counter({key(i): 1 for i in range(4)})
    # A dropped key is not blacklisted: with room again it is accepted and written.
    assert wb.submit("t", key(2), block(2), releases.callback(key(2))) is True
    assert wb.flush(timeout=LONG)
    assert writer.written()[key(2)] == 1
    assert releases.count(key(2)) == 2
    assert wb.counters.snapshot()["written"] == 3


def test_drop_policy_under_contention_accounts_for_every_job(make_wb):
    writer = Writer()
    wb = make_wb({"t": writer}, max_blocks=2, on_full="drop")
    releases = Releases()
    accepted: dict[bytes, bool] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def submitter(t: int) -> None:
        barrier.wait(LONG)
        for i in range(t * 100, (t + 1) * 100):
            ok = wb.submit("t", key(i), block(i), releases.callback(key(i)))
            with lock:
                accepted[key(i)] = ok

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LONG)
    assert wb.flush(timeout=LONG)
    assert len(accepted) == 400
    kept = {k for k, ok in accepted.items() if ok}
    assert writer.written() == Counter({k: 1 for k in kept})  # every accepted job written once
    assert wb.counters.get("dropped") == 400 - len(kept)
    assert releases.all() == Counter({key(i): 1 for i in range(400)})  # every job released once


# -- flush -----------------------------------------------------------------------------------------------


def test_flush_waits_for_in_flight_jobs(make_wb):
    writer = Writer()
    wb = make_wb({"t": writer})
    assert wb.flush(timeout=LONG) is True  # nothing to wait for
    start_held(wb, writer, "t", key(0))
    assert wb.flush(timeout=STILL_BLOCKED) is False  # the job is taken off the queue, not yet written
    assert wb.depth() == {"t": 0}
    assert wb.pending("t", key(0))
    flushed = threading.Event()
    thread = threading.Thread(target=lambda: wb.flush() and flushed.set())
    thread.start()
    assert not flushed.wait(STILL_BLOCKED)
    writer.go()
    assert flushed.wait(LONG)
    thread.join(LONG)
    assert writer.written() == Counter({key(0): 1})
    assert not wb.pending("t", key(0))


def test_flush_returns_once_the_jobs_before_it_are_written_while_others_keep_putting(make_wb):
    """Two threads putting all along kept a global count of unfinished jobs above zero: ``flush`` waited
    until its timeout (forever without one) though the jobs before it were written in milliseconds."""
    class SlowWriter(Writer):  # slower than the producers: the queue never empties while they run
        def __call__(self, items) -> None:
            super().__call__(items)
            time.sleep(0.001)
    writer = SlowWriter()
    wb = make_wb({"t": writer}, max_blocks=4)
    stop = threading.Event()
    accepted: list[bytes] = []  # appended after submit returns: each was accepted before its append

    def producer(first: int) -> None:
        i = first
        while not stop.is_set():
            assert wb.submit("t", key(i), block(i))
            accepted.append(key(i))
            i += 2
    producers = [threading.Thread(target=producer, args=(n,)) for n in (0, 1)]
    for thread in producers:
        thread.start()
    while len(accepted) < 20:
        time.sleep(0.001)
    before = list(accepted)
    try:
        assert wb.flush(timeout=LONG) is True
    finally:
        stop.set()
        for thread in producers:
            thread.join(LONG)
    written = writer.written()
    assert [k for k in before if not written[k]] == []


def test_flush_waits_for_the_writes_its_jobs_queue_while_they_are_written(make_wb):
    """A write that queues another (an LMDB eviction's write-back to the files tier) is part of the work
    ``flush`` waits for, also during ``close``."""
    below = Writer()
    wb = None

    def above(items) -> None:
        for k, b in items:
            assert wb.submit("below", k, b)
    wb = make_wb({"above": above, "below": below})
    below.hold()
    assert wb.submit("above", key(1), block(1))
    assert below.entered.wait(LONG)
    assert wb.flush(timeout=STILL_BLOCKED) is False
    below.go()
    assert wb.flush(timeout=LONG) is True and below.written() == Counter({key(1): 1})
    assert wb.submit("above", key(2), block(2))
    wb.close()
    assert below.written() == Counter({key(1): 1, key(2): 1})


# -- failures --------------------------------------------------------------------------------------------


def test_a_release_that_raises_is_counted_and_kills_nothing(make_wb):
    """A tier's ``unpin`` (the release of a job's source slot) that raised in the worker killed it: ``flush``
    never returned True again and ``close`` waited forever. A coalesced job's release raised into ``put``."""
    writer = Writer()
    wb = make_wb({"t": writer})

    def broken() -> None:
        raise OSError(5, "unpin failed")
    writer.hold()
    assert wb.submit("t", key(1), block(1), broken)
    assert writer.entered.wait(LONG)
    assert wb.submit("t", key(1), block(1), broken)  # coalesced: released at once, in this thread
    writer.go()
    assert wb.flush(timeout=LONG) is True
    assert wb.submit("t", key(2), block(2))
    assert wb.flush(timeout=LONG) is True
    assert writer.written() == Counter({key(1): 1, key(2): 1})
    assert wb.counters.snapshot()["failed"] == 2
    wb.close()
    assert not kvstore_threads()


def test_raising_writer_does_not_kill_the_worker(make_wb):
    writer = Writer(fail_on={key(13)})
    wb = make_wb({"t": writer})
    releases = Releases()
    assert wb.submit("t", key(13), block(13), releases.callback(key(13)))
    assert wb.flush(timeout=LONG)
    assert wb.counters.get("failed") == 1 and wb.counters.get("written") == 0
    assert releases.count(key(13)) == 1  # released even though the write failed
    assert not wb.pending("t", key(13))
    for i in range(3):
        assert wb.submit("t", key(i), block(i), releases.callback(key(i)))
    assert wb.flush(timeout=LONG)
    assert writer.written() == Counter({key(13): 1, key(0): 1, key(1): 1, key(2): 1})
    snap = wb.counters.snapshot()
    assert (snap["failed"], snap["written"]) == (1, 3)
    assert releases.all() == Counter({key(13): 1, key(0): 1, key(1): 1, key(2): 1})
    # The failed key can be retried.
    writer.fail_on.clear()
    assert wb.submit("t", key(13), block(13))
    assert wb.flush(timeout=LONG)
    assert wb.counters.get("written") == 4


def test_failed_batch_counts_every_job(make_wb):
    writer = Writer(fail_on={key(2)})
    wb = make_wb({"t": writer})
    start_held(wb, writer, "t", key(0))
    for i in (1, 2, 3):
        wb.submit("t", key(i), block(i))
    writer.go()
    assert wb.flush(timeout=LONG)
    assert writer.calls == [[key(0)], [key(1), key(2), key(3)]]
    snap = wb.counters.snapshot()
    assert (snap["written"], snap["failed"]) == (1, 3)


def test_unknown_target_leaves_no_phantom_job():
    # No make_wb here: were the job left pending, close() would wait for it forever.
    writer = Writer()
    wb = WriteBehind({"t": writer}, max_blocks=2)
    with pytest.raises(ValueError, match=r"target: expected one of \['t'\], got 'nope'"):
        wb.submit("nope", key(1), block(1))
    assert not wb.pending("nope", key(1))
    assert wb.flush(timeout=STILL_BLOCKED)
    wb.close()


# -- close -----------------------------------------------------------------------------------------------


def test_close_flushes_then_stops_every_worker(make_wb):
    before = kvstore_threads()
    held, other = Writer(), Writer()
    wb = make_wb({"held": held, "other": other})
    mine = kvstore_threads() - before
    assert {t.name for t in mine} == {"kvstore-write-held", "kvstore-write-other"}
    releases = Releases()
    start_held(wb, held, "held", key(0), releases)
    for i in (1, 2):
        wb.submit("held", key(i), block(i), releases.callback(key(i)))
    wb.submit("other", key(9), block(9), releases.callback(key(9)))
    closed = threading.Event()
    closer = threading.Thread(target=lambda: (wb.close(), closed.set()))
    closer.start()
    assert not closed.wait(STILL_BLOCKED)  # close waits for the held jobs to be written
    held.go()
    assert closed.wait(LONG)
    closer.join(LONG)
    assert held.written() == Counter({key(0): 1, key(1): 1, key(2): 1})
    assert other.written() == Counter({key(9): 1})
    assert releases.all() == Counter({key(i): 1 for i in (0, 1, 2, 9)})
    assert not any(t.is_alive() for t in mine)
    assert kvstore_threads() - before == set()
    with pytest.raises(RuntimeError):
        wb.submit("held", key(3), block(3))
    assert held.written()[key(3)] == 0
    wb.close()  # idempotent
    assert wb.flush(timeout=LONG)


def test_close_idle_instance(make_wb):
    before = kvstore_threads()
    wb = make_wb({"a": Writer(), "b": Writer(), "c": Writer()})
    assert len(kvstore_threads() - before) == 3
    wb.close()
    assert kvstore_threads() - before == set()
    with pytest.raises(RuntimeError, match="closed"):
        wb.submit("a", key(0), block(0))


def test_a_target_stuck_in_a_write_stops_blocking_submits_and_close():
    """A writer that never returns (a share that stopped answering) blocked every submit once its queue was
    full, and ``close`` for ever: after ``stall_seconds`` its copies are dropped (counted), ``on_stall`` is
    told once, and ``close`` returns naming it; a target that still writes is flushed as before."""
    gate, written, stalls = threading.Event(), [], []
    released = Counter()

    def hung(items):
        gate.wait(60)

    writes = WriteBehind({"hung": hung, "fine": lambda items: written.extend(k for k, _ in items)}, max_blocks=1,
                         on_stall=lambda target, seconds: stalls.append((target, seconds)), stall_seconds=0.3)
    try:
        accepted = [writes.submit("hung", key(i), block(i), release=lambda i=i: released.update([i]))
                    for i in range(4)]
        assert accepted[0] and False in accepted  # the first is being written, the queue full, then dropped
        assert stalls == [("hung", 0.3)]
        assert writes.submit("fine", key(9), block(9))
        assert writes.close() == {"hung"}
        assert written == [key(9)]
        assert writes.counters.snapshot()["dropped"] >= 2
        assert sum(released.values()) == 3 and released[0] == 0  # every job but the one inside the write
    finally:
        gate.set()
    for _ in range(100):
        if released[0]:
            break
        time.sleep(0.05)
    assert released[0] == 1  # the stuck write ended after close: its source released then
