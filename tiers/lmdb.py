"""Local-NVMe tier on an LMDB environment: persistent, bounded, one writer and many readers.

Eviction is an approximation of LRU. Every block's meta record carries an
access stamp from a persistent logical clock. Within a process the order is
exact (kept in memory). Reads do not open write transactions: their new
stamps are written with the next put (or on close), so after a crash the
reads since the last put are forgotten and those blocks look older than they
were. On open the order is rebuilt by sorting the stamps.

The LMDB map is reserved at twice the byte capacity (at least capacity +
1 GiB) of virtual address space, so the user never sizes it; if free-page
fragmentation still fills it, more blocks are evicted and the write retried.
One process owns a directory at a time (an flock guards it); threads of that
process read concurrently while one writes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

import lmdb
import torch

from kvstore.blockformat import HEADER_BYTES, BlockHeader
from kvstore.compression.codec import FrameCodec
from kvstore.compression.stored import CORRUPT, INTACT, OTHER_CODEC, BlockEncoding
from kvstore.layout import KVLayout
from kvstore.metrics import Counters
from kvstore.tiers.base import (TIER_COUNTERS, Capability, EvictCallback, Kept, check_one_block, exact_only,
                                make_directory, tier_stats)
from kvstore.tiers.inuse import InUse
from kvstore.tiers.room import FilesystemRoom
from kvstore.compression.registry import get_codec
from kvstore.config import StoreConfig, check_folder
from kvstore.tiers.spec import TierSpec

# A meta record: the block header, then its access stamp and the lossy form it was written in
# (``BlockEncoding.form_of``; 0: exact), which the header's codec id alone does not name.
_TAIL = struct.Struct("<QQ")
_META_BYTES = HEADER_BYTES + _TAIL.size
_MAX_WRITE_ATTEMPTS = 8
# A failed commit with this much more free space than twice its bytes did not fail for want of room (bytes).
_FULL_SLACK_BYTES = 1 << 20
# How often a tier a full filesystem held below ``disk_bytes`` looks for room that came back (seconds).
_ROOM_RECHECK_SECONDS = 30.0
# A file of room kept beside the environment, given up when the filesystem fills: LMDB writes new pages even to
# commit a delete, so on a filesystem with no byte left the eviction that would make room failed too, and the
# tier's writes stayed suspended. 1 MiB, or a 64th of a smaller filesystem (bytes).
RESERVE_NAME = "room.reserve"
_RESERVE_BYTES = 1 << 20
# Dirty access stamps kept for the next write; beyond this they are written on their own.
_MAX_PENDING_STAMPS = 4096

log = logging.getLogger(__name__)


class DirectoryInUseError(RuntimeError):
    """Another process has this LMDB directory open."""


# The lock files this process holds. An flock is shared by a forked child (the open file is), so a child
# (an engine's worker, a multiprocessing fork) would keep a directory locked after its parent closed the
# store: each child closes its inherited copies right after fork, which leaves the parent's lock held.
_HELD_LOCKS: "weakref.WeakSet[IO[str]]" = weakref.WeakSet()


def _close_inherited_locks() -> None:
    for lock_file in list(_HELD_LOCKS):
        with contextlib.suppress(OSError):
            lock_file.close()
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


# A put of more than half the tier is written in transactions of at most this fraction of its capacity each: in one,
# the blocks it evicted kept their pages until it committed (beside the snapshots readers hold), and the data file
# grew to 4.7 times the capacity.
_PARTS_PER_CAPACITY = 4

# A child forked a moment ago may not have closed its inherited copy yet: a held lock is retried this long
# (seconds) before the directory is reported in use.
LOCK_WAIT_SECONDS = 2.0


def _payload_bytes(payload: object) -> int:
    """Bytes ``payload`` is stored as: an encoded payload's, or a raw block's (``torch.Tensor``), which is
    gathered only when its transaction puts it (``LmdbTier._write``)."""
    if isinstance(payload, torch.Tensor):
        return payload.nbytes
    return memoryview(payload).nbytes


def _parts(payloads: list[tuple[bytes, object]], most_bytes: int) -> Iterator[list[tuple[bytes, object]]]:
    """``payloads`` in order, in runs of at most ``most_bytes`` stored bytes (a payload larger alone)."""
    part: list[tuple[bytes, object]] = []
    size = 0
    for key, payload in payloads:
        stored = _payload_bytes(payload) + HEADER_BYTES
        if part and size + stored > most_bytes:
            yield part
            part, size = [], 0
        part.append((key, payload))
        size += stored
    if part or not payloads:
        yield part


def lock_directory(path: Path, message: str) -> IO[str]:
    """Create ``path`` and hold an exclusive flock on it (released when the returned file closes).

    ``DirectoryInUseError(message)`` (``{path}`` filled in) if another process holds it; a ``ValueError``
    naming the setting (the message's first word) if something other than a directory is at ``path``.
    """
    setting = message.split()[0]
    make_directory(path, setting)
    try:  # read-only when it is there: a flock needs no write, and an open for writing waits on a frozen disk
        lock_file = open(path / "kvstore.lock", "r") if (path / "kvstore.lock").is_file() else \
            open(path / "kvstore.lock", "a+")
    except OSError as exc:  # a read-only mount, another user's directory, a directory named kvstore.lock
        raise OSError(exc.errno, f"{setting} {path}: cannot open its lock file kvstore.lock ({exc.strerror}); "
                                 f"an LMDB directory must be writable (a read-only shared directory can be a "
                                 f"files_dir)") from None
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                lock_file.close()
                raise DirectoryInUseError(message.format(path=path)) from None
            time.sleep(0.01)
    _HELD_LOCKS.add(lock_file)
    return lock_file


def open_environment(path: Path, capacity_bytes: int, sync: bool, lock_file: IO[str],
                     setting: str) -> lmdb.Environment:
    """The LMDB environment at ``path`` for ``capacity_bytes`` of data, its map twice that (or 1 GiB more) so
    that fragmentation never fills it; ``lock_file`` is closed if it cannot be opened. A map larger than the
    machine can reserve is a ``ValueError`` naming ``setting``; any other LMDB failure an ``OSError``."""
    map_size = _map_size(capacity_bytes)
    for name in ("data.mdb", "lock.mdb"):  # LMDB opens what it finds: a FIFO there hung the store's open
        try:
            found = os.stat(path / name)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            lock_file.close()
            raise OSError(f"{path / name}: cannot be read ({exc.strerror}): not a kvstore LMDB environment") from None
        if not stat.S_ISREG(found.st_mode):
            lock_file.close()
            raise OSError(f"{path / name}: expected a regular file (LMDB's), got a {_kind(found.st_mode)}: "
                          f"not a kvstore LMDB environment")
    try:
        env = lmdb.open(str(path), map_size=map_size, max_dbs=2, sync=sync, metasync=sync, readahead=False,
                        max_readers=512, subdir=True)
    except lmdb.MemoryError:
        lock_file.close()
        raise _unmappable(setting, capacity_bytes) from None
    except lmdb.Error as exc:
        lock_file.close()
        if "already open in this process" in str(exc):  # py-lmdb's own registry, inherited through a fork too
            raise OSError(f"{path}: LMDB could not open it: this process has it open already, or was forked from "
                          f"one that had it open (LMDB refuses it then, even once the parent closed it): open this "
                          f"store in a spawned process (multiprocessing's 'spawn'), or fork before opening one") \
                from None
        raise OSError(f"{path}: LMDB could not open it: {exc}") from None
    try:
        check_whole(env, path)
    except OSError:
        env.close()
        lock_file.close()
        raise
    return env


# The named databases of each kind of kvstore LMDB environment, and what an operator calls it.
ENVIRONMENT_KINDS = {frozenset({b"blocks", b"meta"}): "a store's disk tier (disk_dir)",
                     frozenset({b"blobs", b"meta"}): "a cache server's data (its data_dir's blobs.lmdb)"}


def open_databases(env: lmdb.Environment, path: Path, lock_file: IO[str], *names: bytes) -> list:
    """``env``'s named databases ``names``; an environment another program made, where those names are not
    databases (plain keys, other flags), is an ``OSError`` naming ``path``, with ``env`` and ``lock_file``
    closed (it was a raw ``lmdb.IncompatibleError``, a traceback from ``kvstore serve``).

    So is an environment holding any other database: a store's disk tier
    pointed at a cache server's ``blobs.lmdb`` (or a server at a store's)
    shared the ``meta`` database, and each side deleted the other's records
    as broken at open, while the other was running.
    """
    with env.begin() as txn:
        found = {bytes(key) for key, _ in txn.cursor()}
    if found - set(names):
        kind = ENVIRONMENT_KINDS.get(frozenset(found), "another program's")
        env.close()
        lock_file.close()
        raise OSError(f"{path}: expected an LMDB environment holding the databases "
                      f"{', '.join(sorted(n.decode() for n in names))}; it holds "
                      f"{', '.join(sorted(n.decode(errors='replace') for n in found))}: this is {kind}. "
                      f"Give each its own directory (nothing was changed)")
    try:
        return [env.open_db(name) for name in names]
    except lmdb.Error as exc:
        env.close()
        lock_file.close()
        raise OSError(f"{path}: not a kvstore LMDB environment (another program's?): {exc}") from None


def drop_records(env: lmdb.Environment, keys: Sequence[bytes], *databases: object) -> None:
    """Delete ``keys`` from each of ``databases`` in one transaction (broken records found at open)."""
    with env.begin(write=True) as txn:
        for key in keys:
            for db in databases:
                txn.delete(key, db=db)


def _kind(mode: int) -> str:
    kinds = {stat.S_ISDIR: "directory", stat.S_ISFIFO: "FIFO", stat.S_ISCHR: "character device",
             stat.S_ISBLK: "block device", stat.S_ISSOCK: "socket"}
    return next((name for test, name in kinds.items() if test(mode)), "special file")


def _map_size(capacity_bytes: int) -> int:
    return max(2 * capacity_bytes, capacity_bytes + (1 << 30))


def _unmappable(setting: str, capacity_bytes: int) -> ValueError:
    return ValueError(f"{setting}: expected a size this machine can map (LMDB reserves {_map_size(capacity_bytes)} "
                      f"bytes of address space for it), got {capacity_bytes}")


def check_mappable(capacity_bytes: int, setting: str) -> None:
    """``open_environment``'s ``ValueError`` for a map this process cannot reserve, found by reserving (not
    committing) as much address space, before a directory or a file is made."""
    try:
        probe = mmap.mmap(-1, _map_size(capacity_bytes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                          | getattr(mmap, "MAP_NORESERVE", 0), prot=getattr(mmap, "PROT_NONE", 0))
    except (OSError, OverflowError, ValueError):
        raise _unmappable(setting, capacity_bytes) from None
    probe.close()


def check_whole(env: lmdb.Environment, path: Path) -> None:
    """An ``OSError`` if ``path``'s data file is shorter than its pages in use: LMDB maps the file and reads
    pages past its end as it meets them, and the first one killed the process with SIGBUS (a file truncated
    by a copy that ran out of room, or by hand)."""
    try:
        size = os.path.getsize(path / "data.mdb")
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    except (OSError, lmdb.Error) as exc:
        raise OSError(f"{path}: cannot size the LMDB data file: {exc}") from None
    if size < needed:
        raise OSError(f"{path}: the LMDB data file is truncated ({size} bytes, its pages in use need {needed}); "
                      f"remove data.mdb to start this cache empty")


class LmdbTier:
    """Blocks in an LMDB environment under ``path``, at most ``capacity_bytes`` of them.

    ``capacity_bytes`` counts each block's stored payload (encoded, if a
    ``codec`` is given) plus its header. ``sync`` makes every write durable
    (fdatasync at commit) before ``put_many`` returns.
    """

    name = "lmdb"
    persistent = True
    capabilities = Capability.EVICTS | Capability.ENCODED | Capability.CHAINS

    def __init__(self, path: str | os.PathLike[str], capacity_bytes: int, layout: KVLayout, sync: bool = True,
                 codec: FrameCodec | None = None):
        self._full = check_one_block(layout, capacity_bytes, "disk_bytes")
        self.path = Path(path)
        self._lock_file = lock_directory(self.path, "disk_dir {path} is open in another process (or another "
                                                    "store of this one); give each store its own disk_dir or share "
                                                    "one through the cache server")
        self._capacity = capacity_bytes  # bytes: held to the filesystem's room after a full disk
        self._room = FilesystemRoom(self.path, capacity_bytes, self._full, "disk_dir", log, free_share=0.5,
                                    recheck_seconds=_ROOM_RECHECK_SECONDS)
        self.layout = layout
        self._fingerprint = layout.fingerprint
        self.encoding = BlockEncoding(layout, codec)
        # Sees each block evicted for room (verified bytes) after the eviction commits: write-back below.
        self.on_evict: EvictCallback | None = None
        self._env = open_environment(self.path, capacity_bytes, sync, self._lock_file, "disk_bytes")
        self._blocks, self._meta = open_databases(self._env, self.path, self._lock_file, b"blocks", b"meta")
        self._lock = threading.Lock()  # guards the index, the clock and the pending stamps
        self._write_lock = threading.Lock()  # one writer at a time
        self._gather: torch.Tensor | None = None  # raw strided blocks are gathered here for LMDB (``_gathered``)
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> stored bytes, LRU first
        self._used = 0
        self._pending_stamps: dict[bytes, int] = {}
        self._counters = Counters(*TIER_COUNTERS, "logical_bytes_written", "stale", "filesystem_full")
        self._foreign: set[bytes] = set()  # indexed blocks in another codec's lossy form (``_load_index``)
        self._clock = self._load_index()
        self._in_use = InUse()  # the map is unmapped at close: no call may be inside it then
        self._keep_reserve()
        if self._used > self._capacity:
            self._write([], [])

    def _load_index(self) -> int:
        """Rebuild the in-memory LRU from the meta records; drop records that do not parse. Blocks in another
        codec's lossy form are indexed (they take room, and are evicted in turn) but ``foreign``: not held for a
        lookup or a put, which overwrites them (after a lossy ``disk_codec`` was turned off they were counted
        as held, so a put skipped them and a get repaired one block a request). Turned back on, the codec
        serves them again."""
        records: list[tuple[int, bytes, int]] = []
        broken: list[bytes] = []
        too_big: list[bytes] = []  # intact, but larger than the tier now (a smaller disk_bytes): evicted
        oversized: list[tuple[bytes, int]] = []  # (key, payload bytes) of records larger than the tier now
        # a flipped bit in a length evicted the whole tier (other layouts' blocks, larger than this one's, are
        # kept: one directory serves models in turn)
        with self._env.begin(db=self._meta) as txn:
            for key, value in txn.cursor():
                header = BlockHeader.unpack(value)
                if header is None or len(value) != _META_BYTES or header.key != key:
                    broken.append(key)
                    continue
                if header.length + HEADER_BYTES > self._capacity:
                    oversized.append((key, header.length))
                    continue
                stamp, form = _TAIL.unpack_from(value, HEADER_BYTES)
                if self.encoding.foreign(header.encoding, form):
                    self._foreign.add(key)
                records.append((stamp, key, header.length + HEADER_BYTES))
        if oversized:  # intact if its block has that length (a view of it: a large block is not copied at open)
            with self._env.begin(db=self._blocks, buffers=True) as txn:
                for key, length in oversized:
                    block = txn.get(key)
                    (too_big if block is not None and len(block) == length else broken).append(key)
        if broken or too_big:
            drop_records(self._env, broken + too_big, self._meta, self._blocks)
            self._counters.add("corrupt", len(broken))
            self._counters.add("evictions", len(too_big))
        if too_big:
            log.info("disk_dir %s: evicted %d block(s) larger than disk_bytes=%d at open", self.path, len(too_big),
                     self._capacity)
        records.sort()
        for _, key, size in records:
            self._index[key] = size
            self._used += size
        return records[-1][0] + 1 if records else 0

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    def contains(self, key: bytes) -> bool:
        # A dict membership test is atomic under the GIL; no lock on the lookup hot path.
        return key in self._index and key not in self._foreign

    def keys(self) -> Iterator[bytes]:
        with self._lock:
            return iter([key for key in self._index if key not in self._foreign])

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def put_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> int:
        """Write blocks durably, evicting LRU blocks to make room (none once closing): in one transaction, or in
        several of a quarter of the tier each for a put of more than half of it."""
        return self.put_keeping(items, None, ())

    def put_keeping(self, items: Sequence[tuple[bytes, torch.Tensor]], lossy: str | None,
                    keep: Collection[bytes]) -> int:
        """``ChainTier.put_keeping``."""
        exact_only(lossy, "an LMDB tier")
        with self._in_use.hold() as held:
            return self._put_many(items, keep) if held else 0

    def _put_many(self, items: Sequence[tuple[bytes, torch.Tensor]], keep: Collection[bytes] = ()) -> int:
        if self._room.recheck_due(self._capacity):
            free = self._room.free_bytes(full_disk=False)
            if free is not None and self._refit(free, full_disk=False):
                self._keep_reserve()
        fitting, total, seen = [], 0, set()
        for n, (key, block) in enumerate(items):
            if key in seen or self.contains(key):
                continue
            # a raw block is gathered in its transaction, into one buffer reused block after block: gathered
            # up front, 128 strided blocks of 2 MiB were 256 MiB of fresh memory faulted in at every put
            payload = block if self.encoding.codec is None else self.encoding.encode(block)
            total += _payload_bytes(payload) + HEADER_BYTES
            if total > self._capacity:
                # A put whose own blocks eviction never takes: a prompt larger than the tier was committed
                # whole (50 blocks in a tier of 3). The leading blocks are those a lookup reaches.
                self._counters.add("rejected", len({k for k, _ in items[n:] if not self.contains(k)} - seen))
                break
            seen.add(key)
            fitting.append((key, payload))
            self._counters.add("logical_bytes_written", block.nbytes)
        for part in _parts(fitting, self._capacity // _PARTS_PER_CAPACITY if total > self._capacity // 2 else total):
            self._write(part, [], Kept(keep, seen))
        return sum(self.contains(key) for key, _ in items)

    def _write(self, payloads: list[tuple[bytes, object]], deletes: list[bytes],
               keep: Collection[bytes] | Kept = ()) -> None:
        """One write transaction: evict (none of the blocks in ``keep``, nor those stored), delete, store
        ``payloads`` not yet stored, persist stamps. Trailing payloads that find no room beside the blocks
        kept are ``rejected``: the tier never holds more than its capacity.

        Victims go to ``on_evict`` (write-back to the tier below) before the
        transaction that deletes them commits: a process killed between the
        two lost them from every tier, flushed and durable as they were.
        """
        with self._write_lock:
            # Another writer may have stored some of these since the caller looked.
            with self._lock:
                payloads = [(k, p) for k, p in payloads if k not in self._index or k in self._foreign]
            incoming = sum(_payload_bytes(p) + HEADER_BYTES for _, p in payloads)
            keep = Kept(keep, {k for k, _ in payloads})
            slack = 0  # bytes evicted beyond the payloads' own, for the map's fragmentation
            for _ in range(_MAX_WRITE_ATTEMPTS):
                with self._lock:
                    victims = self._pick_victims(incoming + slack, keep)
                    over = self._used - sum(self._index[k] for k in victims) + incoming - self._capacity
                    if over > 0:  # every other block is a victim: the blocks kept (another writer may have
                        while payloads and over > 0:  # stored some since) leave no room for the last payloads
                            _, dropped = payloads.pop()
                            incoming -= _payload_bytes(dropped) + HEADER_BYTES
                            over -= _payload_bytes(dropped) + HEADER_BYTES
                            self._counters.add("rejected")
                        victims = self._pick_victims(incoming + slack, keep)
                    stamps = dict(self._pending_stamps)
                    records = [(k, p, self._tick()) for k, p in payloads]
                if self.on_evict is not None and victims:
                    with self._env.begin(buffers=True) as txn:
                        evicted = self._copy_out(txn, victims)
                    for key, block in evicted:
                        self.on_evict(key, block, self.encoding.lossy)
                try:
                    if victims and self._capacity < self._room.configured:
                        self._evict_apart(victims)
                        victims = []
                    with self._env.begin(write=True) as txn:
                        self._delete(txn, victims + deletes)
                        for key, payload, stamp in records:
                            if isinstance(payload, torch.Tensor):
                                payload = self._gathered(payload)  # LMDB copies it: the buffer is free again
                            header = BlockHeader.for_payload(key, self._fingerprint, payload,
                                                             self.encoding.header_encoding(payload)).pack()
                            txn.put(key, payload, db=self._blocks)
                            txn.put(key, header + _TAIL.pack(stamp, self.encoding.form_of(payload)), db=self._meta)
                        self._write_stamps(txn, stamps, skip=set(victims) | set(deletes))
                except lmdb.MapFullError:
                    slack += self._capacity // 8  # fragmentation: make more room and retry
                    continue
                except lmdb.Error as error:
                    if not self._fit_to_filesystem(error, incoming + slack):
                        raise
                    continue
                self._commit_index(records, victims + deletes, stamps)
                self._counters.add("evictions", len(victims))
                return
        self._counters.add("rejected", len(payloads))

    def _gathered(self, block: torch.Tensor) -> object:
        """A raw block's bytes as one buffer: the block's own memory if contiguous, else a copy in the writer's
        gather buffer (under the write lock), valid until the next call."""
        block = block.detach()
        if block.device.type != "cpu" or not block.is_contiguous():  # copy_ resolves a pending negation
            nbytes = block.nbytes
            if self._gather is None or self._gather.numel() < nbytes:
                self._gather = torch.empty(nbytes, dtype=torch.uint8)
            flat = self._gather[:nbytes]
            flat.view(block.dtype).view(block.shape).copy_(block)
            return flat.numpy()
        return self.encoding.encode(block)

    def _delete(self, txn: lmdb.Transaction, keys: list[bytes]) -> None:
        for key in keys:
            txn.delete(key, db=self._blocks)
            txn.delete(key, db=self._meta)

    def _evict_apart(self, victims: list[bytes]) -> None:
        """Evict ``victims`` in a transaction of their own, before the write that needs their room: on a
        filesystem with no room left to grow into, LMDB reuses pages only once the transaction that freed
        them has committed (written in one, the write failed again for want of space)."""
        with self._env.begin(write=True) as txn:
            self._delete(txn, victims)
        self._commit_index([], victims, {})
        self._counters.add("evictions", len(victims))

    def _fit_to_filesystem(self, error: lmdb.Error, incoming: int) -> bool:
        """Whether a failed commit of ``incoming`` bytes met a full filesystem (LMDB reports a short write as
        an I/O error: the free space tells), and the tier now holds at least one block less than it stores,
        within the room left (``FilesystemRoom``). A filesystem smaller than ``disk_bytes`` (or filled by
        others) suspended the tier's writes at every failed commit: its oldest blocks stayed, new prompts
        never landed. A disk error with room to spare is not this: the caller raises it."""
        quota = os.strerror(errno.EDQUOT) in str(error)
        free = self._room.free_bytes(full_disk=True)
        if free is None or (not quota and free >= 2 * incoming + _FULL_SLACK_BYTES):
            return False
        self._counters.add("filesystem_full")
        released = self._release_reserve()  # room for LMDB's own pages while it evicts
        return self._refit(free, full_disk=True, quota=quota) or released

    def _keep_reserve(self) -> None:
        """Make the reserve file if it is missing and the filesystem has room for it (several times over)."""
        reserve = self.path / RESERVE_NAME
        try:
            if reserve.exists():
                return
            fs = os.statvfs(self.path)
            size = min(_RESERVE_BYTES, fs.f_blocks * fs.f_frsize // 64)
            if size <= 0 or fs.f_bavail * fs.f_frsize < 4 * size:
                return
            with open(reserve, "wb") as file:
                file.write(bytes(size))
                file.flush()
                os.fsync(file.fileno())
        except OSError:  # a full disk (no reserve then), or one refusing it: the tier works without
            reserve.unlink(missing_ok=True)

    def _release_reserve(self) -> bool:
        """Give the reserve file's room back to the filesystem; whether there was one."""
        try:
            (self.path / RESERVE_NAME).unlink()
        except OSError:
            return False
        log.warning("disk_dir %s: the filesystem is full; its reserve of room is given up for the eviction", self.path)
        return True

    def _refit(self, free: int, full_disk: bool, quota: bool = False) -> bool:
        """``FilesystemRoom.refit`` with ``free`` bytes free; whether the capacity changed. A lowering holds the
        tier to one block less than it stores: LMDB's own pages need room too, and each failed commit then
        evicts more."""
        with self._lock:
            before = self._capacity
            used = max(0, min(self._used, before) - self._full) if full_disk else self._used
            capacity = self._room.refit(used, before, free, full_disk, quota)
            if capacity is None:
                return False
            self._capacity = capacity
        self._room.report(capacity, before, full_disk, quota)
        return True

    def _copy_out(self, txn: lmdb.Transaction, keys: list[bytes]) -> list[tuple[bytes, torch.Tensor]]:
        """Verified copies of blocks about to be evicted (a damaged one is not passed on)."""
        blocks = []
        for key in keys:
            meta = txn.get(key, db=self._meta)
            payload = txn.get(key, db=self._blocks)
            if self._check(key, meta, payload) != INTACT:
                continue
            block = self.encoding.decode_new(payload, BlockHeader.unpack(meta).encoding)
            if block is not None:
                blocks.append((key, block))
        return blocks

    def _pick_victims(self, incoming: int, keep: Kept) -> list[bytes]:
        """Under the lock: LRU keys not in ``keep`` (or in another codec's form, which is not held here) whose
        removal brings used + incoming within capacity, or as near as they can."""
        victims = []
        freed = 0
        for key, size in self._index.items():
            if self._used - freed + incoming <= self._capacity:
                break
            if key in self._foreign or key not in keep:
                victims.append(key)
                freed += size
        return victims

    def _write_stamps(self, txn: lmdb.Transaction, stamps: dict[bytes, int], skip: set[bytes]) -> None:
        for key, stamp in stamps.items():
            if key in skip:
                continue
            value = txn.get(key, db=self._meta)
            if value is not None and len(value) == _META_BYTES:
                _, form = _TAIL.unpack_from(value, HEADER_BYTES)
                txn.put(key, bytes(value[:HEADER_BYTES]) + _TAIL.pack(stamp, form), db=self._meta)

    def _commit_index(self, records: list[tuple[bytes, object, int]], removed: list[bytes],
                      stamps: dict[bytes, int]) -> None:
        with self._lock:
            for key in removed + [key for key, _, _ in records if key in self._foreign]:  # overwritten: ours now
                self._foreign.discard(key)
                size = self._index.pop(key, None)
                if size is not None:
                    self._used -= size
            for key, payload, _ in records:
                size = _payload_bytes(payload) + HEADER_BYTES
                self._index[key] = size
                self._used += size
                self._counters.add("blocks_written")
                self._counters.add("bytes_written", size - HEADER_BYTES)
            for key, stamp in stamps.items():
                if self._pending_stamps.get(key) == stamp:
                    del self._pending_stamps[key]

    def get_into(self, key: bytes, out: torch.Tensor) -> bool:
        """Copy block ``key`` into ``out`` after checking its header and checksum (a miss once closing)."""
        with self._in_use.hold() as held:
            if held:
                return self._get_into(key, out)
        self._counters.add("misses")
        return False

    def _get_into(self, key: bytes, out: torch.Tensor) -> bool:
        with self._lock:
            known = key in self._index
        if not known:
            self._counters.add("misses")
            return False
        with self._env.begin(buffers=True) as txn:
            meta = txn.get(key, db=self._meta)
            payload = txn.get(key, db=self._blocks)
            verdict = self._check(key, meta, payload)
            if verdict == INTACT:  # decoded straight from the read-only map, inside the transaction
                stored = memoryview(payload).nbytes
                verdict = self.encoding.decode_into(payload, out, BlockHeader.unpack(meta).encoding)
        if verdict != INTACT:
            self._counters.add("misses")
            if verdict in (CORRUPT, OTHER_CODEC):  # damaged, or in a form this tier no longer serves
                self._counters.add("corrupt" if verdict == CORRUPT else "stale")
                self._write([], [key])
            return False
        self._stamp([key])
        self._counters.add("hits")
        self._counters.add("bytes_read", stored)
        return True

    def touch_chain(self, keys: Sequence[bytes]) -> None:
        """``ChainTier.touch_chain``: the held ``keys`` become the most recently used, the first most of all
        (stamped as a read's hit is, persisted with the next write)."""
        with self._in_use.hold() as held:
            if held:
                self._stamp(reversed(keys))

    def _stamp(self, keys: Iterable[bytes]) -> None:
        """The held ``keys`` were used, in this order (the last one most recently); their access stamps are
        written with the next write, or now if enough are pending. Inside ``_in_use``."""
        with self._lock:
            for key in keys:
                if key in self._index and key not in self._foreign:
                    self._index.move_to_end(key)
                    self._pending_stamps[key] = self._tick()
            flush = len(self._pending_stamps) >= _MAX_PENDING_STAMPS
        if flush:
            self._write([], [])

    def _check(self, key: bytes, meta: object, payload: object) -> str:
        """``intact`` (header and checksum hold), ``gone`` (evicted since the index said present) or ``corrupt``."""
        if meta is None and payload is None:
            return "gone"
        header = BlockHeader.unpack(meta) if meta is not None else None
        if header is None or payload is None or not header.verifies(key, self._fingerprint, payload):
            return CORRUPT
        return INTACT

    def delete(self, key: bytes) -> bool:
        with self._in_use.hold() as held:
            with self._lock:
                if not held or key not in self._index:
                    return False
            self._write([], [key])
            return True

    def stats(self) -> dict[str, int]:
        with self._lock:
            blocks, used = len(self._index), self._used
        return tier_stats(self._counters, blocks, used, self._capacity)

    def close(self) -> None:
        """Write pending access stamps, close the environment and release the directory."""
        if not self._in_use.close():
            return
        with self._lock:
            pending = bool(self._pending_stamps)
        try:
            if pending:
                self._write([], [])
        except (lmdb.Error, OSError) as error:  # a full disk: the stamps are lost, the blocks are not
            log.warning("lmdb tier: %s: the last access times could not be written at close (%s: %s)",
                        self.path, type(error).__name__, error)
        finally:
            self._env.close()
            self._lock_file.close()


