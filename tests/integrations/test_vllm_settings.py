"""What the vLLM connector reads from a deployment: settings, ranks, cache layouts and what a request's keys bind.

The module is duck-typed over vLLM's objects, so ``SimpleNamespace`` stand-ins
serve here. Bad settings are a ``ValueError`` naming the key; a multimodal
item binds the blocks from its placeholder tokens on, through words no
vocabulary reaches, and a prompt given as embeddings is not keyed at all.
"""

from __future__ import annotations

import os
from types import SimpleNamespace as NS

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import StoreConfig
from kvstore.integrations.vllm_settings import (MM_TOKEN_BIT, MM_WORDS, RankPlace, connector_settings, key_tokens,
                                                layout_from_caches, model_id_of, rank_place, rank_store_config,
                                                request_salt)


def _config(extra=None, page=16, cache_dtype="auto", dtype=torch.bfloat16, mla=False, tp=1, pp=1, dp=1):
    return NS(kv_transfer_config=NS(kv_connector_extra_config=extra, engine_id="engine-1"),
              cache_config=NS(block_size=page, cache_dtype=cache_dtype),
              model_config=NS(model="org/model", revision=None, dtype=dtype, use_mla=mla),
              parallel_config=NS(pipeline_parallel_size=pp, tensor_parallel_size=tp, data_parallel_size=dp,
                                 data_parallel_rank=0))


def _settings(extra=None, environ=None, **config):
    return connector_settings(_config(extra, **config), environ or {})


def _item(identifier, offset, length, modality="image"):
    return NS(modality=modality, identifier=identifier, mm_position=NS(offset=offset, length=length))


def _request(tokens, *items, **fields):
    return NS(prompt_token_ids=tokens, mm_features=list(items), **fields)


def test_defaults():
    got = _settings()
    assert (got.block_tokens, got.async_load, got.salt, got.staging_bytes, got.lookup_timeout_s, got.model_named) == (
        256, False, None, 256 << 20, 1.0, False)
    assert got.store == StoreConfig()
    assert _settings(None).block_tokens == 256  # kv_connector_extra_config not given at all


@pytest.mark.parametrize("page,expected", [(16, 256), (48, 288), (512, 512), (1, 256)])
def test_default_block_tokens_is_a_multiple_of_the_page(page, expected):
    assert _settings(page=page).block_tokens == expected


def test_settings_from_extra_config_and_environment(tmp_path):
    got = _settings({"block_tokens": 64, "async_load": True, "salt": "tenant", "staging_bytes": "64MiB",
                     "lookup_timeout_s": 60, "host_bytes": "4MiB", "disk_dir": str(tmp_path),
                     "scheduler_host_bytes": "1GiB"}, {"KVSTORE_DISK_BYTES": "8MiB"})
    assert (got.block_tokens, got.async_load, got.salt, got.staging_bytes) == (64, True, "tenant", 64 << 20)
    assert got.lookup_timeout_s == 60.0 and isinstance(got.lookup_timeout_s, float)
    assert (got.store.host_bytes, got.store.disk_dir, got.store.disk_bytes) == (4 << 20, str(tmp_path), 8 << 20)
    assert _settings({"staging_bytes": 2 << 20}).staging_bytes == 2 << 20
    assert _settings({"lookup_timeout_s": 0.25}).lookup_timeout_s == 0.25


@pytest.mark.parametrize("key,value", [
    ("block_tokens", 40), ("block_tokens", 0), ("block_tokens", True), ("block_tokens", "64"),
    ("async_load", "yes"), ("async_load", 1), ("salt", ""), ("salt", 5),
    ("staging_bytes", "1KiB"), ("staging_bytes", "lots"), ("staging_bytes", -1), ("staging_bytes", True),
    ("lookup_timeout_s", 0), ("lookup_timeout_s", -1), ("lookup_timeout_s", 60.5), ("lookup_timeout_s", True),
    ("lookup_timeout_s", "1"), ("host_bytes", "much"), ("no_such_setting", 1), ("config", 5), ("config", ""),
    ("config", ["a.toml"]),
])
def test_a_bad_setting_is_a_value_error_naming_it(key, value):
    with pytest.raises(ValueError, match=key):
        _settings({key: value})


def test_model_named_by_extra_config_or_environment():
    assert _settings({"model_id": "llama-3-8b@abc"}).model_named
    assert _settings({"model_id": "llama-3-8b@abc"}).store.model_id == "llama-3-8b@abc"
    by_env = _settings(environ={"KVSTORE_MODEL_ID": "from-env"})
    assert by_env.model_named and by_env.store.model_id == "from-env"
    config = _config()
    assert model_id_of(by_env, config) == "from-env"
    assert not _settings(environ={"KVSTORE_HOST_BYTES": "2MiB"}).model_named


