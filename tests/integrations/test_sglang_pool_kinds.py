"""SGLang's v2 storage interface on the kvstore backend, for every host pool kind SGLang hands a storage backend.

Runs only where SGLang is installed (``.venv-sglang``, built by
``scripts/engine-venvs.sh sglang``); elsewhere the module skips. Every host
pool class SGLang 0.5.23 registers with a storage backend
(``register_mem_pool_host`` for the anchor, ``register_mem_host_pool_v2`` for
every entry of its ``HostPoolGroup``) is built here on "cpu" the way SGLang's
assembler (``hybrid_cache/hybrid_pool_assembler.py``) builds it: the same
constructor, over SGLang's own CPU device pool, with the arguments the
assembler passes, except ``pin_memory=False`` (pinning is cudaHostRegister)
and tiny sizes. Each pool is filled with random bytes (every bit pattern, NaNs
included) and every comparison is of bytes. The backend is kvstore's
``KVStoreHiCache`` built by SGLang's ``StorageBackendFactory`` ("dynamic"),
anchored on a small MHA host pool (or, for a kind SGLang registers as the
anchor itself, ``PoolName.KV``, on that pool). For each kind:

1. ``batch_set_v2`` of a few pages, then ``batch_get_v2`` into other slots:
   the pages come back byte-identical and no other slot of the pool changes;
2. ``batch_exists_v2`` agrees with what was stored, under ``ALL_PAGES`` and
   ``TRAILING_PAGES``;
3. a new backend over the same ``disk_dir`` (a restart) reads the pages back
   byte-exact into a new pool.

Host pool classes SGLang 0.5.23 has that are NOT built here, and why:

* ``MHATokenToKVPoolMXFP8Host`` (pool_host/mha_mxfp8.py; chosen by
  ``get_mha_host_pool_cls`` for an MXFP8 KV cache, as KV anchor / SWA / DRAFT /
  DRAFT_SWA): its constructor raises ``NotImplementedError`` unless the staged
  JIT write-back kernel is usable ("needs ... io_backend='kernel', page_first
  layout, CUDA or HIP"), so it cannot be built on a CPU machine (its device pool,
  ``MHATokenToKVPoolMXFP8``, can). Its page accessors (``get_data_page``,
  ``get_dummy_flat_data_page``, ``set_from_flat_data_page``) all raise
  ``NotImplementedError`` ("does not expose flat storage (L3) pages yet"), so
  no backend stores its pages; kvstore's ``describe_pool`` calls
  ``get_data_page``, so it refuses it (logged, misses) as a v2 pool and raises
  out of ``register_mem_pool_host`` as the anchor.
* ``HiSparseMHATokenToKVPoolHost`` (pool_host/mha.py): built only by
  ``managers/hisparse_coordinator.py`` as its own host pool, never registered
  with a storage backend.
* ``UnifiedPageEnvelopeHostPool`` (pool_host/unified.py): assembled only when
  ``--hicache-storage-backend`` is unset or "mori"
  (``HybridCacheController.supports_page_envelope_host``); with any other
  backend the assembler builds separate host pools and ``attach_storage_backend``
  raises for it, so the "dynamic" backend (kvstore) never receives it.
* ``PageInterleaveHostPool`` (pool_host/page_interleave.py; a wrapper, not a
  ``HostKVCache``): wraps the KV/SWA host pool when the device pool is a
  ``PageInterleaveKVPoolMixin``, which needs a page-interleave shard group of
  more than one rank (NCCL, CUDA).
* ``MLATokenToKVPoolHost`` in the ``page_first_kv_split`` layout: Ascend only
  (it needs the ``MLASplitBuffers`` of an NPU MLA device pool).
* the ``page_unified`` layout (MHA, MLA): not a ``--hicache-mem-layout`` choice in
  0.5.23, and its ``get_data_page`` raises ``ValueError``.

The DeepSeek V4 pools are built over SGLang's real CPU ``DeepSeekV4TokenToKVPool``
(published with ``override_server_args(device="cpu")``); their stack's anchor is a
``LogicalHostPool`` (no KV bytes), which is the ``dsv4-logical-anchor`` kind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable

import pytest
import torch

pytest.importorskip("sglang", reason="needs SGLang 0.5.23: build .venv-sglang with scripts/engine-venvs.sh sglang "
                                     "and run .venv-sglang/bin/pytest")

from sglang_env import keys, no_failure_injection, page_indices, stubbed_torchvision  # noqa: E402,F401

with stubbed_torchvision():
    from sglang.srt.configs.mamba_utils import Mamba2CacheParams, Mamba2StateShape
    from sglang.srt.mem_cache import memory_pool as mp
    from sglang.srt.mem_cache import memory_pool_host, pool_host
    from sglang.srt.mem_cache.deepseek_v4_memory_pool import DeepSeekV4TokenToKVPool
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig, PoolHitPolicy, PoolName, PoolTransfer
    from sglang.srt.mem_cache.hybrid_cache import hybrid_pool_assembler as hpa
    from sglang.srt.mem_cache.memory_pool_host import (DeepSeekV4PagedHostPool, DeepSeekV4StateHostPool,
                                                       LogicalHostPool)
    from sglang.srt.mem_cache.minimax_m3_nvfp4_pool import MiniMaxM3Nvfp4IndexKPool, MiniMaxM3Nvfp4MainKVPool
    from sglang.srt.mem_cache.ple_state_pool import ShortConvPool
    from sglang.srt.mem_cache.pool_host import dsa, mamba, mha, mha_mxfp8, minimax_m3_nvfp4, mla, qsa, unified
    from sglang.srt.mem_cache.pool_host.base import HostKVCache
    from sglang.srt.mem_cache.qsa_kv_pool import QSATokenToKVPool
    from sglang.srt.mem_cache.storage import StorageBackendFactory
    from sglang.srt.runtime_context import get_context, get_parallel

from kvstore.integrations.sglang import KVStoreHiCache  # noqa: E402

ALL, TRAILING = PoolHitPolicy.ALL_PAGES, PoolHitPolicy.TRAILING_PAGES
PLACEHOLDER = "__placeholder__"  # the tree's prefetch keys before the hit is known
DTYPE = torch.bfloat16
RATIO = 2.0                      # --hicache-ratio
PAGE = 4                         # MHA / MLA / hybrid-Mamba / MiniMax-index host page (tokens)
DEVICE_TOKENS = 32               # MHA / MLA device tokens: host pools of 2 x 32 + a page = 17 pages
HEADS, HEAD_DIM = 2, 16
DSA_PAGE, DSA_TOKENS = 64, 256   # a DSA index page must split over the page: 9 host pages
QSA_PAGE = 8                     # a multiple of the QSA compress ratio (4)
NVFP4_PAGE, NVFP4_TOKENS = 128, 384  # MSA-v1 NVFP4 requires 128-token pages: 7 host pages
DSV4_PAGE, DSV4_HOST_PAGES = 256, 8  # DeepSeek V4 pages (FULL and SWA), host pages per pool
MAMBA_SLOTS = 8                  # Mamba host pool: 2 x 8 + 1 = 17 states (page size 1)


# -- SGLang's runtime context for the pools that read it ----------------------------------------------


@contextlib.contextmanager
def sglang_runtime():
    """One rank, no DCP (DSA reads ``attn_dcp_size``) and a published CPU config (DeepSeek V4 reads ``exec``)."""
    with get_parallel().override(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_dcp_rank=0, attn_dcp_size=1), \
            get_context().override_server_args(device="cpu"):
        yield


# -- device pools (read-only here: built once) ----------------------------------------------------------


def new_mha_device(layers: int = 2, v_head_dim: int | None = None):
    return mp.MHATokenToKVPool(DEVICE_TOKENS, PAGE, DTYPE, HEADS, HEAD_DIM, layers, "cpu", False,
                               v_head_dim=v_head_dim, start_layer=0, end_layer=layers - 1)


mha_device = functools.cache(new_mha_device)


def new_mla_device(layers: int = 2):
    return mp.MLATokenToKVPool(DEVICE_TOKENS, PAGE, DTYPE, 32, 16, layers, "cpu", False, start_layer=0,
                               end_layer=layers - 1)


mla_device = functools.cache(new_mla_device)


@functools.cache
def dsa_device():
    with sglang_runtime():
        return mp.DSATokenToKVPool(size=DSA_TOKENS, page_size=DSA_PAGE, kv_lora_rank=32, dtype=DTYPE,
                                   qk_rope_head_dim=16, layer_num=2, device="cpu", index_head_dim=128,
                                   enable_memory_saver=False, kv_cache_dim=48, start_layer=0, end_layer=1)


def mamba_device(layers: tuple[int, ...]):
    shape = Mamba2StateShape.create(tp_world_size=1, intermediate_size=32, n_groups=1, num_heads=2, head_dim=8,
                                    state_size=4, conv_kernel=4)
    return mp.MambaPool(size=MAMBA_SLOTS, spec_state_size=4,
                        cache_params=Mamba2CacheParams(shape=shape, layers=list(layers)),
                        mamba_layer_ids=list(layers), device="cpu")


@functools.cache
def qsa_device():
    return QSATokenToKVPool(size=64, dtype=DTYPE, page_size=QSA_PAGE, head_num=HEADS, head_dim=HEAD_DIM,
                            full_attention_layer_ids=[0, 2], device="cpu", mamba_pool=mamba_device((1,)),
                            qsa_index_kv_heads=1, qsa_index_head_dim=16, qsa_compress_ratio=4, qsa_token_topk=8,
                            num_request_slots=4)


@functools.cache
def nvfp4_devices():
    args = dict(size=NVFP4_TOKENS, page_size=NVFP4_PAGE, dtype=DTYPE, head_num=1, head_dim=128, layer_num=2,
                device="cpu", enable_memory_saver=False, start_layer=0, end_layer=1)
    return MiniMaxM3Nvfp4MainKVPool(**args), MiniMaxM3Nvfp4IndexKPool(**args)


@functools.cache
def dsv4_device():
    """Layer 0 uncompressed, layer 1 C4 (with its indexer and compress states), layer 2 C128."""
    with sglang_runtime():
        return DeepSeekV4TokenToKVPool(
            max_num_reqs=2, swa_size=2 * DSV4_PAGE, c4_size=DSV4_PAGE, c128_size=16, c4_state_pool_size=64,
            c128_state_pool_size=64, page_size=DSV4_PAGE, swa_page_size=DSV4_PAGE, dtype=torch.float8_e4m3fn,
            c4_state_dtype=torch.float32, c128_state_dtype=torch.float32, qk_nope_head_dim=448, qk_rope_head_dim=64,
            indexer_head_dim=128, layer_num=3, device="cpu", enable_memory_saver=False,
            compression_ratios=[0, 4, 128], start_layer=0, end_layer=3)  # the stage's layers, end exclusive


# -- host pools, as the assembler builds them -----------------------------------------------------------


def mha_host(device, layout: str, drafts=(), ratio: float = RATIO, **kwargs):
    """``build_kv_host_pool`` (MHA): ``get_mha_host_pool_cls`` and the inputs ``_mha_host_inputs`` gives it."""
    cls, info, mha_kwargs = hpa._mha_host_inputs(device, drafts)
    return cls(info, ratio, 0, device.page_size, layout, pin_memory=False, **mha_kwargs, **kwargs)


def anchor_pool():
    """The KV anchor the sidecar kinds are registered beside: a plain MHA host pool."""
    return mha_host(mha_device(), "layer_first")


def mha_draft(layout: str):
    """``build_full_draft_pools`` -> ``_build_mha_mla_host_pool`` for an MHA draft (``PoolName.DRAFT``)."""
    target, draft = anchor_pool(), mha_device(layers=1)
    return mha_host(draft, layout, ratio=target.logical_size / draft.size, pool_label="draft",
                    host_token_capacity=target.logical_size)


def mha_draft_swa_packed(layout: str):
    """``build_hybrid_swa_group``'s ``PoolName.DRAFT_SWA`` pool: the first full-index SWA draft, the others packed
    into it as ``draft_buffer_infos`` (one layer each)."""
    first, *rest = new_mha_device(layers=1), new_mha_device(layers=1)
    return mha_host(first, layout, tuple(rest), ratio=anchor_pool().size / first.size, pool_label="draft_swa")


def mha_anchor_packed_mtp(layout: str):
    """``build_kv_only_group`` with MTP draft device pools: the KV anchor with one packed draft layer
    (``draft_buffer_infos``)."""
    return mha_host(mha_device(), layout, (new_mha_device(layers=1),))


def mla_anchor_packed_mtp(layout: str):
    """``build_kv_host_pool`` (MLA) with MTP draft device pools (DeepSeek NextN): the KV anchor with one packed
    draft layer (``draft_buffer_infos``)."""
    device, draft = mla_device(), new_mla_device(layers=1)
    return mla.MLATokenToKVPoolHost(
        device.get_device_pool_infos()[0].buffer_info, RATIO, 0, PAGE, layout, pin_memory=False,
        override_kv_cache_dim=device.kv_cache_dim, device_capacity_tokens=device.size,
        start_layer=device.start_layer, end_layer=device.end_layer,
        draft_buffer_infos=(draft.get_device_pool_infos()[0].buffer_info,),
        layer_shard_enabled=device.layer_shard_enabled, target_layer_num=device.layer_num)


def mla_draft(layout: str):
    """``build_full_draft_pools`` -> ``_build_mha_mla_host_pool`` for an MLA draft (``PoolName.DRAFT``)."""
    device, capacity = mla_device(), anchor_pool().logical_size
    return mla.MLATokenToKVPoolHost(
        device.get_device_pool_infos()[0].buffer_info, host_to_device_ratio=capacity / device.size, host_size=0,
        page_size=PAGE, layout=layout, pin_memory=False, pool_label="draft", host_token_capacity=capacity,
        device_capacity_tokens=device.size, start_layer=device.start_layer, end_layer=device.end_layer,
        target_layer_num=device.layer_num, override_kv_cache_dim=device.kv_cache_dim)


def konly_indexer(layout: str):
    """``build_minimax_sparse_hicache_stack``'s ``PoolName.INDEXER`` (bf16 MiniMax sparse index K)."""
    index_k = mp.MHATokenToKOnlyPool(DEVICE_TOKENS, PAGE, DTYPE, 1, 32, 2, "cpu", False, start_layer=0, end_layer=1)
    return mha.MHATokenToKOnlyPoolHost(index_k, mha_host(mha_device(), layout), layout, pin_memory=False)


