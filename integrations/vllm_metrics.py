"""What the kvstore vLLM connector shows to operators' tools: stats, Prometheus metrics, KV cache events.

vLLM 0.32/0.33 pickles each worker's stats to the executor, ``aggregate``s
them over TP/PP ranks and with the scheduler's, and sends ``to_dict()`` with
msgspec to the frontend, where ``KVConnectorLogging`` logs ``reduce()`` and
the ``build_prom_metrics`` object ``observe``s them: so plain data only.
Workers' KV cache events reach the scheduler-side connector as
``KVStoreKVEvents``, which vLLM publishes next to its own.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVCacheEvent
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

try:  # optional: vLLM versions without them still import this module
    from vllm.distributed.kv_events import KVConnectorKVEvents
except ImportError:  # pragma: no cover
    KVConnectorKVEvents = object  # type: ignore[assignment,misc]
try:
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics
except ImportError:  # pragma: no cover
    KVConnectorPromMetrics = object  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)

__all__ = ["STAT_KEYS", "ConnectorEvents", "KVStoreConnectorStats", "KVStoreKVEvents", "KVStorePromMetrics",
           "build_kv_connector_stats", "build_prom_metrics", "locality_of", "medium_of"]

# The counters (summed over workers and steps), with units: also the Prometheus help texts.
_COUNTERS = {
    "lookups": "Prompt lookups in kvstore (scheduler).", "lookup_tokens": "Prompt tokens looked up, tokens.",
    "hit_tokens": "Prompt tokens kvstore will load instead of vLLM computing them, tokens.",
    "lookup_seconds": "Time spent in lookups, seconds.", "loads": "Loads into vLLM's KV cache, one per worker.",
    "loaded_tokens": "Tokens loaded, summed over workers, tokens.",
    "load_bytes": "KV bytes loaded, summed over workers, bytes.", "load_seconds": "Time spent loading, seconds.",
    "load_error_blocks": "vLLM blocks a load failed to fill (recomputed or failed), blocks.",
    "saves": "Saves from vLLM's KV cache, one per worker.", "saved_tokens": "Tokens saved, summed over workers.",
    "save_bytes": "KV bytes saved, summed over workers, bytes.", "save_seconds": "Time spent saving, seconds.",
    "save_errors": "Saves that failed.", "save_skipped": "Saves dropped because staging memory was full.",
    "save_window_gaps": "Saves not made because a sliding window had freed the pages of tokens not yet stored.",
    "save_skipped_after_load_error": "Saves not made in the step of a load that fell short (saved once recomputed).",
}
STAT_KEYS: tuple[str, ...] = tuple(_COUNTERS)
STAGING = "staging_bytes"  # the gauge: {"<worker rank>": bytes of staging memory in use}
SAMPLES = {"load": "load_samples", "save": "save_samples"}  # seconds of single operations, for histograms
MAX_SAMPLES = 1000  # per list: past this the histograms sample, the counters stay exact
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PROM_PREFIX = "vllm:kvstore_"  # "vllm:": vLLM unregisters these when it rebuilds its stat logger
OWNERSHIP = "kvstore"  # the events' ``ownership``: tells kvstore's events from vLLM's own


@dataclass
class KVStoreConnectorStats(KVConnectorStats):
    """One interval's counters, staging gauge and operation seconds; ``data`` is the wire format.

    Counters add up (workers, scheduler, steps). ``staging_bytes`` is a gauge
    per worker: merging keeps each worker's latest reading, so TP ranks add
    up while a later step replaces an earlier one. Not thread-safe.
    """

    def __post_init__(self) -> None:
        self.data = {**dict.fromkeys(STAT_KEYS, 0), STAGING: {}, **{k: [] for k in SAMPLES.values()}, **self.data}

    def add(self, key: str, value: float = 1) -> None:
        """Add ``value`` to the counter ``key`` (one of ``STAT_KEYS``)."""
        if key not in _COUNTERS:
            raise KeyError(f"unknown kvstore counter {key!r}; expected one of {list(STAT_KEYS)}")
        self.data[key] += value

    def record_lookup(self, prompt_tokens: int, hit_tokens: int, seconds: float) -> None:
        """One lookup of ``prompt_tokens``, ``hit_tokens`` of them to load, taking ``seconds``."""
        for key, value in (("lookups", 1), ("lookup_tokens", prompt_tokens), ("hit_tokens", hit_tokens),
                           ("lookup_seconds", seconds)):
            self.add(key, value)

    def record_transfer(self, op: str, tokens: int, nbytes: int, seconds: float) -> None:
        """One finished ``op`` ("load" or "save") of ``tokens`` tokens and ``nbytes`` bytes, taking ``seconds``."""
        for key, value in ((f"{op}s", 1), (f"{op}{'ed' if op == 'load' else 'd'}_tokens", tokens),
                           (f"{op}_bytes", nbytes), (f"{op}_seconds", seconds)):
            self.add(key, value)
        samples = self.data[SAMPLES[op]]
        samples.append(seconds)
        del samples[:-MAX_SAMPLES]

    def set_staging_bytes(self, worker: int | str, nbytes: int) -> None:
        """Staging memory in use on ``worker`` (its rank), bytes; set when it changes (a reading is news)."""
        self.data[STAGING][str(worker)] = nbytes

    def reset(self) -> None:
        self.data = {}
        self.__post_init__()

    def aggregate(self, other: KVConnectorStats) -> KVStoreConnectorStats:
        for key in STAT_KEYS:
            self.data[key] += other.data.get(key, 0)
        self.data[STAGING].update(other.data.get(STAGING) or {})
        for key in SAMPLES.values():
            self.data[key] = (self.data[key] + list(other.data.get(key) or ()))[-MAX_SAMPLES:]
        return self

    def reduce(self) -> dict[str, int | float]:
        """For ``KVConnectorLogging``: the non-zero counters, then what a human wants.

        ``staging_bytes`` (sum of the workers' latest), ``hit_rate`` (hit /
        looked-up tokens), ``lookup_ms`` (mean), ``load_GBps``/``save_GBps``
        (1e9 bytes per worker-second), ``{load,save}_p50_ms``/``_p99_ms``.
        """
        d = self.data
        out: dict[str, int | float] = {k: round(d[k], 6) if isinstance(d[k], float) else d[k]
                                       for k in STAT_KEYS if d[k]}
        if d[STAGING]:
            out[STAGING] = sum(d[STAGING].values())
        if d["lookup_tokens"]:
            out["hit_rate"] = round(d["hit_tokens"] / d["lookup_tokens"], 4)
        if d["lookups"]:
            out["lookup_ms"] = round(1e3 * d["lookup_seconds"] / d["lookups"], 3)
        for op, key in SAMPLES.items():
            if d[f"{op}_seconds"] > 0 and d[f"{op}_bytes"]:
                out[f"{op}_GBps"] = round(d[f"{op}_bytes"] / d[f"{op}_seconds"] / 1e9, 3)
            if samples := sorted(d[key]):
                out[f"{op}_p50_ms"] = round(1e3 * samples[len(samples) // 2], 3)
                out[f"{op}_p99_ms"] = round(1e3 * samples[len(samples) * 99 // 100], 3)
        return out

    def is_empty(self) -> bool:
        return not any(self.data[k] for k in (*STAT_KEYS, STAGING, *SAMPLES.values()))


def build_kv_connector_stats(data: dict[str, Any] | None = None) -> KVStoreConnectorStats:
    """The connector's ``build_kv_connector_stats``: copies lists and dicts (vLLM shares one payload)."""
    return KVStoreConnectorStats(data={k: type(v)(v) if isinstance(v, (dict, list)) else v
                                       for k, v in (data or {}).items()})


