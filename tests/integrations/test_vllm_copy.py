"""``CopyEngine``: a worker's saves and loads between vLLM-layout CPU caches and a real ``KVStore``, byte-exact.

Both save paths run here: straight into the store's host slots (the CPU
default) and the CUDA path's staging chunks and background thread
(``staged=True``). Staging is bounded: when every chunk is held (the store
is slow) the rest of a save is dropped and counted, never waited on
forever. Loads scatter tokens ``[start, end)`` into other pages, and only
those.
"""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import make_kv, make_tokens, tiny_layout
from kvstore import KVStore, StoreConfig
from kvstore.integrations import vllm_copy
from kvstore.integrations.vllm_copy import CopyEngine, LoadJob
from kvstore.integrations.paged_store import save_paged
from kvstore.integrations.vllm_groups import NO_PAGE
from kvstore.integrations.vllm_paged import GroupedAdapter, paged_adapter

PAGE = 4
LAY = tiny_layout(block_tokens=2 * PAGE)  # a store block is two vLLM pages; a token is 256 bytes
BT = LAY.block_tokens
NUM_PAGES = 32
CHUNK_STAGING = 4 * BT * LAY.token_bytes  # four chunks of one block each


def _caches(order: str = "NHD"):
    """vLLM 0.33's per-layer views ``[B, H, page, 2D]``: token-major memory (``NHD``) or head-major (``HND``)."""
    h, c = LAY.num_kv_heads, 2 * LAY.head_dim
    if order == "NHD":
        raw = torch.zeros(LAY.num_layers, NUM_PAGES, PAGE, h, c, dtype=LAY.dtype)
        views = [raw[i].permute(0, 2, 1, 3) for i in range(LAY.num_layers)]
    else:
        raw = torch.zeros(LAY.num_layers, NUM_PAGES, h, PAGE, c, dtype=LAY.dtype)
        views = [raw[i] for i in range(LAY.num_layers)]
    return raw, paged_adapter(LAY, views)


def _write(adapter, table, kv, start=0) -> None:
    where = adapter.locate(table, kv.shape[2], start=start)
    for layer in range(LAY.num_layers):
        adapter.scatter_layer(layer, kv[layer], where)


def _read(adapter, table, start, end) -> torch.Tensor:
    where = adapter.locate(table, end - start, start=start)
    return torch.stack([adapter.gather_layer(layer, where) for layer in range(LAY.num_layers)])


def _table(seed: int, n: int = 8) -> list[int]:
    return torch.randperm(NUM_PAGES, generator=torch.Generator().manual_seed(seed))[:n].tolist()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int16), b.contiguous().view(torch.int16))


@pytest.fixture
def store():
    with KVStore(LAY, StoreConfig(host_bytes=64 * LAY.block_bytes)) as s:
        yield s


@pytest.fixture
def engine(store):
    engines = []

    def factory(adapter, staged: bool, staging_bytes: int = CHUNK_STAGING) -> CopyEngine:
        engines.append(CopyEngine(store, adapter, staging_bytes, staged=staged))
        return engines[-1]
    yield factory
    for eng in engines:
        eng.close()


def _gate(monkeypatch, store) -> tuple[threading.Event, list]:
    """Hold the store's ``put_from`` (a slow store) until the event is set; record (start, tokens) of each call."""
    gate, calls, real = threading.Event(), [], store.put_from

    def put_from(tokens, fill, salt=None, *, start=0):
        calls.append((start, len(tokens)))
        assert gate.wait(10)
        return real(tokens, fill, salt=salt, start=start)
    monkeypatch.setattr(store, "put_from", put_from)
    return gate, calls


@pytest.mark.parametrize("order", ["NHD", "HND"])
@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
@pytest.mark.parametrize("start", [0, BT])
def test_save_stores_tokens_from_start_byte_exact(store, engine, order, staged, start):
    n = 22  # a partial last page and a partial last block
    tokens, kv = make_tokens(n, seed=1), make_kv(LAY, n, seed=1)
    _, adapter = _caches(order)
    table = _table(1)
    _write(adapter, table, kv)
    eng = engine(adapter, staged)
    assert eng.save(tokens, "s", table, start) == n - start
    assert eng.drain()
    assert store.lookup(tokens[:BT], "s") == (0 if start else BT)  # blocks before start are not saved
    store.put(tokens[:start], kv[:, :, :start], salt="s")
    assert _same(store.get(tokens, "s"), kv)
    assert store.lookup(tokens) == 0  # another salt: nothing


def test_staged_save_is_cut_into_bounded_chunks(store, engine, monkeypatch):
    n = 5 * BT + 3  # more chunks than staging holds: chunks are reused as the thread stores them
    tokens, kv = make_tokens(n, seed=2), make_kv(LAY, n, seed=2)
    _, adapter = _caches()
    table = _table(2, 12)
    _write(adapter, table, kv)
    gate, calls = _gate(monkeypatch, store)
    gate.set()
    eng = engine(adapter, True)
    assert (eng.chunk_tokens, len(eng._chunks), eng.staging_bytes) == (BT, 4, CHUNK_STAGING)
    assert eng.save(tokens, None, table, BT) == n - BT
    assert eng.drain()
    assert calls == [(lo, min(n, lo + BT)) for lo in range(BT, n, BT)]
    assert eng.skipped == 0
    store.put(tokens[:BT], kv[:, :, :BT])
    assert _same(store.get(tokens), kv)


