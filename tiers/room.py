"""The capacity a disk tier may hold on a filesystem with less room than its setting.

A filesystem smaller than ``files_bytes`` or ``disk_bytes`` (or filled by
other users, or a writer's quota) made a disk tier's writes fail for good:
it kept its oldest blocks and new prompts never landed. A tier that meets a
full filesystem holds itself to the bytes it stores plus the room left, and
evicts within that; a later check raises its capacity as room comes back.
"""

from __future__ import annotations

import logging
import os
import time

from kvstore.metrics import LogLimit

# A capacity a quota (EDQUOT) lowered is raised no sooner than this (seconds): the free space says nothing of
# the quota, and raising it at every check failed a write each time.
QUOTA_RETRY_SECONDS = 300.0


class FilesystemRoom:
    """One tier's view of the room on the filesystem under ``root``: the capacity it may hold, between one block
    (``smallest`` bytes) and its ``configured`` setting (bytes), and when to look again.

    ``free_share`` is the part of the filesystem's free bytes counted as
    room: a store whose files take more than its counted bytes (LMDB rounds
    a value up to whole pages) would fill the disk again at 1.0. Not
    thread-safe: the tier calls it under its own lock, but ``free_bytes``
    (a system call) outside it.
    """

    def __init__(self, root: str | os.PathLike[str], configured: int, smallest: int, setting: str,
                 log: logging.Logger, free_share: float = 1.0, recheck_seconds: float = 0.0):
        self.root = os.fspath(root)
        self.configured = configured
        self.lowerings = 0  # times a full filesystem lowered the capacity
        self._smallest, self._setting, self._log = smallest, setting, log
        self._free_share, self._recheck_seconds = free_share, recheck_seconds
        self._quota_until = 0.0  # monotonic seconds
        self._checked_at = time.monotonic()
        self._full_log = LogLimit(60.0)

    def recheck_due(self, capacity: int) -> bool:
        """Whether a tier held below its setting should look for room now (every ``recheck_seconds``)."""
        if capacity >= self.configured:
            return False
        now = time.monotonic()
        if now - self._checked_at < self._recheck_seconds:
            return False
        self._checked_at = now
        return True

    def free_bytes(self, full_disk: bool) -> int | None:
        """The filesystem's free bytes a non-root writer may take; None while a quota's wait runs (unless a write
        just found the disk full) or where the filesystem cannot be asked."""
        if not full_disk and time.monotonic() < self._quota_until:
            return None
        try:
            fs = os.statvfs(self.root)
        except OSError:
            return None
        return fs.f_bavail * fs.f_frsize

    def refit(self, used: int, capacity: int, free: int, full_disk: bool, quota: bool = False) -> int | None:
        """The new capacity for a tier storing ``used`` bytes under ``capacity`` (bytes) with ``free`` bytes free:
        lower only after a ``full_disk`` write, higher only on a later check; None if it stays. A ``quota``
        (EDQUOT) that the free space does not show holds the tier to what it stores."""
        room = used + (0 if quota else int(free * self._free_share))
        fitted = max(self._smallest, min(self.configured, room))
        if not (fitted < capacity if full_disk else fitted > capacity):
            return None
        self.lowerings += full_disk
        if quota:
            self._quota_until = time.monotonic() + QUOTA_RETRY_SECONDS
        return fitted

    def report(self, capacity: int, before: int, full_disk: bool, quota: bool = False) -> None:
        """Log a capacity ``refit`` changed from ``before`` (bytes): a lowering at most once a minute."""
        if not full_disk:
            self._log.info("%s %s: room came back; the tier holds up to %d bytes (was %d)", self._setting,
                           self.root, capacity, before)
        elif self._full_log.due():
            self._log.warning("%s %s: %s at %d bytes of blocks, below its capacity setting of %d; the tier keeps "
                              "to the room it has", self._setting, self.root,
                              "the writer's quota is met" if quota else "the filesystem is full", capacity,
                              self.configured)
