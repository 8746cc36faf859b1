"""A KVStore over a real cache server: lookups and plans ask the server once per run of keys."""

from __future__ import annotations

import re
import urllib.request

import pytest

from conftest import assert_same_kv, make_kv, make_tokens, tiny_layout
from kvstore import KVStore, StoreConfig

from .conftest import TOKEN, ServerProcess

BLOCKS = 40


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("srv"), "--host-bytes", "64MiB", "--disk-bytes", "0").start()
    yield server
    server.kill()


def requests(server: ServerProcess, op: str) -> float:
    text = urllib.request.urlopen(server.metrics_url + "/metrics", timeout=10).read().decode()
    match = re.search(rf'^kvstore_server_requests_total{{op="{op}"}} (\S+)$', text, flags=re.M)
    return float(match.group(1)) if match else 0.0


def config(server: ServerProcess, host_blocks: int, layout) -> StoreConfig:
    return StoreConfig(host_bytes=host_blocks * layout.block_bytes, remote_url=server.url, remote_token=TOKEN)


def test_lookup_asks_the_server_once_for_a_whole_chain(srv):
    layout = tiny_layout()
    tokens = make_tokens(BLOCKS * 16, seed=1)
    kv = make_kv(layout, len(tokens), seed=1)
    with KVStore(layout, config(srv, 64, layout)) as writer:
        writer.put(tokens, kv)
        writer.flush()
    with KVStore(layout, config(srv, 64, layout)) as reader:
        before = requests(srv, "EXISTS_PREFIX")
        assert reader.lookup(tokens) == len(tokens)
        assert requests(srv, "EXISTS_PREFIX") - before == 1
        # The first 10 blocks come up into host RAM; the rest is still asked for in one round trip.
        assert reader.get(tokens[:160]).shape[2] == 160
        before = requests(srv, "EXISTS_PREFIX")
        plan = reader.plan(tokens)
        assert requests(srv, "EXISTS_PREFIX") - before == 1
        assert plan.found == len(tokens)
        assert plan.sources == {"host": 160, "remote": len(tokens) - 160}
        got = reader.get(tokens)
        assert got.shape[2] == len(tokens)
        assert got.view(-1).view(dtype=got.dtype).equal(kv.view(-1))


def test_lookup_stops_at_a_block_the_server_lost(srv):
    layout = tiny_layout()
    tokens = make_tokens(BLOCKS * 16, seed=2)
    with KVStore(layout, config(srv, 64, layout)) as writer:
        writer.put(tokens, make_kv(layout, len(tokens), seed=2))
        writer.flush()
        lost = writer.block_keys(tokens)[20].key
    conn = srv.connect()
    assert conn.delete([lost]) == [True]
    conn.close()
    with KVStore(layout, config(srv, 64, layout)) as reader:
        assert reader.lookup(tokens) == 20 * 16
        assert reader.plan(tokens).found == 20 * 16


def test_a_dead_server_costs_misses_not_exceptions(tmp_path):
    layout = tiny_layout()
    server = ServerProcess(tmp_path / "srv", "--host-bytes", "8MiB", "--disk-bytes", "0").start()
    tokens = make_tokens(4 * 16, seed=3)
    kv = make_kv(layout, len(tokens), seed=3)
    try:
        with KVStore(layout, config(server, 2, layout)) as store:
            store.put(tokens, kv)
            store.flush()
            server.kill()
            # Host RAM kept the put's leading blocks (2 slots, 4 blocks): those are served, no exception.
            assert store.lookup(tokens) == 32
            assert_same_kv(store.get(tokens), kv[:, :, :32])
            store.put(make_tokens(16, seed=4), make_kv(layout, 16, seed=4))
            remote = store.stats()["tiers"]["remote"]
            assert remote["errors"] + remote["unavailable"] + remote["bypassed"] >= 1
    finally:
        server.kill()


def test_a_refused_token_is_said_once_and_in_the_tier_state(srv, caplog):
    """An engine whose remote_token the server refuses gets misses, never exceptions, and is told: one clear
    error in the log (not one per call), and the tier's state in ``stats()`` says the token was refused."""
    layout = tiny_layout()
    config = StoreConfig(host_bytes=4 * layout.block_bytes, remote_url=srv.url, remote_token="not-the-token-0123")
    tokens, kv = make_tokens(2 * layout.block_tokens, seed=5), make_kv(layout, 2 * layout.block_tokens, seed=5)
    with caplog.at_level("WARNING"), KVStore(layout, config) as store:
        for _ in range(3):
            store.put(tokens, kv)
            store.flush()
            assert store.lookup(make_tokens(layout.block_tokens, seed=6)) == 0
        remote = store.stats()["tiers"]["remote"]
        assert remote["state"] == "token refused", remote
    refused = [r for r in caplog.records if r.levelname == "ERROR" and "refused" in r.getMessage()]
    assert len(refused) == 1, [r.getMessage() for r in caplog.records]
    assert srv.url in refused[0].getMessage() and "remote_token" in refused[0].getMessage()
