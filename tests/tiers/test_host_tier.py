"""HostTier: fixed slot pool, exact LRU, pins, rejection, write-back through KVStore."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import assert_same_kv, make_kv, make_tokens, tiny_layout
from kvstore.keys import BlockRef
from kvstore.pending import FillError, PendingBlock
from kvstore.tiers.base import Tier
from kvstore.tiers.host import HostTier

from tierkit import NAMES, A, B, C, D, E, make_blocks, names as _names, read as _read


@pytest.fixture
def blocks(layout):
    return make_blocks(layout)


def test_is_a_tier_and_sizes(layout):
    tier = HostTier(layout, 3 * layout.block_bytes + 100, pin_memory=False)
    assert isinstance(tier, Tier)
    assert tier.num_slots == 3
    assert tier.capacity_bytes == 3 * 4096
    assert tier.used_bytes() == 0
    assert tier.stats() == {"hits": 0, "misses": 0, "bytes_read": 0, "bytes_written": 0, "blocks_written": 0,
                            "evictions": 0, "rejected": 0, "corrupt": 0, "blocks": 0, "used_bytes": 0,
                            "capacity_bytes": 3 * 4096}


def test_capacity_below_one_block(layout):
    with pytest.raises(ValueError) as info:
        HostTier(layout, layout.block_bytes - 1)
    assert str(info.value).startswith("host_bytes:")
    assert "4096" in str(info.value) and "4095" in str(info.value)


def test_put_existing_key_refreshes_without_copy(layout, blocks):
    tier = HostTier(layout, 3 * layout.block_bytes)
    for key in (A, B, C):
        tier.put(key, blocks[key])
    assert tier.put(A, blocks[E])  # already stored: only made most recent, bytes unchanged
    assert _names(tier) == ["B", "C", "A"]
    assert_same_kv(_read(tier, layout, A), blocks[A])
    assert tier.stats()["blocks_written"] == 3
    tier.put(D, blocks[D])
    assert _names(tier) == ["C", "A", "D"]


def test_capacity_never_exceeded(layout):
    tier = HostTier(layout, 5 * layout.block_bytes)
    expected: dict[bytes, torch.Tensor] = {}
    order: list[bytes] = []
    for i in range(60):
        tokens = 16 if i % 3 else 1 + i % 16  # partial blocks take a whole slot
        key = i.to_bytes(32, "little")
        block = make_kv(layout, tokens, seed=i)
        assert tier.put(key, block)
        expected[key] = block
        order.append(key)
        stats = tier.stats()
        assert tier.used_bytes() <= tier.capacity_bytes
        assert stats["blocks"] == min(i + 1, 5) <= tier.num_slots
        assert stats["used_bytes"] == tier.used_bytes() == min(i + 1, 5) * layout.block_bytes
        assert stats["evictions"] == max(0, i + 1 - 5)
        assert list(tier.keys()) == order[-5:]
    for key in order[-5:]:
        block = expected[key]
        assert_same_kv(_read(tier, layout, key, block.shape[2]), block)


def test_a_batch_larger_than_the_pool_keeps_its_leading_blocks(layout, blocks):
    """It evicted its own leading blocks for its trailing ones: a prompt of 5 blocks in 3 slots kept blocks
    2-4, which no lookup reaches (a prefix is read from its first block). Older blocks are evicted first."""
    tier = HostTier(layout, 3 * layout.block_bytes)
    other = make_kv(layout, 16, seed=99)
    tier.put_many([(b"o" * 32, other)])
    assert tier.put_many([(key, blocks[key]) for key in (A, B, C, D, E)]) == 3
    assert list(tier.keys()) == [A, B, C]
    stats = tier.stats()
    assert (stats["evictions"], stats["rejected"]) == (1, 2)
    for key in (A, B, C):
        assert_same_kv(_read(tier, layout, key), blocks[key])
    assert tier.put_many([(D, blocks[D])]) == 1  # a later put evicts the LRU block as ever
    assert list(tier.keys()) == [B, C, D]


def test_a_fill_that_raises_mid_batch_keeps_the_blocks_before_it_and_gives_later_victims_back(layout, blocks):
    """A batch takes its slots before it copies: the copies made before a fill raised are held, the failed
    block's slot is free, and the blocks evicted for the blocks after it are held again (their bytes were
    never touched), in their LRU place."""
    evicted = []
    tier = HostTier(layout, 4 * layout.block_bytes, on_evict=lambda key, view, lossy: evicted.append(key))
    tier.put_many([(key, blocks[key]) for key in (A, B, C, D)])
    new = {bytes([n]) * 32: make_kv(layout, 16, seed=n) for n in range(3)}
    keys = list(new)

    def fill(ref, dst):
        raise OSError("engine buffer gone")
    pending = PendingBlock(layout, BlockRef(keys[1], 16, 32), fill)
    with pytest.raises(FillError):
        tier.put_many([(keys[0], new[keys[0]]), (keys[1], pending), (keys[2], new[keys[2]])])
    assert evicted == [A, B]  # A for the first block, B for the one whose fill raised
    assert list(tier.keys()) == [C, D, keys[0]]
    assert tier.stats()["evictions"] == 2
    assert tier.put_many([(keys[2], new[keys[2]])]) == 1  # the free slot, then C (the LRU) as ever
    assert tier.put_many([(keys[1], new[keys[1]])]) == 1 and evicted == [A, B, C]
    assert list(tier.keys()) == [D, keys[0], keys[2], keys[1]]
    assert_same_kv(_read(tier, layout, D), blocks[D])
    for key in keys:
        assert_same_kv(_read(tier, layout, key), new[key])


def test_a_key_twice_in_one_batch_takes_one_slot(layout, blocks):
    tier = HostTier(layout, 3 * layout.block_bytes)
    tier.put_many([(A, blocks[A])])
    assert tier.put_many([(B, blocks[B]), (C, blocks[C]), (B, blocks[B])]) == 3
    assert list(tier.keys()) == [A, B, C] and tier.stats()["evictions"] == 0


def test_touch_chain_makes_the_head_the_most_recently_used(layout, blocks):
    tier = HostTier(layout, 3 * layout.block_bytes)
    tier.put_many([(key, blocks[key]) for key in (A, B, C)])
    tier.touch_chain([A, B, D, C])  # D is not held: passed over
    assert list(tier.keys()) == [C, B, A]


def test_strided_source_block(layout):
    tier = HostTier(layout, 2 * layout.block_bytes)
    kv = make_kv(layout, 40, seed=3)
    tail = kv[:, :, 32:40]  # a strided view of a bigger tensor
    assert not tail.is_contiguous()
    tier.put(A, tail)
    assert_same_kv(_read(tier, layout, A, 8), tail.contiguous())
    # Shape must match exactly: the 8-token block is not served as 16 or 7 tokens.
    assert _read(tier, layout, A, 16) is None
    assert _read(tier, layout, A, 7) is None
    assert tier.stats()["misses"] == 2


def test_pinned_block_not_evicted(layout, blocks):
    tier = HostTier(layout, 3 * layout.block_bytes)
    for key in (A, B, C):
        tier.put(key, blocks[key])
    with tier.reading(A) as view:
        assert_same_kv(view, blocks[A])
        _read(tier, layout, B)
        _read(tier, layout, C)
        assert _names(tier) == ["A", "B", "C"]  # A is least recently used, but pinned
        assert tier.put(D, blocks[D])
        assert _names(tier) == ["A", "C", "D"]  # B, the LRU unpinned block, went
        assert tier.delete(A) is False  # refused while pinned
        assert_same_kv(view, blocks[A])  # the pinned slot was not reused
    assert tier.put(E, blocks[E])  # now A is unpinned and least recently used
    assert _names(tier) == ["C", "D", "E"]
    assert tier.stats()["evictions"] == 2


def test_all_pinned_rejects(layout, blocks):
    tier = HostTier(layout, 2 * layout.block_bytes)
    tier.put(A, blocks[A])
    tier.put(B, blocks[B])
    with tier.reading(A), tier.reading(B), tier.reading(A):
        assert tier.put(C, blocks[C]) is False
        assert tier.put(D, blocks[D]) is False
        assert tier.put(A, blocks[A]) is True  # already stored
        assert tier.stats()["rejected"] == 2
        assert _names(tier) == ["B", "A"]
        assert not tier.contains(C)
    assert tier.put(C, blocks[C]) is True
    assert _names(tier) == ["A", "C"]
    stats = tier.stats()
    assert (stats["rejected"], stats["evictions"], stats["blocks"]) == (2, 1, 2)
    assert_same_kv(_read(tier, layout, C), blocks[C])


def test_nested_pins_need_every_exit(layout, blocks):
    tier = HostTier(layout, 1 * layout.block_bytes)
    tier.put(A, blocks[A])
    with tier.reading(A):
        with tier.reading(A):
            pass
        assert tier.put(B, blocks[B]) is False  # still pinned once
    assert tier.put(B, blocks[B]) is True
    assert _names(tier) == ["B"]


def test_reading_miss_and_delete(layout, blocks):
    tier = HostTier(layout, 2 * layout.block_bytes)
    with tier.reading(A) as view:
        assert view is None
    tier.put(A, blocks[A])
    tier.put(B, blocks[B])
    assert tier.delete(A) is True
    assert tier.delete(A) is False
    assert _names(tier) == ["B"]
    assert tier.put(C, blocks[C])  # takes the freed slot, evicts nothing
    assert tier.stats()["evictions"] == 0
    assert_same_kv(_read(tier, layout, B), blocks[B])
    assert_same_kv(_read(tier, layout, C), blocks[C])


def test_on_evict_sees_victim_bytes(layout, blocks):
    seen = []
    tier = HostTier(layout, 2 * layout.block_bytes, on_evict=lambda key, view, lossy: seen.append((key, view.clone())))
    tier.put(A, blocks[A])
    tier.put(B, blocks[B])
    assert seen == []
    tier.put(C, blocks[C])
    tier.put(D, make_kv(layout, 3, seed=9))  # a partial block in a full slot
    tier.put(E, blocks[E])
    assert [NAMES[k] for k, _ in seen] == ["A", "B", "C"]
    for key, view in seen:
        assert_same_kv(view, blocks[key])
    tier.put(A, blocks[A])
    assert NAMES[seen[-1][0]] == "D"
    assert_same_kv(seen[-1][1], make_kv(layout, 3, seed=9))


def test_close_forgets_and_refuses_puts(layout, blocks):
    tier = HostTier(layout, 2 * layout.block_bytes)
    tier.put(A, blocks[A])
    tier.close()
    assert list(tier.keys()) == [] and tier.used_bytes() == 0
    assert not tier.put(B, blocks[B]) and not tier.contains(B)
    out = torch.empty_like(blocks[A])
    assert not tier.get_into(A, out)
    assert tier.stats()["evictions"] == 0 and tier.stats()["rejected"] == 1


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set from /proc")
def test_close_gives_the_pool_back_while_the_tier_lives(layout, blocks):
    pool = 256 << 20
    tier = HostTier(layout, pool)
    assert tier.wait_warm(60)
    warm = _rss_bytes()
    tier.close()
    assert warm - _rss_bytes() > pool * 3 // 4  # the object lives on; its pool does not


# -- write-back through a KVStore ------------------------------------------------------------------------


def test_write_back_evicted_block_lands_on_disk(make_store, layout):
    store = make_store("both", host_bytes=2 * layout.block_bytes, write_policy="write_back")
    prompts = [(make_tokens(16, seed=i), make_kv(layout, 16, seed=i)) for i in range(3)]
    keys = [store.block_keys(t)[0].key for t, _ in prompts]
    store.put(*prompts[0])
    store.put(*prompts[1])
    assert store.host.contains(keys[0]) and not store.disk.contains(keys[0])
    assert store.disk.stats()["blocks_written"] == 0
    store.put(*prompts[2])  # evicts prompt 0 from host RAM into LMDB
    assert not store.host.contains(keys[0])
    assert store.disk.contains(keys[0])
    assert list(store.disk.keys()) == [keys[0]]
    assert store.disk.stats()["blocks_written"] == 1
    assert store.lookup(prompts[0][0]) == 16
    assert_same_kv(store.get(prompts[0][0]), prompts[0][1])  # from disk, promoted: evicts prompt 1
    stats = store.stats()
    assert stats["store"]["promotions"] == 1
    assert stats["tiers"]["lmdb"]["hits"] == 1
    assert stats["tiers"]["host"]["evictions"] == 2
    assert list(store.disk.keys()) == [keys[0], keys[1]]
    assert list(store.host.keys()) == [keys[2], keys[0]]
    for tokens, kv in prompts:
        assert_same_kv(store.get(tokens), kv)
    # Evicting a block already on disk does not write it again.
    store.put(make_tokens(16, seed=50), make_kv(layout, 16, seed=50))
    store.put(make_tokens(16, seed=51), make_kv(layout, 16, seed=51))
    assert store.disk.stats()["blocks_written"] == 3  # 0, 1, then 2 (0 was already there)


def test_write_through_reaches_disk_by_flush(make_store, layout):
    store = make_store("both", host_bytes=2 * layout.block_bytes)
    tokens, kv = make_tokens(40), make_kv(layout, 40)
    assert store.put(tokens, kv) == 3
    store.flush()  # the disk copies are written in the background
    assert store.disk.stats()["blocks_written"] == 3
    assert store.host.stats()["blocks"] == 2  # the pool holds 2 of them
    assert store.lookup(tokens) == 40  # found on disk
    assert_same_kv(store.get(tokens), kv)


@pytest.mark.parametrize("reader_host_bytes", [0, 1 << 20])
def test_write_back_on_close(make_store, layout, reader_host_bytes):
    store = make_store("both", host_bytes=4 * layout.block_bytes, write_policy="write_back")
    tokens, kv = make_tokens(40), make_kv(layout, 40, seed=4)
    other, other_kv = make_tokens(5, seed=2), make_kv(layout, 5, seed=2)
    assert store.put(tokens, kv) == 3
    assert store.put(other, other_kv) == 1
    assert store.disk.stats()["blocks"] == 0
    store.close()
    reader = make_store("both" if reader_host_bytes else "disk", host_bytes=reader_host_bytes)
    assert reader.disk.stats()["blocks"] == 4
    assert reader.lookup(tokens) == 40 and reader.lookup(other) == 5
    assert_same_kv(reader.get(tokens), kv)
    assert_same_kv(reader.get(other), other_kv)


@pytest.mark.parametrize("attempt", range(5))
def test_a_pool_still_faulting_in_stores_every_block_and_evicts_in_exact_order(layout, attempt, monkeypatch):
    """The pool is faulted in by a background thread: puts that come first take slots of their own (and fault
    them), nothing is evicted while any slot is still unused or being faulted in, and then eviction is exactly
    least recent. Each slice is made slow (2 ms) so that the puts race the fault thread through all of them."""
    import threading
    import time

    import kvstore.tiers.slots as slots
    from kvstore.region import HostRegion

    real_fault_in = HostRegion.fault_in

    def slow_fault_in(region, start, end):
        time.sleep(0.002)
        real_fault_in(region, start, end)
    monkeypatch.setattr(HostRegion, "fault_in", slow_fault_in)
    monkeypatch.setattr(slots, "_FAULT_SLICE_BYTES", 3 * layout.block_bytes)
    tier = HostTier(layout, 40 * layout.block_bytes, pin_memory=False)
    keys = [i.to_bytes(32, "little") for i in range(41)]
    kv = {key: make_kv(layout, 16, seed=attempt * 100 + i) for i, key in enumerate(keys)}
    for i, key in enumerate(keys[:40]):
        assert tier.put(key, kv[key])
        if i % 7 == attempt:
            time.sleep(0.003)  # let the fault thread hand a slice out in the middle of the puts
    assert tier.stats()["evictions"] == 0  # 40 slots, 40 blocks: the fault thread never forced one out
    assert tier.put(keys[40], kv[keys[40]])
    assert tier.stats()["evictions"] == 1 and not tier.contains(keys[0])
    for key in keys[1:]:
        assert_same_kv(_read(tier, layout, key), kv[key])
    tier.close()
    assert not any(t.name == "kvstore-host-fault" for t in threading.enumerate())


def test_a_run_reads_the_leading_blocks_held_and_stops_at_the_first_gap(layout, blocks):
    tier = HostTier(layout, 4 * layout.block_bytes)
    for key in (A, B, D):
        tier.put(key, blocks[key])
    tier.put_lossy([(C, blocks[C][:, :, :3])], "ec4")  # a partial block, held with its lossy mark
    outs = [torch.full_like(blocks[A], 7.0) for _ in range(4)]
    outs[2] = torch.full_like(blocks[C][:, :, :3], 7.0)
    assert tier.get_run_marked([B, A, C, E], outs) == [None, None, "ec4"]
    assert_same_kv(outs[0], blocks[B])
    assert_same_kv(outs[1], blocks[A])
    assert_same_kv(outs[2], blocks[C][:, :, :3])
    assert bool((outs[3] == 7.0).all())  # E is not held: its out untouched
    assert _names(tier) == ["D", "B", "A", "C"]  # the run's blocks became the most recent, in order
    stats = tier.stats()
    assert (stats["hits"], stats["misses"]) == (3, 0)
    assert stats["bytes_read"] == 2 * layout.block_bytes + 3 * layout.token_bytes
    # an out of another size ends the run there, as a key not held does
    assert tier.get_run_marked([D, A], [torch.empty_like(blocks[D]), torch.empty_like(blocks[A][:, :, :2])]) == [None]
    assert tier.get_run_marked([], []) == [] and tier.get_run_marked([E, A], outs[:2]) == []
    assert all(tier.delete(key) for key in (A, B, C, D))  # every pin a run took was released (delete refuses pinned)


def test_more_memory_than_the_machine_reserves_is_an_error_naming_host_bytes():
    from kvstore import KVStore, StoreConfig

    with pytest.raises(OSError, match="host_bytes: could not reserve"):
        KVStore(tiny_layout(), StoreConfig(model_id="m", host_bytes=1 << 60))  # 1 EiB


def test_wait_warm_returns_once_every_slice_is_faulted_in(layout, monkeypatch):
    """An engine (or a benchmark of the steady state) can wait for the pool to be backed before it serves."""
    import threading

    import kvstore.tiers.slots as slots
    from kvstore.region import HostRegion

    released, faulted = threading.Event(), []
    real_fault_in = HostRegion.fault_in

    def held_fault_in(region, start, end):
        assert released.wait(10)
        faulted.append((start, end))
        real_fault_in(region, start, end)
    monkeypatch.setattr(HostRegion, "fault_in", held_fault_in)
    monkeypatch.setattr(slots, "_FAULT_SLICE_BYTES", 2 * layout.block_bytes)
    tier = HostTier(layout, 6 * layout.block_bytes, pin_memory=False)
    try:
        assert tier.wait_warm(timeout=0.05) is False  # the first slice is held
        released.set()
        assert tier.wait_warm(timeout=10) is True
        assert sum(end - start for start, end in faulted) == 6 * layout.block_bytes
        assert tier.wait_warm() is True  # warm: nothing left to wait for
    finally:
        tier.close()
