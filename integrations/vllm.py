"""vLLM connector: serve prompt prefixes from kvstore through vLLM's ``KVConnectorBase_V1`` (vLLM 0.32 and 0.33).

Load it with::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "kvstore.integrations.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"host_bytes": "8GiB", "disk_dir": "/nvme/kv", "files_dir": "/shared/kv"}}'

Configuration: ``StoreConfig.load()`` (``$KVSTORE_CONFIG`` and ``KVSTORE_*``
variables) overridden by the ``StoreConfig`` keys of
``kv_connector_extra_config``. Connector keys there: ``block_tokens``
(tokens per stored block; a multiple of vLLM's ``--block-size``; default the
multiple nearest above 256), ``async_load`` (default false), ``salt`` (an
extra tenant salt), ``staging_bytes`` (device and pinned host staging per
worker, default 256 MiB each on CUDA), ``lookup_timeout_s`` (default 1) and
``config`` (a settings file instead of ``$KVSTORE_CONFIG``). Any other key
is a ``ValueError`` naming it. ``model_id`` defaults to a digest of the
model's weights (``integrations/model_identity.py``), so engines loading the
same weights from different paths share one cache.
``kv_load_failure_policy: "recompute"`` makes vLLM recompute blocks this
connector reports as failed; it is required in a role that loads (vLLM's
default, ``fail``, would fail a request whenever a block is evicted between
lookup and load, so the connector refuses to start with it).

The connector is a facade over two halves, as vLLM runs it:

* the scheduler half (``integrations/vllm_scheduler.py``) opens no store:
  it asks every worker's store over a local socket
  (``integrations/vllm_lookup.py``), once per admitted request, and builds
  each step's loads and saves (``integrations/vllm_meta.py``);
* the worker half (``integrations/vllm_worker.py``) opens its rank's store
  (its own LMDB directory when other ranks run beside it), serves those
  lookups, and moves KV with the copy engine (``integrations/vllm_copy.py``),
  which needs no vLLM and runs the same on CUDA and CPU caches.

So the multi-process engine of ``vllm serve``, tensor and pipeline
parallelism (each stage's keys name its layers) and data-parallel ranks on
one node hit on host and local-disk tiers, not only on shared ones.

Exactness: keys chain over the prompt's tokens with each multimodal item's
placeholder tokens, and each run of positions a mixed-mode prompt gives as
embeddings, replaced by its content digest, salted with ``cache_salt``, the
LoRA name and path and ``salt``; fp8 caches (vLLM's uint8 views)
and MLA latent caches are stored byte for byte. A load vLLM would not wait
for layer by layer (the request has at most a decode's worth of tokens left,
so the step may replay a FULL CUDA graph) is queued whole before the forward;
saves are gathered after the forward, outside any graph, so vLLM's default
``FULL_AND_PIECEWISE`` mode needs no change. Hybrid models (``SupportsHMA``):
full-attention, sliding-window and chunked-local groups are stored and
served exactly; Mamba and other state groups make kvstore serve nothing and
vLLM recompute (``integrations/vllm_groups.py``). Blocks a load could not
fill are reported through ``get_block_ids_with_load_errors`` and vLLM
recomputes them (a multi-group request's async load is reported failed
through ``get_transfer_results``, and recomputed whole).
After vLLM's sleep mode (``unregister_kv_caches`` / ``restore_kv_caches``)
the workers salt everything with a new weights epoch: the weights may have
been replaced while asleep (RLHF), so what was saved before is never served.

Observability: ``get_kv_connector_stats`` (lookups, hit, loaded and saved
tokens and bytes, seconds, errors, skipped saves, staging bytes), vLLM's
Prometheus ``/metrics`` (``build_prom_metrics``) and KV cache events for
KV-aware routers (``BlockStored`` with vLLM's block hashes, medium of the
tier, from the workers through ``take_events``): ``integrations/vllm_metrics.py``.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorRole,
                                                                   KVConnectorTransferResults)
except ImportError as exc:  # pragma: no cover - exercised without vllm
    raise ImportError(
        "kvstore.integrations.vllm needs vLLM 0.32 or 0.33 (the KVConnectorBase_V1 API), which is not importable "
        f"here ({exc}); build its environment with `scripts/engine-venvs.sh vllm` and run in .venv-vllm") from exc
try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import SupportsHMA
except ImportError:  # pragma: no cover - vLLM without the hybrid allocator interface
    SupportsHMA = object  # type: ignore[misc,assignment]
try:
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
except ImportError:  # pragma: no cover - vLLM 0.32
    CacheHitSource = None  # type: ignore[misc,assignment]

from kvstore.integrations.vllm_meta import KVStoreConnectorMetadata, LoadSpec, SaveSpec
from kvstore.integrations.vllm_metrics import (ConnectorEvents, KVStoreConnectorStats, KVStoreKVEvents,
                                               build_kv_connector_stats, build_prom_metrics)
from kvstore.integrations.vllm_plugin import register
from kvstore.integrations.vllm_scheduler import SchedulerHalf
from kvstore.integrations.vllm_settings import (ConnectorSettings, connector_settings, key_tokens, rank_place,
                                                request_salt)
from kvstore.integrations.vllm_worker import WorkerHalf

__all__ = ["KVStoreConnector", "KVStoreConnectorMetadata", "KVStoreConnectorStats", "LoadSpec", "SaveSpec",
           "ConnectorSettings", "connector_settings", "key_tokens", "request_salt"]

_HIT_SOURCES = {"device": "DEVICE", "host": "HOST", "lmdb": "DISK", "files": "DISK"}


def _hit_source(tier: str) -> Any:
    return getattr(CacheHitSource, _HIT_SOURCES.get(tier, "EXTERNAL_UNSPECIFIED"))


class KVStoreConnector(KVConnectorBase_V1, SupportsHMA):
    """kvstore as vLLM's KV connector, in the scheduler or the worker role; see the module docstring."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.settings = connector_settings(vllm_config)
        transfer = self._kv_transfer_config
        policy = getattr(transfer, "kv_load_failure_policy", "recompute")
        if transfer.is_kv_consumer and policy != "recompute":
            raise ValueError(f"kv_transfer_config.kv_load_failure_policy: expected 'recompute' with the kvstore "
                             f"connector, got {policy!r}: a block evicted between the scheduler's lookup and "
                             f"the worker's load would fail the user's request instead of being recomputed")
        self._stats = KVStoreConnectorStats()
        self._stats_lock = threading.Lock()
        self._events = ConnectorEvents()
        self._worker_events: KVStoreKVEvents | None = None
        self._closed = False
        self.scheduler: SchedulerHalf | None = None
        self.worker: WorkerHalf | None = None
        if role == KVConnectorRole.WORKER:
            self.worker = WorkerHalf(vllm_config, kv_cache_config, self.settings, rank_place(vllm_config, True),
                                     self._stats, self._events, self._stats_lock)
        else:
            self.scheduler = SchedulerHalf(vllm_config, kv_cache_config, self.settings,
                                           rank_place(vllm_config, False), self._stats, transfer.is_kv_consumer,
                                           transfer.is_kv_producer)

    @property
    def store(self) -> Any:
        """The worker's store (None in the scheduler, which opens none, or before caches are registered)."""
        return self.worker.store if self.worker is not None else None

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """False: loads a FULL graph would skip are completed before the forward, and saves run after it."""
        return False

    # -- metrics and events -----------------------------------------------------------------------------

    def get_kv_connector_stats(self) -> KVStoreConnectorStats | None:
        with self._stats_lock:
            if self._stats.is_empty():
                return None
            stats = KVStoreConnectorStats(data=self._stats.data)
            self._stats.reset()
            return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVStoreConnectorStats:
        return build_kv_connector_stats(data)

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> Any:
        return build_prom_metrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def get_kv_connector_kv_cache_events(self) -> KVStoreKVEvents | None:
        return self._events.take_kv_events()

    def update_connector_output(self, connector_output: Any) -> None:
        if self.scheduler is not None:  # a request whose load failed is served nothing more: vLLM computes it
            self.scheduler.loads_failed(getattr(connector_output, "failed_recving", None) or (),
                                        getattr(connector_output, "invalid_block_ids", None) or ())
        events = getattr(connector_output, "kv_cache_events", None)
        if isinstance(events, KVStoreKVEvents):
            if self._worker_events is None:
                self._worker_events = events
            else:
                self._worker_events.merge(events)

    def take_events(self) -> Any:
        events, self._worker_events = self._worker_events, None
        if events is not None:  # a block counts as stored once every rank (TP shard, PP stage) stored it
            yield from events.aggregate(self._vllm_config.parallel_config.world_size).get_all_events()

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.worker is not None:
            self.worker.close()
        if self.scheduler is not None:
            self.scheduler.close()

    # -- scheduler side -----------------------------------------------------------------------------------

    def on_new_request(self, request: Any) -> None:
        self.scheduler.on_new_request(request)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def get_external_cache_hit_sources(self, request: Any, num_external_tokens: int) -> dict:
        if CacheHitSource is None:
            return {}
        return self.scheduler.get_external_cache_hit_sources(request, num_external_tokens, _hit_source,
                                                             CacheHitSource.EXTERNAL_UNSPECIFIED)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVStoreConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict[str, Any] | None]:
        """Saves are handed over within the step (``wait_for_save``): the blocks may be freed now."""
        self.scheduler.forget(request.request_id)
        return False, None

    def request_finished_all_groups(self, request: Any, block_ids: Any) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished(request, block_ids)

    # -- worker side ----------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        """vLLM binds each step's metadata before the forward: the worker times the forward from here."""
        super().bind_connector_metadata(connector_metadata)
        if self.worker is not None:
            self.worker.step_started()

    def unregister_kv_caches(self) -> None:
        """vLLM 0.33's sleep mode: stop serving and saving until ``restore_kv_caches``."""
        self.worker.sleep()

    def restore_kv_caches(self) -> None:
        """Awake: the weights may have been replaced while asleep, so nothing saved before is served."""
        self.worker.wake()

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self.worker.start_load_kv(self._connector_metadata, forward_context)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """Nothing per layer: ``wait_for_save`` gathers every layer after the forward (outside CUDA graphs)."""

    def wait_for_save(self) -> None:
        self.worker.wait_for_save(self._connector_metadata)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, self.worker.get_finished()[0] or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> Any:
        """Finished async loads, and those that failed: vLLM recomputes a failed multi-group request whole."""
        done, failed = self.worker.get_finished()
        return KVConnectorTransferResults(finished_recving=done, failed_recving=failed)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.get_block_ids_with_load_errors()


register()  # MultiConnector's front end finds the connector by name (kvstore.integrations.vllm_plugin)