def mamba_host(layout: str, draft: bool = False, side_state: bool = False):
    """``build_mamba_host_pool`` (``PoolName.MAMBA``); ``draft``: one MTP draft state layer packed in
    (``mtp_draft_buffer_infos``); ``side_state``: a slot side state (PLE short-conv rows) riding on every slot."""
    device = mamba_device((1, 3))
    if side_state:
        device.register_slot_state(ShortConvPool(size=device.size, state_shape=(3, 5), layer_ids=[0, 2],
                                                 dtype=DTYPE, device="cpu"))
    (info,) = device.get_device_pool_infos()
    drafts = [mamba_device((5,)).get_device_pool_infos()[0].buffer_info] if draft else []
    return mamba.MambaPoolHost(info.buffer_info, RATIO, 0, device_capacity=device.size, pin_memory=False,
                               layout=layout, mtp_draft_buffer_infos=drafts)


def dsa_indexer(layout: str):
    """``_DsaStrategy``: the MLA KV host pool, then ``DSAIndexerHostPoolBuilder.build`` (``PoolName.INDEXER``)."""
    device = dsa_device()
    kv_host = mla.MLATokenToKVPoolHost(
        device.get_device_pool_infos()[0].buffer_info, RATIO, 0, DSA_PAGE, layout, pin_memory=False,
        override_kv_cache_dim=device.kv_cache_dim, device_capacity_tokens=device.size,
        start_layer=device.start_layer, end_layer=device.end_layer, target_layer_num=device.layer_num)
    (_, decl) = device.host_pool_decls()
    return dsa.DSAIndexerPoolHost(decl=decl, anchor_host=kv_host, pin_memory=False)


