"""SGLang's v2 storage interface: the host pools beside the KV pool, each in a store of its own.

Hybrid models in SGLang (Mamba and linear-attention hybrids, sliding-window
models, DSA, speculative decoding with a draft model) keep host pools
beside the KV pool: Mamba states, sliding-window KV, DSA indexer pages,
draft KV. SGLang registers each with ``register_mem_host_pool_v2(pool,
name)`` and moves their pages with ``batch_exists_v2`` / ``batch_get_v2`` /
``batch_set_v2`` and a ``PoolTransfer`` per pool, keyed by the same page
hashes as the KV pages.

A pool of KV pages (a sliding-window pool, a draft model's KV) is stored
as the KV pool is: its pages are viewed in place as kvstore blocks
(``integrations/sglang_pages.py``) and copied once, between the pool and a
tier. A page of any other pool is stored as its exact bytes: SGLang's flat
page (``get_data_page(i, flat=True)``, which for a Mamba pool concatenates
the conv and temporal states) viewed as ``uint8``, in a store whose layout
is one opaque row of the page's bytes (``pool_layout``). Each pool has its own
store, so pools never read each other's pages: its own layout fingerprint,
a salt naming the pool and the TP rank (Mamba states and sliding-window KV
are sharded per rank), its own LMDB directory (``disk_dir/pool-<name>``),
and lossless codecs only (a quantizing codec would change a state's bytes:
``pool_config``). Shared tiers (files, cache server, Redis) are shared as
they are: the salt keeps the pools apart there.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvstore import KVLayout, KVStore, StoreConfig
from kvstore.buffers import BufferPool
from kvstore.compression.registry import get_codec
from kvstore.integrations.sglang_pages import PageGeometry, describe_pool, host_page_tokens, page_starts

from sglang.srt.mem_cache.hicache_storage import PoolHitPolicy, PoolTransferResult  # noqa: E402  (after kvstore)

log = logging.getLogger(__name__)

CODEC_SETTINGS = ("disk_codec", "files_codec", "remote_codec", "redis_codec")
KV_POOL = "kv"  # SGLang's PoolName.KV: the anchor pool, served by the backend's own store
IDLE_BUFFER_BYTES = 256 << 20  # read buffers kept for the next batch (a fresh one page-faults on every byte)


def pool_layout(page_bytes: int) -> KVLayout:
    """One page of a pool as one block: a single row of ``page_bytes`` bytes (no K/V, heads or tokens)."""
    return KVLayout(num_layers=1, num_kv_heads=1, head_dim=page_bytes, dtype=torch.uint8, block_tokens=1,
                    kv_parts=1)


def pool_config(config: StoreConfig, name: str) -> StoreConfig:
    """The store settings of pool ``name``: its own LMDB directory, no GPU tier, lossless codecs only."""
    changes: dict[str, Any] = {"device_bytes": 0}
    if config.disk_dir is not None:
        changes["disk_dir"] = os.path.join(config.disk_dir, f"pool-{name}")
    for setting in CODEC_SETTINGS:
        if not get_codec(getattr(config, setting)).lossless:
            changes[setting] = "raw"  # a state's bytes must come back as they were
    return config.replace(**changes)


@dataclass
class _Pool:
    """A registered pool: SGLang's host pool, its store, the geometry of its flat pages, and of its KV pages
    (``kv``: viewed in place) when it holds KV."""

    name: str
    host_pool: Any
    store: KVStore
    page_bytes: int
    flat_dtype: torch.dtype
    flat_shape: tuple[int, ...]
    kv: PageGeometry | None = None

    @property
    def tokens_per_page(self) -> int:
        return host_page_tokens(self.host_pool)


class SidecarPools:
    """The stores of SGLang's non-KV host pools (see module docstring); ``close()`` closes them."""

    def __init__(self, config: StoreConfig, storage_config: Any, salt: Callable[[str], str],
                 record: Callable[[str, int, int, int, float], None]):
        self.config = config
        self.storage_config = storage_config  # SGLang's: the TP shard of a KV pool's layout
        self._salt = salt  # pool name -> the salt of its keys now (the backend's generation changes on clear)
        self._record = record  # (operation, pages moved, pages missed, bytes, seconds)
        self._pools: dict[str, _Pool] = {}
        self._buffers = BufferPool(IDLE_BUFFER_BYTES)

    def __contains__(self, name: str) -> bool:
        return str(name) in self._pools

    @property
    def names(self) -> list[str]:
        return sorted(self._pools)

    def register(self, host_pool: Any, name: str) -> None:
        """Open (or keep) the store of pool ``name`` for the flat pages of ``host_pool``."""
        name = str(name)
        sample = host_pool.get_dummy_flat_data_page()
        if not isinstance(sample, torch.Tensor) or not sample.is_contiguous():
            raise ValueError(f"host pool {name!r}: expected a contiguous tensor from get_dummy_flat_data_page, "
                             f"got {type(sample).__name__}")
        page_bytes = sample.nbytes  # 0: a pool of no bytes (a logical anchor)
        page = host_pool.get_data_page(0, flat=True)  # a pool without flat pages fails here, not on first use
        if not isinstance(page, torch.Tensor) or page.nbytes != page_bytes:
            raise ValueError(f"host pool {name!r}: expected flat pages of {page_bytes} bytes, got "
                             f"{getattr(page, 'shape', type(page).__name__)}")
        old = self._pools.get(name)
        if old is not None and old.page_bytes == page_bytes:
            old.host_pool = host_pool
            return
        if old is not None:
            old.store.close()
        kv = _kv_geometry(host_pool, self.storage_config)
        layout = kv.layout if kv is not None else pool_layout(max(1, page_bytes))  # a marker byte for 0
        store = KVStore(layout, pool_config(self.config, name))
        self._pools[name] = _Pool(name, host_pool, store, page_bytes, sample.dtype, tuple(sample.shape), kv)
        how = "KV pages in place" if kv is not None else "flat bytes" if page_bytes else "presence only"
        log.info("kvstore HiCache backend: pool %r, pages of %d bytes (%s, %s), tiers %s", name, page_bytes,
                 type(host_pool).__name__, how, [t.name for t in store.tiers])

    def present(self, name: str, keys: Sequence[str]) -> list[bool]:
        """Whether the store of pool ``name`` holds each key (False for a pool not registered)."""
        pool = self._pools.get(str(name))
        if pool is None:
            return [False] * len(keys)
        salt = self._salt(pool.name)
        return [pool.store.lookup_keyed([key], salt) == 1 for key in keys]

    def _slots(self, pool: _Pool, host_indices: Any, count: int) -> list[int]:
        return page_starts(host_indices, count, pool.tokens_per_page, getattr(pool.host_pool, "size", None),
                           f"host_indices of pool {pool.name!r}")

    def get(self, name: str, keys: Sequence[str], host_indices: Any) -> int:
        """Read pages ``keys`` into pool ``name`` at ``host_indices``; how many leading pages were read."""
        pool = self._pools[str(name)]
        slots = self._slots(pool, host_indices, len(keys))
        if not keys:
            return 0
        if pool.kv is not None:  # straight into the pool's pages
            outs = [pool.kv.to_canonical(pool.host_pool.get_data_page(slot, flat=False)) for slot in slots]
            return self._timed("prefetch", pool, keys, lambda: self._read(pool, keys, outs))
        return self._timed("prefetch", pool, keys, lambda: self._read_flat_pages(pool, keys, slots))

    def _read_flat_pages(self, pool: _Pool, keys: Sequence[str], slots: Sequence[int]) -> int:
        """Read pages into a reused buffer, then into the pool through SGLang's ``set_from_flat_data_page``."""
        buffer = self._buffers.take((len(keys), max(1, pool.page_bytes)), torch.uint8)
        try:
            n = self._read(pool, keys, [row.view(1, 1, 1, 1, -1) for row in buffer])
            for row, slot in zip(buffer[:n], slots):
                if pool.page_bytes:
                    pool.host_pool.set_from_flat_data_page(slot, row.view(pool.flat_dtype).view(pool.flat_shape))
        finally:
            self._buffers.give(buffer)
        return n

    def set(self, name: str, keys: Sequence[str], host_indices: Any) -> int:
        """Store pool ``name``'s pages at ``host_indices`` under ``keys``; how many leading keys are held after."""
        pool = self._pools[str(name)]
        slots = self._slots(pool, host_indices, len(keys))
        if not keys:
            return 0
        return self._timed("backup", pool, keys,
                           lambda: self._write(pool, keys, [self._page(pool, slot) for slot in slots]))

    def _read(self, pool: _Pool, keys: Sequence[str], outs: Sequence[torch.Tensor]) -> int:
        return pool.store.get_keyed(list(keys), outs, self._salt(pool.name))

    def _write(self, pool: _Pool, keys: Sequence[str], blocks: Sequence[torch.Tensor]) -> int:
        """Store ``blocks`` under ``keys``; how many leading keys some tier holds afterwards."""
        salt = self._salt(pool.name)
        pool.store.put_keyed(list(zip(keys, blocks)), salt)
        return pool.store.lookup_keyed(list(keys), salt)

    def _timed(self, operation: str, pool: _Pool, keys: Sequence[str], run: Callable[[], int]) -> int:
        """``run()`` (pages moved), counted for SGLang's storage metrics."""
        started = time.perf_counter()
        moved = run()
        self._record(operation, moved, len(keys) - moved, moved * pool.page_bytes, time.perf_counter() - started)
        return moved

    @staticmethod
    def _page(pool: _Pool, slot: int) -> torch.Tensor:
        """The block to store for the page at ``slot``: a view of the pool's page, or its flat bytes."""
        if pool.kv is not None:
            return pool.kv.to_canonical(pool.host_pool.get_data_page(slot, flat=False))
        return _flat_block(pool, pool.host_pool.get_data_page(slot, flat=True), f"page {slot}")

    def leading(self, name: str, keys: Sequence[str]) -> int:
        """How many leading ``keys`` the store of pool ``name`` holds."""
        pool = self._pools[str(name)]
        return pool.store.lookup_keyed(list(keys), self._salt(pool.name))

    def read_flat(self, name: str, keys: Sequence[str], outs: Sequence[torch.Tensor]) -> int:
        """Read pages ``keys`` of pool ``name`` into flat pages ``outs`` (contiguous CPU tensors, SGLang's
        ``get_dummy_flat_data_page``); how many leading pages were read."""
        pool = self._pools[str(name)]
        return self._timed("prefetch", pool, keys,
                           lambda: self._read(pool, keys, [_flat_block(pool, out, "out") for out in outs]))

    def write_flat(self, name: str, keys: Sequence[str], values: Sequence[torch.Tensor]) -> int:
        """Store flat pages ``values`` of pool ``name`` under ``keys``; how many leading keys are held after."""
        pool = self._pools[str(name)]
        return self._timed("backup", pool, keys,
                           lambda: self._write(pool, keys, [_flat_block(pool, value, "value") for value in values]))

    def close(self) -> None:
        pools, self._pools = self._pools, {}
        self._buffers.clear()
        for pool in pools.values():
            pool.store.close()


