"""The transformers adapter against tiny random-initialised models: a store hit must not change the output.

Every comparison is with the same model run without kvstore (``model(ids)``,
``model.generate(ids)``), same attention implementation (sdpa), same weights.
Block size 16 tokens, so prompts of 5, 32 and 37 tokens are: shorter than a
block, exactly two blocks, two blocks and a partial tail.
"""

from __future__ import annotations

import threading

import copy
import functools
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import model_stores, run_python  # noqa: E402
from kvstore import KVLayout, KVStore, StoreConfig  # noqa: E402
from kvstore.integrations.transformers import (  # noqa: E402
    CachedModel,
    cache_from_kv,
    kv_from_cache,
    layout_for,
)

BLOCK = 16
VOCAB = 512
FP32_TOL = 1e-4
# bf16 on CPU (torch 2.13) measured bit-identical (max abs difference 0) over 4 architectures,
# prefixes of 16-48 tokens, logits up to |9|; 1e-2 (under one bf16 ulp at |logit| >= 2) leaves room
# for kernels whose rounding depends on the matmul shape.
BF16_TOL = 1e-2
GREEDY = dict(max_new_tokens=14, min_new_tokens=14, do_sample=False)

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),  # grouped-query attention
    # a window shorter than the prompts: the cache keeps every token, the mask still applies the window
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=12)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=1, head_dim=32)),  # head_dim != hidden/heads
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),  # partial rotary, fused QKV, no num_key_value_heads
}


@functools.lru_cache(maxsize=None)
def tiny_model(arch: str, dtype: torch.dtype = torch.float32):
    config_name, model_name, extra = ARCHS[arch]
    config = getattr(transformers, config_name)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, initializer_range=0.1, **extra)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).to(dtype).eval()


def tokens(num: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, num), generator=torch.Generator().manual_seed(seed))


def reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture
def new_store():
    with model_stores(BLOCK, "4MiB") as factory:
        yield factory


