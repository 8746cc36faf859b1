"""The kvstore HiCache backend under SGLang's MLA host pools and SGLang's own HiCacheController.

Runs only where SGLang is installed (``.venv-sglang``, built by
``scripts/engine-venvs.sh sglang``); elsewhere the module skips. Everything is
SGLang's real code on "cpu": ``MLATokenToKVPool`` / ``MLATokenToKVPoolHost``
in each MLA host layout that has pages on this version, and SGLang's cache
controllers (``HiCacheController`` and the ``HybridCacheController`` its
scheduler builds for a plain MHA/MLA model), which build the backend through
SGLang's ``dynamic`` storage factory and move pages with their own backup and
prefetch threads. The test stands in for the radix tree only: it hands the
controller page hashes, host slots and queue items the way the tree does.
Host pools hold random bytes (every bit pattern, NaNs included): every
comparison is of bytes.

What the controller cannot do on a CPU machine is its device <-> host (L2)
copy: ``write``/``load`` call ``transfer_kv_*`` kernels that SGLang imports
only for CUDA/HIP/XPU (a ``NameError`` on CPU), so the host pool is filled
directly, which is where that copy would have put the pages. The host <->
storage (L3) path this backend serves (``write_storage``, ``prefetch``, its
hit query and page transfer, the acks) is SGLang's unchanged code.

SGLang's multimodal configs import torchvision, whose registry build is
CUDA-only: where it cannot be found, a stub module stands in while the pools
import (``sglang_env.py``).
"""

from __future__ import annotations

import threading
import types

import pytest
import torch

pytest.importorskip("sglang", reason="needs SGLang 0.5.23: build .venv-sglang with scripts/engine-venvs.sh sglang "
                                     "and run .venv-sglang/bin/pytest")

from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig  # noqa: E402
from sglang.srt.mem_cache.storage import StorageBackendFactory  # noqa: E402

from kvstore.integrations.sglang import KVStoreHiCache, canonical_page_view  # noqa: E402
from sglang_env import keys, no_failure_injection, page_bytes, page_indices, stubbed_torchvision  # noqa: E402,F401


def _import_sglang():
    """SGLang's pools, allocator and cache controller (torchvision stubbed while they import, if it is missing)."""
    with stubbed_torchvision():
        from sglang.srt.managers.cache_controller import HiCacheController
        from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
        from sglang.srt.mem_cache.base_prefix_cache import CacheRequestHandle
        from sglang.srt.mem_cache.hicache_storage import PoolName
        from sglang.srt.mem_cache.hybrid_cache.hybrid_cache_controller import HybridCacheController
        from sglang.srt.mem_cache.hybrid_cache.hybrid_pool_assembler import build_pool_entry
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
        from sglang.srt.mem_cache.pool_host import HostPoolGroup
        from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
        from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost
        from sglang.srt.mem_cache.utils import get_storage_hash_str
        from sglang.srt.runtime_context import get_parallel
    return types.SimpleNamespace(
        HiCacheController=HiCacheController, PagedTokenToKVPoolAllocator=PagedTokenToKVPoolAllocator,
        CacheRequestHandle=CacheRequestHandle, PoolName=PoolName, HybridCacheController=HybridCacheController,
        build_pool_entry=build_pool_entry, MHATokenToKVPool=MHATokenToKVPool,
        MLATokenToKVPool=MLATokenToKVPool, HostPoolGroup=HostPoolGroup,
        MHATokenToKVPoolHost=MHATokenToKVPoolHost, MLATokenToKVPoolHost=MLATokenToKVPoolHost,
        get_storage_hash_str=get_storage_hash_str, get_parallel=get_parallel)


sgl = _import_sglang()

# The MLA host layouts with pages (get_data_page) in SGLang 0.5.23; "page_unified" allocates a buffer but has no
# page accessors (refused, see test_mla_page_unified_is_refused), "page_first_kv_split" is Ascend-only.
MLA_LAYOUTS = ("layer_first", "page_first", "page_first_direct")
MHA_LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")
LAYERS, PAGE, DEVICE_TOKENS = 2, 16, 256  # host pools hold 2x the device tokens (+ a page): 33 pages
KV_LORA_RANK, QK_ROPE_HEAD_DIM = 32, 16
MLA_DIM = KV_LORA_RANK + QK_ROPE_HEAD_DIM
HEADS, HEAD_DIM = 2, 16
TIMEOUT = 30.0  # seconds to wait for one of the controller's threads (they answer in milliseconds)