class KVStorePromMetrics(KVConnectorPromMetrics):
    """Counters ``vllm:kvstore_<key>`` (exposed ``..._total``), the gauge ``vllm:kvstore_staging_bytes``
    (sum of the workers' latest readings) and histograms ``vllm:kvstore_{load,save}_duration_seconds``,
    one series per engine; classes from ``metric_types`` (prometheus_client's or vLLM's Ray wrappers)."""

    def __init__(self, vllm_config: Any, metric_types: dict[type, type], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]):
        if KVConnectorPromMetrics is not object:
            super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.per_engine_labelvalues = per_engine_labelvalues

        def per_engine(cls: type, name: str, doc: str, **kwargs: Any) -> dict[int, Any]:
            metric = metric_types[cls](name=PROM_PREFIX + name, documentation=doc, labelnames=labelnames, **kwargs)
            return {idx: metric.labels(*values) for idx, values in per_engine_labelvalues.items()}

        self.counters = {key: per_engine(Counter, key, doc) for key, doc in _COUNTERS.items()}
        self.staging = per_engine(Gauge, STAGING, "Staging memory in use, all workers, bytes.",
                                  multiprocess_mode="mostrecent")
        self.durations = {op: per_engine(Histogram, f"{op}_duration_seconds", f"One {op} on one worker, seconds.",
                                         buckets=list(DURATION_BUCKETS)) for op in SAMPLES}
        self._staging_seen: dict[int, dict[str, int]] = {}  # engine -> worker -> latest reading

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        """Move the metrics by one step's payload (``KVStoreConnectorStats.data``)."""
        for key, metric in self.counters.items():
            if (value := transfer_stats_data.get(key, 0)) > 0:
                metric[engine_idx].inc(value)
        if readings := transfer_stats_data.get(STAGING):
            seen = self._staging_seen.setdefault(engine_idx, {})
            seen.update(readings)
            self.staging[engine_idx].set(sum(seen.values()))
        for op, key in SAMPLES.items():
            for seconds in transfer_stats_data.get(key) or ():
                self.durations[op][engine_idx].observe(seconds)