def test_layout_for_reads_heads_head_dim_and_dtype():
    llama = layout_for(tiny_model("llama"), block_tokens=BLOCK)
    assert (llama.num_layers, llama.num_kv_heads, llama.head_dim, llama.dtype) == (2, 4, 16, torch.float32)
    assert layout_for(tiny_model("qwen2")).num_kv_heads == 2
    gemma = layout_for(tiny_model("gemma").config, dtype="bf16")
    assert (gemma.num_kv_heads, gemma.head_dim, gemma.dtype, gemma.block_tokens) == (1, 32, torch.bfloat16, 256)
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    config.dtype = None
    with pytest.raises(ValueError, match="dtype"):
        layout_for(config)
    bare = types.SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, dtype="float16")
    assert layout_for(bare) == KVLayout(2, 4, 16, torch.float16, block_tokens=256)  # no head_dim: width / heads
    bare.num_attention_heads = 5
    with pytest.raises(ValueError, match="hidden_size: expected a multiple of num_attention_heads=5, got 64"):
        layout_for(bare)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_forward_hit_gives_the_same_logits(arch, new_store):
    model = tiny_model(arch)
    cached = CachedModel(model, new_store(model))
    for length in (5, 2 * BLOCK, 2 * BLOCK + 5):
        ids = tokens(length, seed=length)
        expected = reference_logits(model, ids)
        cold_out, cold = cached.forward(ids)
        assert (cold.loaded_tokens, cold.computed_tokens, cold.saved_tokens) == (0, length, length)
        assert cold.blocks_stored == -(-length // BLOCK)
        assert max_diff(cold_out.logits, expected) <= FP32_TOL
        warm_out, warm = cached.forward(ids)
        # the whole prompt is stored: all of it is fetched, the last token recomputed for its logits
        assert (warm.planned_tokens, warm.fetched_tokens) == (length, length)
        assert (warm.loaded_tokens, warm.computed_tokens, warm.saved_tokens) == (length - 1, 1, 0)
        assert warm_out.logits.shape == (1, 1, VOCAB)
        assert max_diff(warm_out.logits[:, -1], expected[:, -1]) <= FP32_TOL
        assert warm_out.past_key_values.get_seq_length() == length
        assert warm.prefill_seconds > 0 and warm.ttft_seconds >= warm.prefill_seconds
        assert cached.last_info is warm


def test_prefix_hit_computes_only_the_suffix(new_store):
    model = tiny_model("qwen2")
    cached = CachedModel(model, new_store(model))
    ids = tokens(60, seed=1)
    cached.forward(ids[:, :37])  # blocks 0-16, 16-32 and a partial tail 32-37 (matches only 37 tokens)
    out, info = cached.forward(ids)
    assert (info.planned_tokens, info.loaded_tokens, info.computed_tokens) == (32, 32, 28)
    assert (info.saved_tokens, info.blocks_stored) == (60, 2)  # 32-48 and the partial 48-60
    assert max_diff(out.logits, reference_logits(model, ids)[:, 32:]) <= FP32_TOL


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_generate_multi_turn_loads_the_previous_turn(arch, new_store):
    model = tiny_model(arch)
    cached = CachedModel(model, new_store(model))
    turn1 = tokens(20, seed=2)
    out1, info1 = cached.generate(turn1, **GREEDY)
    assert torch.equal(out1, model.generate(turn1, **GREEDY))
    # prompt + generated but the last (which has no KV yet): 33 tokens = 2 blocks + a 1-token tail,
    # plus the prompt's own 4-token tail (16-20)
    assert (info1.generated_tokens, info1.saved_tokens, info1.blocks_stored) == (14, 33, 4)
    turn2 = torch.cat([out1, tokens(5, seed=3)], dim=1)  # 39 tokens
    out2, info2 = cached.generate(turn2, **GREEDY)
    assert (info2.loaded_tokens, info2.computed_tokens) == (32, 7)
    assert info2.prefill_seconds > 0 and info2.saved_tokens == 39 + 13
    assert torch.equal(out2, model.generate(turn2, **GREEDY))
    out3, info3 = cached.forward(turn2)
    assert info3.loaded_tokens == 38  # generate stored the prompt's own 7-token tail too
    assert max_diff(out3.logits[:, -1], reference_logits(model, turn2)[:, -1]) <= FP32_TOL


def test_generate_passes_kwargs_and_can_save_only_the_prompt(new_store):
    model = tiny_model("llama")
    cached = CachedModel(model, new_store(model), save_generated=False)
    ids = tokens(21, seed=4)
    out, info = cached.generate(ids, return_dict_in_generate=True, output_scores=True, **GREEDY)
    assert torch.equal(out.sequences, model.generate(ids, **GREEDY))
    assert len(out.scores) == 14 and info.saved_tokens == 21
    assert cached.store.lookup(out.sequences[0, :34], salt=cached.key_salt()) == BLOCK  # only the prompt's first block covers it
    _, again = cached.generate(ids, save_generated=True, **GREEDY)
    assert (again.loaded_tokens, again.saved_tokens) == (20, 34)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bf16_within_measured_tolerance(arch, new_store):
    model = tiny_model(arch, torch.bfloat16)
    cached = CachedModel(model, new_store(model))
    ids = tokens(45, seed=5)
    cached.forward(ids[:, :33])
    out, info = cached.forward(ids)
    assert info.loaded_tokens == 32
    assert max_diff(out.logits, reference_logits(model, ids)[:, 32:]) <= BF16_TOL
    short = dict(GREEDY, max_new_tokens=6, min_new_tokens=6)  # bf16 matmuls are slow on CPU
    generated, _ = cached.generate(ids, **short)
    assert torch.equal(generated, model.generate(ids, **short))


def test_hits_from_the_disk_tier_after_reopening(tmp_path, new_store):
    model = tiny_model("mistral")
    ids = tokens(40, seed=6)
    disk = dict(disk_dir=str(tmp_path / "disk"), disk_bytes="64MiB", disk_sync=False)
    first = new_store(model, **disk)
    _, turn = CachedModel(model, first).generate(ids, **GREEDY)  # puts 53 tokens, then the prompt's 40
    assert (turn.saved_tokens, turn.blocks_stored) == (53, 5)  # 0-16, 16-32, 32-48, tails 48-53 and 32-40
    first.close()  # flushes the write-behind to LMDB; the host pool is gone
    store = new_store(model, **disk)
    out, info = CachedModel(model, store).forward(ids)
    assert (info.loaded_tokens, info.computed_tokens) == (39, 1)
    assert store.stats()["tiers"]["lmdb"]["hits"] == 3  # 0-16, 16-32 and the tail 32-40
    assert max_diff(out.logits[:, -1], reference_logits(model, ids)[:, -1]) <= FP32_TOL


@pytest.mark.parametrize("policy, loaded", [("wait", 39), ("best_effort", 0)])
def test_prefetch_brings_a_disk_prefix_up_before_the_request(tmp_path, new_store, policy, loaded):
    model = tiny_model("llama")
    ids = tokens(40, seed=9)
    disk = dict(disk_dir=str(tmp_path / "disk"), disk_bytes="64MiB", disk_sync=False)
    first = new_store(model, **disk)
    CachedModel(model, first).forward(ids)
    first.close()
    store = new_store(model, **disk)  # the prefix is on disk only
    cached = CachedModel(model, store)
    gate = threading.Event()
    real_get = store.disk.get_into

    def held_get(key, out):
        gate.wait(10)
        return real_get(key, out)

    store.disk.get_into = held_get  # reads wait until the engine has asked (best_effort) or are let go (wait)
    handle = cached.prefetch(ids, policy=policy)
    if policy == "wait":
        gate.set()
    out, info = cached.forward(ids, prefetch=handle)
    gate.set()
    assert (info.loaded_tokens, info.computed_tokens) == (loaded, 40 - loaded)
    assert handle.closed and store.stats()["prefetch"]["pinned_blocks"] == 0
    assert max_diff(out.logits[:, -1], reference_logits(model, ids)[:, -1]) <= FP32_TOL


def test_salt_separates_tenants(new_store):
    model = tiny_model("llama")
    store = new_store(model)
    alice, bob = CachedModel(model, store, salt="alice"), CachedModel(model, store, salt=b"bob")
    ids = tokens(32, seed=7)
    assert alice.forward(ids)[1].loaded_tokens == 0
    assert bob.forward(ids)[1].loaded_tokens == 0
    assert bob.forward(ids, salt="alice")[1].loaded_tokens == 31  # a per-call salt overrides the wrapper's
    assert CachedModel(model, store).forward(ids)[1].loaded_tokens == 0  # unsalted is a tenant of its own


def test_store_returning_fewer_tokens_than_planned(new_store, monkeypatch):
    model = tiny_model("qwen2")
    store = new_store(model)
    cached = CachedModel(model, store)
    ids = tokens(40, seed=8)
    cached.forward(ids)
    real_load = store.load

    def load_after_eviction(toks, salt=None, **kwargs):
        store.host.delete(store.block_keys(toks, salt)[1].key)  # block 16-32 vanishes after the plan
        return real_load(toks, salt=salt, **kwargs)

    monkeypatch.setattr(store, "load", load_after_eviction)
    out, info = cached.forward(ids)
    assert (info.planned_tokens, info.fetched_tokens, info.loaded_tokens, info.computed_tokens) == (40, 16, 16, 24)
    assert max_diff(out.logits, reference_logits(model, ids)[:, 16:]) <= FP32_TOL
    assert (info.saved_tokens, info.blocks_stored) == (40, 1)  # the vanished block is stored again
    assert store.lookup(ids[0], salt=cached.key_salt()) == 40


def test_batch_loads_the_prefix_every_row_has(new_store):
    model = tiny_model("llama")
    cached = CachedModel(model, new_store(model))
    ids = tokens(40, seed=9, batch=2)
    cached.forward(ids[:1, :35])  # row 0: 32 tokens usable (the 35-token tail matches no prefix of 40)
    cached.forward(ids[1:, :20])  # row 1: 16
    out, info = cached.forward(ids)
    assert (info.batch_size, info.planned_tokens, info.loaded_tokens) == (2, 16, 16)
    assert max_diff(out.logits, reference_logits(model, ids)[:, 16:]) <= FP32_TOL
    mask = torch.ones_like(ids)
    generated, info = cached.generate(ids, attention_mask=mask, **GREEDY)
    assert info.loaded_tokens == 39
    assert torch.equal(generated, model.generate(ids, attention_mask=mask, **GREEDY))


def test_mismatched_layout_and_bad_requests_raise_value_error(new_store):
    model = tiny_model("llama")
    bf16_layout = layout_for(model, dtype=torch.bfloat16, block_tokens=BLOCK)
    with KVStore(bf16_layout, StoreConfig(host_bytes="1MiB")) as store:
        with pytest.raises(ValueError, match=r"store.layout.dtype: expected torch.float32 .*got torch.bfloat16"):
            CachedModel(model, store)
    with KVStore(layout_for(tiny_model("qwen2"), block_tokens=BLOCK), StoreConfig(host_bytes="1MiB")) as store:
        with pytest.raises(ValueError, match="num_kv_heads: expected 4 .*got 2"):
            CachedModel(model, store)
    with pytest.raises(ValueError, match="store: expected a KVStore"):
        CachedModel(model, object())
    cached = CachedModel(model, new_store(model))
    ids = tokens(10, seed=10)
    padded = torch.ones_like(ids)
    padded[0, 0] = 0
    with pytest.raises(ValueError, match="attention_mask: expected all ones"):
        cached.forward(ids, attention_mask=padded)
    with pytest.raises(ValueError, match="past_key_values: expected None"):
        cached.generate(ids, past_key_values=transformers.DynamicCache())
    with pytest.raises(ValueError, match="num_beams: expected 1.*got 2"):
        cached.generate(ids, num_beams=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids: expected integer ids"):
        cached.forward(torch.zeros((1, 0), dtype=torch.long))
    assert cached.store.lookup(ids[0]) == 0  # nothing was stored by the rejected requests


def test_cache_conversion_round_trips_exactly():
    kv = torch.randn(3, 2, 2, 7, 4, 8)  # [B, L, 2, n, H, D]
    cache = cache_from_kv(kv)
    assert cache.layers[1].keys.shape == (3, 4, 7, 8)
    assert torch.equal(cache.layers[1].values[2], kv[2, 1, 1].transpose(0, 1))
    for row in range(3):
        assert torch.equal(kv_from_cache(cache, row), kv[row])
    assert torch.equal(kv_from_cache(cache, 1, 5), kv[1, :, :, :5])
    assert kv_from_cache(cache, 1).is_contiguous()
    with pytest.raises(ValueError, match="num_tokens: expected at most the 7"):
        kv_from_cache(cache, 0, 8)


def test_prefill_is_reported_to_a_store_that_records_it(new_store):
    model = tiny_model("llama")
    store = new_store(model)
    recorded = []
    store.record_prefill = lambda num_tokens, seconds: recorded.append((num_tokens, seconds))
    cached = CachedModel(model, store)
    ids = tokens(30, seed=11, batch=2)
    _, info = cached.forward(ids)
    _, again = cached.forward(ids)
    assert [n for n, _ in recorded] == [60, 2]
    assert [s for _, s in recorded] == [info.prefill_seconds, again.prefill_seconds]


def test_kvstore_imports_without_transformers():
    out = run_python("""
        import sys
        sys.modules["transformers"] = None  # any import of it now fails
        import kvstore, kvstore.integrations
        print("ok", "transformers" in sys.modules and sys.modules["transformers"] is not None)
    """)
    assert out.strip() == "ok False"


def _other_weights(arch: str):
    """``tiny_model(arch)``'s shapes and config with other weights (a fine-tune, a retrained checkpoint)."""
    model = tiny_model(arch)
    torch.manual_seed(1)
    return type(model)(model.config).eval()


class _BufferLinear(torch.nn.Module):
    """A linear layer whose weight is a buffer, as GPTQ/AWQ layers keep theirs (``qweight``, ``scales``)."""

    def __init__(self, linear: torch.nn.Linear, scale: float):
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().clone() * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


def _with_buffer_weights(scale: float):
    model = copy.deepcopy(tiny_model("llama"))  # the cached one is shared with other tests
    for layer in model.model.layers:
        layer.self_attn.k_proj = _BufferLinear(layer.self_attn.k_proj, scale)
    return model


@pytest.mark.parametrize("pair", ["other weights", "other buffers"])
def test_a_model_with_other_weights_is_never_served_anothers_kv(tmp_path, pair):
    """Two models of one config but other weights, one after the other on one disk directory, with a store that
    names no model (the README's way): the second was served 39 tokens of the first one's KV. Weights in
    buffers count (GPTQ/AWQ layers keep theirs there, RoPE patches change ``inv_freq``): the digest read
    parameters only, and two such models shared KV 0.14 off."""
    first, second = ((tiny_model("llama"), _other_weights("llama")) if pair == "other weights" else
                     (_with_buffer_weights(1.0), _with_buffer_weights(1.5)))
    layout = layout_for(first, block_tokens=BLOCK)
    config = StoreConfig(host_bytes=0, disk_dir=str(tmp_path / "lmdb"), disk_bytes="4MiB", disk_sync=False,
                         prefill_tokens_per_second=1.0)
    ids = tokens(40, seed=11)
    with KVStore(layout, config) as store:
        assert CachedModel(first, store).forward(ids)[1].saved_tokens == 40
    with KVStore(layout, config) as store:
        out, info = CachedModel(second, store).forward(ids)
        assert info.loaded_tokens == 0
        assert max_diff(out.logits, reference_logits(second, ids)) <= FP32_TOL
        _, again = CachedModel(first, store).forward(ids)
        assert again.loaded_tokens == 39  # the first model's own blocks are still its own (all but the last token)


@pytest.mark.parametrize("change", ["in_place", "new_tensor", "buffer_in_place"])
def test_weights_changed_after_wrapping_are_never_served_the_old_kv(new_store, change):
    """The digest was taken once per wrapper: an optimizer step or an adapter merge changed the weights under
    it, and the next request loaded the old weights' KV (logits off by 0.02 on SmolLM2). Weights in buffers
    (a quantized layer's) are watched too."""
    model = _with_buffer_weights(1.0) if change == "buffer_in_place" else tiny_model("llama")
    cached = CachedModel(model, new_store(model))
    ids = tokens(40, seed=21)
    assert cached.forward(ids)[1].saved_tokens == 40
    weight = model.model.layers[0].self_attn.k_proj.weight
    with torch.no_grad():
        if change in ("in_place", "buffer_in_place"):
            weight.mul_(1.01)  # autograd's version counter moves
        else:
            weight.data = weight.data * 1.01  # a new tensor: its storage moves
    out, info = cached.forward(ids)
    assert info.loaded_tokens == 0
    assert max_diff(out.logits, reference_logits(model, ids)) <= FP32_TOL
    with torch.no_grad():
        weight.data.mul_(1.01)  # through .data in place: neither moves, so the caller says so
    cached.refresh_weights()
    assert cached.forward(ids)[1].loaded_tokens == 0


def test_a_model_built_under_inference_mode_is_wrapped_and_served(new_store):
    """Its parameters keep no version counter: reading it raised out of ``CachedModel(...)``."""
    with torch.inference_mode():
        model = tiny_model("llama")
    cached = CachedModel(model, new_store(model))
    ids = tokens(40, seed=24)
    cached.forward(ids)
    out, info = cached.forward(ids)
    assert info.loaded_tokens == 39
    assert max_diff(out.logits, reference_logits(model, ids)[:, 39:]) <= FP32_TOL


def test_labels_and_custom_generate_are_refused_before_the_store_is_touched(new_store):
    """``labels`` worked on a miss and raised on every hit (the model ran on the computed tokens only); a
    ``custom_generate`` loop passed the mode check and its save raised after generating."""
    model = tiny_model("llama")
    cached = CachedModel(model, new_store(model))
    ids = tokens(40, seed=22)
    with pytest.raises(ValueError, match="^labels: expected none"):
        cached.forward(ids, labels=ids)
    with pytest.raises(ValueError, match="^custom_generate: expected none"):
        cached.generate(ids, custom_generate=lambda *args, **kwargs: ids, **GREEDY)
    assert cached.store.stats()["store"]["puts"] == 0 and cached.store.lookup(ids[0]) == 0


def test_a_prefetch_handle_of_another_request_or_already_used_is_refused(new_store):
    """A handle of another salt found nothing, so no block compared unequal and the load silently loaded 0
    tokens; a handle a load had consumed did the same."""
    model = tiny_model("llama")
    cached = CachedModel(model, new_store(model))
    ids = tokens(40, seed=23)
    cached.forward(ids)
    other = cached.prefetch(ids, salt="another tenant")
    with pytest.raises(ValueError, match="^prefetch: expected a handle from prefetch\\(\\) of these tokens"):
        cached.forward(ids, prefetch=other)
    handle = cached.prefetch(ids)
    assert cached.forward(ids, prefetch=handle)[1].loaded_tokens == 39
    with pytest.raises(ValueError, match="^prefetch: expected an open handle"):
        cached.forward(ids, prefetch=handle)


def test_a_named_model_is_keyed_by_its_name_alone(new_store):
    """``model_id`` set: the operator names the weights, and no digest of them is taken."""
    model = tiny_model("llama")
    cached = CachedModel(model, new_store(model, model_id="llama-tiny"))
    assert cached.key_salt("tenant") == "tenant"
    cached.forward(tokens(20, seed=12))
    assert cached.store.lookup(tokens(20, seed=12)[0]) == 20


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_lookup_num_tokens=3), "expected greedy search or sampling .* got assisted_generation"),
    (dict(generation_config=transformers.GenerationConfig(num_beams=3)), "num_beams: expected 1.*got 3"),
    (dict(generation_config=transformers.GenerationConfig(num_return_sequences=2, do_sample=True)),
     "num_return_sequences: expected 1.*got 2"),
    (dict(num_beams=2, num_beam_groups=2, diversity_penalty=1.0), "num_beams: expected 1.*got 2"),
])
def test_generation_modes_that_do_not_continue_the_loaded_prefix_are_refused(new_store, kwargs, message):
    """Prompt lookup re-prefilled the whole prompt over the loaded prefix: other tokens came out, and the KV
    saved after it served later requests wrong logits. Beams given through ``generation_config`` got past
    the check and failed inside transformers on the next hit."""
    model = tiny_model("llama")
    cached = CachedModel(model, new_store(model))
    ids = tokens(40, seed=13)
    cached.forward(ids[:, :33])
    with pytest.raises(ValueError, match=message):
        cached.generate(ids, max_new_tokens=4, **kwargs)
    out, info = cached.forward(ids)
    assert info.loaded_tokens == 32 and max_diff(out.logits, reference_logits(model, ids)[:, 32:]) <= FP32_TOL


