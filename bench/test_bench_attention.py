"""Attention of a prefill that continues a loaded prefix, next to the cold prefill of the whole prompt.

SmolLM2-135M's shapes (9 query heads over 3 KV heads, head dim 64, fp32) for
the demo's RAG request: 256 tokens loaded, 1,587 prefilled after them. The
ceiling is the causal kernel over all 1,843 tokens, what a cold prefill
pays; the subjects are transformers' ``sdpa`` with its explicit mask and
kvstore's two-part variant (``integrations/continued_attention.py``). A
ratio near 1 means loading the prefix costs no attention time; sdpa's mask
reads about 0.65 here.

Run: ``pytest bench/test_bench_attention.py --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward  # noqa: E402

from kvstore.integrations.continued_attention import continued_prefill_attention, continued_prefill_mask  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
LOADED, PREFILLED = 256, 1587
ROUNDS = 10


class _Layer(torch.nn.Module):
    num_key_value_groups = HEADS // KV_HEADS
    is_causal = True


@pytest.fixture(scope="module")
def tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    total = LOADED + PREFILLED
    # [B, tokens, heads, D] transposed, as the model's projections hand them over
    query = torch.randn(1, total, HEADS, HEAD_DIM, generator=generator).transpose(1, 2)
    key = torch.randn(1, KV_HEADS, total, HEAD_DIM, generator=generator)
    value = torch.randn(1, KV_HEADS, total, HEAD_DIM, generator=generator)
    return query, query[:, :, LOADED:], key, value


def _pedantic(benchmark, fn) -> None:
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.benchmark(group="attention-continued-prefill")
def test_cold_prefill_ceiling(benchmark, tensors):
    whole, _, key, value = tensors
    groups = HEADS // KV_HEADS
    _pedantic(benchmark, lambda: F.scaled_dot_product_attention(whole, repeat_kv(key, groups), repeat_kv(value, groups),
                                                                  is_causal=True))


@pytest.mark.benchmark(group="attention-continued-prefill")
def test_sdpa_masked(benchmark, tensors):
    _, query, key, value = tensors
    mask = torch.arange(LOADED + PREFILLED) <= torch.arange(LOADED, LOADED + PREFILLED)[:, None]
    _pedantic(benchmark, lambda: sdpa_attention_forward(_Layer(), query, key, value, mask))


@pytest.mark.benchmark(group="attention-continued-prefill")
def test_two_parts(benchmark, tensors):
    _, query, key, value = tensors
    mark = continued_prefill_mask(batch_size=1, q_length=PREFILLED, kv_length=LOADED + PREFILLED, q_offset=LOADED)
    _pedantic(benchmark, lambda: continued_prefill_attention(_Layer(), query, key, value, mark))
