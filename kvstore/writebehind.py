"""Write-behind: lower-tier writes on background workers behind bounded queues.

``put`` returns once a block is in the fastest tier; copies for slower tiers
are queued here, one bounded queue and one worker thread per target tier (a
worker drains up to ``BATCH`` jobs into one ``write`` call, one LMDB
transaction). A job holds its source block (usually a pinned slot of a
faster tier) until written, then calls its ``release``. When a queue is full
the caller is blocked (``block``) or the lower copy is dropped and counted
(``drop``). ``flush()`` returns once every job accepted before it was
called has been written (jobs accepted meanwhile cannot keep it waiting);
``close()`` flushes and stops every worker.

A tier whose write has not ended for ``stall_seconds`` (a hard-mounted
share that stopped answering) is stuck: a put no longer waits for room in
its queue, and ``close`` drops its queued copies and leaves its worker (a
daemon) to the write. Both waited for ever: the engine's puts, and SGLang's
shutdown.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvstore.background import become_background_worker, start_threads
from kvstore.config import QUEUE_FULL_POLICIES
from kvstore.metrics import Counters

log = logging.getLogger(__name__)

BATCH = 16
# Writes ``[(key, block), ...]`` to one tier; exceptions are the writer's to handle.
Writer = Callable[[Sequence[tuple[bytes, torch.Tensor]]], None]
_STOP = object()
# A target whose worker has been inside one write this long is stuck (seconds).
STALL_SECONDS = 30.0
# Stalled: ``(target, seconds)``, called once a target is found stuck.
OnStall = Callable[[str, float], None]


class WriteBehindClosed(RuntimeError):
    """A job submitted after ``close`` began (a put racing its store's close)."""


@dataclass
class Job:
    key: bytes
    block: torch.Tensor
    release: Callable[[], None] | None = None
    number: int = -1  # in the order accepted, for ``flush``

    def done(self) -> bool:
        """Release the job's source; False if the release raised (a tier's unpin: its slot stays pinned)."""
        try:
            if self.release is not None:
                self.release()
            return True
        except Exception:  # raised in a worker, it killed the worker and flush and close waited forever
            log.exception("write-behind: releasing the source of the block %s failed", self.key.hex()[:16])
            return False


class WriteBehind:
    """Background writers for named target tiers, each behind a queue of ``max_blocks`` jobs."""

    def __init__(self, writers: dict[str, Writer], max_blocks: int, on_full: str = "block",
                 on_stall: OnStall | None = None, stall_seconds: float | None = None):
        if max_blocks < 1:
            raise ValueError(f"max_blocks: expected >= 1, got {max_blocks}")
        if on_full not in QUEUE_FULL_POLICIES:
            raise ValueError(f"on_full: expected one of {list(QUEUE_FULL_POLICIES)}, got {on_full!r}")
        self._writers = dict(writers)
        self._on_full = on_full
        self._queues = {name: queue.Queue(maxsize=max_blocks) for name in writers}
        self._pending: set[tuple[str, bytes]] = set()
        # Numbers of the jobs accepted and not yet finished (bounded by the queues), counted: a job a writer
        # queues while it writes (an eviction's write-back below) takes the number of the batch it came from.
        self._unfinished: Counter[int] = Counter()
        self._accepted = 0  # jobs accepted so far: the next new job's number
        self._writing = threading.local()  # in a worker: the number of the batch it is writing
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._closed = False
        self._finished = False  # closed, every worker stopped
        self._on_stall = on_stall
        self.stall_seconds = STALL_SECONDS if stall_seconds is None else stall_seconds
        self._open = Counter({name: 0 for name in writers})  # jobs accepted and not finished, per target
        self._writing_since: dict[str, float | None] = dict.fromkeys(writers)  # when each worker's write began
        self._stuck: set[str] = set()  # targets whose worker is inside a write that has not ended
        self.counters = Counters("queued", "written", "dropped", "coalesced", "failed")
        self._threads = [threading.Thread(target=self._work, args=(name,), name=f"kvstore-write-{name}", daemon=True)
                         for name in writers]
        start_threads(self._threads, self.close)

    def submit(self, target: str, key: bytes, block: torch.Tensor,
               release: Callable[[], None] | None = None) -> bool:
        """Queue ``block`` for tier ``target``; False if it was dropped (queue full, ``drop`` policy).

        A job for the same key and target already queued or being written is not queued twice.
        ``release`` is called once the job is written, dropped or coalesced.
        """
        if target not in self._queues:
            raise ValueError(f"target: expected one of {sorted(self._queues)}, got {target!r}")
        job = Job(key, block, release)
        with self._lock:
            if self._closed and getattr(self._writing, "number", None) is None:  # close still waits for a writer's
                raise WriteBehindClosed("write-behind is closed")
            if (target, key) in self._pending:
                self.counters.add("coalesced")
                if not job.done():
                    self.counters.add("failed")
                return True
            self._pending.add((target, key))
            job.number = getattr(self._writing, "number", None)
            if job.number is None:
                job.number = self._accepted
                self._accepted += 1
            self._unfinished[job.number] += 1
            self._open[target] += 1
        try:
            if self._on_full == "block":
                self._put_waiting(target, job)
            else:
                self._queues[target].put_nowait(job)
        except queue.Full:
            self._finish(target, [job])
            self.counters.add("dropped")
            return False
        self.counters.add("queued")
        return True

    def _put_waiting(self, target: str, job: Job) -> None:
        """Wait for room in ``target``'s full queue while its worker makes progress; ``queue.Full`` once it is
        stuck in a write."""
        while target not in self._stuck:
            try:
                self._queues[target].put(job, timeout=min(1.0, self.stall_seconds))
                return
            except queue.Full:
                self._check_stalled(target)
        raise queue.Full

    def _check_stalled(self, target: str) -> bool:
        """Whether ``target`` is stuck: its worker inside one write for ``stall_seconds``; told once."""
        with self._lock:
            since = self._writing_since[target]
            if target in self._stuck or since is None or time.monotonic() - since < self.stall_seconds:
                return target in self._stuck
            self._stuck.add(target)
        log.warning("write-behind to %s: a write has not ended in %.0f s; its copies are dropped until it does",
                    target, self.stall_seconds)
        if self._on_stall is not None:
            self._on_stall(target, self.stall_seconds)
        return True

    def pending(self, target: str, key: bytes) -> bool:
        with self._lock:
            return (target, key) in self._pending

    def _work(self, target: str) -> None:
        become_background_worker()
        jobs_queue = self._queues[target]
        while True:
            first = jobs_queue.get()
            if first is _STOP:
                return
            jobs = [first]
            while len(jobs) < BATCH:
                try:
                    job = jobs_queue.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP:
                    jobs_queue.put(_STOP)  # handle the batch first, then stop
                    break
                jobs.append(job)
            self._writing.number = min(job.number for job in jobs)
            with self._lock:
                self._writing_since[target] = time.monotonic()
            try:
                self._writers[target]([(job.key, job.block) for job in jobs])
                self.counters.add("written", len(jobs))
            except Exception:  # the writer records its own tier's errors; a worker never dies of one
                log.exception("write-behind to %s failed for %d blocks", target, len(jobs))
                self.counters.add("failed", len(jobs))
            finally:
                self._writing.number = None
                with self._lock:
                    self._writing_since[target] = None
                    self._stuck.discard(target)
                self._finish(target, jobs)

    def _finish(self, target: str, jobs: list[Job]) -> None:
        released = sum(job.done() for job in jobs)
        if released < len(jobs):
            self.counters.add("failed", len(jobs) - released)
        with self._lock:
            self._open[target] -= len(jobs)
            for job in jobs:
                self._pending.discard((target, job.key))
                self._unfinished[job.number] -= 1
                if not self._unfinished[job.number]:
                    del self._unfinished[job.number]
            self._cond.notify_all()

    def depth(self) -> dict[str, int]:
        """Jobs waiting per target tier."""
        return {name: q.qsize() for name, q in self._queues.items()}

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every job accepted before this call is written; False if ``timeout`` seconds ran out first.

        Jobs accepted while it waits are not waited for (with other threads
        putting all along, waiting for an empty queue never ended), except those
        the waited-for writes queue themselves (their evictions' write-back).
        """
        with self._lock:
            before = self._accepted
            return self._cond.wait_for(lambda: not self._unfinished or min(self._unfinished) >= before, timeout)

    def close(self) -> set[str]:
        """Flush, then stop and join every worker; returns the targets left stuck in a write, whose queued
        copies were dropped and whose workers (daemons) are not waited for. Idempotent; a close a signal's
        exception (KeyboardInterrupt) interrupted is finished by the next."""
        with self._lock:
            if self._finished:
                return set()
            self._closed = True
        while True:
            with self._lock:
                if self._cond.wait_for(lambda: all(not self._open[t] or t in self._stuck for t in self._queues),
                                       timeout=min(1.0, self.stall_seconds)):
                    stuck = set(self._stuck)
                    break
            for target in self._queues:
                if self._check_stalled(target):
                    self._drop_queued(target)
        for name, q in self._queues.items():
            if name in stuck:
                self._drop_queued(name)
            q.put(_STOP)  # empty, or emptied
        for thread, name in zip(self._threads, self._queues):
            if name not in stuck:
                thread.join()
        self._finished = True
        return stuck

    def join(self, target: str) -> None:
        """Wait for ``target``'s worker to end (after ``close``: a stuck one, once its write ends)."""
        self._threads[list(self._queues).index(target)].join()

    def _drop_queued(self, target: str) -> None:
        """Finish ``target``'s queued jobs unwritten, counted ``dropped``."""
        jobs = []
        while True:
            try:
                job = self._queues[target].get_nowait()
            except queue.Empty:
                break
            if job is not _STOP:
                jobs.append(job)
        if jobs:
            self.counters.add("dropped", len(jobs))
            self._finish(target, jobs)