def test_model_id_of_an_unnamed_model_comes_from_its_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights")
    config = _config()
    config.model_config.model = str(tmp_path / "model")
    assert model_id_of(_settings(), config).startswith("weights-sha256:")


def test_engine_settings_that_change_the_kv_are_bound_in_the_model_id(tmp_path, monkeypatch):
    """``--hf-overrides`` of the RoPE base and scaling on the same weights: both engines had one model id
    and one layout, and the second loaded KV rotated with the first one's RoPE."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights")
    ids = {}
    for name, overrides, quantization in [("plain", {}, None), ("rope", {"rope_theta": 1e6}, None),
                                          ("yarn", {"rope_theta": 1e6, "rope_scaling": {"rope_type": "yarn"}}, None),
                                          ("fp8", {}, "fp8")]:
        config = _config()
        config.model_config.model = str(tmp_path / "model")
        config.model_config.hf_overrides, config.model_config.quantization = overrides, quantization
        ids[name] = model_id_of(_settings(), config)
    assert len(set(ids.values())) == 4
    weights = ids["plain"]
    assert weights.startswith("weights-sha256:") and "|" not in weights  # plain deployments keep their ids
    named = _config(extra={"model_id": "llama"})
    named.model_config.hf_overrides, named.model_config.quantization = {"rope_theta": 1e6}, None
    assert model_id_of(_settings({"model_id": "llama"}), named).startswith("llama|engine-")


def test_an_fp8_cache_binds_the_models_own_dtype_in_the_model_id(tmp_path, monkeypatch):
    """With ``--kv-cache-dtype fp8`` the layout's dtype is the cache's: an fp16 engine and a bf16 engine on the
    same weights had one model id and one layout, and the bf16 one was served the fp16 one's pages."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights")
    ids = {}
    for cache in ("auto", "fp8"):
        for dtype in (torch.float16, torch.bfloat16):
            config = _config(cache_dtype=cache, dtype=dtype)
            config.model_config.model = str(tmp_path / "model")
            ids[cache, dtype] = model_id_of(_settings(), config)
    assert ids["fp8", torch.float16] != ids["fp8", torch.bfloat16]
    assert ids["auto", torch.float16] == ids["auto", torch.bfloat16]  # the layout's dtype tells them apart
    assert "|" not in ids["auto", torch.float16]  # plain deployments keep their ids


@pytest.mark.parametrize("name", ["int8_per_token_head", "nvfp4"])
def test_a_cache_dtype_kvstore_does_not_store_is_named_in_the_error(name):
    caches = [torch.empty(4, 2, 16, 32, dtype=torch.uint8)]
    with pytest.raises(ValueError, match=f"cache_config.cache_dtype: expected 'auto' or one of .*got '{name}'"):
        layout_from_caches(_config(cache_dtype=name), caches, 0, 16, RankPlace("e"))


def test_rank_store_config_gives_each_rank_its_own_disk_dir(tmp_path):
    base = _settings({"disk_dir": str(tmp_path)})
    alone = rank_store_config(base, RankPlace("e"), "model-a")
    assert (alone.disk_dir, alone.model_id) == (str(tmp_path), "model-a")
    dirs = {rank_store_config(base, RankPlace("e", tp_rank=r, tp_size=2), "model-a").disk_dir for r in (0, 1)}
    dirs |= {rank_store_config(base, RankPlace("e", pp_rank=1, pp_size=2), "m").disk_dir}
    dirs |= {rank_store_config(base, RankPlace("e", dp_rank=1, dp_size=2), "m").disk_dir}
    assert len(dirs) == 4
    assert all(os.path.dirname(d) == str(tmp_path) for d in dirs)
    assert rank_store_config(_settings(), RankPlace("e", tp_size=2), "m").disk_dir is None


def test_rank_place_and_peers():
    place = rank_place(_config(tp=3, pp=2, dp=2), worker=True)  # no vLLM parallel state here: rank 0
    assert place == RankPlace("engine-1", dp_size=2, pp_size=2, tp_size=3)
    assert place.peers() == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert place.shared_node and not RankPlace("e").shared_node
    assert RankPlace("e").peers() == [(0, 0)]


