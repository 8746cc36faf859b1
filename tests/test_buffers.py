"""Reused host buffers: a layer-wise save or load takes its staging from the store's pool and gives it back.

What a user cares about: the second request reuses the first one's memory
(no fresh pages to fault in), never sees or leaks another request's bytes,
and the idle memory kept stays within ``staging_bytes``.
"""

from __future__ import annotations

import gc

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import assert_same_kv, make_kv, make_tokens, tiny_layout
from kvstore import StoreConfig
from kvstore.buffers import LARGE_BYTES, BufferPool, after_sent, byte_view, payload_view_count, payload_views
from kvstore.store import KVStore

MIB = 1 << 20
LAY = tiny_layout()
TOKENS = 4 * LARGE_BYTES // LAY.token_bytes  # staging of 4 MiB: big enough to be pooled


def test_a_given_back_buffer_is_taken_again():
    pool = BufferPool(16 * MIB)
    first = pool.take((MIB,), torch.uint8)
    address = first.data_ptr()
    pool.give(first)
    assert pool.idle_bytes == MIB
    again = pool.take((MIB // 2, 2), torch.uint8)  # same bytes, another shape
    assert again.data_ptr() == address and again.shape == (MIB // 2, 2)
    assert pool.idle_bytes == 0


def test_take_never_hands_out_a_buffer_too_small_or_over_twice_the_size():
    pool = BufferPool(64 * MIB)
    small, big = pool.take((2 * MIB,), torch.uint8), pool.take((8 * MIB,), torch.uint8)
    small_at, big_at = small.data_ptr(), big.data_ptr()
    pool.give(small)
    pool.give(big)
    mid = pool.take((3 * MIB,), torch.uint8)  # 2 MiB is too small, 8 MiB over twice 3 MiB
    assert mid.data_ptr() not in (small_at, big_at)
    assert pool.take((5 * MIB,), torch.uint8).data_ptr() == big_at
    assert pool.take((MIB + 1,), torch.uint8).data_ptr() == small_at


def test_idle_bytes_stay_within_the_bound_dropping_the_oldest():
    pool = BufferPool(5 * MIB)
    buffers = [pool.take((2 * MIB,), torch.uint8) for _ in range(3)]
    addresses = [b.data_ptr() for b in buffers]
    for b in buffers:
        pool.give(b)
    assert pool.idle_bytes == 4 * MIB  # the oldest was dropped
    kept = {pool.take((2 * MIB,), torch.uint8).data_ptr() for _ in range(2)}
    assert kept == set(addresses[1:])


def test_small_and_foreign_tensors_are_not_kept():
    pool = BufferPool(16 * MIB)
    pool.give(pool.take((16,), torch.float32))
    pool.give(torch.empty(MIB, dtype=torch.uint8))
    pool.give(pool.take((32 * MIB,), torch.uint8))  # over the bound on its own
    assert pool.idle_bytes == 0


def test_a_buffer_never_given_back_is_freed():
    pool = BufferPool(16 * MIB)
    pool.take((MIB,), torch.uint8)
    gc.collect()
    assert len(pool._lent) == 0 and pool.idle_bytes == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1MiB"])
def test_a_bad_bound_is_refused(bad):
    with pytest.raises(ValueError, match=rf"^max_idle_bytes: expected an integer >= 0, got {bad!r}$"):
        BufferPool(bad)


def _save_layerwise(store: KVStore, tokens, kv) -> int:
    saver = store.save(tokens, layer_wise=True)
    for layer in range(LAY.num_layers):
        saver.save_layer(layer, kv[layer])
    return saver.stored


def test_layerwise_saves_reuse_staging_and_keep_every_request_exact():
    tokens_a, kv_a = make_tokens(TOKENS, seed=1), make_kv(LAY, TOKENS, seed=1)
    tokens_b, kv_b = make_tokens(TOKENS, seed=2), make_kv(LAY, TOKENS, seed=2)
    with KVStore(LAY, StoreConfig(host_bytes=64 * MIB)) as store:
        first = store.save(tokens_a, layer_wise=True)
        staging_at = first.layer_buffer(0).data_ptr()
        for layer in range(LAY.num_layers):
            first.save_layer(layer, kv_a[layer])
        assert store.hooks.buffers.idle_bytes == LAY.token_bytes * TOKENS
        second = store.save(tokens_b, layer_wise=True)
        assert second.layer_buffer(0).data_ptr() == staging_at  # the first request's staging, reused
        for layer in range(LAY.num_layers):
            second.save_layer(layer, kv_b[layer])
        assert_same_kv(store.get(tokens_a), kv_a)
        assert_same_kv(store.get(tokens_b), kv_b)


def test_layerwise_loads_reuse_their_ring_and_stay_exact():
    tokens_a, kv_a = make_tokens(TOKENS, seed=3), make_kv(LAY, TOKENS, seed=3)
    tokens_b, kv_b = make_tokens(TOKENS, seed=4), make_kv(LAY, TOKENS, seed=4)
    with KVStore(LAY, StoreConfig(host_bytes=64 * MIB)) as store:
        store.put(tokens_a, kv_a)
        store.put(tokens_b, kv_b)
        rings = []
        for tokens, kv in ((tokens_a, kv_a), (tokens_b, kv_b), (tokens_a, kv_a)):
            with store.load(tokens, layer_wise=True) as loader:
                seen = set()
                for layer, got in loader:
                    seen.add(got.data_ptr())
                    assert_same_kv(got, kv[layer])
            rings.append(seen)
            assert store.hooks.buffers.idle_bytes == min(3, LAY.num_layers) * LAY.token_bytes * TOKENS // LAY.num_layers
        assert rings[0] == rings[1] == rings[2]


def test_staging_bytes_zero_keeps_nothing_idle():
    tokens, kv = make_tokens(TOKENS, seed=5), make_kv(LAY, TOKENS, seed=5)
    with KVStore(LAY, StoreConfig(host_bytes=64 * MIB, staging_bytes=0)) as store:
        assert _save_layerwise(store, tokens, kv) == len(store.block_keys(tokens))
        assert store.hooks.buffers.idle_bytes == 0
        assert_same_kv(store.get(tokens), kv)


@given(st.lists(st.binary(min_size=0, max_size=40), min_size=1, max_size=8), st.data())
def test_after_sent_leaves_exactly_the_unsent_bytes_in_order(parts, data):
    whole = b"".join(parts)
    sent = data.draw(st.integers(0, len(whole)))
    rest = after_sent([memoryview(p) for p in parts], sent)
    assert b"".join(rest) == whole[sent:]
    assert all(view.nbytes for view in rest[:1]) or not rest  # never a leading empty view to resend


def test_byte_view_flattens_without_copying():
    array = bytearray(range(12))
    shaped = memoryview(array).cast("B", (3, 4))
    flat = byte_view(shaped)
    assert flat.ndim == 1 and flat.format == "B" and bytes(flat) == bytes(array)
    flat[0] = 99
    assert array[0] == 99
    plain = memoryview(array)
    assert byte_view(plain) is plain


@pytest.mark.parametrize("start, stop", [(0, 16), (16, 32), (40, 41), (8, 8)])
def test_payload_views_of_a_token_range_are_its_bytes_in_order_and_write_through(start, stop):
    kv = torch.randn(3, 2, 48, 2, 8).to(torch.bfloat16)
    block = kv[:, :, start:stop]
    views = payload_views(block)
    assert len(views) in (1, 6)
    assert b"".join(views) == block.contiguous().view(torch.uint8).numpy().tobytes()
    for view in views:
        view[:] = b"\x7f" * len(view)
    assert (block.view(torch.uint8) == 0x7F).all()
    untouched = torch.cat([kv[:, :, :start], kv[:, :, stop:]], dim=2)
    assert not (untouched.view(torch.uint8) == 0x7F).all(dim=-1).any()  # nothing outside the range written


@pytest.mark.parametrize("start, stop", [(0, 16), (5, 6), (47, 48)])
def test_payload_views_of_a_part_major_buffer_follow_its_strides(start, stop):
    # An engine buffer laid out [P, L, T, H, D] and viewed as [L, P, ...]: the (layer, part) rows are not in
    # storage order, and a one-token range has a token stride of the whole buffer's tokens.
    kv = torch.randn(2, 3, 48, 2, 8).to(torch.float16).permute(1, 0, 2, 3, 4)
    block = kv[:, :, start:stop]
    views = payload_views(block)
    assert len(views) == 6
    assert b"".join(views) == block.contiguous().view(torch.uint8).numpy().tobytes()
    for view in views:
        view[:] = b"\x7f" * len(view)
    assert (block.view(torch.uint8) == 0x7F).all()
    untouched = torch.cat([kv[:, :, :start], kv[:, :, stop:]], dim=2)
    assert not (untouched.view(torch.uint8) == 0x7F).all(dim=-1).any()


_DIMS = st.tuples(*[st.integers(1, 4)] * 5)


@given(dims=_DIMS, order=st.permutations(range(5)), cut=st.tuples(st.integers(0, 4), st.integers(0, 4)),
       step=st.integers(1, 2))
def test_payload_view_count_says_without_views_what_payload_views_gives(dims, order, cut, step):
    # Any permuted, sliced or stepped buffer: the count is the number of views, or None exactly where there are
    # none (a writer thread makes the views of a block the store only counted).
    kv = torch.arange(int(torch.tensor(dims).prod()), dtype=torch.int16).reshape(dims).permute(*order)
    start, stop = sorted(cut)
    block = kv[:, :, start:stop:step]
    views = payload_views(block)
    assert payload_view_count(block) == (None if views is None else len(views))
    if views is not None:
        assert b"".join(views) == block.numpy().tobytes()  # C order, whatever the strides


def test_payload_view_count_refuses_what_is_not_a_cpu_block():
    assert payload_view_count(torch.zeros(2, 2, 2, 2)) is None
    assert payload_view_count(torch.zeros(2, 2, 4, 2, 2, device="meta")) is None
