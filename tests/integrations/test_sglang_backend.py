"""The kvstore HiCache backend inside the real SGLang: its factory, its host pools, its HiCacheFile beside it.

Runs only where SGLang is installed (``.venv-sglang``, built by
``scripts/engine-venvs.sh sglang``); elsewhere the module skips. Pools are
real ``MHATokenToKVPool`` (on "cpu") / ``MHATokenToKVPoolHost`` objects in
every host layout SGLang has for MHA, filled with random bytes (every bit
pattern, NaNs included): every comparison is of bytes. SGLang's
multimodal configs import torchvision, whose registry build is CUDA-only:
where it cannot be found, a stub module stands in while the pools import.
"""

from __future__ import annotations

import socket

import pytest
import torch

pytest.importorskip("sglang", reason="needs SGLang 0.5.23: build .venv-sglang with scripts/engine-venvs.sh sglang "
                                     "and run .venv-sglang/bin/pytest")

from sglang.srt.mem_cache.hicache_storage import HiCacheFile, HiCacheStorageConfig  # noqa: E402
from sglang.srt.mem_cache.storage import StorageBackendFactory  # noqa: E402

from kvstore.integrations.sglang import KVStoreHiCache, canonical_page_view  # noqa: E402
from kvstore.tiers.lmdb import DirectoryInUseError  # noqa: E402
from sglang_env import keys, no_failure_injection, page_bytes, page_indices, stubbed_torchvision  # noqa: E402,F401


with stubbed_torchvision():
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")
LAYERS, HEADS, HEAD_DIM, PAGE = 3, 2, 16, 16
DEVICE_TOKENS = 256  # the host pool holds twice that: 32 pages


def storage_config(extra: dict | None = None, tp_rank: int = 0, tp_size: int = 1, model_name: str = "test/tiny-llama",
                   **kw) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
                                attn_cp_size=1, is_mla_model=False, enable_storage_metrics=False,
                                is_page_first_layout=False, model_name=model_name, extra_config=extra, **kw)


def kvstore_extra(**settings) -> dict:
    extra = {"backend_name": "kvstore", "module_path": "kvstore.integrations.sglang",
             "class_name": "KVStoreHiCache", "interface_v1": 1, "host_bytes": "4MiB"}
    extra.update(settings)
    return extra


