"""Prefetch: bring a request's cached blocks up into the fastest tier before the engine asks.

``KVStore.prefetch`` returns a ``PrefetchHandle`` at once; background
workers (a fixed number, behind one bounded queue) read each block from the
tier that holds it and put it in the fastest tier, where the handle pins it
so it cannot be evicted before the engine loads it. Two requests that need
the same block share one read (an in-flight table keyed by block key).
Cancelling a handle, closing it, or dropping the last reference to it
releases its pins, and fetches nobody waits for any more are skipped.

How long the engine waits when it asks is the handle's policy:
``best_effort`` uses what is ready, ``wait`` waits for everything, and
``timeout`` waits at most ``base + per_1k * tokens / 1000`` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvstore.background import start_threads
from kvstore.config import PREFETCH_POLICIES
from kvstore.gate import check_process
from kvstore.keys import BlockRef
from kvstore.metrics import Counters
from kvstore.validation import check_timeout

log = logging.getLogger(__name__)

BEST_EFFORT, WAIT, TIMEOUT = PREFETCH_POLICIES
PREFETCH_COUNTERS = ("prefetches", "prefetch_blocks", "prefetch_ready_blocks", "prefetch_fetched",
                     "prefetch_coalesced", "prefetch_failed", "prefetch_cancelled", "prefetch_dropped",
                     "prefetch_pin_limited")
_STOP = object()
# How long close waits for the workers to stop (seconds): one inside a read of a hung share never would.
CLOSE_JOIN_SECONDS = 30.0
# A worker with nothing to fetch releases the handles the garbage collector freed at least this often.
ORPHAN_SWEEP_SECONDS = 0.5
# How often a wait that may be stopped (``PrefetchHandle.result``) looks at its stop condition.
STOP_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class PrefetchPolicy:
    """How long ``PrefetchHandle.result`` waits: ``policy`` and, for ``timeout``, seconds base + per 1k tokens."""

    policy: str = BEST_EFFORT
    timeout_base_seconds: float = 0.02
    timeout_per_1k_tokens_seconds: float = 0.02

    def __post_init__(self) -> None:
        if self.policy not in PREFETCH_POLICIES:
            raise ValueError(f"policy: expected one of {list(PREFETCH_POLICIES)}, got {self.policy!r}")
        for name in ("timeout_base_seconds", "timeout_per_1k_tokens_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {value!r}")

    def budget(self, num_tokens: int) -> float | None:
        """Seconds to wait for ``num_tokens`` tokens (None: no limit)."""
        return {BEST_EFFORT: 0.0, WAIT: None,
                TIMEOUT: self.timeout_base_seconds + self.timeout_per_1k_tokens_seconds * num_tokens / 1000}[self.policy]


class _Fetch:
    """One block being brought up; shared by every handle that needs it."""

    __slots__ = ("block", "event", "waiters", "ok")

    def __init__(self, block: BlockRef):
        self.block = block
        self.event = threading.Event()
        self.waiters: list[_HandleState] = []
        self.ok = False


class _HandleState:
    """What a handle owns (kept apart from the handle so dropping the handle can release it)."""

    def __init__(self, blocks: Sequence[BlockRef], request_tokens: int, request_key: bytes | None = None):
        self.blocks = list(blocks)
        self.request_tokens = request_tokens
        self.request_key = request_key  # the key of the request's first block: which prompt (and salt) it is
        self.index = {block.key: i for i, block in enumerate(self.blocks)}
        self.views: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.fetches: list[_Fetch | None] = [None] * len(self.blocks)
        self.found: set[bytes] = set()  # pinned where they were found, in the fastest tier: no fetch read them
        self.closed = False


class Prefetcher:
    """Background workers that bring blocks into the fastest tier and pin them there.

    ``fetch(block)`` reads a block from wherever it is stored into the
    fastest tier (True when it is there afterwards); ``pin(key)`` /
    ``unpin(key)`` pin it there (``pin`` returns the block's view or None).
    At most ``max_pins`` blocks (None: no limit) are pinned by all handles
    together, and at most ``queue_blocks`` fetches wait in the queue.
    """

    def __init__(self, fetch: Callable[[BlockRef], bool], pin: Callable[[bytes], torch.Tensor | None],
                 unpin: Callable[[bytes], None], workers: int = 2, queue_blocks: int = 256,
                 max_pins: int | None = None):
        if workers < 1:
            raise ValueError(f"prefetch_workers: expected an integer >= 1, got {workers!r}")
        self._fetch = fetch
        self._pin = pin
        self._unpin = unpin
        self.pid = os.getpid()  # its workers' process: a forked child's waits would never end
        self._max_pins = max_pins
        self._pins = 0
        self._lock = threading.RLock()
        # Handles the garbage collector freed: their pins are released here later, never in the finalizer,
        # which runs at any allocation of any thread, inside a tier's lock too (a slot tier's unpin then
        # waited for the lock its own thread held, and froze the store). deque.append takes no lock.
        self._orphans: deque[_HandleState] = deque()
        self._inflight: dict[bytes, _Fetch] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=queue_blocks)
        self.counters = Counters(*PREFETCH_COUNTERS)
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"kvstore-prefetch-{i}", daemon=True)
                         for i in range(workers)]
        start_threads(self._threads, self.close)

    def start(self, leading: Sequence[BlockRef], policy: PrefetchPolicy, request_tokens: int,
              request_key: bytes | None = None) -> "PrefetchHandle":
        """A handle bringing up ``leading``, the stored leading blocks of a request of ``request_tokens``
        tokens (the ``timeout`` policy's budget grows with the request) whose first block's key is
        ``request_key`` (so a load can tell the handle of another prompt, even one that found nothing)."""
        self._sweep()
        leading = list(leading)
        state = _HandleState(leading, request_tokens, request_key)
        handle = PrefetchHandle(self, state, policy)
        self.counters.add("prefetches")
        self.counters.add("prefetch_blocks", len(leading))
        with self._lock:
            for i, block in enumerate(leading):
                if self._closed:
                    break
                if self._max_pins is not None and self._pins >= self._max_pins:
                    self.counters.add("prefetch_pin_limited", len(leading) - i)
                    break
                view = self._pin(block.key)
                if view is not None:
                    self._pins += 1
                    state.views[i] = view
                    state.found.add(block.key)
                    self.counters.add("prefetch_ready_blocks")
                    continue
                fetch = self._inflight.get(block.key)
                if fetch is None:
                    fetch = _Fetch(block)
                    try:  # registered and queued, or neither (an interrupt between left a fetch the worker
                        self._inflight[block.key] = fetch  # could not find, or one it never ran)
                        self._queue.put_nowait(fetch)
                    except queue.Full:
                        self._forget(fetch)
                        self.counters.add("prefetch_dropped", len(leading) - i)
                        break
                    except BaseException:  # a signal's exception: a fetch queued with no waiter is cancelled
                        self._forget(fetch)
                        raise
                else:
                    self.counters.add("prefetch_coalesced")
                # recorded, reserved, then waiting: a signal's exception lands after the append (a call) if at all,
                # and ``release`` finds through ``fetches`` every waiter it must drop
                state.fetches[i] = fetch
                self._pins += 1  # reserved now, released if the fetch fails
                fetch.waiters.append(state)
        return handle

    def _work(self) -> None:
        while True:
            try:
                fetch = self._queue.get(timeout=ORPHAN_SWEEP_SECONDS)
            except queue.Empty:
                self._sweep()
                continue
            if fetch is _STOP:
                return
            if self._orphans:  # a busy worker sweeps too: the dropped handles' fetches are then not wanted
                self._sweep()
            with self._lock:
                wanted = bool(fetch.waiters) and not self._closed
                if not wanted:
                    self._forget(fetch)
            if not wanted:
                self.counters.add("prefetch_cancelled")
                fetch.event.set()
                continue
            try:
                ok = self._fetch(fetch.block)
            except Exception:  # tier failures are handled below the fetch: this is a bug, not a medium
                log.exception("prefetch of tokens [%d, %d) failed", fetch.block.start, fetch.block.end)
                ok = False
            self.counters.add("prefetch_fetched" if ok else "prefetch_failed")
            with self._lock:
                self._forget(fetch)
                waiters, fetch.waiters = fetch.waiters, []
                for state in waiters:
                    view = self._pin(fetch.block.key) if ok else None
                    if view is None:
                        self._pins -= 1
                    else:
                        state.views[state.index[fetch.block.key]] = view
                fetch.ok = ok
            fetch.event.set()

    def _forget(self, fetch: "_Fetch") -> None:
        """Under the lock: ``fetch`` is no longer in flight (if it still is the one for its block)."""
        if self._inflight.get(fetch.block.key) is fetch:
            del self._inflight[fetch.block.key]

    def orphaned(self, state: _HandleState) -> None:
        """A handle's finalizer: ``state`` is released by a worker (or the next call) instead; no lock here."""
        self._orphans.append(state)

    def _sweep(self) -> None:
        """Release the states of handles the garbage collector freed."""
        while self._orphans:
            try:
                state = self._orphans.popleft()
            except IndexError:  # another thread took the last one
                return
            self.release(state)

    def release(self, state: _HandleState) -> None:
        """Unpin what ``state`` holds and stop waiting for its fetches (idempotent)."""
        with self._lock:
            if state.closed:
                return
            state.closed = True
            for i, fetch in enumerate(state.fetches):
                if fetch is not None and state in fetch.waiters:
                    fetch.waiters.remove(state)
                    self._pins -= 1
                view, state.views[i] = state.views[i], None
                if view is not None:
                    self._unpin(state.blocks[i].key)
                    self._pins -= 1

    def pinned(self) -> int:
        """Blocks pinned (or reserved for a pin) by live handles."""
        self._sweep()
        with self._lock:
            return self._pins

    def close(self) -> None:
        """Stop the workers; queued fetches past room for the stop marks are dropped, and every waiting handle
        wakes up. A worker still inside a read after ``CLOSE_JOIN_SECONDS`` (a filesystem that stopped
        answering) is left to it: it is a daemon, and close waited for ever."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for _ in self._threads:  # queued fetches make way for the stop marks, even if the workers are stuck
            while True:
                try:
                    self._queue.put_nowait(_STOP)
                    break
                except queue.Full:
                    with contextlib.suppress(queue.Empty):
                        self._queue.get_nowait()
        deadline = time.monotonic() + CLOSE_JOIN_SECONDS
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("prefetch: %s is still inside a read at close (its tier has stopped answering?); "
                            "left to it", thread.name)
        self._sweep()
        with self._lock:
            for fetch in self._inflight.values():
                fetch.event.set()
            self._inflight.clear()


class PrefetchHandle:
    """A prefetch in flight: which of the request's leading tokens are ready in the fastest tier.

    Pins stay until ``close()`` / ``cancel()`` (or the handle is garbage
    collected); the store's ``load(..., prefetch=handle)`` closes it.
    """

    def __init__(self, prefetcher: Prefetcher, state: _HandleState, policy: PrefetchPolicy):
        self._prefetcher = prefetcher
        self._state = state
        self.policy = policy
        self._finalizer = weakref.finalize(self, prefetcher.orphaned, state)
        self._handed_over = False
        self._hand_over_lock = threading.Lock()

    def made_by(self, prefetcher: Prefetcher) -> bool:
        """Whether ``prefetcher`` (one store's) started this prefetch: its pins and readiness are that store's."""
        return self._prefetcher is prefetcher

    @property
    def blocks(self) -> list[BlockRef]:
        """The request's leading blocks some tier held when the prefetch started."""
        return self._state.blocks

    @property
    def request_key(self) -> bytes | None:
        """The key of the first block of the request this handle was started for (None: not recorded)."""
        return self._state.request_key

    @property
    def found_ready(self) -> frozenset[bytes]:
        """Keys of the blocks pinned where they were found, in the fastest tier (a fetch read the others)."""
        return frozenset(self._state.found)

    @property
    def num_tokens(self) -> int:
        """Tokens this prefetch brings up if every fetch succeeds."""
        return self._state.blocks[-1].end if self._state.blocks else 0

    def done(self) -> bool:
        """True when no fetch of this handle is still queued or running."""
        return all(f is None or f.event.is_set() for f in self._state.fetches)

    def ready(self) -> int:
        """Leading tokens pinned in the fastest tier right now."""
        ready = 0
        for block, view in zip(self._state.blocks, self._state.views):
            if view is None:
                break
            ready = block.end
        return ready

    def wait(self, timeout: float | None = None) -> int:
        """Wait up to ``timeout`` seconds (None: until done); returns leading tokens ready in the fastest tier."""
        return self._wait(check_timeout(timeout))

    def _wait(self, timeout: float | None, stop: Callable[[], bool] | None = None) -> int:
        """``wait``; with ``stop``, in slices of ``STOP_POLL_SECONDS``, returning as soon as ``stop()`` is true."""
        check_process(self._prefetcher.pid, "the store of this prefetch handle")
        deadline = None if timeout is None else time.monotonic() + timeout
        for fetch in self._state.fetches:
            while fetch is not None:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                step = remaining if stop is None else min(STOP_POLL_SECONDS, STOP_POLL_SECONDS if remaining is None
                                                          else remaining)
                if fetch.event.wait(step):
                    break
                if (remaining is not None and remaining <= step) or (stop is not None and stop()):
                    return self.ready()
        return self.ready()

    def result(self, stop: Callable[[], bool] | None = None) -> int:
        """Tokens ready after waiting as the handle's policy says (best_effort, wait or timeout), or as soon as
        ``stop()`` is true (a layer loader being closed: it waited for every fetch queued on a slow tier)."""
        return self._wait(self.policy.budget(self._state.request_tokens), stop)

    def views(self) -> list[torch.Tensor]:
        """Pinned views ``[L, P, tokens, H, D]`` of the leading ready blocks (valid until close).

        Only blocks pinned in a memory tier have a view: when the fastest
        tier cannot pin (a persistent one), a block ready there is counted by
        ``ready()`` but has none, and the list stops before it.
        """
        out = []
        for view in self._state.views:
            if view is None or view.numel() == 0:  # numel 0: ready where it is, nothing to pin
                break
            out.append(view)
        return out

    def cancel(self) -> None:
        """Stop waiting for fetches and release every pin; fetches no other handle needs are skipped."""
        with self._hand_over_lock:  # not while a load takes the pins over
            if self._handed_over:
                return
            self._finalizer.detach()
            self._prefetcher.release(self._state)

    def hand_over(self) -> "PrefetchHandle":
        """A new handle owning this one's fetches and pins (a layer loader's), and this one closed: closing it
        then releases nothing. The engine closing its handle (a ``with`` block around the load) released the
        pins of the slots a layer loader was still copying from, and other prompts' KV took them. A handle
        closed or handed over already is a ``ValueError`` (two loads of one handle at once)."""
        with self._hand_over_lock:
            if self.closed:
                raise ValueError("prefetch: expected an open handle, got a closed one (a load consumes its handle)")
            self._finalizer.detach()
            self._handed_over = True
        return PrefetchHandle(self._prefetcher, self._state, self.policy)

    close = cancel

    def abandon(self) -> None:
        """``cancel`` from a finalizer: the pins are released later, by the prefetcher, taking no lock now."""
        if self._finalizer.detach() is not None:
            self._prefetcher.orphaned(self._state)

    @property
    def closed(self) -> bool:
        """True once closed or cancelled (its pins released) or handed over to a load: no load may take it."""
        return self._handed_over or self._state.closed

    def __enter__(self) -> "PrefetchHandle":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
