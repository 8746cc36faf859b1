"""The vLLM connector against vLLM 0.33's real Scheduler and worker-side API, on CPU.

Scheduler side: a real ``Scheduler`` over a tiny local Llama config drives
the connector through requests sharing a prefix (sync and async loading),
with the worker connector fed CPU tensors in vLLM's paged layout and a
simulated forward pass that writes each token's KV. Worker side: blocks
saved by one worker connector are loaded byte-exact into other block ids by
another (sharing through a files tier); a failed load is reported. Two
processes with different ``PYTHONHASHSEED`` share hits through a files tier.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed: build its environment with scripts/engine-venvs.sh vllm")

from vllm.v1.core.kv_cache_manager import KVCacheBlocks  # noqa: E402
from vllm.v1.core.kv_cache_utils import KVCacheBlock  # noqa: E402
from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # noqa: E402
from vllm.v1.core.sched.output import SchedulerOutput  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402
from vllm.v1.request import RequestStatus  # noqa: E402

from conftest import run_python  # noqa: E402
from kvstore.integrations.vllm import KVStoreConnectorMetadata, LoadSpec, SaveSpec, request_salt  # noqa: E402
from vllm_env import (EAGER_STEP, BLOCK_TOKENS, LAYER_NAMES, NUM_BLOCKS, PAGE, Engine, kv_cache_config,  # noqa: E402
                      make_request, paged_caches, prompt, read_tokens, true_kv, worker, write_tokens)


@pytest.mark.parametrize("async_load", [False, True], ids=["sync", "async"])
def test_second_request_is_served_the_shared_prefix(tmp_path, async_load):
    engine = Engine(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB", "async_load": async_load})
    try:
        shared = prompt(80, seed=1)
        first, second = shared + prompt(20, seed=2), shared + prompt(21, seed=3)
        out = engine.serve("r1", first)  # r1 finishes (max_tokens=1); its prompt was saved in its prefill step
        assert out.scheduled_new_reqs[0].num_computed_tokens == 0

        engine.add(make_request("r2", second))
        out = engine.run("r2")
        new = out.scheduled_new_reqs[0]
        # kvstore holds blocks [0, 32) and [32, 64) of the shared 80 tokens; [64, 96) differs from token 80 on
        assert new.num_computed_tokens == 64
        assert out.num_scheduled_tokens["r2"] == len(second) - 64
        assert torch.equal(read_tokens(engine.caches, new.block_ids[0], 0, 64), true_kv(second, 0, 64))
        assert not engine.invalid

        # the same prompt again: its partial tail is stored too, but vLLM must compute at least one token
        engine.step()
        assert engine.scheduler.reset_prefix_cache()
        engine.add(make_request("r2b", list(second)))
        out = engine.run("r2b")
        assert out.scheduled_new_reqs[0].num_computed_tokens == (len(second) - 1) // PAGE * PAGE

        # another cache_salt: nothing from kvstore (and no local hit: vLLM salts its own hashes too)
        engine.step()
        assert engine.scheduler.reset_prefix_cache()
        salted = make_request("r3", list(second), cache_salt="tenant-b")
        assert engine.connector.get_num_new_matched_tokens(salted, 0) == (0, False)
        engine.add(salted)
        out = engine.run("r3")
        assert out.scheduled_new_reqs[0].num_computed_tokens == 0
        stats = engine.worker.get_kv_connector_stats()
        assert stats.data["saves"] >= 2 and stats.data["loaded_tokens"] >= 64 + 96
        # the scheduler drains its connector's stats itself (update_from_output): they were taken
        assert engine.connector.get_kv_connector_stats() is None
        assert engine.connector.store is None  # the scheduler opens no store: it asks the worker's
    finally:
        engine.close()


def test_async_lookup_answers_at_once_then_waits_for_remote_kvs(tmp_path):
    engine = Engine(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB", "async_load": True})
    try:
        tokens = prompt(70, seed=4)
        engine.serve("a", tokens)
        request = make_request("b", tokens + [5])
        answers = [engine.connector.get_num_new_matched_tokens(request, 0) for _ in range(50)]
        assert answers == [(64, True)] * 50  # retries while a request waits reuse the first answer
        engine.add(request)
        engine.step()
        assert request.status in (RequestStatus.WAITING_FOR_REMOTE_KVS, RequestStatus.RUNNING)
        out = engine.run("b")
        assert out.scheduled_new_reqs[0].num_computed_tokens == 64
    finally:
        engine.close()


def test_failed_load_makes_vllm_recompute(tmp_path):
    engine = Engine(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB"})
    try:
        tokens = prompt(70, seed=5)
        engine.serve("a", tokens)
        request = make_request("b", tokens + [5])
        engine.add(request)
        real_load = engine.worker.store.load

        def short_load(tokens, salt=None, **kwargs):  # the second block vanished after the lookup
            return real_load(tokens[:BLOCK_TOKENS], salt, **kwargs)
        engine.worker.store.load = short_load
        try:
            out = engine.step()
        finally:
            del engine.worker.store.load
        new = out.scheduled_new_reqs[0]
        assert new.num_computed_tokens == 64
        assert engine.invalid == {new.block_ids[0][2], new.block_ids[0][3]}
        assert request.num_computed_tokens <= BLOCK_TOKENS  # rescheduled from the first failed block
    finally:
        engine.close()


def test_a_load_falling_short_in_the_step_that_completes_the_prompt_saves_only_the_recomputed_kv(tmp_path):
    """A block evicted between the lookup and the load, in the step that also computes the prompt's last
    tokens: that step's save stored the pages the load never filled (and tokens computed over them), and a
    later request was served them. Now the step saves nothing of it, and the recomputed prompt is saved."""
    engine = Engine(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB"})
    try:
        tokens = prompt(70, seed=5)
        engine.serve("a", tokens)
        for cache in engine.caches.values():
            cache.normal_()  # freed pages hold other requests' KV now
        longer = tokens + [5]
        engine.add(make_request("b", longer))
        out = engine.scheduler.schedule()  # 64 tokens to load, [64, 71) computed in the same step
        store = engine.worker.worker.store
        assert store.host.delete(store.block_keys(longer)[1].key)  # [32, 64) evicted before the worker loads
        engine.execute(out)
        assert out.scheduled_new_reqs[0].num_computed_tokens == 64 and engine.invalid
        assert engine.worker.get_kv_connector_stats().data["save_skipped_after_load_error"] == 1
        for _ in range(5):
            engine.step()
        assert engine.scheduler.reset_prefix_cache()
        for cache in engine.caches.values():
            cache.normal_()
        engine.add(make_request("c", list(longer)))
        new = engine.run("c").scheduled_new_reqs[0]
        assert new.num_computed_tokens == 64  # the recomputed prompt was saved
        assert torch.equal(read_tokens(engine.caches, new.block_ids[0], 0, 64), true_kv(longer, 0, 64))
    finally:
        engine.close()


def test_an_async_load_failing_after_it_began_is_recomputed_not_served(tmp_path):
    """A failure in the async load's thread after the load began (on CUDA, the stream's synchronize: here the
    copy engine raising) escaped into its future: vLLM was told the request's load finished and no block
    failed, and computed on pages the load never filled. Its blocks are now reported failed, and the request
    is not offered the same load again (vLLM rescheduled it for ever)."""
    engine = Engine(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB", "async_load": True})
    try:
        tokens = prompt(70, seed=8)
        engine.serve("a", tokens)
        for cache in engine.caches.values():
            cache.normal_()  # the freed pages hold other KV now
        copies = engine.worker.worker.engine
        attempts = []

        def broken(job):
            attempts.append(job)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        copies.load_now = broken
        request = tokens + [5]
        engine.add(make_request("b", request))
        out = engine.run("b")
        new = out.scheduled_new_reqs[0]
        assert len(attempts) == 1
        assert new.num_computed_tokens == 0 and out.num_scheduled_tokens["b"] == len(request)
        assert torch.equal(read_tokens(engine.caches, new.block_ids[0], 0, len(request)),
                           true_kv(request, 0, len(request)))
        assert engine.worker.get_kv_connector_stats().data["load_error_blocks"] == 4
    finally:
        engine.close()


def test_an_aborted_request_whose_async_load_vllm_deferred_frees_its_blocks(tmp_path):
    """Under async scheduling vLLM may defer an async load's ``update_state_after_alloc`` to
    ``update_from_output`` (``defer_async_loads``); a client abort before the next step dropped that load
    unsent, while vLLM kept the request's blocks until the worker reported it finished: held for ever."""
    def async_scheduling(config) -> None:
        config.scheduler_config.async_scheduling = True
    engine = Engine(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB", "async_load": True},
                    configure=async_scheduling)
    engine.connector.shutdown()
    engine.scheduler = AsyncScheduler(vllm_config=engine.config, kv_cache_config=kv_cache_config(), log_stats=True,
                                      structured_output_manager=StructuredOutputManager(engine.config),
                                      block_size=PAGE)
    engine.connector = engine.scheduler.connector
    try:
        tokens = prompt(70, seed=9)
        engine.serve("a", tokens)
        free = engine.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
        engine.scheduler.defer_async_loads = True  # as vLLM sets it for HiSparse under async scheduling
        engine.add(make_request("r", prompt(20, seed=10), max_tokens=50))
        first = engine.scheduler.schedule()
        engine.add(make_request("x", tokens + [5]))
        second = engine.scheduler.schedule()  # admits x while the first batch is in flight: its load waits
        assert "x" in engine.scheduler.deferred_loads
        engine.execute(first)  # the first batch's output starts x's load (update_state_after_alloc)
        engine.scheduler.finish_requests(["x", "r"], RequestStatus.FINISHED_ABORTED)  # the clients went away
        engine.execute(second)
        for _ in range(200):
            if not engine.scheduler.requests:
                break
            engine.step()
            time.sleep(0.005)
        assert not engine.scheduler.requests
        assert engine.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == free
    finally:
        engine.close()


