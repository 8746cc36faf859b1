"""The cache server's storage: namespaced blobs in host RAM over an LMDB environment.

The server does not know the layouts of its clients: a blob is a block's
integrity header (``kvstore/blockformat.py``) followed by its payload (raw
bytes or a codec frame), checked on the way in and on every read from disk,
so a damaged blob is a miss, never data.

Every blob goes to LMDB (the persistent copy, ``disk_bytes`` bound, LRU
eviction) through one background writer; host RAM (``host_bytes``) keeps
the most recently used blobs, and every blob until its disk write commits.
With ``disk_bytes = 0`` the server is memory only. A namespace's blobs are
bounded by its quota: a put past it evicts that namespace's own least
recently used blobs, never another namespace's. ``durable`` puts are
acknowledged only after their LMDB commit (fsync'ed when ``sync``).

Every block counts ``BLOCK_OVERHEAD_BYTES`` on top of its blob's bytes
against host RAM, the capacity, its namespace's quota and the write
backlog: what the server itself holds per block (index entries, the RAM
copy's object, the queued write), so a tenant storing many tiny blobs is
bounded by the same settings as one storing large ones.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from kvstore.arena import Arena
from kvstore.blockformat import HEADER_BYTES, BlockHeader
from kvstore.buffers import alloc_bytes
from kvstore.protocol import PutResult
from kvstore.tiers.lmdb import drop_records, lock_directory, open_databases, open_environment

NAMESPACE_COUNTERS = ("hits_ram", "hits_disk", "misses", "bytes_in", "bytes_out", "bytes_out_ram", "bytes_out_disk",
                      "bytes_written_disk", "stored", "present", "rejected",
                      "invalid", "deleted", "corrupt", "evicted_quota", "evicted_capacity")
_META = struct.Struct("<QQ")  # access stamp, blob bytes
log = logging.getLogger(__name__)

_BATCH_OPS = 64
_RETRY_SECONDS = (0.25, 5.0)  # a failed commit is retried after this, doubling up to the second figure
_BATCH_BYTES = 256 << 20
# What the server holds per block besides its blob's bytes (its index entries, the RAM copy's object, its queued
# write; measured at 600-750 bytes on CPython 3.11): counted with the blob against host_bytes, the capacity, the
# namespace's quota and the write backlog. 400,000 blobs of 73 bytes held 516 MiB under --host-bytes 16MiB when
# only the blob bytes counted.
BLOCK_OVERHEAD_BYTES = 768
_STOP_SECONDS = 10.0  # after an abandoned drain, how long close() waits for the commit in progress


def block_cost(blob_bytes: int) -> int:
    """The bytes a block of ``blob_bytes`` counts against host RAM, the capacity, quotas and the backlog."""
    return blob_bytes + BLOCK_OVERHEAD_BYTES

Ident = tuple[str, bytes]
Blob = bytes | bytearray | memoryview


def blob_intact(key: bytes, blob: Blob) -> bool:
    """True if ``blob`` is an integrity header naming ``key`` followed by exactly the payload it checksums."""
    header = BlockHeader.unpack(blob)
    if header is None:
        return False
    return header.verifies(key, header.layout, memoryview(blob)[HEADER_BYTES:])


def _op_bytes(op: tuple) -> int:
    """What a queued disk operation counts in the write backlog: its blob's bytes and the per-block overhead."""
    return block_cost(len(op[2]) if op[2] is not None else 0)


def _lmdb_key(ident: Ident) -> bytes:
    namespace, key = ident
    return namespace.encode() + b"\0" + key


@dataclass(eq=False)
class _Entry:
    size: int
    ram: Blob | None
    on_disk: bool = False
    waiters: list[Callable[[bool], None]] = field(default_factory=list)  # called with: on disk (or failed)

    @property
    def cost(self) -> int:
        return block_cost(self.size)


