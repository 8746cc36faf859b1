"""The two-part attention of a prefill after a loaded prefix: the masked kernel's answer, taken only when plain.

Every comparison is against PyTorch's own kernel with the explicit mask
transformers builds; the routing tests check that anything but a plain
continued prefill on CPU in fp32/fp64 gets transformers' functions unchanged.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from torch.nn.attention.bias import CausalBias  # noqa: E402
from transformers.integrations.sdpa_attention import repeat_kv  # noqa: E402
from transformers.masking_utils import (  # noqa: E402
    causal_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

from kvstore.compression.fidelity import cache_argument  # noqa: E402
from kvstore.integrations import continued_attention  # noqa: E402
from kvstore.integrations.continued_attention import (  # noqa: E402
    NAME,
    continued_prefill_attention,
    continued_prefill_mask,
    use_continued_attention,
)
from kvstore.integrations.transformers import CachedModel  # noqa: E402
from conftest import model_stores  # noqa: E402
from test_transformers import BLOCK, FP32_TOL, max_diff, reference_logits, tiny_model, tokens  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}  # outputs up to |7|: a few ulps


class Attention(torch.nn.Module):
    """What transformers' attention functions read from the calling layer."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def masked(query, key, value, groups):
    past = key.shape[2] - query.shape[2]
    mask = torch.arange(key.shape[2]) <= torch.arange(past, key.shape[2])[:, None]
    out = F.scaled_dot_product_attention(query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=mask)
    return out.transpose(1, 2)


@pytest.fixture
def new_store():
    with model_stores(BLOCK, "4MiB") as factory:
        yield factory


@pytest.fixture
def merges(monkeypatch):
    """Counts the calls that took the two-part path."""
    calls = []
    real = continued_attention._two_part_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(continued_attention, "_two_part_attention", counted)
    return calls


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 2), groups=st.sampled_from([1, 3]),
       past=st.integers(1, 40), new=st.integers(2, 40), head_dim=st.sampled_from([8, 16]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_two_parts_equal_the_masked_kernel(batch, kv_heads, groups, past, new, head_dim, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * groups, new, head_dim, generator=generator, dtype=dtype) * 3
    key = torch.randn(batch, kv_heads, past + new, head_dim, generator=generator, dtype=dtype) * 3
    value = torch.randn(batch, kv_heads, past + new, head_dim, generator=generator, dtype=dtype)
    mark = continued_prefill_mask(batch_size=batch, q_length=new, kv_length=past + new, q_offset=past)
    assert isinstance(mark, CausalBias)
    out, weights = continued_prefill_attention(Attention(groups), query, key, value, mark, scaling=None)
    assert weights is None and out.shape == (batch, new, kv_heads * groups, head_dim) and out.is_contiguous()
    assert out.dtype == dtype
    assert max_diff(out, masked(query, key, value, groups)) <= TOL[dtype]


PLAIN = dict(batch_size=2, q_length=6, kv_length=20, q_offset=14, kv_offset=0, mask_function=causal_mask_function,
             attention_mask=None, local_size=None, allow_is_causal_skip=True, device=torch.device("cpu"))
NOT_PLAIN = {
    "padding": dict(attention_mask=torch.tensor([[True] * 20, [False] * 3 + [True] * 17])),
    "sliding window": dict(local_size=8, mask_function=sliding_window_causal_mask_function(8)),
    "another pattern": dict(mask_function=sliding_window_causal_mask_function(64)),
    "cold prefill": dict(q_offset=0, kv_length=6),
    "decode step": dict(q_length=1, kv_length=15),
    "static cache slots past the queries": dict(kv_length=32),
    "kv offset": dict(kv_offset=4, kv_length=16),
    "skip not allowed": dict(allow_is_causal_skip=False),
    "another device": dict(device=torch.device("meta")),  # stands for a GPU: tensors here hold no data
    "tensor offset": dict(q_offset=torch.tensor(14)),
}


def test_plain_continued_prefill_is_marked_lower_right():
    mark = continued_prefill_mask(**PLAIN)
    assert isinstance(mark, CausalBias) and (mark.seq_len_q, mark.seq_len_kv) == (6, 20)
    all_ones = continued_prefill_mask(**dict(PLAIN, attention_mask=torch.ones(2, 20, dtype=torch.bool)))
    assert isinstance(all_ones, CausalBias)


@pytest.mark.parametrize("case", sorted(NOT_PLAIN))
def test_anything_else_gets_transformers_mask(case):
    arguments = dict(PLAIN, **NOT_PLAIN[case])
    ours, theirs = continued_prefill_mask(**arguments), sdpa_mask(**arguments)
    assert not isinstance(ours, CausalBias)
    if theirs is None or theirs.device.type == "meta":
        assert ours is None if theirs is None else (ours.shape, ours.device) == (theirs.shape, theirs.device)
    else:
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_store_hit_takes_the_two_parts_and_matches_the_model(arch, new_store, merges):
    model = tiny_model(arch)
    cached = CachedModel(model, new_store(model))
    assert cached.continued_attention and model.config._attn_implementation == NAME
    assert CachedModel(model, new_store(model)).continued_attention  # a second wrapper finds it switched
    ids = tokens(45, seed=3)
    cached.forward(ids[:, :33])
    assert merges == []  # a cold prefill is transformers' sdpa
    out, info = cached.forward(ids)
    assert info.loaded_tokens == 32 and len(merges) == model.config.num_hidden_layers
    assert max_diff(out.logits, reference_logits(model, ids)[:, 32:]) <= FP32_TOL


@pytest.mark.parametrize("arch, dtype", [("mistral", torch.float32), ("llama", torch.bfloat16)])
def test_windows_and_16_bit_keep_the_masked_path(arch, dtype, new_store, merges):
    model = tiny_model(arch, dtype)
    cached = CachedModel(model, new_store(model))
    ids = tokens(45, seed=4)
    cached.forward(ids[:, :33])
    out, info = cached.forward(ids)
    assert info.loaded_tokens == 32 and merges == []
    tolerance = FP32_TOL if dtype == torch.float32 else 1e-2
    assert max_diff(out.logits, reference_logits(model, ids)[:, 32:]) <= tolerance


def test_padded_batches_through_the_switched_model_are_unchanged(new_store):
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config._attn_implementation = "sdpa"
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = tokens(24, seed=5, batch=2)
    padding = torch.ones_like(ids)
    padding[1, :7] = 0
    with torch.no_grad():
        before = model(ids, attention_mask=padding, use_cache=True)
        follow = model(ids[:, :4], attention_mask=torch.cat([padding, torch.ones_like(ids[:, :4])], 1),
                       **{cache_argument(model): before.past_key_values}).logits
    CachedModel(model, new_store(model))
    assert model.config._attn_implementation == NAME
    with torch.no_grad():
        after = model(ids, attention_mask=padding, use_cache=True)
        follow_after = model(ids[:, :4], attention_mask=torch.cat([padding, torch.ones_like(ids[:, :4])], 1),
                             **{cache_argument(model): after.past_key_values}).logits
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(follow, follow_after)  # a continued prefill with padding: transformers' mask and kernel


def test_other_implementations_are_left_alone():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=64)
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config)
    assert use_continued_attention(model) is False
    assert model.config._attn_implementation == "eager"