def _fill_random(pool, seed: int):
    raw = pool.kv_buffer.view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)))
    return pool


def mla_device_pool():
    return sgl.MLATokenToKVPool(DEVICE_TOKENS, PAGE, torch.bfloat16, KV_LORA_RANK, QK_ROPE_HEAD_DIM, LAYERS, "cpu",
                                False, start_layer=0, end_layer=LAYERS - 1)


def mha_device_pool():
    return sgl.MHATokenToKVPool(DEVICE_TOKENS, PAGE, torch.bfloat16, HEADS, HEAD_DIM, LAYERS, "cpu", False,
                                start_layer=0, end_layer=LAYERS - 1)


def host_pool_for(device, layout: str, seed: int = 0):
    """SGLang's host pool over ``device`` with the arguments its pool assembler passes (host ratio 2, no draft
    layers), filled with random bytes."""
    capacity = device.size if device.host_capacity_tokens is None else device.host_capacity_tokens
    info = device.get_device_pool_infos()[0].buffer_info
    if isinstance(device, sgl.MLATokenToKVPool):
        pool = sgl.MLATokenToKVPoolHost(info, 2.0, 0, PAGE, layout, pin_memory=False,
                                        device_capacity_tokens=capacity, start_layer=device.start_layer,
                                        end_layer=device.end_layer, target_layer_num=device.layer_num,
                                        override_kv_cache_dim=device.kv_cache_dim)
    else:
        pool = sgl.MHATokenToKVPoolHost(info, 2.0, 0, PAGE, layout, pin_memory=False,
                                        device_capacity_tokens=capacity, start_layer=device.start_layer,
                                        end_layer=device.end_layer,
                                        write_back_staging=device.hicache_write_back_staging)
    return _fill_random(pool, seed)


def mla_host_pool(layout: str = "layer_first", seed: int = 0):
    return host_pool_for(mla_device_pool(), layout, seed)


def storage_config(extra: dict, tp_rank: int = 0, tp_size: int = 1, mla: bool = True) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
                                attn_cp_size=1, is_mla_model=mla, enable_storage_metrics=False,
                                is_page_first_layout=False, model_name="test/tiny-mla", extra_config=extra)


def kvstore_extra(**settings) -> dict:
    extra = {"backend_name": "kvstore", "module_path": "kvstore.integrations.sglang",
             "class_name": "KVStoreHiCache", "interface_v1": 1, "host_bytes": "4MiB"}
    extra.update(settings)
    return extra


def make_mla_backend(pool, tp_rank: int = 0, tp_size: int = 1, **settings) -> KVStoreHiCache:
    """The backend as SGLang's cache controller builds it: the factory, then ``register_mem_pool_host``."""
    backend = StorageBackendFactory.create_backend(
        "dynamic", storage_config(kvstore_extra(**settings), tp_rank, tp_size), pool)
    backend.register_mem_pool_host(pool)
    return backend


def indices(pages) -> torch.Tensor:
    return page_indices(pages, PAGE)


# -- MLA host pools -------------------------------------------------------------------------------


def test_mla_pool_registers_a_rank_replicated_layout(tmp_path):
    pool = mla_host_pool()
    backend = make_mla_backend(pool, tp_rank=1, tp_size=2, files_dir=str(tmp_path / "shared"))
    try:
        layout = backend.layout
        assert backend.mla and backend.host_layout == "layer_first"
        assert (layout.num_layers, layout.kv_parts, layout.block_tokens) == (LAYERS, 1, PAGE)
        assert (layout.num_kv_heads, layout.head_dim, layout.dtype) == (1, MLA_DIM, torch.bfloat16)
        assert (layout.tp_rank, layout.tp_size) == (0, 1)  # the same KV on every TP rank
        assert layout.block_bytes == LAYERS * PAGE * MLA_DIM * 2 == pool.get_data_page(0).nbytes
    finally:
        backend.close()


