"""Models and calls whose KV the keys do not determine are refused with a ``ValueError`` before any tier is
touched: each was served wrong KV under a right key (tiny random models; the audit's figures are in
``integrations/transformers_checks.py``)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import model_stores  # noqa: E402
from kvstore.integrations.transformers import CachedModel  # noqa: E402

BLOCK = 16
VOCAB = 512
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, initializer_range=0.1)


@pytest.fixture
def new_store():
    with model_stores(BLOCK, "4MiB") as factory:
        yield factory


def _model(config_name: str, model_name: str, **extra):
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**SMALL, **extra})
    return getattr(transformers, model_name)(config).eval()


def _ids(num: int, seed: int = 0, low: int = 3) -> torch.Tensor:
    return torch.randint(low, VOCAB, (1, num), generator=torch.Generator().manual_seed(seed))


def _untouched(store) -> None:
    figures = store.stats()["store"]
    assert figures["lookups"] == 0 and figures["puts"] == 0, figures


@pytest.mark.parametrize("kind", ["longrope", "dynamic"])
def test_rope_that_follows_the_prompts_length_is_refused(new_store, kind):
    if kind == "longrope":  # Phi-3-mini-128k, Phi-3.5: long factors past original_max_position_embeddings
        model = _model("Phi3Config", "Phi3ForCausalLM", original_max_position_embeddings=32, pad_token_id=0,
                       rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8})
    else:
        model = _model("LlamaConfig", "LlamaForCausalLM", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    store = new_store(model)
    with pytest.raises(ValueError, match=f"rope_parameters: expected RoPE that does not depend .*{kind}"):
        CachedModel(model, store)


def test_an_encoder_decoder_is_refused(new_store):
    model = _model("BartConfig", "BartForConditionalGeneration", d_model=64, encoder_layers=2, decoder_layers=2,
                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128)
    with pytest.raises(ValueError, match="expected a decoder-only causal LM, got an encoder-decoder"):
        CachedModel(model, new_store(model))


def test_a_model_in_training_mode_with_dropout_is_refused_per_call(new_store):
    model = _model("GPT2Config", "GPT2LMHeadModel", n_embd=64, n_layer=2, n_head=4, n_positions=256)
    store = new_store(model)
    cached = CachedModel(model, store)
    model.train()
    try:
        with pytest.raises(ValueError, match=r"expected eval mode .*dropout .*p=0.1"):
            cached.forward(_ids(40))
        _untouched(store)
    finally:
        model.eval()
    out, info = cached.forward(_ids(40))  # in eval mode: served
    assert info.computed_tokens == 40


def test_a_model_in_training_mode_without_dropout_is_served(new_store):
    """GPT-NeoX built from a config is in training mode, with no dropout of its own (a classifier head's
    ``classifier_dropout`` is not the LM's): its forward is the same in either mode."""
    model = _model("GPTNeoXConfig", "GPTNeoXForCausalLM", classifier_dropout=0.1).train()
    cached = CachedModel(model, new_store(model))
    cached.forward(_ids(40))
    out, info = cached.forward(_ids(40))
    assert info.loaded_tokens == 39
    with torch.no_grad():
        assert torch.allclose(out.logits[0, -1], model(_ids(40)).logits[0, -1], atol=1e-4)


def test_a_call_under_autocast_is_refused(new_store):
    model = _model("LlamaConfig", "LlamaForCausalLM")
    store = new_store(model)
    cached = CachedModel(model, store)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match="torch.autocast: expected none on cpu"):
            cached.forward(_ids(40))
    _untouched(store)


def test_ids_past_the_vocabulary_are_refused_before_the_store(new_store):
    model = _model("LlamaConfig", "LlamaForCausalLM")
    store = new_store(model)
    ids = _ids(20)
    ids[0, 5] = VOCAB + 7
    with pytest.raises(ValueError, match=f"expected ids below the vocabulary size {VOCAB}, got {VOCAB + 7}"):
        CachedModel(model, store).generate(ids, max_new_tokens=2)
    _untouched(store)


def test_generate_over_a_prompt_holding_the_pad_token_is_refused(new_store):
    """``generate`` masks a pad id that is not also an end-of-sequence id; the KV of those ids was served to
    ``forward``, which attends to them (last logits 0.27 off), and the other way round (0.66)."""
    model = _model("LlamaConfig", "LlamaForCausalLM", pad_token_id=0, eos_token_id=2, bos_token_id=1)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    store = new_store(model)
    cached = CachedModel(model, store)
    ids = _ids(40)
    ids[0, 10] = 0
    with pytest.raises(ValueError, match=r"expected no pad_token_id=0 .*\(0, 10\)"):
        cached.generate(ids, max_new_tokens=2, do_sample=False)
    _untouched(store)
    ones = torch.ones_like(ids)  # a mask given (a tokenizer's): generate infers none, the pad id is a token
    sequences, info = cached.generate(ids, attention_mask=ones, max_new_tokens=2, do_sample=False)
    again, info = cached.generate(ids, attention_mask=ones, max_new_tokens=2, do_sample=False)
    with torch.no_grad():
        reference = model.generate(ids, attention_mask=ones, max_new_tokens=2, do_sample=False)
    assert info.loaded_tokens == 39 and torch.equal(sequences, reference) and torch.equal(again, reference)
    model.generation_config.pad_token_id = 2  # pad is eos: generate masks nothing
    sequences, info = cached.generate(ids, max_new_tokens=2, do_sample=False)
    with torch.no_grad():
        assert torch.equal(sequences, model.generate(ids, max_new_tokens=2, do_sample=False))


def test_save_refuses_a_cache_that_does_not_hold_every_token_from_the_start(new_store):
    """A sliding-window cache keeps only its last tokens: ``save`` stored tokens 29..39 as the KV of 0..10
    (last logits 2.59 off on the hit); lengths and rows that do not fit the cache raised IndexError."""
    model = _model("MistralConfig", "MistralForCausalLM", num_key_value_heads=2, sliding_window=12)
    store = new_store(model)
    cached = CachedModel(model, store)
    ids = _ids(40)
    with torch.no_grad():
        windowed = model(ids, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="expected plain DynamicLayer layers .*DynamicSlidingWindowLayer"):
        cached.save(ids, windowed, 11)
    out, _ = cached.forward(ids, save=False)
    with pytest.raises(ValueError, match=r"lengths: expected token counts in 1 .. 40 .*-3"):
        cached.save(ids, out.past_key_values, -3)
    with pytest.raises(ValueError, match="expected 2 rows of at least 40 tokens .*got 1 rows"):
        cached.save(torch.cat([ids, ids]), out.past_key_values, 40)
    assert store.lookup(ids[0], salt=cached.key_salt()) == 0
    assert cached.save(ids, out.past_key_values, 40) == 3  # its own cache: every token from position 0
    assert store.lookup(ids[0], salt=cached.key_salt()) == 40
