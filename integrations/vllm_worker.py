"""The worker half of the kvstore connector: one rank's store, its lookup service, loads and saves.

Each worker (a TP rank of a PP stage of a DP rank) opens its own store when
vLLM registers its caches: the layout comes from those caches (so EAGLE or
MTP draft layers registered beside the model's are stored too, and a
pipeline stage's keys name its first layer), the model id from the weights,
and the LMDB directory is the rank's own when other ranks run beside it.
The worker then serves lookups of that store to the scheduler
(``integrations/vllm_lookup.py``).

Per step: ``start_load_kv`` starts each load (an eager one, or every one
when the forward replays a FULL CUDA graph, is queued whole before the
forward; an async one runs in a thread); ``wait_for_layer_load`` scatters a
layer once it has arrived; ``wait_for_save`` finishes the loads and hands
the finished prompts to the copy engine (``integrations/vllm_copy.py``).
Blocks a load could not fill are reported to vLLM, which recomputes them.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from kvstore import KVStore
from kvstore.integrations.vllm_copy import CopyEngine, LoadJob
from kvstore.integrations.vllm_groups import NO_PAGE, CacheGroups, cache_groups
from kvstore.integrations.vllm_lookup import Answer, LookupServer, address
from kvstore.integrations.vllm_meta import KVStoreConnectorMetadata, LoadSpec, SaveSpec
from kvstore.integrations.vllm_metrics import ConnectorEvents, KVStoreConnectorStats
from kvstore.integrations.vllm_paged import GroupedAdapter, paged_adapter
from kvstore.integrations.vllm_settings import (ConnectorSettings, RankPlace, layer_index, layout_from_caches,
                                                model_id_of, rank_store_config)

log = logging.getLogger(__name__)

PREFILL_SAMPLE_TOKENS = 512  # steps computing at least this many tokens teach the planner prefill speed
# CUDA-graph runtime modes whose forward calls the connector's wait_for_layer_load (a FULL graph replays
# without reaching Python)
LAYER_HOOK_MODES = frozenset({"NONE", "PIECEWISE"})


def layer_hooks_run(forward_context: Any) -> bool:
    """Whether the forward of the step ``start_load_kv`` was given ``forward_context`` for calls
    ``wait_for_layer_load``, so that a sync load may still run while the first layers compute.

    Only a step's own context says so: one that carries the step's attention metadata, in eager or
    piecewise mode. vLLM 0.33's model runner V2 starts the loads of a FULL-graph step outside any forward
    context, in a stand-in it makes with no metadata and mode NONE; read as NONE, those loads waited for
    layer hooks the graph replay never called, and the forward read pages not yet filled.
    """
    mode = getattr(getattr(forward_context, "cudagraph_runtime_mode", None), "name", None)
    return getattr(forward_context, "attn_metadata", None) is not None and mode in LAYER_HOOK_MODES


def stored_layers(kv_caches: dict[str, torch.Tensor], groups: CacheGroups) -> list[str]:
    """The names of the caches kvstore stores, in model order: those of the groups it stores (every cache,
    when vLLM gives no config or names none of them in its one group), draft layers included."""
    names = [n for n in kv_caches if groups.layer_group(n) is not None]
    if not names and not groups.hybrid:
        names = list(kv_caches)
    return sorted(names, key=lambda n: (layer_index(n), n))


class WorkerHalf:
    """One rank's store, lookup server and copy engine (see module docstring); ``close()`` stops them."""

    def __init__(self, vllm_config: Any, kv_cache_config: Any, settings: ConnectorSettings, place: RankPlace,
                 stats: KVStoreConnectorStats, events: ConnectorEvents, lock: threading.Lock):
        self.vllm_config = vllm_config
        self.kv_cache_config = kv_cache_config
        self.settings = settings
        self.place = place
        self.page_size = vllm_config.cache_config.block_size
        self.stats = stats
        self.events = events
        self.store: KVStore | None = None
        self.engine: CopyEngine | None = None
        self.server: LookupServer | None = None
        self._layers: dict[str, int] = {}
        self._pages_per_block = 1
        self._active: list[LoadJob] = []
        self._pool: ThreadPoolExecutor | None = None
        self._async: dict[str, Future] = {}
        self._errors: set[int] = set()
        self._failed: set[str] = set()  # requests whose async load failed (multi-group configs: recomputed whole)
        self._short: set[str] = set()  # requests whose load in this step fell short: this step saves none of them
        self.groups, self._why_not = cache_groups(kv_cache_config, self.page_size)
        self._lock = lock  # guards the stats and the error blocks (async loads finish on other threads)
        self._step_started = 0.0
        self._epoch = ""  # salt suffix; a new one after each sleep (the weights may have changed)
        self._asleep = False

    # -- setup -------------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = stored_layers(kv_caches, self.groups) if self.groups is not None else []
        caches = [kv_caches[n] for n in names]
        odd = [n for n, c in zip(names, caches) if c.shape != caches[0].shape]
        if odd:
            self._why_not = (f"the stored layers do not share one shape: {list(caches[0].shape)} ({names[0]}), "
                             f"others for {odd[:4]}")
        elif not names:
            self._why_not = self._why_not or f"no attention KV cache among {len(kv_caches)} caches"
        if odd or not names:  # recomputed, as without kvstore
            log.warning("kvstore worker %s: nothing stored (%s); this engine's prompts are computed",
                        self.place.rank_dir, self._why_not)
            return
        layout = layout_from_caches(self.vllm_config, caches, layer_index(names[0]), self.settings.block_tokens,
                                    self.place)
        config = rank_store_config(self.settings, self.place, model_id_of(self.settings, self.vllm_config))
        groups = [self.groups.layer_group(n) for n in names]  # None: a single-group config naming none of them
        adapter = GroupedAdapter(paged_adapter(layout, caches), [g if g is not None else 0 for g in groups])
        if self.page_size % adapter.page_size:
            raise ValueError(f"kv_caches: expected pages that divide vLLM's block size {self.page_size} tokens, "
                             f"got {adapter.page_size}")
        self._pages_per_block = self.page_size // adapter.page_size
        self.store = KVStore(layout, config)
        self.engine = CopyEngine(self.store, adapter, self.settings.staging_bytes)
        self._layers = {name: i for i, name in enumerate(names)}
        with self._lock:
            self.stats.set_staging_bytes(self.place.tp_rank + self.place.tp_size * self.place.pp_rank,
                                         self.engine.staging_bytes)
        name = address(self.place.engine_id, self.place.dp_rank, self.place.pp_rank, self.place.tp_rank)
        try:
            self.server = LookupServer(name, self._lookup)
        except OSError as exc:  # another engine took this engine's id: its scheduler gets misses, never an error
            log.warning("kvstore worker %s: cannot serve lookups at %r (%s); this engine's prompts will not be "
                        "served from kvstore (is another engine running with the same engine_id?)",
                        self.place.rank_dir, name.lstrip("\0"), exc)
        log.info("kvstore worker %s: %d layers %s, model id %s, %d bytes of staging", self.place.rank_dir,
                 layout.num_layers, layout.describe(), config.model_id, self.engine.staging_bytes)

    def _lookup(self, tokens: Any, salt: str | None) -> Answer:
        if self._asleep:
            return Answer()
        plan = self.store.plan(tokens, self._salt(salt))
        return Answer(plan.load_tokens, dict(plan.sources))

    def _salt(self, salt: str | None) -> str | None:
        """The request's salt in this weights epoch (unchanged until the engine first sleeps)."""
        if not self._epoch:
            return salt
        return f"{salt or ''};weights-epoch={self._epoch}"

    def sleep(self) -> None:
        """vLLM's sleep mode drops the caches and may load other weights before waking: serve nothing now."""
        self._asleep = True

    def wake(self) -> None:
        """After a sleep the weights may differ (RLHF updates them so): prompts saved before are not served."""
        self._epoch = uuid.uuid4().hex[:16]
        self._asleep = False

    def _pages(self, tables: Sequence[Sequence[int]]) -> tuple[list[int], ...]:
        """vLLM's block tables as the caches' pages (a block spans several kernel pages when vLLM splits them)."""
        r = self._pages_per_block
        if r == 1:
            return tuple(list(t) for t in tables)
        return tuple([b * r + i if b != NO_PAGE else NO_PAGE for b in t for i in range(r)] for t in tables)

    # -- loads --------------------------------------------------------------------------------------------

    def step_started(self) -> None:
        """vLLM bound this step's metadata: the forward comes next (``start_load_kv`` may run after it)."""
        self._step_started = time.perf_counter()

    def start_load_kv(self, meta: Any, forward_context: Any) -> None:
        if not isinstance(meta, KVStoreConnectorMetadata) or self.engine is None:
            return
        overlap = layer_hooks_run(forward_context)
        for spec in meta.loads:
            if spec.is_async:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(2, thread_name_prefix="kvstore-vllm-load")
                self._async[spec.req_id] = self._pool.submit(self._load_async, spec)
                continue
            job = self._start(spec)
            if job is None:
                continue
            if spec.eager or not overlap:
                self._finish(spec, job, job.finish())
            else:
                self._active.append(job)

    def _start(self, spec: LoadSpec) -> LoadJob | None:
        try:
            if self._asleep:
                raise RuntimeError("the engine is asleep")
            job = self.engine.load(spec.tokens, self._salt(spec.salt), self._pages(spec.block_ids), spec.start,
                                   spec.end)
        except Exception as exc:
            log.warning("a load could not start (vLLM recomputes its blocks): %r", exc)
            self._finish(spec, None, 0)
            return None
        job.spec = spec
        return job

    def _load_async(self, spec: LoadSpec) -> None:
        """Run an async load on the pool's thread. A failure after the load began (a CUDA stream's synchronize,
        a loader's close) loads nothing: it escaped into the future, ``get_finished`` reported the request
        finished and no block failed, and vLLM computed on pages the load never filled."""
        job = self._start(spec)
        if job is None:
            return
        try:
            loaded = self.engine.load_now(job)
        except Exception as exc:
            log.warning("an async load failed (vLLM recomputes its blocks): %r", exc)
            loaded = 0
        self._finish(spec, job, loaded)

    def _finish(self, spec: LoadSpec, job: LoadJob | None, loaded: int) -> None:
        """Account a load; blocks it could not fill go to vLLM, which recomputes them (a multi-group request
        is reported failed whole: vLLM maps no block ids back to one)."""
        whole = self.groups is not None and self.groups.hybrid
        bad: set[int] = set()
        if loaded < spec.end:
            first = spec.start if whole else max(loaded, spec.start)
            first, last = first // self.page_size, -(-spec.end // self.page_size)
            bad = {b for table in spec.block_ids for b in table[first:last] if b != NO_PAGE}
        tokens = 0 if whole and loaded < spec.end else max(0, min(loaded, spec.end) - spec.start)
        seconds = time.perf_counter() - job.started if job is not None else 0.0
        with self._lock:
            if loaded < spec.end and not spec.is_async:
                self._short.add(spec.req_id)
            if whole and loaded < spec.end:
                self._failed.add(spec.req_id)
            else:
                self._errors.update(bad)
            self.stats.add("load_error_blocks", len(bad))
            self.stats.record_transfer("load", tokens, tokens * self.store.layout.token_bytes, seconds)

    def wait_for_layer_load(self, layer_name: str) -> None:
        layer = self._layers.get(layer_name)
        if layer is None or not self._active:
            return
        for job in self._active:
            job.advance(layer)
        self._retire()

    def _retire(self) -> None:
        for job in [j for j in self._active if j.done]:
            self._finish(job.spec, job, job.loaded)
        self._active = [j for j in self._active if not j.done]

    # -- saves --------------------------------------------------------------------------------------------

    def _complete_active(self) -> None:
        """Finish the loads vLLM did not wait for layer by layer (a drafter's layers, say), and account them."""
        for job in self._active:
            job.advance(self.store.layout.num_layers - 1 if self.store else 0)
        self._retire()

    def wait_for_save(self, meta: Any) -> None:
        forward_seconds = time.perf_counter() - self._step_started  # bind to here: the forward, not the saves
        self._complete_active()
        if not isinstance(meta, KVStoreConnectorMetadata) or self.engine is None:
            return
        with self._lock:
            short, self._short = self._short, set()
        for spec in meta.saves:
            if spec.req_id in short:  # its pages past the load's end, and tokens computed over them, are not KV
                log.info("request %s is not saved this step: its load fell short (saved once vLLM recomputes "
                         "it)", spec.req_id)
                with self._lock:
                    self.stats.add("save_skipped_after_load_error")
                continue
            self._save(spec)
        if meta.step_tokens >= PREFILL_SAMPLE_TOKENS and not meta.loads and self._step_started:
            self.store.record_prefill(meta.step_tokens, forward_seconds)
        self._step_started = 0.0

    def _save(self, spec: SaveSpec) -> None:
        started = time.perf_counter()
        block_tokens = self.store.layout.block_tokens
        if self._asleep:
            return
        salt = self._salt(spec.salt)
        try:
            start = max(spec.after, self.store.lookup(spec.tokens, salt) // block_tokens * block_tokens)
            if start >= len(spec.tokens):
                return
            pages = self._pages(spec.block_ids)
            held = self.engine.adapter.first_token(pages, len(spec.tokens))
            if start < held:  # a sliding window freed pages of tokens not yet stored: recomputed later
                log.info("tokens [%d, %d) of a request are not saved: a sliding window freed the pages of "
                         "[%d, %d) before they were stored", start, len(spec.tokens), start, held)
                with self._lock:
                    self.stats.add("save_window_gaps")
                return
            skipped = self.engine.skipped
            handed = self.engine.save(spec.tokens, salt, pages, start)
        except Exception as exc:  # a save that cannot be made is a later miss, never an error in vLLM's step
            log.warning("a save failed (a later lookup misses): %r", exc)
            with self._lock:
                self.stats.add("save_errors")
            return
        with self._lock:
            if self.engine.skipped > skipped:
                self.stats.add("save_skipped")
            self.stats.record_transfer("save", handed, handed * self.store.layout.token_bytes,
                                       time.perf_counter() - started)
        self._stored_event(spec, start, start + handed)

    def _stored_event(self, spec: SaveSpec, start: int, end: int) -> None:
        """A KV cache event naming the saved vLLM blocks by vLLM's own hashes."""
        first, last = -(-start // self.page_size), min(end // self.page_size, len(spec.block_hashes))
        if last <= first:
            return
        tier = self.store.stack.fastest.name if self.store.stack.fastest is not None else "host"
        tokens = spec.tokens if spec.event_tokens is None else spec.event_tokens
        extra = None
        if spec.extra_keys is not None:
            offset = spec.after // self.page_size
            extra = spec.extra_keys[first - offset:last - offset]
        self.events.stored(spec.block_hashes[first:last], spec.block_hashes[first - 1] if first else None,
                           tokens[first * self.page_size:last * self.page_size], self.page_size, tier,
                           spec.lora_name, extra)

    # -- results ------------------------------------------------------------------------------------------

    def get_finished(self) -> tuple[set[str], set[str]]:
        """The async loads finished since the last call, and those of them that failed (multi-group configs)."""
        done = {req_id for req_id, future in self._async.items() if future.done()}
        for req_id in done:
            del self._async[req_id]
        with self._lock:
            failed = self._failed & done
            self._failed -= failed
        return done, failed

    def get_block_ids_with_load_errors(self) -> set[int]:
        # With speculative decoding vLLM asks when the target model's forward ends, before the drafter's
        # layers were waited for and before wait_for_save: a short load must be told in this step's output,
        # or vLLM samples from the stale pages and learns of them a step late.
        self._complete_active()
        with self._lock:
            errors, self._errors = self._errors, set()
        return errors

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for job in self._active:
            job.loader.close()
        self._active = []
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.store is not None:
            self.store.close()
            self.store = None