@pytest.mark.parametrize("layout", MLA_LAYOUTS)
def test_mla_page_view_is_canonical_without_a_copy(layout):
    pool = mla_host_pool(layout)
    page = pool.get_data_page(3 * PAGE, flat=False)
    view = canonical_page_view(page, layout, mla=True)
    assert view.shape == (LAYERS, 1, PAGE, 1, MLA_DIM) and view.data_ptr() == page.data_ptr()
    buf = pool.kv_buffer  # the dims of MLATokenToKVPoolHost.init_kv_buffer
    for layer in range(LAYERS):
        expected = {"layer_first": lambda: buf[layer, 3 * PAGE:4 * PAGE],        # [L, tokens, 1, D]
                    "page_first": lambda: buf[3 * PAGE:4 * PAGE, layer],         # [tokens, L, 1, D]
                    "page_first_direct": lambda: buf[3, layer],                  # [pages, L, T, 1, D]
                    }[layout]()
        assert torch.equal(view[layer, 0].contiguous().view(torch.uint8), expected.contiguous().view(torch.uint8))


@pytest.mark.parametrize("layout", MLA_LAYOUTS)
def test_mla_zero_copy_pages_round_trip_byte_exact(layout):
    pool = mla_host_pool(layout)
    backend = make_mla_backend(pool)
    try:
        ks = keys(5, tag="mz" + layout[:4])
        src, dst = [0, 2, 3, 7, 11], [17, 20, 21, 26, 32]
        assert backend.batch_set_v1(ks, indices(src)) == [True] * 5
        untouched = {p: page_bytes(pool, p * PAGE) for p in range(pool.page_num) if p not in dst}
        assert any(not torch.equal(page_bytes(pool, s * PAGE), page_bytes(pool, d * PAGE)) for s, d in zip(src, dst))
        assert backend.batch_get_v1(ks, indices(dst)) == [True] * 5
        for s, d in zip(src, dst):
            assert torch.equal(page_bytes(pool, s * PAGE), page_bytes(pool, d * PAGE)), (s, d)
        for p, before in untouched.items():
            assert torch.equal(page_bytes(pool, p * PAGE), before), f"page {p} changed"
        # The zero-copy and the flat paths store the same blocks.
        flat = backend.get(ks[3], pool.get_dummy_flat_data_page())
        assert torch.equal(flat.view(torch.uint8), pool.get_data_page(src[3] * PAGE).view(torch.uint8))
    finally:
        backend.close()


@pytest.mark.parametrize("layout", MLA_LAYOUTS)
def test_mla_flat_pages_round_trip_byte_exact(layout):
    pool = mla_host_pool(layout)
    backend = make_mla_backend(pool)
    try:
        ks = keys(6, tag="mf" + layout[:4])
        src, dst = [1, 4, 5, 6, 9, 12], [16, 18, 22, 27, 30, 31]
        assert backend.set(ks[0], pool.get_data_page(src[0] * PAGE))
        assert backend.batch_set(ks[1:], [pool.get_data_page(p * PAGE) for p in src[1:]])
        got = backend.batch_get(ks, [pool.get_dummy_flat_data_page() for _ in ks])
        assert all(g is not None for g in got)
        one = backend.get(ks[0], pool.get_dummy_flat_data_page())
        assert one is not None and torch.equal(one.view(torch.uint8), got[0].view(torch.uint8))
        for p, flat in zip(dst, got):
            pool.set_from_flat_data_page(p * PAGE, flat)
        for s, d in zip(src, dst):
            assert torch.equal(page_bytes(pool, s * PAGE), page_bytes(pool, d * PAGE)), (s, d)
        # Stored flat, read zero-copy.
        assert backend.batch_get_v1(ks[2:4], indices([2, 3])) == [True, True]
        assert torch.equal(page_bytes(pool, 2 * PAGE), page_bytes(pool, src[2] * PAGE))
        assert torch.equal(page_bytes(pool, 3 * PAGE), page_bytes(pool, src[3] * PAGE))
    finally:
        backend.close()


def test_mla_batch_exists_counts_leading_hits():
    pool = mla_host_pool("page_first")
    backend = make_mla_backend(pool)
    try:
        ks = keys(8, tag="me")
        held = [0, 1, 2, 4, 5, 6]  # a gap at 3
        for i in held:
            assert backend.batch_set_v1([ks[i]], indices([i])) == [True]
        assert backend.batch_exists(ks) == 3
        assert backend.batch_exists(ks[4:]) == 3
        assert backend.batch_exists(ks[3:]) == 0
        assert backend.batch_exists([]) == 0
        assert backend.exists(ks[6]) and not backend.exists(ks[7])
        assert backend.batch_get_v1(ks, indices(range(20, 28))) == [True] * 3 + [False] * 5
        for i in range(3):
            assert torch.equal(page_bytes(pool, i * PAGE), page_bytes(pool, (20 + i) * PAGE))
        got = backend.batch_get(ks[4:], [pool.get_dummy_flat_data_page() for _ in range(4)])
        assert [g is not None for g in got] == [True, True, True, False]
    finally:
        backend.close()