@pytest.mark.parametrize("implementation", ["static", "dynamic"])
def test_a_model_asking_for_its_own_cache_kind_generates_the_same_tokens(new_store, implementation):
    """A ``generation_config.cache_implementation`` (torch.compile setups ask for "static") made generate fail
    after the load: transformers refused it beside the wrapper's own cache."""
    model = _other_weights("llama")
    model.generation_config.cache_implementation = implementation
    cached = CachedModel(model, new_store(model))
    ids = tokens(37, seed=14)
    cached.forward(ids[:, :33])
    generated, info = cached.generate(ids, **GREEDY)
    assert info.loaded_tokens == 32
    model.generation_config.cache_implementation = None
    assert torch.equal(generated, model.generate(ids, **GREEDY))


def test_position_ids_given_for_the_whole_prompt_are_cut_to_the_computed_part(new_store):
    """``forward(ids, position_ids=...)`` raised inside the model on every hit: the positions were the whole
    prompt's while the model ran on the uncached tokens only."""
    model = tiny_model("llama")
    cached = CachedModel(model, new_store(model))
    ids = tokens(40, seed=15)
    cached.forward(ids[:, :33])
    out, info = cached.forward(ids, position_ids=torch.arange(40).unsqueeze(0))
    assert info.loaded_tokens == 32
    assert max_diff(out.logits, reference_logits(model, ids)[:, 32:]) <= FP32_TOL


