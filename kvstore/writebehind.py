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
"""

from __future__ import annotations

import logging
import queue
import threading
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

    def __init__(self, writers: dict[str, Writer], max_blocks: int, on_full: str = "block"):
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
        self._cond = threading.Condition()
        self._closed = False
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
        with self._cond:
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
        try:
            if self._on_full == "block":
                self._queues[target].put(job)
            else:
                self._queues[target].put_nowait(job)
        except queue.Full:
            self._finish(target, [job])
            self.counters.add("dropped")
            return False
        self.counters.add("queued")
        return True

    def pending(self, target: str, key: bytes) -> bool:
        with self._cond:
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
            try:
                self._writers[target]([(job.key, job.block) for job in jobs])
                self.counters.add("written", len(jobs))
            except Exception:  # the writer records its own tier's errors; a worker never dies of one
                log.exception("write-behind to %s failed for %d blocks", target, len(jobs))
                self.counters.add("failed", len(jobs))
            finally:
                self._writing.number = None
                self._finish(target, jobs)

    def _finish(self, target: str, jobs: list[Job]) -> None:
        released = sum(job.done() for job in jobs)
        if released < len(jobs):
            self.counters.add("failed", len(jobs) - released)
        with self._cond:
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
        with self._cond:
            before = self._accepted
            return self._cond.wait_for(lambda: not self._unfinished or min(self._unfinished) >= before, timeout)

    def close(self) -> None:
        """Flush, then stop and join every worker. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        self.flush()
        for q in self._queues.values():
            q.put(_STOP)
        for thread in self._threads:
            thread.join()