def test_mla_fp8_kv_round_trips_byte_exact():
    """An fp8 KV cache (DeepSeek's --kv-cache-dtype fp8_e4m3): SGLang stores it as uint8, and so does the store."""
    device = sgl.MLATokenToKVPool(DEVICE_TOKENS, PAGE, torch.float8_e4m3fn, KV_LORA_RANK, QK_ROPE_HEAD_DIM, LAYERS,
                                  "cpu", False, start_layer=0, end_layer=LAYERS - 1)
    pool = host_pool_for(device, "page_first", seed=6)
    backend = make_mla_backend(pool, kv_cache_dtype="fp8_e4m3")
    try:
        assert backend.layout.dtype == pool.dtype == torch.uint8
        assert backend.layout.block_bytes == LAYERS * PAGE * MLA_DIM
        ks = keys(3, tag="f8")
        assert backend.batch_set_v1(ks[:2], indices([0, 1])) == [True, True]
        assert backend.set(ks[2], pool.get_data_page(2 * PAGE))
        assert backend.batch_get_v1(ks, indices([20, 21, 22])) == [True] * 3
        for s, d in zip([0, 1, 2], [20, 21, 22]):
            assert torch.equal(page_bytes(pool, s * PAGE), page_bytes(pool, d * PAGE)), (s, d)
    finally:
        backend.close()


def test_mla_tp_ranks_and_host_layouts_share_pages(tmp_path):
    """MLA KV is replicated: what rank 0 stores from a layer_first pool, rank 1 reads into a page_first_direct one."""
    writer_pool, reader_pool = mla_host_pool("layer_first", seed=1), mla_host_pool("page_first_direct", seed=2)
    ks = keys(4, tag="ms")
    shared = str(tmp_path / "shared")  # a directory every rank's process sees
    rank0 = make_mla_backend(writer_pool, tp_rank=0, tp_size=2, host_bytes=0, files_dir=shared)
    try:
        assert rank0.batch_set_v1(ks, indices([3, 4, 5, 6])) == [True] * 4
    finally:
        rank0.close()
    rank1 = make_mla_backend(reader_pool, tp_rank=1, tp_size=2, host_bytes=0, files_dir=shared)
    try:
        assert rank1.batch_exists(ks) == 4
        assert rank1.batch_get_v1(ks, indices([10, 11, 12, 13])) == [True] * 4
        for s, d in zip([3, 4, 5, 6], [10, 11, 12, 13]):
            a = canonical_page_view(writer_pool.get_data_page(s * PAGE, flat=False), "layer_first", mla=True)
            b = canonical_page_view(reader_pool.get_data_page(d * PAGE, flat=False), "page_first_direct", mla=True)
            assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)), (s, d)
    finally:
        rank1.close()


def test_mla_page_unified_is_refused(parallel):
    """SGLang's MLA page_unified pool has no get_data_page: registration fails, so the controller's attach does."""
    pool = mla_host_pool("page_unified")
    backend = StorageBackendFactory.create_backend("dynamic", storage_config(kvstore_extra()), pool)
    with pytest.raises(ValueError, match="page_unified"):
        backend.register_mem_pool_host(pool)
    assert backend.store is None and backend.batch_exists(keys(1)) == 0
    with pytest.raises(ValueError, match="Failed to create storage backend: .*page_unified"):
        make_controller("mla", "page_unified", 1)


# -- SGLang's cache controllers -------------------------------------------------------------------


@pytest.fixture
def parallel():
    """The parallel topology a scheduler would publish: one rank, no DCP (the controller reads it at attach)."""
    with sgl.get_parallel().override(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_dcp_rank=0,
                                     attn_dcp_size=1) as p:
        yield p


