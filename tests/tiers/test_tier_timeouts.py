"""A hung shared tier (Redis, the cache server) fails fast and trips the store's breaker, instead of stalling every put.

Each test stops a real server with SIGSTOP: the process is alive and the
kernel still accepts connections, but nothing answers, so every call can only
time out. A tier call then raises (a timeout or connection error) after one
``timeout_seconds``, not one per block and not once per redis-py retry; a
``KVStore`` counts that failure, marks the tier degraded and bypasses it, so
the puts that follow never reach the stopped server. Counts, not wall-clock
figures, prove it: the tier's ``timeouts``, the store's ``bypassed``, and the
connections the stopped server received.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager

import pytest
import torch

from conftest import make_kv, make_tokens, tiny_layout
import redisfixtures
from redisfixtures import redis
from kvstore.config import StoreConfig
from kvstore.store import KVStore
from kvstore.tiers.redis import RedisTier
from kvstore.tiers.remote import RemoteTier
from server.conftest import TOKEN, ServerProcess

redis_server, fresh_cluster = redisfixtures.redis_server, redisfixtures.fresh_cluster

TIMEOUT = 0.3  # each tier's timeout_seconds here
BLOCKS = 12
# A call that waited once per block (12 x 0.3 s) or retried is far above this; one timeout is far below.
ABOUT_ONE_TIMEOUT = 4 * TIMEOUT


@contextmanager
def stopped(pid: int):
    """The process ``pid`` stopped (SIGSTOP) inside the block, continued (SIGCONT) after it, whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def connections_received(server) -> int:
    """The connections a redis-server accepted so far, this query's own included."""
    with server.client() as client:
        return int(client.info("stats")["total_connections_received"])


def blocks_of(layout, n: int, seed: int) -> list[tuple[bytes, torch.Tensor]]:
    return [(bytes([seed, i + 1]) * 16, make_kv(layout, 16, seed=100 * seed + i)) for i in range(n)]


def outs(layout, n: int) -> list[torch.Tensor]:
    return [torch.zeros(layout.shape(16), dtype=layout.dtype) for _ in range(n)]


def data_calls(tier, layout) -> dict:
    """Every call the store makes on the data path, each on ``BLOCKS`` blocks where it takes several."""
    blocks = blocks_of(layout, BLOCKS, seed=9)
    keys = [k for k, _ in blocks]
    return {
        "contains": lambda: tier.contains(keys[0]),
        "prefix_length": lambda: tier.prefix_length(keys),
        "put_many": lambda: tier.put_many(blocks),
        "get_into": lambda: tier.get_into(keys[0], outs(layout, 1)[0]),
        "get_many_into": lambda: tier.get_many_into(keys, outs(layout, BLOCKS)),
    }


def assert_fails_fast(name: str, call, error) -> None:
    start = time.monotonic()
    with pytest.raises(error):
        call()
    elapsed = time.monotonic() - start
    assert elapsed < ABOUT_ONE_TIMEOUT, f"{name} took {elapsed:.2f} s: not one timeout of {TIMEOUT} s"


# -- Redis -----------------------------------------------------------------------------------------------


def test_a_hung_redis_fails_each_call_after_one_timeout_with_one_attempt(redis_server, layout):
    seeded = RedisTier(redis_server.url, layout)
    assert seeded.put_many(blocks_of(layout, BLOCKS, seed=9)) == BLOCKS  # hits to wait for, had it answered
    seeded.close()
    before = connections_received(redis_server)
    with stopped(redis_server.process.pid):
        tier = RedisTier(redis_server.url, layout, timeout_seconds=TIMEOUT)  # connects on first use
        calls = data_calls(tier, layout)
        for name, call in calls.items():
            assert_fails_fast(name, call, redis.TimeoutError)
    # Each call's one attempt opened one connection (the one before it was dropped at its timeout); a
    # redis-py retry would have opened a second. The +1 is the query that counts them.
    assert connections_received(redis_server) - before == len(calls) + 1
    stats = tier.stats()
    assert stats["timeouts"] == len(calls)  # one per call
    assert stats["errors"] == 0 and stats["misses"] == 0 and stats["hits"] == 0  # raised, not turned into misses
    # the server is back: the same tier object serves again
    assert tier.get_many_into([k for k, _ in blocks_of(layout, BLOCKS, seed=9)], outs(layout, BLOCKS)) == \
        [True] * BLOCKS
    tier.close()


