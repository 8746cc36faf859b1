"""The vLLM connector on caches as vLLM 0.33 allocates them, and on the deployment shapes that broke it.

Caches come from vLLM's own ``get_kv_cache_config_from_groups`` and
``allocate_kv_cache`` in every ``KVCacheLayout``, bf16 and fp8 (vLLM's uint8
views), and MLA latent caches. Then: kernel pages smaller than vLLM's block,
EAGLE draft layers registered beside the model's, a hybrid (full attention +
sliding window) cache config, the one-token-left condition that makes vLLM
replay a FULL CUDA graph, multimodal prompts that share placeholder ids but
not images, loads that read only the blocks vLLM lacks, ``hit_tokens`` equal
to the tokens loaded, KV cache events and Prometheus metrics.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed: build its environment with scripts/engine-venvs.sh vllm")

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from vllm.config import CUDAGraphMode  # noqa: E402
from vllm.distributed.kv_events import BlockStored  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole, supports_hma  # noqa: E402
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange  # noqa: E402
from vllm.v1.core.kv_cache_planning import get_kv_cache_config_from_groups  # noqa: E402
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash  # noqa: E402
from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec,  # noqa: E402
                                        MLAAttentionSpec, SlidingWindowSpec)
from vllm.forward_context import ForwardContext  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402
from vllm.v1.worker.utils import allocate_kv_cache  # noqa: E402

from kvstore.integrations.vllm import (KVStoreConnector, KVStoreConnectorMetadata, LoadSpec, SaveSpec,  # noqa: E402
                                       key_tokens, request_salt)
from vllm_env import (EAGER_STEP, BLOCK_TOKENS, KV_HEADS, HEAD_DIM, LAYER_NAMES, LAYERS, NUM_BLOCKS, PAGE,  # noqa: E402
                      Engine, kv_cache_config, make_config, make_request, paged_caches, prompt, read_tokens,
                      true_kv, write_model, write_tokens)

# vLLM's own forward context of a step that replays a FULL CUDA graph
FULL_GRAPH_STEP = ForwardContext(no_compile_layers={}, attn_metadata={}, slot_mapping={},
                                 cudagraph_runtime_mode=CUDAGraphMode.FULL)
LAYOUTS = ["LBNHC", "LBHNC", "LHBNC", "BLHNC", "BLNHC", "BHLNC"]


def vllm_caches(config, spec, names=LAYER_NAMES) -> tuple[KVCacheConfig, dict[str, torch.Tensor]]:
    """vLLM's own allocation of ``names`` with ``spec`` in the config's layout, filled with random bytes."""
    config.cache_config.num_gpu_blocks_override = NUM_BLOCKS
    kcc = get_kv_cache_config_from_groups(config, [KVCacheGroupSpec(list(names), spec)],
                                          spec.page_size_bytes * len(names) * NUM_BLOCKS * 2)
    caches = allocate_kv_cache(kcc, torch.device("cpu"), config.cache_config.get_resolved_kv_cache_layout())
    first = caches[names[0]]
    base = first.untyped_storage()
    raw = torch.empty(0, dtype=torch.uint8).set_(base)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    if first.dtype.is_floating_point:  # no NaN/inf patterns: bitwise equality is then plain equality too
        for view in caches.values():
            view.copy_(torch.randn(view.shape, generator=torch.Generator().manual_seed(1)).to(view.dtype))
    return kcc, caches


def page_bytes(cache: torch.Tensor, page: int) -> bytes:
    return cache[page].contiguous().view(torch.uint8).numpy().tobytes()


def connector(config, kcc, role=KVConnectorRole.WORKER) -> KVStoreConnector:
    return KVConnectorFactory.create_connector(config, role, kcc)


def save_then_load(tmp_path: Path, make, src_ids, dst_ids, tokens, start, end, names=LAYER_NAMES):
    """A worker saves ``tokens`` from ``src_ids``; another (sharing a files tier) loads ``[start, end)`` into
    ``dst_ids``. Returns (source caches, destination caches before, after, the loader's errors)."""
    files = str(tmp_path / "files")
    config_a, kcc_a, src = make({"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB", "files_dir": files}, 0)
    config_b, kcc_b, dst = make({"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB", "files_dir": files}, 1)
    saver, loader = connector(config_a, kcc_a), connector(config_b, kcc_b)
    try:
        saver.register_kv_caches(src)
        loader.register_kv_caches(dst)
        saver.bind_connector_metadata(KVStoreConnectorMetadata(saves=[SaveSpec("s", tokens, None, (src_ids,))]))
        saver.wait_for_save()
        assert saver.store.flush(30)
        before = {n: t.clone() for n, t in dst.items()}
        loader.bind_connector_metadata(KVStoreConnectorMetadata(loads=[LoadSpec("l", tokens, None, (dst_ids,),
                                                                                start, end)]))
        loader.start_load_kv(EAGER_STEP)
        for name in names:
            loader.wait_for_layer_load(name)
        loader.wait_for_save()
        return src, before, dst, loader.get_block_ids_with_load_errors()
    finally:
        saver.shutdown()
        loader.shutdown()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_caches_vllm_allocates_round_trip_byte_exact(tmp_path, layout, kind):
    dtype = torch.uint8 if kind == "fp8" else torch.bfloat16

    def make(extra, seed):
        config = make_config(write_model(tmp_path / "model"), extra, dtype="bfloat16",
                             cache_dtype="fp8" if kind == "fp8" else "auto", layout=layout)
        spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=dtype)
        kcc, caches = vllm_caches(config, spec)
        if seed:  # the loader's caches hold other bytes
            for view in caches.values():
                view.view(torch.uint8).bitwise_xor_(0x5A)
        return config, kcc, caches
    tokens = prompt(90, seed=2)
    src_ids, dst_ids = [3, 9, 1, 30, 12, 7], [40, 2, 17, 5, 22, 60]
    src, before, dst, errors = save_then_load(tmp_path, make, src_ids, dst_ids, tokens, 16, 80)
    assert errors == set()
    for name in LAYER_NAMES:
        for i in range(1, 5):  # pages of tokens [16, 80): the source's bytes
            assert page_bytes(dst[name], dst_ids[i]) == page_bytes(src[name], src_ids[i]), (name, i)
        for page in set(range(NUM_BLOCKS)) - set(dst_ids[1:5]):  # every other page untouched
            assert page_bytes(dst[name], page) == page_bytes(before[name], page)