def build_prom_metrics(vllm_config: Any, metric_types: dict[type, type], labelnames: list[str],
                       per_engine_labelvalues: dict[int, list[object]]) -> KVStorePromMetrics:
    """The connector's ``build_prom_metrics`` (a classmethod: the frontend has no connector instance)."""
    return KVStorePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


# kvstore tier -> (vLLM event medium, locality to this vLLM instance; None: a files tier may be a shared mount)
_TIERS = {"device": ("GPU", "LOCAL"), "host": ("CPU", "LOCAL"), "lmdb": ("STORAGE", "LOCAL"),
          "files": ("STORAGE", None), "remote": ("STORAGE", "REMOTE"), "redis": ("STORAGE", "REMOTE")}
_UNKNOWN: set[str] = set()  # tier names already warned about


def medium_of(tier: str) -> str:
    """vLLM's event medium ("GPU", "CPU", "STORAGE") of a kvstore tier; a vLLM medium passes through.

    An unknown name is "STORAGE" (warned once): an event path must not fail a save.
    """
    if tier in ("GPU", "CPU", "STORAGE"):
        return tier
    if tier not in _TIERS and tier not in _UNKNOWN:
        _UNKNOWN.add(tier)
        logger.warning("kvstore tier %r has no vLLM event medium; reported as STORAGE (known: %s)", tier, list(_TIERS))
    return _TIERS.get(tier, ("STORAGE", None))[0]


def locality_of(tier: str) -> str | None:
    """"LOCAL", "REMOTE" or None (unknown) for a kvstore tier."""
    return _TIERS.get(tier, (None, None))[1]


def _event(cls: type, **fields: Any) -> Any:
    """``cls(**fields)`` less the optional fields this vLLM's struct lacks."""
    return cls(**{k: v for k, v in fields.items() if k in cls.__struct_fields__})


def _external(hashes: Sequence[bytes | int | None]) -> list[Any]:
    return [maybe_convert_block_hash(h) if isinstance(h, bytes) else h for h in hashes]


