"""The scheduler half of the kvstore connector: which prompt tokens to load, which to save.

It opens no store. It asks the workers' stores over their lookup sockets
(``integrations/vllm_lookup.py``), once per admitted request: vLLM asks
``get_num_new_matched_tokens`` again every step a request waits for memory,
and those retries reuse the first answer.

Hybrid KV-cache configs (``SupportsHMA``): full-attention, sliding-window
and chunked-local groups are stored (``integrations/vllm_groups.py``): their
saves go store block by store block as the prefill computes them, from the
pages each group still holds, and their loads are async (vLLM recomputes a
multi-group request whose load failed, whole). A config with any other group
(Mamba...) is looked up as a miss and saves nothing: vLLM recomputes it exactly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from kvstore.integrations.vllm_groups import NO_PAGE, cache_groups, load_tables
from kvstore.integrations.vllm_lookup import Answer, LookupClient, address
from kvstore.integrations.vllm_meta import KVStoreConnectorMetadata, LoadSpec, SaveSpec
from kvstore.integrations.vllm_metrics import KVStoreConnectorStats
from kvstore.integrations.vllm_lora import AdapterDigests
from kvstore.integrations.vllm_settings import ConnectorSettings, RankPlace, request_keys

try:  # vLLM's own extra keys of a block, as its KV cache events carry them (vLLM 0.33)
    from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys as _block_extra_keys
    from vllm.v1.core.kv_cache_utils import to_event_extra_keys as _event_extra_keys
except ImportError:  # an older vLLM: events without them
    _block_extra_keys = _event_extra_keys = None

log = logging.getLogger(__name__)


@dataclass
class _Request:
    """What the scheduler tracks of a request: its key tokens and salt, its blocks, whether it was saved."""

    tokens: list[int] | None
    salt: str | None
    bound: bool = False  # ``RequestKeys.bound``: the key tokens are not all the prompt's ids
    lora_name: str | None = None
    block_ids: list[list[int]] = field(default_factory=list)  # vLLM's block ids, one list per KV-cache group
    saved: bool = False  # the whole prompt was handed to the workers
    saved_upto: int = 0  # tokens handed to the workers so far (block by block, for hybrid configs)
    answer: Answer | None = None  # the lookup of this admission (reused while the request waits)
    sources: dict[str, int] = field(default_factory=dict)  # tiers of the last answer (vLLM asks after alloc)
    computed: int = 0  # vLLM's computed tokens when the answer was given
    request: Any = None  # vLLM's Request: its block_hashes name the saved blocks in KV cache events
    load_failed: bool = False  # a load of it failed: it is not offered another (vLLM would retry it forever)
    loading: frozenset[int] = frozenset()  # the block ids its last load fills (a failure names some of them)


def eagle_block_drop(spec: Any) -> bool:
    """Whether a hit leaves its last page to be computed again, as vLLM's own prefix cache does for EAGLE and
    MTP drafters: a draft layer's KV at a position is computed from the token after it, so the last
    position of a stored block holds the writer's next token's mark, which a key of the tokens up to the
    block's end does not cover (a reader with another next token was served it)."""
    if spec is None:
        return False
    try:
        return bool(spec.use_eagle_block_drop())
    except AttributeError:  # a vLLM before the method: its EAGLE always dropped the block
        return bool(getattr(spec, "use_eagle", lambda: False)())


