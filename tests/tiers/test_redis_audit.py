"""RedisTier findings of an audit, each on real redis-server processes: reads of absent blocks, reads into a
smaller ``out``, a server that answers reads but not writes, refusals and failures that were only counted,
the settings that were accepted and then failed, and the buffers a thread kept."""

from __future__ import annotations

import logging
import threading
import time
import tracemalloc

import pytest
import torch

from conftest import assert_same_kv, make_kv, make_tokens, tiny_layout
import redisfixtures
from redisfixtures import RedisServer, redis
from tierkit import A, B, read

from kvstore.compression.registry import get_codec
from kvstore.config import StoreConfig
from kvstore.layout import KVLayout
from kvstore.store import KVStore
from kvstore.tiers.redis import RedisTier

redis_server, shared_redis = redisfixtures.redis_server, redisfixtures.shared_redis
fresh_cluster = redisfixtures.fresh_cluster

LOGGER = "kvstore.tiers.redis"


def _keys(n: int) -> list[bytes]:
    return [i.to_bytes(8, "little") for i in range(n)]


def _outs(layout, n: int, tokens: int = 16) -> list[torch.Tensor]:
    return [torch.zeros(layout.shape(tokens), dtype=layout.dtype) for _ in range(n)]


def _sent(server: RedisServer, call) -> dict[str, int]:
    """The commands ``server`` ran during ``call()`` (name: calls), the INFO this asks left out."""
    def commands() -> dict[str, int]:
        with server.client() as raw:
            return {name[len("cmdstat_"):]: s["calls"] for name, s in raw.info("commandstats").items()}
    before = commands()
    call()
    return {name: calls - before.get(name, 0) for name, calls in commands().items()
            if calls > before.get(name, 0) and name not in ("info", "hello")}


def _damage(server: RedisServer, tier: RedisTier, key: bytes) -> None:
    with server.client() as raw:
        good = raw.get(tier.redis_key(key))
        raw.set(tier.redis_key(key), good[:-1] + bytes([good[-1] ^ 1]))


# -- absent keys, clean-ups --------------------------------------------------------------------------


def test_absent_blocks_are_read_in_one_round_trip_with_no_clean_up(redis_server, layout):
    """Each absent key of a read cost a clean-up script (EVAL and the TYPE in it), one round trip apiece."""
    tier = RedisTier(redis_server.url, layout, namespace="absent")
    keys = _keys(64)
    found = []
    assert _sent(redis_server, lambda: found.extend(tier.get_many_into(keys, _outs(layout, 64)))) == {
        "getrange": 64, "exists": 64}
    assert found == [False] * 64
    assert (tier.stats()["misses"], tier.stats()["corrupt"], tier.stats()["errors"]) == (64, 0, 0)
    tier.close()


def test_the_clean_ups_of_a_read_go_in_one_pipeline(redis_server, layout):
    """Damaged blocks of one read: each was deleted by a script sent on its own, one round trip apiece."""
    tier = RedisTier(redis_server.url, layout, namespace="pipelined")
    keys = _keys(8)
    tier.put_many([(key, make_kv(layout, 16, seed=i)) for i, key in enumerate(keys)])
    for key in keys[:6]:
        _damage(redis_server, tier, key)
    found = []
    sent = _sent(redis_server, lambda: found.extend(tier.get_many_into(keys, _outs(layout, 8))))
    assert found == [False] * 6 + [True] * 2
    assert (sent["getrange"], sent["exists"], sent["eval"], sent["del"]) == (8 + 6, 8, 6, 6)  # GETRANGE: scripts'
    with redis_server.client() as raw:
        assert sum(raw.exists(tier.redis_key(key)) for key in keys) == 2
    assert (tier.stats()["corrupt"], tier.stats()["hits"]) == (6, 2)
    tier.close()


def test_a_server_paused_for_writes_costs_a_read_one_timeout_and_is_raised(redis_server, layout):
    """CLIENT PAUSE WRITE (what FAILOVER does): reads answer, scripts wait. Each absent or damaged block of a
    read waited a whole timeout for its clean-up, one after another (a 64-block prompt: 64 timeouts), and
    the failure was absorbed, so the store's breaker never tripped."""
    tier = RedisTier(redis_server.url, layout, namespace="paused", timeout_seconds=0.2)
    keys = _keys(8)
    tier.put_many([(key, make_kv(layout, 16, seed=i)) for i, key in enumerate(keys[:4])])
    for key in keys[:4]:
        _damage(redis_server, tier, key)
    with redis_server.client() as raw:
        raw.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
    try:
        assert tier.get_many_into(keys[4:], _outs(layout, 4)) == [False] * 4  # absent: no clean-up to wait on
        assert tier.stats()["timeouts"] == 0
        with pytest.raises(redis.TimeoutError):
            tier.get_many_into(keys, _outs(layout, 8))
        assert (tier.stats()["timeouts"], tier.stats()["errors"]) == (1, 0)  # one, raised: the caller counts it
    finally:
        with redis_server.client() as raw:
            raw.execute_command("CLIENT", "UNPAUSE")
    assert tier.get_many_into(keys, _outs(layout, 8)) == [False] * 8
    assert tier.stats()["corrupt"] == 4
    with redis_server.client() as raw:
        assert sum(raw.exists(tier.redis_key(key)) for key in keys) == 0
    tier.close()


