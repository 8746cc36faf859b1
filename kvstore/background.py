"""kvstore's background threads: their manners (they leave the cores to the engine's), and a pool for I/O.

A write-behind worker encodes and copies blocks while the engine prefills
the next request. On a machine with few cores it slowed that prefill in two
ways (the no-reuse workload's first pass, ec4 disk tier, 2 cores):

- Priority: the scheduler shares a core equally between runnable threads of
  the same nice value. A niced thread gets what the engine leaves.
- torch's intra-op threads: a torch op on a new thread runs on an OpenMP
  team of its own, as many threads as cores, whose threads spin after each
  op on the cores the engine's own team needs. A background thread's ops
  run on that thread alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

# A background thread's nice value (Linux: per-thread), the lowest priority: at 10, an ec4 disk tier's encoding
# still cost the no-reuse first pass 3% of its TTFT on 2 cores; at 19, 1%.
BACKGROUND_NICENESS = 19


def start_threads(threads: list[threading.Thread], close: Callable[[], None]) -> None:
    """Start ``threads``, the owner's own list; if one cannot be started (the OS refused it), drop the ones
    not started from that list, ``close`` the owner (which joins those running) and raise: a refused third
    worker left the first two running after the store failed to open."""
    for n, thread in enumerate(threads):
        try:
            thread.start()
        except BaseException:
            del threads[n:]
            close()
            raise


def lower_priority() -> None:
    """Set the calling thread's nice value to ``BACKGROUND_NICENESS``, where the OS allows it."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)
    except (AttributeError, OSError):
        pass  # not Linux, or not permitted: the thread keeps its priority


def single_threaded_torch() -> None:
    """Make torch's CPU ops on the calling thread use this thread alone; other threads keep theirs.

    ``torch.set_num_threads`` cannot do it: it also sets the count every
    thread started later begins with (an engine's threads included). The
    OpenMP thread count is a per-thread setting; torch sets it once, on a
    thread's first parallel op, so it is asked first and then lowered.
    Without an OpenMP runtime (a build on torch's own pool) nothing changes.
    """
    torch.get_num_threads()
    try:
        set_threads = ctypes.CDLL(None).omp_set_num_threads
    except (AttributeError, OSError):
        return
    set_threads(1)


def become_background_worker() -> None:
    """Called first by a thread that encodes or copies blocks in the background."""
    lower_priority()
    single_threaded_torch()


class IOPool:
    """A few threads running one owner's blocking calls (file writes, which release the GIL) side by side.

    The threads start on first use, and again in a forked child: a pool's
    threads do not survive a fork, and an executor inherited through one
    queues work nobody runs. Their torch ops run on one thread each (an
    encoder's), as ``single_threaded_torch`` says. With ``threads == 1``, or
    after ``close``, calls run in the caller's thread.
    """

    def __init__(self, threads: int, name: str):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads: expected an integer >= 1, got {threads!r}")
        self.threads = threads
        self._name = name
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0
        self._closed = False

    def submit(self, fn: Callable[..., T], *args: object) -> "Future[T]":
        """Run ``fn(*args)`` on a pool thread; its future."""
        with self._lock:
            inline = self.threads == 1 or self._closed
            if not inline and (self._pool is None or self._pid != os.getpid()):
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=self._name,
                                                initializer=single_threaded_torch)
                self._pid = os.getpid()
            if not inline:
                return self._pool.submit(fn, *args)
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # the caller sees it from result(), as from a pool thread
            future.set_exception(exc)
        return future

    def close(self) -> None:
        """Wait for the calls submitted so far and stop the threads; later calls run inline. Idempotent."""
        with self._lock:
            pool, self._pool, self._closed = self._pool, None, True
        if pool is not None and self._pid == os.getpid():
            pool.shutdown(wait=True)

    def __enter__(self) -> "IOPool":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def run_while_progressing(work: Callable[[], None], progress: Callable[[], int], stall_seconds: float,
                          name: str) -> threading.Thread | None:
    """Run ``work`` on a daemon thread and wait while ``progress()`` keeps changing; None once it ended, or its
    thread (still running) when ``progress()`` stood still for ``stall_seconds``: a tier stuck in a write (a
    share that stopped answering) held a store's close for ever. ``work``'s exceptions are logged."""
    def guarded() -> None:
        try:
            work()
        except Exception:
            log.exception("%s failed", name)

    thread = threading.Thread(target=guarded, name=name, daemon=True)
    thread.start()
    seen, since = progress(), time.monotonic()
    while True:
        thread.join(timeout=min(1.0, stall_seconds))
        if not thread.is_alive():
            return None
        now, moved = time.monotonic(), progress()
        if moved != seen:
            seen, since = moved, now
        elif now - since >= stall_seconds:
            return thread