def test_a_model_whose_keys_and_values_differ_in_width_is_refused_up_front():
    """Multi-head latent attention (DeepSeek-V2/V3): ``head_dim`` is the rotary part only, keys and values have
    other widths. Accepted, it failed in the save after the model had run."""
    config = transformers.DeepseekV3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                           moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None,
                                           qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
    with pytest.raises(ValueError, match="config.kv_lora_rank: expected a model whose keys and values have one"):
        layout_for(config, dtype=torch.float32)


def test_a_model_whose_config_turns_the_cache_off_generates_the_same_tokens(new_store):
    """A fine-tune saved after gradient-checkpointed training has ``use_cache=False`` in its config (MPT's
    default too): generate then ran without a cache and returned other tokens, hit or not."""
    model = _other_weights("llama")
    model.generation_config.use_cache = False
    cached = CachedModel(model, new_store(model))
    ids = tokens(40, seed=16)
    expected = model.generate(ids, **GREEDY, use_cache=True)
    cold, info = cached.generate(ids, **GREEDY)
    assert info.loaded_tokens == 0 and torch.equal(cold, expected)
    hit, info = cached.generate(ids, **GREEDY)
    assert info.loaded_tokens == 39 and torch.equal(hit, expected)
    assert torch.equal(cached.generate(ids, use_cache=None, **GREEDY)[0], expected)  # transformers' "default"
    with pytest.raises(ValueError, match="use_cache: expected True or None .*got 0"):
        cached.generate(ids, use_cache=0, **GREEDY)


