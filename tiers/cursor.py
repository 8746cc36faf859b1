"""A run of blocks read by several threads at once, each taking the next block as it is free.

Split into fixed halves, a run of 128 blocks on two cores waited for its
slower half: the calling thread spent a fifth of a read of 256 MiB (2 MiB
blocks) waiting for the pool thread, which began late and was preempted.
Taking blocks one at a time, in order, the thread that starts late or runs
slowly reads fewer of them.
"""

from __future__ import annotations

import threading


class RunCursor:
    """Hands the indices ``0 .. length - 1`` out in order, and ends the run at the first block not read.

    ``leading`` is then how many leading blocks were read: every index
    below it was handed out and read, since a block not read lowers the end
    below every index handed out after it.
    """

    def __init__(self, length: int):
        self._lock = threading.Lock()
        self._next = 0
        self._end = length
        self.error: OSError | None = None  # the tier error that ended the run, if one did

    def take(self) -> int | None:
        """The next block to read, or None once the run is handed out or ended."""
        with self._lock:
            if self._next >= self._end:
                return None
            self._next += 1
            return self._next - 1

    def missed(self, index: int, error: OSError | None = None) -> None:
        """Block ``index`` was not read (a miss, damage, or the tier ``error``): the run ends before it."""
        with self._lock:
            if index < self._end:
                self._end = index
                self.error = error

    @property
    def leading(self) -> int:
        """How many leading blocks were read (once every reader is done)."""
        with self._lock:
            return self._end
