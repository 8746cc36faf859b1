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

import json
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed: build its environment with scripts/engine-venvs.sh vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.config import (CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig,  # noqa: E402
                         VllmConfig)
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

from conftest import run_python  # noqa: E402
from kvstore.integrations.vllm import (KVStoreConnector, KVStoreConnectorMetadata, LoadSpec,  # noqa: E402
                                       SaveSpec, request_salt)

PAGE = 16
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16
LAYER_NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
NUM_BLOCKS = 64
BLOCK_TOKENS = 32
MODULE = "kvstore.integrations.vllm"


def write_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
        "num_key_value_heads": KV_HEADS, "vocab_size": 1000, "max_position_embeddings": 2048,
        "torch_dtype": "float32", "rms_norm_eps": 1e-5}))
    return folder


def make_config(model: Path, extra: dict, failure_policy: str = "recompute") -> VllmConfig:
    cache = CacheConfig(block_size=PAGE, enable_prefix_caching=True)
    cache.kv_cache_layout = "LBNHC"
    return VllmConfig(
        model_config=ModelConfig(model=str(model), skip_tokenizer_init=True, dtype="float32", max_model_len=2048),
        scheduler_config=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=2048,
                                         is_encoder_decoder=False),
        cache_config=cache, device_config=DeviceConfig("cpu"),
        kv_transfer_config=KVTransferConfig(kv_connector="KVStoreConnector", kv_connector_module_path=MODULE,
                                            kv_role="kv_both", kv_connector_extra_config=extra,
                                            kv_load_failure_policy=failure_policy))


def kv_cache_config() -> KVCacheConfig:
    spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=torch.float32)
    return KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec(list(LAYER_NAMES), spec)])