@pytest.mark.parametrize("name, value", [
    ("position_ids", torch.arange(40).unsqueeze(0) + 100),
    ("position_ids", torch.arange(39).unsqueeze(0)),
    ("token_type_ids", torch.ones((1, 40), dtype=torch.long)),
    ("inputs_embeds", torch.zeros((1, 40, 64))),
])
@pytest.mark.parametrize("call", ["forward", "generate"])
def test_per_token_inputs_the_keys_do_not_cover_are_refused(new_store, name, value, call):
    """Positions 100.. (or GPT-2's token types) changed the KV of the same ids, stored under the ids' keys: a
    plain call of the same ids was then served it (logits off by 1.03 and 2.17)."""
    model = tiny_model("llama")
    cached = CachedModel(model, new_store(model))
    ids = tokens(40, seed=17)
    kwargs = dict(max_new_tokens=2) if call == "generate" else {}
    with pytest.raises(ValueError, match=f"^{name}: expected"):
        getattr(cached, call)(ids, **{name: value}, **kwargs)
    assert cached.store.lookup(ids[0]) == 0


def test_a_model_moved_to_another_dtype_is_refused_before_the_store(new_store):
    model = _other_weights("llama")
    cached = CachedModel(model, new_store(model))
    ids = tokens(20, seed=18)
    cached.forward(ids)
    model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="model dtype: expected torch.float32.*got torch.bfloat16"):
        cached.forward(ids)