@pytest.mark.parametrize("shape,mla,expected", [
    ((10, 4, 16, 2 * 64), False, (4, 64, 2)),  # standardized [B, H, page, 2D]
    ((2, 10, 16, 4, 64), False, (4, 64, 2)),  # legacy [2, B, page, H, D]
    ((10, 16, 576), True, (1, 576, 1)),  # MLA [B, page, D]
    ((10, 1, 16, 576), True, (1, 576, 1)),  # MLA as a standardized view
])
def test_layout_from_caches(shape, mla, expected):
    place = RankPlace("e", tp_rank=1, tp_size=2, pp_rank=1, pp_size=2)
    caches = [torch.empty(shape, dtype=torch.bfloat16) for _ in range(3)]
    lay = layout_from_caches(_config(mla=mla), caches, first_layer=12, block_tokens=64, place=place)
    assert (lay.num_kv_heads, lay.head_dim, lay.kv_parts) == expected
    assert (lay.num_layers, lay.first_layer, lay.block_tokens, lay.dtype) == (3, 12, 64, torch.bfloat16)
    assert (lay.tp_rank, lay.tp_size) == ((0, 1) if mla else (1, 2))  # a latent cache is not sharded


@pytest.mark.parametrize("name,dtype", [("fp8", torch.float8_e4m3fn), ("fp8_e4m3", torch.float8_e4m3fn),
                                        ("fp8_e5m2", torch.float8_e5m2), ("auto", torch.float16),
                                        ("fp8_ds_mla", torch.uint8)])
def test_layout_dtype_is_the_cache_dtype(name, dtype):
    caches = [torch.empty(4, 2, 16, 32, dtype=torch.uint8)]  # vLLM allocates fp8 caches as bytes
    lay = layout_from_caches(_config(cache_dtype=name, dtype=torch.float16), caches, 0, 16, RankPlace("e"))
    assert lay.dtype == dtype


def test_layout_of_an_unknown_cache_shape_is_a_value_error():
    with pytest.raises(ValueError, match="kv_caches"):
        layout_from_caches(_config(), [torch.empty(4, 16)], 0, 16, RankPlace("e"))


def test_key_tokens_of_a_text_prompt_is_the_prompt():
    assert key_tokens(_request([5, 6, 7])) == [5, 6, 7]
    assert key_tokens(NS(prompt_token_ids=(1, 2))) == [1, 2]  # no mm_features attribute at all
    assert key_tokens(_request(None)) is None  # prompt embeds: not stored


def test_key_tokens_replace_placeholders_by_the_items_words():
    prompt = list(range(100, 140))
    a = key_tokens(_request(prompt, _item("img-a", 10, 12)))
    b = key_tokens(_request(prompt, _item("img-b", 10, 12)))
    assert a[:10] == b[:10] == prompt[:10] and a[22:] == b[22:] == prompt[22:]
    assert all(t >= MM_TOKEN_BIT for t in a[10:22] + b[10:22])
    assert all(x != y for x, y in zip(a[10:22], b[10:22]))
    assert key_tokens(_request(prompt, _item("img-a", 10, 12, "audio"))) != a
    shifted = key_tokens(_request(prompt, _item("img-a", 11, 12)))
    assert shifted[10] == prompt[10] and shifted != a
    assert key_tokens(_request(prompt, _item("img-a", 10, 12))) == a  # deterministic


def test_key_tokens_clip_items_outside_the_prompt():
    prompt = [1, 2, 3, 4]
    assert key_tokens(_request(prompt, _item("x", 100, 8))) == prompt
    clipped = key_tokens(_request(prompt, _item("x", -2, 4)))
    assert clipped[2:] == [3, 4] and min(clipped[:2]) >= MM_TOKEN_BIT


def test_request_salt():
    assert request_salt(_request([1])) is None
    assert request_salt(NS()) is None
    salts = {request_salt(_request([1], cache_salt="a")), request_salt(_request([1]), extra="a"),
             request_salt(_request([1], lora_request=NS(lora_name="a"))),
             request_salt(_request([1], lora_request=NS(lora_name="b")))}
    assert len(salts) == 4 and None not in salts
    assert request_salt(_request([1], _item("img", 0, MM_WORDS))) is None  # long enough: bound via its tokens
    short = [request_salt(_request([1, 2, 3], _item(i, 1, 2))) for i in ("img-a", "img-b")]
    assert short[0] and short[1] and short[0] != short[1]
    moved = request_salt(_request([1, 2, 3], _item("img-a", 0, 2)))
    assert moved != short[0]


_ids = st.text(min_size=1, max_size=12)


