"""The four-level hierarchy through KVStore: placement, write-behind, admission, promotion, pins, health."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import assert_same_kv, make_kv, make_tokens, tiny_layout
from faulty import FaultyTier
from kvstore.blockformat import HEADER_BYTES
from kvstore.config import StoreConfig
from kvstore.health import WINDOW_READS, slow_reads_to_trip
from kvstore.layout import KVLayout
from kvstore.store import KVStore
from kvstore.tiers.files import FilesTier
from kvstore.tiers.host import HostTier
from kvstore.tiers.lmdb import LmdbTier

BLOCK = 4096
STORED = BLOCK + HEADER_BYTES  # a block below host RAM, with its header


@pytest.fixture
def stack(tmp_path, layout):
    """``stack(device=2, host=3, lmdb=4, files=100, **config)``: sizes in blocks (0 leaves a tier out)."""
    stores = []

    def factory(device=2, host=3, lmdb=4, files=100, **config):
        settings = dict(device="cpu", device_bytes=device * BLOCK, host_bytes=host * BLOCK,
                        disk_dir=str(tmp_path / "lmdb") if lmdb else None, disk_bytes=max(lmdb, 1) * STORED,
                        disk_sync=False, files_dir=str(tmp_path / "files") if files else None,
                        files_bytes=max(files, 1) * STORED, files_sync=False)
        settings.update(config)
        store = KVStore(layout, StoreConfig(**settings))
        stores.append(store)
        return store

    yield factory
    for store in stores:
        store.close()


def prompts(count, first=0):
    """``count`` one-block prompts (16 tokens each, distinct first blocks) with their KV."""
    return [(make_tokens(16, seed=i), make_kv(tiny_layout(), 16, seed=i)) for i in range(first, first + count)]


def where(store, tokens):
    """Names of the tiers that hold the (single) block of ``tokens``."""
    key = store.block_keys(tokens)[0].key
    return [tier.name for tier in store.tiers if tier.contains(key)]


def test_write_back_cascade_keeps_each_block_exactly_once(stack):
    store = stack(write_policy="write_back")
    data = prompts(10)
    for tokens, kv in data:
        assert store.put(tokens, kv) == 1
    store.flush()
    expected = ["files"] + ["lmdb"] * 4 + ["host"] * 3 + ["device"] * 2  # oldest demoted furthest
    assert [where(store, tokens) for tokens, _ in data] == [[name] for name in expected]
    stats = store.stats()
    assert stats["store"]["demotions"] == 8 + 5 + 1
    assert [stats["tiers"][n]["evictions"] for n in ("device", "host", "lmdb", "files")] == [8, 5, 1, 0]
    for tokens, kv in data:
        assert_same_kv(store.get(tokens), kv)
    for tier in store.tiers:
        assert tier.used_bytes() <= tier.capacity_bytes


def test_write_through_cascade_copies_to_every_lower_tier(stack):
    store = stack(write_policy="write_through")
    data = prompts(10)
    for tokens, kv in data:
        store.put(tokens, kv)
        store.flush()
    for i, (tokens, _) in enumerate(data):
        expected = [name for name, newest in (("device", 2), ("host", 3), ("lmdb", 4)) if i >= 10 - newest]
        assert where(store, tokens) == expected + ["files"], i
    stats = store.stats()
    assert stats["store"]["demotions"] == 0
    assert stats["write_behind"]["written"] == 30  # host, lmdb and files got every block
    assert [stats["tiers"][n]["blocks"] for n in ("device", "host", "lmdb", "files")] == [2, 3, 4, 10]


def test_close_writes_back_what_only_volatile_tiers_hold(stack, tmp_path, layout):
    store = stack(device=2, host=3, lmdb=20, files=0, write_policy="write_back")
    data = prompts(4)
    for tokens, kv in data:
        store.put(tokens, kv)
    assert [where(store, t) for t, _ in data] == [["host"], ["host"], ["device"], ["device"]]
    store.close()
    with KVStore(layout, StoreConfig(host_bytes=0, disk_dir=str(tmp_path / "lmdb"), disk_bytes=20 * STORED,
                                     disk_sync=False)) as again:
        for tokens, kv in data:
            assert_same_kv(again.get(tokens), kv)


@pytest.mark.parametrize("when", ["evicted", "closed"])
def test_a_block_the_write_back_target_refuses_goes_on_to_the_tier_below(tmp_path, when):
    """fp8 KV, LMDB with zstd holding one raw block (its frames are larger than the raw bytes: refused) above
    a files tier, write-back: what LMDB refused was lost, on eviction from host RAM and at close."""
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=128, dtype=torch.float8_e4m3fn, block_tokens=16)
    config = StoreConfig(model_id="m", host_bytes=(1 if when == "evicted" else 8) * layout.block_bytes,
                         disk_dir=str(tmp_path / "lmdb"), disk_bytes=layout.block_bytes + HEADER_BYTES,
                         disk_codec="zstd", disk_sync=False, files_dir=str(tmp_path / "files"),
                         files_bytes="64MiB", files_sync=False, write_policy="write_back")
    generator = torch.Generator().manual_seed(5)
    prompts = [(make_tokens(16 * blocks, seed=n),
                torch.randint(0, 256, layout.shape(16 * blocks), dtype=torch.uint8, generator=generator)
                .view(torch.float8_e4m3fn)) for n, blocks in enumerate((4, 1, 1, 1))]
    with KVStore(layout, config) as store:
        for tokens, kv in prompts:
            store.put(tokens, kv)
    tiers = store.stats()["tiers"]
    assert tiers["lmdb"]["rejected"] >= 1 and tiers["files"]["blocks_written"] >= 4
    with KVStore(layout, config.replace(host_bytes=0, write_policy="write_through")) as reopened:
        for tokens, kv in prompts:
            assert reopened.lookup(tokens) == len(tokens)
            assert torch.equal(reopened.get(tokens).view(torch.uint8), kv.view(torch.uint8))


def test_promotion_from_files_into_every_faster_tier(stack):
    data = prompts(3)
    first = stack(device=0, host=0, lmdb=0)
    for tokens, kv in data:
        first.put(tokens, kv)
    first.close()
    store = stack(device=2, host=3, lmdb=4)
    for tokens, kv in data:
        assert where(store, tokens) == ["files"]
        assert_same_kv(store.get(tokens), kv)
    store.flush()
    assert store.stats()["store"]["promotions"] == 3 * 3
    assert [where(store, t) for t, _ in data] == [["host", "lmdb", "files"]] + [["device", "host", "lmdb", "files"]] * 2
    hits = {name: tier["hits"] for name, tier in store.stats()["tiers"].items()}
    for tokens, kv in data[1:]:
        assert_same_kv(store.get(tokens), kv)
    after = {name: tier["hits"] for name, tier in store.stats()["tiers"].items()}
    assert after["device"] == hits["device"] + 2 and after["files"] == hits["files"]


def test_no_promotion_when_disabled(stack):
    tokens, kv = prompts(1)[0]
    first = stack(device=0, host=0, lmdb=0)
    first.put(tokens, kv)
    first.close()
    store = stack(promote=False)
    assert_same_kv(store.get(tokens), kv)
    store.flush()
    assert where(store, tokens) == ["files"]
    assert store.stats()["store"]["promotions"] == 0


def test_admission_filter_keeps_one_off_blocks_off_the_files_tier(stack):
    store = stack(device=0, host=8, lmdb=8, files_admit_after=2)
    (once, kv_once), (twice, kv_twice), (read, kv_read) = prompts(3)
    for tokens, kv in ((once, kv_once), (twice, kv_twice), (read, kv_read)):
        store.put(tokens, kv)
    store.flush()
    assert [where(store, t) for t in (once, twice, read)] == [["host", "lmdb"]] * 3
    assert store.stats()["tiers"]["files"]["admission_rejected"] == 3
    store.put(twice, kv_twice)  # second sighting by put
    assert_same_kv(store.get(read), kv_read)  # second sighting by a read hit
    store.flush()
    assert where(store, once) == ["host", "lmdb"]
    assert where(store, twice) == where(store, read) == ["host", "lmdb", "files"]
    assert store.stats()["tiers"]["files"]["blocks_written"] == 2


def test_write_back_admission_drops_blocks_seen_once(stack):
    store = stack(device=0, host=2, lmdb=8, files=0, write_policy="write_back", disk_admit_after=2)
    data = prompts(4)
    store.put(*data[0])
    assert_same_kv(store.get(data[0][0]), data[0][1])  # seen twice: admitted when evicted
    for tokens, kv in data[1:]:
        store.put(tokens, kv)
    assert where(store, data[0][0]) == ["lmdb"]
    assert where(store, data[1][0]) == []  # seen once and evicted: not worth the disk write
    stats = store.stats()
    assert stats["tiers"]["lmdb"]["admission_rejected"] == 1 and stats["store"]["demotions"] == 1


def gated_store(layout, tmp_path, **config):
    lower = FaultyTier(LmdbTier(tmp_path / "gated", 64 * STORED, layout, sync=False))
    lower.gate.clear()
    host = HostTier(layout, 8 * BLOCK, pin_memory=False)
    return KVStore(layout, StoreConfig(host_bytes=8 * BLOCK, **config), tiers=[host, lower]), lower


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_put_returns_once_in_the_fastest_tier(layout, tmp_path):
    store, lower = gated_store(layout, tmp_path)
    with store:
        tokens, kv = prompts(1)[0]
        assert store.put(tokens, kv) == 1  # returns although the lower tier is held
        assert where(store, tokens) == ["host"]
        assert_same_kv(store.get(tokens), kv)
        assert store.flush(timeout=0.05) is False
        lower.gate.set()
        assert store.flush(timeout=10) is True
        assert where(store, tokens) == ["host", "lmdb"]


def test_full_queue_drops_lower_copies_when_asked(layout, tmp_path):
    store, lower = gated_store(layout, tmp_path, queue_full="drop", write_queue_blocks=1)
    with store:
        data = prompts(4)
        store.put(*data[0])
        wait_for(lambda: store.stats()["tiers"]["lmdb"]["queue_depth"] == 0)  # the worker holds job 0
        for tokens, kv in data[1:]:
            assert store.put(tokens, kv) == 1
        stats = store.stats()
        assert stats["tiers"]["lmdb"]["queue_dropped"] == 2 and stats["write_behind"]["dropped"] == 2
        assert stats["tiers"]["lmdb"]["queue_depth"] == 1
        lower.gate.set()
        store.flush()
        assert [where(store, t) for t, _ in data] == [["host", "lmdb"]] * 2 + [["host"]] * 2
        for tokens, kv in data:
            assert_same_kv(store.get(tokens), kv)


def test_full_queue_blocks_the_caller_by_default(layout, tmp_path):
    store, lower = gated_store(layout, tmp_path, write_queue_blocks=1)
    with store:
        data = prompts(3)
        store.put(*data[0])
        wait_for(lambda: store.stats()["tiers"]["lmdb"]["queue_depth"] == 0)
        store.put(*data[1])  # fills the queue
        third = threading.Thread(target=store.put, args=data[2])
        third.start()
        third.join(0.2)
        assert third.is_alive()  # blocked on the full queue
        lower.gate.set()
        third.join(10)
        assert not third.is_alive()
        store.flush()
        assert [where(store, t) for t, _ in data] == [["host", "lmdb"]] * 3
        assert store.stats()["write_behind"]["dropped"] == 0


def test_pins_hold_while_puts_evict_around_readers(stack):
    store = stack(device=0, host=4, lmdb=0, files=0)
    tokens = make_tokens(48, seed=999)
    kv = make_kv(store.layout, 48, seed=999)
    errors, stop = [], threading.Event()

    def writer(offset):
        for tokens_i, kv_i in prompts(40, first=100 + 40 * offset):
            store.put(tokens_i, kv_i)

    def reader():
        while not stop.is_set():
            store.put(tokens, kv)
            got = store.get(tokens)
            if not torch.equal(got, kv[:, :, :got.shape[2]]):
                errors.append(got.shape[2])

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for thread in readers + threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    for thread in readers:
        thread.join()
    assert errors == []
    assert store.host.used_bytes() <= store.host.capacity_bytes


def fault_store(layout, tmp_path, **config):
    """host-less store: a wrapped LMDB tier above a files tier, both holding every block."""
    lmdb = FaultyTier(LmdbTier(tmp_path / "lmdb", 64 * STORED, layout, sync=False))
    files = FilesTier(tmp_path / "files", 64 * STORED, layout, sync=False)
    settings = dict(host_bytes=0, disk_dir=str(tmp_path / "lmdb"), degraded_seconds=0.2)
    settings.update(config)
    return KVStore(layout, StoreConfig(**settings), tiers=[lmdb, files]), lmdb


def put_flushed(store, data):
    """Put every ``(tokens, kv)`` of ``data`` and wait for the lower tiers' copies; returns ``data``."""
    for tokens, kv in data:
        store.put(tokens, kv)
    store.flush()
    return data