def test_staging_full_drops_the_rest_of_a_save_and_counts_it(store, engine, monkeypatch):
    monkeypatch.setattr(vllm_copy, "SAVE_WAIT_SECONDS", 0.05)
    n = 6 * BT
    tokens, kv = make_tokens(n, seed=3), make_kv(LAY, n, seed=3)
    _, adapter = _caches()
    table = _table(3, 12)
    _write(adapter, table, kv)
    gate, _ = _gate(monkeypatch, store)
    eng = engine(adapter, True)
    try:
        assert eng.save(tokens, None, table, 0) == 4 * BT  # four chunks held by a store that does not answer
        assert eng.skipped == 1
        assert not eng.drain(timeout=0.05)
    finally:
        gate.set()
    assert eng.drain()
    assert store.lookup(tokens) == 4 * BT  # what was handed over is stored; the dropped tail is a later miss
    assert _same(store.get(tokens[:4 * BT]), kv[:, :, :4 * BT])
    assert eng.save(tokens, None, table, 4 * BT) == 2 * BT  # staging is free again
    assert eng.drain() and eng.skipped == 1
    assert _same(store.get(tokens), kv)


def test_close_drains_staged_saves_then_stops_the_thread(store, engine, monkeypatch):
    n = 3 * BT
    tokens, kv = make_tokens(n, seed=4), make_kv(LAY, n, seed=4)
    _, adapter = _caches()
    table = _table(4)
    _write(adapter, table, kv)
    gate, _ = _gate(monkeypatch, store)
    eng = engine(adapter, True)
    thread = eng._thread
    assert thread.is_alive()
    assert eng.save(tokens, None, table, 0) == n
    opener = threading.Timer(0.05, gate.set)  # the store answers only after close() has begun waiting
    opener.start()
    eng.close()
    opener.join()
    assert not thread.is_alive()
    assert store.lookup(tokens) == n and _same(store.get(tokens), kv)
    eng.close()  # twice: nothing left to do


@pytest.mark.parametrize("order", ["NHD", "HND"])
@pytest.mark.parametrize("start,end", [(0, 22), (PAGE, 19), (BT, 22), (BT, 2 * BT), (2, 13)])
def test_load_scatters_tokens_start_to_end_into_other_pages_only(store, engine, order, start, end):
    n = 22
    tokens, kv = make_tokens(n, seed=5), make_kv(LAY, n, seed=5)
    store.put(tokens, kv)
    raw, adapter = _caches(order)
    raw.fill_(7.0)  # pages the load must not touch
    before = raw.clone()
    other = _table(5)
    eng = engine(adapter, False)
    job = eng.load(tokens, None, other, start, end)
    job.advance(0)
    assert not job.done and job.next_layer == 1
    assert _same(_read(adapter, other, start, end)[0], kv[0, :, start:end])
    assert job.finish() == end and job.done
    assert _same(_read(adapter, other, start, end), kv[:, :, start:end])
    expected_raw, expected = _caches(order)
    expected_raw.copy_(before)
    _write(expected, other, kv[:, :, start:end], start)
    assert _same(raw, expected_raw)  # nothing outside [start, end) of these pages was written


def test_load_from_start_reads_only_the_blocks_after_it(store, engine):
    n = 3 * BT
    tokens, kv = make_tokens(n, seed=6), make_kv(LAY, n, seed=6)
    store.put(tokens, kv)
    _, adapter = _caches()
    eng = engine(adapter, False)
    saved = store.stats()["store"]["prefill_tokens_saved"]
    job = eng.load(tokens, None, _table(6), BT, n)
    assert job.loader.first_token == BT
    assert job.finish() == n
    assert store.stats()["store"]["prefill_tokens_saved"] - saved == n - BT  # block 0 was not read


def test_load_of_more_tokens_than_stored_returns_fewer(store, engine):
    tokens, kv = make_tokens(40, seed=7), make_kv(LAY, 40, seed=7)
    store.put(tokens[:2 * BT], kv[:, :, :2 * BT])
    raw, adapter = _caches()
    other = _table(7, 10)
    eng = engine(adapter, False)
    assert eng.load_now(eng.load(tokens, None, other, PAGE, 40)) == 2 * BT
    assert _same(_read(adapter, other, PAGE, 2 * BT), kv[:, :, PAGE:2 * BT])
    assert not _read(adapter, other, 2 * BT, 40).any() and not _read(adapter, other, 0, PAGE).any()
    store.put(tokens[:2 * BT + 3], kv[:, :, :2 * BT + 3])  # a shorter prompt's partial tail is not this prompt's
    assert eng.load(tokens, None, other, 0, 40).finish() == 2 * BT
    assert eng.load(tokens, "other salt", other, 0, 40).finish() == 0


