"""The server's BlobStore: namespaces, quotas, exact LRU eviction, RAM over LMDB, persistence, integrity."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections import OrderedDict

import lmdb
import pytest
import torch

from conftest import TESTS_DIR
from kvstore.blockformat import HEADER_BYTES, BlockHeader
from kvstore.protocol import PutResult
from kvstore.server.blobs import BLOCK_OVERHEAD_BYTES, BlobStore, block_cost, blob_intact

LAYOUT = b"L" * 16
PAYLOAD = 1000
BLOB = HEADER_BYTES + PAYLOAD
COST = block_cost(BLOB)  # what a blob counts against RAM, capacity and quotas


def key(name: str) -> bytes:
    return name.encode().ljust(32, b".")


def blob(name: str, size: int = PAYLOAD) -> bytes:
    payload = (name.encode() * size)[:size]
    return BlockHeader.for_payload(key(name), LAYOUT, payload).pack() + payload


def put(store: BlobStore, ns: str, *names: str) -> list[PutResult]:
    """Each blob put on its own, in turn (a batch is a chain: ``put_chain``)."""
    return [result for n in names for result in store.put_many(ns, [(key(n), bytearray(blob(n)))])]


def put_chain(store: BlobStore, ns: str, *names: str) -> list[PutResult]:
    return store.put_many(ns, [(key(n), bytearray(blob(n))) for n in names])


def held(store: BlobStore, ns: str) -> list[str]:
    return [k.rstrip(b".").decode() for k in store.list_keys(ns, 0, 1000)]


def read(store: BlobStore, ns: str, name: str) -> bytes | None:
    data, on_disk = store.get_ram(ns, key(name))
    if data is None and on_disk:
        data = store.read_disk(ns, key(name))
    return None if data is None else bytes(data)


@pytest.fixture
def quotas():
    return {}


@pytest.fixture
def open_store(tmp_path, quotas):
    stores = []

    def make(host_blobs: int = 100, disk_blobs: int = 100, path=None) -> BlobStore:
        store = BlobStore(path or tmp_path / "data", host_blobs * COST, disk_blobs * COST,
                          lambda ns: quotas.get(ns, 0), sync=False)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def test_round_trip_and_present_is_reported(open_store):
    store = open_store()
    assert put(store, "a", "x", "y") == [PutResult.STORED, PutResult.STORED]
    assert put(store, "a", "x") == [PutResult.PRESENT]
    assert read(store, "a", "x") == blob("x")
    assert store.exists_prefix("a", [key("x"), key("y"), key("z"), key("x")]) == 2
    assert store.namespace_stats("a")["present"] == 1


def test_namespaces_are_isolated(open_store):
    store = open_store()
    put(store, "a", "x")
    assert read(store, "b", "x") is None
    assert store.exists_prefix("b", [key("x")]) == 0
    assert store.delete_many("b", [key("x")]) == [False]
    assert read(store, "a", "x") == blob("x")


def test_invalid_and_oversized_blobs_are_not_stored(open_store, quotas):
    quotas["a"] = 2 * COST
    store = open_store()
    wrong_key = bytearray(blob("x"))
    results = store.put_many("a", [(key("y"), wrong_key)])
    flipped = bytearray(blob("z"))
    flipped[-1] ^= 1
    results += store.put_many("a", [(key("z"), flipped)])
    results += store.put_many("a", [(key("big"), bytearray(blob("big", 3 * PAYLOAD)))])
    assert results == [PutResult.INVALID, PutResult.INVALID, PutResult.REJECTED]
    assert held(store, "a") == []
    assert not blob_intact(key("z"), flipped) and blob_intact(key("x"), blob("x"))


def test_capacity_evicts_least_recently_used_across_namespaces(open_store):
    store = open_store(host_blobs=10, disk_blobs=3)
    put(store, "a", "1")
    put(store, "b", "2")
    put(store, "a", "3")
    read(store, "a", "1")  # now 2 is the least recently used
    put(store, "a", "4")
    assert held(store, "a") == ["3", "1", "4"] and held(store, "b") == []
    assert store.namespace_stats("b")["evicted_capacity"] == 1


def test_quota_evicts_only_the_namespaces_own_blocks(open_store, quotas):
    quotas["a"] = 2 * COST
    store = open_store()
    put(store, "b", "keep")
    for name in ("1", "2", "3", "4"):
        put(store, "a", name)
        assert store.namespace_stats("a")["used_bytes"] <= 2 * COST
    assert held(store, "a") == ["3", "4"]
    assert held(store, "b") == ["keep"]
    assert store.namespace_stats("a")["evicted_quota"] == 2


def test_data_and_lru_order_survive_a_reopen(tmp_path, open_store):
    store = open_store(path=tmp_path / "d")
    put(store, "a", "1", "2", "3")
    read(store, "a", "1")
    store.close()
    again = open_store(path=tmp_path / "d")
    assert held(again, "a") == ["2", "3", "1"]
    assert read(again, "a", "2") == blob("2")
    assert again.namespace_stats("a")["hits_disk"] == 1


def test_a_restart_with_a_smaller_disk_keeps_the_most_recent_blobs(tmp_path, open_store):
    """Restarting with a smaller ``disk_bytes`` evicts the least recently used blobs at open (it used to
    crash: the evictions were queued before the writer's queue existed)."""
    store = open_store(path=tmp_path / "d", disk_blobs=6)
    put(store, "a", "1", "2", "3", "4", "5")
    read(store, "a", "1")  # 1 is now the most recent
    store.close()
    smaller = open_store(path=tmp_path / "d", disk_blobs=2)
    assert held(smaller, "a") == ["5", "1"]
    assert read(smaller, "a", "1") == blob("1") and read(smaller, "a", "2") is None
    smaller.close()
    again = open_store(path=tmp_path / "d", disk_blobs=6)  # the evicted blobs are gone from LMDB too
    assert held(again, "a") == ["5", "1"]


def test_ram_keeps_only_the_recent_blobs_once_they_are_on_disk(open_store):
    store = open_store(host_blobs=2, disk_blobs=10)
    put(store, "a", "1", "2", "3", "4")
    store.flush()
    assert store.totals()["ram_bytes"] <= 2 * COST
    assert read(store, "a", "1") == blob("1")  # from disk, then kept in RAM
    assert store.namespace_stats("a")["hits_disk"] == 1


def test_a_blob_damaged_on_disk_is_a_miss_and_dropped(tmp_path, open_store):
    store = open_store(path=tmp_path / "d")
    put(store, "a", "1")
    store.close()
    env = lmdb.open(str(tmp_path / "d" / "blobs.lmdb"), max_dbs=2)
    with env.begin(write=True) as txn:
        db = env.open_db(b"blobs", txn=txn)
        damaged = bytearray(txn.get(b"a\0" + key("1"), db=db))
        damaged[HEADER_BYTES + 5] ^= 0xFF
        txn.put(b"a\0" + key("1"), bytes(damaged), db=db)
    env.close()
    again = open_store(path=tmp_path / "d")
    assert read(again, "a", "1") is None
    assert again.namespace_stats("a")["corrupt"] == 1
    assert held(again, "a") == []


def _damage(path, change) -> None:
    """``change(txn, blobs, meta)`` inside one write transaction of the server's LMDB at ``path``."""
    env = lmdb.open(str(path / "blobs.lmdb"), max_dbs=2)
    with env.begin(write=True) as txn:
        change(txn, env.open_db(b"blobs", txn=txn), env.open_db(b"meta", txn=txn))
    env.close()


def _meta_size_flipped(txn, blobs, meta) -> None:
    record = bytearray(txn.get(b"a\0" + key("1"), db=meta))
    record[-1] |= 0x40  # a high bit of the little-endian size
    txn.put(b"a\0" + key("1"), bytes(record), db=meta)


@pytest.mark.parametrize("change, why", [
    # one blob gone under its record: a hit no GET could read, and every PUT of it answered PRESENT
    (lambda txn, blobs, meta: txn.delete(b"a\0" + key("1"), db=blobs), "blob gone"),
    # a non-UTF-8 namespace: the server did not start
    (lambda txn, blobs, meta: txn.put(b"\xff\0" + key("1"), txn.pop(b"a\0" + key("1"), db=meta), db=meta),
     "namespace"),
    # a size of 2**62: every blob evicted at open
    (_meta_size_flipped, "size"),
    (lambda txn, blobs, meta: txn.put(b"a\0" + key("1"), b"short", db=meta), "record"),
])
def test_broken_records_are_dropped_at_open_and_the_rest_kept(tmp_path, open_store, change, why):
    store = open_store(path=tmp_path / "d")
    put(store, "a", "1", "2", "3")
    store.close()
    _damage(tmp_path / "d", change)
    again = open_store(path=tmp_path / "d")
    assert held(again, "a") == ["2", "3"]
    assert [read(again, "a", name) for name in ("2", "3")] == [blob("2"), blob("3")]
    assert again.totals()["corrupt_dropped_at_open"] == 1 and again.totals()["blocks"] == 2
    assert put(again, "a", "1") == [PutResult.STORED]  # repaired by the next PUT
    assert read(again, "a", "1") == blob("1")


def test_a_blob_gone_from_the_disk_under_its_entry_is_forgotten_on_read(tmp_path, open_store):
    """While the server runs: the read misses, the entry goes, and the next PUT stores it again."""
    store = open_store(host_blobs=1, path=tmp_path / "d")
    put(store, "a", "1", "2")
    store.flush()  # both on disk; "1" no longer in RAM (one blob's room)
    assert store.get_ram("a", key("1")) == (None, True)
    with store._env.begin(write=True) as txn:  # another tool, or damage, while the server runs
        txn.delete(b"a\0" + key("1"), db=store._blobs)
    assert read(store, "a", "1") is None
    assert held(store, "a") == ["2"]
    assert put(store, "a", "1") == [PutResult.STORED]


def test_durable_callback_runs_after_the_commit(open_store):
    store = open_store()
    done = threading.Event()
    store.put_many("a", [(key("1"), bytearray(blob("1")))], on_durable=lambda ok: done.set())
    assert done.wait(10)
    with store._lock:
        assert store._lru[("a", key("1"))].on_disk


def test_memory_only_store_bounds_ram(tmp_path):
    store = BlobStore(tmp_path / "m", 2 * COST, 0, lambda ns: 0)
    try:
        put(store, "a", "1", "2", "3")
        assert held(store, "a") == ["2", "3"]
        assert store.totals()["ram_bytes"] == 2 * COST
        assert read(store, "a", "3") == blob("3")
        assert not (tmp_path / "m").exists()
    finally:
        store.close()


def test_metrics_count_bytes_per_namespace_and_tier(tmp_path, open_store):
    from kvstore.server.metrics import ServerMetrics

    store = open_store(host_blobs=1, disk_blobs=10)
    put(store, "a", "1", "2")
    store.flush()
    assert read(store, "a", "1") == blob("1")  # RAM holds only the newest: this one comes from disk
    assert read(store, "a", "1") == blob("1")  # and now from RAM
    text = ServerMetrics(store, per_namespace=True).render().decode()
    assert f'kvstore_server_bytes_in_total{{namespace="a",tier="host"}} {2 * BLOB}.0' in text
    assert f'kvstore_server_bytes_in_total{{namespace="a",tier="lmdb"}} {2 * BLOB}.0' in text
    assert f'kvstore_server_bytes_out_total{{namespace="a",tier="lmdb"}} {BLOB}.0' in text
    assert f'kvstore_server_bytes_out_total{{namespace="a",tier="host"}} {BLOB}.0' in text
    assert 'kvstore_server_hits_total{namespace="a",tier="lmdb"} 1.0' in text


def test_blobs_larger_than_a_smaller_disk_are_evicted_at_open_not_counted_broken(tmp_path):
    store = BlobStore(tmp_path / "d", 0, 10 * COST, lambda ns: 0, sync=False)
    store.put_many("a", [(key("big"), bytearray(blob("big", 3 * PAYLOAD))), (key("1"), bytearray(blob("1")))])
    store.close()
    again = BlobStore(tmp_path / "d", 0, 2 * COST, lambda ns: 0, sync=False)  # the big one no longer fits
    try:
        totals = again.totals()
        assert (totals["corrupt_dropped_at_open"], totals["evicted_at_open"]) == (0, 1)
        assert held(again, "a") == ["1"] and read(again, "a", "1") == blob("1")
    finally:
        again.close()


def test_a_stores_disk_tier_and_a_servers_data_refuse_each_other_and_change_nothing(tmp_path, layout):
    """A store's ``disk_dir`` pointed at a server's ``blobs.lmdb`` (or a server's ``data_dir`` at a folder whose
    ``blobs.lmdb`` is a store's disk tier) shared the ``meta`` database: each deleted the other's records at
    open, as broken, even while the other ran."""
    from conftest import assert_same_kv, make_kv
    from kvstore.tiers.lmdb import LmdbTier

    server = BlobStore(tmp_path / "srv", 0, 10 * COST, lambda ns: 0, sync=False)
    put(server, "a", "1", "2")
    server.close()
    with pytest.raises(OSError, match="a cache server's data .*nothing was changed"):
        LmdbTier(tmp_path / "srv" / "blobs.lmdb", 1 << 20, layout, sync=False)
    again = BlobStore(tmp_path / "srv", 0, 10 * COST, lambda ns: 0, sync=False)
    assert [read(again, "a", n) for n in ("1", "2")] == [blob("1"), blob("2")]
    assert again.totals()["corrupt_dropped_at_open"] == 0
    again.close()

    kv = make_kv(layout, 16, seed=3)
    tier = LmdbTier(tmp_path / "st" / "blobs.lmdb", 1 << 20, layout, sync=False)
    tier.put_many([(b"k" * 32, kv)])
    tier.close()
    with pytest.raises(OSError, match="a store's disk tier .*nothing was changed"):
        BlobStore(tmp_path / "st", 0, 10 * COST, lambda ns: 0, sync=False)
    tier = LmdbTier(tmp_path / "st" / "blobs.lmdb", 1 << 20, layout, sync=False)
    try:
        out = torch.empty_like(kv)
        assert tier.get_into(b"k" * 32, out) and tier.stats()["corrupt"] == 0
        assert_same_kv(out, kv)
    finally:
        tier.close()


def test_a_batch_is_a_chain_its_first_blob_evicted_last_and_kept_so_across_a_restart(tmp_path, open_store):
    """A PUT of a prompt's blocks in order left its head the least recently used: evicted first, what stayed
    of the prompt was blobs no lookup reaches."""
    store = open_store(host_blobs=10, disk_blobs=5, path=tmp_path / "d")
    put_chain(store, "a", "1", "2", "3")
    assert held(store, "a") == ["3", "2", "1"]
    put_chain(store, "a", "4", "5", "6")  # evicts the first chain's tail
    assert held(store, "a") == ["2", "1", "6", "5", "4"]
    store.get_ram("a", key("2")), store.get_ram("a", key("1"))
    store.touch_chain("a", [key("1"), key("2")])  # a GET of the chain, in order
    assert held(store, "a") == ["6", "5", "4", "2", "1"]
    store.close()
    again = open_store(host_blobs=10, disk_blobs=3, path=tmp_path / "d")  # restarted smaller
    assert held(again, "a") == ["4", "2", "1"] and read(again, "a", "1") == blob("1")


def test_a_chain_larger_than_the_store_keeps_its_leading_blobs(open_store):
    store = open_store(host_blobs=10, disk_blobs=3)
    put(store, "b", "old")
    assert put_chain(store, "a", "1", "2", "3", "4") == [PutResult.STORED] * 3 + [PutResult.REJECTED]
    assert held(store, "a") == ["3", "2", "1"] and held(store, "b") == []
    assert [read(store, "a", n) for n in ("1", "2", "3")] == [blob(n) for n in ("1", "2", "3")]


KILLED_AFTER_A_CHAIN = """
import os, signal, sys
from kvstore.blockformat import BlockHeader
from kvstore.server.blobs import BlobStore
blob_bytes = int(sys.argv[2])  # each blob's cost
store = BlobStore(sys.argv[1], 10 * blob_bytes, 10 * blob_bytes, lambda ns: 0, sync=False)
items = []
for name in sys.argv[3:]:
    key, payload = name.encode().ljust(32, b"."), (name.encode() * 1000)[:1000]
    items.append((key, bytearray(BlockHeader.for_payload(key, b"L" * 16, payload).pack() + payload)))
store.put_many("a", items)
store.flush()  # committed; the order at close is never saved
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_chain_is_committed_last_first_so_a_killed_server_keeps_its_order(tmp_path):
    """Without a clean close the order on disk is the commits' order."""
    child = subprocess.run([sys.executable, "-c", KILLED_AFTER_A_CHAIN, str(tmp_path / "d"), str(COST), "1", "2",
                            "3"], cwd=str(TESTS_DIR), capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    again = BlobStore(tmp_path / "d", 10 * COST, 10 * COST, lambda ns: 0, sync=False)
    try:
        assert held(again, "a") == ["3", "2", "1"]
    finally:
        again.close()


def test_a_chain_that_cannot_fit_beside_its_own_blobs_evicts_nothing_for_it_and_leaves_no_gap(open_store, quotas):
    """A blob was rejected only after others were evicted for it, and a smaller one after it was stored behind
    the gap, where no lookup reaches."""
    quotas["a"] = 3 * COST
    store = open_store(host_blobs=10, disk_blobs=10)
    put(store, "other", *[f"o{i}" for i in range(7)])
    assert put_chain(store, "a", "1", "2", "3", "4", "5") == [PutResult.STORED] * 3 + [PutResult.REJECTED] * 2
    assert held(store, "other") == [f"o{i}" for i in range(7)]  # quota-bound: nothing of another's evicted
    quotas["a"] = 0
    # m fits the store alone, not beside h (its cost: 16 payloads and the per-block overhead)
    chain = [(key("h"), bytearray(blob("h", PAYLOAD))), (key("m"), bytearray(blob("m", 16 * PAYLOAD))),
             (key("t"), bytearray(blob("t", PAYLOAD)))]
    assert store.put_many("b", chain) == [PutResult.STORED, PutResult.REJECTED, PutResult.REJECTED]
    assert held(store, "b") == ["h"] and len(held(store, "other")) >= 3


def test_a_chain_counts_a_repeated_key_once(open_store):
    store = open_store(host_blobs=10, disk_blobs=3)
    assert put_chain(store, "b", "x0", "x0", "x1", "x2") == \
        [PutResult.STORED, PutResult.PRESENT, PutResult.STORED, PutResult.STORED]
    assert held(store, "b") == ["x2", "x1", "x0"]


def test_a_quota_smaller_than_at_the_last_run_is_enforced_at_open(tmp_path, open_store, quotas):
    """Only the capacity was checked at open: a tenant whose quota was cut kept all its blobs until its next
    PUT, and kept them for good if it only read."""
    store = open_store(path=tmp_path / "d")
    put(store, "a", "1", "2", "3", "4", "5")
    put(store, "b", "x", "y")
    store.close()
    quotas["a"] = 2 * COST
    again = open_store(path=tmp_path / "d")
    assert held(again, "a") == ["4", "5"] and held(again, "b") == ["x", "y"]
    stats = again.namespace_stats("a")
    assert stats["used_bytes"] == 2 * COST and stats["evicted_quota"] == 3
    assert [read(again, "a", n) for n in ("1", "4", "5")] == [None, blob("4"), blob("5")]
    again.close()
    quotas.clear()
    last = open_store(path=tmp_path / "d")  # the evicted blobs are gone from LMDB too
    assert held(last, "a") == ["4", "5"] and held(last, "b") == ["x", "y"]


def test_tiny_blobs_count_their_overhead_against_ram_capacity_quota_and_backlog(tmp_path, open_store, quotas):
    """Only blob bytes counted: 400,000 blobs of 73 bytes held 516 MiB under --host-bytes 16MiB."""
    tiny = [(b"%031d" % i, bytearray(BlockHeader.for_payload(b"%031d" % i, LAYOUT, b"x").pack() + b"x"))
            for i in range(50)]
    size = len(tiny[0][1])
    quotas["q"] = 10 * block_cost(size)
    store = open_store(host_blobs=10, disk_blobs=10)  # 10 x COST: fewer than 20 tiny blobs, whatever their size
    assert store.put_many("q", tiny[:20]) == [PutResult.STORED] * 10 + [PutResult.REJECTED] * 10
    assert store.namespace_stats("q")["used_bytes"] == 10 * block_cost(size)
    assert store.put_many("free", tiny[:30]).count(PutResult.STORED) <= 10 * COST // block_cost(size)
    assert store.totals()["used_bytes"] <= 10 * COST
    store.flush()
    assert store.totals()["ram_bytes"] <= 10 * COST and store.backlog_bytes() == 0
    memory = BlobStore(tmp_path / "m", 10 * COST, 0, lambda ns: 0)
    try:
        memory.put_many("a", tiny)
        assert memory.totals()["blocks"] == 10 * COST // block_cost(size) < len(tiny)
    finally:
        memory.close()
    assert BLOCK_OVERHEAD_BYTES > 0


class _CountingDict(OrderedDict):
    """An OrderedDict that counts the entries iterated over (``list(d)``, ``for k in d``, ``next(iter(d))``)."""

    visited = 0

    def __iter__(self):
        for item in super().__iter__():
            _CountingDict.visited += 1
            yield item


def test_committing_a_large_backlog_of_tiny_blobs_does_not_walk_every_blob_per_commit(tmp_path):
    """Each commit walked every RAM copy not yet on disk, under the store's lock: O(blocks queued) per commit,
    O(n^2) for a backlog of n (400,000 tiny blobs stalled every tenant for minutes). Counted, not timed."""
    n = 20_000
    store = BlobStore(tmp_path / "d", 64 * COST, 1 << 30, lambda ns: 0, sync=False)
    try:
        store._ram, store._lru = _CountingDict(store._ram), _CountingDict(store._lru)
        items = [(b"%031d" % i, bytearray(BlockHeader.for_payload(b"%031d" % i, LAYOUT, b"x").pack() + b"x"))
                 for i in range(n)]
        writer_blocked = store._env.begin(write=True)  # the writer's first commit waits: all n are queued
        try:
            for at in range(0, n, 4096):
                store.put_many("a", items[at:at + 4096])
        finally:
            writer_blocked.abort()
        _CountingDict.visited = 0
        store.flush()  # n / 64 commits
        assert _CountingDict.visited <= 2 * n  # the old code: about n^2 / 128 = 3,000,000
        totals = store.totals()
        assert totals["blocks"] == n and totals["write_backlog_bytes"] == 0 and totals["ram_bytes"] <= 64 * COST
        assert totals["ram_evictions"] >= n - 64 * COST // block_cost(len(items[0][1]))
        for i in (0, n // 2, n - 1):
            got, on_disk = store.get_ram("a", items[i][0])
            got = got if got is not None else store.read_disk("a", items[i][0])
            assert bytes(got) == bytes(items[i][1])
    finally:
        store.close()
