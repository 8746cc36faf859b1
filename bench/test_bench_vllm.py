"""vLLM connector: scheduler-side lookup cost per request, worker-side load/save into vLLM-layout CPU tensors.

Run (in the vLLM venv, ``scripts/engine-venvs.sh vllm``):
``pytest bench/test_bench_vllm.py --benchmark-only``. Scheduler side: one
admitted request's ``get_num_new_matched_tokens`` (then
``request_finished``, so each round asks anew) of a 32k-token prompt whose
every block the worker's store holds (256-token blocks, sha256 keys: 128
keys hashed and located), asked over the worker's lookup socket, with the
blocks in the worker's host RAM or on a ``kvstore serve`` cache server (its
only tier); the median is printed in microseconds. Worker side: bf16 KV of a
Llama-3-8B-shaped 8-layer shard (``[8, 2, 2048, 8, 128]``, 64 MiB), pages
of 16 tokens at random block ids in vLLM 0.33's standardized LBNHC layout,
loaded through ``start_load_kv`` + ``wait_for_layer_load`` and saved through
``save_kv_layer`` + ``wait_for_save``, each next to a contiguous ``copy_`` of
the same bytes (the ceiling; the summary prints the ratio). One CPU thread.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed: build its environment with scripts/engine-venvs.sh vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.config import (CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig,  # noqa: E402
                         VllmConfig)
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from kvstore.benchmarking import random_kv  # noqa: E402
from kvstore.compression.table import one_thread  # noqa: E402
from kvstore.integrations.vllm import KVStoreConnectorMetadata, LoadSpec, SaveSpec  # noqa: E402

LAYERS, HEADS, HEAD_DIM, PAGE = 8, 8, 128, 16
TOKENS = 2048
PROMPT = 32 * 1024
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
NUM_BLOCKS = 2 * TOKENS // PAGE + 1


def _config(folder: Path, extra: dict) -> VllmConfig:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HEADS * 4 * HEAD_DIM,
        "intermediate_size": 256, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS * 4,
        "num_key_value_heads": HEADS, "head_dim": HEAD_DIM, "vocab_size": 1000,
        "max_position_embeddings": 65536, "torch_dtype": "bfloat16"}))
    return VllmConfig(
        model_config=ModelConfig(model=str(folder), skip_tokenizer_init=True, dtype="bfloat16", max_model_len=65536),
        scheduler_config=SchedulerConfig(max_model_len=65536, max_num_batched_tokens=65536, is_encoder_decoder=False),
        cache_config=CacheConfig(block_size=PAGE, enable_prefix_caching=True), device_config=DeviceConfig("cpu"),
        kv_transfer_config=KVTransferConfig(kv_connector="KVStoreConnector",
                                            kv_connector_module_path="kvstore.integrations.vllm",
                                            kv_role="kv_both", kv_connector_extra_config=extra))


def _kv_cache_config() -> KVCacheConfig:
    spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=HEADS, head_size=HEAD_DIM, dtype=torch.bfloat16)
    return KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(NAMES, spec)])


def _open(folder: Path, extra: dict):
    config = _config(folder / "model", extra)
    worker = KVConnectorFactory.create_connector(config, KVConnectorRole.WORKER, _kv_cache_config())
    raw = torch.zeros(LAYERS, NUM_BLOCKS, PAGE, HEADS, 2 * HEAD_DIM, dtype=torch.bfloat16)  # LBNHC
    caches = {name: raw[i].permute(0, 2, 1, 3) for i, name in enumerate(NAMES)}
    worker.register_kv_caches(caches)
    scheduler = KVConnectorFactory.create_connector(config, KVConnectorRole.SCHEDULER, _kv_cache_config())
    return scheduler, worker, caches


@pytest.fixture(scope="module")
def connectors():
    with tempfile.TemporaryDirectory() as tmp:
        scheduler, worker, caches = _open(Path(tmp), {"block_tokens": 256, "host_bytes": "2GiB"})
        yield scheduler, worker, caches
        scheduler.shutdown()
        worker.shutdown()


@pytest.fixture(scope="module")
def server_connectors():
    """Connectors whose worker store's only tier is a ``kvstore serve`` process on this machine."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "kvstore.cli", "serve", "--data-dir", str(Path(tmp) / "server"), "--port", "0",
               "--host-bytes", "1536MiB", "--disk-bytes", "0", "--token", "bench-token-0123456789"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        url = None
        for line in proc.stdout:
            if (m := re.search(r"listening on (kvstores?://[0-9.]+:\d+)", line)) is not None:
                url = m.group(1)
            if url and "tenant(s):" in line:
                break
        try:
            scheduler, worker, caches = _open(Path(tmp), {"block_tokens": 256, "host_bytes": 0, "remote_url": url,
                                                          "remote_token": "bench-token-0123456789"})
            yield scheduler, worker, caches
            scheduler.shutdown()
            worker.shutdown()
        finally:
            proc.terminate()
            proc.wait(30)


