"""SGLang's v2 (hybrid) storage interface, driven by SGLang's own ``HybridCacheController``.

Runs only where SGLang is installed (``.venv-sglang``, built by
``scripts/engine-venvs.sh sglang``); elsewhere the module skips. Two hybrid
host pool groups, each SGLang's real ``HostPoolGroup`` of ``build_pool_entry``
entries over SGLang's real CPU device pools, assembled the way the stack
strategies of ``hybrid_pool_assembler.py`` assemble them:

* ``mamba`` (``_MambaStrategy`` / ``build_hybrid_mamba_stack``): the full
  attention KV of a ``HybridLinearKVPool`` (``MHATokenToKVPoolHost``, the
  anchor) and the Mamba state of its ``MambaPool`` (``MambaPoolHost``,
  ``PoolName.MAMBA``, one state per slot: host page size 1);
* ``swa`` (``_SwaStrategy`` / ``build_hybrid_swa_group``): the full and the
  sliding-window halves of an ``SWAKVPool``, each in an
  ``MHATokenToKVPoolHost`` (``PoolName.KV`` anchor, ``PoolName.SWA``).

The test stands in for SGLang's unified radix tree only: it hands the
controller what the tree's components hand it (``components/mamba.py`` and
``components/swa.py``, ``build_hicache_transfers``): a backup
(``write_storage``) carries the sidecar's trailing pages under the node's last
page hashes (``TRAILING_PAGES``: one Mamba state keyed by the last page; the
sliding window's pages keyed by theirs); a prefetch carries placeholder keys
(one for Mamba, a window's worth for SWA) that the controller re-keys to the
hit's trailing pages (``_sync_trailing_keys``) once the tree has staged host
slots for them (``_alloc_prefetch_aux_staging``, mirrored by
``stage_sidecars``). The controller's own threads do the rest: the hit query
(``_storage_hit_query`` -> ``batch_exists_v2``), the page transfer (KV pages
through ``batch_get_v1``/``batch_get``, the sidecar through ``batch_get_v2``),
the backup (sidecar through ``batch_set_v2``, then the KV pages) and the acks.

What the controller cannot do on a CPU machine is its device <-> host (L2)
copy (``transfer_kv_*`` and the Mamba transfer kernels are CUDA/HIP/NPU only),
so the host pools are filled with random bytes directly, which is where that
copy would have put them. The host <-> storage (L3) path is SGLang's unchanged
code. Every comparison is of raw bytes.

Each test runs over SGLang's own ``HiCacheFile`` (backend ``file``, which
implements v2) and kvstore's ``KVStoreHiCache`` (backend ``dynamic``).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import threading
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("sglang", reason="needs SGLang 0.5.23: build .venv-sglang with scripts/engine-venvs.sh sglang "
                                     "and run .venv-sglang/bin/pytest")

from sglang_env import no_failure_injection, page_bytes, stubbed_torchvision  # noqa: E402,F401


def _import_sglang():
    with stubbed_torchvision():
        from sglang.srt.configs.mamba_utils import Mamba2CacheParams, Mamba2StateShape
        from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
        from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator
        from sglang.srt.mem_cache.base_prefix_cache import CacheRequestHandle
        from sglang.srt.mem_cache.hicache_storage import HiCacheFile, PoolHitPolicy, PoolName, PoolTransfer
        from sglang.srt.mem_cache.hybrid_cache.hybrid_cache_controller import HybridCacheController
        from sglang.srt.mem_cache.hybrid_cache.hybrid_pool_assembler import (
            _stage_local_layer_mapping,
            _swa_layer_mappings,
            build_pool_entry,
        )
        from sglang.srt.mem_cache.memory_pool import HybridLinearKVPool, MambaPool
        from sglang.srt.mem_cache.pool_host import HostPoolGroup
        from sglang.srt.mem_cache.pool_host.mamba import MambaPoolHost
        from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
        from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool
        from sglang.srt.mem_cache.utils import get_storage_hash_str
        from sglang.srt.runtime_context import get_parallel
    return types.SimpleNamespace(**{k: v for k, v in locals().items()})


sgl = _import_sglang()

PAGE = 16
DEVICE_TOKENS = 256        # host KV pools hold 2x the device tokens (+ a page): 33 pages
MAMBA_SLOTS = 8            # Mamba host pool: 2x the device slots (+ 1): 17 states
HEADS, HEAD_DIM, DTYPE = 2, 16, torch.bfloat16
# (a) layers 0 and 2 full attention, 1, 3 and 4 Mamba; (b) 0 and 3 full attention, 1, 2 and 4 sliding window.
MAMBA_FULL_LAYERS, MAMBA_LAYERS = [0, 2], [1, 3, 4]
SWA_FULL_LAYERS, SWA_LAYERS = [0, 3], [1, 2, 4]
WINDOW_PAGES = 2           # the sliding window the tree keeps (and stores) for a node: its last 2 pages
KV_PAGE_BYTES = 2 * 2 * PAGE * HEADS * HEAD_DIM * 2           # K+V, 2 layers: 4096
SWA_PAGE_BYTES = 2 * 3 * PAGE * HEADS * HEAD_DIM * 2          # K+V, 3 layers: 6144
# Mamba2 state per layer: conv (conv_dim 40 = 32 + 2*1*4, kernel-1 = 3) bf16 + temporal (2 heads, 8, 4) fp32.
MAMBA_STATE_BYTES = 3 * (40 * 3 * 2 + 2 * 8 * 4 * 4)          # 1488
TIMEOUT = 30.0
MODEL = "test/tiny-hybrid"
PLACEHOLDER = "__placeholder__"  # the tree's prefetch keys before the hit is known (components/*.py)

KINDS = ("mamba", "swa")
BACKENDS = [pytest.param("file", id="file"),
            pytest.param("kvstore", id="kvstore")]


# -- the stack ------------------------------------------------------------------------------------


def backend_args(backend: str, root: Path) -> tuple[str, dict]:
    """(storage_backend, extra_config) for SGLang's file backend or kvstore's, both keeping pages under ``root``."""
    if backend == "file":
        return "file", {"file_storage_path": str(root / "file")}
    return "dynamic", {"backend_name": "kvstore", "module_path": "kvstore.integrations.sglang",
                       "class_name": "KVStoreHiCache", "interface_v1": 1, "disk_dir": str(root / "kv")}


def _fill_random(buffers, gen: torch.Generator) -> None:
    for buf in buffers:
        raw = buf.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen))


def _kv_host(device, layout: str):
    """SGLang's MHA host pool over ``device`` with the arguments ``build_kv_host_pool`` passes (host ratio 2),
    unpinned (no CUDA here)."""
    info = device.get_device_pool_infos()[0].buffer_info
    capacity = device.size if device.host_capacity_tokens is None else device.host_capacity_tokens
    return sgl.MHATokenToKVPoolHost(info, 2.0, 0, PAGE, layout, pin_memory=False, device_capacity_tokens=capacity,
                                    start_layer=device.start_layer, end_layer=device.end_layer,
                                    write_back_staging=device.hicache_write_back_staging)


@dataclasses.dataclass
class Stack:
    kind: str
    controller: object
    group: object
    kv_host: object
    side_host: object
    side_name: object

    @property
    def backend(self):
        return self.controller.storage_backend

    def side_pages(self, slots: torch.Tensor) -> list[torch.Tensor]:
        """The bytes of the sidecar pages at host ``slots`` (one per state / per page), copies."""
        step = self.side_host.page_size
        return [self.side_host.get_data_page(int(i), flat=True).contiguous().view(torch.uint8).clone()
                for i in slots[::step]]

    def close(self) -> None:
        self.controller.detach_storage_backend()


def build_stack(kind: str, backend: str, root: Path, seed: int = 0) -> Stack:
    """SGLang's hybrid host pool group of ``kind`` and its ``HybridCacheController`` with the storage backend
    attached (the controller builds the backend through SGLang's factory and registers every pool)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "mamba":
        # As _MambaStrategy.build / build_hybrid_mamba_stack (and build_mamba_host_pool) assemble it.
        shape = sgl.Mamba2StateShape.create(tp_world_size=1, intermediate_size=32, n_groups=1, num_heads=2,
                                            head_dim=8, state_size=4, conv_kernel=4)
        mamba = sgl.MambaPool(size=MAMBA_SLOTS, spec_state_size=4,
                              cache_params=sgl.Mamba2CacheParams(shape=shape, layers=MAMBA_LAYERS),
                              mamba_layer_ids=MAMBA_LAYERS, device="cpu")
        kvcache = sgl.HybridLinearKVPool(size=DEVICE_TOKENS, dtype=DTYPE, page_size=PAGE, head_num=HEADS,
                                         head_dim=HEAD_DIM, full_attention_layer_ids=MAMBA_FULL_LAYERS,
                                         device="cpu", mamba_pool=mamba)
        allocator = sgl.TokenToKVPoolAllocator(size=DEVICE_TOKENS, dtype=DTYPE, device="cpu", kvcache=kvcache,
                                               need_sort=False)
        full = kvcache.full_kv_pool
        full_map = sgl._stage_local_layer_mapping(kvcache.full_attention_layer_id_mapping, kvcache.start_layer)
        (mamba_info,) = mamba.get_device_pool_infos()
        side_map = {layer - kvcache.start_layer: i for i, layer in enumerate(mamba_info.layer_ids)}
        # MambaPoolHost takes page_first / page_first_direct only; the KV pool shares the global layout. Unpinned
        # (build_mamba_host_pool leaves MambaPoolHost's pin_memory=True, which needs CUDA).
        kv_host = _kv_host(full, "page_first_direct")
        side_host = sgl.MambaPoolHost(mamba_info.buffer_info, 2.0, 0, device_capacity=mamba.size, pin_memory=False,
                                      layout="page_first_direct")
        side_name, side_device = sgl.PoolName.MAMBA, mamba
        side_buffers = side_host.kv_buffer  # [temporal, conv...]
    else:
        # As _SwaStrategy.build / build_hybrid_swa_group assemble it (two separate host pools, no shared arena).
        kvcache = sgl.SWAKVPool(size=DEVICE_TOKENS, size_swa=DEVICE_TOKENS, page_size=PAGE, dtype=DTYPE,
                                head_num=HEADS, head_dim=HEAD_DIM, swa_attention_layer_ids=SWA_LAYERS,
                                full_attention_layer_ids=SWA_FULL_LAYERS, device="cpu")
        allocator = sgl.SWATokenToKVPoolAllocator(size=DEVICE_TOKENS, size_swa=DEVICE_TOKENS, page_size=PAGE,
                                                  dtype=DTYPE, device="cpu", kvcache=kvcache, need_sort=False)
        full, side_device = kvcache.full_kv_pool, kvcache.swa_kv_pool
        full_map, side_map = sgl._swa_layer_mappings(kvcache)
        kv_host, side_host = _kv_host(full, "layer_first"), _kv_host(side_device, "layer_first")
        side_name = sgl.PoolName.SWA
        side_buffers = [side_host.kv_buffer]
    transfer_layer_id_max = max(full_map.keys() | side_map.keys()) + 1
    _fill_random([kv_host.kv_buffer, *side_buffers], gen)
    group = sgl.HostPoolGroup([
        sgl.build_pool_entry(name=sgl.PoolName.KV, host_pool=kv_host, device_pool=full, layer_mapping=full_map,
                             transfer_layer_id_max=transfer_layer_id_max, is_anchor=True),
        sgl.build_pool_entry(name=side_name, host_pool=side_host, device_pool=side_device, layer_mapping=side_map,
                             transfer_layer_id_max=transfer_layer_id_max),
    ])
    storage_backend, extra = backend_args(backend, root)
    # The parallel topology a scheduler publishes: one rank (the controller reads it when it attaches storage).
    with sgl.get_parallel().override(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_dcp_rank=0, attn_dcp_size=1):
        controller = sgl.HybridCacheController(allocator, group, PAGE, None, threading.Event(), io_backend="direct",
                                               storage_backend=storage_backend, model_name=MODEL,
                                               storage_backend_extra_config=extra,
                                               transfer_layer_id_max=transfer_layer_id_max)
    assert controller.storage_host_pool is kv_host and controller.mem_pool_host is group
    return Stack(kind, controller, group, kv_host, side_host, side_name)


@pytest.fixture
def stacks():
    """``stacks(kind, backend, root, seed)``: a stack whose controller detaches (closing the backend) at teardown."""
    built = []

    def factory(*args, **kwargs) -> Stack:
        stack = build_stack(*args, **kwargs)
        built.append(stack)
        return stack

    yield factory
    for stack in built:
        if stack.controller.enable_storage:
            stack.close()


# -- the tree's side of the protocol ---------------------------------------------------------------


def token_ids(pages: int, seed: int) -> list[int]:
    return torch.randint(0, 50_000, (pages * PAGE,), generator=torch.Generator().manual_seed(seed)).tolist()


def hash_chain(tokens: list[int]) -> list[str]:
    return sgl.get_storage_hash_str(tokens, None, page_size=PAGE)


def alloc_sidecar(stack: Stack) -> torch.Tensor:
    """Host slots of the sidecar's data for a node: one Mamba state, or the window's SWA pages."""
    n = 1 if stack.kind == "mamba" else WINDOW_PAGES * PAGE
    slots = stack.side_host.alloc(n)
    assert slots is not None and slots.numel() == n
    return slots


def backup_transfer(stack: Stack, slots: torch.Tensor, node_hashes: list[str]):
    """The tree's BACKUP_STORAGE sidecar transfer for a node (components/mamba.py, components/swa.py): the
    sidecar's trailing data keyed by the node's last page hash(es)."""
    pages = slots.numel() // stack.side_host.page_size
    return sgl.PoolTransfer(name=stack.side_name, host_indices=slots, keys=list(node_hashes[-pages:]),
                            hit_policy=sgl.PoolHitPolicy.TRAILING_PAGES)


def prefetch_transfer(stack: Stack):
    """The tree's PREFETCH sidecar transfer: placeholder keys (one state, a window of pages), no slots yet."""
    n = 1 if stack.kind == "mamba" else WINDOW_PAGES
    return sgl.PoolTransfer(name=stack.side_name, keys=[PLACEHOLDER] * n, hit_policy=sgl.PoolHitPolicy.TRAILING_PAGES)


def backup(stack: Stack, host_indices: torch.Tensor, tokens: list[int], hashes: list[str], extra_pools=None):
    """``write_storage`` as the tree calls it, then the backup thread's ack."""
    cc = stack.controller
    op_id = cc.write_storage(host_indices, tokens, hash_value=hashes, extra_pools=extra_pools)
    op = cc.ack_backup_queue.get(timeout=TIMEOUT)
    assert op.id == op_id
    return op


def stage_sidecars(stack: Stack, op, hit_tokens: int) -> None:
    """The tree's ``_alloc_prefetch_aux_staging``: host slots for each sidecar transfer, sized to the hit."""
    hit_pages = hit_tokens // PAGE
    for transfer in op.pool_transfers or []:
        if transfer.host_indices is not None or transfer.indices_from_pool:
            continue
        host_pool = stack.group.entry_map[transfer.name].host_pool
        n = min(len(transfer.keys or ()), hit_pages) * host_pool.page_size
        if n:
            transfer.host_indices = host_pool.alloc(n)
            assert transfer.host_indices is not None


def prefetch(stack: Stack, rid: str, tokens: list[int]):
    """The tree's storage prefetch with its sidecar: hit query, host slots for the hit (KV through the
    controller's ``allocate_storage_hit``, sidecar staging as the tree does), page transfer, acks up to
    ``completed_req``. Returns (operation, KV host slots or None, sidecar transfer, acks)."""
    cc = stack.controller
    side = prefetch_transfer(stack)
    op = cc.prefetch(sgl.CacheRequestHandle(rid, 0), tokens, extra_pools=[side])
    hit = cc.prefetch_hit_queue.get(timeout=TIMEOUT)
    assert hit is op and op.request_id == rid
    if op.storage_hit_count == 0:  # the tree revokes a miss: nothing is staged or read
        return op, None, side, []
    dst, alloc_len = cc.allocate_storage_hit(op, op.storage_hit_count, allow_partial=False, min_tokens=PAGE,
                                             evict_host=lambda n: 0)
    assert dst is not None and alloc_len == op.storage_hit_count
    stage_sidecars(stack, op, op.storage_hit_count)
    op.host_indices = dst
    cc.prefetch_buffer.put(op)
    acks = []
    while not acks or not acks[-1].completed_req:
        ack = cc.ack_prefetch_queue.get(timeout=TIMEOUT)
        assert ack.operation is op
        acks.append(ack)
    return op, dst, side, acks


def pool_hits(acks, name) -> int | None:
    """The sidecar's page count the controller acked (its ``count_pool_hits`` of ``batch_get_v2``)."""
    for ack in acks:
        if ack.pool_hits is not None:
            return {str(k): v for k, v in ack.pool_hits.items()}.get(str(name))
    return None


def kv_pages(stack: Stack, slots: torch.Tensor) -> list[torch.Tensor]:
    return [page_bytes(stack.kv_host, i) for i in slots[::PAGE]]


def assert_same_pages(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    assert len(got) == len(want), (what, len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype == torch.uint8 and g.shape == w.shape, (what, i, g.shape, w.shape)
        assert torch.equal(g, w), f"{what} page {i} differs"


@dataclasses.dataclass(frozen=True)
class Seen:
    """A ``PoolTransfer`` as the backend received it (copied at call time: the controller re-keys and trims
    its transfers in place)."""
    name: str
    hit_policy: str
    keys: tuple
    host_len: int | None
    indices_from_pool: object


def spy_v2(backend) -> list[tuple[str, int | None, list[Seen]]]:
    """Record every v2 call the controller makes on ``backend``: (method, len(keys) or None, transfers)."""
    calls = []

    def wrap(method: str, fn):
        def seen(transfers):
            return [Seen(str(t.name), str(t.hit_policy.value), tuple(t.keys or ()),
                         None if t.host_indices is None else int(t.host_indices.numel()), t.indices_from_pool)
                    for t in transfers or ()]

        if method == "batch_exists_v2":
            def spy(keys, pool_transfers=None, extra_info=None):
                calls.append((method, len(keys), seen(pool_transfers)))
                return fn(keys, pool_transfers, extra_info)
        else:
            def spy(transfers, extra_info=None):
                calls.append((method, None, seen(transfers)))
                return fn(transfers, extra_info)
        return spy

    for method in ("batch_exists_v2", "batch_get_v2", "batch_set_v2"):
        setattr(backend, method, wrap(method, getattr(backend, method)))
    return calls


# -- 1. back up and prefetch ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_backup_then_prefetch_is_byte_exact(stacks, tmp_path, kind, backend):
    stack = stacks(kind, backend, tmp_path, seed=1)
    side_page = stack.side_host.page_size
    # The geometry each pool's pages have in storage.
    assert stack.kv_host.get_data_page(0, flat=True).nbytes == KV_PAGE_BYTES
    if kind == "mamba":
        page = stack.side_host.get_data_page(3, flat=True)
        # A copy (torch.cat of the state's tensors), uint8, one flat state.
        assert side_page == 1 and page.dtype == torch.uint8 and page.shape == (MAMBA_STATE_BYTES,)
        assert page.data_ptr() != stack.side_host.temporal_buffer[3].data_ptr()
    else:
        assert side_page == PAGE and stack.side_host.get_data_page(0, flat=True).nbytes == SWA_PAGE_BYTES
    # The controller registered every pool of the group, the KV anchor included.
    assert stack.backend.mem_pool_host is stack.kv_host
    assert set(stack.backend.registered_pools) == {sgl.PoolName.KV, stack.side_name}
    assert stack.backend.registered_pools[sgl.PoolName.KV] is stack.kv_host
    assert stack.backend.registered_pools[stack.side_name] is stack.side_host
    calls = spy_v2(stack.backend)

    n = 4
    tokens = token_ids(n, seed=7)
    hashes = hash_chain(tokens)
    src = stack.kv_host.alloc(n * PAGE)
    side_src = alloc_sidecar(stack)
    spacer = (stack.kv_host.alloc(3 * PAGE), stack.side_host.alloc(3 * side_page))  # prefetch lands elsewhere
    want_kv, want_side = kv_pages(stack, src), stack.side_pages(side_src)
    stored = 1 if kind == "mamba" else WINDOW_PAGES  # sidecar pages (states) stored

    op = backup(stack, src, tokens, hashes, [backup_transfer(stack, side_src, hashes)])
    assert op.completed_tokens == n * PAGE
    assert op.pool_storage_result.extra_pool_hit_pages.get(stack.side_name) == stored
    assert calls == [("batch_set_v2", None, [Seen(stack.side_name.value, "trailing_pages", tuple(hashes[-stored:]),
                                                  stored * side_page, None)])]
    calls.clear()

    # One page more than was stored: the hit is what was stored, and the sidecar follows it.
    fetched, dst, side, acks = prefetch(stack, "req-1", tokens + token_ids(1, seed=8))
    assert fetched.storage_hit_count == n * PAGE and fetched.hash_value == hashes
    assert acks[-1].completed_req and max(a.completed_tokens or 0 for a in acks) == n * PAGE
    assert pool_hits(acks, stack.side_name) == stored
    assert side.keys == hashes[-stored:] and side.host_indices.numel() == stored * side_page
    assert not set(dst.tolist()) & (set(src.tolist()) | set(spacer[0].tolist()))
    assert not set(side.host_indices.tolist()) & (set(side_src.tolist()) | set(spacer[1].tolist()))
    assert_same_pages(kv_pages(stack, dst), want_kv, "KV")
    assert_same_pages(stack.side_pages(side.host_indices), want_side, stack.side_name.value)
    # What the controller handed the backend: the hit query over every page hash with the tree's placeholder
    # keys, then the sidecar read re-keyed to the hit's trailing pages, one host page per key. The KV pages
    # themselves never travel as a v2 transfer: they go through batch_get_v1/batch_set_v1 (kvstore,
    # interface_v1) or batch_get/batch_set (HiCacheFile), and batch_exists_v2 answers for them by its keys.
    assert calls == [
        ("batch_exists_v2", n + 1, [Seen(stack.side_name.value, "trailing_pages", (PLACEHOLDER,) * stored,
                                         None, None)]),
        ("batch_get_v2", None, [Seen(stack.side_name.value, "trailing_pages", tuple(hashes[-stored:]),
                                     stored * side_page, None)]),
    ]

    # Tokens never stored: no hit, nothing is read.
    missed, none, _, _ = prefetch(stack, "req-2", token_ids(2, seed=9))
    assert missed.storage_hit_count == 0 and missed.hash_value == [] and none is None


# -- 2. a sidecar that is missing -------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_missing_sidecar_limits_the_hit(stacks, tmp_path, kind, backend):
    """A node's KV pages are stored but its sidecar never was (the tree had tombstoned it): the hit stops at
    the last prefix whose trailing sidecar data is stored (TRAILING_PAGES), and what is read is that."""
    stack = stacks(kind, backend, tmp_path, seed=2)
    # Node A: pages [0, a) with its sidecar; node B: pages [a, n), KV only.
    a = 2 if kind == "mamba" else 3
    n = a + 3
    tokens = token_ids(n, seed=17)
    hashes = hash_chain(tokens)
    src = stack.kv_host.alloc(n * PAGE)
    side_src = alloc_sidecar(stack)
    want_kv, want_side = kv_pages(stack, src), stack.side_pages(side_src)
    stored = 1 if kind == "mamba" else WINDOW_PAGES

    op_a = backup(stack, src[:a * PAGE], tokens[:a * PAGE], hashes[:a],
                  [backup_transfer(stack, side_src, hashes[:a])])
    op_b = backup(stack, src[a * PAGE:], tokens[a * PAGE:], hashes[a:])
    assert op_a.completed_tokens == a * PAGE and op_b.completed_tokens == (n - a) * PAGE

    # Longer than node A, up to or past the end of node B: the hit is node A, with node A's sidecar.
    for rid, asked in (("req-all", tokens + token_ids(1, seed=18)), ("req-mid", tokens[:(n - 1) * PAGE])):
        fetched, dst, side, acks = prefetch(stack, rid, asked)
        assert fetched.storage_hit_count == a * PAGE, rid
        assert fetched.hash_value == hashes[:a] and side.keys == hashes[a - stored:a]
        assert pool_hits(acks, stack.side_name) == stored
        assert_same_pages(kv_pages(stack, dst), want_kv[:a], f"{rid} KV")
        assert_same_pages(stack.side_pages(side.host_indices), want_side, f"{rid} {stack.side_name.value}")
        stack.kv_host.free(dst)
        stack.side_host.free(side.host_indices)

    # Shorter than node A: no prefix of it ends where sidecar data is stored, so nothing is a hit.
    short = a - 1
    fetched, none, side, _ = prefetch(stack, "req-short", tokens[:short * PAGE])
    assert fetched.storage_hit_count == 0 and fetched.hash_value == [] and none is None
    assert side.host_indices is None


# -- 3. a restart in the same process -----------------------------------------------------------------


def _back_up_node(stack: Stack, n: int, seed: int):
    """Back up an n-page node with its sidecar; return (tokens, hashes, KV page bytes, sidecar page bytes)."""
    tokens = token_ids(n, seed=seed)
    hashes = hash_chain(tokens)
    src = stack.kv_host.alloc(n * PAGE)
    side_src = alloc_sidecar(stack)
    want = kv_pages(stack, src), stack.side_pages(side_src)
    op = backup(stack, src, tokens, hashes, [backup_transfer(stack, side_src, hashes)])
    assert op.completed_tokens == n * PAGE
    return tokens, hashes, *want


def _prefetch_and_check(stack: Stack, rid: str, tokens, hashes, want_kv, want_side) -> None:
    stored = 1 if stack.kind == "mamba" else WINDOW_PAGES
    fetched, dst, side, acks = prefetch(stack, rid, tokens)
    assert fetched.storage_hit_count == len(hashes) * PAGE and fetched.hash_value == hashes
    assert pool_hits(acks, stack.side_name) == stored and side.keys == hashes[-stored:]
    assert_same_pages(kv_pages(stack, dst), want_kv, "KV")
    assert_same_pages(stack.side_pages(side.host_indices), want_side, stack.side_name.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_restarted_controller_prefetches_what_the_first_backed_up(stacks, tmp_path, kind, backend):
    """Engine A backs up and stops (detach closes its backend: kvstore flushes to LMDB); engine B, new pools
    with other bytes and a new backend over the same directory, prefetches A's pages byte for byte."""
    first = stacks(kind, backend, tmp_path, seed=3)
    saved = _back_up_node(first, 5, seed=31)
    first.close()

    second = stacks(kind, backend, tmp_path, seed=4)
    assert second.backend is not first.backend
    _prefetch_and_check(second, "req-restart", *saved)


# -- 4. two processes -----------------------------------------------------------------------------------


def back_up_in_this_process(backend: str, root: str, out: str) -> None:
    """The child's side of the cross-process test: back up a node of each kind, save what it stored."""
    saved = {}
    for i, kind in enumerate(KINDS):
        stack = build_stack(kind, backend, Path(root), seed=5)
        try:  # other tokens per kind: the same model name and page hashes would name the same KV pages
            saved[kind] = _back_up_node(stack, 4, seed=41 + i)
        finally:
            stack.close()
    torch.save(saved, out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pages_backed_up_by_another_process_prefetch_byte_exact(stacks, tmp_path, backend):
    out = tmp_path / "stored.pt"
    code = textwrap.dedent(f"""
        import test_sglang_hybrid as t
        t.back_up_in_this_process({backend!r}, {str(tmp_path)!r}, {str(out)!r})
    """)
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    workdir = tmp_path / "child"
    workdir.mkdir()
    result = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"child failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    saved = torch.load(out)
    for kind in KINDS:
        stack = stacks(kind, backend, tmp_path, seed=6)
        try:
            _prefetch_and_check(stack, f"req-{kind}", *saved[kind])
        finally:
            stack.close()
