"""RedisTier on real redis-server processes: standalone, unix socket and a three-node Redis Cluster.

Round trips are exact bytes; damaged values are misses counted ``corrupt``;
a server or cluster node that dies, or stops answering, makes the data
calls raise (one timeout per call, no retries) so that the store's breaker
backs off, while listings and figures stay quiet; in a cluster batch the
nodes still up serve their keys.
"""

from __future__ import annotations

import logging
import signal
import time

import pytest
import torch

from conftest import assert_same_kv, make_kv, make_tokens, tiny_layout
import redisfixtures
from redisfixtures import RedisServer, free_port, redis
from tierkit import A, B, C, D, E, make_blocks, read

from kvstore.blockformat import HEADER_BYTES
from kvstore.compression.registry import get_codec
from kvstore.config import StoreConfig
from kvstore.store import KVStore
from kvstore.tiers.base import TIER_COUNTERS, Tier
from kvstore.tiers.host import HostTier
from kvstore.tiers.redis import RedisTier

# The fixtures starting real servers (pytest finds fixtures by module-level name).
redis_server, shared_redis = redisfixtures.redis_server, redisfixtures.shared_redis
redis_cluster, fresh_cluster = redisfixtures.redis_cluster, redisfixtures.fresh_cluster

# Calls to a dead local server are refused at once; this bounds them with a wide margin.
QUICK_SECONDS = 1.0


@pytest.fixture
def make_tier(request, shared_redis):
    """``make_tier(url=None, lay=None, **options)``: a RedisTier in a namespace of this test, closed at teardown."""
    tiers = []
    namespace = request.node.name.replace(":", "_")

    def factory(url=None, lay=None, **options):
        options.setdefault("namespace", namespace)
        tier = RedisTier(url or shared_redis.url, lay or tiny_layout(), **options)
        tiers.append(tier)
        return tier

    yield factory
    for tier in tiers:
        tier.close()


def counts(tier, *names):
    stats = tier.stats()
    return tuple(stats[name] for name in names)


def out_like(layout, tokens=16):
    return torch.zeros(layout.shape(tokens), dtype=layout.dtype)


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_trip_full_and_tail_blocks(make_tier, dtype):
    lay = tiny_layout(dtype=dtype)
    tier = make_tier(lay=lay)
    assert isinstance(tier, Tier) and tier.name == "redis" and tier.persistent
    full, tail = make_kv(lay, 16, seed=1), make_kv(lay, 5, seed=2)
    assert tier.put_many([(A, full), (B, tail)]) == 2
    assert_same_kv(read(tier, lay, A), full)
    assert_same_kv(read(tier, lay, B, 5), tail)
    strided = torch.zeros(lay.shape(40), dtype=dtype)[:, :, 3:19]  # a view into a bigger buffer
    assert tier.get_into(A, strided) and torch.equal(strided, full)
    wide = make_kv(lay, 40, seed=3)
    assert tier.put_many([(D, wide[:, :, 8:24])]) == 1  # a strided view of a longer sequence
    assert_same_kv(read(tier, lay, D), wide[:, :, 8:24].contiguous())
    assert read(tier, lay, C) is None
    assert read(tier, lay, A, 8) is None  # a block of another size: a miss that keeps the block
    assert tier.contains(A)
    stats = tier.stats()
    assert set(TIER_COUNTERS) | {"errors", "timeouts", "blocks", "used_bytes", "capacity_bytes"} <= set(stats)
    assert (stats["hits"], stats["misses"], stats["corrupt"], stats["errors"]) == (4, 2, 0, 0)
    assert stats["blocks_written"] == 3 and stats["bytes_written"] == 2 * 4096 + 5 * 256
    assert stats["bytes_read"] == 3 * 4096 + 5 * 256
    assert stats["blocks"] >= 3 and stats["used_bytes"] > 0
    assert sorted(tier.keys()) == [A, B, D]


def test_value_is_header_then_payload_under_a_namespaced_key(make_tier, shared_redis, layout):
    tier = make_tier(namespace="tenant1", key_prefix="kv")
    block = make_kv(layout, 16)
    tier.put_many([(A, block)])
    name = f"kv:tenant1:{layout.fingerprint.hex()}:{A.hex()}".encode()
    assert tier.redis_key(A) == name
    with shared_redis.client() as raw:
        value = raw.get(name)
        assert raw.pttl(name) == -1  # no ttl: no expiry
    assert len(value) == HEADER_BYTES + 4096
    assert value[:4] == b"KVSB" and value[HEADER_BYTES:] == block.view(torch.uint8).numpy().tobytes()