def test_one_200ms_stall_among_fast_reads_does_not_bypass_a_tier(layout, tmp_path):
    """A page-cache read that stalls once (the process starved of CPU, say) is an outlier, not a slow medium."""
    store, lmdb = fault_store(layout, tmp_path, degraded_seconds=30.0)
    with store:
        data = put_flushed(store, prompts(3))
        for round_ in range(8):
            lmdb.delay = 0.2 if round_ == 4 else 0.0
            for tokens, kv in data:
                assert_same_kv(store.get(tokens), kv)
                lmdb.delay = 0.0
        stats = store.stats()["tiers"]["lmdb"]
        assert (stats["state"], stats["degradations"], stats["bypassed"]) == ("healthy", 0, 0)
        assert stats["hits"] == 24 and store.stats()["tiers"]["files"]["hits"] == 0  # every read served by LMDB


def test_slow_tier_is_bypassed_then_recovers(layout, tmp_path):
    store, lmdb = fault_store(layout, tmp_path)
    with store:
        data = put_flushed(store, prompts(3))
        for _ in range(3):
            for tokens, kv in data:
                assert_same_kv(store.get(tokens), kv)
        assert store.stats()["tiers"]["lmdb"]["state"] == "healthy"
        lmdb.delay = 0.1  # far slower than its estimate, and longer than scheduling noise
        for k in range(slow_reads_to_trip(WINDOW_READS)):  # 5 slow reads of the last 8: slow for good
            assert store.stats()["tiers"]["lmdb"]["state"] == "healthy"  # the slow reads so far are outliers
            assert_same_kv(store.get(data[k % 3][0]), data[k % 3][1])  # served, slowly
        stats = store.stats()["tiers"]
        assert stats["lmdb"]["state"] == "degraded" and stats["lmdb"]["degradations"] == 1
        reads, files_hits = lmdb.reads, stats["files"]["hits"]
        for tokens, kv in data:
            assert store.lookup(tokens) == 16
            assert_same_kv(store.get(tokens), kv)  # from files: the slow tier is stepped around
        stats = store.stats()["tiers"]
        assert lmdb.reads == reads and stats["files"]["hits"] == files_hits + 3
        assert stats["lmdb"]["bypassed"] > 0
        lmdb.delay = 0.0
        time.sleep(0.25)  # past the back-off
        assert_same_kv(store.get(data[1][0]), data[1][1])
        assert lmdb.reads == reads + 1 and store.stats()["tiers"]["lmdb"]["state"] == "healthy"