def qsa_indexer():
    """``build_hybrid_mamba_stack`` with a QSA pool: ``QSAIndexerPoolHost`` over the full-KV host pool
    (``PoolName.INDEXER``)."""
    device = qsa_device()
    return qsa.QSAIndexerPoolHost(device, mha_host(device.full_kv_pool, "page_first"))


def nvfp4_main():
    """``build_minimax_sparse_hicache_stack`` (NVFP4): the KV anchor (``PoolName.KV``)."""
    main, _ = nvfp4_devices()
    return minimax_m3_nvfp4.MiniMaxM3Nvfp4MainKVPoolHost(
        main.get_device_pool_infos()[0].buffer_info, RATIO, 0, NVFP4_PAGE, "page_first", pin_memory=False,
        device_capacity_tokens=main.size, start_layer=main.start_layer, end_layer=main.end_layer)


def nvfp4_index():
    """``build_minimax_sparse_hicache_stack`` (NVFP4): the index-K sidecar (``PoolName.INDEXER``)."""
    _, index = nvfp4_devices()
    return minimax_m3_nvfp4.MiniMaxM3Nvfp4IndexKPoolHost(
        index.get_device_pool_infos()[0].buffer_info, nvfp4_main(), "page_first", pin_memory=False,
        start_layer=index.start_layer, end_layer=index.end_layer)


