"""Prefetch handles: bringing stored blocks up into the host tier before the engine asks.

Real tiers and real worker threads throughout. A "held" disk is a real
LmdbTier whose reads wait on an Event (``HeldTier``): a prefetch that is in
flight stays in flight until the test lets it go, so nothing here depends on
timing. The only timed waits are bounded waits for things that must happen.
"""

from __future__ import annotations

import gc
import math
import threading
import time
from collections import Counter

import pytest
import torch

from conftest import assert_same_kv, make_tokens
from faulty import FaultyTier
from kvstore.config import PREFETCH_POLICIES, StoreConfig
from kvstore.prefetch import PREFETCH_COUNTERS, PrefetchPolicy
from kvstore.store import KVStore
from kvstore.tiers.host import HostTier
from kvstore.tiers.lmdb import LmdbTier

LONG = 10.0  # an upper bound on waits that must succeed; no correct run comes near it
HOLD_LIMIT = 20.0  # a held read gives up after this long, so a regression fails instead of hanging


class HeldTier(FaultyTier):
    """A FaultyTier whose reads wait while ``hold`` is clear; counts reads per key and reads entered."""

    def __init__(self, inner):
        super().__init__(inner)
        self.hold = threading.Event()
        self.hold.set()
        self.entered = 0
        self.reads_by_key: Counter[bytes] = Counter()
        self._cond = threading.Condition()

    def get_into(self, key: bytes, out) -> bool:
        with self._cond:
            self.entered += 1
            self.reads_by_key[key] += 1
            self._cond.notify_all()
        self.hold.wait(HOLD_LIMIT)
        return super().get_into(key, out)

    def wait_entered(self, n: int, timeout: float = LONG) -> bool:
        """Wait until ``n`` reads have started (and, if held, are waiting)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.entered >= n, timeout)

    @property
    def total_reads(self) -> int:
        with self._cond:
            return sum(self.reads_by_key.values())


@pytest.fixture
def held_store(tmp_path, layout):
    """``held_store(host_slots=64, **config)`` -> (store, disk): a real host tier over a HeldTier(LmdbTier).

    ``slow_factor`` is huge so a held read never trips the health breaker.
    Every hold is released, then every store closed, at teardown.
    """
    made: list[tuple[KVStore, HeldTier]] = []

    def factory(host_slots: int = 64, **config):
        path = tmp_path / f"disk{len(made)}"
        disk = HeldTier(LmdbTier(path, 4 << 20, layout, sync=False))
        host = HostTier(layout, host_slots * layout.block_bytes)
        settings = dict(host_bytes=host_slots * layout.block_bytes, disk_dir=str(path), disk_sync=False,
                        slow_factor=1e9)
        settings.update(config)
        store = KVStore(layout, StoreConfig(**settings), tiers=[host, disk])
        made.append((store, disk))
        return store, disk

    yield factory
    for _, disk in made:
        disk.hold.set()
    for store, _ in made:
        store.close()


def wait_until(predicate, timeout: float = LONG) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def keys_of(store: KVStore, tokens) -> list[bytes]:
    return [ref.key for ref in store.block_keys(tokens)]


def only_on_disk(store: KVStore, tokens, kv, keep_in_host: int = 0) -> None:
    """Store ``tokens``, wait for the disk copies, then drop the host copies of all blocks but the first few."""
    store.put(tokens, kv)
    assert store.flush(LONG)
    for key in keys_of(store, tokens)[keep_in_host:]:
        assert store.host.delete(key)
    assert store.stats()["tiers"]["lmdb"]["blocks"] >= len(keys_of(store, tokens))


def pinned(store: KVStore) -> int:
    return store.stats()["prefetch"]["pinned_blocks"]


def counters(store: KVStore) -> dict[str, int]:
    stats = store.stats()["prefetch"]
    return {name: stats[name] for name in PREFETCH_COUNTERS}


def expect(**nonzero: int) -> dict[str, int]:
    """Every prefetch counter 0 but those named."""
    out = {name: 0 for name in PREFETCH_COUNTERS}
    out.update(nonzero)
    return out


def host_deletable(store: KVStore, keys) -> list[bool]:
    """Try to delete each key from the host tier: False while a prefetch pins it."""
    return [store.host.delete(key) for key in keys]


# -- a prefetch in flight -------------------------------------------------------------------


def test_prefetch_returns_at_once_while_reads_are_held(held_store, kv_for):
    store, disk = held_store()
    tokens, kv = make_tokens(40), kv_for(40)
    only_on_disk(store, tokens, kv)
    keys = keys_of(store, tokens)
    disk.hold.clear()

    handle = store.prefetch(tokens)  # returns although no read can finish

    assert disk.wait_entered(1)
    assert not handle.done()
    assert handle.ready() == 0
    assert handle.wait(0) == 0
    assert handle.views() == []
    assert handle.num_tokens == 40
    assert [(b.start, b.end) for b in handle.blocks] == [(0, 16), (16, 32), (32, 40)]
    assert pinned(store) == 3  # a pin reserved per block being fetched
    assert not any(store.host.contains(key) for key in keys)

    disk.hold.set()
    assert handle.wait(LONG) == 40  # partial tail block included
    assert handle.done()
    assert all(store.host.contains(key) for key in keys)
    assert host_deletable(store, keys) == [False, False, False]  # pinned by the handle
    assert pinned(store) == 3
    assert counters(store) == expect(prefetches=1, prefetch_blocks=3, prefetch_fetched=3)
    views = handle.views()
    assert [tuple(v.shape)[2] for v in views] == [16, 16, 8]
    for view, (start, end) in zip(views, [(0, 16), (16, 32), (32, 40)]):
        assert_same_kv(view, kv[:, :, start:end])

    out = store.load(tokens, prefetch=handle)
    assert_same_kv(out, kv)
    assert disk.total_reads == 3  # the load read the prefetched host copies, not the disk again
    assert handle.closed
    assert pinned(store) == 0
    assert host_deletable(store, keys) == [True, True, True]


def test_host_resident_blocks_are_ready_at_once_and_pinned(make_store, kv_for):
    store = make_store("host")
    tokens, kv = make_tokens(37), kv_for(37)
    store.put(tokens, kv)
    keys = keys_of(store, tokens)

    handle = store.prefetch(tokens)

    assert handle.done()
    assert handle.ready() == 37
    assert handle.wait(0) == 37
    assert handle.result() == 37
    assert pinned(store) == 3
    assert counters(store) == expect(prefetches=1, prefetch_blocks=3, prefetch_ready_blocks=3)
    assert host_deletable(store, keys) == [False, False, False]
    assert_same_kv(torch.cat(handle.views(), dim=2), kv)
    handle.close()
    assert pinned(store) == 0
    assert host_deletable(store, keys) == [True, True, True]


def test_ready_counts_leading_blocks_with_the_host_ones_at_once(held_store, kv_for):
    store, disk = held_store()
    tokens, kv = make_tokens(40), kv_for(40)
    only_on_disk(store, tokens, kv, keep_in_host=1)
    disk.hold.clear()

    handle = store.prefetch(tokens)

    assert handle.ready() == 16  # block 0 was in the host tier: pinned and ready now
    assert handle.wait(0) == 16
    assert handle.wait(0.05) == 16  # the other two cannot arrive while reads are held
    assert not handle.done()
    assert pinned(store) == 3
    assert counters(store) == expect(prefetches=1, prefetch_blocks=3, prefetch_ready_blocks=1)
    assert not store.host.delete(keys_of(store, tokens)[0])

    disk.hold.set()
    assert handle.wait() == 40
    assert handle.done()
    assert disk.total_reads == 2
    assert counters(store) == expect(prefetches=1, prefetch_blocks=3, prefetch_ready_blocks=1, prefetch_fetched=2)
    assert_same_kv(torch.cat(handle.views(), dim=2), kv)
    handle.close()
    assert pinned(store) == 0


def test_a_block_gone_before_its_fetch_stops_ready_at_the_gap(held_store, kv_for):
    store, disk = held_store()
    tokens, kv = make_tokens(48), kv_for(48)
    only_on_disk(store, tokens, kv)
    keys = keys_of(store, tokens)
    disk.hold.clear()

    handle = store.prefetch(tokens)
    assert handle.num_tokens == 48
    assert store.disk.delete(keys[1])  # evicted from the disk after the prefetch saw it there
    disk.hold.set()

    assert handle.wait(LONG) == 16  # leading tokens only: block 2 arrived but block 1 did not
    assert handle.done()
    assert counters(store) == expect(prefetches=1, prefetch_blocks=3, prefetch_fetched=2, prefetch_failed=1)
    assert pinned(store) == 2  # blocks 0 and 2; the failed fetch gave its reserved pin back
    assert [store.host.contains(key) for key in keys] == [True, False, True]
    assert host_deletable(store, [keys[0], keys[2]]) == [False, False]
    assert len(handle.views()) == 1
    handle.close()
    assert pinned(store) == 0
    assert host_deletable(store, [keys[0], keys[2]]) == [True, True]


@pytest.mark.parametrize("lower", ["lmdb", "files"])
def test_prefetch_brings_a_lower_tier_prefix_up_and_load_is_exact(make_store, tmp_path, kv_for, lower):
    if lower == "lmdb":
        store = make_store("both")
    else:
        store = make_store("host", files_dir=str(tmp_path / "files"), files_bytes=4 << 20, files_sync=False)
    tokens, kv = make_tokens(37), kv_for(37)
    store.put(tokens, kv)
    assert store.flush(LONG)
    keys = keys_of(store, tokens)
    for key in keys:
        assert store.host.delete(key)
    assert store.lookup(tokens) == 37  # still found, in the lower tier only

    handle = store.prefetch(tokens, policy="wait")
    assert handle.result() == 37
    assert all(store.host.contains(key) for key in keys)
    out = store.load(tokens, prefetch=handle)

    assert_same_kv(out, kv)
    stats = store.stats()
    assert stats["tiers"][lower]["hits"] == 3  # one read per block, by the prefetch
    assert stats["tiers"]["host"]["hits"] == 3  # the load read the host copies
    assert stats["prefetch"]["prefetch_fetched"] == 3
    assert stats["store"]["prefill_tokens_saved"] == 37
    assert handle.closed and pinned(store) == 0


def test_prefetch_brings_blocks_up_even_when_reads_do_not_promote(make_store, kv_for):
    store = make_store("both", promote=False)
    tokens, kv = make_tokens(40), kv_for(40)
    store.put(tokens, kv)
    assert store.flush(LONG)
    keys = keys_of(store, tokens)
    for key in keys:
        assert store.host.delete(key)
    assert_same_kv(store.get(tokens), kv)
    assert not any(store.host.contains(key) for key in keys)  # a get does not promote here

    handle = store.prefetch(tokens, policy="wait")
    assert handle.result() == 40
    assert all(store.host.contains(key) for key in keys)  # but a prefetch is for bringing blocks up
    assert_same_kv(store.load(tokens, prefetch=handle), kv)
    stats = store.stats()
    assert (stats["tiers"]["lmdb"]["hits"], stats["tiers"]["host"]["hits"]) == (6, 3)
    assert stats["store"]["promotions"] == 0
    assert pinned(store) == 0


def test_prefetch_of_unstored_tokens_is_empty_and_done(make_store, kv_for):
    store = make_store("both")
    tokens = make_tokens(40)
    store.put(tokens[:16], kv_for(16))
    handle = store.prefetch(tokens)
    assert handle.done() and handle.ready() == 16 and handle.num_tokens == 16  # only the stored leading block
    nothing = store.prefetch(make_tokens(40, seed=9))
    assert (nothing.blocks, nothing.num_tokens, nothing.ready(), nothing.wait(), nothing.done()) == ([], 0, 0, 0, True)
    assert counters(store) == expect(prefetches=2, prefetch_blocks=1, prefetch_ready_blocks=1)
    handle.close()
    nothing.close()
    assert pinned(store) == 0


# -- policies ----------------------------------------------------------------------------------


@pytest.mark.parametrize("in_host", [0, 1, 2])
def test_best_effort_load_takes_only_the_ready_prefix(held_store, kv_for, in_host):
    store, disk = held_store()  # best_effort is the default policy
    tokens, kv = make_tokens(40), kv_for(40)
    only_on_disk(store, tokens, kv, keep_in_host=in_host)
    disk.hold.clear()

    handle = store.prefetch(tokens)
    assert handle.policy == PrefetchPolicy("best_effort")
    out = store.load(tokens, prefetch=handle)  # returns although the disk reads are held

    ready = [0, 16, 32][in_host]
    assert_same_kv(out, kv[:, :, :ready])
    assert handle.closed and pinned(store) == 0
    stats = store.stats()
    assert stats["store"]["prefill_tokens_saved"] == ready  # the engine prefills the other 40 - ready tokens
    assert stats["tiers"]["host"]["hits"] == in_host


def test_wait_policy_loads_everything_from_a_slow_tier(held_store, kv_for):
    store, disk = held_store(prefetch_policy="wait")
    disk.delay = 0.01
    tokens, kv = make_tokens(40), kv_for(40)
    only_on_disk(store, tokens, kv)

    handle = store.prefetch(tokens)
    assert handle.policy.policy == "wait"
    out = store.load(tokens, prefetch=handle)

    assert_same_kv(out, kv)
    assert disk.total_reads == 3  # the load waited for the fetches instead of reading the disk itself
    assert store.stats()["tiers"]["host"]["hits"] == 3
    assert handle.closed and pinned(store) == 0


def test_timeout_policy_stops_waiting_and_returns_the_ready_prefix(held_store, kv_for):
    store, disk = held_store(prefetch_policy="timeout", prefetch_timeout_base_seconds=0.05,
                             prefetch_timeout_per_1k_tokens_seconds=0.0)
    tokens, kv = make_tokens(40), kv_for(40)
    only_on_disk(store, tokens, kv, keep_in_host=1)
    disk.hold.clear()

    handle = store.prefetch(tokens)
    assert handle.policy == PrefetchPolicy("timeout", 0.05, 0.0)
    assert handle.policy.budget(handle.num_tokens) == 0.05
    other = store.prefetch(tokens)
    assert other.result() == 16  # waited its budget, then took what is ready
    assert not other.done()
    out = store.load(tokens, prefetch=handle)

    assert_same_kv(out, kv[:, :, :16])
    assert handle.closed
    other.close()
    assert pinned(store) == 0


def test_timeout_policy_takes_everything_that_arrives_within_its_budget(held_store, kv_for):
    store, disk = held_store(prefetch_policy="timeout", prefetch_timeout_base_seconds=LONG)
    tokens, kv = make_tokens(40), kv_for(40)
    only_on_disk(store, tokens, kv)
    handle = store.prefetch(tokens)
    assert_same_kv(store.load(tokens, prefetch=handle), kv)
    assert disk.total_reads == 3


def test_per_call_policy_overrides_the_config(held_store, kv_for):
    store, disk = held_store(prefetch_policy="wait", prefetch_timeout_base_seconds=0.5,
                             prefetch_timeout_per_1k_tokens_seconds=0.25)
    tokens, kv = make_tokens(40), kv_for(40)
    only_on_disk(store, tokens, kv, keep_in_host=1)
    disk.hold.clear()

    quick = store.prefetch(tokens, policy="best_effort")
    assert quick.policy == PrefetchPolicy("best_effort", 0.5, 0.25)
    assert store.prefetch(tokens, policy="timeout").policy.budget(2000) == 1.0  # the config's timeouts
    assert store.prefetch(tokens).policy.policy == "wait"
    assert_same_kv(store.load(tokens, prefetch=quick), kv[:, :, :16])  # would wait for the held reads under "wait"


def test_per_call_wait_overrides_a_best_effort_config(held_store, kv_for):
    store, disk = held_store()
    disk.delay = 0.01
    tokens, kv = make_tokens(40), kv_for(40)
    only_on_disk(store, tokens, kv)
    handle = store.prefetch(tokens, policy="wait")
    assert_same_kv(store.load(tokens, prefetch=handle), kv)
    assert disk.total_reads == 3


@pytest.mark.parametrize("timeout", ["1", float("nan"), True, [1]])
def test_a_wait_of_no_number_is_a_value_error(make_store, kv_for, timeout):
    """``wait("1")`` raised TypeError from inside the comparison; ``wait(nan)`` returned at once."""
    store = make_store("host")
    tokens = make_tokens(16)
    store.put(tokens, kv_for(16))
    with store.prefetch(tokens) as handle:
        with pytest.raises(ValueError, match="^timeout: expected seconds"):
            handle.wait(timeout)
        assert handle.wait(1e300) == 16  # longer than a clock can time: until done (Event.wait overflowed)


@pytest.mark.parametrize("policy", ["eager", "WAIT", "", 3])
def test_invalid_policy_is_rejected_by_name(make_store, kv_for, policy):
    store = make_store("host")
    tokens = make_tokens(16)
    store.put(tokens, kv_for(16))
    with pytest.raises(ValueError, match=rf"^policy: expected one of \['best_effort', 'wait', 'timeout'\], "
                                         rf"got {policy!r}$"):
        store.prefetch(tokens, policy=policy)
    assert pinned(store) == 0
    assert counters(store)["prefetches"] == 0


def test_policy_budgets():
    assert PrefetchPolicy().policy == "best_effort"
    assert PrefetchPolicy("best_effort").budget(10_000) == 0.0
    assert PrefetchPolicy("wait").budget(10_000) is None
    assert PrefetchPolicy("timeout", 0.5, 0.25).budget(2000) == 1.0
    assert PrefetchPolicy("timeout", 0.0, 0.0).budget(2000) == 0.0
    assert PREFETCH_POLICIES == ("best_effort", "wait", "timeout")


@pytest.mark.parametrize("name,value", [
    ("timeout_base_seconds", -0.1),
    ("timeout_base_seconds", math.nan),
    ("timeout_base_seconds", True),
    ("timeout_per_1k_tokens_seconds", "1"),
    ("timeout_per_1k_tokens_seconds", -1),
])
def test_policy_rejects_bad_timeouts(name, value):
    with pytest.raises(ValueError, match=rf"^{name}: expected a number >= 0, got {value!r}$"):
        PrefetchPolicy("timeout", **{name: value})


# -- cancel, close, abandon ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["cancel", "close", "with", "drop"])
def test_releasing_a_handle_releases_its_pins(make_store, kv_for, how):
    store = make_store("host")
    tokens = make_tokens(40)
    store.put(tokens, kv_for(40))
    keys = keys_of(store, tokens)

    if how == "with":
        with store.prefetch(tokens) as handle:
            assert pinned(store) == 3
            assert host_deletable(store, keys) == [False, False, False]
    else:
        handle = store.prefetch(tokens)
        assert pinned(store) == 3
        assert host_deletable(store, keys) == [False, False, False]
        if how == "drop":
            del handle  # an abandoned handle: its pins go with it
            gc.collect()
        else:
            getattr(handle, how)()

    assert pinned(store) == 0
    assert host_deletable(store, keys) == [True, True, True]
    if how != "drop":
        assert handle.closed
        assert handle.ready() == 0 and handle.views() == []
        handle.close()  # idempotent: no pin released twice
        handle.cancel()
        assert pinned(store) == 0


def test_cancel_releases_reserved_pins_and_skips_queued_fetches(held_store, kv_for):
    store, disk = held_store(prefetch_workers=1)
    tokens, kv = make_tokens(48), kv_for(48)
    only_on_disk(store, tokens, kv)
    keys = keys_of(store, tokens)
    disk.hold.clear()

    handle = store.prefetch(tokens)
    assert disk.wait_entered(1)  # the only worker is in block 0's read; blocks 1 and 2 are queued
    assert pinned(store) == 3
    handle.cancel()
    assert pinned(store) == 0
    disk.hold.set()

    assert handle.wait(LONG) == 0  # returns once the fetches are finished or skipped
    assert handle.done()
    assert counters(store) == expect(prefetches=1, prefetch_blocks=3, prefetch_fetched=1, prefetch_cancelled=2)
    assert disk.total_reads == 1
    assert [store.host.contains(key) for key in keys] == [True, False, False]
    assert store.host.delete(keys[0])  # brought up, but nobody pins it
    assert pinned(store) == 0


def test_a_handle_the_collector_frees_inside_a_slot_tiers_lock_does_not_freeze_the_store(make_store, kv_for):
    """An engine's request object that holds its handle and itself (a cycle) is freed by the garbage collector
    at any allocation, in any thread: inside the host tier's lock, the handle's finalizer unpinned, waited
    for that lock its own thread held, and every thread of the store froze behind it."""
    store = make_store("host")
    tokens = make_tokens(40)
    store.put(tokens, kv_for(40))

    class Request:
        pass

    request = Request()
    request.me, request.handle = request, store.prefetch(tokens)
    assert request.handle.wait(LONG) == 40
    del request
    collected = threading.Event()

    def collect_in_the_lock() -> None:
        with store.host._lock:
            gc.collect()
        collected.set()

    worker = threading.Thread(target=collect_in_the_lock, daemon=True)
    worker.start()
    worker.join(LONG)
    assert collected.is_set()
    assert pinned(store) == 0  # released outside the finalizer
    assert host_deletable(store, keys_of(store, tokens)) == [True, True, True]


def test_closing_a_layer_wise_load_does_not_wait_for_its_queued_fetches(held_store, kv_for):
    """Its worker waited for the prefetch's every fetch (the ``wait`` policy) before it looked at ``closed``:
    on a slow tier, closing a 400-block load took seconds, block after block. Now close stops the wait, and
    the fetches nobody waits for are skipped."""
    store, disk = held_store(prefetch_workers=1, prefetch_policy="wait")
    tokens, kv = make_tokens(48), kv_for(48)
    only_on_disk(store, tokens, kv)
    disk.hold.clear()
    loader = store.load(tokens, layer_wise=True)
    assert disk.wait_entered(1)
    closer = threading.Thread(target=loader.close, daemon=True)
    closer.start()
    closer.join(LONG)
    assert not closer.is_alive()  # the held read is still held: close did not wait for it, nor for the rest
    disk.hold.set()
    assert pinned(store) == 0
    deadline = time.monotonic() + LONG
    while counters(store)["prefetch_cancelled"] < 2:  # the two fetches queued behind the held one
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_busy_worker_releases_a_collected_handles_pins_and_skips_its_fetches():
    """A worker swept the handles the garbage collector freed only after half a second with nothing queued:
    behind another request's slow fetches, a dropped handle's pins stayed until the queue drained, and its
    own queued fetches were still read and pinned for nobody."""
    from kvstore.keys import BlockRef
    from kvstore.prefetch import Prefetcher
    gate, unpinned, fetched = threading.Event(), [], []

    def fetch(block):
        if block.key.startswith(b"slow"):
            gate.wait(LONG)
        fetched.append(block.key)
        return True

    def pin(key):
        return torch.zeros(1) if key.startswith(b"ready") else None

    def blocks(prefix, n):
        return [BlockRef(f"{prefix}{i}".encode(), 16 * i, 16 * (i + 1)) for i in range(n)]

    prefetcher = Prefetcher(fetch, pin, unpinned.append, workers=1)
    try:
        busy = prefetcher.start(blocks("slow", 3), PrefetchPolicy(), 48)
        dropped = prefetcher.start(blocks("ready", 2) + blocks("later", 2), PrefetchPolicy(), 64)
        assert dropped.ready() == 32
        del dropped
        gc.collect()
        gate.set()  # the worker takes its next fetch: the sweep comes first
        busy.wait(LONG)
        assert busy.done()
        deadline = time.monotonic() + LONG
        while len(unpinned) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert sorted(unpinned) == [b"ready0", b"ready1"]
        assert not any(key.startswith(b"later") for key in fetched)
        assert prefetcher.counters.snapshot()["prefetch_cancelled"] == 2
    finally:
        prefetcher.close()


def test_dropping_a_handle_with_fetches_in_flight_releases_and_skips(held_store, kv_for):
    store, disk = held_store(prefetch_workers=1)
    tokens, kv = make_tokens(48), kv_for(48)
    later, later_kv = make_tokens(16, seed=1), kv_for(16, seed=1)
    only_on_disk(store, tokens, kv)
    only_on_disk(store, later, later_kv)
    disk.hold.clear()

    handle = store.prefetch(tokens)
    assert disk.wait_entered(1)
    assert pinned(store) == 3
    del handle
    gc.collect()
    assert pinned(store) == 0

    behind = store.prefetch(later)  # queued behind the dropped handle's fetches (one worker, FIFO)
    disk.hold.set()
    assert behind.wait(LONG) == 16
    assert counters(store) == expect(prefetches=2, prefetch_blocks=4, prefetch_fetched=2, prefetch_cancelled=2)
    assert_same_kv(store.load(later, prefetch=behind), later_kv)
    assert pinned(store) == 0


# -- shared fetches ------------------------------------------------------------------------------


def test_overlapping_prefetches_share_one_read_per_block(held_store, kv_for):
    store, disk = held_store()
    tokens, kv = make_tokens(40), kv_for(40)
    only_on_disk(store, tokens, kv)
    keys = keys_of(store, tokens)
    assert keys_of(store, tokens[:32]) == keys[:2]
    disk.hold.clear()

    whole = store.prefetch(tokens)
    prefix = store.prefetch(tokens[:32])  # joins the fetches of blocks 0 and 1 in flight
    assert counters(store)["prefetch_coalesced"] == 2
    assert pinned(store) == 5
    disk.hold.set()

    assert whole.wait(LONG) == 40
    assert prefix.wait(LONG) == 32
    assert disk.reads_by_key == Counter({key: 1 for key in keys})  # each block read exactly once
    assert counters(store) == expect(prefetches=2, prefetch_blocks=5, prefetch_fetched=3, prefetch_coalesced=2)
    assert_same_kv(torch.cat(whole.views(), dim=2), kv)
    assert_same_kv(torch.cat(prefix.views(), dim=2), kv[:, :, :32])
    assert pinned(store) == 5

    whole.close()
    assert pinned(store) == 2
    assert host_deletable(store, keys) == [False, False, True]  # the prefix handle still pins blocks 0 and 1
    assert_same_kv(store.load(tokens[:32], prefetch=prefix), kv[:, :, :32])
    assert pinned(store) == 0
    assert host_deletable(store, keys[:2]) == [True, True]


def test_cancelling_one_sharer_still_delivers_to_the_other(held_store, kv_for):
    store, disk = held_store()
    tokens, kv = make_tokens(40), kv_for(40)
    only_on_disk(store, tokens, kv)
    disk.hold.clear()

    first = store.prefetch(tokens)
    second = store.prefetch(tokens)
    assert pinned(store) == 6
    first.cancel()
    assert pinned(store) == 3
    disk.hold.set()

    assert second.wait(LONG) == 40
    assert first.ready() == 0
    assert disk.total_reads == 3
    assert counters(store) == expect(prefetches=2, prefetch_blocks=6, prefetch_fetched=3, prefetch_coalesced=3)
    assert_same_kv(store.load(tokens, prefetch=second), kv)
    assert pinned(store) == 0


# -- bounds ----------------------------------------------------------------------------------------


def test_pins_are_limited_to_half_the_host_slots(make_store, layout, kv_for):
    store = make_store("host", host_bytes=8 * layout.block_bytes)  # 8 slots: at most 4 prefetch pins
    big, small = make_tokens(96), make_tokens(32, seed=1)
    store.put(big, kv_for(96))
    store.put(small, kv_for(32, seed=1))
    assert store.stats()["tiers"]["host"]["blocks"] == 8

    first = store.prefetch(big)
    assert first.ready() == 64  # 4 of its 6 blocks
    assert first.done()
    assert pinned(store) == 4
    assert counters(store) == expect(prefetches=1, prefetch_blocks=6, prefetch_ready_blocks=4,
                                     prefetch_pin_limited=2)
    second = store.prefetch(small)
    assert second.ready() == 0
    assert pinned(store) == 4
    assert counters(store)["prefetch_pin_limited"] == 4

    first.close()
    third = store.prefetch(small)
    assert third.ready() == 32
    assert pinned(store) == 2
    assert counters(store) == expect(prefetches=3, prefetch_blocks=10, prefetch_ready_blocks=6,
                                     prefetch_pin_limited=4)
    third.close()
    second.close()
    assert pinned(store) == 0


def test_one_slot_host_tier_allows_no_prefetch_pins(make_store, layout, kv_for):
    store = make_store("host", host_bytes=layout.block_bytes)
    first, other = make_tokens(16), make_tokens(16, seed=1)
    store.put(first, kv_for(16))
    handle = store.prefetch(first)
    assert counters(store)["prefetch_pin_limited"] == 1
    assert pinned(store) == 0
    assert store.put(other, kv_for(16, seed=1)) == 1  # the slot can still be reused by a put
    handle.close()


def test_queue_bound_cuts_a_prefetch_short(held_store, kv_for):
    store, disk = held_store(prefetch_workers=1, prefetch_queue_blocks=2)
    first, first_kv = make_tokens(16, seed=1), kv_for(16, seed=1)
    tokens, kv = make_tokens(80), kv_for(80)
    only_on_disk(store, first, first_kv)
    only_on_disk(store, tokens, kv)
    disk.hold.clear()

    busy = store.prefetch(first)
    assert disk.wait_entered(1)  # the only worker is busy and the queue is empty
    handle = store.prefetch(tokens)  # 2 of its 5 fetches fit in the queue

    assert counters(store) == expect(prefetches=2, prefetch_blocks=6, prefetch_dropped=3)
    assert pinned(store) == 3
    disk.hold.set()
    assert busy.wait(LONG) == 16
    assert handle.wait(LONG) == 32
    assert disk.total_reads == 3
    assert_same_kv(store.load(tokens, prefetch=handle), kv[:, :, :32])
    busy.close()
    assert pinned(store) == 0


def test_workers_stop_when_the_store_closes(make_store, kv_for):
    before = set(threading.enumerate())
    store = make_store("host", prefetch_workers=3)
    workers = [t for t in threading.enumerate() if t not in before and t.name.startswith("kvstore-prefetch")]
    assert len(workers) == 3 and all(t.is_alive() for t in workers)
    store.close()
    assert not any(t.is_alive() for t in workers)
    assert not any(t.name.startswith("kvstore-prefetch") for t in set(threading.enumerate()) - before)
    with pytest.raises(RuntimeError, match="closed"):
        store.prefetch(make_tokens(16))


def test_a_handle_waiting_during_close_returns(held_store, kv_for):
    store, disk = held_store(prefetch_workers=1)
    tokens, kv = make_tokens(48), kv_for(48)
    only_on_disk(store, tokens, kv)
    disk.hold.clear()
    handle = store.prefetch(tokens)
    assert disk.wait_entered(1)

    result: list[int] = []
    waiter = threading.Thread(target=lambda: result.append(handle.wait()), daemon=True)
    waiter.start()
    closer = threading.Thread(target=store.close, daemon=True)
    closer.start()  # stops the workers: joins the one in the held read
    # No public signal says the prefetcher is closing: poll its flag, so the held read ends only after it is set.
    assert wait_until(lambda: store.hooks.prefetcher._closed)
    disk.hold.set()

    closer.join(LONG)
    waiter.join(LONG)
    assert not closer.is_alive() and not waiter.is_alive()
    assert result == [0]  # the store closed the handle first: nothing is pinned in tiers that are closed
    assert handle.closed and pinned(store) == 0


# -- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,value,expected", [
    ("prefetch_policy", "eager", r"one of \['best_effort', 'wait', 'timeout'\]"),
    ("prefetch_policy", None, r"one of \['best_effort', 'wait', 'timeout'\]"),
    ("prefetch_timeout_base_seconds", -0.01, "a finite number >= 0.0"),
    ("prefetch_timeout_base_seconds", math.nan, "a finite number >= 0.0"),
    ("prefetch_timeout_base_seconds", "1s", "a finite number >= 0.0"),
    ("prefetch_timeout_per_1k_tokens_seconds", -1, "a finite number >= 0.0"),
    ("prefetch_timeout_per_1k_tokens_seconds", True, "a finite number >= 0.0"),
    ("prefetch_workers", 0, "an integer >= 1 and <= 256"),
    ("prefetch_workers", 2.0, "an integer >= 1 and <= 256"),
    ("prefetch_workers", True, "an integer >= 1 and <= 256"),
    ("prefetch_queue_blocks", 0, "an integer >= 1"),
    ("prefetch_queue_blocks", "8", "an integer >= 1"),
    ("load_lookahead_layers", 0, "an integer >= 1 and <= 4096"),
    ("load_lookahead_layers", -2, "an integer >= 1 and <= 4096"),
])
def test_config_rejects_bad_prefetch_settings(name, value, expected):
    with pytest.raises(ValueError, match=rf"^{name}: expected {expected}, got {value!r}$"):
        StoreConfig(**{name: value})


def test_config_prefetch_settings_from_code_and_environment():
    config = StoreConfig(prefetch_policy="timeout", prefetch_timeout_base_seconds=1,
                         prefetch_timeout_per_1k_tokens_seconds=0, prefetch_workers=4, prefetch_queue_blocks=8,
                         load_lookahead_layers=3)
    assert config.prefetch_timeout_base_seconds == 1.0 and isinstance(config.prefetch_timeout_base_seconds, float)
    assert config.prefetch_timeout_per_1k_tokens_seconds == 0.0
    assert (config.prefetch_workers, config.prefetch_queue_blocks, config.load_lookahead_layers) == (4, 8, 3)
    defaults = StoreConfig()
    assert (defaults.prefetch_policy, defaults.prefetch_timeout_base_seconds,
            defaults.prefetch_timeout_per_1k_tokens_seconds, defaults.prefetch_workers,
            defaults.prefetch_queue_blocks, defaults.load_lookahead_layers) == ("best_effort", 0.02, 0.02, 2, 256, 2)
    env = StoreConfig.load(environ={"KVSTORE_PREFETCH_POLICY": "wait", "KVSTORE_PREFETCH_WORKERS": "3",
                                    "KVSTORE_PREFETCH_TIMEOUT_BASE_SECONDS": "0.5"})
    assert (env.prefetch_policy, env.prefetch_workers, env.prefetch_timeout_base_seconds) == ("wait", 3, 0.5)
    with pytest.raises(ValueError, match="^KVSTORE_PREFETCH_QUEUE_BLOCKS: expected an integer, got 'many'$"):
        StoreConfig.load(environ={"KVSTORE_PREFETCH_QUEUE_BLOCKS": "many"})
    with pytest.raises(ValueError, match="^prefetch_policy: expected one of"):
        StoreConfig.load(environ={"KVSTORE_PREFETCH_POLICY": "sometimes"})


@pytest.mark.parametrize("layer_wise", [False, True])
def test_a_handle_from_another_store_is_refused_and_left_as_it_was(tmp_path, layout, layer_wise):
    """Another store's handle (same tokens, same keys) was taken: its pins and readiness are the other
    store's, and the load returned 0 tokens although this store held them all."""
    tokens = make_tokens(40, seed=2)
    kv = torch.randn(layout.shape(40), generator=torch.Generator().manual_seed(2)).to(layout.dtype)
    config = StoreConfig(model_id="m", host_bytes=8 * layout.block_bytes)
    with KVStore(layout, config) as one, KVStore(layout, config) as other:
        for store in (one, other):
            store.put(tokens, kv)
        handle = one.prefetch(tokens)
        with pytest.raises(ValueError, match="from this store's prefetch"):
            other.load(tokens, prefetch=handle, layer_wise=layer_wise)
        assert not handle.closed  # untouched: still the first store's to load with
        assert_same_kv(one.load(tokens, prefetch=handle), kv)
        assert_same_kv(other.load(tokens), kv)