def test_failing_tier_is_bypassed_and_never_raises(layout, tmp_path):
    store, lmdb = fault_store(layout, tmp_path)
    with store:
        data = prompts(3)
        store.put(*data[0])
        store.flush()
        lmdb.fail = True
        assert_same_kv(store.get(data[0][0]), data[0][1])  # lmdb raised; files answered
        stats = store.stats()["tiers"]["lmdb"]
        assert (stats["state"], stats["errors"]) == ("degraded", 1)
        for tokens, kv in data[1:]:
            assert store.put(tokens, kv) == 1  # lands in files while lmdb is bypassed
        store.flush()
        assert store.lookup(data[2][0]) == 16
        lmdb.fail = False
        time.sleep(0.25)
        assert_same_kv(store.get(data[0][0]), data[0][1])
        stats = store.stats()["tiers"]["lmdb"]
        assert stats["state"] == "healthy" and stats["hits"] >= 1


def test_write_behind_error_degrades_the_tier_without_raising(layout, tmp_path):
    lower = FaultyTier(LmdbTier(tmp_path / "lmdb", 64 * STORED, layout, sync=False))
    lower.fail = True
    host = HostTier(layout, 8 * BLOCK, pin_memory=False)
    with KVStore(layout, StoreConfig(host_bytes=8 * BLOCK), tiers=[host, lower]) as store:
        tokens, kv = prompts(1)[0]
        assert store.put(tokens, kv) == 1
        store.flush()
        stats = store.stats()["tiers"]["lmdb"]
        assert stats["state"] == "degraded" and stats["errors"] >= 1 and stats["blocks"] == 0
        assert_same_kv(store.get(tokens), kv)