def test_batch_put_get_and_prefix_length(make_tier, layout):
    tier = make_tier()
    blocks = make_blocks(layout)
    assert tier.put_many([(k, blocks[k]) for k in (A, B, C)]) == 3
    assert tier.put_many([(A, blocks[A]), (D, blocks[D]), (D, blocks[D])]) == 3  # present ones count
    assert counts(tier, "blocks_written", "rejected") == (4, 0)
    outs = [out_like(layout) for _ in range(5)]
    assert tier.get_many_into([A, B, E, C, D], outs) == [True, True, False, True, True]
    for key, out in zip((A, B, None, C, D), outs):
        if key is not None:
            assert_same_kv(out, blocks[key])
    assert tier.get_many_into([], []) == [] and tier.put_many([]) == 0
    assert tier.prefix_length([A, B, C, D, E]) == 4
    assert tier.prefix_length([A, E, B]) == 1
    assert tier.prefix_length([E, A]) == 0 and tier.prefix_length([]) == 0
    assert tier.delete(B) is True and tier.delete(B) is False
    assert tier.prefix_length([A, B, C]) == 1
    assert sorted(tier.keys()) == [A, C, D]
    assert counts(tier, "hits", "misses", "errors") == (4, 1, 0)


def test_namespaces_and_layouts_isolated(make_tier, layout):
    one, two = make_tier(namespace="one"), make_tier(namespace="two")
    other_layout = tiny_layout(num_kv_heads=4, head_dim=8)  # same block bytes, another fingerprint
    three = make_tier(namespace="one", lay=other_layout)
    one.put_many([(A, make_kv(layout, 16, seed=1))])
    two.put_many([(A, make_kv(layout, 16, seed=2))])
    assert_same_kv(read(one, layout, A), make_kv(layout, 16, seed=1))
    assert_same_kv(read(two, layout, A), make_kv(layout, 16, seed=2))
    assert not three.contains(A) and read(three, other_layout, A) is None
    assert list(three.keys()) == [] and list(one.keys()) == [A]
    two.delete(A)
    assert one.contains(A) and not two.contains(A)
    assert counts(one, "corrupt") == counts(two, "corrupt") == counts(three, "corrupt") == (0,)


def test_ttl_expiry(make_tier, layout, shared_redis):
    tier = make_tier(ttl_seconds=0.3)
    block = make_kv(layout, 16)
    assert tier.put_many([(A, block)]) == 1
    with shared_redis.client() as raw:
        assert 0 < raw.pttl(tier.redis_key(A)) <= 300
    assert_same_kv(read(tier, layout, A), block)
    time.sleep(0.45)
    assert not tier.contains(A)
    assert read(tier, layout, A) is None
    assert counts(tier, "hits", "misses", "corrupt") == (1, 1, 0)


def _flip(value: bytes, at: int) -> bytes:
    data = bytearray(value)
    data[at] ^= 0x01
    return bytes(data)


