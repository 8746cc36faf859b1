"""SGLang HiCache L3 backend backed by a KVStore: SGLang's pages get kvstore's tiers, codecs, server and Redis.

Load it through SGLang's ``dynamic`` storage backend::

    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "kvstore",
        "module_path": "kvstore.integrations.sglang", "class_name": "KVStoreHiCache",
        "interface_v1": 1, "disk_dir": "/nvme/kvstore"}'

``interface_v1`` makes SGLang's cache controller call the zero-copy page
methods (``batch_get_v1`` / ``batch_set_v1``); without it, it moves flat page
copies through ``batch_get`` / ``batch_set``. Both work.

As SGLang's L3, the store keeps no host tier unless ``host_bytes`` is given
(SGLang's own pinned host pool already holds the pages in RAM) and, when
neither that nor a tier below host RAM is given, keeps pages in
``$XDG_CACHE_HOME/kvstore/sglang-l3`` (``l3_defaults``).

Configuration, lowest precedence first: ``StoreConfig`` defaults, the file
``extra_config["kvstore_config"]`` or ``$KVSTORE_CONFIG`` names, ``KVSTORE_*``
variables, then the ``StoreConfig`` fields given in ``extra_config``
(``host_bytes``, ``disk_dir``, ``remote_url``, ``redis_url``, ``disk_codec``, ...).
SGLang runs each TP/PP/CP rank in its own process and an LMDB directory
belongs to one process, so with more than one rank each gets its own
``disk_dir/rank-tp{r}of{n}-pp{r}of{n}-cp{r}of{n}`` (``rank-dp{d}-tp...`` for
the DP ranks after the first under DP attention); ``files_dir``, the cache
server and Redis are shared by all ranks as they are.
``model_id`` defaults to a digest of the weights at SGLang's model path beside
its model name (``sglang_config.model_id_for``); ``extra_config["salt"]`` adds a
tenant salt. Keys SGLang or other backends read from ``extra_config`` are
ignored (``SGLANG_KEYS``); any other unknown key is a ``ValueError`` naming it.

Mapping (see ``KVStoreHiCache``):

* One SGLang page is one kvstore block: ``block_tokens = page_size``; the
  ``KVLayout`` (layers, KV heads, head dim, dtype, TP shard) is read from the
  host pool SGLang registers (``register_mem_pool_host``), so the store opens
  then, not in ``__init__``.
* Keys: SGLang's page hash strings go to the store's keyed API as they are;
  the store scopes them to the model, the layout fingerprint (shape, dtype,
  TP rank/size) and a salt naming the pipeline stage and attention-CP rank,
  so ranks and stages never read each other's blocks. MLA KV is the same on
  every TP rank, so its layout says ``tp 0/1`` and the ranks share blocks.
* A page in the host pool, in any of SGLang's layouts (``layer_first``
  ``[2, L, T, H, D]``, ``page_first`` ``[2, T, L, H, D]``,
  ``page_first_direct`` ``[2, 1, L, T, H, D]``, ``page_head``
  ``[2, 1, H, T, L, D]``; MLA without the K/V axis), is viewed as kvstore's
  canonical ``[L, P, T, H, D]`` by a permutation of strides, without a copy
  (``integrations/sglang_pages.py``). The zero-copy methods hand those views of the host pool straight to the
  store, which copies once, between the pool and its own tier (a host slot,
  an LMDB page, a socket buffer). The flat-page methods (``get``/``set`` and
  the ``batch_`` forms) view SGLang's flat page the same way; the flat page
  itself is SGLang's copy.

Nothing raises into SGLang once the backend is built: a miss, a damaged
block, a tier or server that is down, bad input, a closed store: ``get``
returns None, ``set`` False, ``exists`` False, ``batch_exists`` 0 (or the hits
before the failure), ``batch_*_v1`` a False for that page, and the event is
logged (and counted by the store's ``stats()``).

Hybrid models (Mamba, sliding window, DSA, draft KV): the v2 methods store
each host pool beside the KV pool in a store of its own, page bytes exact
(``integrations/sglang_pools.py``); ``batch_exists_v2`` answers under each
pool's hit policy as SGLang's own ``HiCacheFile`` does, and a v2 call on a
pool that failed to register is a miss for that pool.

Storage metrics (``--enable-storage-metrics``): ``get_stats()`` hands SGLang
the pages and GB/s of each prefetch and backup call
(``integrations/sglang_metrics.py``). A byte-stored fp8/fp4 cache (SGLang's
host pool holds it as ``uint8`` whatever the format) is told apart by
``extra_config["kv_cache_dtype"]``, which goes into the keys.

A KV pool whose pages kvstore cannot view in place (rows without heads, as
MiniMax M3's NVFP4 pool; no bytes at all, as DeepSeek V4's logical anchor)
is stored as its flat pages, or as presence alone (``flat_anchor``).

Not supported (a ``ValueError`` at registration): a KV pool with neither
viewable nor flat pages (asymmetric K/V head dims: SGLang gives no flat
page of it either), split-heads heterogeneous TP.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from kvstore import KVLayout, KVStore

try:
    from sglang.srt.mem_cache.hicache_storage import (HiCacheStorage, HiCacheStorageConfig,
                                                      HiCacheStorageExtraInfo, PoolTransfer, PoolTransferResult)
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "kvstore.integrations.sglang needs SGLang (tested with sglang==0.5.23), which kvstore's own environment "
        "does not install: build the opt-in environment with `scripts/engine-venvs.sh sglang` and use "
        f".venv-sglang/bin/python (import failed: {_exc})") from _exc

from kvstore.integrations.sglang_config import (SGLANG_KEYS, claim_l3, kv_format,  # noqa: E402
                                               served_kv_format, settled_kv_format, store_config_from,
                                               weight_version)
from kvstore.integrations.sglang_metrics import StorageCounters  # noqa: E402
from kvstore.integrations.sglang_pages import (RefusedPool, canonical_page_view, describe_pool,  # noqa: E402
                                               host_page_tokens, page_starts)
from kvstore.integrations.sglang_pools import KV_POOL, SidecarPools, pool_hit  # noqa: E402

__all__ = ["KVStoreHiCache", "SGLANG_KEYS", "canonical_page_view", "store_config_from"]

logger = logging.getLogger(__name__)

def _key_list(keys: Any) -> list:
    """SGLang's page keys as a list: anything that is no sequence of them (None) is no keys, so a miss,
    never an exception into SGLang."""
    try:
        return list(keys)
    except TypeError:
        return []


def _count_leading(n: int, total: int) -> list[bool]:
    return [True] * n + [False] * (total - n)


class KVStoreHiCache(HiCacheStorage):
    """SGLang ``HiCacheStorage`` over a ``KVStore`` (host RAM, NVMe, shared files, cache server, Redis).

    Built by SGLang's ``StorageBackendFactory`` as ``KVStoreHiCache(storage_config, kwargs)``;
    the store opens when SGLang registers its host pool (``register_mem_pool_host``), whose
    geometry gives the block layout. Before that every call is a miss. ``close`` closes the
    store (flushing write-behind queues); ``clear`` hides everything stored so far from this
    backend (see ``clear``). ``store`` is the ``KVStore`` (``store.stats()``: hits, tiers, ...).
    """

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Any = None,
                 environ: Mapping[str, str] | None = None):
        if not isinstance(storage_config, HiCacheStorageConfig):
            raise ValueError(f"storage_config: expected a HiCacheStorageConfig, got {type(storage_config).__name__}")
        self.storage_config = storage_config
        environ = os.environ if environ is None else environ
        self.config, self._user_salt = store_config_from(storage_config, environ)
        self.config, self._l3_claim = claim_l3(self.config, environ)  # the default L3 this engine holds
        self.kv_format = kv_format(storage_config.extra_config or {})
        self.store: KVStore | None = None
        self._closed = False  # close() ran: a later call is a miss, and says why
        self.layout: KVLayout | None = None
        self.host_layout: str | None = None
        self.mla = bool(storage_config.is_mla_model)
        self._page_shape: tuple[int, ...] | None = None
        self._to_canonical: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._generation = "0"  # a clear's nonce: another engine's clear must not name the same namespace
        self._weights = weight_version()
        self._salt_now = self._make_salt()
        self._salt_lock = threading.Lock()  # the salt's parts change together (a clear, a weight update)
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self.flat_anchor = False  # the KV pool's pages are stored as flat bytes in ``pools`` (see registration)
        self.counters = StorageCounters()  # get_stats(): SGLang's storage metrics
        # the v2 host pools beside the KV pool (Mamba states, sliding window, ...)
        self.pools = SidecarPools(self.config, storage_config, self._pool_salt, self.counters.record)
        # The built-in backends that take a host pool get it as the second argument.
        if kwargs is not None and not isinstance(kwargs, Mapping) and hasattr(kwargs, "get_data_page"):
            self.register_mem_pool_host(kwargs)

    # -- setup ------------------------------------------------------------------------

    @property
    def _salt(self) -> str:
        """The salt of the KV pool's keys now: it follows SGLang's weight version, read at every call (an
        RL engine's ``update_weights_from_tensor`` was served the old policy's pages, which SGLang's flush
        never asks the backend to drop)."""
        version = weight_version()
        if version != self._weights:
            with self._salt_lock:
                self._weights = version
                self._salt_now = self._make_salt()
        return self._salt_now

    def _make_salt(self) -> str:
        c = self.storage_config
        parts = [f"sglang-hicache/v1;gen={self._generation}", f"pp={c.pp_rank}/{c.pp_size}",
                 f"cp={c.attn_cp_rank}/{c.attn_cp_size}", f"dcp={c.dcp_rank}/{c.dcp_size}"]
        if self._weights is not None:
            parts.append(f"weights={self._weights}")
        if self._user_salt is not None:
            parts.append(f"salt={self._user_salt}")
        if self.kv_format is not None:
            parts.append(f"kv={self.kv_format}")
        return ";".join(parts)

    def _settle_kv_format(self) -> None:
        """Bind the format of a host pool that holds KV as bytes into the keys: SGLang's ``--kv-cache-dtype``,
        which ``extra_config`` must agree with (``settled_kv_format``)."""
        settled = settled_kv_format(self.kv_format, served_kv_format())
        if settled != self.kv_format:
            self.kv_format = settled
            with self._salt_lock:
                self._salt_now = self._make_salt()

    def _register_flat_anchor(self, pool: Any, why: BaseException) -> None:
        try:
            self.pools.register(pool, KV_POOL)
        except Exception as exc:
            raise ValueError(f"host pool {type(pool).__name__}: expected pages kvstore can view ({why}) or flat "
                             f"pages ({type(exc).__name__}: {exc})") from exc
        with self._lock:
            old, self.store = self.store, None
            self.layout, self.flat_anchor = None, True
        if old is not None:
            old.close()
        logger.info("kvstore HiCache backend: %s pages stored as flat bytes (%s)", type(pool).__name__, why)

    def _pool_salt(self, name: str) -> str:
        """The salt of a v2 pool's keys: the backend's, the pool, and the TP rank where ranks hold different
        bytes: always for Mamba states (sharded by heads), for other pools unless SGLang says the model's
        state is the same on every rank (``is_mla_model``), as its own file backend keys them."""
        c = self.storage_config
        replicated = c.is_mla_model and name != "mamba"
        return f"{self._salt};pool={name}" + ("" if replicated else f";tp={c.tp_rank}/{c.tp_size}")

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Open the store for the page geometry of SGLang's host pool (reopen it if the geometry changed).

        A KV pool whose pages kvstore cannot view in place (no heads, as MiniMax's NVFP4 rows; no bytes,
        as DeepSeek V4's logical anchor) is stored as its flat pages, as the v2 pools are
        (``flat_anchor``); a pool with neither is refused with a ``ValueError``.
        """
        super().register_mem_pool_host(mem_pool_host)
        try:
            layout, host_layout, to_canonical, page_shape = describe_pool(mem_pool_host, self.storage_config,
                                                                          self.mla)
        except RefusedPool:
            raise
        except (ValueError, AttributeError) as exc:
            self._register_flat_anchor(mem_pool_host, exc)
            return
        if layout.dtype == torch.uint8:
            self._settle_kv_format()
        self.flat_anchor = False
        with self._lock:
            old = self.store
            if old is not None and self.layout == layout:
                self.host_layout, self._to_canonical, self._page_shape = host_layout, to_canonical, page_shape
                return
            self.store = None
            if old is not None:
                old.close()
            self.layout, self.host_layout = layout, host_layout
            self._to_canonical, self._page_shape = to_canonical, page_shape
            self.store = KVStore(layout, self.config)
        logger.info("kvstore HiCache backend: %s pages of %d tokens (%s host layout, %d bytes each), tiers %s",
                    "MLA" if self.mla else "MHA", layout.block_tokens, host_layout, layout.block_bytes,
                    [t.name for t in self.store.tiers])

    # -- helpers ----------------------------------------------------------------------

    def _fail(self, what: str, exc: BaseException | None = None) -> None:
        """Log a failure that becomes a miss: the first of each kind as a warning, later ones at debug level."""
        message = f"kvstore HiCache backend: {what}" + (f": {type(exc).__name__}: {exc}" if exc else "")
        key = what if exc is None else f"{what}:{type(exc).__name__}"
        if key in self._warned:
            logger.debug(message)
        else:
            self._warned.add(key)
            logger.warning(message)

    def _record(self, operation: str, pages: int, asked: int, started: float) -> None:
        """Count one storage call of ``asked`` pages of which ``pages`` moved (for ``get_stats``)."""
        self.counters.record(operation, pages, asked - pages, pages * self.layout.block_bytes,
                             time.perf_counter() - started)

    def _open_store(self) -> Any:
        """The KV pool's store (the pools' for a ``flat_anchor``), or None before registration (a miss)."""
        store = self.store if not self.flat_anchor else self.pools
        if store is None:
            self._fail("the backend is closed: treating the call as a miss" if self._closed else
                       "no host pool registered yet (register_mem_pool_host): treating the call as a miss")
        return store

    def _new_flat_page(self) -> torch.Tensor:
        """An empty flat page to read into when SGLang gives none."""
        if self.flat_anchor:
            return self.mem_pool_host.get_dummy_flat_data_page()
        return torch.empty(self.layout.block_bytes // self.layout.element_bytes, dtype=self.layout.dtype)

    def _flat_view(self, flat: torch.Tensor) -> torch.Tensor:
        """A flat page (SGLang's ``get_data_page(i)`` / ``get_dummy_flat_data_page()``) as ``[L, P, T, H, D]``."""
        if not isinstance(flat, torch.Tensor):
            raise ValueError(f"page: expected a torch.Tensor, got {type(flat).__name__}")
        expected = 1
        for n in self._page_shape:
            expected *= n
        if flat.numel() != expected:
            raise ValueError(f"page: expected {expected} elements (one page {list(self._page_shape)}), "
                             f"got {flat.numel()}")
        return self._to_canonical(flat.reshape(self._page_shape))

    def _pool_views(self, host_indices: torch.Tensor, count: int) -> list[torch.Tensor]:
        """Canonical views of the host pool's pages starting at ``host_indices[i * page_size]``."""
        pool = self.mem_pool_host
        starts = page_starts(host_indices, count, host_page_tokens(pool), getattr(pool, "size", None),
                             "host_indices")
        return [self._to_canonical(pool.get_data_page(i, flat=False)) for i in starts]

    # -- flat-page interface (SGLang's generic path) ----------------------------------

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        """Page ``key`` into the flat tensor ``target_location`` (a new one if None); None on a miss."""
        got = self.batch_get([key], [target_location], target_sizes)
        return got[0] if got else None

    def batch_get(self, keys: list[str], target_locations: Any = None,
                  target_sizes: Any = None) -> list[torch.Tensor | None]:
        """Pages ``keys`` into flat tensors; the leading pages found, then None (a miss ends the run)."""
        keys = _key_list(keys)
        misses: list[torch.Tensor | None] = [None] * len(keys)
        store = self._open_store()
        if store is None or not keys:
            return misses
        try:
            targets = list(target_locations) if target_locations is not None else [None] * len(keys)
            if len(targets) != len(keys):
                raise ValueError(f"target_locations: expected {len(keys)}, got {len(targets)}")
            flats, bufs, bounces = [], [], []
            for t in targets:
                flat = t if t is not None else self._new_flat_page()
                # A flat page SGLang allocated is contiguous; another is read through a bounce buffer.
                direct = flat.is_contiguous() and flat.device.type == "cpu"
                buf = flat if direct else torch.empty(flat.shape, dtype=flat.dtype)
                flats.append(flat)
                bufs.append(buf)
                bounces.append(None if direct else buf)
            if self.flat_anchor:
                n = self.pools.read_flat(KV_POOL, keys, bufs)
            else:
                n = self._get(store, keys, [self._flat_view(buf) for buf in bufs])
            for flat, buf in zip(flats[:n], bounces[:n]):
                if buf is not None:
                    flat.copy_(buf.view(flat.shape))
            return flats[:n] + misses[n:]
        except Exception as exc:  # never into SGLang: a miss
            self._fail("batch_get failed", exc)
            return misses

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        """Store the flat page ``value`` under ``key``; False if it could not be stored."""
        return self.batch_set([key], [value], target_location, target_sizes)

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        """Store flat pages; True when every page is held afterwards (already-held pages are deduplicated)."""
        keys = _key_list(keys)
        store = self._open_store()
        if store is None:
            return False
        if not keys:
            return True
        try:
            values = list(values) if values is not None else []
            if len(values) != len(keys):
                raise ValueError(f"values: expected {len(keys)} pages, got {len(values)}")
            if self.flat_anchor:
                return self.pools.write_flat(KV_POOL, keys, values) == len(keys)
            return self._put(store, keys, [self._flat_view(v) for v in values]) == len(keys)
        except Exception as exc:
            self._fail("batch_set failed", exc)
            return False

    def _put(self, store: KVStore, keys: Sequence[str], blocks: Sequence[torch.Tensor],
             extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """Store blocks; how many leading ``keys`` some tier holds afterwards (a backup, counted). The pages
        before them (``prefix_keys``, where SGLang passes them) are evicted for none of them."""
        started = time.perf_counter()
        prefix = extra_info.prefix_keys if extra_info is not None and extra_info.prefix_keys else ()
        store.put_keyed(list(zip(keys, blocks)), self._salt, after=list(prefix))
        held = store.lookup_keyed(list(keys), self._salt)
        self._record("backup", held, len(keys), started)
        return held

    def _get(self, store: KVStore, keys: Sequence[str], outs: Sequence[torch.Tensor]) -> int:
        """Read blocks into ``outs``; how many leading ``keys`` were read (a prefetch, counted)."""
        started = time.perf_counter()
        n = store.get_keyed(list(keys), list(outs), self._salt)
        self._record("prefetch", n, len(keys), started)
        return n

    # -- existence --------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """How many leading ``keys`` the store holds (any tier; one round trip to a server for the rest)."""
        store = self._open_store()
        if store is None or not keys:
            return 0
        try:
            if self.flat_anchor:
                return self.pools.leading(KV_POOL, list(keys))
            return store.lookup_keyed(list(keys), self._salt)
        except Exception as exc:
            self._fail("batch_exists failed", exc)
            return 0

    # -- zero-copy page interface (extra_config "interface_v1": 1) --------------------

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        """Read pages straight into the host pool at ``host_indices`` (one page per ``page_size`` indices)."""
        keys = _key_list(keys)
        store = self._open_store()
        if store is None:
            return [False] * len(keys)
        try:
            if self.flat_anchor:
                return _count_leading(self.pools.get(KV_POOL, keys, host_indices), len(keys))
            n = self._get(store, keys, self._pool_views(host_indices, len(keys))) if keys else 0
            return _count_leading(n, len(keys))
        except Exception as exc:
            self._fail("batch_get_v1 failed", exc)
            return [False] * len(keys)

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        """Store the host pool's pages at ``host_indices`` under ``keys``, straight from the pool."""
        keys = _key_list(keys)
        store = self._open_store()
        if store is None:
            return [False] * len(keys)
        if not keys:
            return []
        try:
            if self.flat_anchor:
                return _count_leading(self.pools.set(KV_POOL, keys, host_indices), len(keys))
            return _count_leading(self._put(store, keys, self._pool_views(host_indices, len(keys)), extra_info),
                                  len(keys))
        except Exception as exc:
            self._fail("batch_set_v1 failed", exc)
            return [False] * len(keys)

    # -- v2: the host pools of hybrid models (Mamba, sliding window, DSA, draft) -----

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        """Open a store for a host pool beside the KV pool (``integrations/sglang_pools.py``); the KV pool
        itself is the one ``register_mem_pool_host`` opened. A pool whose pages cannot be stored is logged
        and served as misses, never an error at attach."""
        super().register_mem_host_pool_v2(host_pool, host_pool_name)
        name = str(host_pool_name)
        if name == KV_POOL:
            if getattr(self, "mem_pool_host", None) is None:
                self.register_mem_pool_host(host_pool)
            return
        try:
            self.pools.register(host_pool, name)
        except Exception as exc:
            self._fail(f"host pool {name!r} cannot be stored (its pages are misses)", exc)

    def batch_exists_v2(self, keys: list[str], pool_transfers: list[PoolTransfer] | None = None,
                        extra_info: HiCacheStorageExtraInfo | None = None) -> PoolTransferResult:
        """The longest prefix of ``keys`` the KV store and every pool can restore, under each pool's policy."""
        keys = _key_list(keys)
        kv_pages = self.batch_exists(keys, extra_info)
        try:
            return pool_hit(kv_pages, list(pool_transfers or ()), self.pools.present, keys)
        except Exception as exc:
            self._fail("batch_exists_v2 failed", exc)
            return PoolTransferResult(0, {}, [])

    def batch_get_v2(self, transfers: list[PoolTransfer],
                     extra_info: HiCacheStorageExtraInfo | None = None) -> dict[str, list[bool]]:
        """Read each transfer's pages into its host pool; per pool, the leading pages read."""
        return self._each_pool(transfers, "get", self.batch_get_v1, self.pools.get, extra_info)

    def batch_set_v2(self, transfers: list[PoolTransfer],
                     extra_info: HiCacheStorageExtraInfo | None = None) -> dict[str, list[bool]]:
        """Store each transfer's pages from its host pool; per pool, the leading pages held afterwards."""
        return self._each_pool(transfers, "set", self.batch_set_v1, self.pools.set, extra_info)

    def _each_pool(self, transfers: list[PoolTransfer], op: str, kv_op: Callable[..., list[bool]],
                   pool_op: Callable[[str, list[str], Any], int],
                   extra_info: HiCacheStorageExtraInfo | None) -> dict[str, list[bool]]:
        """``kv_op`` for the KV pool's transfer, ``pool_op`` (pages moved) for every other pool's."""
        results: dict[str, list[bool]] = {}
        for transfer in transfers if isinstance(transfers, (list, tuple)) else ():
            name, keys = getattr(transfer, "name", None), _key_list(getattr(transfer, "keys", None) or ())
            if name is None:  # no PoolTransfer: nothing to move, and nothing to answer for
                logger.warning("batch_%s_v2: expected PoolTransfer items, got %s", op, type(transfer).__name__)
                continue
            name = str(name)
            if name == KV_POOL:
                results[name] = kv_op(keys, transfer.host_indices, extra_info)
                continue
            try:
                if name not in self.pools:
                    raise ValueError(f"pool {name!r} was never registered (register_mem_host_pool_v2)")
                results[name] = _count_leading(pool_op(name, keys, transfer.host_indices), len(keys))
            except Exception as exc:  # never into SGLang: this pool's pages are misses
                self._fail(f"batch_{op}_v2 of pool {name!r} failed", exc)
                results[name] = [False] * len(keys)
        return results

    # -- lifecycle --------------------------------------------------------------------

    def clear(self) -> None:
        """Forget every page stored so far, as far as this backend can see.

        kvstore has no public delete: the salt moves to a new generation (a
        random nonce: another engine's clear must not land in this one's), so
        older blocks are never returned to this backend again and age out of
        the tiers by LRU. A new backend (a restart) starts from generation 0
        and sees persistent blocks stored before the clear.
        """
        with self._salt_lock:
            self._generation = secrets.token_hex(8)
            self._salt_now = self._make_salt()

    def close(self) -> None:
        """Close the store: flush write-behind queues to the lower tiers, close the tiers. Idempotent."""
        with self._lock:
            store, self.store = self.store, None
            self._closed = True
        try:
            self.pools.close()
            if store is not None:
                store.close()
        except Exception as exc:
            self._fail("close failed", exc)
        finally:
            if self._l3_claim is not None:  # the default L3 is free for the next engine
                self._l3_claim.close()

    def get_stats(self) -> Any:
        """SGLang's ``StorageMetrics`` since the last call: pages and GB/s of each prefetch and backup call
        (``integrations/sglang_metrics.py``); ``counters.totals()`` and ``store.stats()`` say more."""
        return self.counters.take()