def make_controller(kind: str, layout: str, interface_v1: int, seed: int = 0, hybrid: bool = False, **settings):
    """A real cache controller over CPU pools, its storage the kvstore backend through SGLang's dynamic factory.

    ``hybrid`` builds the ``HybridCacheController`` over an anchor-only ``HostPoolGroup``, as SGLang's
    ``build_kv_only_stack`` does for the scheduler's radix cache of a plain MHA/MLA model; otherwise the
    ``HiCacheController`` itself (its base class, which the PD decode-side offload manager builds).
    """
    device = mla_device_pool() if kind == "mla" else mha_device_pool()
    allocator = sgl.PagedTokenToKVPoolAllocator(DEVICE_TOKENS, PAGE, torch.bfloat16, "cpu", device, False)
    host = host_pool_for(device, layout, seed)
    common = dict(io_backend="direct", storage_backend="dynamic", model_name="test/tiny",
                  storage_backend_extra_config=kvstore_extra(interface_v1=interface_v1, **settings))
    if hybrid:
        group = sgl.HostPoolGroup([sgl.build_pool_entry(
            name=sgl.PoolName.KV, host_pool=host, device_pool=device, layer_mapping={i: i for i in range(LAYERS)},
            transfer_layer_id_max=LAYERS, is_anchor=True)])
        controller = sgl.HybridCacheController(allocator, group, PAGE, None, threading.Event(),
                                               transfer_layer_id_max=LAYERS, **common)
        assert controller.storage_host_pool is host
    else:
        controller = sgl.HiCacheController(allocator, host, PAGE, None, threading.Event(), **common)
    return controller, host


def token_ids(pages: int, seed: int) -> list[int]:
    return torch.randint(0, 50_000, (pages * PAGE,), generator=torch.Generator().manual_seed(seed)).tolist()


def backup(controller, host_indices: torch.Tensor, tokens: list[int]):
    """The tree's storage backup: ``write_storage`` with the page hashes, then the backup thread's ack."""
    hashes = sgl.get_storage_hash_str(tokens, None, page_size=PAGE)
    op_id = controller.write_storage(host_indices, tokens, hash_value=hashes)
    op = controller.ack_backup_queue.get(timeout=TIMEOUT)
    assert op.id == op_id
    return op, hashes


def prefetch(controller, rid: str, tokens: list[int]):
    """The tree's storage prefetch: hit query, host slots for the hits, page transfer, acks up to completed_req."""
    hybrid = isinstance(controller, sgl.HybridCacheController)
    op = controller.prefetch(sgl.CacheRequestHandle(rid, 0) if hybrid else rid, tokens)
    hit = controller.prefetch_hit_queue.get(timeout=TIMEOUT)
    assert hit is op and op.request_id == rid
    if op.storage_hit_count == 0:
        return op, None, []
    dst = controller.alloc_prefetch_host_buffers(op, op.storage_hit_count)
    assert dst is not None
    op.host_indices = dst
    controller.prefetch_buffer.put(op)
    acks = []
    while not acks or not acks[-1].completed_req:
        ack = controller.ack_prefetch_queue.get(timeout=TIMEOUT)
        assert ack.operation is op
        acks.append(ack)
    return op, dst, acks


CONTROLLER_CASES = [(hybrid, kind, layout, v1) for hybrid in (False, True)
                    for kind, layouts in (("mha", MHA_LAYOUTS), ("mla", MLA_LAYOUTS))
                    for layout in layouts for v1 in (1, 0)]


@pytest.mark.parametrize("hybrid,kind,layout,interface_v1", CONTROLLER_CASES,
                         ids=[f"{'hybrid' if h else 'hicache'}-{k}-{lay}-{'v1' if v else 'flat'}"
                              for h, k, lay, v in CONTROLLER_CASES])
def test_controller_backs_up_and_prefetches_byte_exact(parallel, hybrid, kind, layout, interface_v1):
    controller, host = make_controller(kind, layout, interface_v1, seed=3, hybrid=hybrid)
    try:
        backend = controller.storage_backend
        assert type(backend) is KVStoreHiCache and backend.mem_pool_host is host
        assert backend.mla == (kind == "mla") and backend.host_layout == layout
        assert backend.config.model_id == "test/tiny"
        cls = type(controller)
        assert (controller.page_set_func.__func__ is cls._page_set_zero_copy) == bool(interface_v1)
        assert (controller.page_get_func.__func__ is cls._page_get_zero_copy) == bool(interface_v1)

        n = 5
        src = host.alloc(n * PAGE)  # where the controller's device->host copy would have put the pages
        spacer = host.alloc(3 * PAGE)  # so the prefetch lands on other, non-adjacent slots
        tokens = token_ids(n, seed=7)
        src_pages = [page_bytes(host, i) for i in src[::PAGE]]

        op, hashes = backup(controller, src, tokens)
        assert op.completed_tokens == n * PAGE
        assert backend.batch_exists(hashes) == n

        # One page more than was stored: the hit query counts the leading hits only.
        extra_page = token_ids(1, seed=8)
        fetched, dst, acks = prefetch(controller, "req-1", tokens + extra_page)
        assert fetched.storage_hit_count == n * PAGE and fetched.hash_value == hashes
        assert not set(dst.tolist()) & (set(src.tolist()) | set(spacer.tolist()))
        assert acks[-1].completed_req and max(a.completed_tokens or 0 for a in acks) == n * PAGE
        for i, (d, expected) in enumerate(zip(dst[::PAGE], src_pages)):
            assert torch.equal(page_bytes(host, d), expected), f"page {i}"

        # Tokens never stored: no hits, nothing moves.
        missed, none, _ = prefetch(controller, "req-2", token_ids(2, seed=9))
        assert missed.storage_hit_count == 0 and missed.hash_value == [] and none is None
    finally:
        controller.detach_storage_backend()
    assert backend.store is None  # detach closed the store


