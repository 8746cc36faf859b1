"""Hybrid models through vLLM 0.33's real hybrid allocator: a full-attention group beside a sliding-window (or
chunked-local) group, as Gemma, gpt-oss or Llama 4 have, and a Mamba group that kvstore does not store.

The real ``Scheduler`` runs a two-group ``KVCacheConfig``; the two layers'
caches share one tensor, as vLLM allocates them (``KVCacheTensor.shared_by``),
so a page written for the wrong group, or vLLM's null block written at all,
shows up, and a page vLLM frees is scribbled over at once (as if another
request took it). The forward stand-in writes each computed token's KV into each
layer's own group pages; prefills are chunked (64-token steps), so the
sliding window frees pages while a prompt is still being computed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed: build its environment with scripts/engine-venvs.sh vllm")

from vllm.config import SchedulerConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import (ChunkedLocalAttentionSpec, FullAttentionSpec, KVCacheConfig,  # noqa: E402
                                        KVCacheGroupSpec, MambaSpec, SlidingWindowSpec)
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

from kvstore.integrations.vllm import KVStoreConnectorMetadata, LoadSpec, SaveSpec  # noqa: E402
from kvstore.integrations.vllm_groups import NO_PAGE, cache_groups  # noqa: E402
from vllm_env import (EAGER_STEP, HEAD_DIM, KV_HEADS, LAYER_NAMES, NUM_BLOCKS, PAGE, make_config,  # noqa: E402
                      make_request, paged_caches, prompt, read_tokens, true_kv, write_model, write_tokens)

BLOCK_TOKENS = 32
CHUNK = 64  # tokens vLLM computes per step: prompts longer than this are prefilled in chunks


def _spec(kind: str, span: int):
    common = dict(block_size=PAGE, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=torch.float32)
    if kind == "window":
        return SlidingWindowSpec(sliding_window=span, **common)
    return ChunkedLocalAttentionSpec(attention_chunk_size=span, **common)


def hybrid_config(kind: str, span: int) -> KVCacheConfig:
    full = FullAttentionSpec(block_size=PAGE, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=torch.float32)
    return KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec([LAYER_NAMES[0]], full),
                                          KVCacheGroupSpec([LAYER_NAMES[1]], _spec(kind, span))])


def window_only_config(span: int) -> KVCacheConfig:
    """One sliding-window group for every layer (as vLLM sets up Mistral-7B-v0.1)."""
    return KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec(list(LAYER_NAMES), _spec("window", span))])


class HybridEngine:
    """A real Scheduler over a two-group config (or one windowed group: ``window_only``) and a worker connector
    over one shared CPU cache tensor."""

    def __init__(self, tmp_path: Path, kind: str, span: int, extra: dict | None = None, chunk: int = CHUNK,
                 window_only: bool = False):
        extra = {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB", **(extra or {})}
        self.config = make_config(write_model(tmp_path / "model"), extra)
        self.config.scheduler_config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=chunk,
                                                       max_model_len=2048, is_encoder_decoder=False,
                                                       enable_chunked_prefill=True)
        self.config.cache_config.num_gpu_blocks = NUM_BLOCKS
        self.kcc = window_only_config(span) if window_only else hybrid_config(kind, span)
        self.groups = [0] * len(LAYER_NAMES) if window_only else list(range(len(LAYER_NAMES)))  # each layer's
        self.worker = KVConnectorFactory.create_connector(self.config, KVConnectorRole.WORKER, self.kcc)
        # one tensor shared by both layers, as vLLM's hybrid allocator lays them out: block ids of the two
        # groups come from one pool, so they never meet unless a page is written for the wrong group
        # (one group: a tensor per layer, as vLLM allocates them)
        shared = torch.zeros(NUM_BLOCKS, PAGE, KV_HEADS, 2 * HEAD_DIM)
        self.raws = [torch.zeros_like(shared) if window_only else shared for _ in LAYER_NAMES]
        self.caches = {name: raw.permute(0, 2, 1, 3) for name, raw in zip(LAYER_NAMES, self.raws)}
        self.worker.register_kv_caches(self.caches)
        self.scheduler = Scheduler(vllm_config=self.config, kv_cache_config=self.kcc, log_stats=True,
                                   structured_output_manager=StructuredOutputManager(self.config), block_size=PAGE)
        self.connector = self.scheduler.connector
        pool = self.scheduler.kv_cache_manager.block_pool
        free = pool.free_blocks

        def free_and_scribble(blocks):  # a freed page may be handed to another request at once: its KV is gone
            blocks = list(blocks)
            free(blocks)
            for block in blocks:
                if not block.is_null and block.ref_cnt == 0:
                    for raw in self.raws:
                        raw[block.block_id] = float("nan")
        pool.free_blocks = free_and_scribble
        self.requests: dict = {}
        self.tables: dict[str, list[list[int]]] = {}  # the worker's view of each request's block tables

    def add(self, request) -> None:
        self.requests[request.request_id] = request
        self.scheduler.add_request(request)

    def _forward(self, req_id: str, start: int, n: int) -> None:
        """The model computes tokens ``[start, start + n)``: each layer writes into its own group's pages."""
        tokens = self.requests[req_id].all_token_ids
        kv = true_kv(tokens, start, start + n)
        for layer in range(len(LAYER_NAMES)):
            table = self.tables[req_id][self.groups[layer]]
            for j in range(n):
                t = start + j
                page = table[t // PAGE]
                assert page != 0, "vLLM never gives a token it computes the null block"
                self.raws[layer][page, t % PAGE] = torch.cat([kv[layer, 0, j], kv[layer, 1, j]], dim=-1)

    def step(self):
        out = self.scheduler.schedule()
        self.starts = {}  # tokens each scheduled request had computed before this step
        for new in out.scheduled_new_reqs:
            self.tables[new.req_id] = [list(ids) for ids in new.block_ids]
            self.starts[new.req_id] = new.num_computed_tokens
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            self.starts[req_id] = cached.num_computed_tokens[i]
            if cached.new_block_ids[i] is not None:
                for mine, more in zip(self.tables[req_id], cached.new_block_ids[i]):
                    mine.extend(more)
        worker = self.worker
        worker.bind_connector_metadata(out.kv_connector_metadata)
        worker.start_load_kv(EAGER_STEP)
        for name in LAYER_NAMES:
            worker.wait_for_layer_load(name)
        for req_id, n in out.num_scheduled_tokens.items():
            self._forward(req_id, self.starts[req_id], n)
        worker.wait_for_save()
        results = worker.get_transfer_results(out.finished_req_ids)
        worker.clear_connector_metadata()
        req_ids = list(out.num_scheduled_tokens)
        # a chunk that does not finish its prompt samples nothing
        sampled = [[7] if self.starts[r] + out.num_scheduled_tokens[r] >= len(self.requests[r].prompt_token_ids)
                   else [] for r in req_ids]
        self.scheduler.update_from_output(out, ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled, logprobs=None, prompt_logprobs_dict={}, pooler_output=None,
            kv_connector_output=KVConnectorOutput(finished_recving=results.finished_recving,
                                                  failed_recving=results.failed_recving,
                                                  invalid_block_ids=worker.get_block_ids_with_load_errors())))
        return out

    def prefill(self, req_id: str, tokens: list[int], max_steps: int = 200) -> int:
        """Run ``req_id`` until its prompt is computed (it then holds its pages for one more token); returns
        the tokens vLLM had when it first computed."""
        request = make_request(req_id, tokens, max_tokens=2)
        self.add(request)
        first = None
        for _ in range(max_steps):
            out = self.step()
            if first is None and req_id in out.num_scheduled_tokens:
                first = self.starts[req_id]
            if request.num_computed_tokens >= len(tokens) or request.is_finished():
                return first
            time.sleep(0.002)  # async loads run in a thread: give it the GIL
        raise AssertionError(f"{req_id} did not finish its prefill")

    def page_tokens(self, req_id: str, layer: int, end: int) -> dict[int, torch.Tensor]:
        """The KV ``[2, H, D]`` in the pages the request holds now for ``layer``'s group, token by token."""
        blocks = self.scheduler.kv_cache_manager.get_blocks(req_id).blocks[self.groups[layer]]
        out = {}
        for t in range(end):
            block = blocks[t // PAGE]
            if not block.is_null:
                row = self.raws[layer][block.block_id, t % PAGE]
                out[t] = torch.stack([row[:, :HEAD_DIM], row[:, HEAD_DIM:]])
        return out

    def close(self) -> None:
        self.connector.shutdown()
        self.worker.shutdown()


def assert_exact(engine: HybridEngine, req_id: str, tokens: list[int], end: int, window: int) -> None:
    """Every page the request holds has the true KV of its tokens; a full layer holds all of ``[0, end)``,
    a windowed layer at least the window of the next token; vLLM's null block is still all zero."""
    truth = true_kv(tokens, 0, end)
    for layer in range(len(LAYER_NAMES)):
        held = engine.page_tokens(req_id, layer, end)
        if engine.kcc.kv_cache_groups[engine.groups[layer]].kv_cache_spec.__class__ is FullAttentionSpec:
            assert sorted(held) == list(range(end))
        else:
            assert set(range(max(0, end - window + 1), end)) <= set(held)
        for t, kv in held.items():
            assert torch.equal(kv, truth[layer, :, t]), (layer, t)
    assert not any(raw[0].any() for raw in engine.raws)


@pytest.mark.parametrize("kind,span", [("window", 40), ("chunk", 32)], ids=["sliding-window", "chunked-local"])
def test_hybrid_prompt_is_served_exact_from_kvstore(tmp_path, kind, span):
    engine = HybridEngine(tmp_path, kind, span)
    try:
        shared = prompt(200, seed=1)
        assert engine.prefill("a", shared + [3]) == 0  # four chunks: the window frees pages as it goes
        stats = engine.worker.get_kv_connector_stats().data
        assert stats["saves"] >= 4 and stats.get("save_window_gaps", 0) == 0  # block by block, no gap
        engine.step()
        assert engine.scheduler.reset_prefix_cache()

        second = shared + prompt(30, seed=2)
        request = make_request("b", second)
        assert engine.connector.get_num_new_matched_tokens(request, 0) == (192, True)  # async: multi-group
        assert engine.prefill("b", second) == 192
        assert_exact(engine, "b", second, len(second), span)
        null_pages = [b for b in engine.scheduler.kv_cache_manager.get_blocks("b").blocks[1][:192 // PAGE]
                      if b.is_null]
        assert null_pages  # the window's group held only its window: the rest was never written
        loaded = engine.worker.get_kv_connector_stats().data
        assert loaded["loaded_tokens"] == 192 and not loaded.get("load_error_blocks")
    finally:
        engine.close()


def test_a_window_that_freed_unsaved_pages_stops_the_saves(tmp_path):
    """Chunks of 60 tokens, store blocks of 32, a window of 8: after the first chunk only [0, 32) is a whole
    store block, and by the next step the window has freed [32, 48): what follows cannot be saved exactly."""
    engine = HybridEngine(tmp_path, "window", 8, chunk=60)
    try:
        tokens = prompt(150, seed=3)
        engine.prefill("a", tokens)
        stats = engine.worker.get_kv_connector_stats().data
        assert stats["save_window_gaps"] >= 1
        stored = engine.worker.store.get(tokens)  # what kvstore holds is exact, every layer of every token
        assert stored.shape[2] == 32 and torch.equal(stored, true_kv(tokens, 0, 32))
        engine.step()
        assert engine.scheduler.reset_prefix_cache()
        again = make_request("b", tokens + [9])
        assert engine.connector.get_num_new_matched_tokens(again, 0) == (32, True)  # only what was exact
        assert engine.prefill("b", tokens + [9]) == 32
        assert_exact(engine, "b", tokens + [9], len(tokens) + 1, 8)
    finally:
        engine.close()


def prefill_losing_blocks(engine: HybridEngine, req_id: str, tokens: list[int], kept: int) -> int:
    """``engine.prefill`` while the store loses every block past its first ``kept`` tokens after the lookup."""
    store = engine.worker.store
    real_load = store.load

    def short_load(keys, salt=None, **kwargs):
        return real_load(keys[:kept], salt, **kwargs)
    store.load = short_load
    try:
        return engine.prefill(req_id, tokens)
    finally:
        del store.load


def test_a_failed_hybrid_load_is_recomputed_whole(tmp_path):
    """vLLM takes no per-block load errors from a multi-group model: the request is reported failed and vLLM
    computes it from token 0, exactly."""
    engine = HybridEngine(tmp_path, "window", 40)
    try:
        tokens = prompt(130, seed=4)
        engine.prefill("a", tokens)
        engine.step()
        assert engine.scheduler.reset_prefix_cache()
        assert prefill_losing_blocks(engine, "b", tokens + [5], BLOCK_TOKENS) == 0  # computed from token 0
        assert_exact(engine, "b", tokens + [5], len(tokens) + 1, 40)
        assert engine.worker.get_kv_connector_stats().data["load_error_blocks"] > 0
    finally:
        engine.close()


def test_a_window_only_model_is_saved_chunk_by_chunk_and_a_failed_load_recomputed_whole(tmp_path):
    """One sliding-window group for every layer: a prompt longer than a prefill chunk was saved only once
    computed whole, when the window had freed its first pages (nothing stored, no hit ever); a failed block
    was reported alone, and vLLM computed from there with null pages inside the window."""
    engine = HybridEngine(tmp_path, "window", 40, window_only=True)
    try:
        shared = prompt(200, seed=5)
        engine.prefill("a", shared + [3])
        stats = engine.worker.get_kv_connector_stats().data
        assert stats["saves"] >= 4 and stats.get("save_window_gaps", 0) == 0
        engine.step()
        assert engine.scheduler.reset_prefix_cache()
        second = shared + prompt(30, seed=6)
        assert engine.connector.get_num_new_matched_tokens(make_request("b", second), 0) == (192, True)
        assert engine.prefill("b", second) == 192
        assert_exact(engine, "b", second, len(second), 40)
        engine.step()
        assert engine.scheduler.reset_prefix_cache()
        assert prefill_losing_blocks(engine, "c", shared + [5], 5 * BLOCK_TOKENS) == 0  # computed from token 0
        assert_exact(engine, "c", shared + [5], len(shared) + 1, 40)
    finally:
        engine.close()


def test_mamba_group_is_recomputed_and_saves_nothing(tmp_path):
    full = FullAttentionSpec(block_size=PAGE, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=torch.float32)
    mamba = MambaSpec(block_size=PAGE, shapes=((4, 8),), dtypes=(torch.float32,))
    kcc = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                        kv_cache_groups=[KVCacheGroupSpec([LAYER_NAMES[0]], full),
                                         KVCacheGroupSpec([LAYER_NAMES[1]], mamba)])
    groups, why = cache_groups(kcc, PAGE)
    assert groups is None and "MambaSpec" in why
    config = make_config(write_model(tmp_path / "model"), {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB"})
    worker = KVConnectorFactory.create_connector(config, KVConnectorRole.WORKER, kcc)
    scheduler = KVConnectorFactory.create_connector(config, KVConnectorRole.SCHEDULER, kcc)
    try:
        worker.register_kv_caches({LAYER_NAMES[0]: torch.zeros(NUM_BLOCKS, KV_HEADS, PAGE, 2 * HEAD_DIM),
                                   LAYER_NAMES[1]: torch.zeros(NUM_BLOCKS, 4, 8)})
        assert worker.store is None
        request = make_request("m", prompt(100, seed=6))
        scheduler.on_new_request(request)
        assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    finally:
        scheduler.shutdown()
        worker.shutdown()


def test_groups_of_vllm_specs():
    full = FullAttentionSpec(block_size=PAGE, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=torch.float32)
    groups, _ = cache_groups(hybrid_config("window", 40), PAGE)
    assert groups.hybrid and [g.kind for g in groups.groups] == ["full", "window"]
    assert groups.layer_group(LAYER_NAMES[1]) == 1 and groups.layer_group("model.layers.9.attn") is None
    # a step starting at 100 computed tokens: the window (40) may have freed tokens [0, 61), pages [0, 3)
    tables = groups.save_tables([list(range(1, 8)), list(range(11, 18))], 100, PAGE, 7)
    assert tables == (list(range(1, 8)), [NO_PAGE] * 3 + list(range(14, 18)))
    other = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec([LAYER_NAMES[0]], full),
        KVCacheGroupSpec([LAYER_NAMES[1]], FullAttentionSpec(block_size=2 * PAGE, num_kv_heads=KV_HEADS,
                                                             head_size=HEAD_DIM, dtype=torch.float32))])
    assert cache_groups(other, PAGE)[0] is None  # groups of other block sizes: not stored
    single, _ = cache_groups(None, PAGE)
    assert not single.hybrid and single.layer_group("anything") == 0


def test_a_pipeline_ranks_empty_group_holds_no_layer_and_each_layer_keeps_its_own_pages(tmp_path):
    """vLLM's projection of a model's groups to a pipeline rank keeps groups with no layer there (Gemma-3-1B
    at PP=4, rank 0). Read as every layer's group, the empty sliding-window group took the full-attention
    layer: its KV was saved from and loaded into the empty group's pages (max diff 4.2, no error reported)."""
    kcc = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec([LAYER_NAMES[0]], _spec("window", 1024)),
        KVCacheGroupSpec([], _spec("window", 1024)),  # its layers are on other pipeline ranks
        KVCacheGroupSpec([LAYER_NAMES[1]], FullAttentionSpec(block_size=PAGE, num_kv_heads=KV_HEADS,
                                                             head_size=HEAD_DIM, dtype=torch.float32))])
    groups, _ = cache_groups(kcc, PAGE)
    assert [groups.layer_group(name) for name in LAYER_NAMES] == [0, 2]
    config = make_config(write_model(tmp_path / "model"), {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB"})
    worker = KVConnectorFactory.create_connector(config, KVConnectorRole.WORKER, kcc)
    try:
        shared = torch.zeros(NUM_BLOCKS, PAGE, KV_HEADS, 2 * HEAD_DIM)  # the hybrid allocator's one tensor
        worker.register_kv_caches({name: shared.permute(0, 2, 1, 3) for name in LAYER_NAMES})
        tokens = prompt(64, seed=7)
        kv = true_kv(tokens, 0, 64)
        saved = ([1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12])
        shared[5:9] = 99.0  # the empty group's pages hold another request's KV

        def pages_of(layer: int, table: list[int]) -> torch.Tensor:
            return torch.stack([shared[table[t // PAGE], t % PAGE] for t in range(64)])

        def true_pages(layer: int) -> torch.Tensor:
            return torch.stack([torch.cat([kv[layer, 0, t], kv[layer, 1, t]], dim=-1) for t in range(64)])
        for layer, group in ((0, 0), (1, 2)):  # the forward writes each layer into its own group's pages
            for t in range(64):
                shared[saved[group][t // PAGE], t % PAGE] = true_pages(layer)[t]
        worker.bind_connector_metadata(KVStoreConnectorMetadata(saves=[SaveSpec("a", tokens, None, saved)]))
        worker.wait_for_save()
        loaded = ([20, 21, 22, 23], [24, 25, 26, 27], [28, 29, 30, 31])
        worker.bind_connector_metadata(KVStoreConnectorMetadata(loads=[LoadSpec("b", tokens, None, loaded, 0, 64)]))
        worker.start_load_kv(EAGER_STEP)
        for name in LAYER_NAMES:
            worker.wait_for_layer_load(name)
        worker.wait_for_save()
        assert not worker.get_block_ids_with_load_errors()
        for layer, group in ((0, 0), (1, 2)):
            assert torch.equal(pages_of(layer, loaded[group]), true_pages(layer))
        assert torch.equal(shared[24:28], torch.zeros_like(shared[24:28]))  # the empty group's: untouched
    finally:
        worker.shutdown()


def test_a_single_group_naming_no_registered_cache_stores_them_all(tmp_path):
    """A one-group config whose layer names match none of the registered caches (an older vLLM naming them
    otherwise) still stores every cache, as before hybrid support."""
    full = FullAttentionSpec(block_size=PAGE, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=torch.float32)
    kcc = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                        kv_cache_groups=[KVCacheGroupSpec(["decoder.0.attn", "decoder.1.attn"], full)])
    config = make_config(write_model(tmp_path / "model"), {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB"})
    worker = KVConnectorFactory.create_connector(config, KVConnectorRole.WORKER, kcc)
    try:
        caches = paged_caches()
        worker.register_kv_caches(caches)
        assert worker.store is not None and worker.store.layout.num_layers == len(LAYER_NAMES)
        tokens = prompt(64, seed=9)
        write_tokens(caches, [1, 2, 3, 4], 0, true_kv(tokens, 0, 64))
        worker.bind_connector_metadata(KVStoreConnectorMetadata(saves=[SaveSpec("s", tokens, None, ([1, 2, 3, 4],))]))
        worker.wait_for_save()
        worker.bind_connector_metadata(KVStoreConnectorMetadata(loads=[LoadSpec("l", tokens, None, ([9, 8, 7, 6],),
                                                                                0, 64)]))
        worker.start_load_kv(EAGER_STEP)
        worker.wait_for_save()
        assert torch.equal(read_tokens(caches, [9, 8, 7, 6], 0, 64), true_kv(tokens, 0, 64))
    finally:
        worker.shutdown()
