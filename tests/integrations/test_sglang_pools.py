"""SGLang's v2 storage methods on the kvstore backend: a host pool beside the KV pool, byte-exact, and hit
answers equal to SGLang's own ``HiCacheFile`` on the same pages.

The pool beside the KV pool is a real SGLang ``MHATokenToKVPoolHost`` (the
kind a sliding-window model's SWA pool is), registered as SGLang's hybrid
controller registers it (``register_mem_host_pool_v2``). Which pages of
it are stored is drawn by hypothesis; ``batch_exists_v2`` must then give
the answer ``HiCacheFile`` gives for the same stored pages, under each hit
policy (every page, or a trailing window).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("sglang", reason="SGLang is not installed: build its environment with scripts/engine-venvs.sh")

from sglang.srt.mem_cache.hicache_storage import (HiCacheFile, PoolHitPolicy, PoolName,  # noqa: E402
                                                  PoolTransfer)
from sglang.srt.mem_cache.storage import StorageBackendFactory  # noqa: E402

from kvstore.integrations.sglang_pools import pool_config  # noqa: E402
from kvstore import StoreConfig  # noqa: E402
from sglang_env import keys, no_failure_injection, page_bytes, page_indices  # noqa: E402,F401
from test_sglang_backend import PAGE, host_pool, kvstore_extra, make_backend, storage_config  # noqa: E402

SWA = PoolName.SWA
N = 6  # pages in a prompt


def indices(pages) -> torch.Tensor:
    return page_indices(pages, PAGE)


def transfer(name, ks, pages, policy=PoolHitPolicy.ALL_PAGES) -> PoolTransfer:
    return PoolTransfer(name=name, keys=list(ks), host_indices=indices(pages), hit_policy=policy)


@pytest.fixture
def pools():
    """The KV pool and the pool beside it, filled with different random bytes."""
    return host_pool(seed=1), host_pool(seed=2)


def test_a_pool_beside_the_kv_pool_round_trips_byte_exact_and_apart(pools, tmp_path):
    kv, swa = pools
    backend = make_backend(kv, disk_dir=str(tmp_path / "kv"))
    try:
        backend.register_mem_host_pool_v2(kv, PoolName.KV)  # the anchor again: the backend's own store
        backend.register_mem_host_pool_v2(swa, SWA)
        ks = keys(3, "s")
        assert backend.batch_set_v1(ks, indices([0, 1, 2])) == [True] * 3
        assert backend.batch_set_v2([transfer(SWA, ks, [3, 4, 5])]) == {"swa": [True] * 3}
        # the same page hashes, two pools: each reads back its own bytes
        got = backend.batch_get_v2([transfer(SWA, ks, [20, 21, 22]), transfer(PoolName.KV, ks, [23, 24, 25])])
        assert got == {"swa": [True] * 3, "kv": [True] * 3}
        for s, d in zip([3, 4, 5], [20, 21, 22]):
            assert torch.equal(page_bytes(swa, s * PAGE), page_bytes(swa, d * PAGE))
        for s, d in zip([0, 1, 2], [23, 24, 25]):
            assert torch.equal(page_bytes(kv, s * PAGE), page_bytes(kv, d * PAGE))
        assert backend.store.lookup_keyed(ks, backend._salt) == 3
        # a key never stored in the pool, an unregistered pool, bad indices: misses, never an exception
        assert backend.batch_get_v2([transfer(SWA, keys(1, "x"), [26])]) == {"swa": [False]}
        assert backend.batch_get_v2([transfer(PoolName.MAMBA, ks, [26, 27, 28])]) == {"mamba": [False] * 3}
        assert backend.batch_set_v2([PoolTransfer(name=SWA, keys=ks, host_indices=indices([1]))]) == \
            {"swa": [False] * 3}
        stats = backend.get_stats()
        assert 3 in stats.backup_pgs and 3 in stats.prefetch_pgs
    finally:
        backend.close()
    again = make_backend(kv, disk_dir=str(tmp_path / "kv"))  # a restart: the pool's own LMDB directory
    try:
        again.register_mem_host_pool_v2(swa, SWA)
        assert again.batch_get_v2([transfer(SWA, keys(3, "s"), [27, 28, 29])]) == {"swa": [True] * 3}
        assert torch.equal(page_bytes(swa, 3 * PAGE), page_bytes(swa, 27 * PAGE))
        assert (tmp_path / "kv" / "pool-swa").is_dir()
    finally:
        again.close()


def test_pools_never_get_a_lossy_codec():
    config = pool_config(StoreConfig(disk_dir="/x", disk_codec="int8", files_codec="zstd"), "mamba")
    assert config.disk_dir == "/x/pool-mamba" and config.disk_codec == "raw" and config.files_codec == "zstd"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kv_pages=st.integers(0, N), held=st.lists(st.booleans(), min_size=N, max_size=N),
       policy=st.sampled_from([PoolHitPolicy.ALL_PAGES, PoolHitPolicy.TRAILING_PAGES]), window=st.integers(1, 3))
def test_hit_answers_equal_sglangs_own_file_backend(pools, tmp_path_factory, kv_pages, held, policy, window):
    kv, swa = pools
    root = tmp_path_factory.mktemp("hits")
    ks = keys(N, "h")
    mine = make_backend(kv, disk_dir=str(root / "kv"))
    theirs = HiCacheFile(storage_config(kvstore_extra()), file_path=str(root / "file"))
    try:
        for backend in (mine, theirs):
            backend.register_mem_pool_host(kv)
            backend.register_mem_host_pool_v2(swa, SWA)
        if kv_pages:
            assert mine.batch_set_v1(ks[:kv_pages], indices(range(kv_pages))) == [True] * kv_pages
            assert theirs.batch_set(ks[:kv_pages], [kv.get_data_page(p * PAGE) for p in range(kv_pages)])
        stored = [i for i in range(N) if held[i]]
        for backend in (mine, theirs):
            for i in stored:
                assert backend.batch_set_v2([transfer(SWA, [ks[i]], [i])]) == {"swa": [True]}
        query = [transfer(SWA, ks[:window], range(window), policy)]
        got, expected = mine.batch_exists_v2(ks, query), theirs.batch_exists_v2(ks, query)
        assert (got.kv_hit_pages, got.extra_pool_hit_pages, list(got.restorable_prefix_pages)) == \
            (expected.kv_hit_pages, expected.extra_pool_hit_pages, list(expected.restorable_prefix_pages))
    finally:
        mine.close()


@pytest.mark.parametrize("replicated", [False, True], ids=["sharded", "rank-replicated"])
def test_ranks_share_a_pool_only_where_sglang_says_its_bytes_are_the_same(tmp_path, replicated):
    """Two TP ranks on one shared tier: a pool's pages are shared between ranks only when SGLang says the
    model's state is the same on every rank (``is_mla_model``, as for an MLA model's DSA indexer); Mamba
    states are sharded by heads and never shared, as SGLang's own file backend keys them."""
    import test_sglang_controller as mla  # MLA pools and a storage config that says what SGLang says

    anchor, side = mla.mla_host_pool(seed=3), mla.mla_host_pool(seed=4)
    extra = mla.kvstore_extra(host_bytes=0, files_dir=str(tmp_path / "shared"))
    ranks = []
    for rank in range(2):
        backend = StorageBackendFactory.create_backend("dynamic", mla.storage_config(extra, rank, 2, replicated),
                                                       None)
        if replicated:
            backend.register_mem_pool_host(anchor)
        else:  # an MHA model: the anchor is an MHA pool
            backend.register_mem_pool_host(host_pool(seed=rank))
        for name in (PoolName.INDEXER, PoolName.MAMBA):
            backend.register_mem_host_pool_v2(side, name)
        ranks.append(backend)
    try:
        ks = keys(2, "r")
        slots = page_indices([0, 1], side.page_size)
        for name in (PoolName.INDEXER, PoolName.MAMBA):
            got = ranks[0].batch_set_v2([PoolTransfer(name=name, keys=ks, host_indices=slots)])
            assert got == {str(name): [True, True]}
        seen = {str(name): ranks[1].pools.present(name, ks) for name in (PoolName.INDEXER, PoolName.MAMBA)}
        assert seen == {"indexer": [replicated] * 2, "mamba": [False, False]}
    finally:
        for backend in ranks:
            backend.close()


def test_an_mha_pool_where_sglang_said_mla_is_refused(tmp_path):
    import test_sglang_controller as mla

    backend = StorageBackendFactory.create_backend("dynamic", mla.storage_config(mla.kvstore_extra()), None)
    with pytest.raises(ValueError, match="expected an MLA pool"):
        backend.register_mem_pool_host(host_pool())
    assert backend.batch_exists(keys(1)) == 0
