"""Shared-storage tier: one file per block in a directory that processes and machines share.

Block ``key`` is ``<path>/<hex[0:2]>/<hex of its name>.kvb`` (``tiers/fanout.py``; a
scan moves the files of the older two-level layout up): the 72-byte
``BlockHeader``, then the payload. Its name is the key, or for a lossy
codec's form a keyed digest of it (``BlockEncoding.stored_name``): every
method below the public ones takes names (and ``keys()`` lists them).
Writers write a temp file (``.<hex>~<host>.pidns<inode>~<pid>~<token>.tmp``:
a writer's pid is judged alive only by a process of its host and PID
namespace) and rename it into place, so nobody sees
a partial block and no lock server is needed (two writers of one key replace
one identical file with another). Readers check header and checksum; a
damaged file is deleted and read as a miss. The directory is untrusted:
whatever else sits at a block's path (a symlink, FIFO, directory, device, a
file larger than any block) is a miss too, found without following, waiting
on or reading it, and only regular files are ever deleted. A read-only
directory still serves reads (the access stamp and deletions are best effort).

Eviction rule: the file mtime is the shared last-access time (a write sets
it, a hit touches it). Each process keeps an index key -> (size, mtime),
least recently accessed first, built by a scan on open; what this process
does orders it exactly (moved to the end on put and hit, as ``LmdbTier``
does with stamps), and mtimes place only what a rescan learns: files other
processes wrote, or whose mtime is not the one this process last saw
(touched elsewhere), merged in by mtime, ties by key. Before a write, if
more than ``rescan_seconds`` passed since the last scan, or used + incoming
exceeds the capacity in this process's view and scans have taken under a
tenth of the time since the last one began, it rescans; if still over,
it evicts the least recently accessed files until used + incoming leaves
room for the rest of the batch, down to the low-water mark at most (90% of
capacity in whole full blocks; a tier of under ten blocks evicts just what
the write needs), so a large batch evicts in a few rounds. The batch that
evicts overwrites as many of those files as the capacity lets it park for
its next writes (``tiers/parked.py``: a quarter of the time of a new file
plus an unlink) and unlinks the rest; what it parked and did not reuse is
removed before ``put_many`` returns.
Files already deleted by another process are skipped, and make the next
write rescan; an indexed block not seen for ``_VERIFY_SECONDS`` is looked at
again before ``contains`` says yes. Writers in several processes may
overshoot by what the others wrote since their last scan. A
reader racing an eviction opened the file first (POSIX keeps it readable)
or misses. Capacity counts header + payload of each file; a write that finds
the filesystem full holds it to the bytes used plus the room left (until a
scan finds room again), and the batch is written again within it.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import mmap
import os
import secrets
import stat
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import Future, wait
from typing import NamedTuple, Union

import torch
import xxhash

from kvstore.background import IOPool
from kvstore.blockformat import ENCODING_RAW, HEADER_BYTES, BlockHeader, max_stored_bytes
from kvstore.buffers import payload_view_count, payload_views
from kvstore.compression.codec import FrameCodec
from kvstore.compression.stored import CORRUPT, INTACT, OTHER_CODEC, OTHER_SIZE, BlockEncoding
from kvstore.layout import KVLayout
from kvstore.metrics import Counters, LogLimit
from kvstore.tiers.base import (TIER_COUNTERS, Capability, Kept, RefusalLog, check_one_block,
                                exact_only, make_directory, tier_stats)
from kvstore.tiers.cursor import RunCursor
from kvstore.tiers.fanout import (SUFFIX, TEMP_SUFFIX, block_key, block_path, entries_of, fanout_dirs, is_fanout,
                                  old_block_key)
from kvstore.tiers.fileio import (ALIGN, GONE, MAX_IOVECS, NO_FILE, NO_SPACE, NOT_A_FILE, READ_FLAGS, STAMP_REFUSED,
                                  chain_stamps, fsync_dir, process_scope, read_hashed, round_up, same_file,
                                  split_views, squatted, transfer, unlink_file, vanished)
from kvstore.tiers.parked import Parked, ParkedFiles
from kvstore.tiers.room import FilesystemRoom
from kvstore.compression.registry import get_codec
from kvstore.config import StoreConfig, check_folder
from kvstore.tiers.spec import TierSpec

log = logging.getLogger(__name__)

_SPLIT_READ_BYTES = 8 << 20  # a raw payload this large is read in parts side by side
_SPLIT_RUN_BYTES = 4 << 20  # a run of blocks this large is read in runs side by side
# A scan forced by a full tier waits until scans have taken at most this share of the time since the last began.
_SCAN_TIME_SHARE = 0.1
# A scan that took longer than this (seconds) runs on a pool thread, not in the write due it: 50,000 files took
# 2.4 s, the write-behind queue filled meanwhile and the engine's puts waited.
_INLINE_SCAN_SECONDS = 0.05
# An indexed block whose file was not seen for this long is looked at again before ``contains`` says yes:
# another process sharing the directory may have evicted it (lookup promised 256 tokens, get found none,
# and a put deduplicated against the gone blocks, so the prompt came back one block a request).
_VERIFY_SECONDS = 1.0
_STAMPED_MOST = 1 << 16  # file times of blocks this process set, remembered (the oldest forgotten first)
# A temp file whose writer is alive is its own (a batch's parked file keeps an evicted block's old time): removed
# only this much later (seconds), in case the writer died and its pid went to another process.
ALIVE_WRITER_STALE_SECONDS = 24 * 3600
_OPEN_TIERS: "weakref.WeakSet[FilesTier]" = weakref.WeakSet()  # their locks are made anew in a forked child


def _renew_locks_in_child() -> None:
    for tier in list(_OPEN_TIERS):
        tier._after_fork_in_child()


os.register_at_fork(after_in_child=_renew_locks_in_child)


class _Write(NamedTuple):
    key: bytes
    size: int  # header + payload bytes
    held: int  # bytes reserved until it is settled: its size, or the parked file it overwrites
    logical: int  # the block's raw bytes
    future: "Future[int]"  # the file's mtime (ns) once written


# A block's payload as written: its parts (a codec's frame), or the raw block viewed by the writer.
_Payload = Union[list[memoryview], torch.Tensor]


class _Entry(NamedTuple):
    size: int  # header + payload bytes
    mtime_ns: int  # the file's mtime as this process last saw or set it
    seq: int  # when this process last put or read it (0: learned from a scan)
    checked: float = 0.0  # when this process last saw the file there (monotonic seconds; 0: not since a scan)


class TempRemoved(FileNotFoundError):
    """A write's temp file was removed by another process before its rename: that block is not stored."""


