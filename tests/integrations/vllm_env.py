"""Helpers of the vLLM connector tests (run in .venv-vllm): a tiny local model config, vLLM configs, CPU caches
in vLLM's layouts, a model stand-in whose KV is a function of the prefix, and ``Engine`` (a real ``Scheduler``
with a worker connector stepped by hand)."""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import torch
from vllm import SamplingParams
from vllm.config import CacheConfig, CUDAGraphMode, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.forward_context import ForwardContext
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from kvstore.integrations.vllm import KVStoreConnector

PAGE = 16
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16
LAYER_NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
NUM_BLOCKS = 64
BLOCK_TOKENS = 32
MODULE = "kvstore.integrations.vllm"

# vLLM's forward context of an eager step: the forward calls wait_for_layer_load layer by layer, so a sync load
# may run on while the first layers compute (a context without attention metadata is no step's: loads finish
# in start_load_kv)
EAGER_STEP = ForwardContext(no_compile_layers={}, attn_metadata={}, slot_mapping={},
                            cudagraph_runtime_mode=CUDAGraphMode.NONE)


def write_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
        "num_key_value_heads": KV_HEADS, "vocab_size": 1000, "max_position_embeddings": 2048,
        "torch_dtype": "float32", "rms_norm_eps": 1e-5}))
    return folder


def make_config(model: Path, extra: dict, failure_policy: str = "recompute", dtype: str = "float32",
                cache_dtype: str = "auto", layout: str = "LBNHC") -> VllmConfig:
    cache = CacheConfig(block_size=PAGE, enable_prefix_caching=True, cache_dtype=cache_dtype)
    cache.kv_cache_layout = layout
    return VllmConfig(
        model_config=ModelConfig(model=str(model), skip_tokenizer_init=True, dtype=dtype, max_model_len=2048),
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


def make_request(req_id: str, tokens: list[int], cache_salt: str | None = None, max_tokens: int = 1) -> Request:
    init_none_hash(sha256)
    params = SamplingParams(max_tokens=max_tokens)
    params.update_from_generation_config({}, 999)
    return Request(request_id=req_id, prompt_token_ids=tokens, sampling_params=params, pooling_params=None,
                   cache_salt=cache_salt, block_hasher=get_request_block_hasher(PAGE, sha256))


class Engine:
    """A real Scheduler and a worker connector over CPU caches; ``step()`` is one engine step."""

    def __init__(self, tmp_path: Path, extra: dict, kind: str = "LBNHC", configure=None):
        self.config = make_config(write_model(tmp_path / "model"), extra)
        if configure is not None:  # more of vLLM's settings, before the connectors see them
            configure(self.config)
        self.config.cache_config.num_gpu_blocks = NUM_BLOCKS
        # The worker connector first, as vLLM initialises its workers before the scheduler: the worker's store
        # answers the scheduler's lookups over its socket.
        self.worker = KVConnectorFactory.create_connector(self.config, KVConnectorRole.WORKER, kv_cache_config())
        self.caches = paged_caches(kind)
        self.worker.register_kv_caches(self.caches)
        self.scheduler = Scheduler(vllm_config=self.config, kv_cache_config=kv_cache_config(), log_stats=True,
                                   structured_output_manager=StructuredOutputManager(self.config), block_size=PAGE)
        self.connector: KVStoreConnector = self.scheduler.connector
        self.requests: dict[str, Request] = {}
        self.tables: dict[str, list[int]] = {}  # each request's block ids (its first group's), for later chunks
        self.invalid: set[int] = set()  # block ids the worker reported in the last step

    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.scheduler.add_request(request)

    def step(self):
        return self.execute(self.scheduler.schedule())

    def execute(self, out):
        """The workers' half of a step vLLM scheduled as ``out``: loads, the forward, saves, the output."""
        worker = self.worker
        worker.bind_connector_metadata(out.kv_connector_metadata)
        worker.start_load_kv(EAGER_STEP)
        for name in LAYER_NAMES:
            worker.wait_for_layer_load(name)
        for new in out.scheduled_new_reqs:  # the forward pass writes the KV of the scheduled tokens
            n = out.num_scheduled_tokens[new.req_id]
            tokens = self.requests[new.req_id].prompt_token_ids
            self.tables[new.req_id] = list(new.block_ids[0])
            write_tokens(self.caches, new.block_ids[0], new.num_computed_tokens,
                         true_kv(tokens, new.num_computed_tokens, new.num_computed_tokens + n))
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):  # and of a prompt's later chunks
            if cached.new_block_ids[i] is not None:
                ids = list(cached.new_block_ids[i][0])
                self.tables[req_id] = ids if req_id in cached.resumed_req_ids else self.tables.get(req_id, []) + ids
            tokens, start = self.requests[req_id].prompt_token_ids, cached.num_computed_tokens[i]
            if start < len(tokens):
                end = min(len(tokens), start + out.num_scheduled_tokens[req_id])
                write_tokens(self.caches, self.tables[req_id], start, true_kv(tokens, start, end))
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
            sampled_token_ids=[[] if self._partial(r) else [7] for r in req_ids],
            logprobs=None, prompt_logprobs_dict={}, pooler_output=None, kv_connector_output=connector_output))
        return out

    def _partial(self, req_id: str) -> bool:
        """Whether a step computed a chunk of ``req_id``'s prompt short of its end: such a step samples no token
        (one sampled there ended a one-token request after its first chunk)."""
        request = self.scheduler.requests.get(req_id)
        return request is not None and request.num_computed_tokens < request.num_prompt_tokens

    def run(self, req_id: str, max_steps: int = 500):
        """Step until ``req_id`` is scheduled to compute; returns that step's output (its KV is then written)."""
        for _ in range(max_steps):
            out = self.step()
            if any(new.req_id == req_id for new in out.scheduled_new_reqs):
                return out
            time.sleep(0.005)  # an idle engine polls; give the background load threads the GIL
        raise AssertionError(f"{req_id} was never scheduled")

    def serve(self, req_id: str, tokens: list[int]):
        """Prefill ``tokens`` as request ``req_id`` to its end (its prompt is saved), then empty vLLM's own
        prefix cache so that a later hit can only come from kvstore; returns the step that computed it."""
        self.add(make_request(req_id, tokens))
        out = self.run(req_id)
        self.step()
        assert self.scheduler.reset_prefix_cache()
        return out

    def close(self) -> None:
        self.connector.shutdown()
        self.worker.shutdown()


def with_eagle_drafter(config: VllmConfig) -> None:
    """An EAGLE drafter of one layer beside the target model (``configure`` for ``Engine``)."""
    from vllm.config import SpeculativeConfig
    model = Path(config.model_config.model)
    draft = model.parent / "draft"
    draft.mkdir(exist_ok=True)
    settings = json.loads((model / "config.json").read_text())
    settings.update(num_hidden_layers=1, architectures=["EagleLlamaForCausalLM"])
    (draft / "config.json").write_text(json.dumps(settings))
    config.speculative_config = SpeculativeConfig(method="eagle", model=str(draft), num_speculative_tokens=1,
                                                  target_model_config=config.model_config,
                                                  target_parallel_config=config.parallel_config)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(1, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()




def worker(tmp_path: Path, extra: dict) -> KVStoreConnector:
    config = make_config(write_model(tmp_path / "model"), extra)
    return KVConnectorFactory.create_connector(config, KVConnectorRole.WORKER, kv_cache_config())