def test_a_script_error_that_is_no_refusal_keeps_the_scripted_clean_up(redis_server, layout):
    """Any error of the clean-up script (here NOREPLICAS: a primary that writes only with a replica up) turned
    scripts off for good, and with them the check that no other process stored a good block since the read."""
    tier = RedisTier(redis_server.url, layout, namespace="noreplicas")
    tier.put_many([(A, make_kv(layout, 16, seed=1)), (B, make_kv(layout, 16, seed=2))])
    _damage(redis_server, tier, A)
    _damage(redis_server, tier, B)
    with redis_server.client() as raw:
        raw.config_set("min-replicas-to-write", 1)
    try:
        assert read(tier, layout, A) is None  # its clean-up refused: counted, left for a later read
        assert tier.stats()["errors"] == 1 and "NOREPLICAS" in tier.last_error
    finally:
        with redis_server.client() as raw:
            raw.config_set("min-replicas-to-write", 0)
    assert _sent(redis_server, lambda: read(tier, layout, B)).get("eval") == 1
    assert _sent(redis_server, lambda: read(tier, layout, A)).get("eval") == 1
    with redis_server.client() as raw:
        assert raw.exists(tier.redis_key(A), tier.redis_key(B)) == 0
    assert tier.stats()["corrupt"] == 3  # A twice (found damaged each read), B once
    tier.close()


# -- a smaller out ---------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", [None, "zstd"])
def test_a_block_read_into_a_smaller_out_is_a_miss_that_keeps_it(shared_redis, codec):
    """A 256 KiB block read into a 1-token ``out``: the read stopped at what a 1-token block can take, judged
    the good block too large (damage), deleted it and counted it corrupt."""
    lay = tiny_layout(num_layers=4, num_kv_heads=8, head_dim=128)
    tier = RedisTier(shared_redis.url, lay, namespace=f"small-out-{codec}",
                     codec=None if codec is None else get_codec(codec))
    block = make_kv(lay, 16, seed=3)
    assert tier.put_many([(A, block)]) == 1
    assert read(tier, lay, A, tokens=1) is None
    assert tier.get_many_into([A], _outs(lay, 1, tokens=4)) == [False]
    assert (tier.stats()["misses"], tier.stats()["corrupt"], tier.stats()["stale"]) == (2, 0, 0)
    assert_same_kv(read(tier, lay, A), block)
    tier.close()


# -- refusals and absorbed failures --------------------------------------------------------------------


def test_a_read_only_replica_is_the_tiers_failure_naming_the_fix(tmp_path, layout, caplog):
    """redis_url naming a replica: every SET answered READONLY, counted alone: the store read healthy, logged
    nothing and kept no block."""
    primary = RedisServer(tmp_path / "primary").start()
    replica = RedisServer(tmp_path / "replica", None, "--replicaof", "127.0.0.1", str(primary.port)).start()
    try:
        tier = RedisTier(replica.url, layout, namespace="replica")
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            for _ in range(2):
                with pytest.raises(redis.ReadOnlyError):
                    tier.put_many([(A, make_kv(layout, 16))])
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name == LOGGER]
        assert len(errors) == 1 and "redis_url names a read-only replica; use the primary" in errors[0]
        assert "ReadOnlyError" in tier.last_error
        tier.close()
        tokens = make_tokens(32)
        with KVStore(layout, StoreConfig(model_id="m", host_bytes=0, redis_url=replica.url)) as store:
            assert store.put(tokens, make_kv(layout, 32)) == 0
            entry = store.stats()["tiers"]["redis"]
            assert entry["errors"] >= 1 and "ReadOnlyError" in entry["last_error"]
    finally:
        replica.stop()
        primary.stop()


