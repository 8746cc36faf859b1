"""The door of a store: calls in flight are counted, and ``close`` waits for them before the tiers go.

A store closed from one thread while another was inside ``get`` closed the
tiers under the reader: LMDB's environment, the files tier's pool, the host
pool. The gate turns that race into an order. A call entering a closed store
raises ``RuntimeError`` before anything is touched; a call already inside
finishes, then the tiers close. A call that closes the store from inside one
of its own calls (a ``fill`` callback of ``put_from``) does not wait for
itself.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

_log = logging.getLogger(__name__)


class Gate:
    """Counts the calls inside a store (``with gate:``); ``shut`` refuses new ones and waits for those inside.

    A store belongs to the process that opened it: its worker threads do not
    survive a fork (a child's puts, flushes and prefetches waited for them
    for ever) and LMDB forbids an environment across one, so a call from a
    forked child is refused; the child opens a store of its own.
    """

    def __init__(self, what: str = "KVStore"):
        self._what = what
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # each thread's calls inside (nested calls: put inside save), by thread id; one dict item changed in one
        # statement, so a signal's exception lands before or after a call is counted, never half way
        self._depths: dict[int, int] = {}
        self._pid = os.getpid()
        self.closed = False
        self._done = threading.Event()  # set by ``done()`` once whoever shut the gate has closed everything
        self.interrupted = False  # a close was interrupted (KeyboardInterrupt) before it was done: close again

    def check(self) -> None:
        """Raise ``RuntimeError`` once shut, or in a process other than the one that opened it."""
        if self.closed:
            raise RuntimeError(f"{self._what} is closed")
        check_process(self._pid, self._what)

    def __enter__(self) -> None:
        self.check()
        me = threading.get_ident()
        with self._lock:
            if self.closed:
                raise RuntimeError(f"{self._what} is closed")
            self._depths[me] = self._depths.get(me, 0) + 1

    def __exit__(self, *exc: object) -> None:
        me = threading.get_ident()
        with self._lock:
            self._depths[me] -= 1
            if not self._depths[me]:
                del self._depths[me]
            if self.closed:
                self._cond.notify_all()

    def _others_inside(self, me: int) -> int:
        """Under the lock: calls inside of threads other than ``me``."""
        return sum(depth for thread, depth in self._depths.items() if thread != me)

    @contextlib.contextmanager
    def visit(self, timeout: float | None = None) -> Iterator[bool]:
        """Inside, as ``with gate:``, if still open (yields True); else, once whoever shut it is done (``timeout``
        seconds at most), yields False and raises nothing: for figures read after close too, never while the
        tiers close. In a forked child it raises as every call does (the parent's connections are not its own:
        a remote tier's figures asked over the inherited socket scrambled the parent's replies)."""
        try:
            self.__enter__()
        except RuntimeError:
            if self.forked():
                raise
            if not self.in_call():
                self.wait_done(timeout)
            yield False
            return
        try:
            yield True
        finally:
            self.__exit__()

    def in_call(self) -> bool:
        """Whether the calling thread is inside a call."""
        return self._depths.get(threading.get_ident(), 0) > 0

    def shut(self, timeout: float | None = None) -> bool:
        """Refuse new calls and wait until the calls of other threads inside have returned (``timeout``
        seconds at most, None: no limit); False if the gate was shut already (by another ``shut``)."""
        me = threading.get_ident()
        with self._lock:
            if self.closed:
                return False
            self.closed = True
            if not self._cond.wait_for(lambda: not self._others_inside(me), timeout):
                _log.warning("%s: closing with %d call(s) still inside after %.0f s", self._what,
                             self._others_inside(me), timeout)
            return True

    def done(self) -> None:
        """Whoever shut the gate has closed everything behind it."""
        self.interrupted = False
        self._done.set()

    def is_done(self) -> bool:
        """Whether ``done()`` was called: what the gate guards is closed."""
        return self._done.is_set()

    def wait_done(self, timeout: float | None = None) -> bool:
        """Wait until ``done()`` (a second ``close`` returns once the store is closed, not while the first is
        still flushing: the directory was still locked when it returned); False if ``timeout`` ran out."""
        return self._done.wait(timeout)

    def forked(self) -> bool:
        """Whether this is a process other than the one that opened it."""
        return os.getpid() != self._pid


def check_process(pid: int, what: str) -> None:
    """``RuntimeError`` in a process other than ``pid``, which made ``what``: a forked child (the threads that
    would answer it were not copied: it waited for ever)."""
    if os.getpid() != pid:
        raise RuntimeError(f"{what} was opened by process {pid}, before a fork: open one in this process (its "
                           f"threads and LMDB do not survive a fork)")


_Method = TypeVar("_Method", bound=Callable[..., Any])


def gated(method: _Method) -> _Method:
    """A method of an object with a ``_gate``, run inside it (refused once the gate is shut)."""
    @functools.wraps(method)
    def inside(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._gate:
            return method(self, *args, **kwargs)
    return inside  # type: ignore[return-value]