@st.composite
def _prompts(draw):
    tokens = draw(st.lists(st.integers(0, MM_TOKEN_BIT - 1), min_size=1, max_size=200))
    cuts = sorted(draw(st.lists(st.integers(0, len(tokens)), max_size=8, unique=True)))
    spans = [(lo, hi) for lo, hi in zip(cuts[::2], cuts[1::2]) if hi > lo]  # disjoint, in the prompt
    return tokens, [(lo, hi - lo, draw(_ids)) for lo, hi in spans]


@settings(max_examples=200, deadline=None)
@given(prompt=_prompts(), other=_ids)
def test_key_tokens_keep_text_and_mark_every_placeholder(prompt, other):
    tokens, spans = prompt
    keyed = key_tokens(_request(tokens, *[_item(ident, off, n) for off, n, ident in spans]))
    inside = {j for off, n, _ in spans for j in range(off, off + n)}
    assert len(keyed) == len(tokens)
    for j, (was, now) in enumerate(zip(tokens, keyed)):
        assert (now >= MM_TOKEN_BIT) if j in inside else (now == was)
    if spans and other != spans[0][2]:
        swapped = [(off, n, other if i == 0 else ident) for i, (off, n, ident) in enumerate(spans)]
        assert key_tokens(_request(tokens, *[_item(ident, off, n) for off, n, ident in swapped])) != keyed


def test_a_lora_name_pointed_at_another_adapter_is_another_salt():
    """vLLM keys a LoRA by name and path: a retrained adapter redeployed under the same name must not be
    served the KV the old adapter computed (a persistent or shared tier still holds it)."""
    v1 = request_salt(_request([1], lora_request=NS(lora_name="bot", lora_int_id=1, lora_path="/a/bot-v1")))
    v2 = request_salt(_request([1], lora_request=NS(lora_name="bot", lora_int_id=1, lora_path="/a/bot-v2")))
    assert v1 and v2 and v1 != v2
    assert v1 == request_salt(_request([1], lora_request=NS(lora_name="bot", lora_int_id=7, lora_path="/a/bot-v1")))


def _mixed(tokens, mask, seed, dtype=torch.float32):
    embeds = torch.randn(len(tokens), 8, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return _request(tokens, prompt_embeds=embeds, prompt_is_token_ids=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_positions_given_as_embeddings_bind_their_embeddings(dtype):
    """Mixed mode (chat parts given as ``prompt_embeds``): the placeholder ids at embedding positions say
    nothing of the KV there, so two requests whose embeddings differ share only the text before them."""
    tokens = list(range(100, 116)) + [5] * 12 + list(range(200, 216))
    mask = [True] * 16 + [False] * 12 + [True] * 16
    a, b = key_tokens(_mixed(tokens, mask, 1, dtype)), key_tokens(_mixed(tokens, mask, 2, dtype))
    assert a[:16] == b[:16] == tokens[:16] and a[28:] == b[28:] == tokens[28:]
    assert all(t >= MM_TOKEN_BIT for t in a[16:28] + b[16:28]) and a[16:28] != b[16:28]
    assert key_tokens(_mixed(tokens, mask, 1, dtype)) == a  # the same embeddings: the same keys
    assert request_salt(_mixed(tokens, mask, 1, dtype)) is None  # a run as long as MM_WORDS binds through its words
    one = [True] * 16 + [False] + [True] * 27  # a run shorter than MM_WORDS is also salted by its digest
    salts = {request_salt(_mixed(tokens, one, seed, dtype)) for seed in (1, 2)}
    assert len(salts) == 2 and None not in salts


def test_embeddings_without_a_mask_bind_every_position():
    tokens = list(range(100, 132))
    a, b = key_tokens(_mixed(tokens, None, 1)), key_tokens(_mixed(tokens, None, 2))
    assert all(t >= MM_TOKEN_BIT for t in a + b) and a != b


@pytest.mark.parametrize("name", ["decode_context_parallel_size", "prefill_context_parallel_size"])
@pytest.mark.parametrize("worker", [False, True])
def test_context_parallelism_is_refused_at_start_up(name, worker):
    """Under DCP/PCP a rank's pages hold an interleaved share of a block's tokens (with MLA every rank has the
    same layout): stored through a shared tier, one rank's share would be served to another as the prefix."""
    config = _config(tp=2)
    setattr(config.parallel_config, name, 2)
    with pytest.raises(ValueError, match=f"parallel_config.{name}: expected 1 .* got 2"):
        rank_place(config, worker)
    setattr(config.parallel_config, name, 1)
    assert rank_place(config, worker).tp_size == 2