def test_mla_latent_caches_round_trip_byte_exact(tmp_path):
    def make(extra, seed):
        config = make_config(write_model(tmp_path / "model"), extra, dtype="bfloat16")
        spec = MLAAttentionSpec(block_size=PAGE, num_kv_heads=1, head_size=72, dtype=torch.bfloat16)
        kcc, caches = vllm_caches(config, spec)
        if seed:
            for view in caches.values():
                view.mul_(-1)
        return config, kcc, caches
    tokens = prompt(64, seed=3)
    src, before, dst, errors = save_then_load(tmp_path, make, [1, 2, 3, 4], [10, 11, 12, 13], tokens, 0, 48)
    assert errors == set()
    assert dst[LAYER_NAMES[0]].shape[1:] == (1, PAGE, 72)  # one latent "head" of 72 elements
    for name in LAYER_NAMES:
        for s, d in zip([1, 2, 3], [10, 11, 12]):
            assert page_bytes(dst[name], d) == page_bytes(src[name], s)
        assert page_bytes(dst[name], 13) == page_bytes(before[name], 13)


def test_eagle_draft_layers_are_stored_beside_the_models(tmp_path):
    names = LAYER_NAMES + [f"model.layers.{LAYERS}.self_attn.attn"]  # an EAGLE head's layer after the model's

    def make(extra, seed):
        config = make_config(write_model(tmp_path / "model"), extra, dtype="bfloat16")
        spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=torch.bfloat16)
        kcc, caches = vllm_caches(config, spec, names)
        if seed:
            for view in caches.values():
                view.mul_(-1)
        return config, kcc, caches
    tokens = prompt(64, seed=4)
    src, _, dst, errors = save_then_load(tmp_path, make, [1, 2, 3, 4], [5, 6, 7, 8], tokens, 0, 48, names)
    assert errors == set()
    for name in names:
        assert all(page_bytes(dst[name], d) == page_bytes(src[name], s) for s, d in [(1, 5), (2, 6), (3, 7)])