def test_a_preempted_request_is_not_blamed_for_its_old_blocks_and_a_promised_load_always_goes_out(tmp_path):
    """A request kept the block ids of its last load after preemption gave them back: another request's
    failed load naming a reused id marked it failed; and if vLLM had deferred its next admission's
    ``update_state_after_alloc``, that load was never sent while vLLM waited for its report for ever."""
    engine = Engine(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB", "async_load": True})
    try:
        tokens = prompt(70, seed=11)
        engine.serve("a", tokens)
        half = engine.connector.scheduler
        x = make_request("x", tokens + [5])

        def admit(first_block: int) -> int:
            hit, _ = engine.connector.get_num_new_matched_tokens(x, 0)
            blocks = KVCacheBlocks(([KVCacheBlock(block_id=first_block + i) for i in range(5)],))
            engine.connector.update_state_after_alloc(x, blocks, hit)
            return hit

        assert admit(10) == 64
        meta = engine.connector.build_connector_meta(SchedulerOutput.make_empty())
        assert [load.req_id for load in meta.loads] == ["x"]
        preempted = SchedulerOutput.make_empty()
        preempted.preempted_req_ids = {"x"}
        engine.connector.build_connector_meta(preempted)  # x gave its blocks back
        hit, _ = engine.connector.get_num_new_matched_tokens(x, 0)  # re-admitted; vLLM defers the alloc call
        engine.connector.update_connector_output(KVConnectorOutput(invalid_block_ids={12}))  # another's block 12
        assert not half._requests["x"].load_failed
        half.loads_failed(["x"])  # and even if x itself was reported failed in between
        engine.connector.update_state_after_alloc(x, KVCacheBlocks(([KVCacheBlock(block_id=20 + i)
                                                                      for i in range(5)],)), hit)
        meta = engine.connector.build_connector_meta(SchedulerOutput.make_empty())
        assert [load.req_id for load in meta.loads] == ["x"]  # the promised load goes out
    finally:
        engine.close()


# -- worker side ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["LBNHC", "LBHNC", "legacy"])
def test_saved_blocks_load_byte_exact_into_other_block_ids(tmp_path, kind):
    files = str(tmp_path / "files")
    saver = worker(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB", "files_dir": files})
    loader = worker(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "8MiB", "files_dir": files})
    try:
        tokens = prompt(90, seed=6)
        pages = -(-len(tokens) // PAGE)
        src_caches, dst_caches = paged_caches(kind, seed=1), paged_caches(kind, seed=2)
        saver.register_kv_caches(src_caches)
        loader.register_kv_caches(dst_caches)
        assert saver.store is not loader.store  # two stores sharing the files tier
        src_ids = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(7))[:pages].tolist()
        kv = true_kv(tokens, 0, len(tokens))
        write_tokens(src_caches, src_ids, 0, kv)
        saver.bind_connector_metadata(KVStoreConnectorMetadata(saves=[SaveSpec("s", tokens, "t", (src_ids,))]))
        saver.save_kv_layer(LAYER_NAMES[1], src_caches[LAYER_NAMES[1]], None)  # out of order; wait_for_save does 0
        saver.wait_for_save()
        saver.clear_connector_metadata()
        assert saver.store.flush(30)

        dst_ids = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(8))[:pages].tolist()
        before = {name: t.clone() for name, t in dst_caches.items()}
        spec = LoadSpec("l", tokens, "t", (dst_ids,), 16, 80)  # vLLM already holds [0, 16)
        loader.bind_connector_metadata(KVStoreConnectorMetadata(loads=[spec]))
        loader.start_load_kv(EAGER_STEP)
        for name in LAYER_NAMES:
            loader.wait_for_layer_load(name)
        loader.wait_for_save()
        assert loader.get_block_ids_with_load_errors() == set()
        assert torch.equal(read_tokens(dst_caches, dst_ids, 16, 80), kv[:, :, 16:80])
        untouched = read_tokens(before, dst_ids, 0, 16), read_tokens(dst_caches, dst_ids, 0, 16)
        assert torch.equal(*untouched)
        changed = torch.zeros(NUM_BLOCKS, dtype=torch.bool)
        changed[dst_ids[1:5]] = True
        for name in LAYER_NAMES:  # every other block of every layer is untouched
            assert torch.equal(dst_caches[name][~changed] if kind != "legacy" else dst_caches[name][:, ~changed],
                               before[name][~changed] if kind != "legacy" else before[name][:, ~changed])

        # a load the store cannot serve in full: the blocks from the first missing token on are reported
        other = tokens[:40] + [t + 1 for t in tokens[40:]]
        loader.bind_connector_metadata(KVStoreConnectorMetadata(loads=[LoadSpec("m", other, "t", (dst_ids,), 0, 80)]))
        loader.start_load_kv(EAGER_STEP)
        loader.wait_for_save()
        assert loader.get_block_ids_with_load_errors() == set(dst_ids[2:5])  # [32, 80): block 1 of kvstore missing
        assert loader.get_kv_connector_stats().data["load_error_blocks"] == 3
    finally:
        saver.shutdown()
        loader.shutdown()