def _flat_block(pool: _Pool, page: Any, what: str) -> torch.Tensor:
    """A flat page of ``pool`` as its store block ``[1, 1, 1, 1, bytes]`` (a zero marker byte for a pool of no
    bytes); a view when the page is contiguous on the CPU."""
    if not isinstance(page, torch.Tensor):
        raise ValueError(f"pool {pool.name!r} {what}: expected a torch.Tensor, got {type(page).__name__}")
    if not pool.page_bytes:
        return torch.zeros(1, 1, 1, 1, 1, dtype=torch.uint8)
    flat = page.contiguous().view(torch.uint8).reshape(-1)
    if flat.numel() != pool.page_bytes:
        raise ValueError(f"pool {pool.name!r} {what}: expected {pool.page_bytes} bytes, got {flat.numel()}")
    return flat.view(1, 1, 1, 1, pool.page_bytes)


def _kv_geometry(host_pool: Any, storage_config: Any) -> PageGeometry | None:
    """The in-place KV geometry of a pool of KV pages (MHA or MLA, a layout kvstore views), else None."""
    if not isinstance(getattr(host_pool, "kv_buffer", None), torch.Tensor):  # a Mamba pool holds a list of states
        return None
    try:
        return describe_pool(host_pool, storage_config)
    except (ValueError, AttributeError) as exc:  # KV kvstore does not view in place: its flat bytes
        log.info("kvstore HiCache backend: %s pages stored as flat bytes (%s)", type(host_pool).__name__, exc)
        return None