def host_pool(layout: str = "layer_first", dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A real SGLang host pool in ``layout`` over a CPU device pool, filled with random bytes."""
    device = MHATokenToKVPool(DEVICE_TOKENS, PAGE, dtype, HEADS, HEAD_DIM, LAYERS, "cpu", False,
                              start_layer=0, end_layer=LAYERS - 1)
    capacity = device.size if device.host_capacity_tokens is None else device.host_capacity_tokens
    pool = MHATokenToKVPoolHost(device.get_device_pool_infos()[0].buffer_info, 2.0, 0, PAGE, layout,
                                pin_memory=False, device_capacity_tokens=capacity, start_layer=device.start_layer,
                                end_layer=device.end_layer, write_back_staging=device.hicache_write_back_staging)
    raw = pool.kv_buffer.view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)))
    return pool


def make_backend(pool=None, **settings) -> KVStoreHiCache:
    """The backend as SGLang's cache controller builds it: the factory, then ``register_mem_pool_host``."""
    backend = StorageBackendFactory.create_backend("dynamic", storage_config(kvstore_extra(**settings)), pool)
    if pool is not None:
        backend.register_mem_pool_host(pool)
    return backend


def indices(pages) -> torch.Tensor:
    return page_indices(pages, PAGE)


def test_sglang_factory_loads_the_backend(tmp_path):
    backend = make_backend(host_pool(), disk_dir=str(tmp_path / "kv"))
    try:
        assert type(backend) is KVStoreHiCache
        assert backend.layout.block_tokens == PAGE and backend.layout.num_layers == LAYERS
        assert backend.layout.num_kv_heads == HEADS and backend.layout.dtype == torch.bfloat16
        assert backend.config.host_bytes == 4 << 20 and backend.config.disk_dir == str(tmp_path / "kv")
        assert backend.config.model_id == "test/tiny-llama"
        assert [t.name for t in backend.store.tiers] == ["host", "lmdb"]
    finally:
        backend.close()


def test_a_checkpoint_replaced_at_its_path_is_never_served_the_old_pages(tmp_path, monkeypatch):
    """SGLang names the model by its path (served_model_name defaults to model_path): a new fine-tune written
    at the same path, after a restart, was served the old weights' pages from the persistent L3. The id is
    a digest of the weights now, beside SGLang's name."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = tmp_path / "my-finetune"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"weights v1" * 100)
    keys = [f"page-{i}" for i in range(4)]

    def backend(pool):
        built = StorageBackendFactory.create_backend(
            "dynamic", storage_config(kvstore_extra(disk_dir=str(tmp_path / "l3")), model_name=str(model)), pool)
        built.register_mem_pool_host(pool)
        return built

    first = backend(host_pool(seed=1))
    try:
        assert first.config.model_id.startswith("weights-sha256:")
        assert first.batch_set_v1(keys, indices(range(4))) == [True] * 4
        assert first.batch_exists(keys) == 4
    finally:
        first.close()
    (model / "model.safetensors").write_bytes(b"weights v2" * 100)  # the operator deploys a new fine-tune
    second = backend(host_pool(seed=2))
    try:
        assert second.config.model_id != first.config.model_id
        assert second.batch_exists(keys) == 0
        assert second.batch_get_v1(keys, indices(range(10, 14))) == [False] * 4
    finally:
        second.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_page_view_is_canonical_without_a_copy(layout):
    pool = host_pool(layout)
    page = pool.get_data_page(2 * PAGE, flat=False)
    view = canonical_page_view(page, layout)
    assert view.shape == (LAYERS, 2, PAGE, HEADS, HEAD_DIM) and view.data_ptr() == page.data_ptr()
    # Element [l, p, t, h, d] is token t of page 2, layer l, K/V p, head h in the buffer dims of init_kv_buffer.
    buf = pool.kv_buffer
    for layer in range(LAYERS):
        for part in range(2):
            expected = {"layer_first": lambda: buf[part, layer, 2 * PAGE:3 * PAGE],   # [2, L, tokens, H, D]
                        "page_first": lambda: buf[part, 2 * PAGE:3 * PAGE, layer],    # [2, tokens, L, H, D]
                        "page_first_direct": lambda: buf[part, 2, layer],             # [2, pages, L, T, H, D]
                        "page_head": lambda: buf[part, 2, :, :, layer].transpose(0, 1),  # [2, pages, H, T, L, D]
                        }[layout]()
            assert torch.equal(view[layer, part].contiguous().view(torch.uint8),
                               expected.contiguous().view(torch.uint8))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_flat_pages_round_trip_byte_exact(layout):
    pool = host_pool(layout)
    backend = make_backend(pool)
    try:
        ks = keys(6, tag=layout[:4])
        src = [0, 3, 5, 7, 8, 11]
        assert backend.set(ks[0], pool.get_data_page(src[0] * PAGE))
        assert backend.batch_set(ks[1:], [pool.get_data_page(p * PAGE) for p in src[1:]])
        got = backend.batch_get(ks, [pool.get_dummy_flat_data_page() for _ in ks])
        assert all(g is not None for g in got)
        one = backend.get(ks[0], pool.get_dummy_flat_data_page())
        assert one is not None and torch.equal(one.view(torch.uint8), got[0].view(torch.uint8))
        dst = [20, 21, 25, 26, 30, 31]
        for p, flat in zip(dst, got):
            pool.set_from_flat_data_page(p * PAGE, flat)
        for s, d in zip(src, dst):
            assert torch.equal(page_bytes(pool, s * PAGE), page_bytes(pool, d * PAGE))
    finally:
        backend.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_copy_pages_round_trip_byte_exact(layout):
    pool = host_pool(layout)
    backend = make_backend(pool)
    try:
        ks = keys(5, tag="z" + layout[:4])
        src, dst = [1, 2, 4, 9, 10], [16, 18, 19, 24, 28]
        assert backend.batch_set_v1(ks, indices(src)) == [True] * 5
        untouched = {p: page_bytes(pool, p * PAGE) for p in range(pool.page_num) if p not in dst}
        assert backend.batch_get_v1(ks, indices(dst)) == [True] * 5
        for s, d in zip(src, dst):
            assert torch.equal(page_bytes(pool, s * PAGE), page_bytes(pool, d * PAGE))
        for p, before in untouched.items():
            assert torch.equal(page_bytes(pool, p * PAGE), before), f"page {p} changed"
        # The flat and the zero-copy paths store the same blocks.
        flat = backend.get(ks[2], pool.get_dummy_flat_data_page())
        assert torch.equal(flat.view(torch.uint8), pool.get_data_page(src[2] * PAGE).view(torch.uint8))
    finally:
        backend.close()


def test_host_layouts_share_blocks(tmp_path):
    """Pages stored from a layer_first pool load into a page_head pool: the mapping is semantic, not a byte copy."""
    a, b = host_pool("layer_first", seed=1), host_pool("page_head", seed=2)
    ks = keys(4, tag="x")
    writer = make_backend(a, disk_dir=str(tmp_path / "kv"))
    assert writer.batch_set_v1(ks, indices([3, 4, 5, 6])) == [True] * 4
    writer.close()
    reader = make_backend(b, disk_dir=str(tmp_path / "kv"))
    try:
        assert reader.batch_get_v1(ks, indices([10, 11, 12, 13])) == [True] * 4
        for s, d in zip([3, 4, 5, 6], [10, 11, 12, 13]):
            sa = canonical_page_view(a.get_data_page(s * PAGE, flat=False), "layer_first")
            sb = canonical_page_view(b.get_data_page(d * PAGE, flat=False), "page_head")
            assert torch.equal(sa.contiguous().view(torch.uint8), sb.contiguous().view(torch.uint8))
    finally:
        reader.close()


def test_batch_exists_counts_leading_hits_in_one_lookup():
    pool = host_pool()
    backend = make_backend(pool)
    try:
        ks = keys(8, tag="e")
        held = [0, 1, 2, 4, 5]  # a gap at 3
        assert all(backend.batch_set_v1([ks[i]], indices([i])) == [True] for i in held)
        calls = []
        lookup = backend.store.lookup_keyed
        backend.store.lookup_keyed = lambda names, salt=None: calls.append(len(names)) or lookup(names, salt)
        assert backend.batch_exists(ks) == 3
        assert calls == [8]
        assert backend.batch_exists(ks[4:]) == 2
        assert backend.batch_exists(ks[3:]) == 0
        assert backend.batch_exists([]) == 0
        assert backend.exists(ks[4]) and not backend.exists(ks[3])
        assert backend.batch_get_v1(ks, indices(range(16, 24))) == [True] * 3 + [False] * 5
        assert backend.batch_get(ks[:5], [pool.get_dummy_flat_data_page() for _ in range(5)])[3:] == [None, None]
    finally:
        backend.close()


def test_a_fresh_backend_sees_persisted_pages(tmp_path):
    pool = host_pool()
    ks = keys(6, tag="p")
    first = make_backend(pool, disk_dir=str(tmp_path / "kv"))
    assert first.batch_set_v1(ks, indices(range(6))) == [True] * 6
    first.close()  # flushes the write-behind queue to the LMDB tier
    second = make_backend(pool, disk_dir=str(tmp_path / "kv"))
    try:
        assert second.batch_exists(ks) == 6
        assert second.batch_get_v1(ks, indices(range(20, 26))) == [True] * 6
        for s in range(6):
            assert torch.equal(page_bytes(pool, s * PAGE), page_bytes(pool, (20 + s) * PAGE))
        assert second.store.stats()["tiers"]["lmdb"]["hits"] >= 6
    finally:
        second.close()


def test_same_pages_as_hicache_file_side_by_side(tmp_path):
    pool = host_pool()
    ks = keys(6, tag="f")
    src = [0, 2, 4, 6, 8, 10]
    ours = make_backend(pool, disk_dir=str(tmp_path / "kv"))
    theirs = StorageBackendFactory.create_backend(
        "file", storage_config({"file_storage_path": str(tmp_path / "hicache")}), pool)
    try:
        assert isinstance(theirs, HiCacheFile)
        data = [pool.get_data_page(p * PAGE) for p in src]
        assert ours.batch_set(ks[:5], data[:5]) and theirs.batch_set(ks[:5], data[:5])
        assert ours.batch_exists(ks) == theirs.batch_exists(ks) == 5
        got_ours = ours.batch_get(ks[:5], [pool.get_dummy_flat_data_page() for _ in range(5)])
        got_theirs = theirs.batch_get(ks[:5], [pool.get_dummy_flat_data_page() for _ in range(5)])
        for a, b, d in zip(got_ours, got_theirs, data):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
            assert torch.equal(a.view(torch.uint8), d.view(torch.uint8))
        assert ours.get(ks[5], pool.get_dummy_flat_data_page()) is None
        assert theirs.get(ks[5], pool.get_dummy_flat_data_page()) is None
    finally:
        ours.close()


def test_tp_ranks_and_clear_never_mix(tmp_path):
    pool = host_pool()
    ks = keys(2, tag="t")
    extra = kvstore_extra(files_dir=str(tmp_path / "shared"))  # one directory all ranks' processes share
    rank0 = StorageBackendFactory.create_backend("dynamic", storage_config(extra, tp_rank=0, tp_size=2), None)
    rank0.register_mem_pool_host(pool)
    assert rank0.batch_set_v1(ks, indices([0, 1])) == [True, True]
    rank0.close()
    rank1 = StorageBackendFactory.create_backend("dynamic", storage_config(extra, tp_rank=1, tp_size=2), None)
    rank1.register_mem_pool_host(pool)
    again0 = StorageBackendFactory.create_backend("dynamic", storage_config(extra, tp_rank=0, tp_size=2), None)
    again0.register_mem_pool_host(pool)
    try:
        assert rank1.batch_exists(ks) == 0
        assert again0.batch_exists(ks) == 2
        assert rank1.config.disk_dir is None
        again0.clear()
        assert again0.batch_exists(ks) == 0
        assert again0.batch_get_v1(ks, indices([4, 5])) == [False, False]
    finally:
        rank1.close()
        again0.close()


def test_pages_of_older_weights_are_never_served_once_sglang_moves_its_weight_version(tmp_path):
    """SGLang's weight updates (``update_weights_from_tensor`` in RL rollouts) flush its own caches, never the
    storage backend's: the L3 served the old policy's pages. The keys follow SGLang's published version."""
    from sglang.srt.runtime_context import get_context
    context = get_context()
    with context.override_server_args(device="cpu"):
        context.override("test", weight_version="policy-1")
        old, new = host_pool(seed=1), host_pool(seed=2)
        backend = make_backend(old, files_dir=str(tmp_path / "shared"))
        ks = keys(4, tag="w")
        try:
            assert backend.batch_set_v1(ks, indices(range(4))) == [True] * 4
            context.override("test", weight_version="policy-2")  # record_weight_version_change's write
            assert backend.batch_exists(ks) == 0
            backend.register_mem_pool_host(new)
            assert backend.batch_set_v1(ks, indices(range(4))) == [True] * 4
            dst = host_pool(seed=3)
            backend.register_mem_pool_host(dst)
            assert backend.batch_get_v1(ks, indices(range(8, 12))) == [True] * 4
            assert all(torch.equal(page_bytes(dst, (8 + i) * PAGE), page_bytes(new, i * PAGE)) for i in range(4))
            context.override("test", weight_version="policy-1")  # the older policy again: its own pages
            assert backend.batch_get_v1(ks, indices(range(8, 12))) == [True] * 4
            assert all(torch.equal(page_bytes(dst, (8 + i) * PAGE), page_bytes(old, i * PAGE)) for i in range(4))
        finally:
            backend.close()


def test_engines_clearing_one_shared_directory_never_meet_each_others_pages(tmp_path):
    """``clear()`` counted generations from 0 in every process: two engines sharing ``files_dir`` that each
    cleared once were both at generation 1, and one was served the other's pages."""
    ks = keys(4, tag="g")
    shared = str(tmp_path / "shared")
    a_pool = host_pool(seed=4)
    a = make_backend(a_pool, files_dir=shared)
    b = make_backend(host_pool(seed=5), files_dir=shared)
    try:
        a.clear()
        assert a.batch_set_v1(ks, indices(range(4))) == [True] * 4
        assert a.store.flush(10)  # in files_dir, which b reads
        b.clear()
        assert b.batch_exists(ks) == 0
        assert b.batch_get_v1(ks, indices(range(8, 12))) == [False] * 4
        assert a.batch_exists(ks) == 4
    finally:
        a.close()
        b.close()


def test_a_second_engine_on_the_node_opens_a_default_l3_of_its_own(tmp_path, monkeypatch):
    """Two SGLang servers on one node with the default L3: the second failed to start (its LMDB directory is
    the first's). It takes the next free ``sglang-l3-N``; a disk_dir someone gave is still refused."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    def default_l3(pool, **settings):  # no tier named: SGLang's L3 defaults
        extra = {k: v for k, v in kvstore_extra(**settings).items() if k != "host_bytes"}
        backend = StorageBackendFactory.create_backend("dynamic", storage_config(extra), pool)
        backend.register_mem_pool_host(pool)
        return backend
    first = default_l3(host_pool(seed=6))
    second = default_l3(host_pool(seed=7))
    try:
        default = tmp_path / "xdg" / "kvstore" / "sglang-l3"
        assert first.config.disk_dir == str(default) and second.config.disk_dir == f"{default}-1"
        assert second.pools.config.disk_dir == f"{default}-1"  # every pool of the engine (a hybrid model's)
        ks = keys(2, tag="d")
        assert second.batch_set_v1(ks, indices([0, 1])) == [True, True]
        assert second.batch_exists(ks) == 2 and first.batch_exists(ks) == 0
        mine = default_l3(host_pool(seed=8), disk_dir=str(tmp_path / "mine"))
        with pytest.raises(DirectoryInUseError):
            default_l3(host_pool(seed=9), disk_dir=str(tmp_path / "mine"))
        mine.close()
        second.close()
        third = default_l3(host_pool(seed=10))  # a closed engine's directory is free again
        assert third.config.disk_dir == f"{default}-1"
        third.close()
    finally:
        first.close()
        second.close()


def test_an_mla_model_at_tp_2_has_its_shared_tiers_take_every_page_at_once(tmp_path):
    """MLA pages are backed up from TP rank 0 only, once, and SGLang takes the least hit over the ranks: with a
    files tier admitting pages seen twice (the README's sample), or taking them on eviction, rank 0 held them
    alone and no rank was ever served one."""
    from kvstore.integrations.sglang import store_config_from
    extra = kvstore_extra(files_dir=str(tmp_path / "shared"), files_admit_after=2, files_write_policy="write_back",
                          queue_full="drop")
    for rank in (0, 1):
        config, _ = store_config_from(HiCacheStorageConfig(
            tp_rank=rank, tp_size=2, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1, is_mla_model=True,
            enable_storage_metrics=False, is_page_first_layout=False, model_name="test/tiny-mla", extra_config=extra))
        assert (config.files_admit_after, config.tier_write_policy("files"), config.queue_full) == (
            1, "write_through", "block")
    config, _ = store_config_from(storage_config(extra))  # not MLA: as given
    assert (config.files_admit_after, config.tier_write_policy("files"), config.queue_full) == (
        2, "write_back", "drop")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_misses_and_failures_never_raise_into_sglang():
    pool = host_pool()
    unregistered = make_backend(None)
    assert unregistered.get("a", pool.get_dummy_flat_data_page()) is None
    assert unregistered.set("a", pool.get_data_page(0)) is False
    assert unregistered.batch_exists(["a"]) == 0 and unregistered.exists("a") is False
    assert unregistered.batch_get_v1(["a"], indices([0])) == [False]
    assert unregistered.batch_set_v1(["a"], indices([0])) == [False]

    backend = make_backend(pool)
    assert backend.get("missing", pool.get_dummy_flat_data_page()) is None
    assert backend.batch_get(["missing", "x"], [pool.get_dummy_flat_data_page()] * 2) == [None, None]
    assert backend.batch_get_v1(["missing"], indices([3])) == [False]
    assert backend.set("short", torch.zeros(7, dtype=torch.bfloat16)) is False  # not a page
    assert backend.set("dtype", pool.get_data_page(0).float()) is False
    assert backend.batch_set_v1(["a", "b"], indices([0])) == [False, False]  # one page of indices for two keys
    assert backend.batch_get(["a"], [pool.get_dummy_flat_data_page()] * 2) == [None]
    backend.close()
    backend.close()
    assert backend.get("a", pool.get_dummy_flat_data_page()) is None
    assert backend.set("a", pool.get_data_page(0)) is False
    assert backend.batch_exists(["a"]) == 0
    assert backend.batch_set_v1(["a"], indices([0])) == [False]

    down = make_backend(pool, host_bytes=0, remote_url=f"kvstore://127.0.0.1:{_closed_port()}",
                        remote_timeout_seconds=0.2)
    try:
        assert down.batch_set_v1(["a"], indices([0])) == [False]
        assert down.set("a", pool.get_data_page(0)) is False
        assert down.batch_exists(["a"]) == 0
        assert down.batch_get_v1(["a"], indices([1])) == [False]
        assert down.get("a", pool.get_dummy_flat_data_page()) is None
    finally:
        down.close()


@pytest.mark.parametrize("layout", ["layer_first", "page_first", "page_first_direct"])
def test_indices_that_are_no_whole_pages_inside_the_pool_are_misses_that_store_and_write_nothing(layout, tmp_path):
    """Only a page's first index was read: a run from 8 tokens before the pool's end stored a half page under
    the key (read by nothing, and deduplicating the whole page later), and a run starting mid-page wrote the
    whole page it fell in. SGLang sends whole pages; anything else is a miss that touches nothing."""
    pool = host_pool(layout)
    backend = make_backend(pool, disk_dir=str(tmp_path / "kv"))
    try:
        assert backend.batch_set_v1(keys(1, "w"), indices([0])) == [True]
        past_end = torch.arange(pool.size - PAGE // 2, pool.size + PAGE // 2)
        mid_page = torch.arange(3 * PAGE + 3, 4 * PAGE + 3)
        shuffled = indices([5]).flip(0)
        for bad in (past_end, mid_page, shuffled, indices([5]).float()):
            assert backend.batch_set_v1(keys(1, "h"), bad) == [False]
            assert backend.batch_exists(keys(1, "h")) == 0
            before = [page_bytes(pool, p * PAGE).clone() for p in (3, 4)]
            assert backend.batch_get_v1(keys(1, "w"), bad) == [False]
            assert all(torch.equal(page_bytes(pool, p * PAGE), b) for p, b in zip((3, 4), before))
        assert backend.batch_set_v1(keys(1, "h"), indices([2])) == [True]  # the whole page, stored as ever
        assert backend.batch_get_v1(keys(1, "h"), indices([6])) == [True]
        assert torch.equal(page_bytes(pool, 6 * PAGE), page_bytes(pool, 2 * PAGE))
    finally:
        backend.close()


def test_split_heads_tp_is_refused_at_registration_not_stored_as_flat_pages(tmp_path):
    """The split-heads refusal was caught as "a pool kvstore cannot view" and the pool stored as flat pages,
    keyed by the prefill's TP size: a decode rank at another TP size never hit, and nothing said why."""
    config = storage_config(kvstore_extra(files_dir=str(tmp_path / "f"), host_bytes=0), 0, 2, tp_lcm_size=4,
                            should_split_heads=True)
    backend = StorageBackendFactory.create_backend("dynamic", config, None)
    try:
        with pytest.raises(ValueError, match="should_split_heads"):
            backend.register_mem_pool_host(host_pool("page_head"))
    finally:
        backend.close()


def test_arguments_sglang_never_sends_are_misses_not_exceptions():
    backend = make_backend(host_pool())
    try:
        assert backend.batch_get_v1(None, indices([0])) == []
        assert backend.batch_set_v1(None, indices([0])) == []
        assert backend.batch_get(None) == [] and backend.batch_exists(None) == 0
        assert backend.batch_get_v2(["kv"]) == {}  # no PoolTransfer items
    finally:
        backend.close()


def test_each_rank_gets_its_own_disk_dir(tmp_path):
    """SGLang runs ranks as processes and LMDB locks its directory: ranks get subdirectories of disk_dir."""
    pool = host_pool()
    extra = kvstore_extra(disk_dir=str(tmp_path / "kv"))
    ranks = [StorageBackendFactory.create_backend("dynamic", storage_config(extra, tp_rank=r, tp_size=2), None)
             for r in range(2)]
    try:
        for r, backend in enumerate(ranks):
            backend.register_mem_pool_host(pool)
            assert backend.config.disk_dir == str(tmp_path / "kv" / f"rank-tp{r}of2-pp0of1-cp0of1")
        assert ranks[0].batch_set_v1(keys(1, "d"), indices([0])) == [True]
        assert ranks[1].batch_exists(keys(1, "d")) == 0
    finally:
        for backend in ranks:
            backend.close()


def test_dp_attention_ranks_open_their_own_disk_dirs(tmp_path):
    """With DP attention each DP rank's attention group has TP rank 0 of 1: without the DP rank in the
    directory, the second DP rank on a node could not open its LMDB (the first holds the lock)."""
    pool = host_pool()
    extra = kvstore_extra(disk_dir=str(tmp_path / "kv"))
    ranks = [StorageBackendFactory.create_backend("dynamic", storage_config(extra, dp_rank=d), None) for d in range(3)]
    try:
        for backend in ranks:
            backend.register_mem_pool_host(pool)  # each opens its LMDB environment: none is locked out
        kv = tmp_path / "kv"
        assert [b.config.disk_dir for b in ranks] == [str(kv), str(kv / "rank-dp1-tp0of1-pp0of1-cp0of1"),
                                                      str(kv / "rank-dp2-tp0of1-pp0of1-cp0of1")]
        assert [t.name for t in ranks[2].store.tiers] == ["host", "lmdb"]
        assert ranks[2].batch_set_v1(keys(1, "p"), indices([0])) == [True]
    finally:
        for backend in ranks:
            backend.close()


def test_config_from_extra_config_and_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KVSTORE_DISK_CODEC", "zstd")
    monkeypatch.setenv("KVSTORE_HOST_BYTES", "64MiB")
    backend = make_backend(None, host_bytes="8MiB", disk_dir=str(tmp_path / "kv"), salt="tenant-a")
    assert backend.config.disk_codec == "zstd"  # from the environment
    assert backend.config.host_bytes == 8 << 20  # extra_config wins over the environment
    monkeypatch.delenv("KVSTORE_DISK_CODEC")
    monkeypatch.delenv("KVSTORE_HOST_BYTES")
    with pytest.raises(ValueError, match="host_byte"):
        make_backend(None, host_byte="1GiB")
    with pytest.raises(ValueError, match="nope"):  # StoreConfig does not name disk_codec here (reported)
        make_backend(None, disk_codec="nope")
    with pytest.raises(ValueError, match=r"extra_config\['kvstore_config'\]: expected a readable .*missing.toml"):
        make_backend(None, kvstore_config=str(tmp_path / "missing.toml"))


def test_a_call_after_close_is_a_miss_that_says_the_backend_closed(tmp_path, caplog):
    pool = host_pool()
    backend = make_backend(pool, host_bytes="1MiB", disk_dir=str(tmp_path / "kv"))
    ks = keys(2, tag="closed")
    assert backend.batch_set_v1(ks, indices(range(2))) == [True, True]
    backend.close()
    with caplog.at_level("WARNING"):
        assert backend.batch_exists(ks) == 0
    assert "the backend is closed" in caplog.text and "no host pool registered" not in caplog.text


def test_compressed_disk_round_trips_lossless(tmp_path):
    """zstd on the disk tier: a page evicted from host RAM comes back byte-exact from LMDB."""
    pool = host_pool()
    n = 24  # 24 pages of 3 KiB (bf16, 3 layers x 2 x 16 x 2 x 16) > a 32 KiB host tier
    ks = keys(n, tag="c")
    backend = make_backend(pool, host_bytes="32KiB", disk_dir=str(tmp_path / "kv"), disk_codec="zstd")
    try:
        assert backend.batch_set_v1(ks, indices(range(n))) == [True] * n
        backend.store.flush()
        assert backend.batch_exists(ks) == n
        # the host tier keeps a batch's leading pages: the last ones are on the disk only
        assert backend.batch_get_v1(ks[-4:], indices(range(28, 32))) == [True] * 4
        for s in range(4):
            assert torch.equal(page_bytes(pool, (n - 4 + s) * PAGE), page_bytes(pool, (28 + s) * PAGE))
        assert backend.store.stats()["tiers"]["lmdb"]["hits"] >= 1
    finally:
        backend.close()


def test_default_l3_keeps_no_second_host_copy(tmp_path, monkeypatch):
    """SGLang's own pinned host pool is the L2: without ``host_bytes`` kvstore opens no host tier, and without a
    lower tier it keeps pages on the local disk (per rank), where a restart finds them."""
    pool = host_pool()
    extra = {k: v for k, v in kvstore_extra().items() if k != "host_bytes"}

    def build(config):
        backend = StorageBackendFactory.create_backend("dynamic", config, None)
        backend.register_mem_pool_host(pool)
        return backend
    backend = build(storage_config(extra))
    try:
        default_dir = str(tmp_path / "xdg-cache" / "kvstore" / "sglang-l3")
        assert backend.config.host_bytes == 0 and backend.config.disk_dir == default_dir
        assert [t.name for t in backend.store.tiers] == ["lmdb"]
        assert backend.batch_set_v1(keys(3, "l3"), indices([0, 1, 2])) == [True] * 3
    finally:
        backend.close()
    again = build(storage_config(extra))
    try:
        assert again.batch_get_v1(keys(3, "l3"), indices([10, 11, 12])) == [True] * 3
        for s, d in zip([0, 1, 2], [10, 11, 12]):
            assert torch.equal(page_bytes(pool, s * PAGE), page_bytes(pool, d * PAGE))
    finally:
        again.close()
    shared = build(storage_config({**extra, "files_dir": str(tmp_path / "shared")}, tp_rank=1, tp_size=2))
    try:  # a shared tier given: no local disk added, and still no host copy
        assert shared.config.disk_dir is None and [t.name for t in shared.store.tiers] == ["files"]
    finally:
        shared.close()
    monkeypatch.setenv("KVSTORE_HOST_BYTES", "2MiB")  # asked for, anywhere: kept, and alone it is host-only
    asked = StorageBackendFactory.create_backend("dynamic", storage_config(extra), None)
    assert asked.config.host_bytes == 2 << 20 and asked.config.disk_dir is None


def test_storage_metrics_reach_sglangs_collector(tmp_path):
    """``get_stats()`` is what SGLang's ``StorageMetricsCollector`` takes: pages and GB/s per prefetch and backup
    call, handed over once."""
    with stubbed_torchvision():
        from sglang.srt.observability.metrics_collector import StorageMetrics, StorageMetricsCollector
    pool = host_pool()
    backend = make_backend(pool, disk_dir=str(tmp_path / "kv"))
    try:
        assert backend.batch_set_v1(keys(4, "m"), indices(range(4))) == [True] * 4
        assert backend.batch_set(keys(2, "n"), [pool.get_data_page(p * PAGE) for p in (5, 6)])
        assert backend.batch_get_v1(keys(4, "m") + keys(1, "x"), indices(range(8, 13))) == [True] * 4 + [False]
        metrics = backend.get_stats()
        assert isinstance(metrics, StorageMetrics)
        assert metrics.backup_pgs == [4, 2] and metrics.prefetch_pgs == [4]
        assert len(metrics.backup_bandwidth) == 2 and all(bw > 0 for bw in metrics.prefetch_bandwidth)
        collector = StorageMetricsCollector(labels={"model_name": "test", "storage_backend": "kvstore"})
        collector.log_storage_metrics(metrics)
        assert collector.histogram_prefetch_pgs.labels(model_name="test", storage_backend="kvstore")._sum.get() == 4
        assert backend.get_stats().prefetch_pgs == []  # handed over once
        totals = backend.counters.totals()
        assert totals["prefetch"]["misses"] == 1 and totals["backup"]["bytes"] == 6 * backend.layout.block_bytes
    finally:
        backend.close()


def test_fp8_formats_are_kept_apart(tmp_path):
    """SGLang's host pool holds fp8 KV as bytes whatever the format: ``kv_cache_dtype`` binds it into the keys,
    so an e5m2 engine is never served an e4m3 engine's pages (the same model, the same page hashes)."""
    pool = host_pool(dtype=torch.float8_e4m3fn)
    assert pool.dtype == torch.uint8  # what SGLang hands the backend: no format
    e4m3 = make_backend(pool, disk_dir=str(tmp_path / "kv"), kv_cache_dtype="fp8_e4m3")
    try:
        assert e4m3.batch_set_v1(keys(2, "f"), indices([0, 1])) == [True, True]
    finally:
        e4m3.close()
    e5m2 = make_backend(pool, disk_dir=str(tmp_path / "kv"), kv_cache_dtype="fp8_e5m2")
    try:
        assert e5m2.batch_exists(keys(2, "f")) == 0
    finally:
        e5m2.close()
    again = make_backend(pool, disk_dir=str(tmp_path / "kv"), kv_cache_dtype="fp8_e4m3")
    try:
        assert again.batch_get_v1(keys(2, "f"), indices([8, 9])) == [True, True]
        assert torch.equal(page_bytes(pool, 0), page_bytes(pool, 8 * PAGE))
    finally:
        again.close()
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        make_backend(None, kv_cache_dtype="e4m3")


def test_fp8_formats_are_kept_apart_by_sglangs_own_server_arguments(tmp_path):
    """Without ``extra_config kv_cache_dtype`` the format comes from SGLang's ``--kv-cache-dtype``: only a
    warning was logged, and an e5m2 engine was served an e4m3 engine's pages (other values for the same bytes).
    With neither, the backend refuses the byte-stored pool at registration."""
    from sglang.srt.runtime_context import get_context
    pool = host_pool(dtype=torch.float8_e4m3fn)
    stored = page_bytes(pool, 0).clone()
    with get_context().override_server_args(device="cpu", kv_cache_dtype="fp8_e4m3"):
        e4m3 = make_backend(pool, disk_dir=str(tmp_path / "kv"))
        try:
            assert e4m3.batch_set_v1(keys(2, "f"), indices([0, 1])) == [True, True]
        finally:
            e4m3.close()
    with get_context().override_server_args(device="cpu", kv_cache_dtype="fp8_e5m2"):
        e5m2 = make_backend(pool, disk_dir=str(tmp_path / "kv"))
        try:
            assert e5m2.batch_exists(keys(2, "f")) == 0
        finally:
            e5m2.close()
    with get_context().override_server_args(device="cpu", kv_cache_dtype="fp8_e4m3"):
        again = make_backend(pool, disk_dir=str(tmp_path / "kv"))
        try:
            assert again.batch_get_v1(keys(2, "f"), indices([8, 9])) == [True, True]
            assert torch.equal(page_bytes(pool, 8 * PAGE), stored)
        finally:
            again.close()
    with pytest.raises(ValueError, match="no server arguments say which format.*kv_cache_dtype"):
        make_backend(pool, disk_dir=str(tmp_path / "kv"))


def test_an_extra_config_format_that_contradicts_sglangs_own_is_refused_at_start(tmp_path):
    """extra_config's kv_cache_dtype was taken over SGLang's --kv-cache-dtype unchecked: an e5m2 engine whose
    extra_config still said e4m3 was served an e4m3 engine's pages as its own. SGLang's other spellings of
    a format key it alike."""
    from sglang.srt.runtime_context import get_context
    pool = host_pool(dtype=torch.float8_e4m3fn)
    with get_context().override_server_args(device="cpu", kv_cache_dtype="fp8_e5m2"):
        with pytest.raises(ValueError, match=r"kv_cache_dtype.*'fp8_e5m2'.*got 'fp8_e4m3'"):
            make_backend(pool, disk_dir=str(tmp_path / "kv"), kv_cache_dtype="fp8_e4m3")
    with get_context().override_server_args(device="cpu", kv_cache_dtype="fp8_e4m3"):
        spelled = make_backend(pool, disk_dir=str(tmp_path / "kv"), kv_cache_dtype="fp8_e4m3fn")
        try:
            assert spelled.batch_set_v1(keys(1, "s"), indices([0])) == [True]
        finally:
            spelled.close()
        plain = make_backend(pool, disk_dir=str(tmp_path / "kv"))
        try:
            assert plain.batch_exists(keys(1, "s")) == 1
        finally:
            plain.close()


def test_a_pipeline_stage_of_other_layers_is_not_served_a_former_stages_pages(tmp_path):
    """A re-partitioned pipeline (44 layers as 11,10,12,11, then 10,10,13,11) gives stage 1 ten layers both times,
    from layer 11 and then from layer 10: over a shared tier the new stage was served layers 11..20 as 10..19."""
    def stage(start: int, seed: int):
        device = MHATokenToKVPool(DEVICE_TOKENS, PAGE, torch.bfloat16, HEADS, HEAD_DIM, 10, "cpu", False,
                                  start_layer=start, end_layer=start + 9)
        pool = MHATokenToKVPoolHost(device.get_device_pool_infos()[0].buffer_info, 2.0, 0, PAGE, "layer_first",
                                    pin_memory=False, device_capacity_tokens=device.size, start_layer=start,
                                    end_layer=start + 9, write_back_staging=device.hicache_write_back_staging)
        raw = pool.kv_buffer.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)))
        config = HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=1, pp_size=4, attn_cp_rank=0, attn_cp_size=1,
                                      is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=False,
                                      model_name="test/44-layers",
                                      extra_config=kvstore_extra(host_bytes=0, files_dir=str(tmp_path / "shared")))
        backend = StorageBackendFactory.create_backend("dynamic", config, pool)
        backend.register_mem_pool_host(pool)
        return pool, backend

    ks = keys(2, "pp")
    _, first = stage(11, seed=1)
    try:
        assert first.batch_set_v1(ks, indices([0, 1])) == [True, True]
    finally:
        first.close()
    _, second = stage(10, seed=2)
    try:
        assert second.batch_exists(ks) == 0 and second.batch_get_v1(ks, indices([4, 5])) == [False, False]
    finally:
        second.close()
    _, again = stage(11, seed=3)  # the same partition again: its own pages
    try:
        assert again.batch_exists(ks) == 2
    finally:
        again.close()