def test_salt_names_cache_salt_and_lora():
    class Lora:
        lora_name = "adapter-a"

    class Req:
        cache_salt = "s"
        lora_request = Lora()
    assert request_salt(Req()) != request_salt(Req(), "x") != request_salt(type("R", (), {})())
    assert request_salt(type("R", (), {})()) is None


CHILD = """
import sys
import time
sys.path.insert(0, {here!r})
import vllm_env as t
from pathlib import Path
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from kvstore.integrations.vllm import KVStoreConnectorMetadata, LoadSpec, SaveSpec
tmp = Path({tmp!r})
extra = {{"block_tokens": t.BLOCK_TOKENS, "host_bytes": "4MiB", "files_dir": str(tmp / "files")}}
config = t.make_config(t.write_model(tmp / "model"), extra)
tokens = t.prompt(100, seed=9)
ids = list(range(7))
if {role!r} == "save":
    w = KVConnectorFactory.create_connector(config, KVConnectorRole.WORKER, t.kv_cache_config())
    caches = t.paged_caches()
    w.register_kv_caches(caches)
    t.write_tokens(caches, ids, 0, t.true_kv(tokens, 0, 100))
    w.bind_connector_metadata(KVStoreConnectorMetadata(saves=[SaveSpec("a", tokens, None, (ids,))]))
    w.wait_for_save()
    w.shutdown()
    print("saved", hash("kvstore"))
else:
    w = KVConnectorFactory.create_connector(config, KVConnectorRole.WORKER, t.kv_cache_config())
    caches = t.paged_caches(seed=3)
    w.register_kv_caches(caches)
    s = KVConnectorFactory.create_connector(config, KVConnectorRole.SCHEDULER, t.kv_cache_config())
    n, is_async = s.get_num_new_matched_tokens(t.make_request("b", tokens), 0)
    w.bind_connector_metadata(KVStoreConnectorMetadata(loads=[LoadSpec("b", tokens, None, (ids,), 0, n)]))
    w.start_load_kv(t.EAGER_STEP)
    w.wait_for_save()
    exact = bool((t.read_tokens(caches, ids, 0, n) == t.true_kv(tokens, 0, n)).all())
    print("hit", n, is_async, exact, w.get_block_ids_with_load_errors(), hash("kvstore"))
    s.shutdown()
    w.shutdown()
"""