class BlobStore:
    """Blobs by (namespace, key); thread-safe. ``quota_of(namespace)`` gives a byte quota (0: none)."""

    def __init__(self, data_dir: str | Path, host_bytes: int, disk_bytes: int, quota_of: Callable[[str], int],
                 sync: bool = True, arena_bytes: int = 0):
        self._host_bytes = host_bytes
        self._disk_bytes = disk_bytes
        self._quota_of = quota_of
        self._lock = threading.Lock()
        self._lru: OrderedDict[Ident, _Entry] = OrderedDict()  # every blob, least recently used first
        # Blobs with a RAM copy that is safe on disk (RAM may drop it), LRU first. A copy not yet committed is
        # kept out of it until its commit: trimming walked past every uncommitted copy on each commit, under the
        # lock (O(blocks queued) per commit; 400,000 tiny blobs stalled every tenant for minutes).
        self._ram: OrderedDict[Ident, None] = OrderedDict()
        self._namespaces: dict[str, OrderedDict[bytes, _Entry]] = {}
        self._ns_used: Counter[str] = Counter()  # block_cost() of each namespace's blocks
        self._used = 0  # block_cost() of every block
        self._ram_used = 0  # block_cost() of every block with a RAM copy (committed or not)
        self._counters: dict[str, Counter[str]] = {}
        self.evicted_ram = 0
        self.disk_error: str | None = None  # while set, commits fail (full disk, I/O error, read-only): puts refused
        self.disk_write_errors = 0
        self.disk_refused = 0  # blobs refused because the disk was failing
        self.corrupt_dropped = 0  # broken records deleted at open
        self.evicted_at_open = 0  # intact blobs larger than disk_bytes, deleted at open
        self._closed = False
        self._abandoned = False  # close() gave up waiting for the backlog: the writer stops after its commit
        self._env: lmdb.Environment | None = None
        self._lock_file = None
        if disk_bytes > 0:
            path = Path(data_dir)
            self._lock_file = lock_directory(path, "data_dir {path} is in use by another kvstore server")
            self._env = open_environment(path / "blobs.lmdb", disk_bytes, sync, self._lock_file, "disk_bytes")
            self._blobs, self._meta = open_databases(self._env, path / "blobs.lmdb", self._lock_file, b"blobs",
                                                     b"meta")
            self._ops: deque = deque()  # disk writes and deletes in order; bounded through ``backlog_bytes``
            self._backlog = 0
            self._wake = threading.Condition(self._lock)
            self._stamp = self._load_index()  # may queue deletes: a smaller disk_bytes than last time
            self._writer = threading.Thread(target=self._write_loop, name="kvstore-server-writer", daemon=True)
        # Last: a server that cannot open its folder or its LMDB environment faults nothing in.
        self._arena = Arena(arena_bytes)
        if self._env is not None:
            self._writer.start()

    @property
    def capacity_bytes(self) -> int:
        """Bytes of blobs the store holds at most (the disk's, or host RAM's when memory only)."""
        return self._disk_bytes if self._env is not None else self._host_bytes

    def _load_index(self) -> int:
        """The index from the meta records, least recently used first. A record that does not parse, names no
        UTF-8 namespace, claims a size its blob does not have (or none fits the disk), or has no blob, is
        deleted with its blob: one such record kept the server from starting, evicted everything at open
        (a flipped bit in a size), or was a hit that no GET could read and no PUT would repair."""
        records, broken, too_big = [], [], []
        with self._env.begin(buffers=True) as txn:
            for lkey, value in txn.cursor(db=self._meta):
                lkey = bytes(lkey)
                namespace, _, key = lkey.partition(b"\0")
                try:
                    ident = (namespace.decode(), key)
                except UnicodeDecodeError:
                    ident = None
                stamp, size = _META.unpack(value) if len(value) == _META.size else (0, -1)
                blob = txn.get(lkey, db=self._blobs) if ident is not None and key else None
                if blob is None or size <= 0 or len(blob) != size:
                    broken.append(lkey)
                elif block_cost(size) > self._disk_bytes:  # intact, larger than a smaller disk_bytes than last time
                    too_big.append(lkey)
                else:
                    records.append((stamp, ident, size))
        if broken or too_big:
            drop_records(self._env, broken + too_big, self._meta, self._blobs)
        if broken:
            self.corrupt_dropped = len(broken)
            log.warning("data_dir %s: dropped %d broken blob record(s) at open (damaged, or another tool's)",
                        self._env.path(), len(broken))
        if too_big:
            self.evicted_at_open = len(too_big)
            log.info("data_dir %s: evicted %d blob(s) larger than disk_bytes=%d at open", self._env.path(),
                     len(too_big), self._disk_bytes)
        records.sort()
        with self._lock:
            for _, ident, size in records:
                self._insert(ident, _Entry(size, None, on_disk=True))
            for ident in self._make_room("", 0, 0):  # the capacity may have shrunk since
                self._enqueue("del", ident)
            evicted = self._enforce_quotas()  # and so may a quota: a namespace starts within its own
        if evicted:
            log.info("data_dir %s: evicted %d blob(s) at open to fit quotas smaller than last time",
                     self._env.path(), evicted)
        return records[-1][0] + 1 if records else 0

    def enforce_quotas(self) -> int:
        """Evict each namespace's least recently used blobs past its quota now (quotas changed); how many."""
        with self._lock:
            return self._enforce_quotas()

    def _enforce_quotas(self) -> int:
        evicted = 0
        for namespace in list(self._namespaces):
            quota = self._quota_of(namespace)
            if quota and self._ns_used[namespace] > quota:
                victims = self._make_room(namespace, 0, quota)
                for ident in victims:
                    self._enqueue("del", ident)
                evicted += len(victims)
        return evicted

    def _enqueue(self, kind: str, ident: Ident | None, blob: Blob | None = None, entry: _Entry | None = None) -> None:
        """Under the lock: queue a disk operation for the writer (order is kept)."""
        if self._env is None:
            return
        op = (kind, ident, blob, entry)
        self._ops.append(op)
        self._backlog += _op_bytes(op)
        self._wake.notify()

    def buffer(self, num_bytes: int) -> bytearray | memoryview:
        """A writable buffer of ``num_bytes`` to receive a blob into: from the preallocated arena when it has a
        free extent (no page faults), else newly allocated."""
        return self._arena.take(num_bytes) or alloc_bytes(num_bytes)

    def backlog_bytes(self) -> int:
        """Bytes queued for the disk and not yet committed, each operation's ``BLOCK_OVERHEAD_BYTES`` included
        (the server stops taking puts past its bound)."""
        return self._backlog if self._env is not None else 0

    def _insert(self, ident: Ident, entry: _Entry) -> None:
        self._lru[ident] = entry
        self._namespaces.setdefault(ident[0], OrderedDict())[ident[1]] = entry
        self._ns_used[ident[0]] += entry.cost
        self._used += entry.cost
        if entry.ram is not None:
            self._ram_used += entry.cost
            if entry.on_disk:
                self._ram[ident] = None

    def _remove(self, ident: Ident) -> _Entry:
        entry = self._lru.pop(ident)
        del self._namespaces[ident[0]][ident[1]]
        self._ns_used[ident[0]] -= entry.cost
        self._used -= entry.cost
        self._drop_ram(ident, entry)
        return entry

    def _drop_ram(self, ident: Ident, entry: _Entry) -> None:
        if entry.ram is not None:
            entry.ram = None
            self._ram.pop(ident, None)  # absent while not yet committed
            self._ram_used -= entry.cost

    def _count(self, namespace: str, name: str, amount: int = 1) -> None:
        self._counters.setdefault(namespace, Counter())[name] += amount

    # -- operations -------------------------------------------------------------

    def exists_prefix(self, namespace: str, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` the namespace holds."""
        held = self._namespaces.get(namespace, {})
        with self._lock:
            for i, key in enumerate(keys):
                if key not in held:
                    return i
        return len(keys)

    def put_many(self, namespace: str, items: Sequence[tuple[bytes, Blob]],
                 on_durable: Callable[[bool], None] | None = None) -> list[PutResult]:
        """Store blobs; a result per item. ``on_durable(True)`` runs (on the writer thread) once all are on
        disk, ``on_durable(False)`` as soon as a commit of one of them failed. While the disk is failing
        (``disk_error``) new blobs are refused (``REJECTED``): what is not on disk must stay in RAM, and RAM
        is bounded.

        ``items`` are taken as a chain (a prompt's blocks, in order): the
        first ends the most recently used, and its blobs are committed last
        to first, so the persisted order says so too; a blob the batch's own
        earlier blobs would have to make room for is ``REJECTED``, and so is
        every new blob after it (before anything is evicted for it). In put
        order, the head was evicted first, and what stayed of the prompt
        was blobs no lookup reaches (a prefix is read from its first block).
        """
        results = []
        quota = self._quota_of(namespace)
        waiting = []
        batch: list[Ident] = []  # the batch's blobs held after it, in order
        keep: set[Ident] = set()  # the same, never evicted for the batch's later blobs
        batch_bytes = 0
        full = False  # a blob did not fit beside the batch's own: the rest would be stored behind a gap
        puts: list[tuple[Ident, Blob, _Entry]] = []
        with self._lock:
            if self._closed:
                raise RuntimeError("BlobStore is closed")
            for key, blob in items:
                ident = (namespace, key)
                entry = self._lru.get(ident)
                if entry is not None:
                    results.append(PutResult.PRESENT)
                    if ident in keep:  # the batch's own, twice
                        continue
                    keep.add(ident)
                    batch.append(ident)
                    batch_bytes += entry.cost
                    if not entry.on_disk and self._env is not None:
                        waiting.append(entry)
                    continue
                if not blob_intact(key, blob):
                    results.append(PutResult.INVALID)  # damaged in flight: the next PUT may repair it
                    continue
                size = len(blob)
                cost = block_cost(size)
                if full or batch_bytes + cost > self.capacity_bytes or (quota and batch_bytes + cost > quota):
                    results.append(PutResult.REJECTED)  # no room even once every other blob is evicted
                    full = True
                    continue
                if self.disk_error is not None:
                    results.append(PutResult.REJECTED)
                    self.disk_refused += 1
                    continue
                victims = self._make_room(namespace, cost, quota, keep=keep)
                for victim in victims:
                    self._enqueue("del", victim)
                if self._over(namespace, cost, quota):
                    results.append(PutResult.REJECTED)  # only the batch's own blobs are left to evict
                    full = True
                    continue
                entry = _Entry(size, blob, on_disk=self._env is None)
                self._insert(ident, entry)
                keep.add(ident)
                batch.append(ident)
                batch_bytes += cost
                results.append(PutResult.STORED)
                self._count(namespace, "bytes_in", size)
                puts.append((ident, blob, entry))
                if self._env is not None:
                    waiting.append(entry)
            for ident, blob, entry in reversed(puts):
                self._enqueue("put", ident, blob, entry)
            self._touch_chain(batch)
            for result in results:
                self._count(namespace, result.name.lower())
            if on_durable is not None:
                if waiting:
                    self._wait_all(waiting, on_durable)
                else:
                    on_durable(True)
        return results

    @staticmethod
    def _wait_all(entries: list[_Entry], callback: Callable[[bool], None]) -> None:
        """``callback(True)`` once every entry is on disk, ``callback(False)`` at the first that failed."""
        remaining = [len(entries)]

        def one_done(ok: bool) -> None:
            if remaining[0] <= 0:
                return
            remaining[0] = remaining[0] - 1 if ok else 0
            if remaining[0] == 0:
                callback(ok)
        for entry in entries:
            entry.waiters.append(one_done)

    def _over(self, namespace: str, incoming: int, quota: int) -> bool:
        """Under the lock: whether ``incoming`` more bytes pass the namespace's quota or the capacity."""
        return bool(quota and self._ns_used[namespace] + incoming > quota) or \
            self._used + incoming > self.capacity_bytes

    def _make_room(self, namespace: str, incoming: int, quota: int, keep: Collection[Ident] = ()) -> list[Ident]:
        """Under the lock: evict the namespace's LRU blobs past its quota, then any LRU blobs past capacity;
        never one of ``keep``."""
        victims = []
        own = self._namespaces.get(namespace, OrderedDict())
        while quota and self._ns_used[namespace] + incoming > quota:
            ident = next((i for i in ((namespace, key) for key in own) if i not in keep), None)
            if ident is None:
                break
            self._remove(ident)
            victims.append(ident)
            self._count(namespace, "evicted_quota")
        while self._used + incoming > self.capacity_bytes:
            ident = next((i for i in self._lru if i not in keep), None)
            if ident is None:
                break
            self._remove(ident)
            victims.append(ident)
            self._count(ident[0], "evicted_capacity")
        return victims

    def touch_chain(self, namespace: str, keys: Sequence[bytes]) -> None:
        """``keys`` (a chain read in order) become the most recently used, the first most of all."""
        with self._lock:
            self._touch_chain([(namespace, key) for key in keys])

    def _touch_chain(self, idents: Sequence[Ident]) -> None:
        for ident in reversed(idents):
            if ident in self._lru:
                self._touch(ident)

    def _trim_ram(self) -> None:
        """Under the lock: drop RAM copies (LRU first) of blobs safely on disk until RAM fits: O(copies dropped),
        whatever is queued for the disk (those copies are not in ``_ram`` and cannot be dropped)."""
        if self._env is None:
            return
        while self._ram_used > self._host_bytes and self._ram:
            ident, _ = self._ram.popitem(last=False)
            self._drop_ram(ident, self._lru[ident])
            self.evicted_ram += 1

    def _touch(self, ident: Ident) -> None:
        self._lru.move_to_end(ident)
        self._namespaces[ident[0]].move_to_end(ident[1])
        if ident in self._ram:
            self._ram.move_to_end(ident)

    def get_ram(self, namespace: str, key: bytes) -> tuple[Blob | None, bool]:
        """(blob, on_disk): the RAM copy if there is one; ``on_disk`` says whether ``read_disk`` may find it."""
        ident = (namespace, key)
        with self._lock:
            entry = self._lru.get(ident)
            if entry is None:
                self._count(namespace, "misses")
                return None, False
            self._touch(ident)
            if entry.ram is not None:
                self._count(namespace, "hits_ram")
                self._count(namespace, "bytes_out", entry.size)
                self._count(namespace, "bytes_out_ram", entry.size)
                return entry.ram, True
            return None, entry.on_disk

    def read_disk(self, namespace: str, key: bytes) -> Blob | None:
        """Read a blob from LMDB (blocking: run it off the event loop), check it and keep a RAM copy."""
        ident = (namespace, key)
        with self._lock:  # the entry, if it was committed before this read's snapshot
            committed = self._lru.get(ident)
            committed = committed if committed is not None and committed.on_disk else None
        with self._env.begin(db=self._blobs, buffers=True) as txn:
            stored = txn.get(_lmdb_key(ident))
            intact = stored is not None and blob_intact(key, stored)  # checked in place, in the map
            blob = self.buffer(len(stored)) if intact else stored
            if intact:
                blob[:] = stored
        if not intact:
            with self._lock:
                self._count(namespace, "misses")
                if blob is not None:
                    self._count(namespace, "corrupt")
                entry = self._lru.get(ident)
                # damaged, or gone from the disk under an entry committed before this read looked (a PUT was then
                # answered PRESENT, and the block never repaired); a blob put again since is not judged by it
                if entry is not None and (blob is not None or (entry is committed and entry.ram is None)):
                    self._remove(ident)
                    self._enqueue("del", ident)
            return None
        with self._lock:
            self._count(namespace, "hits_disk")
            self._count(namespace, "bytes_out", len(blob))
            self._count(namespace, "bytes_out_disk", len(blob))
            entry = self._lru.get(ident)
            if entry is not None and entry.ram is None and entry.size == len(blob):
                entry.ram = blob
                self._ram[ident] = None  # committed (read back from the disk): RAM may drop it again
                self._ram_used += entry.cost
                self._trim_ram()
        return blob

    def delete_many(self, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        """Delete the namespace's blobs ``keys``; True for each that was held."""
        done = []
        with self._lock:
            for key in keys:
                ident = (namespace, key)
                held = ident in self._lru
                if held:
                    self._remove(ident)
                    self._enqueue("del", ident)
                    self._count(namespace, "deleted")
                done.append(held)
        return done

    def list_keys(self, namespace: str, offset: int, limit: int) -> list[bytes]:
        """The namespace's keys, least recently used first, from position ``offset``."""
        with self._lock:
            keys = list(self._namespaces.get(namespace, ()))
        return keys[offset:offset + limit]

    def namespace_stats(self, namespace: str) -> dict[str, int]:
        with self._lock:
            counters = dict.fromkeys(NAMESPACE_COUNTERS, 0)
            counters.update(self._counters.get(namespace, {}))
            counters.update(blocks=len(self._namespaces.get(namespace, ())), used_bytes=self._ns_used[namespace],
                            quota_bytes=self._quota_of(namespace))
        return counters

    def namespaces(self) -> list[str]:
        with self._lock:
            return sorted(set(self._namespaces) | set(self._counters))

    def totals(self) -> dict[str, int]:
        with self._lock:
            return {"blocks": len(self._lru), "used_bytes": self._used, "capacity_bytes": self.capacity_bytes,
                    "disk_used_bytes": self._used if self._env is not None else 0,
                    "disk_capacity_bytes": self._disk_bytes,
                    "ram_bytes": self._ram_used, "ram_capacity_bytes": self._host_bytes,
                    "ram_evictions": self.evicted_ram,
                    "write_backlog_bytes": self.backlog_bytes(),
                    "disk_failing": int(self.disk_error is not None), "disk_write_errors": self.disk_write_errors,
                    "disk_refused_blocks": self.disk_refused, "corrupt_dropped_at_open": self.corrupt_dropped,
                    "evicted_at_open": self.evicted_at_open,
                    **{f"arena_{name}": value for name, value in self._arena.stats().items()}}

    # -- the disk writer ------------------------------------------------------------

    def _write_loop(self) -> None:
        retry = 0.0
        while True:
            with self._lock:
                while not self._ops:
                    self._wake.wait()
                if self._abandoned:  # close() gave up on the backlog (and dropped it)
                    return
                ops, size = [], 0
                while self._ops and len(ops) < _BATCH_OPS and size < _BATCH_BYTES:
                    op = self._ops.popleft()
                    ops.append(op)
                    size += _op_bytes(op)
            stopping = any(op[0] == "stop" for op in ops)
            if self._commit(ops):
                retry = 0.0
                with self._lock:
                    if not self._abandoned:  # else close() zeroed the backlog it dropped
                        self._backlog -= size
                if stopping:
                    return
                continue
            if self._closed:  # closing on a failing disk: what is not committed is dropped (never acknowledged)
                with self._lock:
                    dropped = [op for op in self._ops if op[3] is not None]
                    self._ops.clear()
                    self._backlog = 0
                for _, _, _, entry in dropped:
                    for callback in entry.waiters:
                        callback(False)
                log.error("kvstore server: closing with the disk failing (%s): %d queued writes not committed",
                          self.disk_error, len(dropped) + len(ops))
                return
            retry = min(_RETRY_SECONDS[1], max(_RETRY_SECONDS[0], 2 * retry))
            with self._lock:  # the batch goes back in front, in order, and is tried again (space may come back)
                self._ops.extendleft(reversed(ops))
                self._wake.wait(retry)  # a close() wakes it at once

    def _commit(self, ops: list) -> bool:
        """One write transaction for a batch of queued operations, then wake whoever waits on them; False
        (and ``disk_error`` set, the waiters told) when the disk refused it: full, an I/O error, read-only."""
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for kind, ident, blob, _ in ops:
                        if kind == "put":
                            self._stamp += 1
                            txn.put(_lmdb_key(ident), blob, db=self._blobs)
                            txn.put(_lmdb_key(ident), _META.pack(self._stamp, len(blob)), db=self._meta)
                        elif kind == "del":
                            txn.delete(_lmdb_key(ident), db=self._blobs)
                            txn.delete(_lmdb_key(ident), db=self._meta)
                break
            except lmdb.MapFullError:  # free-page fragmentation: evict an eighth more and retry
                with self._lock:
                    room = self._make_room("", self._disk_bytes // 8, 0)
                ops = [("del", ident, None, None) for ident in room] + ops
            except (lmdb.Error, OSError) as exc:
                return self._commit_failed(ops, exc)
        if self.disk_error is not None:
            log.warning("kvstore server: disk writes commit again (after: %s)", self.disk_error)
            self.disk_error = None
        callbacks = []
        with self._lock:
            for kind, ident, blob, _ in ops:
                if kind == "put":
                    self._count(ident[0], "bytes_written_disk", len(blob))
            for kind, ident, _, entry in ops:
                if entry is not None:
                    entry.on_disk = True
                    callbacks += entry.waiters
                    entry.waiters = []
                    if entry.ram is not None and kind == "put":  # still held (its RAM copy goes when it is removed)
                        self._ram[ident] = None  # now safe on disk: RAM may drop it
            self._trim_ram()
        for callback in callbacks:
            callback(True)
        return True

    def _commit_failed(self, ops: list, exc: BaseException) -> bool:
        """A commit the disk refused: say it (once per episode), refuse new puts, tell durable waiters now."""
        callbacks = []
        with self._lock:
            self.disk_write_errors += 1
            first = self.disk_error is None
            self.disk_error = f"{type(exc).__name__}: {exc}"
            for _, _, _, entry in ops:
                if entry is not None:
                    callbacks += entry.waiters
                    entry.waiters = []
        if first:
            log.error("kvstore server: the disk refused a commit (%s); puts are refused and reads go on from RAM "
                      "and disk until a retry commits (every %.2g-%.2g s)", self.disk_error, *_RETRY_SECONDS)
        for callback in callbacks:
            callback(False)
        return False

    def _abandon(self) -> None:
        """Drop what is still queued for the disk and tell the writer to stop after its commit in progress."""
        with self._lock:
            self._abandoned = True
            dropped = [op for op in self._ops if op[0] == "put"]
            waiting = [op[3] for op in self._ops if op[3] is not None]
            self._ops.clear()
            self._ops.append(("stop", None, None, None))  # wakes a writer that waits for work
            self._backlog = 0
            self._wake.notify()
        for entry in waiting:
            for callback in entry.waiters:
                callback(False)
            entry.waiters = []
        if dropped:
            log.warning("kvstore server: closing before the disk caught up: %d block(s) (%d bytes) not yet "
                        "written are lost, as after a crash (a PUT is on disk before its reply only with "
                        "durable / --durable true)", len(dropped), sum(len(op[2]) for op in dropped))

    def flush(self) -> None:
        """Block until every disk write queued so far has committed, or a commit of them failed."""
        if self._env is None:
            return
        done = threading.Event()
        marker = _Entry(0, None, waiters=[lambda ok: done.set()])
        with self._lock:
            self._enqueue("flush", None, None, marker)
        done.wait()

    def close(self, drain_seconds: float | None = None) -> None:
        """Drain the disk writer (for at most ``drain_seconds``; None: until done), persist the LRU order and
        close LMDB; idempotent. Blobs still queued when the drain's time is up are not written: they are lost
        (said in a log line), as after a crash; a durable PUT was never acknowledged for them."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._arena.close()
        if self._env is None:
            return
        with self._lock:
            self._enqueue("stop", None)
        self._writer.join(drain_seconds)
        if self._writer.is_alive():
            self._abandon()
            self._writer.join(_STOP_SECONDS)  # the commit in progress, if any (at most one batch)
            if self._writer.is_alive():  # a disk that does not answer: closing LMDB under it would crash
                log.error("kvstore server: the disk writer did not stop within %.0f s (the disk does not answer); "
                          "LMDB is left open for the process's exit", _STOP_SECONDS)
                return
        with self._lock:
            order = [ident for ident, entry in self._lru.items() if entry.on_disk]
        try:
            with self._env.begin(write=True) as txn:
                for stamp, ident in enumerate(order, start=self._stamp):
                    lkey = _lmdb_key(ident)
                    value = txn.get(lkey, db=self._meta)
                    if value is not None:
                        txn.put(lkey, _META.pack(stamp, _META.unpack(value)[1]), db=self._meta)
        except (lmdb.Error, OSError) as exc:  # the blocks are on disk; only their LRU order is not kept
            log.error("kvstore server: the LRU order could not be saved at close (%s)", exc)
        self._env.close()
        self._lock_file.close()