def test_controller_prefetches_what_a_restarted_engine_backed_up(parallel, tmp_path):
    """Engine A backs up zero-copy and stops; engine B (the scheduler's HybridCacheController, another host
    layout, the flat page path) prefetches from the disk tier."""
    tokens = token_ids(4, seed=11)
    first, first_host = make_controller("mha", "page_first", 1, seed=1, disk_dir=str(tmp_path / "kv"))
    try:
        src = first_host.alloc(4 * PAGE)
        expected = [canonical_page_view(first_host.get_data_page(int(i), flat=False), "page_first")
                    .contiguous().view(torch.uint8) for i in src[::PAGE]]
        op, _ = backup(first, src, tokens)
        assert op.completed_tokens == 4 * PAGE
    finally:
        first.detach_storage_backend()  # closes the store: write-behind flushed to LMDB

    second, second_host = make_controller("mha", "layer_first", 0, seed=2, hybrid=True,
                                          disk_dir=str(tmp_path / "kv"))
    try:
        fetched, dst, acks = prefetch(second, "req-restart", tokens)
        assert fetched.storage_hit_count == 4 * PAGE and acks[-1].completed_req
        for i, (d, want) in enumerate(zip(dst[::PAGE], expected)):
            got = canonical_page_view(second_host.get_data_page(int(d), flat=False), "layer_first")
            assert torch.equal(got.contiguous().view(torch.uint8), want), f"page {i}"
        assert second.storage_backend.store.stats()["tiers"]["lmdb"]["hits"] >= 4
    finally:
        second.detach_storage_backend()


def test_mla_controller_rank_that_never_writes_prefetches_rank_zeros_pages(tmp_path):
    """SGLang lets only MLA rank 0 back up (is_storage_writer); rank 1's HybridCacheController prefetches them."""
    tokens = token_ids(3, seed=21)
    shared = str(tmp_path / "shared")
    with sgl.get_parallel().override(tp_rank=0, tp_size=2, pp_rank=0, pp_size=1, attn_dcp_rank=0, attn_dcp_size=1):
        rank0, host0 = make_controller("mla", "page_first", 1, seed=1, host_bytes=0, files_dir=shared)
    try:
        assert not rank0.backup_skip
        src = host0.alloc(3 * PAGE)
        expected = [page_bytes(host0, i) for i in src[::PAGE]]
        op, _ = backup(rank0, src, tokens)
        assert op.completed_tokens == 3 * PAGE
    finally:
        rank0.detach_storage_backend()

    with sgl.get_parallel().override(tp_rank=1, tp_size=2, pp_rank=0, pp_size=1, attn_dcp_rank=0, attn_dcp_size=1):
        rank1, host1 = make_controller("mla", "page_first", 1, seed=2, hybrid=True, host_bytes=0, files_dir=shared)
    try:
        assert rank1.backup_skip and rank1.storage_config.tp_rank == 1
        skipped, skipped_hashes = backup(rank1, host1.alloc(PAGE), token_ids(1, seed=22))
        assert skipped.completed_tokens == 0 and rank1.storage_backend.batch_exists(skipped_hashes) == 0
        fetched, dst, _ = prefetch(rank1, "req-rank1", tokens)
        assert fetched.storage_hit_count == 3 * PAGE
        for i, (d, want) in enumerate(zip(dst[::PAGE], expected)):
            assert torch.equal(page_bytes(host1, d), want), f"page {i}"
    finally:
        rank1.detach_storage_backend()