def test_a_redis_that_is_down_fails_each_call_at_once(redis_server, layout):
    tier = RedisTier(redis_server.url, layout, timeout_seconds=TIMEOUT)
    assert tier.put_many(blocks_of(layout, 2, seed=1)) == 2
    redis_server.stop()
    for name, call in data_calls(tier, layout).items():
        assert_fails_fast(name, call, redis.ConnectionError)
    assert tier.delete(bytes(32)) is False and list(tier.keys()) == []  # bookkeeping calls stay quiet
    assert tier.stats()["errors"] >= 2
    tier.close()


def test_a_miss_and_a_damaged_value_stay_misses(redis_server, layout):
    tier = RedisTier(redis_server.url, layout, timeout_seconds=TIMEOUT, namespace="miss")
    (key, block), (other, _) = blocks_of(layout, 2, seed=3)
    assert tier.put_many([(key, block)]) == 1
    with redis_server.client() as raw:
        raw.set(tier.redis_key(other), b"not a block")
    assert tier.contains(other) and not tier.contains(bytes(32))
    assert tier.prefix_length([key, bytes(32)]) == 1
    assert tier.get_into(bytes(32), outs(layout, 1)[0]) is False
    assert tier.get_many_into([other, key], outs(layout, 2)) == [False, True]
    stats = tier.stats()
    assert (stats["corrupt"], stats["misses"], stats["errors"], stats["timeouts"]) == (1, 2, 0, 0)
    tier.close()


def test_a_hung_cluster_node_fails_a_batch_after_one_timeout(fresh_cluster, layout):
    tier = RedisTier(fresh_cluster.url, layout, timeout_seconds=TIMEOUT)
    blocks = [(i.to_bytes(32, "little"), make_kv(layout, 16, seed=i)) for i in range(30)]
    assert tier.put_many(blocks) == 30
    keys = [k for k, _ in blocks]
    victim = fresh_cluster.nodes[1]
    with victim.client() as raw:
        on_victim = {bytes.fromhex(k.decode().rsplit(":", 1)[1]) for k in raw.scan_iter(match=b"kvstore:*")}
    assert 0 < len(on_victim) < 30
    kept = next(k for k in keys if k not in on_victim)
    with stopped(victim.process.pid):
        # the cluster client's own pipeline would resend each of the node's keys alone, a timeout apiece
        assert_fails_fast("get_many_into", lambda: tier.get_many_into(keys, outs(layout, 30)), redis.TimeoutError)
        assert_fails_fast("prefix_length", lambda: tier.prefix_length(keys), redis.TimeoutError)
        assert tier.get_into(kept, outs(layout, 1)[0])  # a key on a node that answers is served
    assert tier.stats()["timeouts"] == 2
    tier.close()


def test_a_store_stops_calling_a_hung_redis_after_its_first_timeout(redis_server, layout):
    config = StoreConfig(host_bytes=64 * layout.block_bytes, redis_url=redis_server.url,
                         redis_timeout_seconds=TIMEOUT)
    first, second, third = make_tokens(3 * 16, seed=1), make_tokens(3 * 16, seed=2), make_tokens(BLOCKS * 16, seed=3)
    with KVStore(layout, config) as store:
        assert [t.name for t in store.tiers] == ["host", "redis"]
        assert store.put(first, make_kv(layout, len(first), seed=1)) == 3
        assert store.flush(timeout=30)
        healthy = store.stats()["tiers"]["redis"]
        assert healthy["blocks_written"] == 3 and healthy["errors"] == 0 and healthy["state"] == "healthy"
        with stopped(redis_server.process.pid):
            # the first call to redis times out: the store counts it and bypasses the tier from then on
            assert store.put(second, make_kv(layout, len(second), seed=2)) == 3
            assert store.flush(timeout=30)
            assert store.put(third, make_kv(layout, len(third), seed=3)) == BLOCKS
            assert store.flush(timeout=30)
            assert store.lookup(third) == len(third)  # served by host RAM, redis not asked
        stats = store.stats()["tiers"]["redis"]  # read once the server answers again: no timeout of its own
        assert stats["timeouts"] == 1  # one timed-out call in all: not one per block, nor one per put
        assert stats["errors"] >= 1 and stats["state"] == "degraded" and stats["degradations"] == 1
        assert stats["bypassed"] >= 2  # the 12-block put's check and write did not go to redis (a call each)
        assert stats["blocks_written"] == 3  # nothing was written during the hang