def test_stats_show_state_bandwidth_and_queue(stack):
    store = stack()
    tokens, kv = prompts(1)[0]
    store.put(tokens, kv)
    store.flush()
    store.get(tokens)
    tiers = store.stats()["tiers"]
    assert list(tiers) == ["device", "host", "lmdb", "files"]
    for name, entry in tiers.items():
        for field in ("state", "read_bandwidth", "hits", "misses", "bytes_read", "bytes_written", "evictions",
                      "admission_rejected", "corrupt", "queue_depth", "errors", "used_bytes", "capacity_bytes"):
            assert field in entry, (name, field)
        assert entry["state"] == "healthy"
    assert tiers["device"]["read_bandwidth"] > 0 and tiers["device"]["hits"] == 1


def test_a_get_reads_runs_from_the_fastest_tier_around_a_block_only_below(stack):
    store = stack(device=0, host=6, lmdb=6, files=0, write_policy="write_through")
    tokens, kv = make_tokens(80, seed=40), make_kv(tiny_layout(), 80, seed=40)
    assert store.put(tokens, kv) == 5
    store.flush()
    host = next(tier for tier in store.tiers if tier.name == "host")
    keys = [block.key for block in store.block_keys(tokens)]
    assert host.delete(keys[2])  # block 2 now only in LMDB: runs 0-1 and 3-4 from host RAM, 2 from below
    before = {name: (tier["hits"], tier["misses"]) for name, tier in store.stats()["tiers"].items()}
    assert_same_kv(store.get(tokens), kv)
    after = {name: (tier["hits"], tier["misses"]) for name, tier in store.stats()["tiers"].items()}
    assert after["host"] == (before["host"][0] + 4, before["host"][1] + 1)  # the gap is the host's one miss
    assert after["lmdb"] == (before["lmdb"][0] + 1, before["lmdb"][1])
    assert host.contains(keys[2]) and store.stats()["store"]["promotions"] == 1
    out = torch.full_like(kv, 3.0)
    host.delete(keys[4])
    store.tiers[-1].delete(keys[4])  # block 4 gone everywhere: the get stops after block 3
    assert store.get_into(tokens, out) == 64
    assert_same_kv(out[:, :, :64], kv[:, :, :64])
    assert bool((out[:, :, 64:] == 3.0).all())