class FilesTier:
    """Blocks as files under ``path`` (local disk, NFS, Lustre, ...), at most ``capacity_bytes`` of them.

    ``sync`` fsyncs each file and its directory before ``put_many`` returns.
    ``io_threads`` files of a batch are written at once, and a large block
    is read in that many parts at once (at most one per core).
    ``o_direct`` bypasses the page cache through a page-aligned bounce buffer,
    which costs one extra memory copy per block; a filesystem that refuses
    O_DIRECT is used buffered for that call (``o_direct_fallbacks``). With a
    ``codec`` each file holds the codec's frame, and capacity counts it. Temp
    files of dead writers on this host, or older than ``stale_temp_seconds``,
    are removed on open (``temp_removed``).
    """

    name = "files"
    persistent = True
    capabilities = Capability.ENCODED | Capability.RUNS | Capability.CHAINS

    def __init__(self, path: str | os.PathLike[str], capacity_bytes: int, layout: KVLayout, *,
                 sync: bool = True, o_direct: bool = False, stale_temp_seconds: float = 300.0,
                 rescan_seconds: float = 5.0, codec: FrameCodec | None = None, io_threads: int = 4):
        full = check_one_block(layout, capacity_bytes, "files_bytes")
        if o_direct and not hasattr(os, "O_DIRECT"):
            raise ValueError("o_direct: expected False on a platform without os.O_DIRECT, got True")
        for name, value in (("stale_temp_seconds", stale_temp_seconds), ("rescan_seconds", rescan_seconds)):
            if not value >= 0:
                raise ValueError(f"{name}: expected seconds >= 0, got {value!r}")
        self._root = os.path.abspath(os.fspath(path))
        make_directory(self._root, "files_dir")
        self._full = full
        self._capacity = self._low_water = 0  # bytes: held to the filesystem's room after a full disk
        self._set_capacity(capacity_bytes)
        self._room = FilesystemRoom(self._root, capacity_bytes, full, "files_dir", log)
        self.layout = layout
        self._fingerprint = layout.fingerprint
        self.encoding = BlockEncoding(layout, codec)
        self._sync, self._o_direct = sync, o_direct
        self._stale_temp_ns = int(stale_temp_seconds * 1e9)
        self._rescan_seconds = rescan_seconds
        self._host = process_scope()
        # A temp name's last part: this tier's random token and a count. A new random token for each name
        # called getrandom(), which let the writers take the GIL while the caller waited (80 us a 2 MiB block).
        self._temp_token, self._temp_names = secrets.token_hex(4), itertools.count()
        self._local = threading.local()  # this thread's scratch and bounce buffers
        self._lock = threading.Lock()  # guards the index and the byte counts
        self._scan_lock = threading.Lock()  # one rescan-and-evict at a time
        self._rescan_lock = threading.Lock()  # one directory scan at a time, inline or in the background
        self._scan_queued_by = 0  # the process whose periodic scan is submitted to the writers' pool, not ended
        self._index: OrderedDict[bytes, _Entry] = OrderedDict()  # least recently accessed first
        self._used = 0
        self._reserved = 0  # bytes of this process's writes in flight
        self._writing: set[bytes] = set()  # their keys: a scan that sees their files leaves them to the writer
        # blocks written or read here, with the file time they were given (``chain_stamps``), the newest last, at
        # most ``_STAMPED_MOST``: a prompt written or read in several batches is stamped again, whole, when touched
        self._stamped: dict[bytes, int] = {}
        # Keys evicted here whose files are not yet parked or unlinked: a read or ``contains`` that finds such
        # a file must not index it again (it was counted twice, beside the parked file's reservation).
        self._evicting: set[bytes] = set()
        self._seq = 0
        self._scan_removed: set[bytes] | None = None  # keys forgotten while a scan runs
        self._unmoved: dict[bytes, str] = {}  # key -> its two-level path, where a scan could not move it up
        self._last_scan = 0.0  # when the last scan ended (monotonic seconds)
        self._stale_view = False  # another process removed blocks this index held: rescan when a write may
        self._scan_seconds = 0.0  # how long it took
        self._counters = Counters(*TIER_COUNTERS, "logical_bytes_written", "stale", "temp_removed",
                                  "o_direct_fallbacks", "recycled", "moved_up", "filesystem_full")
        self._refusals = RefusalLog(log, "files", medium="its directory")
        self._stuck: set[bytes] = set()  # block files eviction could not remove (another owner's): no victims
        self._stuck_log = LogLimit(10.0)  # until the next full scan; their warnings, one per 10 s at most
        self._writers = IOPool(io_threads, "kvstore-files-write")
        self._readers = IOPool(io_threads, "kvstore-files-read")  # reads never wait behind a batch of writes
        self._parts_per_read = min(io_threads, os.cpu_count() or 1)  # a page-cache copy takes a core per part
        self._rescan(clean_temps=True)
        self._evict_to_capacity()
        _OPEN_TIERS.add(self)

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    def _set_capacity(self, capacity: int) -> None:
        """The bytes the tier holds now, and the low-water mark an eviction goes down to (90% in whole full
        blocks; a tier of under ten blocks evicts just what the write needs)."""
        self._capacity = capacity
        self._low_water = capacity - capacity // 10 // self._full * self._full

    def _fit_to_filesystem(self, full_disk: bool, quota: bool = False) -> None:
        """Hold the tier to the bytes it stores plus what the filesystem has free (``files_bytes`` at most):
        ``full_disk`` (a write just found no space) may lower its capacity, a periodic scan raise it again
        (``FilesystemRoom``). Bytes of writes in flight are not counted: other threads' may be failing for
        want of that room."""
        free = self._room.free_bytes(full_disk)
        if free is None:
            return
        with self._lock:
            before = self._capacity
            capacity = self._room.refit(self._used, before, free, full_disk, quota)
            if capacity is None:
                return
            self._set_capacity(capacity)
        self._room.report(capacity, before, full_disk, quota)

    def _path(self, key: bytes) -> str:
        """Where block ``key`` is read and removed: its one-level path, or where a scan left it."""
        unmoved = self._unmoved.get(key) if self._unmoved else None
        return block_path(self._root, key) if unmoved is None else unmoved

    def _max_file_bytes(self, raw_bytes: int) -> int:
        """The largest file a block of ``raw_bytes`` (or a full block of this layout, if larger: a read may
        find one) can be, raw or as a codec's frame; anything larger at a block's path is read as corrupt
        without reading it."""
        return max_stored_bytes(max(raw_bytes, self.layout.block_bytes))

    def _remember(self, key: bytes, size: int, mtime_ns: int, checked: float | None = None) -> None:
        """Under the lock: ``key`` is stored and was just accessed; its file was seen at ``checked`` (default:
        now)."""
        self._forget(key)
        self._seq += 1
        self._index[key] = _Entry(size, mtime_ns, self._seq, time.monotonic() if checked is None else checked)
        self._used += size

    def touch_chain(self, keys: Sequence[bytes]) -> None:
        """``ChainTier.touch_chain``: the indexed ``keys`` become the most recently accessed, the first most of
        all, in this process's order (which a rescan keeps); and in the file times other processes (and this
        one after a restart) order by, for the blocks this tier wrote or read since."""
        names = [self.encoding.stored_name(key) for key in keys]
        self._touch_named(names)
        self._restamp(names)

    def _stamp(self, key: bytes, stamp: int) -> None:
        """Under the lock: block ``key``'s file was given time ``stamp`` (ns) by a write or a read here."""
        self._stamped.pop(key, None)
        self._stamped[key] = stamp  # the newest last
        while len(self._stamped) > _STAMPED_MOST:  # the oldest go: a chain being written keeps its stamps
            del self._stamped[next(iter(self._stamped))]

    def _restamp(self, names: Sequence[bytes]) -> None:
        """The file times of the chain ``names`` set here, head newest, if the batches it was written or read in
        left them otherwise: each batch is stamped head newest, but a later batch (the write-behind's 16
        blocks, a read's 64) newer than the head's, so a restart evicted the head's batch first."""
        found: list[tuple[bytes, int]] = []  # the leading run stamped here: a chain whose head's stamp went is
        with self._lock:                      # left as it is
            for key in names:
                stamp = self._stamped.get(key)
                if stamp is None:
                    break
                found.append((key, stamp))
        if all(a > b for (_, a), (_, b) in zip(found, found[1:])):
            return  # one batch's, or in order already (the write-behind touches each batch, then the chain)
        for (key, _), stamp in zip(found, chain_stamps(len(found))):
            try:
                os.utime(self._path(key), ns=(stamp, stamp), follow_symlinks=False)
            except OSError:  # best effort: gone, another user's, a read-only directory
                continue
            with self._lock:
                entry = self._index.get(key)
                if entry is not None:  # the index's time is the file's: a rescan keeps it in this process's order
                    self._index[key] = entry._replace(mtime_ns=stamp)
                self._stamp(key, stamp)

    def _touch_named(self, keys: Sequence[bytes]) -> None:
        """``touch_chain`` of blocks by the names they are stored as (``BlockEncoding.stored_name``).

        So are the keys of every method named ``_*_named`` and of those below
        the public ones; the public methods take the blocks' keys."""
        with self._lock:
            for key in reversed(keys):
                entry = self._index.get(key)
                if entry is not None:  # accessed, not seen: a gone file is not trusted for longer
                    self._remember(key, entry.size, entry.mtime_ns, entry.checked)

    def _forget(self, key: bytes) -> None:
        """Under the lock: drop ``key`` from the index."""
        old = self._index.pop(key, None)
        if old is not None:
            self._used -= old.size
        if self._scan_removed is not None:
            self._scan_removed.add(key)

    def _pop_lru(self, limit: int, keep: Collection[bytes] | Kept = ()) -> list[tuple[bytes, int]]:
        """Under the lock: forget least recently accessed blocks, none of ``keep``, until at most ``limit``
        bytes are stored; returns their (key, size), for the caller to unlink or park."""
        victims = []
        while self._used > limit:
            key = next((key for key in self._index if key not in keep and key not in self._stuck), None)
            if key is None:
                break
            entry = self._index[key]
            victims.append((key, entry.size))
            self._forget(key)
            self._evicting.add(key)
        return victims

    def _evict_for(self, incoming: int, parked: ParkedFiles, later: int, keep: Collection[bytes] | Kept) -> bool:
        """``_make_room``'s eviction, under the scan lock: victims parked (as many as may stay) or unlinked;
        True if one of them could not be removed (another round is due)."""
        victims: list[tuple[bytes, int]] = []
        with self._lock:
            if self._used + self._reserved + incoming > self._capacity:
                victims = self._pop_lru(max(self._low_water, self._capacity - later) - self._reserved - incoming,
                                        keep)
            room = self._capacity - self._used - self._reserved  # bytes that may stay parked (one: this write)
        stuck = 0
        try:
            for key, size in victims:
                path = self._path(key)
                if size <= room and parked.park(path, self._temp_path(key), size):
                    room -= size
                    with self._lock:  # reserved at once: an unlink failing below leaves the books right
                        self._reserved += size
                    continue
                try:
                    if not unlink_file(path):  # another process evicted it: what else does this view miss?
                        self._stale_view = True
                except OSError as exc:
                    if exc.errno not in STAMP_REFUSED:
                        raise
                    self._unremovable(key, size, exc)
                    stuck += 1
        finally:
            self._evicted(victims)
        self._counters.add("evictions", len(victims) - stuck)
        return stuck > 0

    def _unremovable(self, key: bytes, size: int, exc: OSError) -> None:
        """Victim ``key``'s file (``size`` bytes) could not be removed (a read-only or another user's fan-out
        directory): it stays indexed, counted in the bytes used, and no victim until the next full scan. Its
        error escaped the eviction, and every later write of the tier failed the same way."""
        with self._lock:
            self._stuck.add(key)
            self._remember(key, size, 0)
        count = self._stuck_log.due()
        if count:
            log.warning("files_dir %s: %d block file%s could not be evicted (%s); kept and counted, the next "
                        "oldest evicted instead", self._root, count, "" if count == 1 else "s", exc)

    def _evicted(self, victims: list[tuple[bytes, int]]) -> None:
        """``_pop_lru``'s victims are parked or unlinked: their paths may be indexed again (new writes)."""
        with self._lock:
            self._evicting.difference_update(key for key, _ in victims)

    def _evict_to_capacity(self) -> None:
        """Unlink what this capacity cannot hold: a directory filled under a larger capacity (or by other
        processes) is brought within it at open, not at the first put. A directory this process may not
        change (a read-only export a reader node mounts) is served as it is: that open raised ``EROFS``."""
        with self._lock:
            over = self._used > self._capacity
        if over and not os.access(self._root, os.W_OK):
            log.warning("files_dir %s holds %d bytes, more than files_bytes=%d, and cannot be changed here: its "
                        "blocks are served as they are", self._root, self._used, self._capacity)
            return
        with self._lock:
            victims = self._pop_lru(self._capacity)
        removed = 0
        try:
            for key, size in victims:
                try:
                    unlink_file(self._path(key))
                except OSError as exc:  # a fan-out directory of another owner
                    if exc.errno not in STAMP_REFUSED:
                        raise
                    self._unremovable(key, size, exc)
                    continue
                removed += 1
        finally:
            self._evicted(victims)
            self._counters.add("evictions", removed)

    def contains(self, key: bytes) -> bool:
        return self._contains_named(self.encoding.stored_name(key))

    def _contains_named(self, key: bytes) -> bool:
        entry = self._index.get(key)  # atomic under the GIL: no lock on the lookup hot path
        if entry is not None and time.monotonic() - entry.checked < _VERIFY_SECONDS:
            return True
        try:
            st = os.lstat(self._path(key))
        except OSError as exc:
            if exc.errno in GONE or exc.errno == errno.ENOTDIR:
                if entry is not None:
                    self._gone_elsewhere(key, entry)
                return False
            raise
        if entry is not None:
            if not stat.S_ISREG(st.st_mode):  # something else was put there: no block
                self._gone_elsewhere(key, entry)
                return False
            with self._lock:  # seen there now (same order: an existing key keeps its place)
                if self._index.get(key) is entry:
                    self._index[key] = entry._replace(checked=time.monotonic())
            return True
        if not stat.S_ISREG(st.st_mode):
            return False  # a symlink, FIFO, directory, ... is no block (a put renames a block over it)
        with self._lock:  # a write here indexes its own when settled; an eviction here may be moving it away
            if (key not in self._index and key not in self._writing and key not in self._evicting
                    and same_file(self._path(key), st)):
                self._remember(key, st.st_size, st.st_mtime_ns)
        return True

    def _gone_elsewhere(self, key: bytes, entry: _Entry) -> None:
        """Indexed block ``key`` (as ``entry``) has no file: another process removed it. Forgotten, and the
        directory is rescanned at the next write that may (this process's view of it is stale)."""
        with self._lock:
            if self._index.get(key) is entry:
                self._forget(key)
            self._stale_view = True

    def keys(self) -> Iterator[bytes]:
        with self._lock:
            return iter(list(self._index))

    def _scan(self, clean_temps: bool) -> dict[bytes, tuple[int, int]]:
        """Every block file (regular files only): key -> (size, mtime_ns); also removes stale temp files if
        asked, as far as the directory lets it (a read-only one keeps them). Block files of the two-level
        layout are moved up first (``tiers/fanout.py``)."""
        found: dict[bytes, tuple[int, int]] = {}
        moved, unmoved = 0, {}
        for level1 in fanout_dirs(self._root):
            entries = entries_of(level1)
            old = [entry.path for entry in entries if is_fanout(entry)]
            if old:
                moved += sum(self._move_up(directory, clean_temps, found, unmoved) for directory in old)
                entries = entries_of(level1)
            for entry in entries:
                name = entry.name
                try:
                    if name.endswith(SUFFIX) and not name.startswith("."):
                        key = block_key(level1, name)
                        st = entry.stat(follow_symlinks=False) if key is not None else None
                        if st is not None and stat.S_ISREG(st.st_mode):
                            found[key] = (st.st_size, st.st_mtime_ns)
                    elif clean_temps:
                        self._clean_temp(entry)
                except FileNotFoundError:
                    continue  # removed by another process meanwhile
        if moved:
            self._counters.add("moved_up", moved)
            log.info("files tier %s: moved %d block files of the two-level layout up", self._root, moved)
        if unmoved:
            log.info("files tier %s: %d block files of the two-level layout could not be moved up (a read-only "
                     "directory?); they are read where they are", self._root, len(unmoved))
        with self._lock:
            self._unmoved = unmoved
        return found

    def _move_up(self, directory: str, clean_temps: bool, found: dict[bytes, tuple[int, int]],
                 unmoved: dict[bytes, str]) -> int:
        """Rename the block files of two-level fan-out ``directory`` to their one-level paths, then remove
        it if that emptied it; how many were moved. A block file that cannot be moved (a read-only
        directory) is put in ``found`` and ``unmoved`` (its path) and read where it is."""
        moved = 0
        for entry in entries_of(directory):
            name = entry.name
            try:
                if name.endswith(SUFFIX) and not name.startswith("."):
                    key = old_block_key(directory, name)
                    if key is not None and entry.is_file(follow_symlinks=False):
                        new = block_path(self._root, key)
                        if os.path.lexists(new):  # never replaced by an old copy
                            if not squatted(new):
                                unlink_file(entry.path)  # the block is held already: its old copy goes
                            continue  # (beside anything else there, the old copy stays, unread)
                        try:
                            os.rename(entry.path, new)
                        except (FileNotFoundError, NotADirectoryError):
                            continue  # gone meanwhile, or the directory to move it to is not one
                        except OSError:  # EROFS, EACCES, EPERM, ...: not ours to move
                            st = entry.stat(follow_symlinks=False)
                            found[key], unmoved[key] = (st.st_size, st.st_mtime_ns), entry.path
                            continue
                        moved += 1
                elif clean_temps:
                    self._clean_temp(entry)
            except OSError:
                continue  # gone meanwhile
        with contextlib.suppress(OSError):
            os.rmdir(directory)  # only if empty: a writer of an older kvstore may be filling it
        return moved

    def _clean_temp(self, entry: os.DirEntry) -> None:
        """Remove ``entry`` if it is a stale temp file (best effort: EROFS, EACCES, EPERM, ... leave it)."""
        if not (entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX)):
            return
        try:
            removed = self._stale_temp(entry) and unlink_file(entry.path)
        except FileNotFoundError:
            raise
        except OSError:
            removed = False
        if removed:
            self._counters.add("temp_removed")

    def _stale_temp(self, entry: os.DirEntry) -> bool:
        """Written by a process of this host that is gone, or not modified for ``stale_temp_seconds`` (for
        ``ALIVE_WRITER_STALE_SECONDS`` if its writer is alive)."""
        parts = entry.name[1:-len(TEMP_SUFFIX)].split("~")
        if len(parts) == 4 and parts[1] == self._host and parts[2].isascii() and parts[2].isdigit() \
                and int(parts[2]) > 0:
            try:
                os.kill(int(parts[2]), 0)  # signal 0: only asks whether the writer is alive
            except ProcessLookupError:
                return True
            except OverflowError:  # no pid at all: the age rule
                return self._older_than(entry, self._stale_temp_ns)
            except PermissionError:  # alive, another user's
                pass
            # alive: a batch's parked file or a write in flight (removing it failed the writer's rename and
            # suspended its tier), unless its pid went to another process since
            return self._older_than(entry, ALIVE_WRITER_STALE_SECONDS * 10**9)
        return self._older_than(entry, self._stale_temp_ns)

    @staticmethod
    def _older_than(entry: os.DirEntry, age_ns: int) -> bool:
        return time.time_ns() - entry.stat(follow_symlinks=False).st_mtime_ns > age_ns

    def _rescan(self, clean_temps: bool = False) -> None:
        """Re-learn the directory and merge what other processes did into this process's order.

        Puts, reads and evictions may run meanwhile (the walk holds no lock
        of theirs, and the merge keeps what they did: a block evicted since
        the scan began, or being evicted as it began, is not indexed again
        from a file the walk saw before it went); scans run one at a time.
        """
        with self._rescan_lock:
            self._rescan_now(clean_temps)

    def _rescan_unless_scanning(self, clean_temps: bool) -> None:
        """``_rescan``, unless one is under way (the periodic one, in the background): a write over capacity
        goes on with the view it has rather than wait for that walk, whose merge learns what it would."""
        if self._rescan_lock.acquire(blocking=False):
            try:
                self._rescan_now(clean_temps)
            finally:
                self._rescan_lock.release()

    def _after_fork_in_child(self) -> None:
        """A forked child has none of the parent's threads: locks one of them held (a background scan holds
        one for the whole walk) would be held for ever, and every scan of the child skipped."""
        self._lock = threading.Lock()
        self._scan_lock = threading.Lock()
        self._rescan_lock = threading.Lock()
        self._scan_queued_by = 0
        self._scan_removed = None  # nor their writes, evictions and scans under way: nothing will end them here
        self._writing, self._evicting, self._reserved = set(), set(), 0

    def _scan_behind(self) -> None:
        """The periodic scan, on a writer thread of the tier's pool rather than the write that is due it.

        Inline, it stalled that write for the whole walk: 2.4 s of 50,000
        files, during which the write-behind queue filled and the engine's
        puts waited. With one I/O thread the pool runs it inline still.
        """
        with self._lock:
            if self._scan_queued_by == os.getpid():
                return
            self._scan_queued_by = os.getpid()  # a child forked meanwhile has no such scan: it queues its own

        def scan() -> None:
            try:
                self._rescan_unless_scanning(clean_temps=True)
            except Exception as exc:  # the directory gone or unreadable: a write's own scan meets it too
                log.warning("files tier %s: the periodic scan failed (%s)", self._root, exc)
            finally:
                with self._lock:
                    self._scan_queued_by = 0
        self._writers.submit(scan)

    def _age(self, size: int, mtime_ns: int) -> int:
        """Where a file found by a scan goes in the eviction order: by its mtime, but a file larger than the
        whole tier (junk at a block's name, a sparse 1 TiB file) first of all: by its mtime, every block of
        the tier was evicted before it."""
        return mtime_ns if size <= self._capacity else -1

    def _rescan_now(self, clean_temps: bool) -> None:
        began = time.monotonic()
        with self._lock:
            # blocks being evicted as it starts count as removed during it: their files may still be there
            start_seq, self._scan_removed = self._seq, set(self._evicting)
            self._stale_view = False  # what this scan will see; a block found gone meanwhile sets it again
            self._stuck.clear()  # files eviction could not remove: tried again (their owner may have fixed it)
        try:
            found = self._scan(clean_temps)
        except BaseException:
            with self._lock:
                self._scan_removed = None
            raise
        with self._lock:
            removed, self._scan_removed = self._scan_removed, None
            anchored, floating = [], []  # kept in this process's order / placed by mtime
            for key, entry in self._index.items():
                seen = found.pop(key, None)
                if entry.seq > start_seq:
                    anchored.append((entry.mtime_ns, key, entry))  # put or read during the scan
                elif seen is not None and seen[1] == entry.mtime_ns:
                    anchored.append((entry.mtime_ns, key, entry._replace(size=seen[0])))
                elif seen is not None:  # touched by another process
                    floating.append((self._age(*seen), key, _Entry(seen[0], seen[1], 0)))
            # a file being written here is counted as reserved until its write is settled, and indexed then
            floating += [(self._age(s, m), k, _Entry(s, m, 0)) for k, (s, m) in found.items()
                         if k not in removed and k not in self._writing]
            floating.sort(key=lambda item: item[:2])
            merged = heapq.merge(anchored, floating, key=lambda item: item[0])  # stable: anchored first on ties
            self._index = OrderedDict((key, entry) for _, key, entry in merged)
            self._used = sum(entry.size for entry in self._index.values())
            self._last_scan = time.monotonic()
            self._scan_seconds = self._last_scan - began

    def _make_room(self, incoming: int, parked: ParkedFiles, later: int = 0,
                   keep: Collection[bytes] | Kept = ()) -> tuple[bool, Parked | None]:
        """Rescan if due; evict least recently accessed files if over capacity; reserve ``incoming``, or
        return a parked victim of at least that size to overwrite (reserved already). False, None if no
        room can be made: other threads' writes in flight hold it (they cannot be evicted before they are
        stored, and waiting for them here could wait on a thread that waits for this one's scan lock).

        Over capacity, it evicts room for ``incoming`` and for ``later``
        (about the bytes of the batch's blocks after it), down to the
        low-water mark at most. Of the victims, as many as the capacity
        allows beside what is stored and reserved are parked for this
        batch's next writes; the rest are unlinked. Evicting past what the
        batch writes left its parked files to be unlinked when it ended,
        and the next batch then wrote new files into their room: a full
        tier given 128 blocks of 2 MiB a put wrote 15% of them as new
        files, each several times the cost of overwriting one. Blocks in
        ``keep`` (the batch's own, written before this one) are never
        victims.
        """
        with self._scan_lock:
            with self._lock:
                over = self._used + self._reserved + incoming > self._capacity
            since = time.monotonic() - self._last_scan
            # Over capacity, a scan learns what other processes wrote or removed before anything is evicted;
            # but a directory of many small blocks fills its low-water gap fast, and scanning at every such
            # fill took a fifth of the write time (2 MiB blocks): scans keep to a share of the time instead.
            share = since >= self._scan_seconds * (1 / _SCAN_TIME_SHARE - 1)
            # the periodic scan also removes what writers that died left behind (temp and parked files):
            # cleaned at open only, they grew a long-lived process's directory past its capacity
            due = since > self._rescan_seconds
            if due or ((over or self._stale_view) and share):
                if self._scan_seconds < _INLINE_SCAN_SECONDS:
                    self._rescan_unless_scanning(clean_temps=due)
                elif share:  # a walk that takes long: behind this write, and within its share of the time
                    self._scan_behind()
            if due and self._capacity < self._room.configured:  # after the scan, which learned what others removed
                self._fit_to_filesystem(full_disk=False)
            while self._evict_for(incoming, parked, later, keep):
                pass  # a victim could not be removed (it is counted still): the next oldest in its place
            spare = parked.take(incoming)
            if spare is None:
                with self._lock:
                    over = self._used + self._reserved + incoming > self._capacity
                if over:  # none of them holds this block: their room is its
                    self._release(parked.drop())
                with self._lock:
                    if self._used + self._reserved + incoming > self._capacity:
                        return False, None
                    self._reserved += incoming
            return True, spare

    def put_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> int:
        return self.put_keeping(items, None, ())

    def put_keeping(self, items: Sequence[tuple[bytes, torch.Tensor]], lossy: str | None,
                    keep: Collection[bytes]) -> int:
        """``ChainTier.put_keeping`` by ``_put_batch``; a batch the filesystem had no room for is written again
        once, in the room it has (``_fit_to_filesystem``)."""
        exact_only(lossy, "a files tier")
        if keep and self.encoding.form:  # the names this tier's lossy form stores them as
            keep = {self.encoding.stored_name(key) for key in keep}
        lowerings = self._room.lowerings
        try:
            return self._put_batch(items, keep)
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
            self._counters.add("filesystem_full")
            self._fit_to_filesystem(full_disk=True, quota=exc.errno == errno.EDQUOT)
            with self._lock:  # lowered since this batch began (here, or by a thread that met the full disk too)
                again = self._room.lowerings != lowerings and self._used > 0
            if not again:
                raise
        return self._put_batch(items, keep)

    def _put_batch(self, items: Sequence[tuple[bytes, torch.Tensor]], keep: Collection[bytes]) -> int:
        """Write each block not yet present (here or by another process) atomically; count those stored.

        Up to ``io_threads`` files are written at once (a file write
        releases the GIL; two threads wrote 256 MiB of new files in 54% of
        one's time here). Room is made block by block as if they were
        written one after another; a block that does not fit beside the
        writes in flight waits until they are stored. A batch larger than
        the tier keeps its leading blocks and its trailing ones are
        ``rejected``: evicting its own leading blocks for them left only
        blocks no lookup reaches (a prefix is read from its first block).
        """
        items = [(self.encoding.stored_name(key), block) for key, block in items]
        in_flight: list[_Write] = []
        ours: set[bytes] = set()  # the batch's blocks written or found stored: never its victims
        kept = Kept(keep, ours)
        error: Exception | None = None
        parked = ParkedFiles()  # this batch's evicted files, overwritten by its next writes (tiers/parked.py)
        stamps = dict(zip(reversed([key for key, _ in items]), reversed(chain_stamps(len(items)))))
        try:
            for key, payload, size, logical, later in self._payloads(items, ours):
                if size > self._capacity or size > self._max_file_bytes(logical):
                    self._counters.add("rejected")  # too big to fit, or a frame so big a read would refuse it
                    continue
                spare = parked.take(size)  # reserved when it was parked: overwriting it grows nothing
                if spare is None:
                    self._release(parked.drop())  # none of them can hold this block
                    if in_flight and not self._fits_beside_in_flight(size):
                        error, in_flight = self._settle(in_flight), []
                        if error is not None:
                            break
                    fits, spare = self._make_room(size, parked, later, kept)
                    if not fits:
                        self._counters.add("rejected")
                        continue
                ours.add(key)
                with self._lock:
                    self._writing.add(key)
                held = size if spare is None else spare.size
                in_flight.append(_Write(key, size, held, logical, self._writers.submit(
                    self._write_file, key, payload, spare, stamps[key])))
        finally:
            error = self._settle(in_flight) or error
            self._release(parked.drop())
        if error is not None:
            raise error
        return sum(self._contains_named(key) for key, _ in items)

    def _payloads(self, items: Sequence[tuple[bytes, torch.Tensor]],
                  stored: set[bytes]) -> Iterator[tuple[bytes, _Payload, int, int, int]]:
        """(key, payload, file bytes, raw bytes, raw bytes of the blocks after it, headers included) of each
        block not stored yet, in order; encoded on the pool, or written raw from the block itself. The blocks
        found stored are added to ``stored`` and count as just accessed: the batch's later blocks evicted them
        when they were the oldest here."""
        todo: list[tuple[bytes, torch.Tensor | Future, int]] = []
        seen: set[bytes] = set()
        for key, block in items:
            if key in seen:
                continue
            if self._contains_named(key):  # an existing file is never rewritten
                self._touch_named([key])
                stored.add(key)
                continue
            seen.add(key)
            payload = block if self._writes_raw(block) else self._writers.submit(self._encoded_parts, block)
            todo.append((key, payload, block.nbytes))
        later = sum(logical for _, _, logical in todo) + HEADER_BYTES * len(todo)
        for key, payload, logical in todo:
            later -= logical + HEADER_BYTES
            if isinstance(payload, Future):
                parts = payload.result()
                yield key, parts, sum(part.nbytes for part in parts) + HEADER_BYTES, logical, later
            else:
                yield key, payload, logical + HEADER_BYTES, logical, later

    def _encoded_parts(self, block: torch.Tensor) -> list[memoryview]:
        return [memoryview(self.encoding.encode(block)).cast("B")]

    def _release(self, nbytes: int) -> None:
        """Parked files of ``nbytes`` were removed: they are no longer reserved."""
        if nbytes:
            with self._lock:
                self._reserved -= nbytes

    def _fits_beside_in_flight(self, size: int) -> bool:
        """Whether evicting stored files can make room for ``size`` more bytes beside the writes in flight
        (which cannot be evicted before they are stored)."""
        with self._lock:
            return self._reserved + size <= self._capacity

    def _settle(self, writes: list["_Write"]) -> Exception | None:
        """Wait for ``writes``; index the files written, in order; returns the first failure, if any."""
        error = None
        for write in writes:
            mtime_ns = None
            try:
                mtime_ns = write.future.result()
            except (IsADirectoryError, NotADirectoryError):  # a directory squats on the block's path, or a
                self._counters.add("rejected")                  # file or a symlink on a fan-out directory's
                self._refusals.refused(1, "a directory, a symlink or a file stands where a block or its fan-out "
                                          "directory goes (the tier writes through nothing it did not make)")
            except TempRemoved:  # not this tier's failure: the block is not stored
                self._counters.add("rejected")
                self._refusals.refused(1, "another process removed a temp file of this one's before its rename")
            except Exception as exc:  # the tier's own failure (a full disk): raised once all are settled
                error = error or exc
            with self._lock:
                self._reserved -= write.held
                self._writing.discard(write.key)
                if mtime_ns is not None:
                    self._unmoved.pop(write.key, None)  # written anew where a block is written
                    self._remember(write.key, write.size, mtime_ns)
                    self._stamp(write.key, mtime_ns)
            if mtime_ns is not None:
                self._counters.add("blocks_written")
                self._counters.add("bytes_written", write.size - HEADER_BYTES)
                self._counters.add("logical_bytes_written", write.logical)
        return error

    def _open(self, path: str, flags: int) -> tuple[int, bool]:
        """``os.open`` with O_DIRECT if asked and the filesystem accepts it; returns (fd, direct)."""
        if self._o_direct:
            try:
                return os.open(path, flags | os.O_DIRECT, 0o666), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._counters.add("o_direct_fallbacks")
                if flags & os.O_CREAT:  # the refused open may have created the file
                    flags = (flags & ~os.O_EXCL) | os.O_TRUNC
        return os.open(path, flags, 0o666), False

    def _writes_raw(self, block: torch.Tensor) -> bool:
        """Whether a raw tier's payload is written from byte views of ``block`` itself (one per layer and part
        of a token range of a larger tensor), with one ``pwritev`` and no contiguous copy first; else it is
        encoded. The views are made by the writer (``payload_views``)."""
        if self.encoding.codec is not None or self._o_direct:
            return False
        count = payload_view_count(block)
        return count is not None and count <= MAX_IOVECS

    def _temp_path(self, key: bytes) -> str:
        """A new temp name beside block ``key``'s path (a live writer's, for the scans of every process)."""
        return os.path.join(os.path.dirname(block_path(self._root, key)),
                            f".{key.hex()}~{self._host}~{os.getpid()}~{self._temp_token}{next(self._temp_names):x}.tmp")

    def _make_dirs(self, directory: str) -> None:
        """Create block fan-out ``directory`` (durably if ``sync``)."""
        os.makedirs(directory, exist_ok=True)
        if self._sync:
            fsync_dir(self._root)

    def _open_temp(self, key: bytes, spare: Parked | None) -> tuple[str, int, bool]:
        """(temp path, fd, direct) to write block ``key`` into: the parked file ``spare`` if it still opens as
        a regular file, else a new temp file beside the block's path."""
        if spare is not None:
            try:
                fd, direct = self._open(spare.path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:  # removed meanwhile (its bytes are gone too), or something else was put there
                with contextlib.suppress(OSError):
                    unlink_file(spare.path)  # a regular file that would not open: its bytes are released with it
            else:
                opened = os.fstat(fd)
                if stat.S_ISREG(opened.st_mode) and opened.st_nlink == 1:  # linked since it was parked: not ours
                    self._counters.add("recycled")
                    return spare.path, fd, direct
                os.close(fd)
                with contextlib.suppress(OSError):
                    unlink_file(spare.path)  # the name goes; the other names keep their bytes
        temp = self._temp_path(key)
        if os.path.islink(os.path.dirname(temp)):  # the scans never follow it: its blocks would go uncounted
            raise NotADirectoryError(errno.ENOTDIR, "a symlink stands for a fan-out directory; the files tier "
                                     "writes no block through one", os.path.dirname(temp))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd, direct = self._open(temp, flags)
        except FileNotFoundError:  # first block of this fan-out directory
            self._make_dirs(os.path.dirname(temp))
            fd, direct = self._open(temp, flags)
        return temp, fd, direct

    def _write_file(self, key: bytes, payload: _Payload, spare: Parked | None = None,
                    stamp: int | None = None) -> int:
        """Write a temp file holding ``payload`` (its parts in order, or a raw block's bytes), rename it onto
        block ``key``'s path; returns the file's mtime (ns): ``stamp`` if given. The temp file is ``spare``,
        an evicted file overwritten in place, when it is still there."""
        final = block_path(self._root, key)
        directory = os.path.dirname(final)
        temp, fd, direct = self._open_temp(key, spare)
        try:
            try:  # the payload is viewed and checksummed here: a failure removes the temp file (the spare) too
                parts = payload if isinstance(payload, list) else payload_views(payload)
                header = BlockHeader.for_parts(key, self._fingerprint, parts,
                                              self.encoding.header_encoding(parts[0])).pack()
                total = HEADER_BYTES + sum(part.nbytes for part in parts)
                if direct:  # aligned bounce buffer padded to a page, then cut to the true length
                    padded = round_up(total)
                    bounce = self._buffer("bounce", padded)
                    bounce[:HEADER_BYTES] = header
                    at = HEADER_BYTES
                    for part in parts:
                        bounce[at:at + part.nbytes] = part
                        at += part.nbytes
                    bounce[total:padded] = bytes(padded - total)
                    written = transfer(os.pwritev, fd, [memoryview(bounce)[:padded]], nbytes=padded)
                    os.ftruncate(fd, total)
                else:
                    written = transfer(os.pwritev, fd, [header, *parts], nbytes=total)
                    if spare is not None and temp == spare.path and spare.size != total:
                        os.ftruncate(fd, total)  # a larger evicted file overwritten: cut to this block
                if written < total:
                    raise OSError(errno.EIO, f"short write of {temp}: {written} of {total} bytes")
                if stamp is not None:
                    os.utime(fd, ns=(stamp, stamp))
                if self._sync:
                    os.fsync(fd)
                mtime_ns = os.fstat(fd).st_mtime_ns
            finally:
                os.close(fd)
            if os.path.islink(directory):  # the parked file of another directory moves through nothing unmade
                raise NotADirectoryError(errno.ENOTDIR, "a symlink stands for a fan-out directory; the files tier "
                                         "writes no block through one", directory)
            try:
                os.rename(temp, final)
            except FileNotFoundError:  # an overwritten parked file moves to a fan-out directory not made yet
                if not os.path.lexists(temp):
                    raise TempRemoved(errno.ENOENT, "another process removed the temp file", temp) from None
                if os.path.dirname(temp) == directory:
                    raise
                self._make_dirs(directory)
                os.rename(temp, final)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                raise NotADirectoryError(errno.ENOTDIR, "a fan-out directory is on another filesystem (a mount or "
                                         "a symlink stands for it)", directory) from None
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        if self._sync:
            fsync_dir(directory)
        return mtime_ns

    def _buffer(self, name: str, nbytes: int) -> bytearray | mmap.mmap:
        """This thread's ``scratch`` (bytearray) or page-aligned ``bounce`` (mmap) buffer, grown as needed."""
        buf = getattr(self._local, name, None)
        if buf is None or len(buf) < nbytes:
            buf = mmap.mmap(-1, round_up(nbytes)) if name == "bounce" else bytearray(nbytes)
            setattr(self._local, name, buf)
        return buf

    def get_run_into(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor]) -> int:
        """Read the leading blocks ``keys`` into ``outs`` by up to ``io_threads`` readers side by side (at
        most one per core), each taking the next block (``RunCursor``); how many leading blocks were read
        and verified.

        One thread copying from the page cache leaves the other cores idle:
        a store read 256 MiB of 2 MiB blocks in 48 ms block by block and in
        26 ms as two runs on two cores. A run of under
        ``_SPLIT_RUN_BYTES`` is read by this thread alone. Each block is read
        and judged as ``get_into`` does; ``outs`` past the returned count may
        have been read into by another reader. A tier error (EIO) on the
        first block raises; further on, it ends the count there.
        """
        if len(keys) != len(outs):
            raise ValueError(f"outs: expected one per key ({len(keys)}), got {len(outs)}")
        keys = [self.encoding.stored_name(key) for key in keys]
        nbytes = sum(out.nbytes for out in outs)
        readers = min(self._parts_per_read, len(keys)) if nbytes >= _SPLIT_RUN_BYTES else 1
        cursor = RunCursor(len(keys))
        stamps = chain_stamps(len(keys))
        # A reader on the pool reads whole blocks: were it to wait there for parts of a block, the reads of two
        # callers could hold every pool thread and wait on each other.
        later = [self._readers.submit(self._read_taking, keys, outs, stamps, cursor, False)
                 for _ in range(readers - 1)]
        try:
            self._read_taking(keys, outs, stamps, cursor, not later)
        finally:
            wait(later)  # every read into ``outs`` ends before this returns, whatever raised
        for future in later:
            future.result()
        if cursor.leading == 0 and cursor.error is not None:
            raise cursor.error
        return cursor.leading

    def _read_taking(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor], stamps: Sequence[int],
                     cursor: RunCursor, split: bool) -> None:
        """Read the blocks ``cursor`` hands out until it ends; each hit's file gets its access stamp from
        ``stamps`` (ns); ``split``: a large block may be read in parts on the pool."""
        while (n := cursor.take()) is not None:
            try:
                if not self._get(keys[n], outs[n], split, stamps[n]):
                    cursor.missed(n)
            except OSError as error:
                cursor.missed(n, error)
            except BaseException:  # passed on: the other readers stop taking blocks
                cursor.missed(n)
                raise

    def get_into(self, key: bytes, out: torch.Tensor) -> bool:
        """Read and verify block ``key`` into ``out``; on False ``out`` may have been partly overwritten.

        A missing file is a miss; a damaged one is also deleted (best effort)
        and counted ``corrupt``. So is anything else found at the block's
        path (a symlink, FIFO, directory, a file too large to be a block),
        except that only regular files are ever deleted. Other OSErrors (EIO,
        EACCES, ...) propagate: the store above tracks tier health.
        """
        return self._get(self.encoding.stored_name(key), out, True)

    def _get(self, key: bytes, out: torch.Tensor, split: bool, stamp: int | None = None) -> bool:
        """``get_into``; ``split``: a large block may be read in parts on the pool; ``stamp``: its file's
        access stamp on a hit (ns; default now)."""
        path = self._path(key)
        known = key in self._index
        try:
            verdict, st = self._read(path, key, out, split, stamp)
        except OSError as exc:
            if exc.errno in NOT_A_FILE or (exc.errno in (errno.EACCES, errno.EPERM) and squatted(path)):
                verdict, st = CORRUPT, None  # a symlink, socket, device (EACCES on nodev), ... is there
            elif exc.errno in NO_FILE:
                verdict, st = "gone", None
            else:
                raise
        if verdict == CORRUPT and st is not None and vanished(path):
            verdict = "gone"  # evicted (and maybe overwritten, tiers/parked.py) while read: no damage of ours
        if verdict == INTACT:
            with self._lock:
                if not st.st_nlink:  # evicted while we read it: the data was still sound
                    self._forget(key)
                elif key in self._index or (not known and key not in self._writing and key not in self._evicting
                                            and same_file(path, st)):
                    self._remember(key, st.st_size, st.st_mtime_ns)
                    if stamp is not None:
                        self._stamp(key, st.st_mtime_ns)
                # else evicted here while read (its file parked or gone): indexing it again counted its bytes
                # twice, beside the parked file's reservation, and put the tier over its capacity
            self._counters.add("hits")
            self._counters.add("bytes_read", st.st_size - HEADER_BYTES)
            return True
        self._counters.add("misses")
        if verdict == "gone" and known:
            self._stale_view = True  # another process removed an indexed block: rescan at the next write
        if verdict != OTHER_SIZE:
            with self._lock:
                self._forget(key)
        if verdict in (CORRUPT, OTHER_CODEC):  # damaged, or in a form this tier no longer serves
            self._counters.add("corrupt" if verdict == CORRUPT else "stale")
            if st is not None:  # only the regular file judged, unless a writer has renamed a new one over it
                with contextlib.suppress(OSError):  # best effort: a read-only directory keeps it
                    unlink_file(path, same=st)
        return False

    def _read(self, path: str, key: bytes, out: torch.Tensor, split: bool,
              stamp: int | None) -> tuple[str, os.stat_result]:
        """(verdict, the file's stat, touched on a hit); raises OSError.

        A raw tier reads header and payload straight into a contiguous CPU
        ``out``; anything else (a codec, O_DIRECT, a frame or another size
        found there) reads the whole file into a buffer and decodes it.
        Whatever is there is untrusted: it is opened without following a
        symlink or waiting on a FIFO, and only a regular file of at most
        ``_max_file_bytes`` is read (at most that many bytes + 1), so memory
        and time stay bounded by the block size; anything else is ``CORRUPT``.
        """
        fd, direct = self._open(path, READ_FLAGS)
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode)
                    and HEADER_BYTES <= st.st_size <= self._max_file_bytes(out.nbytes)):
                return CORRUPT, st  # a FIFO, device, directory; or a file no block of this size can be
            verdict = None
            views = payload_views(out) if self.encoding.codec is None and not direct else None
            if views is not None and len(views) <= MAX_IOVECS:
                verdict = self._read_raw(fd, key, views, split)
            if verdict is None:
                verdict = self._read_whole(fd, direct, key, out, st.st_size)
            if verdict == INTACT:
                try:
                    if stamp is None:  # the shared last-access stamp
                        os.utime(fd)
                    else:
                        os.utime(fd, ns=(stamp, stamp))
                except OSError as exc:  # best effort: another user's file, or a read-only directory
                    if exc.errno not in STAMP_REFUSED:
                        raise
            return verdict, os.fstat(fd)
        finally:
            os.close(fd)

    def _read_raw(self, fd: int, key: bytes, views: list[memoryview], split: bool) -> str | None:
        """Header and payload read straight into ``views`` (the output's bytes, in payload order, one
        ``preadv``); None if the file holds something else."""
        expected = sum(view.nbytes for view in views)
        header = bytearray(HEADER_BYTES)
        total, digest = self._read_parts(fd, header, views, expected, split)
        parsed = BlockHeader.unpack(header) if total >= HEADER_BYTES else None
        if parsed is None or parsed.key != key or parsed.layout != self._fingerprint:
            return CORRUPT
        if parsed.length != expected or parsed.encoding != ENCODING_RAW:
            return None  # another size, or a frame: the general path decides
        if total != HEADER_BYTES + expected or parsed.checksum != digest.intdigest():
            return CORRUPT  # truncated, too long, or the checksum does not match
        return INTACT

    def _read_parts(self, fd: int, header: bytearray, views: list[memoryview], expected: int,
                    split: bool) -> tuple[int, "xxhash.xxh3_64"]:
        """Read ``header`` and ``views`` from the file, and one byte more (it must not be there): bytes read,
        and the checksum of what ``views`` hold.

        A payload of ``_SPLIT_READ_BYTES`` or more is read in ``io_threads``
        parts (at most one per core) side by side, each part checksummed as
        soon as it and those before it are in: one thread copying from the
        page cache leaves the other cores idle (a store read 256 MiB of
        32 MiB blocks in 45 ms in one part, 32-35 ms in two). Only this
        block's slice of ``out`` is read into, so a failed block leaves the
        ones after it untouched.
        """
        tail, digest = bytearray(1), xxhash.xxh3_64()
        groups = split_views(views, self._parts_per_read) if split and expected >= _SPLIT_READ_BYTES else [views]
        first = expected if len(groups) == 1 else sum(view.nbytes for view in groups[0])
        later, offset = [], HEADER_BYTES + first
        for n, group in enumerate(groups[1:], 2):
            last = [tail] if n == len(groups) else []
            size = sum(view.nbytes for view in group)
            later.append(self._readers.submit(transfer, os.preadv, fd, group + last, offset, size))
            offset += size
        total, error = 0, None
        try:
            total = read_hashed(fd, header, groups[0], [] if later else [tail], digest, first)
        finally:
            for group, future in zip(groups[1:], later):  # every read ends before the file is closed
                try:
                    total += future.result()
                except Exception as exc:
                    error = error or exc
                for view in group:
                    digest.update(view)
        if error is not None:
            raise error
        return total, digest

    def _read_whole(self, fd: int, direct: bool, key: bytes, out: torch.Tensor, size: int) -> str:
        """Read the whole file (``size`` bytes when opened, at most size + 1 read) into a buffer, check its
        header and checksum, decode it into ``out``."""
        if direct:
            length = round_up(size + 1)  # aligned reads only; + 1: notice a file that grew
            source = memoryview(self._buffer("bounce", length))[:length]
            total = 0
            while total < length:  # a short read is the end of the file
                n = os.preadv(fd, [source[total:]], total)
                total += n
                if n == 0 or n % ALIGN:
                    break
        else:
            source = memoryview(self._buffer("scratch", size + 1))[:size + 1]
            total = transfer(os.preadv, fd, [source])
        parsed = BlockHeader.unpack(source[:HEADER_BYTES]) if total >= HEADER_BYTES else None
        if parsed is None or total != HEADER_BYTES + parsed.length:
            return CORRUPT
        payload = source[HEADER_BYTES:total]
        if not parsed.verifies(key, self._fingerprint, payload):
            return CORRUPT
        return self.encoding.decode_into(payload, out, parsed.encoding)

    def delete(self, key: bytes) -> bool:
        """Remove block ``key`` for every process sharing the directory; True if this call removed it."""
        key = self.encoding.stored_name(key)
        path = self._path(key)
        with self._lock:
            self._forget(key)
        return unlink_file(path)

    def stats(self) -> dict[str, int]:
        with self._lock:
            blocks, used = len(self._index), self._used
        return tier_stats(self._counters, blocks, used, self._capacity)

    def close(self) -> None:
        """Finish the writes under way and forget the in-memory index; the files stay (they are the shared
        cache). Idempotent."""
        self._writers.close()
        self._readers.close()
        with self._lock:
            self._index.clear()
            self._used = 0


def _check(layout: KVLayout, config: StoreConfig) -> None:
    """What opening would refuse, before any tier makes a file: a bad setting left LMDB's files behind."""
    check_one_block(layout, config.files_bytes, "files_bytes")
    check_folder("files_dir", config.files_dir)


def _build(layout: KVLayout, config: StoreConfig) -> FilesTier:
    return FilesTier(config.files_dir, config.files_bytes, layout, sync=config.files_sync,
                     o_direct=config.files_o_direct, codec=get_codec(config.files_codec),
                     io_threads=config.files_io_threads)


SPEC = TierSpec(
    name="files",
    wanted=lambda config: config.files_dir is not None and config.files_bytes > 0,
    build=_build,
    check=_check,
    persistent=True,
    bandwidth_prior=0.5e9,
    admit_after=lambda config: config.files_admit_after,
    codec_setting="files_codec",
)