def test_controller_overlapping_requests_byte_exact(parallel):
    """Backups queued back to back, then prefetches running while the next backups are written."""
    controller, host = make_controller("mha", "page_head", 1, seed=5)
    try:
        reqs = [token_ids(2, seed=100 + r) for r in range(6)]
        srcs = [host.alloc(2 * PAGE) for _ in reqs]
        expected = [[page_bytes(host, i) for i in src[::PAGE]] for src in srcs]
        hashes = [sgl.get_storage_hash_str(t, None, page_size=PAGE) for t in reqs]
        first_ids = [controller.write_storage(srcs[r], reqs[r], hash_value=hashes[r]) for r in range(3)]
        done = [controller.ack_backup_queue.get(timeout=TIMEOUT) for _ in first_ids]
        assert [op.id for op in done] == first_ids and all(op.completed_tokens == 2 * PAGE for op in done)

        # The second half is written by the backup thread while the first half is read back.
        later_ids = [controller.write_storage(srcs[r], reqs[r], hash_value=hashes[r]) for r in range(3, 6)]
        ops = [controller.prefetch(f"req-{r}", reqs[r]) for r in range(3)]
        dsts = {}
        for _ in ops:
            op = controller.prefetch_hit_queue.get(timeout=TIMEOUT)
            assert op.storage_hit_count == 2 * PAGE
            op.host_indices = dsts[op.request_id] = controller.alloc_prefetch_host_buffers(op, 2 * PAGE)
            controller.prefetch_buffer.put(op)
        finished = set()
        while len(finished) < 3:
            ack = controller.ack_prefetch_queue.get(timeout=TIMEOUT)
            if ack.completed_req:
                finished.add(ack.rid)
        later = [controller.ack_backup_queue.get(timeout=TIMEOUT) for _ in later_ids]
        assert [op.id for op in later] == later_ids and all(op.completed_tokens == 2 * PAGE for op in later)
        for r in range(3):
            for i, d in enumerate(dsts[f"req-{r}"][::PAGE]):
                assert torch.equal(page_bytes(host, d), expected[r][i]), (r, i)
        for r in range(3, 6):
            host.free(dsts.pop(f"req-{r - 3}"))
            _, dst, _ = prefetch(controller, f"req-{r}", reqs[r])
            for i, d in enumerate(dst[::PAGE]):
                assert torch.equal(page_bytes(host, d), expected[r][i]), (r, i)
    finally:
        controller.detach_storage_backend()


def test_controller_reattach_sees_disk_pages_until_clear(parallel, tmp_path):
    """SGLang's runtime detach/attach reopens the store on the same disk; its clear_storage_backend hides the pages."""
    extra = kvstore_extra(interface_v1=0, disk_dir=str(tmp_path / "kv"))
    controller, host = make_controller("mla", "layer_first", 0, seed=4, hybrid=True, disk_dir=str(tmp_path / "kv"))
    try:
        tokens = token_ids(3, seed=31)
        src = host.alloc(3 * PAGE)
        expected = [page_bytes(host, i) for i in src[::PAGE]]
        assert backup(controller, src, tokens)[0].completed_tokens == 3 * PAGE
        old = controller.storage_backend
        controller.detach_storage_backend()
        assert old.store is None and controller.storage_backend is None
        controller.attach_storage_backend("dynamic", model_name="test/tiny", storage_backend_extra_config=dict(extra),
                                          host_pools=controller.mem_pool_host.entries)
        assert controller.storage_backend is not old and controller.storage_backend.store is not None
        fetched, dst, _ = prefetch(controller, "req-again", tokens)
        assert fetched.storage_hit_count == 3 * PAGE
        for i, (d, want) in enumerate(zip(dst[::PAGE], expected)):
            assert torch.equal(page_bytes(host, d), want), f"page {i}"
        assert controller.clear_storage_backend()
        cleared, none, _ = prefetch(controller, "req-cleared", tokens)
        assert cleared.storage_hit_count == 0 and none is None
    finally:
        controller.detach_storage_backend()


@pytest.mark.parametrize("settings", [dict(host_bytes=0, disk_dir="kv"), dict(host_bytes="4MiB"), dict()],
                         ids=["disk_dir", "host_only", "default_l3"])