def test_ring_path_load_scatters_the_same_bytes(store, engine):
    """The CUDA path's scatter (``sunk=False``: layers from the loader's ring), run on CPU caches."""
    n = 22
    tokens, kv = make_tokens(n, seed=8), make_kv(LAY, n, seed=8)
    store.put(tokens, kv)
    _, adapter = _caches()
    other = _table(8)
    eng = engine(adapter, False)
    start, end = BT, 21
    loader = store.load(tokens, layer_wise=True, skip=start)
    job = LoadJob(eng, loader, other, start, end, sunk=False)
    job.advance(0)
    assert _same(_read(adapter, other, start, end)[0], kv[0, :, start:end])
    assert job.finish() == end
    assert _same(_read(adapter, other, start, end), kv[:, :, start:end])
    assert not _read(adapter, other, 0, start).any()


def test_a_load_into_bad_block_ids_is_a_miss_not_a_crash(store, engine):
    tokens, kv = make_tokens(16, seed=9), make_kv(LAY, 16, seed=9)
    store.put(tokens, kv)
    raw, adapter = _caches()
    eng = engine(adapter, False)
    for table in ([NUM_PAGES + 3] * 4, [0]):  # an id past the cache; too few ids for the tokens
        job = eng.load(tokens, None, table, 0, 16)
        assert job.finish() == 0 and job.done
    assert not raw.any()


def test_staged_save_with_bad_block_ids_raises_and_keeps_its_staging(store):
    """A gather that fails (block ids outside the cache) hands its chunk back: later saves still have it."""
    _, adapter = _caches()
    eng = CopyEngine(store, adapter, CHUNK_STAGING, staged=True)
    try:
        chunks = eng._free.qsize()
        tokens = make_tokens(2 * BT)
        with pytest.raises(ValueError, match="block_table"):
            eng.save(tokens, None, [NUM_PAGES + 5] * (len(tokens) // PAGE), 0)
        assert eng._free.qsize() == chunks
    finally:
        eng.close()


@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
def test_grouped_pages_load_each_group_from_its_own_table_and_never_touch_missing_pages(store, engine, staged):
    """Layer 0 is a full-attention group, layer 1 a sliding-window group that holds no page (``NO_PAGE``)
    for its first two: a load writes layer 1 from its first page on, and nothing into page 0 (vLLM's null
    block); a save of tokens layer 1 has no page for is refused, never made of other pages' bytes."""
    n = 3 * BT
    tokens, kv = make_tokens(n, seed=7), make_kv(LAY, n, seed=7)
    raw, inner = _caches()
    full, window = list(range(1, 7)), list(range(11, 17))
    _write(inner, full, kv[:1].expand(LAY.num_layers, *kv.shape[1:]).contiguous())
    _write(inner, window, kv[1:].expand(LAY.num_layers, *kv.shape[1:]).contiguous())
    grouped = GroupedAdapter(inner, [0, 1])
    eng = engine(grouped, staged)
    assert eng.save(tokens, None, (full, window), 0) == n
    assert eng.drain()
    assert _same(store.get(tokens), kv)

    raw.zero_()
    held = [NO_PAGE, NO_PAGE] + list(range(23, 27))  # the window's group: pages 0 and 1 freed or null
    assert grouped.first_token(([20, 21, 22, 23, 24, 25], held), n) == 2 * PAGE
    job = eng.load(tokens, None, (list(range(17, 23)), held), 0, n)
    assert eng.load_now(job) == n
    assert _same(_read(inner, list(range(17, 23)), 0, n)[0], kv[0])
    assert _same(_read(inner, [0, 0] + held[2:], 2 * PAGE, n)[1], kv[1, :, 2 * PAGE:])
    assert not raw[:, 0].any()  # no page of a missing entry was written (page 0 included)

    with pytest.raises(ValueError, match="holds no page"):
        save_paged(store, make_tokens(n, seed=8), grouped, (full, held))
    assert store.lookup(make_tokens(n, seed=8)) == 0


@pytest.mark.parametrize("order", ["NHD", "HND"])
@pytest.mark.parametrize("table, num_tokens, start, message", [
    ([0, 1, 2, 3], 4, -4, "^start: expected an int >= 0"),  # wrapped to the table's last pages
    ([0, 1, 2, 3], -3, 0, "^num_tokens: expected an int >= 0"),
    ([0.9, 1.7], 4, 0, "^block_table: expected integer ids"),  # truncated to pages 0 and 1
    ([True, False], 4, 0, "^block_table: expected integer ids"),
    ([[0, 1], [2, 3]], 4, 0, "^block_table: expected a 1-D sequence of ints"),
    ([0, None], 4, 0, "^block_table: expected a 1-D sequence of ints"),
    (None, 4, 0, "^block_table: expected a 1-D sequence of ints"),
])
def test_locate_refuses_what_would_read_or_write_other_pages(order, table, num_tokens, start, message):
    """vLLM 0.33's standardized views took a negative start, float or bool ids and 2-D tables without a word."""
    _, adapter = _caches(order)
    with pytest.raises(ValueError, match=message):
        adapter.locate(table, num_tokens, start=start)
