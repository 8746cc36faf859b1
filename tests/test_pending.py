"""``put_from``: the engine writes each new block straight into the store's memory (one copy, nothing staged)."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_same_kv, make_kv, make_tokens
from kvstore.pending import FillError

TOKENS = 40  # blocks of 16: two full blocks and a partial one


def filler(kv: torch.Tensor, calls: list, fail_at: int | None = None):
    """A fill that copies the block's tokens out of ``kv`` (the engine's KV) and records each call."""
    def fill(block, dst):
        calls.append((block.start, block.end, dst))
        if block.start == fail_at:
            raise OSError("engine buffer gone")
        dst.copy_(kv[:, :, block.start:block.end])
    return fill


def _inside(store, t: torch.Tensor) -> bool:
    pool = store.host._pool
    start = pool.data_ptr()
    return start <= t.data_ptr() < start + pool.nbytes


def test_each_new_block_is_filled_once_straight_into_a_host_slot(make_store, layout):
    store = make_store("host")
    tokens, kv = make_tokens(TOKENS), make_kv(layout, TOKENS)
    calls = []
    assert store.put_from(tokens, filler(kv, calls)) == 3
    assert [(s, e) for s, e, _ in calls] == [(0, 16), (16, 32), (32, 40)]
    for start, end, dst in calls:
        assert tuple(dst.shape) == layout.shape(end - start) and _inside(store, dst)  # the slot itself
    assert_same_kv(store.get(tokens), kv)
    assert store.put_from(tokens, filler(kv, calls)) == 0 and len(calls) == 3  # dedup: no fill at all


def test_blocks_before_start_are_not_filled(make_store, layout):
    store = make_store("host")
    tokens, kv = make_tokens(TOKENS), make_kv(layout, TOKENS)
    calls = []
    assert store.put_from(tokens, filler(kv, calls), start=16) == 2
    assert [(s, e) for s, e, _ in calls] == [(16, 32), (32, 40)]
    assert store.lookup(tokens) == 0  # the first block was never stored


@pytest.mark.parametrize("mode", ["both", "disk"])
def test_lower_tiers_get_the_same_bytes(make_store, layout, mode):
    store = make_store(mode)
    tokens, kv = make_tokens(TOKENS, seed=3), make_kv(layout, TOKENS, seed=3)
    calls = []
    assert store.put_from(tokens, filler(kv, calls)) == 3
    assert len(calls) == 3  # filled once, even where a serializing tier takes it
    assert store.flush(10)
    if store.host is not None:
        for block in store.block_keys(tokens):
            assert store.host.delete(block.key)
    assert_same_kv(store.get(tokens), kv)  # from LMDB


def test_a_failing_fill_stores_nothing_of_that_block_and_blames_no_tier(make_store, layout):
    store = make_store("both")
    tokens, kv = make_tokens(TOKENS, seed=4), make_kv(layout, TOKENS, seed=4)
    with pytest.raises(FillError, match=r"^fill of tokens \[16, 32\) raised OSError\('engine buffer gone'\)$"):
        store.put_from(tokens, filler(kv, [], fail_at=16))
    assert store.lookup(tokens) == 16  # the block before it stays stored, in every tier
    assert store.flush(10) and store.host.delete(store.block_keys(tokens)[0].key)
    assert store.lookup(tokens) == 16
    stats = store.stats()
    assert all(tier["errors"] == 0 for tier in stats["tiers"].values())
    assert store.put_from(tokens, filler(kv, [])) == 2  # and the store goes on
    assert_same_kv(store.get(tokens), kv)


def test_bad_arguments_are_refused(make_store):
    store = make_store("host")
    tokens = make_tokens(TOKENS)
    with pytest.raises(ValueError, match=r"^start: expected a block boundary in \[0, 16, 32, 40\], got 5$"):
        store.put_from(tokens, lambda block, dst: None, start=5)
    with pytest.raises(ValueError, match=r"^fill: expected a callable fill\(block, dst\), got str$"):
        store.put_from(tokens, "fill")


@pytest.mark.parametrize("tier", ["host", "lmdb", "files"])
def test_a_prompt_stored_block_by_block_keeps_its_head_the_most_recently_used(tmp_path, layout, tier):
    """put_from (vLLM's worker and ``save_paged``) stored a block a call: the prompt's first block was the least
    recently used, and one eviction lost the whole prompt. It is one put, as ``put`` is."""
    from kvstore import KVStore, StoreConfig
    from kvstore.blockformat import HEADER_BYTES

    capacity = 4 * (layout.block_bytes + HEADER_BYTES)  # the prompt's four blocks
    settings = {"host": dict(host_bytes=4 * layout.block_bytes),
                "lmdb": dict(host_bytes=0, disk_dir=str(tmp_path / "lmdb"), disk_bytes=capacity, disk_sync=False),
                "files": dict(host_bytes=0, files_dir=str(tmp_path / "files"), files_bytes=capacity,
                              files_sync=False)}[tier]
    tokens, kv = make_tokens(64), make_kv(layout, 64)
    with KVStore(layout, StoreConfig(model_id="m", **settings)) as store:
        assert store.put_from(tokens, filler(kv, [])) == 4
        store.flush()
        assert store.stats()["store"]["puts"] == 1
        store.put(make_tokens(16, seed=9), make_kv(layout, 16, seed=9))  # one block in: one of the four out
        store.flush()
        assert store.lookup(tokens) == 48  # the tail went, not the head
        assert_same_kv(store.get(tokens), kv[:, :, :48])
