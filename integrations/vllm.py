"""vLLM connector: serve prompt prefixes from a ``KVStore`` through vLLM's ``KVConnectorBase_V1`` (vLLM 0.33).

Load it with::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "kvstore.integrations.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"block_tokens": 256, "host_bytes": "8GiB", "files_dir": "/shared/kv"}}'

Configuration: ``StoreConfig.load()`` (``$KVSTORE_CONFIG`` and ``KVSTORE_*``
variables) overridden by the ``StoreConfig`` keys of
``kv_connector_extra_config``. Connector keys there: ``block_tokens``
(tokens per stored block; a multiple of vLLM's ``--block-size``; default the
multiple nearest above 256), ``async_load`` (default false), ``salt``
(an extra tenant salt), ``scheduler_host_bytes`` (see below) and ``config``
(a settings file instead of ``$KVSTORE_CONFIG``). Any other key is a
``ValueError`` naming it. ``model_id`` defaults to vLLM's model name.
``kv_load_failure_policy: "recompute"`` makes vLLM recompute blocks this
connector reports as failed (vLLM's default, ``fail``, fails the request).

Design:

* Keys are kvstore's own prefix-chained keys of the request's prompt tokens
  in blocks of ``block_tokens``, salted with the request's ``cache_salt``,
  its LoRA adapter name and the ``salt`` setting; never vLLM's per-process
  block hashes, so vLLM instances with different ``PYTHONHASHSEED`` share one
  cache through a files, cache-server or Redis tier.
* The layout comes from ``vllm_config``: layers of this pipeline stage, KV
  heads per TP rank, head size, the KV-cache dtype (``cache_dtype``, or the
  model dtype for ``auto``), ``tp_rank``/``tp_size``. MLA models are refused.
* One ``KVStore`` per process and (config, layout), reference counted
  (``_STORES``): with the uniproc executor (TP=1) the scheduler and the
  worker live in one process and share it, so the scheduler's lookups and
  prefetches see the worker's host RAM and LMDB tiers. The scheduler opens
  its store lazily, at its first lookup, so a worker created in the same
  process before or after the scheduler is found. A scheduler in a process
  with no worker store (multiproc executor, TP>1) opens a lookup view of the
  same config instead: no LMDB directory (one process may open it), no
  device tier, ``scheduler_host_bytes`` (default 64 MiB) of host RAM; it sees
  what the shared tiers (files, cache server, Redis) hold. Its layout is
  rank 0's; another rank missing a block is reported as a load error.
* Scheduler side: ``get_num_new_matched_tokens`` asks ``store.plan`` (lookup
  plus the load-vs-recompute cost model) for the prompt, rounds down to
  vLLM's block size and to at most ``prompt - 1`` tokens (vLLM must compute
  one). With ``async_load`` it starts ``store.prefetch`` and answers
  ``(None, True)`` until the prefetch is done, then ``(n, True)``; the worker
  loads in a background thread and reports the request in ``get_finished``.
  ``update_state_after_alloc`` records the block ids the tokens go to;
  ``build_connector_meta`` emits the step's loads (``LoadSpec``) and, for
  each request whose prompt prefill completes this step, one save
  (``SaveSpec``, from the first kvstore block not stored yet).
* Worker side: ``register_kv_caches`` wraps vLLM's per-layer caches in a
  paged adapter: the standardized 0.33 layout, per layer a view ``[blocks,
  H, page, Dk + Dv]`` in any physical order (``kvstore/integrations/vllm_paged.py``,
  here), or the pre-0.33 flash-attention ``[2, blocks, page, H, D]``
  (``VLLMPagedAdapter`` from ``kvstore.integrations.paged``).
  ``start_load_kv`` starts a layer-wise ``store.load`` per sync load;
  ``wait_for_layer_load(layer)`` scatters that layer's tokens
  ``[start, end)`` into the request's blocks while the loader reads the next
  layers. ``save_kv_layer`` gathers the request's tokens of that layer into a
  ``LayerSaver``; ``wait_for_save`` completes any layer vLLM did not hand
  over (and any unfinished load), so every save is in the store's fastest
  tier when the step ends. ``request_finished`` therefore returns
  ``(False, None)``: vLLM may free the blocks at once.
* Load errors: when a load delivers fewer tokens than the scheduler promised
  (a block evicted or damaged in between, a tier down), the vLLM blocks from
  the first token missing on are returned by ``get_block_ids_with_load_errors``
  (for async loads no later than the step that reports the request in
  ``get_finished``), and vLLM recomputes them.
* Metrics: ``get_kv_connector_stats`` (both roles) returns
  ``KVStoreConnectorStats``: lookups, hit tokens, loaded/saved tokens and
  seconds, load-error blocks since the last call.
  ``get_external_cache_hit_sources`` maps the plan's tiers to vLLM's
  ``CacheHitSource`` (device, host, disk for LMDB and files, else unspecified).

Limits: only the prompt is saved (not generated tokens); one KV-cache group
(full attention); the page size of the registered caches must be vLLM's
block size (no kernel-block splitting); loads read the kvstore blocks from
token 0 even when vLLM's own prefix cache already holds their beginning.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                                   KVConnectorRole)
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
except ImportError as exc:  # pragma: no cover - exercised without vllm
    raise ImportError(
        "kvstore.integrations.vllm needs vLLM 0.33 (the KVConnectorBase_V1 API), which is not importable here "
        f"({exc}); build its environment with `scripts/engine-venvs.sh vllm` and run in .venv-vllm") from exc

from kvstore import KVLayout, KVStore, StoreConfig
from kvstore.config import ENV_PREFIX
from kvstore.integrations.paged_store import block_sink, save_paged
from kvstore.integrations.vllm_paged import paged_adapter
from kvstore.layout import resolve_dtype
from kvstore.prefetch import PrefetchHandle

__all__ = ["KVStoreConnector", "KVStoreConnectorMetadata", "KVStoreConnectorStats", "LoadSpec", "SaveSpec",
           "connector_settings", "layout_from_vllm", "request_salt"]

DEFAULT_BLOCK_TOKENS = 256
CONNECTOR_KEYS = frozenset({"block_tokens", "async_load", "salt", "scheduler_host_bytes", "config"})
_CACHE_DTYPES = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
_HIT_SOURCES = {"device": CacheHitSource.DEVICE, "host": CacheHitSource.HOST, "lmdb": CacheHitSource.DISK,
                "files": CacheHitSource.DISK}


# -- settings and layout ---------------------------------------------------------------


@dataclass(frozen=True)
class ConnectorSettings:
    """What ``kv_connector_extra_config`` and the environment say."""

    store: StoreConfig
    block_tokens: int
    async_load: bool
    salt: str | None
    scheduler_host_bytes: int | str


def connector_settings(vllm_config: Any, environ: dict[str, str] | None = None) -> ConnectorSettings:
    """The store config (``StoreConfig.load`` + extra_config overrides) and the connector's own settings."""
    import os
    environ = dict(os.environ if environ is None else environ)
    extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
    own = {k: extra.pop(k) for k in list(extra) if k in CONNECTOR_KEYS}
    base = StoreConfig.load(own.get("config"), environ)
    explicit_model = "model_id" in extra or f"{ENV_PREFIX}MODEL_ID" in environ or base.model_id != "default"
    values = dataclasses.asdict(base)
    values.update(extra)
    if not explicit_model:
        values["model_id"] = str(vllm_config.model_config.model)
    store = StoreConfig.from_dict(values, source="kv_connector_extra_config")
    page = vllm_config.cache_config.block_size
    block_tokens = own.get("block_tokens")
    if block_tokens is None:
        block_tokens = page * max(1, -(-DEFAULT_BLOCK_TOKENS // page))
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
        raise ValueError(f"kv_connector_extra_config.block_tokens: expected a positive int, got {block_tokens!r}")
    if block_tokens % page:
        raise ValueError(f"kv_connector_extra_config.block_tokens: expected a multiple of vLLM's block size "
                         f"{page}, got {block_tokens}")
    async_load = own.get("async_load", False)
    if not isinstance(async_load, bool):
        raise ValueError(f"kv_connector_extra_config.async_load: expected true or false, got {async_load!r}")
    salt = own.get("salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ValueError(f"kv_connector_extra_config.salt: expected a non-empty string, got {salt!r}")
    return ConnectorSettings(store, block_tokens, async_load, salt, own.get("scheduler_host_bytes", "64MiB"))


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank, model_parallel_is_initialized
        return get_tensor_model_parallel_rank() if model_parallel_is_initialized() else 0
    except Exception:
        return 0


def layout_from_vllm(vllm_config: Any, block_tokens: int, tp_rank: int = 0) -> KVLayout:
    """The ``KVLayout`` of one worker's KV cache: its layers, KV heads per rank, head size and cache dtype."""
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    if model.use_mla:
        raise ValueError("model: expected a model with K and V per head (MLA latent caches are not supported), "
                         f"got MLA model {model.model!r}")
    cache_dtype = vllm_config.cache_config.cache_dtype
    dtype = model.dtype if cache_dtype in (None, "auto") else _CACHE_DTYPES.get(cache_dtype, cache_dtype)
    return KVLayout(num_layers=model.get_num_layers(parallel), num_kv_heads=model.get_num_kv_heads(parallel),
                    head_dim=model.get_head_size(), dtype=resolve_dtype(dtype), block_tokens=block_tokens,
                    tp_rank=tp_rank, tp_size=parallel.tensor_parallel_size)


def request_salt(request: Any, extra: str | None = None) -> str | None:
    """The kvstore salt of a vLLM request: its ``cache_salt``, LoRA adapter name and the configured salt."""
    lora = getattr(request, "lora_request", None)
    parts = {"cache_salt": getattr(request, "cache_salt", None),
             "lora": getattr(lora, "lora_name", None) if lora is not None else None, "salt": extra}
    if all(v is None for v in parts.values()):
        return None
    return ";".join(f"{k}={v!r}" for k, v in parts.items())


# -- one store per process --------------------------------------------------------------

_STORES: dict[tuple[StoreConfig, KVLayout], list] = {}  # key -> [store, references]
_STORES_LOCK = threading.Lock()


def _acquire(config: StoreConfig, layout: KVLayout, view: StoreConfig | None = None) -> KVStore:
    """The process's store for (config, layout), opened if needed; ``view``: open that config instead if absent."""
    with _STORES_LOCK:
        entry = _STORES.get((config, layout))
        if entry is None and view is not None:
            config = view
            entry = _STORES.get((config, layout))
        if entry is None:
            entry = _STORES[(config, layout)] = [KVStore(layout, config), 0]
        entry[1] += 1
        return entry[0]


def _release(store: KVStore) -> None:
    with _STORES_LOCK:
        for key, entry in list(_STORES.items()):
            if entry[0] is store:
                entry[1] -= 1
                if entry[1] == 0:
                    del _STORES[key]
                    store.close()
                return


# -- metadata -----------------------------------------------------------------------------


@dataclass
class LoadSpec:
    """Load tokens ``[start, end)`` of ``tokens`` (the prompt up to a kvstore block boundary) into ``block_ids``."""

    req_id: str
    tokens: list[int]
    salt: str | None
    block_ids: list[int]
    start: int
    end: int
    is_async: bool = False


@dataclass
class SaveSpec:
    """Save the prompt ``tokens`` from ``start`` (a kvstore block boundary) on, read from ``block_ids``."""

    req_id: str
    tokens: list[int]
    salt: str | None
    block_ids: list[int]
    start: int


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


STAT_KEYS = ("lookups", "lookup_tokens", "hit_tokens", "loads", "loaded_tokens", "load_seconds",
             "load_error_blocks", "saves", "saved_tokens", "save_seconds", "save_errors")


@dataclass
class KVStoreConnectorStats(KVConnectorStats):
    """Counters since the last ``get_kv_connector_stats`` (sums aggregate across workers)."""

    def __post_init__(self) -> None:
        for key in STAT_KEYS:
            self.data.setdefault(key, 0)

    def add(self, key: str, value: float = 1) -> None:
        self.data[key] = self.data.get(key, 0) + value

    def reset(self) -> None:
        self.data = {key: 0 for key in STAT_KEYS}

    def aggregate(self, other: KVConnectorStats) -> "KVStoreConnectorStats":
        for key, value in other.data.items():
            self.add(key, value)
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


# -- the connector --------------------------------------------------------------------------


@dataclass
class _Request:
    """What the scheduler side tracks of a running request."""

    tokens: list[int]
    salt: str | None
    block_ids: list[int] = field(default_factory=list)
    saved: bool = False


@dataclass
class _Match:
    start: int
    end: int
    sources: dict[str, int]


class _ActiveLoad:
    """A sync layer-wise load in flight on the worker."""

    def __init__(self, spec: LoadSpec, loader: Any, sunk: bool):
        self.spec = spec
        self.loader = loader
        self.sunk = sunk  # the loader scatters into vLLM's pages itself (CPU caches)
        self.next_layer = 0
        self.where: Any = None
        self.n = 0
        self.started = time.perf_counter()


class KVStoreConnector(KVConnectorBase_V1):
    """kvstore as vLLM's KV connector (scheduler and worker roles); see the module docstring."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.settings = connector_settings(vllm_config)
        self.page_size = vllm_config.cache_config.block_size
        self.block_tokens = self.settings.block_tokens
        self.async_load = self.settings.async_load
        self.layout = layout_from_vllm(vllm_config, self.block_tokens,
                                       _tp_rank() if role == KVConnectorRole.WORKER else 0)
        self._stats = KVStoreConnectorStats()
        self._stats_lock = threading.Lock()
        self._store: KVStore | None = None
        self._store_lock = threading.Lock()
        self._closed = False
        # scheduler side
        self._requests: dict[str, _Request] = {}
        self._matches: dict[str, _Match] = {}
        self._prefetches: dict[str, PrefetchHandle] = {}
        self._pending_loads: dict[str, LoadSpec] = {}
        # worker side
        self._adapter: Any = None
        self._layer_index: dict[str, int] = {}
        self._active: list[_ActiveLoad] = []
        self._savers: dict[str, tuple[Any, Any, set[int]]] = {}  # req_id -> (LayerSaver, location, layers given)
        self._async_pool: ThreadPoolExecutor | None = None
        self._async_loads: dict[str, Future] = {}
        self._errors: set[int] = set()
        self._errors_lock = threading.Lock()
        if role == KVConnectorRole.WORKER:
            self._store = _acquire(self.settings.store, self.layout)

    # -- shared ---------------------------------------------------------------------------

    @property
    def store(self) -> KVStore:
        """This role's store (the scheduler's is opened at first use, see the module docstring)."""
        with self._store_lock:
            if self._store is None:
                config = self.settings.store
                view = config.replace(disk_dir=None, device_bytes=0, host_bytes=self.settings.scheduler_host_bytes)
                self._store = _acquire(config, self.layout, view=view)
            return self._store

    def _count(self, key: str, value: float = 1) -> None:
        with self._stats_lock:
            self._stats.add(key, value)

    def get_kv_connector_stats(self) -> KVStoreConnectorStats | None:
        with self._stats_lock:
            if self._stats.is_empty():
                return None
            stats, self._stats = self._stats, KVStoreConnectorStats()
            return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVStoreConnectorStats:
        return KVStoreConnectorStats(data=dict(data or {}))

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handle in self._prefetches.values():
            handle.close()
        self._prefetches.clear()
        if self._async_pool is not None:
            self._async_pool.shutdown(wait=True)
        for load in self._active:
            load.loader.close()
        self._active.clear()
        if self._store is not None:
            _release(self._store)
            self._store = None

    # -- scheduler side -------------------------------------------------------------------

    def _salt(self, request: Any) -> str | None:
        return request_salt(request, self.settings.salt)

    def _load_tokens(self, prompt: Sequence[int], end: int) -> list[int]:
        """The prompt up to the kvstore block boundary at or after ``end`` (or all of it)."""
        cut = min(len(prompt), -(-end // self.block_tokens) * self.block_tokens)
        return list(prompt[:cut])

    def on_new_request(self, request: Any) -> None:
        """Remember the prompt and salt (``cache_salt`` is not in the scheduler output's request data)."""
        self._requests[request.request_id] = _Request(list(request.prompt_token_ids or []), self._salt(request))

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self._kv_transfer_config.is_kv_consumer:
            return 0, False
        prompt = request.prompt_token_ids or []
        salt = self._salt(request)
        plan = self.store.plan(prompt, salt)
        hit = min(plan.load_tokens, len(prompt) - 1) // self.page_size * self.page_size
        self._count("lookups")
        self._count("lookup_tokens", len(prompt))
        if hit <= num_computed_tokens:
            self._matches.pop(request.request_id, None)
            return 0, False
        self._count("hit_tokens", hit - num_computed_tokens)
        self._matches[request.request_id] = _Match(num_computed_tokens, hit, dict(plan.sources))
        if not self.async_load:
            return hit - num_computed_tokens, False
        handle = self._prefetches.get(request.request_id)
        if handle is None:
            handle = self._prefetches[request.request_id] = self.store.prefetch(self._load_tokens(prompt, hit), salt)
        if not handle.done():
            return None, True
        return hit - num_computed_tokens, True

    def get_external_cache_hit_sources(self, request: Any, num_external_tokens: int) -> dict:
        match = self._matches.get(request.request_id)
        if not num_external_tokens:
            return {}
        if match is None or not match.sources:
            return {CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens}
        out: dict = {}
        total = sum(match.sources.values())
        for tier, tokens in match.sources.items():
            source = _HIT_SOURCES.get(tier, CacheHitSource.EXTERNAL_UNSPECIFIED)
            out[source] = out.get(source, 0) + num_external_tokens * tokens // total
        biggest = max(out, key=out.get)
        out[biggest] += num_external_tokens - sum(out.values())
        return {k: v for k, v in out.items() if v}

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            return
        match = self._matches.get(request.request_id)
        start = match.start if match is not None else request.num_computed_tokens
        end = start + num_external_tokens
        prompt = request.prompt_token_ids or []
        self._pending_loads[request.request_id] = LoadSpec(
            request.request_id, self._load_tokens(prompt, end), self._salt(request),
            list(blocks.get_block_ids()[0]), start, end, is_async=self.async_load)

    def _save_spec(self, req_id: str, state: _Request, num_computed: int, num_scheduled: int) -> SaveSpec | None:
        if (state.saved or not self._kv_transfer_config.is_kv_producer
                or num_computed + num_scheduled < len(state.tokens) or not state.tokens):
            return None
        state.saved = True
        stored = self.store.lookup(state.tokens, state.salt)
        if stored >= len(state.tokens):
            return None
        pages = -(-len(state.tokens) // self.page_size)
        return SaveSpec(req_id, state.tokens, state.salt, state.block_ids[:pages],
                        stored // self.block_tokens * self.block_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVStoreConnectorMetadata:
        meta = KVStoreConnectorMetadata(loads=list(self._pending_loads.values()))
        self._pending_loads.clear()
        for new in scheduler_output.scheduled_new_reqs:
            request = self._requests.get(new.req_id)
            if request is None:  # not seen by on_new_request: its cache_salt is unknown, so save nothing
                request = self._requests[new.req_id] = _Request([], None, saved=True)
            request.block_ids = list(new.block_ids[0])
            spec = self._save_spec(new.req_id, request, new.num_computed_tokens,
                                   scheduler_output.num_scheduled_tokens.get(new.req_id, 0))
            if spec is not None:
                meta.saves.append(spec)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            request = self._requests.get(req_id)
            if request is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                request.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                request.block_ids.extend(new_ids[0])
            spec = self._save_spec(req_id, request, cached.num_computed_tokens[i],
                                   scheduler_output.num_scheduled_tokens.get(req_id, 0))
            if spec is not None:
                meta.saves.append(spec)
        for req_id in scheduler_output.finished_req_ids:
            self._forget(req_id)
        return meta

    def _forget(self, req_id: str) -> None:
        self._requests.pop(req_id, None)
        self._matches.pop(req_id, None)
        handle = self._prefetches.pop(req_id, None)
        if handle is not None:
            handle.close()

    def update_connector_output(self, connector_output: Any) -> None:
        for req_id in connector_output.finished_recving or ():
            handle = self._prefetches.pop(req_id, None)
            if handle is not None:
                handle.close()

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Saves complete within the step (``wait_for_save``): the blocks may be freed now."""
        self._forget(request.request_id)
        self._pending_loads.pop(request.request_id, None)
        return False, None

    # -- worker side ----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = list(kv_caches)
        try:
            from vllm.model_executor.models.utils import extract_layer_index
            names.sort(key=extract_layer_index)
        except Exception:
            pass
        self._layer_index = {name: i for i, name in enumerate(names)}
        self._adapter = paged_adapter(self.layout, [kv_caches[name] for name in names])
        if self._adapter.page_size != self.page_size:
            raise ValueError(f"kv_caches: expected pages of vLLM's block size {self.page_size} tokens, "
                             f"got {self._adapter.page_size}")

    def _error_blocks(self, spec: LoadSpec, loaded: int) -> None:
        """Blocks of ``spec`` from the first token not loaded on: vLLM recomputes them."""
        first = max(loaded, spec.start) // self.page_size
        bad = set(spec.block_ids[first:-(-spec.end // self.page_size)])
        if bad:
            with self._errors_lock:
                self._errors.update(bad)
            self._count("load_error_blocks", len(bad))

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KVStoreConnectorMetadata) or self._adapter is None:
            return
        for spec in meta.loads:
            if spec.is_async:
                if self._async_pool is None:
                    self._async_pool = ThreadPoolExecutor(2, thread_name_prefix="kvstore-vllm-load")
                self._async_loads[spec.req_id] = self._async_pool.submit(self._load_whole, spec)
            else:
                sunk = self._adapter.device.type == "cpu"
                loader = self.store.load(spec.tokens, spec.salt, layer_wise=True, device=self._adapter.device,
                                         sink=block_sink(self._adapter, spec.block_ids, spec.start, spec.end) if sunk
                                         else None)
                self._active.append(_ActiveLoad(spec, loader, sunk))

    def _load_whole(self, spec: LoadSpec) -> None:
        """An async load: every layer at once, in a background thread."""
        start = time.perf_counter()
        loaded = 0
        try:
            kv = self.store.load(spec.tokens, spec.salt, device=self._adapter.device)
            loaded = min(kv.shape[2], spec.end)
            if loaded > spec.start:
                where = self._adapter.locate(spec.block_ids, loaded - spec.start, start=spec.start)
                for layer in range(self.layout.num_layers):
                    self._adapter.scatter_layer(layer, kv[layer, :, spec.start:loaded], where)
        except Exception:
            loaded = 0
        finally:
            self._finish_load(spec, loaded, start)

    def _finish_load(self, spec: LoadSpec, loaded: int, started: float) -> None:
        if loaded < spec.end:
            self._error_blocks(spec, loaded)
        self._count("loads")
        self._count("loaded_tokens", max(0, loaded - spec.start))
        self._count("load_seconds", time.perf_counter() - started)

    def _advance(self, load: _ActiveLoad, upto: int) -> None:
        """Scatter layers ``next_layer .. upto`` of a sync load into vLLM's caches."""
        spec = load.spec
        upto = min(upto, self.layout.num_layers - 1)
        try:
            if load.sunk and load.next_layer <= upto:
                load.loader.wait_layer(upto)
                load.n = min(load.loader.num_tokens, spec.end)
                load.next_layer = upto + 1
            while load.next_layer <= upto:
                if load.where is None:
                    load.n = min(load.loader.num_tokens, spec.end)
                    load.where = (self._adapter.locate(spec.block_ids, load.n - spec.start, start=spec.start)
                                  if load.n > spec.start else False)
                kv = load.loader.layer(load.next_layer)
                if load.where is not False:
                    self._adapter.scatter_layer(load.next_layer, kv[:, spec.start:load.n], load.where)
                load.next_layer += 1
        except Exception:
            load.n = 0
            load.next_layer = self.layout.num_layers
        if load.next_layer >= self.layout.num_layers:
            load.loader.close()
            self._finish_load(spec, load.n, load.started)

    def wait_for_layer_load(self, layer_name: str) -> None:
        layer = self._layer_index.get(layer_name)
        if layer is None or not self._active:
            return
        for load in self._active:
            self._advance(load, layer)
        self._active = [load for load in self._active if load.next_layer < self.layout.num_layers]

    def _save_layer(self, spec: SaveSpec, layer: int) -> None:
        """Hand layer ``layer`` of ``spec``'s tokens to its ``LayerSaver`` (once)."""
        entry = self._savers.get(spec.req_id)
        if entry is None:
            saver = self.store.save(spec.tokens, salt=spec.salt, layer_wise=True, start=spec.start)
            where = self._adapter.locate(spec.block_ids, len(spec.tokens) - spec.start, start=spec.start)
            entry = self._savers[spec.req_id] = (saver, where, set())
        saver, where, given = entry
        if layer not in given:
            given.add(layer)
            saver.save_layer(layer, self._adapter.gather_layer(layer, where, out=saver.layer_buffer(layer)))

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        meta = self._connector_metadata
        layer = self._layer_index.get(layer_name)
        if not isinstance(meta, KVStoreConnectorMetadata) or layer is None or self._adapter is None:
            return
        if self._adapter.device.type == "cpu":
            return  # saved whole in wait_for_save, straight from the pages into the store (one copy)
        for spec in meta.saves:
            self._save_layer(spec, layer)

    def _save_from_pages(self, spec: SaveSpec) -> None:
        """Every new block of ``spec`` from vLLM's (CPU) pages into the store (``paged_store.save_paged``)."""
        try:
            save_paged(self.store, spec.tokens, self._adapter, spec.block_ids, spec.salt, spec.start)
        except Exception:  # a save that cannot be made is a later miss, never an error in vLLM's step
            self._count("save_errors")

    def wait_for_save(self) -> None:
        for load in self._active:  # loads vLLM did not wait for layer by layer
            self._advance(load, self.layout.num_layers - 1)
        self._active = []
        meta = self._connector_metadata
        if not isinstance(meta, KVStoreConnectorMetadata) or self._adapter is None:
            return
        for spec in meta.saves:
            start = time.perf_counter()
            if self._adapter.device.type == "cpu":
                self._save_from_pages(spec)
            else:
                for layer in range(self.layout.num_layers):
                    self._save_layer(spec, layer)
            self._count("saves")
            self._count("saved_tokens", len(spec.tokens) - spec.start)
            self._count("save_seconds", time.perf_counter() - start)
        self._savers.clear()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done = {req_id for req_id, future in self._async_loads.items() if future.done()}
        for req_id in done:
            del self._async_loads[req_id]
        return None, (done or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._errors_lock:
            errors, self._errors = self._errors, set()
        return errors