class SchedulerHalf:
    """Lookups, load and save decisions, and the metadata the workers act on (see module docstring)."""

    def __init__(self, vllm_config: Any, kv_cache_config: Any, settings: ConnectorSettings, place: RankPlace,
                 stats: KVStoreConnectorStats, consumer: bool, producer: bool):
        self.settings = settings
        self.page_size = vllm_config.cache_config.block_size
        self.block_tokens = settings.block_tokens
        self.consumer, self.producer = consumer, producer
        self.stats = stats
        self.groups, reason = cache_groups(kv_cache_config, self.page_size)
        if self.groups is None:
            log.warning("kvstore: this model's KV cache holds state kvstore cannot store exactly (%s); every "
                        "prompt is recomputed", reason)
        self.async_load = settings.async_load or (self.groups is not None and self.groups.hybrid)
        spec = getattr(vllm_config, "speculative_config", None)
        self.uniform_decode = 1 + int(getattr(spec, "num_speculative_tokens", 0) or 0)
        self.volatile_tail = self.page_size if eagle_block_drop(spec) else 0
        # vLLM publishes KV cache events: their extra keys are worth a call a page (40 ms for 131,072 tokens)
        self.events = bool(getattr(getattr(vllm_config, "kv_events_config", None), "enable_kv_cache_events", False))
        names = [address(place.engine_id, place.dp_rank, pp, tp) for pp, tp in place.peers()]
        self.client = LookupClient(names, settings.lookup_timeout_s)
        self._requests: dict[str, _Request] = {}
        self._pending_loads: dict[str, LoadSpec] = {}
        self._adapters = AdapterDigests()  # a LoRA adapter's files, in its requests' keys

    # -- requests --------------------------------------------------------------------------------------

    def _state(self, request: Any) -> _Request:
        state = self._requests.get(request.request_id)
        if state is None:
            lora = getattr(request, "lora_request", None)
            state = self._requests[request.request_id] = _Request(
                *request_keys(request, self.settings.salt, self._adapters),
                lora_name=getattr(lora, "lora_name", None) if lora is not None else None, request=request)
        return state

    def on_new_request(self, request: Any) -> None:
        self._state(request)

    def _answer(self, state: _Request) -> Answer:
        if state.load_failed:
            return Answer()
        if state.answer is None:
            started = time.perf_counter()
            state.answer = self.client.lookup(state.tokens, state.salt) if state.tokens else Answer()
            hit = (min(state.answer.load_tokens - self.volatile_tail, len(state.tokens or ()) - 1)
                   // self.page_size * self.page_size)
            self.stats.record_lookup(len(state.tokens or ()), 0, time.perf_counter() - started)
            state.answer = Answer(max(0, hit), state.answer.sources)
            state.sources = dict(state.answer.sources)
        return state.answer

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self.consumer or self.groups is None:
            return 0, False
        state = self._state(request)
        hit = self._answer(state).load_tokens
        state.computed = num_computed_tokens
        if hit <= num_computed_tokens:
            return 0, False
        return hit - num_computed_tokens, self.async_load

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        state = self._requests.get(request.request_id)
        if state is None:
            return
        state.answer = None  # admitted: a later admission (after preemption) asks again
        state.loading = frozenset()
        # A load vLLM was promised goes out even if its answer was dropped since (a failure reported while
        # vLLM deferred this call): vLLM waits for its report, and would wait for ever.
        if num_external_tokens <= 0 or not state.tokens:
            return
        start = state.computed
        end = start + num_external_tokens
        tables = load_tables(blocks)
        first, last = start // self.page_size, -(-end // self.page_size)
        state.loading = frozenset(b for table in tables for b in table[first:last] if b != NO_PAGE)
        self.stats.add("hit_tokens", num_external_tokens)
        cut = min(len(state.tokens), -(-end // self.block_tokens) * self.block_tokens)
        eager = len(state.tokens) - end <= self.uniform_decode
        self._pending_loads[request.request_id] = LoadSpec(
            request.request_id, state.tokens[:cut], state.salt, tables, start, end,
            is_async=self.async_load, eager=eager)

    def get_external_cache_hit_sources(self, request: Any, num_external_tokens: int, hit_source: Any,
                                       unspecified: Any) -> dict:
        """vLLM's ``CacheHitSource`` split of the hit, by the tiers the answer named (largest gets rounding)."""
        state = self._requests.get(request.request_id)
        if not num_external_tokens:
            return {}
        sources = state.sources if state is not None else {}
        if not sources:
            return {unspecified: num_external_tokens}
        out: dict = {}
        total = sum(sources.values()) or 1
        for tier, tokens in sources.items():
            source = hit_source(tier)
            out[source] = out.get(source, 0) + num_external_tokens * tokens // total
        biggest = max(out, key=out.get)
        out[biggest] += num_external_tokens - sum(out.values())
        return {k: v for k, v in out.items() if v}

    # -- the step's metadata ---------------------------------------------------------------------------

    def _save_spec(self, req_id: str, state: _Request, num_computed: int, num_scheduled: int) -> SaveSpec | None:
        """What of the request to hand to the workers after this step: the whole prompt once computed, and
        for hybrid configs also each store block as it completes (sliding windows free its pages later)."""
        if state.saved or not self.producer or self.groups is None or not state.tokens:
            return None
        upto = min(num_computed + num_scheduled, len(state.tokens))
        if upto < len(state.tokens):
            if not self.groups.hybrid:
                return None
            upto = upto // self.block_tokens * self.block_tokens
        if upto <= state.saved_upto:
            return None
        state.saved = upto == len(state.tokens)
        after, state.saved_upto = state.saved_upto, upto
        hashes = list(getattr(state.request, "block_hashes", None) or ())[:upto // self.page_size]
        tables = self.groups.save_tables(state.block_ids, num_computed, self.page_size, -(-upto // self.page_size))
        event_tokens = list(state.request.all_token_ids[:upto]) if state.bound else None  # as vLLM's events
        return SaveSpec(req_id, state.tokens[:upto], state.salt, tables, hashes, state.lora_name, after,
                        event_tokens, self._extra_keys(state.request, after, upto) if hashes else None)

    def _extra_keys(self, request: Any, after: int, upto: int) -> list | None:
        """vLLM's extra keys of the request's full pages from the one holding token ``after`` up to token
        ``upto``, as its own KV cache events give them (LoRA name, image identifiers and offsets, cache salt,
        embeddings' digests: a KV-aware router hashes them with the token ids); None if none has any."""
        if _event_extra_keys is None or not self.events:
            return None
        keys, mm_index = [], 0
        for start in range(after // self.page_size * self.page_size, upto // self.page_size * self.page_size,
                           self.page_size):
            extra, mm_index = _block_extra_keys(request, start, start + self.page_size, mm_index)
            keys.append(extra)
        return _event_extra_keys(keys)

    def build_connector_meta(self, scheduler_output: Any) -> KVStoreConnectorMetadata:
        meta = KVStoreConnectorMetadata(loads=list(self._pending_loads.values()),
                                        step_tokens=int(getattr(scheduler_output, "total_num_scheduled_tokens", 0)))
        self._pending_loads.clear()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is None:  # not seen by on_new_request or a lookup: its salt is unknown, so save nothing
                state = self._requests[new.req_id] = _Request(None, None, saved=True)
            state.block_ids = [list(ids) for ids in new.block_ids]
            spec = self._save_spec(new.req_id, state, new.num_computed_tokens, scheduled.get(new.req_id, 0))
            if spec is not None:
                meta.saves.append(spec)
        cached = scheduler_output.scheduled_cached_reqs
        resumed = set(getattr(cached, "resumed_req_ids", ()) or ())
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in resumed:
                state.block_ids = [list(ids) for ids in new_ids] if new_ids is not None else []
            elif new_ids is not None:
                if not state.block_ids:
                    state.block_ids = [[] for _ in new_ids]
                for mine, more in zip(state.block_ids, new_ids):
                    mine.extend(more)
            spec = self._save_spec(req_id, state, cached.num_computed_tokens[i], scheduled.get(req_id, 0))
            if spec is not None:
                meta.saves.append(spec)
        for req_id in getattr(scheduler_output, "preempted_req_ids", None) or ():
            state = self._requests.get(req_id)
            if state is not None:  # its blocks went back to vLLM: another request's failure may name them
                state.loading = frozenset()
        for req_id in scheduler_output.finished_req_ids:  # request_finished forgot them; an id reused since
            state = self._requests.get(req_id)           # (a new request of that id) keeps its state
            if state is None or state.request is None or state.request.is_finished():
                self.forget(req_id)
        return meta

    def loads_failed(self, req_ids: Any, block_ids: Any = ()) -> None:
        """vLLM reports these requests' loads failed, or loads that left ``block_ids`` unfilled, and recomputes
        them: from now on those requests are misses. An async load that failed for good (its copy engine
        raising) was offered again at each admission, failed again, and vLLM rescheduled it for ever.

        The prompt is handed to the workers again once recomputed: a save in the step of the failed load
        is skipped (it would store pages the load never filled), and it was marked saved already."""
        failed = set(req_ids)
        if block_ids:
            bad = set(block_ids)
            failed.update(req_id for req_id, state in self._requests.items() if not state.loading.isdisjoint(bad))
        for req_id in failed:
            state = self._requests.get(req_id)
            if state is not None:
                state.load_failed = True
                state.answer = None
                state.saved, state.saved_upto = False, 0

    def forget(self, req_id: str) -> None:
        """A finished (or aborted) request's state goes. An async load not yet sent still goes out: vLLM keeps
        the request's blocks until the worker reports that load finished (a load vLLM deferred to
        ``update_from_output`` and the client aborted before the next step: dropped here, the request and its
        blocks were held for ever)."""
        self._requests.pop(req_id, None)
        pending = self._pending_loads.get(req_id)
        if pending is not None and not pending.is_async:
            del self._pending_loads[req_id]

    def close(self) -> None:
        self.client.close()