def inspect_directory(path: str | os.PathLike[str]) -> dict[str, int]:
    """What an ``LmdbTier`` directory holds, read-only (for ``kvstore info``): nothing is written or evicted.

    Takes neither ``kvstore.lock`` nor a write transaction, so it works while
    an engine has the directory open: the environment is opened read-only
    with LMDB's own reader table (``lock.mdb``), and one read transaction
    counts the ``meta`` records of a consistent snapshot. Returns ``blocks``
    and ``used_bytes`` (header + payload, as the tier counts its capacity),
    ``unreadable`` (records whose header does not parse: another format
    version, or damaged; the tier drops them when it opens) and
    ``file_bytes`` (``data.mdb`` on disk). A directory that does not exist
    or was never written holds 0 blocks. ``OSError`` naming the directory if
    it cannot be read.
    """
    root = Path(path)
    usage = {"blocks": 0, "used_bytes": 0, "unreadable": 0, "file_bytes": 0}
    try:
        usage["file_bytes"] = os.stat(root / "data.mdb").st_size
    except FileNotFoundError:
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(f"disk_dir {root}: not a directory") from None
        return usage
    except NotADirectoryError:
        raise NotADirectoryError(f"disk_dir {root}: not a directory") from None
    except OSError as exc:
        raise OSError(f"disk_dir {root}: cannot read it: {exc.strerror or exc}") from None
    if usage["file_bytes"] == 0:  # created, its header not yet written (or a store killed right then)
        return usage
    try:
        env = lmdb.open(str(root), readonly=True, lock=True, create=False, subdir=True, max_dbs=2,
                        max_readers=512, readahead=False)
    except lmdb.Error as exc:
        raise OSError(f"disk_dir {root}: cannot open the LMDB environment read-only: {exc}") from None
    try:
        check_whole(env, root)
        try:
            meta = env.open_db(b"meta", create=False)
        except lmdb.NotFoundError:
            return usage  # created, never opened by a tier
        with env.begin(db=meta, buffers=True) as txn:
            for value in txn.cursor().iternext(keys=False, values=True):
                header = BlockHeader.unpack(value)
                if header is None:
                    usage["unreadable"] += 1
                else:
                    usage["blocks"] += 1
                    usage["used_bytes"] += HEADER_BYTES + header.length
    except lmdb.Error as exc:
        raise OSError(f"disk_dir {root}: cannot read the LMDB environment: {exc}") from None
    finally:
        env.close()
    return usage


def _check(layout: KVLayout, config: StoreConfig) -> None:
    """What opening would refuse, before any tier makes a file: a bad setting left LMDB's files behind."""
    check_one_block(layout, config.disk_bytes, "disk_bytes")
    check_folder("disk_dir", config.disk_dir)
    check_mappable(config.disk_bytes, "disk_bytes")


def _build(layout: KVLayout, config: StoreConfig) -> LmdbTier:
    return LmdbTier(config.disk_dir, config.disk_bytes, layout, sync=config.disk_sync,
                    codec=get_codec(config.disk_codec))


SPEC = TierSpec(
    name="lmdb",
    wanted=lambda config: config.disk_dir is not None and config.disk_bytes > 0,
    build=_build,
    check=_check,
    persistent=True,
    bandwidth_prior=2e9,
    admit_after=lambda config: config.disk_admit_after,
    codec_setting="disk_codec",
)
