"""A request's KV between a store and vLLM-layout pages: ``save_paged`` and ``block_sink``, byte-exact.

Both save paths (straight into host slots when a block spans many pages,
staged when it is a page or two) and both sink paths (block by block, or a
layer's small blocks joined first) must give the same bytes back, into other
pages, for a range that starts inside the request and ends inside a block.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_kv, make_tokens, tiny_layout
from kvstore import KVStore, StoreConfig
from kvstore.integrations.paged import VLLMPagedAdapter
from kvstore.integrations.paged_store import DIRECT_PAGES, block_sink, save_paged

PAGE = 4
TOKENS = 72  # not a multiple of any block size below: a partial tail block


def _pages(lay, num_pages: int = 64) -> VLLMPagedAdapter:
    caches = [torch.zeros(2, num_pages, PAGE, lay.num_kv_heads, lay.head_dim, dtype=lay.dtype)
              for _ in range(lay.num_layers)]
    return VLLMPagedAdapter(lay, caches)


def _table(seed: int, n: int = TOKENS // PAGE + 1) -> list[int]:
    return torch.randperm(64, generator=torch.Generator().manual_seed(seed))[:n].tolist()


@pytest.mark.parametrize("block_tokens", [PAGE, 2 * PAGE, DIRECT_PAGES * PAGE])  # staged, staged, direct
@pytest.mark.parametrize("start", [0, 1])  # in blocks: saving from the second block on
def test_saved_pages_load_back_byte_exact_into_other_pages(block_tokens, start):
    lay = tiny_layout(block_tokens=block_tokens)
    tokens, kv = make_tokens(TOKENS, seed=block_tokens), make_kv(lay, TOKENS, seed=block_tokens)
    source, table = _pages(lay), _table(1)
    source.scatter(kv, source.locate(table, TOKENS))
    first = start * block_tokens
    with KVStore(lay, StoreConfig(host_bytes=64 * lay.block_bytes)) as store:
        blocks = -(-TOKENS // block_tokens)
        assert save_paged(store, tokens, source, table, start=first) == blocks - start
        assert store.lookup(tokens) == (0 if start else TOKENS)
        if start:
            store.put(tokens[:first], kv[:, :, :first])
        target, other = _pages(lay), _table(2)
        begin, end = PAGE, TOKENS - 3  # vLLM already holds the first page; the last tokens are computed
        with store.load(tokens, layer_wise=True, sink=block_sink(target, other, begin, end)) as loader:
            loader.wait_layer(lay.num_layers - 1)
            assert loader.num_tokens == TOKENS
    got = target.gather(target.locate(other, end - begin, start=begin))
    assert torch.equal(got.view(torch.uint8), kv[:, :, begin:end].contiguous().view(torch.uint8))
    untouched = target.gather(target.locate(other, begin))  # outside [begin, end): nothing written
    assert not untouched.view(torch.uint8).any()


def test_a_save_of_stored_blocks_gathers_nothing():
    lay = tiny_layout(block_tokens=DIRECT_PAGES * PAGE)
    tokens, kv = make_tokens(TOKENS), make_kv(lay, TOKENS)
    source, table = _pages(lay), _table(3)
    source.scatter(kv, source.locate(table, TOKENS))
    with KVStore(lay, StoreConfig(host_bytes=64 * lay.block_bytes)) as store:
        store.put(tokens, kv)
        for cache in source.kv_caches:
            cache.fill_(float("nan"))  # a gather now would store different bytes
        assert save_paged(store, tokens, source, table) == 0
        got = store.get(tokens)
    assert torch.equal(got.view(torch.uint8), kv.view(torch.uint8))


@pytest.mark.parametrize("path", ["staged", "direct", "copy-engine"])
@pytest.mark.parametrize("bad", ["short", "out-of-range", "negative"])
def test_a_bad_block_table_stores_nothing_and_is_a_value_error(path, bad):
    """Checked block by block, a table covering only the first block (or with a bad last id) stored the blocks
    before it, then raised: a FillError (no ValueError) on the direct path, after the first chunk was queued
    on the copy engine's staged path."""
    from kvstore.integrations.vllm_copy import CopyEngine

    block_tokens = PAGE if path == "staged" else DIRECT_PAGES * PAGE
    lay = tiny_layout(block_tokens=block_tokens)
    tokens, kv = make_tokens(TOKENS, seed=7), make_kv(lay, TOKENS, seed=7)
    source, table = _pages(lay), _table(4)
    source.scatter(kv, source.locate(table, TOKENS))
    last = (TOKENS - 1) // PAGE  # the page of the last token
    table = {"short": table[:block_tokens // PAGE], "out-of-range": table[:last] + [99],
             "negative": table[:last] + [-1]}[bad]
    with KVStore(lay, StoreConfig(host_bytes=64 * lay.block_bytes)) as store:
        with pytest.raises(ValueError, match="^block_table: expected"):
            if path == "copy-engine":
                engine = CopyEngine(store, source, staging_bytes=4 * lay.block_bytes, staged=True)
                try:
                    engine.save(tokens, None, table, 0)
                finally:
                    engine.close()
            else:
                save_paged(store, tokens, source, table)
        assert store.lookup(tokens) == 0 and store.host.used_bytes() == 0