def dsv4_paged(region: str, layout: str = "page_first"):
    """``build_deepseek_v4_hicache_stack``'s ``DeepSeekV4PagedHostPool`` of ``region``."""
    kvcache = dsv4_device()
    if region == "swa":
        pool = kvcache.swa_kv_pool
        buffers, item_bytes, slot_page = pool.kv_buffer, pool.bytes_per_page_padded, kvcache.swa_page_size
        aligned = hpa._dsv4_page_aligned_only(pool)
    elif region in ("c4", "c128"):
        ratio = 4 if region == "c4" else 128
        pool = kvcache.c4_kv_pool if ratio == 4 else kvcache.c128_kv_pool
        buffers, item_bytes = hpa._dsv4_compressed_region_buffers(kvcache, ratio)
        slot_page = getattr(pool, "kernel_page_size", DSV4_PAGE) if ratio == 128 else DSV4_PAGE
        aligned = hpa._dsv4_page_aligned_only(pool)
    else:  # the C4 indexer (fused FP8 key + scale rows)
        (r,) = [r for r in hpa._dsv4_indexer_regions(kvcache, DSV4_PAGE) if r.name == PoolName.DEEPSEEK_V4_C4_INDEXER]
        buffers, item_bytes, slot_page, aligned = r.device_buffers, r.item_bytes, r.slot_page_size, r.page_aligned_only
    return DeepSeekV4PagedHostPool(pool_name=region, device_buffers=list(buffers), item_bytes=item_bytes,
                                   num_host_pages=DSV4_HOST_PAGES, slot_page_size=slot_page, layout=layout,
                                   pin_memory=False, page_aligned_only=aligned)