DAMAGE = {
    "payload-bit": lambda value, other: _flip(value, HEADER_BYTES + 2000),
    "checksum": lambda value, other: _flip(value, HEADER_BYTES - 1),
    "layout": lambda value, other: _flip(value, 4 + 2 + 2 + 3),
    "magic": lambda value, other: _flip(value, 0),
    "encoding": lambda value, other: _flip(value, 4 + 2 + 1),  # raw read as a frame: the seeded checksum fails
    "truncated": lambda value, other: value[:-100],
    "header-only": lambda value, other: value[:HEADER_BYTES],
    "empty": lambda value, other: b"",
    "other-key": lambda value, other: other,  # a sound block, stored under the wrong key
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_value_is_a_miss_counted_corrupt(make_tier, layout, shared_redis, damage):
    tier = make_tier()
    blocks = make_blocks(layout)
    tier.put_many([(A, blocks[A]), (B, blocks[B])])
    with shared_redis.client() as raw:
        value, other = raw.get(tier.redis_key(A)), raw.get(tier.redis_key(B))
        raw.set(tier.redis_key(A), DAMAGE[damage](value, other))
        assert read(tier, layout, A) is None
        assert counts(tier, "corrupt", "misses", "hits", "errors") == (1, 1, 0, 0)
        assert raw.exists(tier.redis_key(A)) == 0  # deleted
    assert tier.put_many([(A, blocks[A])]) == 1  # stored again
    assert_same_kv(read(tier, layout, A), blocks[A])


class _WriteAfterRead:
    """The tier's real client, but another client writes ``value`` under ``rkey`` right after each read (a
    pipeline with a GETRANGE): another process storing the block between this reader's read and what it
    does about it."""

    def __init__(self, client, other, rkey, value):
        self._client, self._other, self._rkey, self._value = client, other, rkey, value

    def __getattr__(self, name):
        return getattr(self._client, name)

    def pipeline(self, *args, **kwargs):
        return _WriteAfterReadPipeline(self._client.pipeline(*args, **kwargs), self)


class _WriteAfterReadPipeline:
    """A real pipeline whose ``execute`` is followed by the other process's write if it read."""

    def __init__(self, pipe, owner):
        self._pipe, self._owner, self._read = pipe, owner, False

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __enter__(self):
        self._pipe.__enter__()
        return self

    def __exit__(self, *exc):
        return self._pipe.__exit__(*exc)

    def getrange(self, *args):
        self._read = True
        return self._pipe.getrange(*args)

    def execute(self, *args, **kwargs):
        replies = self._pipe.execute(*args, **kwargs)
        if self._read:
            self._owner._other.set(self._owner._rkey, self._owner._value)
        return replies


@pytest.mark.parametrize("before", ["absent", "empty", "damaged"])
def test_a_block_stored_by_another_process_after_the_read_is_kept(make_tier, layout, shared_redis, before):
    """The reader saw no block (or a damaged one), then another process stored a good one: the reader's
    clean-up must not delete the good block. An empty read was checked with a separate EXISTS and any
    damaged one deleted outright, so the other process's block was deleted and counted corrupt."""
    tier = make_tier()
    block = make_blocks(layout)[A]
    tier.put_many([(A, block)])
    rkey = tier.redis_key(A)
    with shared_redis.client() as raw:
        good = raw.get(rkey)
        if before == "absent":
            raw.delete(rkey)
        else:
            raw.set(rkey, b"" if before == "empty" else good[:-1] + bytes([good[-1] ^ 1]))
        tier._client_obj = _WriteAfterRead(tier._client(), raw, rkey, good)
        assert read(tier, layout, A) is None  # what the read saw: a miss
        assert raw.get(rkey) == good  # the other process's block is still there
        # An empty read is told from an absent key only by the clean-up, which found a block: not corrupt.
        assert counts(tier, "corrupt") == ((1,) if before == "damaged" else (0,))
        tier._client_obj = tier._client_obj._client
    assert_same_kv(read(tier, layout, A), block)


def test_a_user_without_scripting_still_clears_a_damaged_block(make_tier, layout, shared_redis):
    """The compare-and-delete is a script: an ACL user without ``@scripting`` left the damaged value in place,
    so SET NX kept finding it and the block stayed a miss for good. Without scripts it is a plain DEL."""
    with shared_redis.client() as raw:
        raw.execute_command("ACL", "SETUSER", "kvstore-noeval", "on", ">noeval-pass-1", "~*", "+@all", "-@scripting")
    try:
        url = shared_redis.url.replace("redis://", "redis://kvstore-noeval:noeval-pass-1@", 1)
        tier = make_tier(url=url)
        block = make_blocks(layout)[A]
        tier.put_many([(A, block)])
        with shared_redis.client() as raw:
            good = raw.get(tier.redis_key(A))
            raw.set(tier.redis_key(A), good[:-1] + bytes([good[-1] ^ 1]))
            assert read(tier, layout, A) is None
            assert raw.exists(tier.redis_key(A)) == 0  # deleted
        assert tier.put_many([(A, block)]) == 1
        assert_same_kv(read(tier, layout, A), block)
        assert counts(tier, "corrupt", "errors") == (1, 0)
    finally:
        with shared_redis.client() as raw:
            raw.execute_command("ACL", "DELUSER", "kvstore-noeval")


@pytest.mark.parametrize("many", [False, True])
def test_a_value_far_larger_than_a_block_is_a_corrupt_miss_read_only_in_part(make_tier, layout, shared_redis, many):
    """64 MiB under a 4 KiB block's key (another writer's): the read asks for one byte past the largest a
    block can be, so the server sends a few KiB, not the value."""
    tier = make_tier()
    blocks = make_blocks(layout)
    tier.put_many([(B, blocks[B])])
    with shared_redis.client() as raw:
        raw.set(tier.redis_key(A), bytes(64 << 20))
        sent = raw.info("stats")["total_net_output_bytes"]
        if many:
            outs = [out_like(layout), out_like(layout)]
            assert tier.get_many_into([B, A], outs) == [True, False]
            assert_same_kv(outs[0], blocks[B])
        else:
            assert read(tier, layout, A) is None
        assert raw.info("stats")["total_net_output_bytes"] - sent < 1 << 20
        assert counts(tier, "corrupt", "errors") == (1, 0)
        assert raw.exists(tier.redis_key(A)) == 0  # deleted


def test_an_acl_that_refuses_writes_is_the_tiers_failure_raised_and_seen(make_tier, layout, shared_redis):
    """A read-only user: every SET is refused. It was counted in ``errors`` alone: a store showed the tier
    healthy, logged nothing, and lost every write."""
    with shared_redis.client() as raw:
        raw.execute_command("ACL", "SETUSER", "kvstore-ro", "on", ">ro-pass-1", "~*", "+@read", "+ping", "+info",
                            "+hello", "+dbsize")
    try:
        url = shared_redis.url.replace("redis://", "redis://kvstore-ro:ro-pass-1@", 1)
        tier = make_tier(url=url)
        with pytest.raises(Exception, match="(?i)permission|NOPERM"):
            tier.put_many([(A, make_blocks(layout)[A])])
        tokens = make_tokens(16)
        with KVStore(layout, StoreConfig(model_id="m", host_bytes=0, redis_url=url)) as store:
            assert store.put(tokens, make_kv(layout, 16)) == 0
            redis_stats = store.stats()["tiers"]["redis"]
            assert redis_stats["errors"] >= 1 and redis_stats["last_error"] and "ermission" in redis_stats["last_error"]
            assert store.lookup(tokens) == 0
    finally:
        with shared_redis.client() as raw:
            raw.execute_command("ACL", "DELUSER", "kvstore-ro")


def test_settings_the_server_refuses_are_logged_as_errors_naming_the_fix(make_tier, layout, shared_redis,
                                                                         redis_cluster, caplog):
    """A wrong password, or redis:// given a cluster node, were logged as an outage and retried for ever."""
    cases = [(shared_redis.url.replace("redis://", "redis://nobody:wrong-pass@", 1),
              "the server refused redis_url's credentials"),
             ("redis://" + redis_cluster.url.split("://", 1)[1].split(",")[0],
              "the server is a Redis Cluster node (it redirected a key to another node): set redis_url to "
              "redis+cluster://")]
    for url, fix in cases:
        tier = make_tier(url=url)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kvstore.tiers.redis"):
            for _ in range(2):
                with pytest.raises(Exception):  # noqa: B017 -- the tier's failure, whatever redis-py calls it
                    tier.put_many([(key, make_kv(layout, 16)) for key in _keys(16)])  # some slot is elsewhere
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and fix in errors[0], [r.getMessage() for r in caplog.records]
        tier.close()


def test_value_of_another_type_is_corrupt(make_tier, layout, shared_redis):
    tier = make_tier()
    with shared_redis.client() as raw:
        raw.hset(tier.redis_key(A), "field", "value")
    assert read(tier, layout, A) is None
    assert counts(tier, "corrupt", "errors") == (1, 0)
    assert not tier.contains(A)


def test_codecs(make_tier, layout):
    zstd = make_tier(codec=get_codec("zstd"))
    block = make_kv(layout, 16)
    tail = make_kv(layout, 3, seed=4)
    assert zstd.put_many([(A, block), (B, tail)]) == 2
    assert_same_kv(read(zstd, layout, A), block)
    assert_same_kv(read(zstd, layout, B, 3), tail)
    raw = make_tier()  # same namespace, no codec: lossless frames are still read
    assert_same_kv(read(raw, layout, A), block)

    int8 = make_tier(namespace="int8", codec=get_codec("int8"))
    assert int8.put_many([(A, block)]) == 1
    assert counts(int8, "bytes_written")[0] < 4096
    got = read(int8, layout, A)
    assert got is not None and torch.allclose(got.float(), block.float(), atol=0.05, rtol=0.05)
    assert not torch.equal(got, block)
    plain = make_tier(namespace="int8")  # a lossy frame is never met by a tier without that codec
    assert not plain.contains(A) and read(plain, layout, A) is None
    assert counts(plain, "stale", "corrupt") == (0, 0)
    assert plain.put_many([(A, block)]) == 1  # stored exact beside it: each store keeps its own form
    assert_same_kv(read(plain, layout, A), block)
    assert int8.contains(A) and not torch.equal(read(int8, layout, A), block)
    assert not make_tier(namespace="int8", codec=get_codec("kivi4")).contains(A)  # nor by another lossy codec


def test_capacity(make_tier, redis_server, layout, caplog):
    small = make_tier(capacity_bytes=4096 + HEADER_BYTES - 1)
    assert small.capacity_bytes == 4096 + HEADER_BYTES - 1
    assert small.put_many([(A, make_kv(layout, 16)), (B, make_kv(layout, 15))]) == 1
    assert counts(small, "rejected", "blocks_written") == (1, 1)
    with redis_server.client() as raw:
        raw.config_set("maxmemory", 1)  # below what the server already uses: every write is refused
        raw.config_set("maxmemory-policy", "noeviction")
        tier = make_tier(url=redis_server.url)
        assert tier.capacity_bytes == 1
        with caplog.at_level(logging.WARNING, logger="kvstore.tiers.redis"):
            assert tier.put_many([(A, make_kv(layout, 16))]) == 0
            assert tier.put_many([(B, make_kv(layout, 16))]) == 0
        assert counts(tier, "rejected", "errors") == (2, 0)
        # counted alone, a tier refused every write while it read healthy, and nothing said so
        refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert refusals == ["redis tier: the server refused 1 block: out of memory (OOM) at its maxmemory, with "
                            "nothing it may evict: set maxmemory-policy to allkeys-lru (or a volatile-* policy with "
                            "redis_ttl_seconds set), or give it more maxmemory"]  # once in a while, not per write
        raw.config_set("maxmemory", 0)
    assert tier.put_many([(A, make_kv(layout, 16))]) == 1


def test_unix_socket(tmp_path, layout):
    server = RedisServer(tmp_path / "unix", None, "--unixsocket", str(tmp_path / "redis.sock"),
                         "--unixsocketperm", "700").start()
    try:
        tier = RedisTier(f"unix://{tmp_path / 'redis.sock'}?db=2", layout)
        block = make_kv(layout, 16)
        assert tier.put_many([(A, block)]) == 1
        assert_same_kv(read(tier, layout, A), block)
        tier.close()
        with server.client() as raw:
            raw.select(2)
            assert raw.dbsize() == 1
    finally:
        server.stop()


# -- cluster -------------------------------------------------------------------------------------


def _keys(n):
    return [i.to_bytes(32, "little") for i in range(n)]


def test_cluster_round_trip(redis_cluster, layout):
    tier = RedisTier(redis_cluster.url, layout, namespace="spread")
    keys = _keys(48)
    blocks = [make_kv(layout, 16 if i % 5 else 1 + i % 16, seed=i) for i in range(48)]
    assert tier.put_many(list(zip(keys, blocks))) == 48
    per_node = []
    for node in redis_cluster.nodes:
        with node.client() as raw:
            per_node.append(sum(1 for _ in raw.scan_iter(match=b"kvstore:spread:*")))
    assert sum(per_node) == 48 and sum(n > 0 for n in per_node) == 3, per_node
    outs = [torch.empty(layout.shape(b.shape[2]), dtype=layout.dtype) for b in blocks]
    assert tier.get_many_into(keys, outs) == [True] * 48
    for out, block in zip(outs, blocks):
        assert_same_kv(out, block)
    assert_same_kv(read(tier, layout, keys[7]), blocks[7])
    assert tier.prefix_length(keys) == 48 and tier.prefix_length(keys[:3] + [A] + keys[3:]) == 3
    assert sorted(tier.keys()) == sorted(keys)
    stats = tier.stats()
    assert stats["blocks"] >= 48 and stats["used_bytes"] > 0 and stats["errors"] == 0
    assert tier.delete(keys[0]) and not tier.contains(keys[0])
    tier.close()
    tier.close()


def test_cluster_node_killed_degrades_to_misses(fresh_cluster, layout):
    tier = RedisTier(fresh_cluster.url, layout)
    keys = _keys(30)
    blocks = [make_kv(layout, 16, seed=i) for i in range(30)]
    assert tier.put_many(list(zip(keys, blocks))) == 30
    victim = fresh_cluster.nodes[1]
    with victim.client() as raw:
        on_victim = {bytes.fromhex(k.decode().rsplit(":", 1)[1]) for k in raw.scan_iter(match=b"kvstore:*")}
    assert 0 < len(on_victim) < 30
    victim.stop()

    start = time.monotonic()
    outs = [out_like(layout) for _ in keys]
    found = tier.get_many_into(keys, outs)
    assert found == [k not in on_victim for k in keys]  # the nodes still up are served
    for key, out, block in zip(keys, outs, blocks):
        if key not in on_victim:
            assert_same_kv(out, block)
    lost = next(k for k in keys if k in on_victim)
    kept = next(k for k in keys if k not in on_victim)
    # One key, on the dead node while the others answer: a miss, not a failure of the whole tier (it was
    # raised, and a store's breaker then bypassed the two live masters too).
    assert read(tier, layout, lost) is None
    assert not tier.contains(lost)
    assert tier.put_many([(lost, blocks[keys.index(lost)])]) == 0
    assert not tier.delete(lost)  # delete never raises
    assert_same_kv(read(tier, layout, kept), blocks[keys.index(kept)])
    assert tier.prefix_length(keys) == keys.index(lost)
    more = [(bytes([i]) * 32, make_kv(layout, 16, seed=100 + i)) for i in range(1, 13)]
    stored = tier.put_many(more)
    assert 0 < stored < len(more)
    assert set(tier.keys()) >= {k for k in keys if k not in on_victim}
    stats = tier.stats()
    assert time.monotonic() - start < 5 * QUICK_SECONDS
    assert stats["errors"] >= 5 and stats["corrupt"] == 0
    for node in fresh_cluster.nodes:  # no primary answers: now the tier has failed, and says so
        node.stop()
    with pytest.raises(redis.ConnectionError):
        read(tier, layout, kept)
    with pytest.raises(redis.ConnectionError):
        tier.contains(kept)
    tier.close()


def test_store_keeps_serving_the_live_masters_when_one_is_killed(fresh_cluster, layout):
    """An engine's loop (lookup, get, save new prompts) after one of three masters dies: the prompts held
    wholly by the other two are served in full, and the tier stays healthy. Before, each call touching the
    dead node raised, and the breaker bypassed the whole cluster: 256 of 272,832 tokens were served."""
    config = StoreConfig(model_id="m", host_bytes=0, redis_url=fresh_cluster.url, redis_timeout_seconds=0.5,
                         degraded_seconds=1.0)
    prompts = [(make_tokens(32, seed=s), make_kv(layout, 32, seed=s)) for s in range(40)]
    victim = fresh_cluster.nodes[1]
    with KVStore(layout, config) as store:
        for tokens, kv in prompts:
            assert store.put(tokens, kv) == 2  # blocks
        with victim.client() as raw:
            on_victim = {k.decode().rsplit(":", 1)[1] for k in raw.scan_iter(match=b"kvstore:*")}
        live = [(t, kv) for t, kv in prompts if not {b.key.hex() for b in store.block_keys(t)} & on_victim]
        assert live and len(live) < len(prompts)
        victim.stop()
        for round_ in range(3):
            for i, (tokens, kv) in enumerate(live):
                assert store.lookup(tokens) == 32
                assert_same_kv(store.get(tokens), kv)
                store.put(make_tokens(32, seed=1000 + 100 * round_ + i), make_kv(layout, 32, seed=i))
        redis_stats = store.stats()["tiers"]["redis"]
        assert redis_stats["state"] == "healthy" and redis_stats["errors"] >= 1


# -- failures ------------------------------------------------------------------------------------


def _quick(call):
    start = time.monotonic()
    result = call()
    assert time.monotonic() - start < QUICK_SECONDS, call
    return result


def _quick_failure(call, error=redis.ConnectionError):
    """``call`` raises ``error`` (a failure for the store's breaker, not a miss), and at once."""
    start = time.monotonic()
    with pytest.raises(error):
        call()
    assert time.monotonic() - start < QUICK_SECONDS, call


def test_server_killed_then_restarted(redis_server, layout):
    tier = RedisTier(redis_server.url, layout, timeout_seconds=0.5)
    blocks = make_blocks(layout)
    assert tier.put_many([(A, blocks[A])]) == 1
    assert_same_kv(read(tier, layout, A), blocks[A])
    redis_server.stop()

    # The data calls raise (the store counts the failure and bypasses the tier for a while) ...
    _quick_failure(lambda: read(tier, layout, A))
    _quick_failure(lambda: tier.get_many_into([A, B], [out_like(layout), out_like(layout)]))
    _quick_failure(lambda: tier.contains(A))
    _quick_failure(lambda: tier.prefix_length([A, B]))
    _quick_failure(lambda: tier.put_many([(B, blocks[B])]))
    # ... deletes, listings and figures answer as if the server held nothing, and count it.
    assert _quick(lambda: tier.delete(A)) is False
    assert _quick(lambda: list(tier.keys())) == []
    assert _quick(lambda: tier.used_bytes()) == 0
    stats = _quick(tier.stats)
    assert stats["errors"] >= 4 and stats["hits"] == 1 and stats["misses"] == 0  # raised: the caller's to count
    assert stats["blocks"] == 0 and stats["corrupt"] == 0 and stats["timeouts"] == 0

    redis_server.start()  # same port, empty (no persistence): the same tier object reconnects
    errors = stats["errors"]
    assert read(tier, layout, A) is None
    assert tier.put_many([(A, blocks[A]), (B, blocks[B])]) == 2
    assert_same_kv(read(tier, layout, B), blocks[B])
    assert tier.prefix_length([A, B, C]) == 2
    assert counts(tier, "errors") == (errors,)
    tier.close()


def test_server_not_answering_times_out(redis_server, layout):
    tier = RedisTier(redis_server.url, layout, timeout_seconds=0.2)
    block = make_kv(layout, 16)
    assert tier.put_many([(A, block)]) == 1
    redis_server.process.send_signal(signal.SIGSTOP)  # alive, accepts nothing: a hung server
    try:
        start = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            read(tier, layout, A)
        with pytest.raises(redis.TimeoutError):
            tier.put_many([(B, block)])
        assert time.monotonic() - start < 2 * 0.2 + 0.5  # one try of 0.2 s per call, no retry
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert counts(tier, "timeouts", "errors") == (2, 0)  # raised, so not counted as errors absorbed here
    assert_same_kv(read(tier, layout, A), block)
    tier.close()


@pytest.mark.parametrize("shape", ["host, queue dropping", "host and lmdb, at close"])
def test_blocks_written_back_into_redis_are_never_dropped(redis_server, layout, tmp_path, shape):
    """Write-back into Redis holds the only copy: host RAM's evictions queued behind ``queue_full="drop"``
    were dropped (5 of 40 prompts left), and LMDB's evictions at close met a closed queue (none left)."""
    if shape.startswith("host,"):
        config = StoreConfig(model_id="m", host_bytes=8 * layout.block_bytes, redis_url=redis_server.url,
                             write_policy="write_back", queue_full="drop")
        prompts = [(make_tokens(32, seed=i), make_kv(layout, 32, seed=i)) for i in range(40)]
    else:
        config = StoreConfig(model_id="m", host_bytes=16 * layout.block_bytes, disk_dir=str(tmp_path / "lmdb"),
                             disk_bytes=4 * layout.block_bytes, disk_sync=False, redis_url=redis_server.url,
                             write_policy="write_back")
        prompts = [(make_tokens(64, seed=i), make_kv(layout, 64, seed=i)) for i in range(3)]
    with KVStore(layout, config) as store:
        for tokens, kv in prompts:
            store.put(tokens, kv)
        assert store.flush(10)
    assert store.stats()["tiers"]["redis"]["queue_dropped"] == 0
    found = 0
    with KVStore(layout, config.replace(host_bytes=0)) as reopened:  # reads promoted into LMDB evict to Redis
        for tokens, kv in prompts:
            if shape.startswith("host,") and reopened.lookup(tokens) < len(tokens):
                continue  # the last prompts were in host RAM at close, which writes back to no server
            assert_same_kv(reopened.get(tokens), kv)
            found += 1
    assert found >= len(prompts) - 4


def test_stats_of_a_store_whose_redis_hangs_do_not_wait_on_it(redis_server, layout):
    """``stats()`` asked a bypassed, stopped Redis for its figures: each call waited out the timeout and
    counted another error. While the tier is bypassed it shows the figures it last gave."""
    config = StoreConfig(host_bytes=2 * layout.block_bytes, redis_url=redis_server.url, redis_timeout_seconds=0.2,
                         degraded_seconds=600)
    with KVStore(layout, config) as store:
        assert store.stats()["tiers"]["redis"]["state"] == "healthy"
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            assert store.lookup(make_tokens(48, seed=4)) == 0  # host RAM misses, Redis times out: bypassed
            first = store.stats()["tiers"]["redis"]
            assert first["state"] == "degraded" and first["timeouts"] + first["errors"] >= 1
            for _ in range(3):
                assert store.stats()["tiers"]["redis"]["timeouts"] == first["timeouts"]  # Redis not asked again
        finally:
            redis_server.process.send_signal(signal.SIGCONT)


def test_cluster_unreachable_at_start(layout):
    tier = RedisTier(f"redis+cluster://127.0.0.1:{free_port()}", layout, timeout_seconds=0.2)
    assert counts(tier, "errors")[0] >= 1  # building the client failed: counted, not raised
    unreachable = (redis.RedisError, redis.exceptions.RedisClusterException)
    _quick_failure(lambda: read(tier, layout, A), unreachable)
    _quick_failure(lambda: tier.put_many([(A, make_kv(layout, 16))]), unreachable)
    assert _quick(lambda: tier.delete(A)) is False
    tier.close()


# -- through a KVStore ---------------------------------------------------------------------------


def test_kvstore_host_then_redis(shared_redis, layout):
    host = HostTier(layout, 2 * layout.block_bytes, pin_memory=False)
    tier = RedisTier(shared_redis.url, layout, namespace="store")
    tokens, kv = make_tokens(64), make_kv(layout, 64)
    with KVStore(layout, StoreConfig(host_bytes=2 * layout.block_bytes), tiers=[host, tier]) as store:
        assert store.put(tokens, kv) == 4
        assert store.flush(10)
        assert tier.stats()["blocks_written"] == 4
        # Host RAM keeps the put's leading blocks; the last two went straight to redis.
        assert host.stats()["evictions"] == 0 and host.stats()["rejected"] == 2
        assert store.lookup(tokens) == 64
        assert_same_kv(store.get(tokens), kv)
        stats = store.stats()["tiers"]["redis"]
        assert stats["hits"] == 2 and stats["corrupt"] == 0 and stats["errors"] == 0  # blocks 2 and 3
    assert store.stats()["tiers"]["redis"]["hits"] == 2  # stats still read after close
    with pytest.raises(RuntimeError):
        tier.contains(A)  # the store closed it


def _commands(server: RedisServer) -> dict[str, int]:
    return {name: stats["calls"] for name, stats in server.client().info("commandstats").items()}


def test_a_put_asks_redis_nothing_and_sends_no_block_it_holds(redis_server, layout):
    """A put asked Redis whether it held each new block (32 EXISTS round trips for 32 blocks, and a stopped
    server's whole timeout): dedup looks at the local levels; Redis's copies are checked for where blocks go
    to it (the write-behind, or a put whose blocks overflow host RAM), and none is sent again."""
    def config(blocks: int, policy: str) -> StoreConfig:
        return StoreConfig(host_bytes=blocks * layout.block_bytes, redis_url=redis_server.url,
                           redis_namespace="put", redis_write_policy=policy)

    def sent(call) -> dict[str, int]:
        before = _commands(redis_server)
        call()
        return {name: calls - before.get(name, 0) for name, calls in _commands(redis_server).items()
                if calls > before.get(name, 0) and name not in ("cmdstat_info", "cmdstat_hello")}  # the test's own

    tokens, kv = make_tokens(96, seed=8), make_kv(layout, 96, seed=8)
    with KVStore(layout, config(8, "write_back")) as store:
        assert sent(lambda: store.put(tokens, kv)) == {}  # host RAM holds all six: Redis is not asked
    assert store.stats()["tiers"]["redis"]["blocks_written"] == 6  # written back at close
    for host_blocks, stored in ((8, 6), (2, 2)):  # all in host RAM, then written behind; or four overflowing
        with KVStore(layout, config(host_blocks, "write_through")) as store:  # to Redis, which holds them
            results = []
            assert "cmdstat_set" not in sent(lambda: results.extend([store.put(tokens, kv), store.flush(10)]))
            assert results == [stored, True]
            assert store.stats()["tiers"]["redis"]["blocks_written"] == 0
            assert store.stats()["store"]["dedup_blocks"] == 6 - stored
            assert_same_kv(store.get(tokens), kv)


def test_the_write_behind_asks_redis_once_a_prompt_not_once_a_block(redis_server, layout):
    """The write-behind asked Redis whether it held each block it was about to send (one EXISTS round trip a
    block); it asks once for each prompt in a batch, and sends none Redis holds: not the shared head, nor a
    tail whose head Redis lost (a TTL or LRU takes a head first: SET NX does not refresh it)."""
    config = StoreConfig(host_bytes=64 * layout.block_bytes, redis_url=redis_server.url,
                         redis_namespace="asked", redis_write_policy="write_through")
    shared, first, second = make_tokens(256, seed=1), make_kv(layout, 256, seed=1), make_kv(layout, 256, seed=2)
    with KVStore(layout, config) as writer:  # Redis holds the first 16 blocks
        writer.put(shared, first)
        assert writer.flush(10)
        head = writer.tiers[1].redis_key(writer.block_keys(shared)[0].key)
    assert redis.Redis.from_url(redis_server.url).delete(head) == 1  # expired
    with KVStore(layout, config) as store:
        redis_tier = store.tiers[1]
        questions, sent = [], []
        for name in ("contains", "prefix_length", "held"):
            asked = getattr(redis_tier, name)
            setattr(redis_tier, name, lambda keys, asked=asked, name=name: questions.append(name) or asked(keys))
        put_many = redis_tier.put_many
        redis_tier.put_many = lambda items: sent.extend(key for key, _ in items) or put_many(items)
        tokens = shared + make_tokens(256, seed=3)
        kv = torch.cat([first, second], dim=2)
        assert store.put(tokens, kv) == 32
        assert store.flush(10)
        assert questions.count("contains") == 0 and 1 <= questions.count("held") <= 2
        keys = [block.key for block in store.block_keys(tokens)]
        assert sorted(sent) == sorted([keys[0]] + keys[16:])  # the lost head and the new blocks, nothing held
    with KVStore(layout, config.replace(host_bytes=0)) as reader:
        assert reader.lookup(tokens) == 512
        assert_same_kv(reader.get(tokens), kv)


def test_store_config_builds_the_redis_tier_below_host(redis_cluster, layout):
    config = StoreConfig(host_bytes=2 * layout.block_bytes, redis_url=redis_cluster.url, redis_namespace="cfg",
                         redis_codec="zstd", redis_ttl_seconds=600)
    tokens, kv = make_tokens(96, seed=5), make_kv(layout, 96, seed=5)
    with KVStore(layout, config) as writer:
        assert [t.name for t in writer.tiers] == ["host", "redis"]
        writer.put(tokens, kv)
        assert writer.flush(10)
    with KVStore(layout, config) as reader:  # a fresh store: everything comes from the cluster
        assert reader.lookup(tokens) == 96
        assert_same_kv(reader.get(tokens), kv)
        assert reader.stats()["tiers"]["redis"]["hits"] == 6


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "127.0.0.1:6379", "memcached://host:11211", ""])
def test_unknown_url_scheme(url, layout):
    with pytest.raises(ValueError) as info:
        RedisTier(url, layout)
    message = str(info.value)
    assert message.startswith("url:")
    for scheme in ("redis://", "rediss://", "unix://", "redis+cluster://"):
        assert scheme in message


def test_bad_arguments(make_tier, layout):
    for options in ({"namespace": "a:b"}, {"namespace": ""}, {"ttl_seconds": 0}, {"timeout_seconds": 0},
                    {"capacity_bytes": -1}, {"key_prefix": ""}):
        with pytest.raises(ValueError):
            make_tier(**options)
    tier = make_tier()
    with pytest.raises(ValueError):
        tier.put_many([(A, make_kv(tiny_layout(dtype=torch.float32), 16))])
    with pytest.raises(ValueError):
        tier.put_many([(A, make_kv(layout, 17))])
    with pytest.raises(ValueError):
        tier.put_many([(b"k" * 33, make_kv(layout, 16))])
    with pytest.raises(ValueError):
        tier.get_into(A, torch.zeros(layout.shape(16), dtype=torch.float32))
    with pytest.raises(ValueError):
        tier.get_many_into([A, B], [out_like(layout)])
    assert list(tier.keys()) == []
    tls = RedisTier("rediss://127.0.0.1:1/0", layout)  # builds a TLS client; connects on first use
    assert tls._client().connection_pool.connection_class is redis.SSLConnection
    tls.close()
    tls.close()