def pool_hit(kv_pages: int, transfers: Sequence[Any], present: Callable[[str, Sequence[str]], list[bool]],
             keys: Sequence[str]) -> PoolTransferResult:
    """``batch_exists_v2``'s answer: the prefix lengths (pages) every pool can restore, each pool's own boundary.

    ``ALL_PAGES``: the pool needs each page of the prefix; ``TRAILING_PAGES``:
    only the last ``len(transfer.keys)`` pages of it (a Mamba state, a
    sliding window); ``BLOCK_GROUPS``: whole groups of ``group_pages`` pages
    from the start, reported as the pool's own verdict without gating the KV
    hit (as SGLang defines it). A prefix length is restorable when every
    gating pool can restore it; the hit is the longest.
    """
    hits: dict[str, int] = {KV_POOL: kv_pages} if kv_pages else {}
    restorable = set(range(1, kv_pages + 1))
    for transfer in transfers:
        name = str(transfer.name)
        if name == KV_POOL or not restorable:
            continue
        held = present(name, keys[:kv_pages])
        policy = transfer.hit_policy
        if policy == PoolHitPolicy.TRAILING_PAGES:
            window = max(1, len(transfer.keys or ()))
            mine = {p for p in range(1, kv_pages + 1) if all(held[max(0, p - window):p])}
            boundary = max(mine, default=0)
        elif policy == PoolHitPolicy.BLOCK_GROUPS:
            group = max(1, int(transfer.group_pages or 1))
            whole = 0
            while whole + group <= kv_pages and all(held[whole:whole + group]):
                whole += group
            boundary, mine = whole, restorable
        else:  # ALL_PAGES, and any policy SGLang adds later: the strictest reading
            boundary = held.index(False) if False in held else kv_pages
            mine = set(range(1, boundary + 1))
        if boundary:
            hits[name] = boundary
        restorable &= mine
    ordered = sorted(restorable)
    return PoolTransferResult(ordered[-1] if ordered else 0, hits, ordered)