def dsv4_state(indexer: bool, layout: str = "page_first"):
    """``build_deepseek_v4_hicache_stack``'s ``DeepSeekV4StateHostPool`` (C4 compress state, or its indexer's)."""
    kvcache = dsv4_device()
    layers = hpa._resolve_deepseek_v4_layer_mappings(kvcache).c4_state_global_layers
    pools = kvcache.indexer_compress_state_pools if indexer else kvcache.compress_state_pools
    return DeepSeekV4StateHostPool(pool_name="c4_indexer_state" if indexer else "c4_state",
                                   state_pools=[pools[layer] for layer in layers], num_host_pages=DSV4_HOST_PAGES,
                                   swa_page_size=kvcache.swa_page_size, layout=layout, pin_memory=False)


def dsv4_logical_anchor():
    """``build_deepseek_v4_hicache_stack``'s anchor (``PoolName.KV``): a ``LogicalHostPool``, no KV bytes."""
    return LogicalHostPool(DSV4_HOST_PAGES * DSV4_PAGE, DSV4_PAGE, layout="page_first")


# -- the page bytes of each kind -------------------------------------------------------------------------


def flat_page(pool, slot: int) -> torch.Tensor:
    """SGLang's flat page at ``slot`` as bytes (a copy)."""
    return pool.get_data_page(int(slot), flat=True).contiguous().view(torch.uint8).clone()