def test_a_lookup_asks_the_next_tier_when_one_fails_and_blames_it_once(layout, tmp_path):
    """LMDB's ``contains`` raising EIO mid-lookup: the files tier answers for every block, and the failure
    is counted once for the lookup, not once a block."""
    store, lmdb = fault_store(layout, tmp_path, degraded_seconds=30.0)
    with store:
        tokens, kv = make_tokens(5 * 16, seed=7), make_kv(layout, 5 * 16, seed=7)
        assert store.put(tokens, kv) == 5
        store.flush()
        assert store.lookup(tokens) == 80
        lmdb.fail = True
        assert store.lookup(tokens) == 80
        assert store.stats()["tiers"]["lmdb"]["errors"] == 1
        assert store.lookup(tokens + make_tokens(16, seed=8)) == 80  # and the block after them is a miss
        lmdb.fail = False
        assert_same_kv(store.get(tokens), kv)


def test_a_tier_whose_unpin_raises_is_blamed_and_flush_and_close_still_finish(layout, tmp_path):
    """The write-behind releases a job's source slot with the tier's ``unpin``; a custom tier's that raised
    killed the worker: ``flush`` never returned True again and ``close`` waited forever."""
    class BrokenUnpin(HostTier):
        failing = True

        def unpin(self, key: bytes) -> None:
            super().unpin(key)
            if self.failing:
                raise OSError(5, "unpin failed")
    host = BrokenUnpin(layout, 8 * BLOCK, pin_memory=False)
    lower = LmdbTier(tmp_path / "lmdb", 64 * STORED, layout, sync=False)
    store = KVStore(layout, StoreConfig(host_bytes=8 * BLOCK), tiers=[host, lower])
    closer = threading.Thread(target=store.close)
    try:
        data = prompts(2)
        store.put(*data[0])
        assert store.flush(timeout=10) is True
        assert where(store, data[0][0]) == ["host", "lmdb"]
        assert store.stats()["tiers"]["host"]["last_error"].startswith("unpin: OSError")
        host.failing = False
        store.put(*data[1])  # the host tier is bypassed for a while, as a tier that failed is
        assert store.flush(timeout=10) is True
        assert "lmdb" in where(store, data[1][0])
        assert_same_kv(store.get(data[1][0]), data[1][1])
    finally:
        closer.start()
        closer.join(10)
    assert not closer.is_alive()