def test_a_block_past_the_servers_largest_value_is_rejected_alone(tmp_path, caplog):
    """A value past proto-max-bulk-len made Redis drop the connection: the whole batch (a small tail
    included) was lost and the tier's writes suspended. That block alone is now rejected, named in the log."""
    layout = KVLayout(num_layers=4, num_kv_heads=8, head_dim=128, dtype=torch.float32, block_tokens=64)  # 2 MiB
    server = RedisServer(tmp_path / "small", None, "--proto-max-bulk-len", "1mb").start()  # Redis's least
    try:
        tokens, kv = make_tokens(69), make_kv(layout, 69)
        config = StoreConfig(model_id="m", host_bytes=0, redis_url=server.url)
        with caplog.at_level(logging.WARNING, logger=LOGGER), KVStore(layout, config) as store:
            tier = store.tiers[0]
            assert tier.put_many([(A, kv[:, :, :64]), (B, kv[:, :, 64:])]) == 1  # the 5-token tail fits
            assert tier.contains(B) and not tier.contains(A)
            store.put(tokens, kv)
            assert store.lookup(tokens) == 0  # its first block cannot be stored: nothing a lookup reaches
            stats = store.stats()["tiers"]["redis"]
            assert (stats["rejected"], stats["errors"], stats["writes"]) == (2, 0, "ok")
        warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
        assert any("proto-max-bulk-len" in message for message in warnings)
    finally:
        server.stop()


def test_an_acl_refusal_names_the_commands_the_tier_sends(make_acl_user, layout, caplog):
    """The fix named GET, SET, ...: an operator who granted those found every read refused (GETRANGE)."""
    url = make_acl_user("+get", "+set", "+del", "+exists", "+scan", "+info", "+dbsize")
    tier = RedisTier(url, layout, namespace="acl")
    assert tier.put_many([(A, make_kv(layout, 16))]) == 1
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        with pytest.raises(redis.exceptions.NoPermissionError):
            read(tier, layout, A)
    fix = caplog.records[-1].getMessage()
    for command in ("GETRANGE", "EXISTS", "SET", "EVAL", "TYPE", "DEL", "SCAN", "INFO", "DBSIZE"):
        assert command in fix
    tier.close()


@pytest.fixture
def make_acl_user(shared_redis):
    """``make_acl_user(*rules)``: the URL of an ACL user of ``shared_redis`` with ``rules`` on all keys."""
    users = []

    def factory(*rules: str) -> str:
        name = f"kvstore-audit-{len(users)}"
        with shared_redis.client() as raw:
            raw.execute_command("ACL", "SETUSER", name, "on", ">audit-pass-1", "~*", *rules)
        users.append(name)
        return shared_redis.url.replace("redis://", f"redis://{name}:audit-pass-1@", 1)

    yield factory
    with shared_redis.client() as raw:
        for name in users:
            raw.execute_command("ACL", "DELUSER", name)


def test_failures_absorbed_are_logged_rate_limited_and_kept(fresh_cluster, layout, caplog):
    """A dead cluster node: its keys' misses were counted in ``errors`` by the thousand, and nothing said
    which, nor that anything was wrong."""
    tier = RedisTier(fresh_cluster.url, layout, namespace="absorbed", timeout_seconds=0.5)
    keys = _keys(32)
    blocks = [make_kv(layout, 16, seed=i) for i in range(32)]
    assert tier.put_many(list(zip(keys, blocks))) == 32
    fresh_cluster.nodes[1].stop()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(3):
            found = tier.get_many_into(keys, _outs(layout, 32))
            assert 0 < sum(found) < 32
    assert tier.stats()["errors"] >= 3 and tier.last_error is not None
    absorbed = [r.getMessage() for r in caplog.records if r.name == LOGGER and "absorbed" in r.getMessage()]
    assert len(absorbed) == 1 and tier.last_error in absorbed[0]  # once per interval, however many
    tier.close()


def test_a_cluster_that_serves_no_slot_is_raised(fresh_cluster, layout):
    """Every node answering CLUSTERDOWN (full coverage required, a node dead): each key was counted an error
    absorbed, and the store's breaker never heard of it."""
    for node in fresh_cluster.nodes:
        with node.client() as raw:
            raw.config_set("cluster-require-full-coverage", "yes")
    tier = RedisTier(fresh_cluster.url, layout, namespace="down", timeout_seconds=0.5)
    keys = _keys(16)
    assert tier.put_many([(key, make_kv(layout, 16)) for key in keys]) == 16
    fresh_cluster.nodes[1].stop()
    deadline = time.monotonic() + 15
    with fresh_cluster.nodes[0].client() as raw:
        while "cluster_state:fail" not in raw.execute_command("CLUSTER", "INFO").decode():
            assert time.monotonic() < deadline, "the cluster did not notice its dead node"
            time.sleep(0.1)
    with pytest.raises(redis.exceptions.ClusterDownError):
        tier.get_many_into(keys, _outs(layout, 16))
    tier.close()