def asymmetric_page(pool, slot: int) -> torch.Tensor:
    """An ``AsymmetricMHATokenToKVPoolHost`` page (its ``get_data_page`` raises): its K then its V bytes."""
    start = int(slot)
    if pool.layout == "page_first_direct":
        parts = [buf[start // pool.page_size] for buf in (pool.k_buffer, pool.v_buffer)]
    else:
        parts = [buf[start:start + pool.page_size] for buf in (pool.k_buffer, pool.v_buffer)]
    return torch.cat([p.contiguous().view(torch.uint8).reshape(-1) for p in parts])


# -- the kinds ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Kind:
    id: str
    cls: type
    name: PoolName              # what SGLang registers it as (register_mem_host_pool_v2)
    policy: PoolHitPolicy       # its hit policy in SGLang's stack
    build: Callable[[], object]
    in_place: bool | None       # kvstore's store path: KV pages viewed in place (True) or flat bytes (False)
    page: Callable[[object, int], torch.Tensor] = flat_page
    fails: str | None = None    # kvstore's failure on this kind (xfail, strict) ...
    raises: type[BaseException] = AssertionError  # ... and the exception it fails with


KINDS = [
    *[Kind(f"mha-swa-{layout}", mha.MHATokenToKVPoolHost, PoolName.SWA, TRAILING,
           functools.partial(mha_host, mha_device(layers=3), layout), True)
      for layout in ("layer_first", "page_first", "page_first_direct", "page_head")],
    Kind("mha-draft", mha.MHATokenToKVPoolHost, PoolName.DRAFT, ALL, functools.partial(mha_draft, "page_first"),
         True),
    Kind("mha-draft_swa-packed-mtp", mha.MHATokenToKVPoolHost, PoolName.DRAFT_SWA, TRAILING,
         functools.partial(mha_draft_swa_packed, "page_first"), True),
    Kind("mha-kv-anchor-packed-mtp", mha.MHATokenToKVPoolHost, PoolName.KV, ALL,
         functools.partial(mha_anchor_packed_mtp, "page_first"), None),
    Kind("mha-asymmetric-swa", mha.AsymmetricMHATokenToKVPoolHost, PoolName.SWA, TRAILING,
         functools.partial(mha_host, mha_device(v_head_dim=8), "page_first"), None, page=asymmetric_page,
         fails="kvstore drops the pool at registration: SidecarPools.register (integrations/sglang_pools.py:108) "
               "calls get_dummy_flat_data_page, which raises NotImplementedError (AsymmetricMHATokenToKVPoolHost "
               "has no flat pages: kv_buffer is a (k_buffer, v_buffer) tuple, head_dim 16 != v_head_dim 8); "
               "register_mem_host_pool_v2 logs \"host pool 'swa' cannot be stored (its pages are misses)\" and "
               "batch_set_v2 returns {'swa': [False, False, False]} (\"pool 'swa' was never registered\")"),
    Kind("mha-asymmetric-anchor", mha.AsymmetricMHATokenToKVPoolHost, PoolName.KV, ALL,
         functools.partial(mha_host, mha_device(v_head_dim=8), "page_first"), None, page=asymmetric_page,
         fails="register_mem_pool_host raises ValueError: host pool: expected equal K and V head dims, got 16 "
               "and 8 (describe_pool, integrations/sglang_pages.py:69, via integrations/sglang.py:244): "
               "SGLang's attach fails", raises=ValueError),
    Kind("mla-kv-anchor-packed-mtp", mla.MLATokenToKVPoolHost, PoolName.KV, ALL,
         functools.partial(mla_anchor_packed_mtp, "page_first"), None),
    *[Kind(f"mla-draft-{layout}", mla.MLATokenToKVPoolHost, PoolName.DRAFT, ALL,
           functools.partial(mla_draft, layout), True)
      for layout in ("layer_first", "page_first", "page_first_direct")],
    *[Kind(f"konly-indexer-{layout}", mha.MHATokenToKOnlyPoolHost, PoolName.INDEXER, ALL,
           functools.partial(konly_indexer, layout), False)
      for layout in ("layer_first", "page_first", "page_first_direct")],
    *[Kind(f"mamba-{layout}", mamba.MambaPoolHost, PoolName.MAMBA, TRAILING, functools.partial(mamba_host, layout),
           False)
      for layout in ("page_first", "page_first_direct")],
    Kind("mamba-mtp-draft", mamba.MambaPoolHost, PoolName.MAMBA, TRAILING,
         functools.partial(mamba_host, "page_first_direct", draft=True), False),
    Kind("mamba-side-state", mamba.MambaPoolHost, PoolName.MAMBA, TRAILING,
         functools.partial(mamba_host, "page_first_direct", side_state=True), False),
    *[Kind(f"dsa-indexer-{layout}", dsa.DSAIndexerPoolHost, PoolName.INDEXER, ALL,
           functools.partial(dsa_indexer, layout), False)
      for layout in ("layer_first", "page_first")],
    Kind("qsa-indexer", qsa.QSAIndexerPoolHost, PoolName.INDEXER, ALL, qsa_indexer, False),
    Kind("nvfp4-index", minimax_m3_nvfp4.MiniMaxM3Nvfp4IndexKPoolHost, PoolName.INDEXER, ALL, nvfp4_index, False),
    Kind("nvfp4-main-anchor", minimax_m3_nvfp4.MiniMaxM3Nvfp4MainKVPoolHost, PoolName.KV, ALL, nvfp4_main, False),
    *[Kind(f"dsv4-swa-{layout}", DeepSeekV4PagedHostPool, PoolName.SWA, TRAILING,
           functools.partial(dsv4_paged, "swa", layout), False)
      for layout in ("layer_first", "page_first", "page_first_direct")],
    Kind("dsv4-c4", DeepSeekV4PagedHostPool, PoolName.DEEPSEEK_V4_C4, ALL, functools.partial(dsv4_paged, "c4"),
         False),
    Kind("dsv4-c4-indexer", DeepSeekV4PagedHostPool, PoolName.DEEPSEEK_V4_C4_INDEXER, ALL,
         functools.partial(dsv4_paged, "c4_indexer"), False),
    Kind("dsv4-c128", DeepSeekV4PagedHostPool, PoolName.DEEPSEEK_V4_C128, ALL, functools.partial(dsv4_paged, "c128"),
         False),
    Kind("dsv4-c4-state", DeepSeekV4StateHostPool, PoolName.DEEPSEEK_V4_C4_STATE, TRAILING,
         functools.partial(dsv4_state, False), False),
    Kind("dsv4-c4-indexer-state-layer_first", DeepSeekV4StateHostPool, PoolName.DEEPSEEK_V4_C4_INDEXER_STATE,
         TRAILING, functools.partial(dsv4_state, True, "layer_first"), False),
    Kind("dsv4-logical-anchor", LogicalHostPool, PoolName.KV, ALL, dsv4_logical_anchor, False),
]
KIND_IDS = [k.id for k in KINDS]
assert len(set(KIND_IDS)) == len(KIND_IDS)

# Concrete HostKVCache classes SGLang 0.5.23 has that are not built here (see the module docstring).
NOT_BUILT = {mha_mxfp8.MHATokenToKVPoolMXFP8Host, mha.HiSparseMHATokenToKVPoolHost,
             unified.UnifiedPageEnvelopeHostPool}


def kinds():
    return [pytest.param(k, id=k.id, marks=[pytest.mark.xfail(strict=True, raises=k.raises, reason=k.fails)]
                         if k.fails else [])
            for k in KINDS]


# -- helpers ---------------------------------------------------------------------------------------------------


def host_buffers(pool) -> list[torch.Tensor]:
    """The host tensors behind ``pool``'s pages."""
    found = []
    for attr in ("kv_buffer", "k_buffer", "v_buffer", "temporal_buffer", "conv_buffer", "slot_state_buffers",
                 "index_k_with_scale_buffer"):
        value = getattr(pool, attr, None)
        for t in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(t, torch.Tensor) and t.numel():
                found.append(t)
    return found


def build(kind: Kind, seed: int):
    """A new pool of ``kind`` filled with random bytes."""
    with sglang_runtime():
        pool = kind.build()
    assert type(pool) is kind.cls
    gen = torch.Generator().manual_seed(seed)
    for buf in host_buffers(pool):
        raw = buf.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen))
    return pool