@pytest.mark.parametrize("tiers", ["host", "files", "lmdb", "host+lmdb", "host+files"])
def test_a_prompt_larger_than_its_tiers_keeps_a_prefix_a_lookup_reaches(tmp_path, tiers):
    """An 8-block prompt into 3-block tiers: the host and files tiers kept its last blocks (evicting its first
    ones for them), so put said 3 blocks were stored and lookup found 0 tokens."""
    layout = tiny_layout()
    small = 3 * (layout.block_bytes + HEADER_BYTES)  # three blocks and their headers
    settings = dict(host_bytes={"host": 3, "host+lmdb": 2, "host+files": 2}.get(tiers, 0) * layout.block_bytes)
    if "lmdb" in tiers:
        settings.update(disk_dir=str(tmp_path / "lmdb"), disk_bytes=small)
    if "files" in tiers:
        settings.update(files_dir=str(tmp_path / "files"), files_bytes=small)
    tokens, kv = make_tokens(128, seed=5), make_kv(layout, 128, seed=5)
    with KVStore(layout, StoreConfig(model_id="m", **settings)) as store:
        assert store.put(tokens, kv) >= 2
        assert store.flush(timeout=30)
        found = store.lookup(tokens)
        assert found >= 32
        assert_same_kv(store.get(tokens), kv[:, :, :found])


@pytest.mark.parametrize("below", ["files", "lmdb"])
def test_a_prompt_overflowing_host_ram_leaves_the_tier_below_its_leading_blocks(tmp_path, below):
    """Host 2 blocks over a 3-block tier: the overflow (blocks 2 to 7) was written below first, then the
    queued copies of blocks 0 and 1 evicted two of it, so the files tier held blocks 0, 1 and 3 and a lookup
    once the host had lost the prompt found 32 tokens, not 48."""
    layout = tiny_layout()
    small = 3 * (layout.block_bytes + HEADER_BYTES)
    lower = (dict(files_dir=str(tmp_path / "files"), files_bytes=small, files_sync=False) if below == "files"
             else dict(disk_dir=str(tmp_path / "lmdb"), disk_bytes=small, disk_sync=False))
    tokens, kv = make_tokens(128, seed=7), make_kv(layout, 128, seed=7)
    with KVStore(layout, StoreConfig(model_id="m", host_bytes=2 * layout.block_bytes, **lower)) as store:
        store.put(tokens, kv)
        assert store.flush(timeout=30)
        keys = [block.key for block in store.block_keys(tokens)]
        tier = next(tier for tier in store.tiers if tier.name == below)
        assert [tier.contains(key) for key in keys] == [True] * 3 + [False] * 5
        assert store.lookup(tokens) == 48
    with KVStore(layout, StoreConfig(model_id="m", host_bytes=0, **lower)) as store:
        assert store.lookup(tokens) == 48
        assert_same_kv(store.get(tokens), kv[:, :, :48])