def _fix_logged(caplog, call) -> str:
    """The one error ``call`` (which raises the tier's failure) logged, twice called."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(2):
            with pytest.raises(Exception):  # noqa: B017 -- the tier's failure, whatever redis-py calls it
                call()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name == LOGGER]
    assert len(errors) == 1, [r.getMessage() for r in caplog.records]
    return errors[0]


def test_a_cluster_refusing_the_credentials_names_the_fix(fresh_cluster, layout, caplog):
    """The cluster client wraps the refused password in a RedisClusterException: logged as an outage."""
    for node in fresh_cluster.nodes:
        with node.client() as raw:
            raw.config_set("requirepass", "audit-pass-1")
    hosts = fresh_cluster.url.split("://", 1)[1]
    for url in (f"redis+cluster://:wrong-pass@{hosts}", f"redis+cluster://{hosts}"):
        tier = RedisTier(url, layout, namespace="auth")
        fix = _fix_logged(caplog, lambda: tier.put_many([(A, make_kv(layout, 16))]))
        assert "the server refused redis_url's credentials" in fix
        tier.close()
    tier = RedisTier(f"redis+cluster://:audit-pass-1@{hosts}", layout, namespace="auth")
    assert tier.put_many([(A, make_kv(layout, 16))]) == 1
    tier.close()


def test_a_standalone_server_given_as_a_cluster_names_the_fix(shared_redis, layout, caplog):
    tier = RedisTier("redis+cluster://" + shared_redis.url.split("://", 1)[1].split("/")[0], layout)
    fix = _fix_logged(caplog, lambda: tier.put_many([(A, make_kv(layout, 16))]))
    assert "not a Redis Cluster node: set redis_url to redis://" in fix
    tier.close()


# -- settings ------------------------------------------------------------------------------------------


def test_a_namespace_with_a_colon_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match=r"^redis_namespace: .*':'.*'team:a'"):
        StoreConfig(model_id="m", host_bytes=0, redis_url="redis://127.0.0.1:1/0", redis_namespace="team:a")


@pytest.mark.parametrize("query", ["decode_responses=true", "encoding=utf-16", "encoding_errors=ignore"])
def test_url_options_that_turn_replies_into_text_are_refused(query):
    """?decode_responses=true failed every read; ?encoding=utf-16 every write and script."""
    option = query.split("=")[0]
    with pytest.raises(ValueError, match=rf"^redis_url: .*{option}"):
        StoreConfig(model_id="m", host_bytes=0, redis_url=f"redis://127.0.0.1:1/0?{query}")


def test_a_tls_cluster_url_takes_its_certificate_options():
    """rediss+cluster:// refused any query: a TLS cluster with a private CA could not be configured."""
    hosts = "127.0.0.1:7000,127.0.0.1:7001"
    query = "ssl_ca_certs=/ca.crt&ssl_certfile=/c.crt&ssl_keyfile=/c.key"
    config = StoreConfig(model_id="m", host_bytes=0, redis_url=f"rediss+cluster://{hosts}?{query}")
    assert "ssl_ca_certs=/ca.crt" in config.redis_url
    for url in (f"redis+cluster://{hosts}?ssl_ca_certs=/ca.crt",  # no TLS: no TLS options
                f"rediss+cluster://{hosts}?socket_timeout=9", f"rediss+cluster://{hosts}/3"):
        with pytest.raises(ValueError, match="^redis_url: a Redis Cluster URL"):
            StoreConfig(model_id="m", host_bytes=0, redis_url=url)


# -- buffers -------------------------------------------------------------------------------------------


def test_a_thread_keeps_no_large_buffer_after_its_put(shared_redis):
    """Each thread that put a long prompt kept a buffer of up to 128 MiB for life, outside every capacity."""
    lay = tiny_layout(num_layers=4, num_kv_heads=8, head_dim=128)  # 256 KiB a block
    tier = RedisTier(shared_redis.url, lay, namespace="scratch")
    items = [(key, make_kv(lay, 16, seed=1)) for key in _keys(96)]  # 24 MiB of values
    done, release = threading.Event(), threading.Event()

    def engine() -> None:
        tier.put_many(items)
        done.set()
        release.wait(30)  # a pool thread: alive and idle after its put

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        thread = threading.Thread(target=engine)
        thread.start()
        assert done.wait(60)
        kept = tracemalloc.get_traced_memory()[0] - before
        release.set()
        thread.join()
    finally:
        tracemalloc.stop()
    assert kept < 17 << 20, kept
    assert tier.get_many_into([items[0][0]], _outs(lay, 1)) == [True]  # stored
    for key, _ in items:
        tier.delete(key)
    tier.close()