def num_pages(pool) -> int:
    return pool.size // pool.page_size


def slots(pool, pages) -> torch.Tensor:
    """The host indices of ``pages`` of ``pool`` (``page_size`` each, as the controller hands them)."""
    return page_indices(list(pages), pool.page_size)


def all_pages(kind: Kind, pool) -> list[torch.Tensor]:
    return [kind.page(pool, p * pool.page_size) for p in range(num_pages(pool))]


def storage_config(root, is_mla_model: bool = False) -> HiCacheStorageConfig:
    extra = {"backend_name": "kvstore", "module_path": "kvstore.integrations.sglang",
             "class_name": "KVStoreHiCache", "interface_v1": 1, "disk_dir": str(root / "kv")}
    return HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                                is_mla_model=is_mla_model, enable_storage_metrics=False, is_page_first_layout=False,
                                model_name="test/pool-kinds", extra_config=extra)


@pytest.fixture
def backends(tmp_path):
    """``backends(kind, pool, anchor)``: SGLang's factory builds a backend over ``tmp_path/kv`` and the pools are
    registered as the hybrid controller registers them; every backend is closed at teardown."""
    made = []

    def attach(kind: Kind, pool, anchor):
        # As SGLang's controller: is_mla_model when the anchor is MLA (a rank-replicated cache).
        mla_anchor = kind.name == PoolName.KV and isinstance(pool, mla.MLATokenToKVPoolHost)
        backend = StorageBackendFactory.create_backend("dynamic", storage_config(tmp_path, mla_anchor), None)
        made.append(backend)
        assert type(backend) is KVStoreHiCache
        if kind.name == PoolName.KV:  # the pool is the stack's anchor
            backend.register_mem_pool_host(pool)
            backend.register_mem_host_pool_v2(pool, PoolName.KV)
        else:
            backend.register_mem_pool_host(anchor)
            backend.register_mem_host_pool_v2(anchor, PoolName.KV)
            backend.register_mem_host_pool_v2(pool, kind.name)
        backend.on_host_pools_registered()
        return backend

    yield attach
    for backend in made:
        backend.close()


def transfer(kind: Kind, pool, ks, pages) -> PoolTransfer:
    return PoolTransfer(name=kind.name, keys=list(ks), host_indices=slots(pool, pages), hit_policy=kind.policy)


def store(backend, kind: Kind, pool, anchor, ks, pages) -> None:
    """Back up ``pages`` of ``pool`` under ``ks`` (and, for a sidecar, the anchor's KV pages under the same keys,
    as the controller stores them: ``batch_set_v1``)."""
    if kind.name != PoolName.KV:
        assert backend.batch_set_v1(list(ks), slots(anchor, range(len(ks)))) == [True] * len(ks)
    assert backend.batch_set_v2([transfer(kind, pool, ks, pages)]) == {str(kind.name): [True] * len(ks)}