@pytest.mark.parametrize("tiers", ["host", "lmdb", "host+lmdb", "files", "host+files"])
@pytest.mark.parametrize("read_first", [False, True])
def test_eviction_takes_a_prompts_tail_before_its_head(tmp_path, tiers, read_first):
    """Blocks put or read in token order left a prompt's head the least recently used: the next eviction took
    block 0, and the blocks left behind it were blocks no lookup reaches (a reopened smaller LMDB, the same).
    A put and a read leave the head the most recently used, so the tail goes first, also in the tier the
    copies are written behind into (a prompt's copies split over two write batches were ordered per batch)."""
    layout = tiny_layout()
    blocks3 = 3 * layout.block_bytes
    settings = dict(model_id="m", host_bytes=blocks3 if "host" in tiers else 0)
    if "lmdb" in tiers:
        settings.update(disk_dir=str(tmp_path / "lmdb"), disk_bytes=3 * (layout.block_bytes + HEADER_BYTES),
                        disk_sync=False)
    if "files" in tiers:
        settings.update(files_dir=str(tmp_path / "files"), files_bytes=3 * (layout.block_bytes + HEADER_BYTES),
                        files_sync=False)
    first, first_kv = make_tokens(48, seed=1), make_kv(layout, 48, seed=1)
    other, other_kv = make_tokens(16, seed=2), make_kv(layout, 16, seed=2)
    with KVStore(layout, StoreConfig(**settings)) as store:
        assert store.put(first, first_kv) == 3
        assert store.flush(timeout=30)
        keys = [block.key for block in store.block_keys(first)]
        for tier in store.tiers:
            assert list(tier.keys()) == keys[::-1], tier.name  # least recently used first: the tail
        if read_first:
            assert_same_kv(store.get(first), first_kv)
        assert store.put(other, other_kv) == 1  # every tier is full: one block of ``first`` goes
        assert store.flush(timeout=30)
        found = store.lookup(first)
        assert found >= 32  # with host RAM over LMDB, the blocks left in each may still make all 48
        assert_same_kv(store.get(first), first_kv[:, :, :found])
    if tiers == "lmdb":  # reopened smaller: the recency persisted (the get above read ``first`` last)
        smaller = dict(settings, host_bytes=0, disk_bytes=2 * (layout.block_bytes + HEADER_BYTES))
        with KVStore(layout, StoreConfig(**smaller)) as store:
            assert store.lookup(first) == 32 and store.lookup(other) == 0


def _read_whole_each_time(tmp_path, num_tokens: int, read, **settings) -> KVStore:
    """A prompt put into host RAM of 2 blocks over LMDB (``settings``), then looked up and read (``read(store,
    tokens)``) three times: all of it every time. Returns the (closed) store."""
    layout = tiny_layout()
    config = StoreConfig(model_id="m", host_bytes=2 * layout.block_bytes, disk_dir=str(tmp_path / "lmdb"),
                         disk_sync=False, **settings)
    tokens, kv = make_tokens(num_tokens, seed=9), make_kv(layout, num_tokens, seed=9)
    with KVStore(layout, config) as store:
        store.put(tokens, kv)
        assert store.flush(timeout=30)
        for _ in range(3):
            assert store.lookup(tokens) == num_tokens
            assert_same_kv(read(store, tokens), kv)
    return store


