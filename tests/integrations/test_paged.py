"""Paged-buffer adapters: exact round trips for every engine layout, untouched slots, per-layer calls, validation.

Tiny layouts (2 layers, 2 heads, head dim 16, 16-token store blocks), pages
of 1, 4, 8 and 16 tokens, random non-contiguous block tables from fixed
seeds. Every comparison is of bytes.
"""

from __future__ import annotations

import re

import pytest
import torch

from conftest import make_kv, make_tokens, tiny_layout
from kvstore import KVLayout, KVStore, StoreConfig
from kvstore.integrations.paged import (HFContiguousAdapter, PagedAdapter, SGLangPoolAdapter, TokenSlots, TokenSpan,
                                        VLLMPagedAdapter, check_page_size, slot_mapping)

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn)
PAGES = (1, 4, 8, 16)
NUM_PAGES = 64  # pool pages per layer: more than any request needs, so some pages stay unused


def same(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (fp8 has no torch.equal on CPU: compare byte views)."""
    return (actual.dtype == expected.dtype and actual.shape == expected.shape
            and torch.equal(actual.contiguous().view(torch.uint8), expected.contiguous().view(torch.uint8)))


def randn(shape, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def perm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def vllm_buffers(lay: KVLayout, page: int, num_pages: int = NUM_PAGES, seed: int = 1) -> list[torch.Tensor]:
    shape = (lay.kv_parts, num_pages, page, lay.num_kv_heads, lay.head_dim)
    return [randn(shape, lay.dtype, seed + i) for i in range(lay.num_layers)]


def ref_slots(table, start: int, n: int, page: int) -> list[int]:
    """The definition, one token at a time."""
    return [int(table[t // page]) * page + t % page for t in range(start, start + n)]


def check_written(before: torch.Tensor, after: torch.Tensor, slots: list[int], kv_layer: torch.Tensor) -> None:
    """``after`` (``[P, num_slots, H, D]``) holds ``kv_layer`` at ``slots`` and ``before``'s bytes everywhere else."""
    assert same(after[:, slots], kv_layer)
    rest = torch.ones(after.shape[1], dtype=torch.bool)
    rest[slots] = False
    assert same(after[:, rest], before[:, rest])


# -- slot mapping -------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("start,n", [(0, 0), (0, 1), (0, 16), (0, 37), (3, 20), (16, 9), (5, 48)])
def test_slot_mapping_matches_definition(page, start, n):
    table = perm(NUM_PAGES, seed=page)
    expected = ref_slots(table, start, n, page)
    assert slot_mapping(table, n, page, start=start).tolist() == expected
    assert slot_mapping(table.tolist(), n, page, start=start, num_pages=NUM_PAGES).tolist() == expected
    where = TokenSlots.from_block_table(table.int(), n, page, start=start)
    assert where.slots.dtype == torch.int64 and where.slots.tolist() == expected
    if start % page == 0:  # whole pages go by page id, only the partial last page by slot
        assert where.pages.tolist() == table[start // page:(start + n) // page].tolist()
    else:
        assert where.pages is None and where.paged_tokens == 0


def test_token_slots_copy_the_block_table():
    table = perm(NUM_PAGES, seed=3)
    where = TokenSlots.from_block_table(table, 32, 4)
    expected = (where.slots.clone(), where.pages.clone())
    table.fill_(0)  # engines rewrite their block-table tensors every step
    assert torch.equal(where.slots, expected[0]) and torch.equal(where.pages, expected[1])


# -- vLLM paged layout ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("n", [16, 37, 48])
@pytest.mark.parametrize("kv_parts", [2, 1])
def test_vllm_round_trip(dtype, page, n, kv_parts):
    lay = tiny_layout(dtype=dtype, kv_parts=kv_parts)
    buffers = vllm_buffers(lay, page)
    before = [b.clone() for b in buffers]
    adapter = VLLMPagedAdapter(lay, buffers)
    assert isinstance(adapter, PagedAdapter)
    table = perm(NUM_PAGES, seed=n + page)[:-(-n // page)]
    kv = make_kv(lay, n, seed=n)
    where = adapter.locate(table, n)
    adapter.scatter(kv, where)
    assert same(adapter.gather(where), kv)
    slots = ref_slots(table, 0, n, page)
    for layer in range(lay.num_layers):
        flat = (lay.kv_parts, NUM_PAGES * page, lay.num_kv_heads, lay.head_dim)
        check_written(before[layer].view(flat), buffers[layer].view(flat), slots, kv[layer])


@pytest.mark.parametrize("page", [4, 8])
@pytest.mark.parametrize("start", [8, 5])
def test_vllm_token_range_from_an_offset(page, start):
    """Tokens [start, start + n) of a request: aligned starts take the page path, others the slot path."""
    lay = tiny_layout()
    buffers = vllm_buffers(lay, page)
    before = [b.clone() for b in buffers]
    adapter = VLLMPagedAdapter(lay, buffers)
    table = perm(NUM_PAGES, seed=start)
    kv = make_kv(lay, 21, seed=start)
    where = adapter.locate(table.tolist(), 21, start=start)
    assert (where.pages is not None) == (start % page == 0)
    adapter.scatter(kv, where)
    assert same(adapter.gather(where), kv)
    flat = (2, NUM_PAGES * page, 2, 16)
    for layer in range(2):
        check_written(before[layer].view(flat), buffers[layer].view(flat), ref_slots(table, start, 21, page), kv[layer])


def test_vllm_layer_calls_equal_whole_calls():
    lay = tiny_layout(num_layers=4, dtype=torch.bfloat16)
    table = perm(NUM_PAGES, seed=7)[:10]
    kv = make_kv(lay, 37, seed=7)
    whole = VLLMPagedAdapter(lay, vllm_buffers(lay, 4))
    layered = VLLMPagedAdapter(lay, vllm_buffers(lay, 4))
    where_whole, where_layered = whole.locate(table, 37), layered.locate(table, 37)
    whole.scatter(kv, where_whole)
    for layer in range(lay.num_layers):  # a layer-wise loader: layer i lands while layer i + 1 is read
        layered.scatter_layer(layer, kv[layer].clone(), where_layered)
    for a, b in zip(whole.kv_caches, layered.kv_caches):
        assert same(a, b)
    gathered = whole.gather(where_whole)
    for layer in range(lay.num_layers):
        assert same(layered.gather_layer(layer, where_layered), gathered[layer])


def test_gather_into_out_and_into_a_token_slice():
    lay = tiny_layout()
    adapter = VLLMPagedAdapter(lay, vllm_buffers(lay, 8))
    where = adapter.locate(perm(NUM_PAGES, seed=2), 20)
    kv = make_kv(lay, 20, seed=2)
    adapter.scatter(kv, where)
    out = torch.empty(lay.shape(20), dtype=lay.dtype)
    assert adapter.gather(where, out=out) is out and same(out, kv)
    bigger = torch.zeros(lay.shape(30), dtype=lay.dtype)  # tokens 5..25 of a longer canonical tensor
    adapter.gather(where, out=bigger[:, :, 5:25])
    assert same(bigger[:, :, 5:25], kv) and not bigger[:, :, :5].any() and not bigger[:, :, 25:].any()
    transposed = torch.empty((2, 20, 2, 16), dtype=lay.dtype).transpose(0, 1).contiguous().transpose(0, 1)
    assert same(adapter.gather_layer(1, where, out=transposed), kv[1])  # non-contiguous parts


def test_scatter_from_non_contiguous_kv_and_zero_tokens():
    lay = tiny_layout()
    buffers = vllm_buffers(lay, 4)
    adapter = VLLMPagedAdapter(lay, buffers)
    kv = make_kv(lay, 40, seed=4)[:, :, 8:32]
    where = adapter.locate(perm(NUM_PAGES, seed=4), 24)
    adapter.scatter(kv, where)
    assert same(adapter.gather(where), kv)
    before = [b.clone() for b in buffers]
    empty = adapter.locate([], 0)
    adapter.scatter(make_kv(lay, 0), empty)
    assert adapter.gather(empty).shape == lay.shape(0)
    assert all(same(a, b) for a, b in zip(buffers, before))


def test_through_a_real_store():
    """put -> get -> scatter into vLLM pages -> gather: the KV that was put, bytes for bytes."""
    lay = tiny_layout(num_layers=3, dtype=torch.bfloat16)
    tokens = make_tokens(40)  # two full 16-token blocks and a partial one
    kv = make_kv(lay, 40, seed=5)
    with KVStore(lay, StoreConfig(host_bytes=1 << 20)) as store:
        store.put(tokens, kv)
        assert store.lookup(tokens) == 40
        got = store.get(tokens)
    assert same(got, kv)
    adapter = VLLMPagedAdapter(lay, vllm_buffers(lay, 8))
    where = adapter.locate(perm(NUM_PAGES, seed=5)[:5], 40)
    for layer in range(lay.num_layers):
        adapter.scatter_layer(layer, got[layer], where)
    assert same(adapter.gather(where), kv)


# -- SGLang token pools -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 16, 37])
@pytest.mark.parametrize("kv_parts", [2, 1])
def test_sglang_round_trip(dtype, n, kv_parts):
    lay = tiny_layout(dtype=dtype, kv_parts=kv_parts)
    num_slots = 64
    pools = [[randn((num_slots, 2, 16), dtype, 10 * part + layer) for layer in range(2)] for part in range(kv_parts)]
    before = [[b.clone() for b in part] for part in pools]
    adapter = SGLangPoolAdapter(lay, *pools)
    slot_ids = perm(num_slots, seed=n)[:n].int()  # SGLang's req_to_token rows are int32
    where = adapter.locate(slot_ids)
    kv = make_kv(lay, n, seed=n)
    adapter.scatter(kv, where)
    assert same(adapter.gather(where), kv)
    for layer in range(2):
        after = torch.stack([part[layer] for part in pools])
        check_written(torch.stack([part[layer] for part in before]), after, slot_ids.tolist(), kv[layer])
    assert same(adapter.gather_layer(1, where), kv[1])


@pytest.mark.parametrize("runs", ["whole pages", "scattered slots"])
@pytest.mark.parametrize("n", [16, 37])
def test_sglang_with_pages(runs, n):
    """``--page-size 4``: slot ids in whole pages take the page path, any others the slot path; both exact."""
    lay = tiny_layout(dtype=torch.bfloat16)
    num_slots = 66  # 16 whole pages and 2 slots past them
    pools = [[randn((num_slots, 2, 16), lay.dtype, 10 * part + layer) for layer in range(2)] for part in range(2)]
    before = [[b.clone() for b in part] for part in pools]
    adapter = SGLangPoolAdapter(lay, *pools, page_size=4)
    if runs == "whole pages":
        slot_ids = (perm(16, seed=n)[:, None] * 4 + torch.arange(4)).reshape(-1)[:n]
    else:
        slot_ids = torch.cat([torch.tensor([65, 64]), perm(64, seed=n)[:n - 2]])
    where = adapter.locate(slot_ids)
    assert (where.pages is not None) == (runs == "whole pages")
    kv = make_kv(lay, n, seed=n)
    adapter.scatter(kv, where)
    assert same(adapter.gather(where), kv)
    for layer in range(2):
        after = torch.stack([part[layer] for part in pools])
        check_written(torch.stack([part[layer] for part in before]), after, slot_ids.tolist(), kv[layer])


# -- Hugging Face contiguous caches -----------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_parts", [2, 1])
@pytest.mark.parametrize("batch,start,n", [(0, 0, 16), (2, 5, 37), (1, 60, 4)])
def test_hf_round_trip(dtype, kv_parts, batch, start, n):
    lay = tiny_layout(dtype=dtype, kv_parts=kv_parts)
    caches = [[randn((3, 2, 64, 16), dtype, 10 * part + layer) for layer in range(2)] for part in range(kv_parts)]
    before = [[c.clone() for c in part] for part in caches]
    adapter = HFContiguousAdapter(lay, *caches)
    where = adapter.locate(batch, n, start=start)
    kv = make_kv(lay, n, seed=n)
    adapter.scatter(kv, where)
    assert same(adapter.gather(where), kv)
    for part in range(kv_parts):
        for layer in range(2):
            after, old = caches[part][layer], before[part][layer]
            assert same(after[batch, :, start:start + n].transpose(0, 1), kv[layer, part])
            after[batch, :, start:start + n] = old[batch, :, start:start + n]
            assert same(after, old)  # nothing else was written


def test_hf_layer_calls_equal_whole_calls():
    lay = tiny_layout(num_layers=3)
    caches = [[randn((2, 2, 32, 16), lay.dtype, 10 * part + layer) for layer in range(3)] for part in range(2)]
    adapter = HFContiguousAdapter(lay, *caches)
    where = adapter.locate(1, 20, start=3)
    kv = make_kv(lay, 20, seed=9)
    for layer in range(3):
        adapter.scatter_layer(layer, kv[layer], where)
    whole = adapter.gather(where)
    assert same(whole, kv)
    assert all(same(adapter.gather_layer(layer, where), whole[layer]) for layer in range(3))


# -- every layout ------------------------------------------------------------------------


def random_bytes(shape, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Any bit pattern of ``dtype``, NaNs with payloads included, plus signalling-NaN float64/complex128 words."""
    numel = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    words = raw[:numel // 8 * 8].view(torch.int64)
    words[::5] = 0x7FF0000000000001  # a signalling NaN in every word size that copies could use
    words[1::5] = -1  # all ones: NaN with a full payload
    return raw.view(dtype).view(shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("engine", ["vllm", "sglang", "hf"])
def test_every_bit_pattern_survives(dtype, engine):
    """Copies move KV as wide words (complex128 on CPU and CUDA): no bit pattern of any dtype is changed."""
    lay = tiny_layout(dtype=dtype)
    kv = random_bytes(lay.shape(37), dtype, seed=11)
    if engine == "vllm":
        adapter = VLLMPagedAdapter(lay, vllm_buffers(lay, 4))
        where = adapter.locate(perm(NUM_PAGES, seed=11), 37)
    elif engine == "sglang":
        adapter = SGLangPoolAdapter(lay, *[[randn((64, 2, 16), dtype, 10 * p + i) for i in range(2)] for p in range(2)])
        where = adapter.locate(perm(64, seed=11)[:37])
    else:
        adapter = HFContiguousAdapter(lay, *[[randn((2, 2, 64, 16), dtype, 10 * p + i) for i in range(2)]
                                             for p in range(2)])
        where = adapter.locate(1, 37, start=3)
    adapter.scatter(kv, where)
    assert same(adapter.gather(where), kv)


@pytest.mark.parametrize("dtype,head_dim", [(torch.float16, 3), (torch.float8_e4m3fn, 3), (torch.float32, 1)])
def test_odd_row_sizes_use_narrower_words(dtype, head_dim):
    """Rows of 3, 4 or 6 bytes (no 16-byte words tile them) copy exactly too."""
    lay = tiny_layout(dtype=dtype, num_kv_heads=1, head_dim=head_dim)
    kv = random_bytes(lay.shape(7), dtype, seed=12)
    adapter = VLLMPagedAdapter(lay, vllm_buffers(lay, 4))
    where = adapter.locate(perm(NUM_PAGES, seed=12), 7)
    adapter.scatter(kv, where)
    assert same(adapter.gather(where), kv)
    hf = HFContiguousAdapter(lay, *[[randn((1, 1, 9, head_dim), dtype, p + i) for i in range(2)] for p in range(2)])
    hf.scatter(kv, hf.locate(0, 7, start=1))
    assert same(hf.gather(hf.locate(0, 7, start=1)), kv)


# -- validation ---------------------------------------------------------------------------


def _vllm(page: int = 4, **changes) -> VLLMPagedAdapter:
    lay = tiny_layout(**changes)
    return VLLMPagedAdapter(lay, vllm_buffers(lay, page, num_pages=8))


def _sglang(kv_parts: int = 2) -> SGLangPoolAdapter:
    lay = tiny_layout(kv_parts=kv_parts)
    return SGLangPoolAdapter(lay, *[[torch.zeros(10, 2, 16, dtype=lay.dtype)] * 2] * kv_parts)


def _hf() -> HFContiguousAdapter:
    lay = tiny_layout()
    return HFContiguousAdapter(lay, [torch.zeros(2, 2, 32, 16, dtype=lay.dtype)] * 2,
                               [torch.zeros(2, 2, 32, 16, dtype=lay.dtype)] * 2)


def _bad_buffers(**kw):
    lay = tiny_layout()
    buffers = vllm_buffers(lay, 4, num_pages=8)
    buffers[kw.get("layer", 1)] = kw["buffer"]
    return VLLMPagedAdapter(lay, buffers)


def _kv(n: int, **changes) -> torch.Tensor:
    return make_kv(tiny_layout(**changes), n)


META = "meta"  # a second device on a CPU-only machine: device checks run without a GPU
CASES = {
    "page size not dividing the block": (
        lambda: _vllm(page=5), "page_size: expected a divisor of the store's block_tokens=16, got 5"),
    "page size zero": (lambda: check_page_size(0, 16), "page_size: expected an int >= 1, got 0"),
    "buffer heads": (
        lambda: _bad_buffers(buffer=torch.zeros(2, 8, 4, 3, 16, dtype=torch.float16)),
        "kv_caches[1]: expected shape [2, num_pages, page_size, 2, 16], got [2, 8, 4, 3, 16]"),
    "buffer kv_parts": (
        lambda: VLLMPagedAdapter(tiny_layout(kv_parts=1), vllm_buffers(tiny_layout(), 4)),
        "kv_caches[0]: expected shape [1, num_pages, page_size, 2, 16], got [2, 64, 4, 2, 16]"),
    "buffers of different sizes": (
        lambda: _bad_buffers(buffer=torch.zeros(2, 9, 4, 2, 16, dtype=torch.float16)),
        "kv_caches[1]: expected shape [2, 8, 4, 2, 16] (as layer 0), got [2, 9, 4, 2, 16]"),
    "buffer dtype": (
        lambda: _bad_buffers(buffer=torch.zeros(2, 8, 4, 2, 16)),
        "kv_caches[1]: expected dtype torch.float16, got torch.float32"),
    "buffer device": (
        lambda: _bad_buffers(buffer=torch.zeros(2, 8, 4, 2, 16, dtype=torch.float16, device=META)),
        "kv_caches[1]: expected device cpu (as layer 0), got meta"),
    "buffer not contiguous": (
        lambda: _bad_buffers(buffer=torch.zeros(2, 4, 8, 2, 16, dtype=torch.float16).transpose(1, 2)),
        "kv_caches[1]: expected a contiguous tensor, got strides"),
    "buffer count": (
        lambda: VLLMPagedAdapter(tiny_layout(), vllm_buffers(tiny_layout(num_layers=3), 4)),
        "kv_caches: expected 2 tensors (one per layer), got 3"),
    "block table too short": (
        lambda: _vllm().locate([1, 2], 9), "block_table: expected at least 3 page ids for tokens [0, 9) "
                                           "in pages of 4 tokens, got 2"),
    "block table too short from an offset": (
        lambda: _vllm().locate([1, 2, 3], 5, start=8), "block_table: expected at least 4 page ids for tokens "
                                                       "[8, 13) in pages of 4 tokens, got 3"),
    "page id too large": (
        lambda: _vllm().locate([0, 9, 1], 12), "block_table: expected ids in [0, 8), got ids from 0 to 9"),
    "negative page id": (
        lambda: _vllm().locate(torch.tensor([2, -1]), 8), "block_table: expected ids in [0, 8), got ids from -1 to 2"),
    "float block table": (
        lambda: _vllm().locate([0.0, 1.0], 8), "block_table: expected integer ids, got dtype torch.float32"),
    "2-d block table": (
        lambda: slot_mapping([[0, 1]], 8, 4), "block_table: expected a 1-D sequence of ints, got shape [1, 2]"),
    "negative token count": (lambda: slot_mapping([0], -1, 4), "num_tokens: expected an int >= 0, got -1"),
    "slot id out of range": (
        lambda: _sglang().locate([3, 10]), "slot_ids: expected ids in [0, 10), got ids from 3 to 10"),
    "kv dtype": (
        lambda: _vllm().scatter(_kv(8, dtype=torch.bfloat16), _vllm().locate([0, 1], 8)),
        "kv: expected dtype torch.float16, got torch.bfloat16"),
    "kv shape": (
        lambda: _vllm().scatter(_kv(7), _vllm().locate([0, 1], 8)),
        "kv: expected shape [2, 2, 8, 2, 16] ([layers, kv_parts, tokens, heads, head_dim]), got [2, 2, 7, 2, 16]"),
    "kv device": (
        lambda: _vllm().scatter(torch.empty(2, 2, 8, 2, 16, dtype=torch.float16, device=META),
                                _vllm().locate([0, 1], 8)),
        "kv: expected device cpu (the buffers'), got meta"),
    "kv_layer shape": (
        lambda: _vllm().scatter_layer(0, _kv(8), _vllm().locate([0, 1], 8)),
        "kv_layer: expected shape [2, 8, 2, 16] ([kv_parts, tokens, heads, head_dim]), got [2, 2, 8, 2, 16]"),
    "out shape": (
        lambda: _vllm().gather(_vllm().locate([0, 1], 8), out=_kv(9)),
        "out: expected shape [2, 2, 8, 2, 16] ([layers, kv_parts, tokens, heads, head_dim]), got [2, 2, 9, 2, 16]"),
    "out dtype": (
        lambda: _vllm().gather_layer(0, _vllm().locate([0, 1], 8), out=torch.empty(2, 8, 2, 16)),
        "out: expected dtype torch.float16, got torch.float32"),
    "layer out of range": (
        lambda: _vllm().gather_layer(2, _vllm().locate([0, 1], 8)), "layer: expected an int in [0, 2), got 2"),
    "indices on another device": (
        lambda: _vllm().gather(TokenSlots(torch.zeros(4, dtype=torch.int64, device=META), 4)),
        "where: expected indices on cpu (the buffers'), got meta"),
    "location of another page size": (
        lambda: _vllm().gather(TokenSlots.from_block_table([0, 1], 8, 8)),
        "where.page_size: expected 4 (the buffers'), got 8"),
    "location of another layout": (
        lambda: _vllm().gather(TokenSpan(0, 0, 4)), "where: expected TokenSlots (from locate), got TokenSpan"),
    "int32 slots": (
        lambda: TokenSlots(torch.zeros(4, dtype=torch.int32)),
        "slots: expected a 1-D int64 tensor, got torch.int32 [4]"),
    "sglang page size not dividing the block": (
        lambda: SGLangPoolAdapter(tiny_layout(), [torch.zeros(10, 2, 16, dtype=torch.float16)] * 2,
                                  [torch.zeros(10, 2, 16, dtype=torch.float16)] * 2, page_size=3),
        "page_size: expected a divisor of the store's block_tokens=16, got 3"),
    "sglang without v buffers": (
        lambda: SGLangPoolAdapter(tiny_layout(), [torch.zeros(10, 2, 16, dtype=torch.float16)] * 2),
        "v_buffers: expected a V buffer per layer for kv_parts=2, got none"),
    "sglang v buffers for a latent cache": (
        lambda: SGLangPoolAdapter(tiny_layout(kv_parts=1), *[[torch.zeros(10, 2, 16, dtype=torch.float16)] * 2] * 2),
        "v_buffers: expected none for kv_parts=1, got V buffers"),
    "sglang v buffer size": (
        lambda: SGLangPoolAdapter(tiny_layout(), [torch.zeros(10, 2, 16, dtype=torch.float16)] * 2,
                                  [torch.zeros(12, 2, 16, dtype=torch.float16)] * 2),
        "v_buffers[0]: expected shape [10, 2, 16], got [12, 2, 16]"),
    "hf batch out of range": (lambda: _hf().locate(2, 4), "batch: expected an index in [0, 2), got 2"),
    "hf tokens past the cache": (
        lambda: _hf().locate(0, 10, start=30), "tokens: expected an end <= seq=32, got [30, 40)"),
    "hf negative start": (lambda: _hf().locate(0, 4, start=-1), "start: expected an int >= 0, got -1"),
    "hf location of another layout": (
        lambda: _hf().gather(TokenSlots.from_slot_ids([1])), "where: expected TokenSpan (from locate), got TokenSlots"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_validation_errors_name_expected_and_got(case):
    call, message = CASES[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_nothing_is_written_when_validation_fails():
    lay = tiny_layout()
    buffers = vllm_buffers(lay, 4, num_pages=8)
    before = [b.clone() for b in buffers]
    adapter = VLLMPagedAdapter(lay, buffers)
    with pytest.raises(ValueError):
        adapter.scatter(_kv(8, dtype=torch.bfloat16), adapter.locate([0, 1], 8))
    assert all(same(a, b) for a, b in zip(buffers, before))