@pytest.mark.parametrize("passed", [True, False])
def test_a_backup_after_the_pages_sglang_names_never_evicts_them(passed):
    """SGLang backs a sequence's pages up batch by batch, naming the pages before each batch
    (``prefix_keys``, with ``hicache_storage_pass_prefix_keys``): a full tier evicted them, the least
    recently used, for the new ones, and the sequence was lost (batch_exists 0). Named, they stay and the
    new pages that find no room are refused; not named, eviction is as before."""
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageExtraInfo
    pool = host_pool(seed=4)
    probe = make_backend(pool)
    block_bytes = probe.store.layout.block_bytes
    probe.close()
    backend = make_backend(pool, host_bytes=2 * block_bytes)
    try:
        ks = keys(4, tag="prefix")
        assert backend.batch_set_v1(ks[:2], indices([1, 2])) == [True] * 2
        info = HiCacheStorageExtraInfo(prefix_keys=ks[:2] if passed else None)
        result = backend.batch_set_v1(ks[2:], indices([3, 4]), info)
        if passed:
            assert result == [False, False] and backend.batch_exists(ks) == 2
            assert backend.batch_get_v1(ks[:2], indices([20, 21])) == [True] * 2
            for s, d in zip([1, 2], [20, 21]):
                assert torch.equal(page_bytes(pool, s * PAGE), page_bytes(pool, d * PAGE))
        else:
            assert result == [True] * 2 and backend.batch_exists(ks) == 0
    finally:
        backend.close()