@pytest.fixture(autouse=True)
def single_core():
    with one_thread():
        yield


def _pedantic(benchmark, fn, rounds: int = 20):
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=2)


@pytest.mark.benchmark(group="vllm-scheduler")
@pytest.mark.parametrize("where", ["host", "server"])
def test_scheduler_lookup_32k(benchmark, request, where):
    scheduler, worker, _ = request.getfixturevalue("connectors" if where == "host" else "server_connectors")
    tokens = torch.randint(0, 1000, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    kv = random_kv(worker.store.layout, 256)
    for b in worker.store.block_keys(tokens):  # every block stored (same KV: only keys matter here)
        worker.store._flow.store_items([(b.key, kv[:, :, :b.num_tokens])])
    assert worker.store.flush(60)
    req = Request("r", tokens, SamplingParams(max_tokens=1), None)

    def admit() -> None:  # one admitted request: one lookup over the worker's socket
        assert scheduler.get_num_new_matched_tokens(req, 0) == (PROMPT - PAGE, False)
        scheduler.request_finished(req, [])
    _pedantic(benchmark, admit, rounds=100)
    print(f"\nscheduler lookup per admitted request, 32k prompt, blocks in {where}: "
          f"{benchmark.stats.stats.median * 1e6:.0f} us")


def _table() -> list[int]:
    return torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(1))[:TOKENS // PAGE].tolist()


@pytest.fixture(scope="module")
def kv(connectors):
    return random_kv(connectors[1].store.layout, TOKENS)


@pytest.mark.benchmark(group="vllm-worker-save")
def test_save_copy_ceiling(benchmark, kv):
    out = torch.empty_like(kv)
    _pedantic(benchmark, lambda: out.copy_(kv))


@pytest.mark.benchmark(group="vllm-worker-load")
def test_load_copy_ceiling(benchmark, kv):
    out = torch.empty_like(kv)
    _pedantic(benchmark, lambda: out.copy_(kv))


@pytest.mark.benchmark(group="vllm-worker-save")
def test_save(benchmark, connectors, kv):
    _, worker, _ = connectors
    table = _table()
    counter = iter(range(10**6))

    def save() -> None:  # a fresh salt each round: every block is stored anew (no dedup)
        spec = SaveSpec("s", list(range(TOKENS)), f"round-{next(counter)}", (table,))
        worker.bind_connector_metadata(KVStoreConnectorMetadata(saves=[spec]))
        for name in NAMES:
            worker.save_kv_layer(name, None, None)
        worker.wait_for_save()
        worker.clear_connector_metadata()
    _pedantic(benchmark, save, rounds=10)


@pytest.mark.benchmark(group="vllm-worker-load")
def test_load(benchmark, connectors, kv):
    _, worker, caches = connectors
    table = _table()
    worker.store.put(list(range(TOKENS)), kv, salt="load")
    spec = LoadSpec("l", list(range(TOKENS)), "load", (table,), 0, TOKENS)

    def load() -> None:
        worker.bind_connector_metadata(KVStoreConnectorMetadata(loads=[spec]))
        worker.start_load_kv(None)
        for name in NAMES:
            worker.wait_for_layer_load(name)
        worker.wait_for_save()
        worker.clear_connector_metadata()
    _pedantic(benchmark, load)
    assert worker.get_block_ids_with_load_errors() == set()
    got = caches[NAMES[3]][table[5]]  # [H, page, 2D] of page 5, layer 3
    assert torch.equal(got[:, :, :HEAD_DIM].transpose(0, 1), kv[3, 0, 5 * PAGE:6 * PAGE])