class ConnectorEvents:
    """Thread-safe, bounded buffer of one process's kvstore cache events, oldest first.

    kvstore saves and evicts on its own threads; vLLM drains once a step.
    Past ``max_events`` the oldest is dropped and counted in ``dropped``: a
    lost event costs a consumer (a KV-aware router) a wrong guess, never data.
    """

    def __init__(self, max_events: int = 10_000):
        if max_events < 1:
            raise ValueError(f"max_events: expected >= 1, got {max_events}")
        self._events: collections.deque[KVCacheEvent] = collections.deque(maxlen=max_events)
        self._lock = threading.Lock()
        self.dropped = 0

    def stored(self, block_hashes: Sequence[bytes | int], parent_block_hash: bytes | int | None,
               token_ids: Sequence[int], block_size: int, medium: str, lora_name: str | None = None,
               extra_keys: list | None = None) -> None:
        """Blocks of ``block_size`` tokens (``token_ids`` theirs, in prefix order) now in tier ``medium``;
        ``extra_keys``: vLLM's, one entry a block (None: none has any).

        Hashes must be the same on every worker (see ``KVStoreKVEvents``);
        ``bytes`` go through vLLM's ``maybe_convert_block_hash`` as its own
        events' do (by default: the low 64 bits as an int).
        """
        parent = _external([parent_block_hash])[0]
        self._append(_event(BlockStored, block_hashes=_external(block_hashes), parent_block_hash=parent,
                            token_ids=list(token_ids), block_size=block_size, lora_id=None, medium=medium_of(medium),
                            lora_name=lora_name, extra_keys=extra_keys, group_idx=0,
                            kv_cache_spec_kind="full_attention",
                            locality=locality_of(medium), ownership=OWNERSHIP))

    def removed(self, block_hashes: Sequence[bytes | int], medium: str) -> None:
        """Blocks no longer in tier ``medium`` (evicted, deleted or found damaged)."""
        self._append(_event(BlockRemoved, block_hashes=_external(block_hashes), medium=medium_of(medium), group_idx=0,
                            locality=locality_of(medium), ownership=OWNERSHIP))

    def _append(self, event: KVCacheEvent) -> None:
        with self._lock:
            if len(self._events) == self._events.maxlen:
                self.dropped += 1
                if self.dropped == 1:
                    logger.warning("kvstore KV cache events: %d buffered, dropping the oldest (not drained?)",
                                   self._events.maxlen)
            self._events.append(event)

    def take(self) -> list[KVCacheEvent]:
        """All buffered events, oldest first, and empty the buffer."""
        with self._lock:
            events = list(self._events)
            self._events.clear()
        return events

    def take_kv_events(self) -> KVStoreKVEvents | None:
        """``take()`` as a worker's ``get_kv_connector_kv_cache_events()`` answer (None when none)."""
        events = self.take()
        return KVStoreKVEvents(events) if events else None


class KVStoreKVEvents(KVConnectorKVEvents):
    """Workers' events on their way to the scheduler's publisher.

    A TP/PP rank holds only its shard, so a block is stored once every
    worker stored it: ``aggregate`` keeps a ``BlockStored`` seen by all
    workers and a ``BlockRemoved`` seen by any, each once. One
    ``add_events`` call is one worker's list (its duplicates count once).
    """

    def __init__(self, events: Iterable[KVCacheEvent] = (), num_workers: int = 1):
        self._counts: collections.Counter[KVCacheEvent] = collections.Counter()
        self._workers = num_workers
        self.add_events(list(events))

    def add_events(self, events: list[KVCacheEvent]) -> None:
        self._counts.update(dict.fromkeys((e for e in events if isinstance(e, (BlockStored, BlockRemoved))), 1))

    def merge(self, other: KVConnectorKVEvents) -> KVStoreKVEvents:
        """Add ``other``'s events and workers, keeping its counts (the scheduler's merge)."""
        if isinstance(other, KVStoreKVEvents):
            self._counts.update(other._counts)
        else:
            self.add_events(other.get_all_events())
        self._workers += other.get_number_of_workers()
        return self

    def aggregate(self, world_size: int | None = None) -> KVStoreKVEvents:
        """Keep what the workers agree on; pass ``world_size``: a worker with no events sent None, uncounted."""
        need = world_size or self._workers
        self._counts = collections.Counter({e: 1 for e, n in self._counts.items()
                                            if n >= need or isinstance(e, BlockRemoved)})
        self._workers = 1
        return self

    def increment_workers(self, count: int = 1) -> None:
        self._workers += count

    def get_all_events(self) -> list[KVCacheEvent]:
        return list(self._counts.elements())

    def get_number_of_workers(self) -> int:
        return self._workers

    def clear_events(self) -> None:
        self._counts.clear()
        self._workers = 1
