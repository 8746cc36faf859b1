"""DeviceTier: the slot pool on a torch device (device="cpu" here; "cuda" too where a GPU exists)."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from conftest import assert_same_kv, make_kv
from kvstore.tiers.base import Tier
from kvstore.tiers.device import DeviceTier

from tierkit import NAMES, A, B, C, D, E, make_blocks, names as _names, read as _read

LONG = 10.0


@pytest.fixture
def blocks(layout):
    return make_blocks(layout)


def cpu_tier(layout, slots: int, **kwargs) -> DeviceTier:
    return DeviceTier(layout, slots * layout.block_bytes, device="cpu", **kwargs)


def key(i: int) -> bytes:
    return i.to_bytes(32, "little")


# -- construction ----------------------------------------------------------------------------------------


def test_is_a_tier_named_device(layout):
    tier = DeviceTier(layout, 3 * layout.block_bytes + 100, device="cpu")
    assert isinstance(tier, Tier)
    assert tier.name == "device"
    assert tier.persistent is False
    assert tier.device == torch.device("cpu")
    assert tier.num_slots == 3
    assert tier.capacity_bytes == 3 * 4096
    assert tier.used_bytes() == 0
    assert list(tier.keys()) == []
    assert tier.stats() == {"hits": 0, "misses": 0, "bytes_read": 0, "bytes_written": 0, "blocks_written": 0,
                            "evictions": 0, "rejected": 0, "corrupt": 0, "blocks": 0, "used_bytes": 0,
                            "capacity_bytes": 3 * 4096}


def test_accepts_a_torch_device_object(layout):
    tier = DeviceTier(layout, layout.block_bytes, device=torch.device("cpu"))
    assert tier.device.type == "cpu"


@pytest.mark.parametrize("device", ["nope", "gpu:0", "cuda:x", "", None])
def test_bad_device(layout, device):
    with pytest.raises(ValueError) as info:
        DeviceTier(layout, layout.block_bytes, device=device)
    assert str(info.value).startswith("device:")
    assert repr(device) in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_cuda_without_cuda(layout, device):
    with pytest.raises(ValueError) as info:
        DeviceTier(layout, layout.block_bytes, device=device)
    assert str(info.value).startswith("device:")
    assert "cuda" in str(info.value).lower()


@pytest.mark.parametrize("capacity", [1, 4095])
def test_capacity_below_one_block(layout, capacity):
    with pytest.raises(ValueError) as info:
        DeviceTier(layout, capacity, device="cpu")
    message = str(info.value)
    assert message.startswith("device_bytes:")
    assert "4096" in message and str(capacity) in message


def test_zero_capacity_takes_nothing(layout, blocks):
    tier = DeviceTier(layout, 0, device="cpu")
    assert tier.num_slots == 0 and tier.capacity_bytes == 0
    assert tier.put(A, blocks[A]) is False
    assert tier.stats()["rejected"] == 1
    assert _read(tier, layout, A) is None


# -- storage ---------------------------------------------------------------------------------------------


def test_round_trip_is_exact(layout, blocks):
    tier = cpu_tier(layout, 4)
    assert tier.put(A, blocks[A])
    partial = make_kv(layout, 5, seed=11)
    assert tier.put(B, partial)
    assert tier.put_many([(C, blocks[C]), (D, blocks[D])]) == 2
    assert_same_kv(_read(tier, layout, A), blocks[A])
    assert_same_kv(_read(tier, layout, B, 5), partial)
    assert_same_kv(_read(tier, layout, C), blocks[C])
    assert _read(tier, layout, B, 16) is None  # a partial block is not served as a full one
    assert _read(tier, layout, E) is None
    stats = tier.stats()
    assert (stats["hits"], stats["misses"], stats["blocks"]) == (3, 2, 4)
    assert stats["bytes_read"] == 2 * 4096 + 5 * 256
    assert stats["bytes_written"] == 3 * 4096 + 5 * 256
    assert tier.used_bytes() == 4 * 4096  # a partial block takes a whole slot
    # The tier keeps its own copy: changing the source afterwards changes nothing.
    source = blocks[E].clone()
    tier.put(E, source)
    source.zero_()
    assert_same_kv(_read(tier, layout, E), blocks[E])


def test_strided_source(layout):
    tier = cpu_tier(layout, 2)
    kv = make_kv(layout, 40, seed=3)
    tail = kv[:, :, 32:40]
    assert not tail.is_contiguous()
    assert tier.put(A, tail)
    assert_same_kv(_read(tier, layout, A, 8), tail.contiguous())


def test_lru_eviction_order(layout, blocks):
    tier = cpu_tier(layout, 3)
    for k in (A, B, C):
        tier.put(k, blocks[k])
    assert _names(tier) == ["A", "B", "C"]
    _read(tier, layout, A)  # a hit makes A most recent
    assert _names(tier) == ["B", "C", "A"]
    assert tier.put(D, blocks[D])
    assert _names(tier) == ["C", "A", "D"]  # B, least recently used, went
    assert not tier.contains(B)
    assert tier.put(C, blocks[C])  # already stored: refreshed, not copied again
    assert _names(tier) == ["A", "D", "C"]
    assert tier.put(E, blocks[E])
    assert _names(tier) == ["D", "C", "E"]
    stats = tier.stats()
    assert (stats["evictions"], stats["blocks_written"]) == (2, 5)
    for k in (C, D, E):
        assert_same_kv(_read(tier, layout, k), blocks[k])


def test_on_evict_sees_exact_bytes_before_slot_reuse(layout, blocks):
    seen = []

    def on_evict(k, view, lossy):
        seen.append((k, view, view.clone()))

    tier = cpu_tier(layout, 2, on_evict=on_evict)
    partial = make_kv(layout, 3, seed=9)
    tier.put(A, blocks[A])
    tier.put(B, partial)
    assert seen == []
    tier.put(C, blocks[C])
    assert [NAMES[k] for k, _, _ in seen] == ["A"]
    _, view, copy = seen[0]
    assert_same_kv(copy, blocks[A])  # the victim's bytes, when on_evict ran
    assert_same_kv(view.clone(), blocks[C])  # and that very slot now holds the new block
    tier.put(D, blocks[D])
    k, view, copy = seen[1]
    assert NAMES[k] == "B"
    assert_same_kv(copy, partial)  # a partial victim is seen with its own shape
    assert view.shape[2] == 3
    assert_same_kv(_read(tier, layout, C), blocks[C])
    assert_same_kv(_read(tier, layout, D), blocks[D])


def test_pin_keeps_block_until_unpin(layout, blocks):
    tier = cpu_tier(layout, 3)
    for k in (A, B, C):
        tier.put(k, blocks[k])
    view = tier.pin(A)
    assert view is not None
    assert_same_kv(view, blocks[A])
    for i in range(10):  # many more blocks than slots
        assert tier.put(key(i), make_kv(layout, 16, seed=100 + i))
    assert tier.contains(A)
    assert_same_kv(view, blocks[A])  # the pinned slot was never reused
    assert_same_kv(_read(tier, layout, A), blocks[A])
    assert tier.delete(A) is False  # refused while pinned
    tier.unpin(A)
    _read(tier, layout, key(8))
    _read(tier, layout, key(9))
    assert _names(tier)[0] == "A"  # now least recently used and unpinned
    assert tier.put(E, blocks[E])
    assert not tier.contains(A)


def test_pins_nest_and_extra_unpins_are_harmless(layout, blocks):
    tier = cpu_tier(layout, 1)
    assert tier.pin(A) is None  # a miss pins nothing
    tier.unpin(A)  # unknown key: no-op
    tier.put(A, blocks[A])
    tier.unpin(A)  # not pinned: must not go negative
    tier.pin(A)
    tier.pin(A)
    tier.unpin(A)
    assert tier.put(B, blocks[B]) is False  # still pinned once
    tier.unpin(A)
    tier.unpin(A)  # one too many
    assert tier.put(B, blocks[B]) is True
    tier.pin(B)
    assert tier.put(C, blocks[C]) is False  # an extra unpin earlier did not leave a "credit"
    tier.unpin(B)


def test_all_slots_pinned_rejects(layout, blocks):
    tier = cpu_tier(layout, 2)
    tier.put(A, blocks[A])
    tier.put(B, blocks[B])
    with tier.reading(A) as a_view, tier.reading(B):
        assert tier.put(C, blocks[C]) is False
        assert tier.put(D, blocks[D]) is False
        assert tier.put(A, blocks[A]) is True  # already stored
        assert tier.stats()["rejected"] == 2
        assert not tier.contains(C)
        assert_same_kv(a_view, blocks[A])
    assert tier.put(C, blocks[C]) is True
    stats = tier.stats()
    assert (stats["rejected"], stats["evictions"], stats["blocks"]) == (2, 1, 2)
    assert_same_kv(_read(tier, layout, C), blocks[C])


def test_reading_miss_yields_none(layout):
    tier = cpu_tier(layout, 1)
    with tier.reading(A) as view:
        assert view is None


def test_close_forgets_and_refuses_puts(layout, blocks):
    tier = cpu_tier(layout, 2)
    tier.put(A, blocks[A])
    tier.close()
    assert list(tier.keys()) == [] and tier.used_bytes() == 0
    assert not tier.put(B, blocks[B]) and not tier.contains(B)
    assert tier.stats()["evictions"] == 0 and tier.stats()["rejected"] == 1


def test_failed_put_does_not_leak_a_slot(layout, blocks):
    tier = cpu_tier(layout, 2)
    with pytest.raises((ValueError, RuntimeError)):
        tier.put(E, make_kv(layout, 17, seed=1))  # more tokens than a block holds: the copy fails
    assert not tier.contains(E)
    assert tier.put(A, blocks[A]) and tier.put(B, blocks[B])
    assert _names(tier) == ["A", "B"]  # both slots still usable
    assert tier.stats()["evictions"] == 0


# -- concurrency -----------------------------------------------------------------------------------------


def test_eviction_storm_never_serves_wrong_bytes(layout):
    slots, writers_n, per_writer = 6, 4, 150
    tier = cpu_tier(layout, slots)
    hot = key(10**6)
    hot_block = make_kv(layout, 16, seed=999)
    assert tier.put(hot, hot_block)
    assert tier.pin(hot) is not None  # held for the whole storm
    expected = {key(w * 1000 + i): make_kv(layout, 16 if i % 4 else 1 + i % 16, seed=w * 1000 + i)
                for w in range(writers_n) for i in range(per_writer)}
    errors: list[str] = []
    stop = threading.Event()
    barrier = threading.Barrier(writers_n + 2)
    checks = {"hot": 0, "hits": 0}

    def writer(w: int) -> None:
        barrier.wait(LONG)
        for i in range(per_writer):
            k = key(w * 1000 + i)
            if not tier.put(k, expected[k]):
                errors.append(f"put {w}/{i} rejected")

    def hot_reader() -> None:
        barrier.wait(LONG)
        while not stop.is_set():
            with tier.reading(hot) as view:
                if view is None:
                    errors.append("pinned block evicted")
                elif not torch.equal(view, hot_block):
                    errors.append("pinned block bytes changed")
            checks["hot"] += 1

    def other_reader() -> None:
        rng = random.Random(5)
        keys = list(expected)
        barrier.wait(LONG)
        while not stop.is_set():
            k = rng.choice(keys)
            want = expected[k]
            out = torch.zeros_like(want)
            if tier.get_into(k, out):
                checks["hits"] += 1
                if not torch.equal(out, want):
                    errors.append("get_into returned wrong bytes")
            with tier.reading(k) as view:
                if view is not None and not torch.equal(view, want):
                    errors.append("reading yielded wrong bytes")
                for _ in range(3):  # hold the pin while the writers keep evicting
                    if view is not None and not torch.equal(view, want):
                        errors.append("pinned view changed under a reader")

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers_n)]
    readers = [threading.Thread(target=hot_reader), threading.Thread(target=other_reader)]
    for thread in threads + readers:
        thread.start()
    for thread in threads:
        thread.join(LONG)
    stop.set()
    for thread in readers:
        thread.join(LONG)
    assert not any(t.is_alive() for t in threads + readers)
    assert errors[:5] == []
    assert checks["hot"] > 0
    tier.unpin(hot)
    stats = tier.stats()
    total = writers_n * per_writer + 1
    assert stats["blocks"] == slots and stats["rejected"] == 0
    assert stats["evictions"] == total - slots
    assert stats["blocks_written"] == total
    assert tier.contains(hot)
    assert_same_kv(_read(tier, layout, hot), hot_block)
    for k in tier.keys():
        if k != hot:
            want = expected[k]
            assert_same_kv(_read(tier, layout, k, want.shape[2]), want)


# -- CUDA ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("source_on", ["cpu", "cuda"])
def test_cuda_round_trip(layout, blocks, source_on):
    seen = []
    tier = DeviceTier(layout, 2 * layout.block_bytes, device="cuda",
                      on_evict=lambda k, view: seen.append((k, view.cpu().clone())))
    assert tier.device.type == "cuda" and tier.device.index is not None
    for k in (A, B, C):
        assert tier.put(k, blocks[k].to(source_on))
    assert [NAMES[k] for k, _ in seen] == ["A"]
    assert_same_kv(seen[0][1], blocks[A])
    assert_same_kv(_read(tier, layout, B), blocks[B])  # into host memory
    out = torch.zeros(layout.shape(16), dtype=layout.dtype, device="cuda")
    assert tier.get_into(C, out)  # into device memory
    assert_same_kv(out.cpu(), blocks[C])
    with tier.reading(C) as view:
        assert view.is_cuda
        assert_same_kv(view.cpu(), blocks[C])