def test_processes_with_different_hash_seeds_share_hits(tmp_path):
    here = str(Path(__file__).parent)
    saved = run_python(CHILD.format(here=here, tmp=str(tmp_path), role="save"),
                       env_extra={"PYTHONHASHSEED": "1"}, timeout=180)
    loaded = run_python(CHILD.format(here=here, tmp=str(tmp_path), role="load"),
                        env_extra={"PYTHONHASHSEED": "2"}, timeout=180)
    saved_hash = saved.strip().splitlines()[-1].split()[-1]
    words = loaded.strip().splitlines()[-1].split()
    assert words[:5] == ["hit", "96", "False", "True", "set()"], loaded
    assert words[5] != saved_hash  # the processes really hashed differently


def test_module_refuses_mla_and_bad_block_tokens(tmp_path):
    with pytest.raises(ValueError, match="block_tokens"):
        worker(tmp_path, {"block_tokens": 24})
    with pytest.raises(ValueError, match="unknown setting"):
        worker(tmp_path, {"no_such_setting": 1})


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.parametrize("role", ["WORKER", "SCHEDULER"])
def test_the_fail_load_policy_is_refused_at_start_up_where_the_connector_loads(tmp_path, role):
    """vLLM's default ``kv_load_failure_policy`` ("fail") turns a block evicted between lookup and load into a
    failed user request; the connector says so at start-up instead."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm_env import kv_cache_config, make_config, write_model
    config = make_config(write_model(tmp_path / "model"), {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB"},
                         failure_policy="fail")
    with pytest.raises(ValueError, match="kv_load_failure_policy: expected 'recompute'.*got 'fail'"):
        KVConnectorFactory.create_connector(config, getattr(KVConnectorRole, role), kv_cache_config())
    config.kv_transfer_config.kv_role = "kv_producer"  # a producer never loads: any policy is fine
    KVConnectorFactory.create_connector(config, getattr(KVConnectorRole, role), kv_cache_config()).shutdown()


def test_a_short_load_is_reported_in_the_step_that_used_it_with_a_drafter(tmp_path):
    """With speculative decoding vLLM 0.33 collects ``get_block_ids_with_load_errors`` when the target model's
    forward ends (``_get_kv_connector_output(defer_finalize=True)``), before the drafter's layers are waited
    for and before ``wait_for_save``. The blocks a load could not fill must be in that step's output, or vLLM
    samples from their stale pages. Driven through vLLM's own context manager, in its order."""
    from types import SimpleNamespace

    import vllm.distributed.kv_transfer.kv_transfer_state as kv_state
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.forward_context import set_forward_context
    from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin
    from vllm_env import HEAD_DIM, KV_HEADS, LAYERS, make_config, write_model

    draft = f"model.layers.{LAYERS}.self_attn.attn"  # an EAGLE head's layer after the model's
    names = LAYER_NAMES + [draft]

    def caches(seed: int) -> dict[str, torch.Tensor]:
        raw = torch.randn(len(names), 32, PAGE, KV_HEADS, 2 * HEAD_DIM, generator=torch.Generator().manual_seed(seed))
        return {n: raw[i].permute(0, 2, 1, 3) for i, n in enumerate(names)}

    extra = {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB", "files_dir": str(tmp_path / "files")}
    config = make_config(write_model(tmp_path / "model"), extra)
    saver = KVConnectorFactory.create_connector(config, KVConnectorRole.WORKER, None)
    loader = KVConnectorFactory.create_connector(config, KVConnectorRole.WORKER, None)
    agent = kv_state._KV_CONNECTOR_AGENT
    try:
        saver.register_kv_caches(caches(0))
        loader.register_kv_caches(caches(1))
        tokens = prompt(2 * BLOCK_TOKENS, seed=1)
        saver.bind_connector_metadata(KVStoreConnectorMetadata(saves=[SaveSpec("s", tokens, None, ([1, 2, 3, 4],))]))
        saver.wait_for_save()
        saver.clear_connector_metadata()
        assert saver.store.flush(30)
        saver.store.files.delete(saver.store.block_keys(tokens)[1].key)  # evicted between lookup and load

        meta = KVStoreConnectorMetadata(loads=[LoadSpec("r", tokens, None, ([10, 11, 12, 13],), 0, len(tokens))])
        output = SimpleNamespace(kv_connector_metadata=meta, has_sync_kv_loads=True, finished_req_ids=set())
        kv_state._KV_CONNECTOR_AGENT = loader
        with set_forward_context(None, config):
            with KVConnectorModelRunnerMixin._get_kv_connector_output(output, defer_finalize=True) as kv_out:
                for name in LAYER_NAMES:  # the target model's attention layers
                    loader.wait_for_layer_load(name)
            reported = set(kv_out.invalid_block_ids)  # goes out with this step's sampled tokens
            loader.wait_for_layer_load(draft)  # the drafter's forward
            KVConnectorModelRunnerMixin.finalize_kv_connector()
        assert reported == {12, 13}
        assert loader.get_block_ids_with_load_errors() == set()  # told once
    finally:
        kv_state._KV_CONNECTOR_AGENT = agent
        saver.shutdown()
        loader.shutdown()


def test_an_eagle_drafter_is_offered_a_hit_less_its_last_page(tmp_path):
    """An EAGLE layer's KV at a position is computed from the token after it: a stored block's last position
    holds the writer's next token's mark, which the block's key does not cover. vLLM's own prefix cache drops
    the last block of a hit for it; the connector offered the whole hit (32 tokens here, not 16)."""
    from vllm_env import with_eagle_drafter
    engine = Engine(tmp_path, {"block_tokens": 32, "host_bytes": "4MiB"}, configure=with_eagle_drafter)
    try:
        assert engine.config.speculative_config.use_eagle_block_drop()
        shared = prompt(32, seed=1)
        engine.serve("A", shared + prompt(16, seed=2))
        new = engine.serve("B", shared + prompt(16, seed=3)).scheduled_new_reqs[0]
        assert new.num_computed_tokens == 32 - PAGE
    finally:
        engine.close()


def test_a_request_id_reused_after_it_finished_keeps_its_new_state(tmp_path):
    """vLLM reports a finished id in the next step's finished_req_ids; a new request of that id admitted by
    then (ids are the client's with VLLM_DISABLE_REQUEST_ID_RANDOMIZATION) lost its state to the old one's
    cleanup, and its chunked prompt was never saved (0 of 700 tokens stored; a fresh id stored 700)."""
    engine = Engine(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "16MiB"})
    try:
        engine.add(make_request("r1", prompt(100, seed=31)))
        engine.step()
        assert "r1" not in engine.scheduler.requests  # finished (one output token)
        long = prompt(700, seed=32)  # two chunks of the step budget
        engine.add(make_request("r1", long))
        for _ in range(4):
            engine.step()
        store = engine.worker.store
        assert store.flush(10)
        assert store.lookup(long) == 700 // BLOCK_TOKENS * BLOCK_TOKENS + 700 % BLOCK_TOKENS
        kv = store.get(long)
        assert torch.equal(kv, true_kv(long, 0, 700))
    finally:
        engine.close()


def test_a_lora_adapter_retrained_at_its_path_is_never_served_the_old_kv(tmp_path):
    """A request's keys named its adapter by name and path: retrained and saved to the same path, it was
    served the old adapter's KV from the tiers that outlive vLLM. The adapter's files are in the keys."""
    from vllm.lora.request import LoRARequest
    from kvstore.integrations.vllm import request_salt
    folder = tmp_path / "sql-adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"weights v1")
    request = make_request("a", prompt(40, seed=41))
    request.lora_request = LoRARequest("sql", 1, str(folder))
    before = request_salt(request)  # the keys its saves were made under
    (folder / "adapter_model.safetensors").write_bytes(b"weights v2, retrained")
    after = request_salt(request)
    assert before != after and "sql" in before and "sql" in after
