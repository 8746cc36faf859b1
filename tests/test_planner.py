"""Load or recompute: the planner's decisions (unit) and the store's plans from real tier bandwidth.

Store-level tests put the only copy of a prefix on a real LmdbTier wrapped in
a FaultyTier whose reads sleep: a read then takes at least that long, so the
measured bandwidth is bounded above whatever the machine's load (the
assertions are about the decision, never about speed).
"""

from __future__ import annotations

import math

import pytest

from conftest import assert_same_kv, make_tokens
from faulty import FaultyTier
from kvstore.compression.registry import get_codec
from kvstore.config import StoreConfig
from kvstore.hierarchy import TIER_SPECS
from kvstore.planner import ALPHA, LoadPlan, Planner, TierCost, tier_bandwidth

MEDIUM_PRIORS = {name: spec.bandwidth_prior for name, spec in TIER_SPECS.items()}
from kvstore.store import KVStore
from kvstore.tiers.host import HostTier
from kvstore.tiers.lmdb import LmdbTier

BLOCK = 4096  # bytes of a full 16-token block of the tiny layout
FAST = TierCost("host", 1e12)
SLOW = TierCost("files", 1e3)


def chain(*tiers: TierCost, tail: int = 0) -> list[tuple[int, int, TierCost]]:
    """``(end, bytes, tier)`` of full 16-token blocks on ``tiers``, then a ``tail``-token block on the last tier."""
    blocks = [(16 * (i + 1), BLOCK, tier) for i, tier in enumerate(tiers)]
    if tail:
        blocks.append((16 * len(tiers) + tail, BLOCK * tail // 16, tiers[-1]))
    return blocks


# -- the planner -----------------------------------------------------------------------------------


def test_unknown_throughput_loads_everything_found():
    planner = Planner()
    assert planner.prefill_tokens_per_second == 0.0
    plan = planner.plan(100, chain(FAST, SLOW, FAST, tail=8))
    assert (plan.num_tokens, plan.found, plan.load_tokens) == (100, 56, 56)
    assert plan.sources == {"host": 40, "files": 16}
    assert plan.load_seconds == pytest.approx(BLOCK / 1e3 + (2 * BLOCK + BLOCK // 2) / 1e12)
    assert plan.recompute_seconds == 0.0
    assert (plan.compute_tokens, plan.skipped_tokens) == (44, 0)


def test_nothing_found_plans_nothing():
    plan = Planner(1000).plan(40, [])
    assert plan == LoadPlan(40, 0, 0, {}, 0.0, 0.0)
    assert (plan.compute_tokens, plan.skipped_tokens) == (40, 0)


def test_a_tier_too_slow_to_beat_recompute_is_not_loaded():
    planner = Planner(1e6)  # 16 tokens recompute in 16 us; a block takes 4 s from this tier
    plan = planner.plan(40, chain(SLOW, SLOW, tail=8))
    assert (plan.found, plan.load_tokens, plan.skipped_tokens, plan.compute_tokens) == (40, 0, 40, 40)
    assert plan.sources == {}
    assert (plan.load_seconds, plan.recompute_seconds) == (0.0, 0.0)


def test_a_mixed_chain_loads_the_fast_prefix_only():
    planner = Planner(1000)
    plan = planner.plan(80, chain(FAST, FAST, SLOW, SLOW, FAST))
    assert (plan.found, plan.load_tokens, plan.skipped_tokens) == (80, 32, 48)
    assert plan.sources == {"host": 32}
    assert plan.load_seconds == pytest.approx(2 * BLOCK / 1e12)
    assert plan.recompute_seconds == pytest.approx(32 / 1000)


def test_a_slow_head_is_loaded_when_the_fast_blocks_after_it_pay_for_it():
    planner = Planner(1000)  # a block recomputes in 16 ms
    head = TierCost("lmdb", BLOCK / 0.020)  # 20 ms: a loss on its own
    plan = planner.plan(64, chain(head, FAST, FAST, FAST))
    assert plan.load_tokens == 64
    assert plan.sources == {"lmdb": 16, "host": 48}
    assert plan.load_seconds == pytest.approx(0.020 + 3 * BLOCK / 1e12)
    very_slow = TierCost("lmdb", BLOCK / 1.0)  # 1 s: more than the whole prefix saves
    assert planner.plan(64, chain(very_slow, FAST, FAST, FAST)).load_tokens == 0


def test_the_plan_stops_where_the_saving_is_largest():
    planner = Planner(1000)
    middling = TierCost("files", BLOCK / 0.030)  # 30 ms for 16 ms of compute
    plan = planner.plan(48, chain(FAST, FAST, middling))
    # Loading all 48 tokens still beats recomputing them (30 ms < 48 ms), but 32 saves more.
    assert plan.load_tokens == 32
    assert plan.sources == {"host": 32}


def test_a_zero_bandwidth_tier_costs_forever():
    assert TierCost("x", 0.0).seconds(1) == math.inf
    assert TierCost("x", 2.0).seconds(4) == 2.0
    dead = TierCost("dead", 0.0)
    assert Planner().plan(48, chain(FAST, dead, FAST)).load_tokens == 16
    assert Planner(1000).plan(32, chain(dead, FAST)).load_tokens == 0


def test_unknown_throughput_never_loads_from_a_zero_bandwidth_tier():
    plan = Planner().plan(32, chain(TierCost("dead", 0.0), FAST))
    assert plan.load_tokens == 0
    assert math.isfinite(plan.load_seconds)


@pytest.mark.parametrize("num_tokens, seconds", [(64, 1e-320), (10**400, 1.0), (64, float("inf"))])
def test_a_prefill_rate_that_is_not_finite_is_a_value_error_and_changes_nothing(num_tokens, seconds):
    """One sample of 64 tokens in 1e-320 s made the running average infinite for ever: nothing was loaded
    again. 10**400 tokens raised OverflowError."""
    planner = Planner()
    planner.record_prefill(1000, 0.5)
    with pytest.raises(ValueError, match="finite"):
        planner.record_prefill(num_tokens, seconds)
    assert planner.prefill_tokens_per_second == 2000


def test_record_prefill_moves_the_estimate():
    planner = Planner()
    planner.record_prefill(1000, 0.5)
    assert planner.prefill_tokens_per_second == 2000.0  # the first sample is taken as it is
    planner.record_prefill(1000, 0.25)
    assert planner.prefill_tokens_per_second == pytest.approx((1 - ALPHA) * 2000 + ALPHA * 4000)
    before = planner.prefill_tokens_per_second
    planner.record_prefill(0, 1.0)  # no evidence either way
    planner.record_prefill(100, 0)
    assert planner.prefill_tokens_per_second == before
    assert planner.snapshot()["prefill_tokens_per_second"] == round(before, 1)


def test_a_configured_throughput_wins_over_measurements():
    planner = Planner(500)
    planner.record_prefill(1000, 0.1)
    assert planner.prefill_tokens_per_second == 500.0


def test_a_measured_throughput_changes_the_plan():
    planner = Planner()
    blocks = chain(SLOW, SLOW)
    assert planner.plan(32, blocks).load_tokens == 32  # unknown throughput: load what is stored
    planner.record_prefill(16_000, 1.0)
    assert planner.plan(32, blocks).load_tokens == 0


def test_record_load_accumulates_the_savings():
    planner = Planner(2000)
    planner.record_load(100, 0.01)
    planner.record_load(60, 0.02)
    snap = planner.snapshot()
    assert snap["prefill_tokens_saved"] == 160
    assert snap["compute_seconds_saved"] == pytest.approx(160 / 2000)
    assert snap["load_seconds"] == pytest.approx(0.03)
    assert snap["prefill_tokens_per_second"] == 2000.0


def test_record_load_counts_seconds_saved_at_the_throughput_known_then():
    planner = Planner()
    planner.record_load(50, 0.1)  # throughput unknown: tokens count, seconds cannot be estimated
    planner.record_prefill(1000, 1.0)
    planner.record_load(20, 0.1)
    snap = planner.snapshot()
    assert (snap["prefill_tokens_saved"], snap["compute_seconds_saved"]) == (70, pytest.approx(0.02))


def test_snapshot_counts_plans_and_skipped_tokens():
    planner = Planner(1e6)
    planner.plan(40, chain(SLOW, SLOW, tail=8))
    planner.plan(40, chain(FAST, FAST, tail=8))
    planner.plan(40, [])
    assert planner.snapshot() == {"prefill_tokens_saved": 0, "compute_seconds_saved": 0.0, "load_seconds": 0.0,
                                  "prefill_tokens_per_second": 1e6, "plans": 3, "plan_skipped_tokens": 40}


@pytest.mark.parametrize("value", [-1, -0.5, math.nan, True, "fast", None])
def test_planner_rejects_a_bad_throughput(value):
    with pytest.raises(ValueError, match=rf"^prefill_tokens_per_second: expected a number >= 0, got {value!r}$"):
        Planner(value)


@pytest.mark.parametrize("num_tokens,seconds,name", [
    (-1, 1.0, "num_tokens"), (1.5, 1.0, "num_tokens"), (True, 1.0, "num_tokens"), ("10", 1.0, "num_tokens"),
    (10, -1.0, "seconds"), (10, math.nan, "seconds"), (10, "1", "seconds"), (10, False, "seconds"),
])
def test_record_prefill_rejects_bad_values(num_tokens, seconds, name):
    planner = Planner()
    value = num_tokens if name == "num_tokens" else seconds
    with pytest.raises(ValueError, match=rf"^{name}: expected .*, got {value!r}$"):
        planner.record_prefill(num_tokens, seconds)
    assert planner.prefill_tokens_per_second == 0.0


def test_tier_bandwidth_measured_else_priors():
    lmdb = MEDIUM_PRIORS["lmdb"]
    assert tier_bandwidth(lmdb, 123.0) == 123.0
    assert tier_bandwidth(lmdb, 123.0, 1.0) == 123.0  # a measured read already includes decoding
    for prior in MEDIUM_PRIORS.values():
        assert tier_bandwidth(prior, 0.0) == pytest.approx(prior, rel=1e-12)
    assert tier_bandwidth(lmdb, 0.0, 2e9) == pytest.approx(1e9)  # medium and decode in series


# -- the store's plans ---------------------------------------------------------------------------------

THROUGHPUT = 200.0  # tokens/s: a 16-token block recomputes in 80 ms
SLOW_READ = 0.1  # seconds each read of the slow tier sleeps: always slower than recomputing the block


@pytest.fixture
def disk_store(tmp_path, layout):
    """``disk_store(delay, **config)`` -> (store, tier): the only tier is FaultyTier(LmdbTier) with read ``delay``."""
    made = []

    def factory(delay: float = 0.0, **config):
        path = tmp_path / f"disk{len(made)}"
        tier = FaultyTier(LmdbTier(path, 4 << 20, layout, sync=False))
        tier.delay = delay
        settings = dict(host_bytes=0, disk_dir=str(path), disk_sync=False, slow_factor=1e9)
        settings.update(config)
        store = KVStore(layout, StoreConfig(**settings), tiers=[tier])
        made.append(store)
        return store, tier

    yield factory
    for store in made:
        store.close()


def warm(store: KVStore, kv_for) -> None:
    """One read of a one-block prompt: the tier's bandwidth estimate is then that read's."""
    tokens = make_tokens(16, seed=99)
    store.put(tokens, kv_for(16, seed=99))
    assert store.get(tokens).shape[2] == 16
    assert store.stats()["tiers"]["lmdb"]["read_bandwidth"] > 0


def test_the_planner_recomputes_when_the_only_copy_is_on_a_slow_tier(disk_store, kv_for):
    store, tier = disk_store(SLOW_READ, prefill_tokens_per_second=THROUGHPUT)
    tokens, kv = make_tokens(40), kv_for(40)
    store.put(tokens, kv)

    before = store.plan(tokens)  # no read measured yet: the lmdb prior (2 GB/s) says load
    assert (before.load_tokens, before.sources) == (40, {"lmdb": 40})
    assert before.load_seconds == pytest.approx(40 * 256 / MEDIUM_PRIORS["lmdb"])

    warm(store, kv_for)
    assert store.stats()["tiers"]["lmdb"]["read_bandwidth"] <= BLOCK / SLOW_READ
    plan = store.plan(tokens)
    assert (plan.found, plan.load_tokens, plan.skipped_tokens, plan.compute_tokens) == (40, 0, 40, 40)
    assert plan.sources == {}

    reads = tier.reads
    out = store.load(tokens)
    assert out.shape == (2, 2, 0, 2, 16)  # the engine recomputes all 40 tokens
    assert tier.reads == reads  # and nothing was read
    stats = store.stats()["store"]
    assert (stats["prefill_tokens_saved"], stats["compute_seconds_saved"]) == (0, 0.0)
    assert (stats["plans"], stats["plan_skipped_tokens"]) == (3, 80)  # before, plan, and the one load made
    assert stats["prefill_tokens_per_second"] == THROUGHPUT
    assert store.lookup(tokens) == 40  # still stored: recomputing is a choice, not a miss


def test_the_same_prefix_on_a_fast_tier_is_loaded(disk_store, kv_for):
    store, tier = disk_store(0.0, prefill_tokens_per_second=THROUGHPUT)
    tokens, kv = make_tokens(40), kv_for(40)
    store.put(tokens, kv)
    warm(store, kv_for)

    plan = store.plan(tokens)
    assert (plan.found, plan.load_tokens, plan.sources) == (40, 40, {"lmdb": 40})
    assert plan.recompute_seconds == pytest.approx(40 / THROUGHPUT)
    assert_same_kv(store.load(tokens, plan=plan), kv)
    assert_same_kv(store.load(tokens), kv)

    stats = store.stats()["store"]
    assert stats["prefill_tokens_saved"] == 80
    assert stats["compute_seconds_saved"] == pytest.approx(80 / THROUGHPUT)
    assert stats["load_seconds"] > 0
    assert (stats["plans"], stats["plan_skipped_tokens"]) == (2, 0)


def test_record_prefill_teaches_the_store_to_recompute(disk_store, kv_for):
    store, _ = disk_store(SLOW_READ)  # prefill throughput unknown
    tokens, kv = make_tokens(40), kv_for(40)
    store.put(tokens, kv)
    warm(store, kv_for)
    assert store.plan(tokens).load_tokens == 40  # no evidence that recomputing is faster

    store.record_prefill(400, 2.0)  # 200 tokens/s measured by the engine
    assert store.stats()["store"]["prefill_tokens_per_second"] == THROUGHPUT
    assert store.plan(tokens).load_tokens == 0
    with pytest.raises(ValueError, match=r"^num_tokens: expected an int >= 0, got -5$"):
        store.record_prefill(-5, 1.0)


def test_a_mixed_store_chain_loads_the_host_prefix_only(tmp_path, layout, kv_for):
    disk = FaultyTier(LmdbTier(tmp_path / "disk", 4 << 20, layout, sync=False))
    disk.delay = SLOW_READ
    config = StoreConfig(host_bytes=64 * layout.block_bytes, disk_dir=str(tmp_path / "disk"), disk_sync=False,
                         slow_factor=1e9, promote=False, prefill_tokens_per_second=THROUGHPUT)
    with KVStore(layout, config, tiers=[HostTier(layout, 64 * layout.block_bytes), disk]) as store:
        tokens, kv = make_tokens(40), kv_for(40)
        other = make_tokens(16, seed=99)
        store.put(tokens, kv)
        store.put(other, kv_for(16, seed=99))
        assert store.flush(10.0)
        for ref in store.block_keys(tokens)[1:] + store.block_keys(other):
            assert store.host.delete(ref.key)
        assert store.get(other).shape[2] == 16  # one slow disk read (not promoted: promote=False)

        plan = store.plan(tokens)
        assert (plan.found, plan.load_tokens, plan.skipped_tokens) == (40, 16, 24)
        assert plan.sources == {"host": 16}
        reads = disk.reads
        assert_same_kv(store.load(tokens), kv[:, :, :16])
        assert disk.reads == reads
        assert store.stats()["store"]["prefill_tokens_saved"] == 16


def test_the_codec_decode_speed_enters_the_prior(make_store, kv_for):
    store = make_store("disk", disk_codec="zstd")
    tokens = make_tokens(32)
    store.put(tokens, kv_for(32))
    plan = store.plan(tokens)
    decode = get_codec("zstd").decode_bytes_per_second
    assert math.isfinite(decode)
    assert plan.load_seconds == pytest.approx(2 * BLOCK / tier_bandwidth(MEDIUM_PRIORS["lmdb"], 0.0, decode))
    assert plan.load_seconds > 2 * BLOCK / MEDIUM_PRIORS["lmdb"]


def test_load_rejects_a_plan_of_other_tokens(make_store, kv_for):
    store = make_store("host")
    tokens = make_tokens(40)
    store.put(tokens, kv_for(40))
    with pytest.raises(ValueError, match=r"^plan: expected a plan of these 40 tokens, got 32$"):
        store.load(tokens, plan=store.plan(tokens[:32]))


# -- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1, -0.001, math.nan, True, "1e6", None])
def test_config_rejects_a_bad_prefill_throughput(value):
    with pytest.raises(ValueError, match=rf"^prefill_tokens_per_second: expected a finite number >= 0.0, got {value!r}$"):
        StoreConfig(prefill_tokens_per_second=value)


def test_config_prefill_throughput():
    assert StoreConfig().prefill_tokens_per_second == 0.0
    config = StoreConfig(prefill_tokens_per_second=5000)
    assert config.prefill_tokens_per_second == 5000.0 and isinstance(config.prefill_tokens_per_second, float)
    env = StoreConfig.load(environ={"KVSTORE_PREFILL_TOKENS_PER_SECOND": "2.5e4"})
    assert env.prefill_tokens_per_second == 25_000.0