def paged_caches(kind: str = "LBNHC", seed: int = 0) -> dict[str, torch.Tensor]:
    """vLLM 0.33 standardized per-layer views ``[B, H, page, 2D]`` (LBNHC / LBHNC storage), or the 5-D legacy layout."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "legacy":
        return {name: torch.randn(2, NUM_BLOCKS, PAGE, KV_HEADS, HEAD_DIM, generator=gen) for name in LAYER_NAMES}
    if kind == "LBNHC":
        raw = torch.randn(LAYERS, NUM_BLOCKS, PAGE, KV_HEADS, 2 * HEAD_DIM, generator=gen)
        return {name: raw[i].permute(0, 2, 1, 3) for i, name in enumerate(LAYER_NAMES)}
    raw = torch.randn(LAYERS, NUM_BLOCKS, KV_HEADS, PAGE, 2 * HEAD_DIM, generator=gen)
    return {name: raw[i] for i, name in enumerate(LAYER_NAMES)}


def true_kv(tokens: list[int], start: int, end: int) -> torch.Tensor:
    """The KV a model would compute for tokens ``[start, end)``: ``[L, 2, n, H, D]``, a function of the prefix."""
    out = []
    for t in range(start, end):
        seed = zlib.crc32(torch.tensor(tokens[:t + 1], dtype=torch.int64).numpy().tobytes())
        out.append(torch.randn(LAYERS, 2, KV_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(seed)))
    return torch.stack(out, dim=2) if out else torch.empty(LAYERS, 2, 0, KV_HEADS, HEAD_DIM)


def read_tokens(caches: dict[str, torch.Tensor], block_ids: list[int], start: int, end: int) -> torch.Tensor:
    """Tokens ``[start, end)`` of a request with ``block_ids``, from the caches, as ``[L, 2, n, H, D]`` (definition)."""
    out = torch.empty(LAYERS, 2, end - start, KV_HEADS, HEAD_DIM)
    for i, name in enumerate(LAYER_NAMES):
        cache = caches[name]
        for t in range(start, end):
            b, o = block_ids[t // PAGE], t % PAGE
            if cache.dim() == 5:
                out[i, :, t - start] = cache[:, b, o]
            else:
                out[i, 0, t - start] = cache[b, :, o, :HEAD_DIM]
                out[i, 1, t - start] = cache[b, :, o, HEAD_DIM:]
    return out


def write_tokens(caches: dict[str, torch.Tensor], block_ids: list[int], start: int, kv: torch.Tensor) -> None:
    """The model's forward: write ``kv`` ``[L, 2, n, H, D]`` at tokens ``[start, start + n)``."""
    for i, name in enumerate(LAYER_NAMES):
        cache = caches[name]
        for j in range(kv.shape[2]):
            t = start + j
            b, o = block_ids[t // PAGE], t % PAGE
            if cache.dim() == 5:
                cache[:, b, o] = kv[i, :, j]
            else:
                cache[b, :, o] = torch.cat([kv[i, 0, j], kv[i, 1, j]], dim=-1)


def make_request(req_id: str, tokens: list[int], cache_salt: str | None = None) -> Request:
    init_none_hash(sha256)
    params = SamplingParams(max_tokens=1)
    params.update_from_generation_config({}, 999)
    return Request(request_id=req_id, prompt_token_ids=tokens, sampling_params=params, pooling_params=None,
                   cache_salt=cache_salt, block_hasher=get_request_block_hasher(PAGE, sha256))


class Engine:
    """A real Scheduler and a worker connector over CPU caches; ``step()`` is one engine step."""

    def __init__(self, tmp_path: Path, extra: dict, kind: str = "LBNHC"):
        self.config = make_config(write_model(tmp_path / "model"), extra)
        self.config.cache_config.num_gpu_blocks = NUM_BLOCKS
        # The worker connector first, as in vLLM's uniproc executor (its store is then shared in this process).
        self.worker = KVConnectorFactory.create_connector(self.config, KVConnectorRole.WORKER, kv_cache_config())
        self.caches = paged_caches(kind)
        self.worker.register_kv_caches(self.caches)
        self.scheduler = Scheduler(vllm_config=self.config, kv_cache_config=kv_cache_config(), log_stats=True,
                                   structured_output_manager=StructuredOutputManager(self.config), block_size=PAGE)
        self.connector: KVStoreConnector = self.scheduler.connector
        self.requests: dict[str, Request] = {}
        self.invalid: set[int] = set()  # block ids the worker reported in the last step

    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.scheduler.add_request(request)

    def step(self):
        out = self.scheduler.schedule()
        worker = self.worker
        worker.bind_connector_metadata(out.kv_connector_metadata)
        worker.start_load_kv(None)
        for name in LAYER_NAMES:
            worker.wait_for_layer_load(name)
        for new in out.scheduled_new_reqs:  # the forward pass writes the KV of the scheduled tokens
            n = out.num_scheduled_tokens[new.req_id]
            tokens = self.requests[new.req_id].prompt_token_ids
            write_tokens(self.caches, new.block_ids[0], new.num_computed_tokens,
                         true_kv(tokens, new.num_computed_tokens, new.num_computed_tokens + n))
        for name in LAYER_NAMES:
            worker.save_kv_layer(name, self.caches[name], None)
        worker.wait_for_save()
        _, recving = worker.get_finished(out.finished_req_ids)
        self.invalid = worker.get_block_ids_with_load_errors()
        worker.clear_connector_metadata()
        req_ids = list(out.num_scheduled_tokens)
        connector_output = KVConnectorOutput(finished_recving=recving, invalid_block_ids=set(self.invalid))
        self.scheduler.update_from_output(out, ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=[[7] for _ in req_ids], logprobs=None, prompt_logprobs_dict={}, pooler_output=None,
            kv_connector_output=connector_output))
        return out

    def run(self, req_id: str, max_steps: int = 500):
        """Step until ``req_id`` is scheduled to compute; returns that step's output (its KV is then written)."""
        for _ in range(max_steps):
            out = self.step()
            if any(new.req_id == req_id for new in out.scheduled_new_reqs):
                return out
            time.sleep(0.005)  # an idle engine polls; give the background load threads the GIL
        raise AssertionError(f"{req_id} was never scheduled")

    def close(self) -> None:
        self.connector.shutdown()
        self.worker.shutdown()


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(1, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("async_load", [False, True], ids=["sync", "async"])
def test_second_request_is_served_the_shared_prefix(tmp_path, async_load):
    engine = Engine(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB", "async_load": async_load})
    try:
        shared = prompt(80, seed=1)
        first, second = shared + prompt(20, seed=2), shared + prompt(21, seed=3)
        engine.add(make_request("r1", first))
        out = engine.run("r1")
        assert out.scheduled_new_reqs[0].num_computed_tokens == 0
        engine.step()  # r1 finished (max_tokens=1); its prompt was saved in its prefill step
        assert engine.scheduler.reset_prefix_cache()

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
        assert engine.connector.store is engine.worker.store  # one store per process, shared by both roles
    finally:
        engine.close()


def test_async_lookup_defers_then_waits_for_remote_kvs(tmp_path):
    engine = Engine(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB", "async_load": True})
    try:
        tokens = prompt(70, seed=4)
        engine.add(make_request("a", tokens))
        engine.run("a")
        engine.step()
        engine.scheduler.reset_prefix_cache()
        request = make_request("b", tokens + [5])
        answers = [engine.connector.get_num_new_matched_tokens(request, 0) for _ in range(200)]
        assert answers[-1] == (64, True)
        assert all(a in ((None, True), (64, True)) for a in answers)
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
        engine.add(make_request("a", tokens))
        engine.run("a")
        engine.step()
        engine.scheduler.reset_prefix_cache()
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


# -- worker side ---------------------------------------------------------------------------


def worker(tmp_path: Path, extra: dict) -> KVStoreConnector:
    config = make_config(write_model(tmp_path / "model"), extra)
    return KVConnectorFactory.create_connector(config, KVConnectorRole.WORKER, kv_cache_config())


@pytest.mark.parametrize("kind", ["LBNHC", "LBHNC", "legacy"])
def test_saved_blocks_load_byte_exact_into_other_block_ids(tmp_path, kind):
    files = str(tmp_path / "files")
    saver = worker(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB", "files_dir": files})
    loader = worker(tmp_path, {"block_tokens": BLOCK_TOKENS, "host_bytes": "8MiB", "files_dir": files})
    try:
        assert saver.store is not loader.store  # two stores sharing the files tier
        tokens = prompt(90, seed=6)
        pages = -(-len(tokens) // PAGE)
        src_caches, dst_caches = paged_caches(kind, seed=1), paged_caches(kind, seed=2)
        saver.register_kv_caches(src_caches)
        loader.register_kv_caches(dst_caches)
        src_ids = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(7))[:pages].tolist()
        kv = true_kv(tokens, 0, len(tokens))
        write_tokens(src_caches, src_ids, 0, kv)
        saver.bind_connector_metadata(KVStoreConnectorMetadata(saves=[SaveSpec("s", tokens, "t", src_ids, 0)]))
        saver.save_kv_layer(LAYER_NAMES[1], src_caches[LAYER_NAMES[1]], None)  # out of order; wait_for_save does 0
        saver.wait_for_save()
        saver.clear_connector_metadata()
        assert saver.store.flush(30)

        dst_ids = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(8))[:pages].tolist()
        before = {name: t.clone() for name, t in dst_caches.items()}
        spec = LoadSpec("l", tokens, "t", dst_ids, 16, 80)  # vLLM already holds [0, 16)
        loader.bind_connector_metadata(KVStoreConnectorMetadata(loads=[spec]))
        loader.start_load_kv(None)
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
        loader.bind_connector_metadata(KVStoreConnectorMetadata(loads=[LoadSpec("m", other, "t", dst_ids, 0, 80)]))
        loader.start_load_kv(None)
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
sys.path.insert(0, {here!r})
import test_vllm_connector as t
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
    w.bind_connector_metadata(KVStoreConnectorMetadata(saves=[SaveSpec("a", tokens, None, ids, 0)]))
    w.wait_for_save()
    w.shutdown()
    print("saved", hash("kvstore"))
else:
    s = KVConnectorFactory.create_connector(config, KVConnectorRole.SCHEDULER, t.kv_cache_config())
    n, is_async = s.get_num_new_matched_tokens(t.make_request("b", tokens), 0)
    w = KVConnectorFactory.create_connector(config, KVConnectorRole.WORKER, t.kv_cache_config())
    caches = t.paged_caches(seed=3)
    w.register_kv_caches(caches)
    w.bind_connector_metadata(KVStoreConnectorMetadata(loads=[LoadSpec("b", tokens, None, ids, 0, n)]))
    w.start_load_kv(None)
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