def test_mla_at_tp_2_without_a_tier_every_rank_reads_is_refused_at_attach(tmp_path, settings):
    """SGLang backs MLA pages up from TP rank 0 only and takes the least hit over the ranks: with rank-local
    tiers the other ranks' stores stay empty and the L3 never served a page, with nothing logged."""
    settings = {k: str(tmp_path / v) if k == "disk_dir" else v for k, v in settings.items()}
    if not settings:  # no tier named: the default L3 directory (host_bytes is kvstore_extra's, dropped here)
        extra = {k: v for k, v in kvstore_extra().items() if k != "host_bytes"}
        config = storage_config(extra, tp_rank=1, tp_size=2)
    else:
        config = storage_config(kvstore_extra(**settings), tp_rank=1, tp_size=2)
    with pytest.raises(ValueError, match="MLA model at tp_size 2 needs a tier every rank reads"):
        StorageBackendFactory.create_backend("dynamic", config, mla_host_pool())


@pytest.mark.parametrize("key, value", [("prefetch_threshold", 256), ("prefetch_timeout_base", 1),
                                        ("prefetch_timeout_per_ki_token", 0.25),
                                        ("hicache_storage_pass_prefix_keys", True)])
def test_sglangs_own_prefetch_settings_are_accepted_as_the_decode_side_passes_them(parallel, key, value):
    """The PD decode side's offload manager hands the whole extra config to its controller, without dropping
    SGLang's prefetch knobs as the scheduler does: the decode server did not start."""
    controller, _ = make_controller("mha", "layer_first", 1, **{key: value})
    controller.detach_storage_backend()


@pytest.mark.parametrize("settings", [dict(), dict(disk_dir="kv")], ids=["default_l3", "disk_dir"])
def test_data_parallel_replicas_on_one_node_open_their_own_directories(tmp_path, settings):
    """``--dp-size 2`` without DP attention: SGLang gives every replica dp_rank 0 in the storage config, so
    both opened one LMDB directory and the second replica did not start."""
    extra = {k: v for k, v in kvstore_extra().items() if k != "host_bytes"}
    extra.update({k: str(tmp_path / v) for k, v in settings.items()})
    replicas = []
    try:
        for dp in range(2):
            with sgl.get_parallel().override(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_dcp_rank=0,
                                             attn_dcp_size=1, dp_rank=dp):
                pool = host_pool_for(mha_device_pool(), "layer_first")
                backend = StorageBackendFactory.create_backend("dynamic", storage_config(extra, mla=False), pool)
                replicas.append(backend)
                backend.register_mem_pool_host(pool)
        dirs = [b.config.disk_dir for b in replicas]
        assert dirs[0] != dirs[1] and dirs[1].endswith("rank-dp1-tp0of1-pp0of1-cp0of1")
    finally:
        for backend in replicas:
            backend.close()


@pytest.mark.parametrize("layout", MLA_LAYOUTS)
def test_decode_context_parallel_pages_round_trip_zero_copy(tmp_path, layout):
    """Under ``--dcp-size 2`` SGLang passes logical host indices (a logical page spans page_size * dcp_size
    tokens, each rank's page its share): every zero-copy set and get was refused on the physical page size."""
    dcp, logical = 2, 2 * PAGE
    device = mla_device_pool()
    pool = _fill_random(sgl.MLATokenToKVPoolHost(
        device.get_device_pool_infos()[0].buffer_info, 2.0, 0, logical, layout, pin_memory=False,
        device_capacity_tokens=device.size, start_layer=0, end_layer=LAYERS - 1, target_layer_num=device.layer_num,
        override_kv_cache_dim=device.kv_cache_dim, dcp_size=dcp, dcp_rank=0), 3)
    config = HiCacheStorageConfig(tp_rank=0, tp_size=2, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                                  is_mla_model=True, enable_storage_metrics=False, is_page_first_layout=False,
                                  model_name="test/tiny-mla", dcp_size=dcp, dcp_rank=0, logical_page_size=logical,
                                  extra_config=kvstore_extra(files_dir=str(tmp_path / "shared")))
    backend = StorageBackendFactory.create_backend("dynamic", config, pool)
    backend.register_mem_pool_host(pool)

    def logical_indices(pages):
        return torch.cat([torch.arange(p * logical, (p + 1) * logical) for p in pages])
    try:
        ks = keys(3, "dcp")
        assert backend.batch_set_v1(ks, logical_indices([0, 1, 2])) == [True] * 3
        assert backend.batch_get_v1(ks, logical_indices([5, 6, 7])) == [True] * 3
        for s, d in zip([0, 1, 2], [5, 6, 7]):
            assert torch.equal(page_bytes(pool, s * logical), page_bytes(pool, d * logical))
    finally:
        backend.close()