def test_kernel_pages_smaller_than_vllm_blocks(tmp_path):
    """vLLM may split a 16-token block into kernel pages of 8: block b is pages 2b and 2b+1."""
    def make(extra, seed):
        config = make_config(write_model(tmp_path / "model"), extra, dtype="float32")
        gen = torch.Generator().manual_seed(seed)
        raw = torch.randn(LAYERS, 2 * NUM_BLOCKS, PAGE // 2, KV_HEADS, 2 * HEAD_DIM, generator=gen)
        return config, None, {name: raw[i].permute(0, 2, 1, 3) for i, name in enumerate(LAYER_NAMES)}
    tokens = prompt(64, seed=5)
    src, _, dst, errors = save_then_load(tmp_path, make, [1, 2, 3, 4], [9, 8, 7, 6], tokens, 0, 64)
    assert errors == set()
    for name in LAYER_NAMES:
        for s, d in zip([1, 2, 3], [9, 8, 7]):  # the last page is the request's tail, loaded too
            assert torch.equal(dst[name][2 * d:2 * d + 2], src[name][2 * s:2 * s + 2])


def test_hybrid_cache_config_starts_with_hma(tmp_path):
    """vLLM keeps its hybrid allocator on with kvstore (``SupportsHMA``); stored layers of different shapes
    and attention-free models start and store nothing (``test_vllm_hybrid.py`` serves hybrid models)."""
    config = make_config(write_model(tmp_path / "model"), {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB"})
    full = FullAttentionSpec(block_size=PAGE, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=torch.float32)
    window = SlidingWindowSpec(block_size=PAGE, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=torch.float32,
                               sliding_window=32)
    kcc = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                        kv_cache_groups=[KVCacheGroupSpec([LAYER_NAMES[0]], full),
                                         KVCacheGroupSpec([LAYER_NAMES[1]], window)])
    assert supports_hma(KVStoreConnector)
    scheduler = connector(config, kcc, KVConnectorRole.SCHEDULER)
    try:
        request = make_request("h", prompt(100, seed=6))
        scheduler.on_new_request(request)
        finished = scheduler.request_finished_all_groups(request, ([1, 2], [3]))
        assert finished == (False, None)  # saves are handed over within their step: vLLM frees at once
    finally:
        scheduler.shutdown()
    worker = connector(config, kcc)
    try:  # layers that cannot be stored in one layout: recomputed, never an error at start
        worker.register_kv_caches({LAYER_NAMES[0]: torch.zeros(NUM_BLOCKS, KV_HEADS, PAGE, 2 * HEAD_DIM),
                                   LAYER_NAMES[1]: torch.zeros(NUM_BLOCKS, 3, 7)})
        assert worker.store is None
        worker.bind_connector_metadata(KVStoreConnectorMetadata())
        worker.start_load_kv(EAGER_STEP)
        worker.wait_for_save()
        assert worker.get_finished(set()) == (None, None)
    finally:
        worker.shutdown()
    empty = connector(config, None)  # an attention-free model registers no cache at all
    try:
        empty.register_kv_caches({})
        assert empty.store is None
    finally:
        empty.shutdown()


def test_one_token_left_loads_before_the_forward(tmp_path):
    """A fully stored prompt leaves vLLM one token: a uniform-decode batch that replays a FULL CUDA graph,
    in which wait_for_layer_load never runs. The load must be complete when start_load_kv returns."""
    engine = Engine(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB"})
    try:
        tokens = prompt(65, seed=7)  # 64 stored tokens + 1 computed
        engine.serve("a", tokens)
        request = make_request("b", tokens)
        engine.add(request)
        out = engine.scheduler.schedule()
        meta = out.kv_connector_metadata
        assert [(s.start, s.end, s.eager) for s in meta.loads] == [(0, 64, True)]
        worker = engine.worker
        worker.bind_connector_metadata(meta)
        worker.start_load_kv(FULL_GRAPH_STEP)
        # no wait_for_layer_load: what a FULL graph replay does
        ids = out.scheduled_new_reqs[0].block_ids[0]
        assert torch.equal(read_tokens(engine.caches, ids, 0, 64), true_kv(tokens, 0, 64))
        worker.wait_for_save()
        worker.clear_connector_metadata()
    finally:
        engine.close()


def test_any_load_completes_before_a_full_graph_forward(tmp_path):
    engine = Engine(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB"})
    try:
        tokens = prompt(100, seed=8)
        engine.serve("a", tokens)
        worker = engine.worker
        ids = list(range(20, 27))
        worker.bind_connector_metadata(KVStoreConnectorMetadata(loads=[LoadSpec("x", tokens[:96], None, (ids,), 0,
                                                                                96)]))
        worker.start_load_kv(FULL_GRAPH_STEP)
        assert torch.equal(read_tokens(engine.caches, ids, 0, 96), true_kv(tokens, 0, 96))
        worker.wait_for_save()
        worker.clear_connector_metadata()
    finally:
        engine.close()


def test_a_load_is_complete_before_model_runner_v2_replays_a_full_graph(tmp_path):
    """vLLM 0.33's default model runner (V2) starts a FULL-graph step's sync loads in its own pre_forward,
    outside any forward context (in a stand-in of mode NONE): they were left for wait_for_layer_load, which
    the replay never calls, and the forward read pages the load had not filled. Driven through V2's real
    ActiveKVConnector, as its execute_model calls it before run_fullgraph."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.worker.gpu.kv_connector import ActiveKVConnector
    engine = Engine(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB"})
    try:
        tokens = prompt(100, seed=11)
        engine.serve("a", tokens)
        engine.add(make_request("b", tokens))
        out = engine.scheduler.schedule()
        assert [(s.start, s.end, s.eager, s.is_async) for s in out.kv_connector_metadata.loads] == \
            [(0, 96, False, False)]  # not a one-token remainder: nothing but the graph's mode finishes it
        ids = out.scheduled_new_reqs[0].block_ids[0]
        write_tokens(engine.caches, ids, 0, torch.zeros_like(true_kv(tokens, 0, 96)))
        runner = ActiveKVConnector.__new__(ActiveKVConnector)  # its __init__ asks vLLM's global transfer group
        runner.vllm_config, runner.kv_connector = engine.config, engine.worker
        runner._pending_load_kwargs, runner._disabled = None, False
        with set_current_vllm_config(engine.config):
            runner.pre_forward(out, None, attn_metadata={})
        assert torch.equal(read_tokens(engine.caches, ids, 0, 96), true_kv(tokens, 0, 96))
        engine.worker.wait_for_save()
        engine.worker.clear_connector_metadata()
    finally:
        engine.close()


def with_image(tokens: list[int], identifier: str, offset: int, length: int):
    request = make_request(f"img-{identifier}-{offset}", tokens)
    request.mm_features = [MultiModalFeatureSpec(data=None, modality="image", identifier=identifier,
                                                 mm_position=PlaceholderRange(offset=offset, length=length))]
    return request


def test_images_with_the_same_placeholders_do_not_share_kv(tmp_path):
    engine = Engine(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB"})
    try:
        text = prompt(40, seed=9)
        tokens = text + [999] * 40 + prompt(20, seed=10)  # placeholder ids 999 at [40, 80)
        a = with_image(tokens, "image-A", 40, 40)
        ids = list(range(10, 17))
        write_tokens(engine.caches, ids, 0, true_kv(tokens, 0, len(tokens)))  # the forward of request a
        keys = key_tokens(a)
        assert keys[:40] == tokens[:40] and keys[80:] == tokens[80:] and all(k >= 1 << 31 for k in keys[40:80])
        worker = engine.worker
        worker.bind_connector_metadata(KVStoreConnectorMetadata(saves=[SaveSpec("a", keys, request_salt(a),
                                                                                (ids,))]))
        worker.wait_for_save()
        worker.clear_connector_metadata()
        sched = engine.connector
        same = with_image(list(tokens), "image-A", 40, 40)
        other = with_image(list(tokens), "image-B", 40, 40)
        assert sched.get_num_new_matched_tokens(same, 0) == (96, False)
        assert sched.get_num_new_matched_tokens(other, 0) == (32, False)  # the text before the image only
        text_only = make_request("t", list(tokens))
        assert sched.get_num_new_matched_tokens(text_only, 0) == (32, False)
        moved = with_image(list(tokens), "image-A", 44, 36)  # the same image at another place
        assert sched.get_num_new_matched_tokens(moved, 0) == (32, False)
    finally:
        engine.close()


def test_scheduler_counts_each_hit_once_and_equal_to_tokens_loaded(tmp_path):
    engine = Engine(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB"})
    taken = []
    real = engine.connector.get_kv_connector_stats

    def spy():  # vLLM's scheduler drains its connector's stats each step: keep a copy of what it took
        stats = real()
        if stats is not None:
            taken.append(dict(stats.data))
        return stats
    engine.connector.get_kv_connector_stats = spy
    loaded = 0
    try:
        shared = prompt(96, seed=11)
        engine.serve("a", shared + [1])
        loaded += sum(engine.worker.get_kv_connector_stats().data.get("loaded_tokens", 0) for _ in [0])
        for i in range(3):
            engine.serve(f"b{i}", shared + [2 + i] * (i + 1))
            loaded += engine.worker.get_kv_connector_stats().data.get("loaded_tokens", 0)
    finally:
        engine.close()
    hit = sum(d.get("hit_tokens", 0) for d in taken)
    lookups = sum(d.get("lookups", 0) for d in taken)
    assert hit == loaded == 3 * 96
    assert lookups == 4  # one per admitted request, however many times vLLM asked


def test_saved_blocks_are_reported_as_kv_events(tmp_path):
    engine = Engine(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB"})
    try:
        tokens = prompt(70, seed=12)
        engine.add(make_request("a", tokens))
        engine.run("a")
        request = engine.requests["a"]
        events = engine.worker.get_kv_connector_kv_cache_events()
        assert events is not None
        engine.connector.update_connector_output(KVConnectorOutput(kv_cache_events=events))
        taken = list(engine.connector.take_events())
        stored = [e for e in taken if isinstance(e, BlockStored)]
        assert stored and stored[0].block_hashes == [maybe_convert_block_hash(h)  # as vLLM publishes its own
                                                     for h in request.block_hashes[:70 // PAGE]]
        assert stored[0].token_ids == tokens[:70 // PAGE * PAGE] and stored[0].block_size == PAGE
        assert stored[0].parent_block_hash is None
        assert list(engine.connector.take_events()) == []  # drained
    finally:
        engine.close()


def test_kv_events_of_an_image_prompt_carry_its_token_ids_and_vllms_extra_keys(tmp_path):
    """An image prompt's events carried kvstore's key words (2**31 and up) where the prompt has its
    placeholder ids, and no extra keys: a KV-aware router hashing ids and extra keys as vLLM's own events
    give them never matched these blocks."""
    from vllm.config import KVEventsConfig
    from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys, to_event_extra_keys

    def publish_events(config) -> None:
        config.kv_events_config = KVEventsConfig(enable_kv_cache_events=True)
    engine = Engine(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB"}, configure=publish_events)
    try:
        tokens = prompt(40, seed=9) + [999] * 40 + prompt(20, seed=10)  # placeholder ids 999 at [40, 80)
        request = with_image(tokens, "image-A", 40, 40)
        request.cache_salt = "tenant"
        half = engine.connector.scheduler
        state = half._state(request)
        state.block_ids = [list(range(10, 17))]
        spec = half._save_spec("a", state, 0, len(tokens))
        write_tokens(engine.caches, state.block_ids[0], 0, true_kv(tokens, 0, len(tokens)))  # its forward
        worker = engine.worker
        worker.bind_connector_metadata(KVStoreConnectorMetadata(saves=[spec]))
        worker.wait_for_save()
        worker.clear_connector_metadata()
        stored = [e for e in worker.get_kv_connector_kv_cache_events().get_all_events()
                  if isinstance(e, BlockStored)]
        pages = 96 // PAGE  # the saved store blocks: three of 32 tokens
        assert [h for e in stored for h in e.block_hashes] == [maybe_convert_block_hash(h)
                                                               for h in request.block_hashes[:pages]]
        assert [t for e in stored for t in e.token_ids] == tokens[:pages * PAGE]  # the ids, 999 included
        mm_index, expected = 0, []
        for page in range(pages):
            keys, mm_index = generate_block_hash_extra_keys(request, page * PAGE, (page + 1) * PAGE, mm_index)
            expected.append(keys)
        assert [k for e in stored for k in e.extra_keys] == to_event_extra_keys(expected)
        assert stored[0].extra_keys[0] == ("tenant",) and stored[0].extra_keys[2][0][0] == "image-A"
    finally:
        engine.close()


def test_prometheus_metrics_register_and_move(tmp_path):
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    del PrometheusStatLogger  # the real logger calls build_prom_metrics with prometheus_client's classes
    import prometheus_client
    config = make_config(write_model(tmp_path / "model"), {"block_tokens": BLOCK_TOKENS})
    registry = CollectorRegistry()

    def bound(cls):
        return lambda *a, **k: cls(*a, registry=registry, **k)
    metric_types = {prometheus_client.Counter: bound(prometheus_client.Counter),
                    prometheus_client.Gauge: bound(prometheus_client.Gauge),
                    prometheus_client.Histogram: bound(prometheus_client.Histogram)}
    prom = KVStoreConnector.build_prom_metrics(config, metric_types, ["model_name", "engine"],
                                               {0: ["m", "0"]})
    assert isinstance(prom, KVConnectorPromMetrics)
    stats = KVStoreConnector.build_kv_connector_stats()
    stats.record_lookup(100, 0, 0.001)
    stats.add("hit_tokens", 64)
    stats.record_transfer("load", 64, 64 * 1024, 0.002)
    prom.observe(stats.data, 0)
    text = generate_latest(registry).decode()
    assert 'kvstore_hit_tokens_total{engine="0",model_name="m"} 64.0' in text.replace("vllm:", ""), text[:2000]


def test_prefill_steps_teach_the_planner_the_engines_speed(tmp_path):
    """The load-vs-recompute planner needs the engine's prefill throughput: a step that computes many tokens
    (and loads none) is reported to it; a decode step is not."""
    engine = Engine(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB"})
    try:
        planner = engine.worker.store.hooks.planner
        assert planner.prefill_tokens_per_second == 0.0
        engine.add(make_request("small", prompt(40, seed=13)))
        engine.run("small")
        assert planner.prefill_tokens_per_second == 0.0  # 40 tokens: not a prefill sample
        engine.add(make_request("big", prompt(600, seed=14)))
        engine.run("big")
        assert planner.prefill_tokens_per_second > 0.0
    finally:
        engine.close()


def test_sleep_mode_forgets_what_was_saved_under_the_old_weights(tmp_path):
    """vLLM's sleep mode may load other weights before waking (RLHF does): after it nothing saved before is
    served, and while asleep nothing is served or saved."""
    engine = Engine(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB"})
    try:
        tokens = prompt(70, seed=15)
        engine.serve("a", tokens)
        sched = engine.connector
        assert sched.get_num_new_matched_tokens(make_request("b", tokens), 0) == (64, False)
        engine.worker.unregister_kv_caches()
        assert sched.get_num_new_matched_tokens(make_request("c", tokens), 0) == (0, False)
        engine.worker.restore_kv_caches()
        assert sched.get_num_new_matched_tokens(make_request("d", tokens), 0) == (0, False)
        engine.serve("e", tokens)  # computed and saved again, under the new weights
        assert sched.get_num_new_matched_tokens(make_request("f", tokens), 0) == (64, False)
    finally:
        engine.close()


def test_a_second_engine_with_the_same_engine_id_starts_and_misses(tmp_path):
    """Two engines given one engine_id (a copied kv-transfer-config): the second cannot serve lookups on the
    first's socket; it starts anyway, its scheduler gets misses at worst, never an error or the other's bytes."""
    engine = Engine(tmp_path / "a", {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB"})
    try:
        config = make_config(write_model(tmp_path / "model-b"), {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB"})
        config.kv_transfer_config.engine_id = engine.config.kv_transfer_config.engine_id
        twin = connector(config, kv_cache_config())
        try:
            twin.register_kv_caches(paged_caches(seed=5))
            assert twin.worker.server is None and twin.store is not None
            tokens = prompt(70, seed=16)
            engine.serve("a", tokens)
            assert engine.connector.get_num_new_matched_tokens(make_request("b", tokens), 0) == (64, False)
        finally:
            twin.shutdown()
    finally:
        engine.close()


@pytest.mark.parametrize("role", ["kv_producer", "kv_consumer"])
def test_producer_only_saves_and_consumer_only_loads(tmp_path, role):
    engine = Engine(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB"})
    try:
        tokens = prompt(70, seed=17)
        engine.serve("a", tokens)  # saved by the kv_both engine
        config = make_config(write_model(tmp_path / "model"), {"block_tokens": BLOCK_TOKENS})
        config.kv_transfer_config.kv_role = role
        config.kv_transfer_config.engine_id = engine.config.kv_transfer_config.engine_id  # asks engine's worker
        config.cache_config.num_gpu_blocks = NUM_BLOCKS
        scheduler = Scheduler(vllm_config=config, kv_cache_config=kv_cache_config(), log_stats=True,
                              structured_output_manager=StructuredOutputManager(config), block_size=PAGE)
        try:
            scheduler.add_request(make_request("b", tokens))
            out = scheduler.schedule()
            loaded = out.scheduled_new_reqs[0].num_computed_tokens
            assert loaded == (64 if role == "kv_consumer" else 0)
            meta = out.kv_connector_metadata
            assert len(meta.loads) == (1 if role == "kv_consumer" else 0)
            assert len(meta.saves) == (1 if role == "kv_producer" else 0)
        finally:
            scheduler.connector.shutdown()
    finally:
        engine.close()


def test_prefill_is_timed_over_the_forward_even_when_loads_start_after_it(tmp_path):
    """With no sync load in a step, vLLM calls start_load_kv after the forward: the planner must still learn
    the forward's time (timing from start_load_kv measured ~0 s, judged prefill free and refused every load)."""
    engine = Engine(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB"})
    try:
        worker, planner = engine.worker, engine.worker.store.hooks.planner
        worker.bind_connector_metadata(KVStoreConnectorMetadata(step_tokens=1000))
        import time
        time.sleep(0.25)  # the forward
        worker.start_load_kv(EAGER_STEP)
        worker.wait_for_save()
        worker.clear_connector_metadata()
        assert 0 < planner.prefill_tokens_per_second <= 1000 / 0.25  # the 0.25 s forward counted
    finally:
        engine.close()