# -- the cache server (RemoteTier) -----------------------------------------------------------------------------


@pytest.fixture
def cache_server(tmp_path):
    server = ServerProcess(tmp_path / "srv", "--host-bytes", "16MiB", "--disk-bytes", "0")
    try:
        server.start()
    except BaseException:
        server.kill()  # a start that timed out leaves the process running
        raise
    yield server
    if server.proc is not None and server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)
    server.kill()


def test_a_hung_cache_server_fails_each_call_after_one_timeout(cache_server, layout):
    tier = RemoteTier(cache_server.url, layout, TOKEN, timeout_seconds=TIMEOUT, backoff_seconds=0.01,
                      max_backoff_seconds=0.01)
    try:
        assert tier.put_many(blocks_of(layout, BLOCKS, seed=9)) == BLOCKS
        calls = data_calls(tier, layout)
        with stopped(cache_server.proc.pid):
            for name, call in calls.items():
                time.sleep(0.02)  # past the tier's own back-off: each call tries the server
                assert_fails_fast(name, call, TimeoutError)
            time.sleep(0.02)
            assert tier.delete(bytes(32)) is False  # bookkeeping calls stay quiet (a timeout, counted)
        time.sleep(0.02)  # past the back-off: the server answers again, and the same tier serves
        stats = tier.stats()
        assert stats["timeouts"] == len(calls) + 1 and stats["errors"] == 1  # the delete's
        assert stats["misses"] == 0 and stats["hits"] == 0
        got = tier.get_many_into([k for k, _ in blocks_of(layout, BLOCKS, seed=9)], outs(layout, BLOCKS))
        assert got == [True] * BLOCKS
    finally:
        tier.close()


def test_a_store_stops_calling_a_hung_cache_server_after_its_first_timeout(cache_server):
    layout = tiny_layout()
    config = StoreConfig(host_bytes=64 * layout.block_bytes, remote_url=cache_server.url, remote_token=TOKEN,
                         remote_timeout_seconds=TIMEOUT)
    first, second, third = make_tokens(3 * 16, seed=1), make_tokens(3 * 16, seed=2), make_tokens(BLOCKS * 16, seed=3)
    with KVStore(layout, config) as store:
        assert [t.name for t in store.tiers] == ["host", "remote"]
        assert store.put(first, make_kv(layout, len(first), seed=1)) == 3
        assert store.flush(timeout=30)
        assert store.stats()["tiers"]["remote"]["blocks_written"] == 3
        with stopped(cache_server.proc.pid):
            assert store.put(second, make_kv(layout, len(second), seed=2)) == 3
            assert store.flush(timeout=30)
            assert store.put(third, make_kv(layout, len(third), seed=3)) == BLOCKS
            assert store.flush(timeout=30)
            assert store.lookup(third) == len(third)
        time.sleep(0.1)  # past the tier's own back-off, so that stats() asks the server (it answers again)
        stats = store.stats()["tiers"]["remote"]
        assert stats["timeouts"] == 1  # one timed-out call in all
        assert stats["errors"] >= 1 and stats["state"] == "degraded" and stats["degradations"] == 1
        assert stats["bypassed"] >= 2  # the 12-block put's check and write (a call each)
        assert stats["blocks_written"] == 3