def assert_pages(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype == torch.uint8 and g.shape == w.shape, (what, i, g.shape, w.shape)
        assert torch.equal(g, w), f"{what}: page {i} differs"


def src_dst(pool) -> tuple[list[int], list[int]]:
    n = num_pages(pool)
    assert n >= 7, n
    return [1, 2, 3], [n - 3, n - 2, n - 1]


# -- the inventory -------------------------------------------------------------------------------------------


def test_every_concrete_host_pool_class_is_built_or_listed():
    """Every concrete ``HostKVCache`` subclass SGLang has is a kind here or listed as not buildable on CPU (a new
    SGLang version with a new host pool class fails this test until it is covered)."""
    assert memory_pool_host and pool_host  # imported: their subclasses are registered
    seen, todo = set(), [HostKVCache]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in seen:
                seen.add(sub)
                todo.append(sub)
    concrete = {c for c in seen if not inspect.isabstract(c) and c.__module__.startswith("sglang.")}
    covered = {k.cls for k in KINDS}
    assert concrete - covered - NOT_BUILT == set()
    assert not covered & NOT_BUILT


# -- 0. the store path ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [k for k in KINDS if k.in_place is not None], ids=lambda k: k.id)
def test_store_path(backends, kind):
    """A pool of KV pages kvstore can view is stored in place; any other pool as its flat bytes. (Reads kvstore's
    internal ``SidecarPools._pools``: the path is not visible through SGLang's interface.)"""
    pool, anchor = build(kind, seed=1), anchor_pool()
    backend = backends(kind, pool, anchor)
    registered = backend.pools._pools[str(kind.name)]
    assert (registered.kv is not None) is kind.in_place
    assert registered.page_bytes == flat_page(pool, 0).numel()


# -- 1. set, then get into other slots ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", kinds())
def test_set_then_get_into_other_slots_is_byte_exact(backends, kind):
    pool, anchor = build(kind, seed=2), anchor_pool()
    backend = backends(kind, pool, anchor)
    src, dst = src_dst(pool)
    ks = keys(3, "s")
    want = [kind.page(pool, p * pool.page_size) for p in src]
    store(backend, kind, pool, anchor, ks, src)
    before = all_pages(kind, pool)
    assert backend.batch_get_v2([transfer(kind, pool, ks, dst)]) == {str(kind.name): [True] * 3}
    after = all_pages(kind, pool)
    assert_pages([after[p] for p in dst], want, f"{kind.id} pages read back")
    others = [p for p in range(num_pages(pool)) if p not in dst]
    assert_pages([after[p] for p in others], [before[p] for p in others], f"{kind.id} other slots")


# -- 2. the hit query --------------------------------------------------------------------------------------------


def hit(backend, kind: Kind, ks, policy=None, window: int = 1) -> tuple[int, int]:
    """``batch_exists_v2`` as the controller asks it: the prompt's page hashes and, for a sidecar, a transfer with
    the tree's placeholder keys (one per page the pool needs at the end of the prefix). (KV hit pages, the pool's.)"""
    transfers = [] if policy is None else [PoolTransfer(name=kind.name, keys=[PLACEHOLDER] * window,
                                                        hit_policy=policy)]
    result = backend.batch_exists_v2(list(ks), transfers)
    return result.kv_hit_pages, result.extra_pool_hit_pages.get(str(kind.name), 0)


@pytest.mark.parametrize("kind", kinds())
def test_exists_agrees_with_what_was_stored(backends, kind):
    pool, anchor = build(kind, seed=3), anchor_pool()
    backend = backends(kind, pool, anchor)
    ks = keys(4, "e")
    query = ks + keys(1, "never")
    if kind.name == PoolName.KV:  # the anchor's own pages: the KV hit
        store(backend, kind, pool, anchor, ks, range(1, 5))
        assert hit(backend, kind, query)[0] == 4
        assert hit(backend, kind, keys(2, "never"))[0] == 0
        return
    # KV pages for all four keys; the pool's pages for the last three only.
    assert backend.batch_set_v1(ks, slots(anchor, range(4))) == [True] * 4
    assert backend.batch_set_v2([transfer(kind, pool, ks[1:], [1, 2, 3])]) == {str(kind.name): [True] * 3}
    assert hit(backend, kind, query) == (4, 0)
    assert hit(backend, kind, query, ALL) == (0, 0)                   # page 0 of the pool is missing
    assert hit(backend, kind, query, TRAILING, 1) == (4, 4)          # the last page of the prefix is there
    assert hit(backend, kind, query, TRAILING, 3) == (4, 4)          # so are the last three
    assert hit(backend, kind, query, TRAILING, 4) == (0, 0)          # not the last four
    assert hit(backend, kind, ks[:1], TRAILING, 1) == (0, 0)         # a prefix ending before the stored pages
    assert backend.batch_set_v2([transfer(kind, pool, ks[:1], [4])]) == {str(kind.name): [True]}
    assert hit(backend, kind, query, ALL) == (4, 4)
    assert hit(backend, kind, query, TRAILING, 4) == (4, 4)


# -- 3. a restart ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", kinds())
def test_a_new_backend_reads_the_pages_back_after_a_restart(backends, kind):
    """Engine A stores pages and closes its backend; engine B (new pools with other bytes, a new backend over the
    same ``disk_dir``) reads them back byte for byte."""
    first, anchor = build(kind, seed=4), anchor_pool()
    backend = backends(kind, first, anchor)
    src, dst = src_dst(first)
    ks = keys(3, "r")
    want = [kind.page(first, p * first.page_size) for p in src]
    store(backend, kind, first, anchor, ks, src)
    backend.close()

    second = build(kind, seed=5)
    again = backends(kind, second, anchor_pool())
    if kind.name != PoolName.KV:
        assert hit(again, kind, ks, kind.policy, 1) == (3, 3)
    else:
        assert hit(again, kind, ks)[0] == 3
    before = all_pages(kind, second)
    assert again.batch_get_v2([transfer(kind, second, ks, dst)]) == {str(kind.name): [True] * 3}
    after = all_pages(kind, second)
    assert_pages([after[p] for p in dst], want, f"{kind.id} pages after the restart")
    others = [p for p in range(num_pages(second)) if p not in dst]
    assert_pages([after[p] for p in others], [before[p] for p in others], f"{kind.id} other slots")