def test_a_read_gets_every_block_its_lookup_found_when_promotions_write_back(tmp_path):
    """write_back, host 2 and LMDB 2 blocks, a 4-block prompt: promoting block 2 into host RAM wrote block 0
    back into LMDB, whose eviction took block 3 before it was read (lookup 64 tokens, then get 48)."""
    _read_whole_each_time(tmp_path, 64, KVStore.get, write_policy="write_back",
                          disk_bytes=2 * (tiny_layout().block_bytes + HEADER_BYTES))


def _layer_wise(store: KVStore, tokens) -> torch.Tensor:
    with store.load(tokens, layer_wise=True) as loader:
        return torch.stack([loader.layer(n).clone() for n in range(store.layout.num_layers)])


@pytest.mark.parametrize("read", [KVStore.get, KVStore.load, _layer_wise], ids=["get", "load", "layer_wise"])
def test_a_reads_promotions_never_evict_its_own_blocks(tmp_path, read):
    """Host 2 blocks, LMDB admitting a block on its third sighting: a 6-block prompt's head is only in host
    RAM, its tail only in LMDB. Reading it promoted the tail into host RAM one block at a time, and each
    evicted the head's only copy: lookup 87 tokens before the read, 0 after."""
    store = _read_whole_each_time(tmp_path, 87, read, disk_bytes="4MiB", disk_admit_after=3)
    assert store.stats()["tiers"]["host"]["evictions"] == 0


def test_a_tier_bypassed_for_slow_reads_says_so(tmp_path, caplog):
    """An LMDB tier whose reads turned 20x slower was degraded (bypassed) without a log record, and its
    ``last_error`` stayed None: an operator saw hits fall and nothing saying why."""
    from kvstore.levels import make_level
    from kvstore.tiers.lmdb import LmdbTier

    layout = tiny_layout()
    tier = LmdbTier(tmp_path / "lmdb", 1 << 20, layout, sync=False)
    try:
        level = make_level(0, tier, "write_through", 1, slow_factor=10.0, degraded_seconds=30.0,
                           bandwidth_prior=1e9)
        for _ in range(64):
            level.record_read(1 << 20, 0.001)
        assert not caplog.records and level.last_error is None
        with caplog.at_level("WARNING", logger="kvstore.levels"):
            while level.health.state == "healthy":
                level.record_read(1 << 20, 0.05)
        assert level.health.state == "degraded" and "slow" in level.last_error
        assert [r.getMessage() for r in caplog.records if "most of its last reads were slow" in r.getMessage()]
    finally:
        tier.close()


@pytest.mark.parametrize("lower", ["lmdb", "files"])
@pytest.mark.parametrize("read", ["get", "layer-wise load"])
def test_a_prompt_read_from_host_ram_stays_the_most_recently_used_below(tmp_path, lower, read):
    """Reads served by host RAM never refreshed the disks' order: the hottest prompt, read after every put, was
    the first to go from LMDB and the files tier, and a restart lost it while prompts never read hit."""
    layout = tiny_layout()
    below = (dict(disk_dir=str(tmp_path / "lmdb"), disk_bytes=12 * (layout.block_bytes + HEADER_BYTES),
                  disk_sync=False) if lower == "lmdb" else
             dict(files_dir=str(tmp_path / "files"), files_bytes=12 * (layout.block_bytes + HEADER_BYTES),
                  files_sync=False))
    config = StoreConfig(model_id="m", host_bytes=8 * layout.block_bytes, **below)
    prompts = [make_tokens(32, seed=i) for i in range(12)]  # two blocks each: the disk holds six of them
    hot = prompts[0]
    with KVStore(layout, config) as store:
        for i, tokens in enumerate(prompts):
            store.put(tokens, make_kv(layout, 32, seed=i))
            store.flush()
            if read == "get":
                assert store.get(hot).shape[2] == 32
            else:
                with store.load(hot, layer_wise=True) as loader:
                    assert loader.num_tokens == 32
    with KVStore(layout, config.replace(host_bytes=0)) as store:  # a restart: only the disk is left
        assert store.lookup(hot) == 32
        assert store.lookup(prompts[1]) == 0  # the oldest of those never read went instead
