"""Paged-buffer adapters: scatter and gather per engine layout, each next to ``Tensor.copy_`` of the same bytes.

Run: ``pytest bench/test_bench_paged.py --benchmark-only`` (the summary
prints each ratio). Input: bf16 KV ``[8, 2, 2048, 8, 128]`` (64 MiB: 8
layers of a Llama-3-8B-shaped model), copied one layer at a time as a
layer-wise loader does, on one CPU thread like the codec benchmarks (on a
shared machine a second thread mostly measures the neighbours). Pools are
twice the request, addresses random: vLLM pages of 16 tokens from a
random block table (``vllm``: the range starts on a page, one row per
page; ``vllm_tokens``: it starts 8 tokens into a page, one row per
token); SGLang slots in random pages of 16 (``sglang_paged``,
``--page-size 16``) or a random permutation of slots (``sglang``, page
size 1: one row per token, the worst case); an HF cache ``[2, 8, 4096,
128]`` per layer and part at batch row 1, offset 100. Target
(engine-hooks issue): >= 0.5 of the copy.
"""

from __future__ import annotations

import pytest
import torch

from kvstore import KVLayout
from kvstore.benchmarking import random_kv
from kvstore.compression.table import one_thread
from kvstore.integrations.paged import HFContiguousAdapter, SGLangPoolAdapter, VLLMPagedAdapter

LAYOUT = KVLayout(num_layers=8, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, block_tokens=256)
TOKENS = 2048
PAGE = 16
ROUNDS = 20
SUBJECTS = ("vllm", "vllm_tokens", "sglang_paged", "sglang", "hf")


def _zeros(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=LAYOUT.dtype)


def _adapter(name: str):
    """(adapter, location) of one engine layout, pools twice the request, random addresses (fixed seeds)."""
    gen = torch.Generator().manual_seed(0)
    L, H, D = LAYOUT.num_layers, LAYOUT.num_kv_heads, LAYOUT.head_dim
    if name.startswith("vllm"):
        num_pages = 2 * TOKENS // PAGE + 1
        adapter = VLLMPagedAdapter(LAYOUT, [_zeros(2, num_pages, PAGE, H, D) for _ in range(L)])
        start = 0 if name == "vllm" else PAGE // 2
        return adapter, adapter.locate(torch.randperm(num_pages, generator=gen), TOKENS, start=start)
    if name.startswith("sglang"):
        page = PAGE if name == "sglang_paged" else 1
        adapter = SGLangPoolAdapter(LAYOUT, [_zeros(2 * TOKENS, H, D) for _ in range(L)],
                                    [_zeros(2 * TOKENS, H, D) for _ in range(L)], page_size=page)
        pages = torch.randperm(2 * TOKENS // page, generator=gen)[:TOKENS // page]
        return adapter, adapter.locate((pages[:, None] * page + torch.arange(page)).reshape(-1))
    adapter = HFContiguousAdapter(LAYOUT, [_zeros(2, H, 2 * TOKENS, D) for _ in range(L)],
                                  [_zeros(2, H, 2 * TOKENS, D) for _ in range(L)])
    return adapter, adapter.locate(1, TOKENS, start=100)


@pytest.fixture(scope="module")
def kv() -> torch.Tensor:
    return random_kv(LAYOUT, TOKENS)


@pytest.fixture(autouse=True)
def single_core():
    with one_thread():
        yield


@pytest.fixture(scope="module", params=SUBJECTS)
def engine(request):
    return _adapter(request.param)


def _pedantic(benchmark, fn):
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=2)


@pytest.mark.benchmark(group="paged-scatter")
def test_scatter_copy_ceiling(benchmark, kv):
    out = torch.empty_like(kv)
    _pedantic(benchmark, lambda: out.copy_(kv))


@pytest.mark.benchmark(group="paged-gather")
def test_gather_copy_ceiling(benchmark, kv):
    out = torch.empty_like(kv)
    _pedantic(benchmark, lambda: out.copy_(kv))


@pytest.mark.benchmark(group="paged-scatter")
def test_scatter(benchmark, kv, engine):
    adapter, where = engine

    def scatter() -> None:
        for layer in range(LAYOUT.num_layers):
            adapter.scatter_layer(layer, kv[layer], where)
    _pedantic(benchmark, scatter)


@pytest.mark.benchmark(group="paged-gather")
def test_gather(benchmark, kv, engine):
    adapter, where = engine
    adapter.scatter(kv, where)
    out = torch.empty_like(kv)

    def gather() -> None:
        for layer in range(LAYOUT.num_layers):
            adapter.gather_layer(layer, where, out[layer])
    _pedantic(benchmark, gather)
    assert torch.equal(out, kv)