def test_a_model_sharing_kv_across_layers_is_refused_up_front():
    """Gemma 3n's last layers reuse earlier layers' KV: the layout counted every layer, and the first save
    failed after the model had run."""
    config = transformers.Gemma3nTextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=16, num_kv_shared_layers=2)
    with pytest.raises(ValueError, match="config.num_kv_shared_layers: expected 0 .*got 2"):
        layout_for(config, dtype=torch.float32)


@pytest.mark.parametrize("model_id", [None, "llama-tiny"])
def test_switching_or_disabling_peft_adapters_is_never_served_another_adapters_kv(new_store, model_id):
    """Adapter state is no parameter: a LoRA wrapper saved under adapter ``a`` served those blocks to adapter
    ``b`` and to the base model with adapters disabled (39 tokens loaded, last logits 0.7 off)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    base = _other_weights("llama")
    lora = dict(r=4, target_modules=["k_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, peft.LoraConfig(**lora), adapter_name="a")
    model.add_adapter("b", peft.LoraConfig(**lora))
    model.set_adapter("a")
    model.eval()
    store = new_store(model) if model_id is None else new_store(model, model_id=model_id)
    cached = CachedModel(model, store)
    ids = tokens(40, seed=31)
    assert cached.forward(ids)[1].saved_tokens == 40

    def served() -> int:
        out, info = cached.forward(ids)
        assert max_diff(out.logits[:, -1], reference_logits(model, ids)[:, -1]) <= FP32_TOL
        return info.loaded_tokens

    model.set_adapter("b")
    assert served() == 0
    with model.disable_adapter():
        assert served() == 0
    model.base_model.model.model.layers[0].self_attn.k_proj.scaling["b"] *= 2  # rescaled, no parameter changed
    assert served() == 0
    model.set_adapter("a")
    assert served() == 39  # its own blocks are still its own (all but the last token)


def test_a_peft_prompt_learning_model_is_refused(new_store):
    """Prompt tuning prepends virtual tokens the token ids do not key: a hit was served KV without them."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_other_weights("llama"), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="expected no PEFT prompt learning"):
        CachedModel(model, new_store(model))


def test_save_keys_blocks_under_the_wrappers_salt_as_forward_does(new_store):
    """``save`` ignored the salt the wrapper was made with: its blocks went under no salt, where the
    wrapper's own requests never looked for them."""
    model = tiny_model("llama")
    cached = CachedModel(model, new_store(model, model_id="llama-tiny"), salt="tenant")
    ids = tokens(32, seed=41)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    assert cached.save(ids, cache, 32) == 2
    assert cached.store.lookup(ids[0], salt="tenant") == 32 and cached.store.lookup(ids[0]) == 0
    assert cached.forward(ids)[1].loaded_tokens == 31
