"""Copies between the store's canonical KV and the KV buffers of serving engines.

The store takes and returns the KV of a token range as one tensor
``[num_layers, kv_parts, num_tokens, num_kv_heads, head_dim]`` (one layer of
it: ``[kv_parts, num_tokens, H, D]``). Engines keep KV elsewhere, per layer:

* vLLM (flash-attention layout): one tensor ``[kv_parts, num_pages,
  page_size, H, D]``; token ``t`` of a request sits in slot
  ``t % page_size`` of page ``block_table[t // page_size]``
  (``VLLMPagedAdapter``).
* SGLang token pools: a K and a V buffer ``[num_slots, H, D]``; token ``t``
  sits in slot ``req_to_token[req, t]`` (``SGLangPoolAdapter``).
* Hugging Face contiguous caches: K and V ``[batch, H, seq, D]``; a request
  is one batch row from a token offset on (``HFContiguousAdapter``).

An adapter wraps one engine's per-layer buffers. ``locate`` turns a
request's block table (or slot ids, or batch row) into a location, once per
request: indices are validated and built on the buffers' device there, so a
per-layer copy is one vectorized ``index_copy_`` / ``index_select`` (or a
strided ``copy_``) per K/V part with no Python loop over tokens or pages, and
a layer-wise loader can scatter layer ``i`` while layer ``i + 1`` is still
being read. ``locate`` synchronizes with the device (it checks ids); copies
run on the current CUDA stream and never do. The same code runs on CPU and
CUDA.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from kvstore import KVLayout

__all__ = ["HFContiguousAdapter", "Location", "PagedAdapter", "SGLangPoolAdapter", "TokenSlots", "TokenSpan",
           "VLLMPagedAdapter", "check_page_size", "slot_mapping"]

Ids = Sequence[int] | np.ndarray | torch.Tensor
# Copies move rows as the widest words that tile them, 16-byte complex128 first. Why: CPU index_copy_
# moves one element per iteration (and has no fp8 kernel): 16-byte words make a bf16 scatter ~5x faster.
# A copy does no arithmetic, only loads and stores, so every bit pattern comes back (tested).
_WORDS = (torch.complex128, torch.int64, torch.int32, torch.int16, torch.uint8)
_COMPLEX_DEVICES = ("cpu", "cuda")  # others (MPS) have no complex128


def _check_int(name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def check_page_size(page_size: int, block_tokens: int) -> None:
    """Raise ``ValueError`` unless ``page_size`` (tokens per engine page) divides ``block_tokens``.

    Why: a stored block then covers whole pages, so loading whole blocks
    fills whole pages (one row per page in the copy, the fast path) and only
    the end of a prefix can be a partial page.
    """
    _check_int("page_size", page_size, 1)
    if block_tokens % page_size:
        raise ValueError(f"page_size: expected a divisor of the store's block_tokens={block_tokens}, got {page_size}")


def request_table(block_table: Ids, num_tokens: int, start: int) -> torch.Tensor:
    """``block_table`` as a 1-D int64 tensor on the CPU, with ``num_tokens`` and ``start`` checked as ints >= 0:
    the checks every adapter's ``locate`` makes before any page is read or written (a negative ``start``
    wrapped around the table, and float ids were truncated to other pages)."""
    _check_int("num_tokens", num_tokens)
    _check_int("start", start)
    return _ids("block_table", block_table, torch.device("cpu"))


def _ids(name: str, ids: Ids, device: torch.device | str | None) -> torch.Tensor:
    """``ids`` as a 1-D int64 tensor on ``device`` (its own device when None)."""
    if isinstance(ids, (str, bytes, Mapping)) or ids is None:
        raise ValueError(f"{name}: expected a 1-D sequence of ints, got {type(ids).__name__}")
    try:
        t = torch.as_tensor(ids)
    except (TypeError, RuntimeError, ValueError, OverflowError) as error:  # None inside, a generator, ...
        raise ValueError(f"{name}: expected a 1-D sequence of ints, got {type(ids).__name__} "
                         f"({' '.join(str(error).split())})") from None
    if t.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of ints, got shape {list(t.shape)}")
    if t.numel() and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise ValueError(f"{name}: expected integer ids, got dtype {t.dtype}")
    return t.to(device=t.device if device is None else device, dtype=torch.int64)


def _check_range(name: str, ids: torch.Tensor, bound: int | None) -> None:
    """Raise unless every id is in ``[0, bound)``; one device sync, once per request."""
    if bound is None or not ids.numel():
        return
    low, high = torch.stack(ids.aminmax()).tolist()
    if low < 0 or high >= bound:
        raise ValueError(f"{name}: expected ids in [0, {bound}), got ids from {low} to {high}")


def _table_pages(block_table: Ids, num_tokens: int, page_size: int, start: int, num_pages: int | None,
                 device: torch.device | str | None) -> torch.Tensor:
    """The validated ids of the pages holding tokens ``[start, start + num_tokens)`` of a request."""
    _check_int("num_tokens", num_tokens)
    _check_int("start", start)
    _check_int("page_size", page_size, 1)
    table = _ids("block_table", block_table, device)
    first = start // page_size if num_tokens else 0
    end = -(-(start + num_tokens) // page_size) if num_tokens else 0
    if table.numel() < end:
        raise ValueError(f"block_table: expected at least {end} page ids for tokens [{start}, {start + num_tokens}) "
                         f"in pages of {page_size} tokens, got {table.numel()}")
    pages = table[first:end]
    _check_range("block_table", pages, num_pages)
    return pages


def _slots_of(pages: torch.Tensor, page_size: int, skip: int, num_tokens: int) -> torch.Tensor:
    offsets = torch.arange(page_size, dtype=torch.int64, device=pages.device)
    return (pages[:, None] * page_size + offsets).reshape(-1)[skip:skip + num_tokens]


def slot_mapping(block_table: Ids, num_tokens: int, page_size: int, *, start: int = 0,
                 num_pages: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Flat slot of each token of ``[start, start + num_tokens)``: int64 ``[num_tokens]``.

    Token ``t`` lives at ``block_table[t // page_size] * page_size + t %
    page_size``, its row in the pool seen as ``[num_pages * page_size, ...]``.
    ``num_pages`` (when given) bounds the page ids; ``device`` defaults to
    the block table's.
    """
    pages = _table_pages(block_table, num_tokens, page_size, start, num_pages, device)
    return _slots_of(pages, page_size, start % page_size, num_tokens)


@dataclass(frozen=True, eq=False)
class TokenSlots:
    """Where a request's tokens live in a pool of pages; built once per request, used by every layer.

    ``slots``: int64 ``[num_tokens]``, each token's flat slot (``page *
    page_size + offset``) on the pool's device. ``page_size``: tokens per
    page. ``pages``: int64 ``[num_tokens // page_size]`` ids of the whole
    pages the range starts with, or None: present when the range starts on
    a page boundary (and, for slot ids, when they run in whole pages), so a
    copy moves one row of ``page_size`` tokens per page and uses ``slots``
    only for a partial last page.
    Build it with an adapter's ``locate`` (which checks ids against the pool).
    """

    slots: torch.Tensor
    page_size: int = 1
    pages: torch.Tensor | None = None

    def __post_init__(self) -> None:
        _check_int("page_size", self.page_size, 1)
        for name in ("slots", "pages"):
            t = getattr(self, name)
            if t is None and name == "pages":
                continue
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.int64:
                got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected a 1-D int64 tensor, got {got}")
            if t.device != self.slots.device:
                raise ValueError(f"{name}: expected device {self.slots.device} (as slots), got {t.device}")
        if self.pages is not None and self.pages.numel() * self.page_size > self.slots.numel():
            raise ValueError(f"pages: expected at most {self.slots.numel() // self.page_size} whole pages of "
                             f"{self.page_size} tokens for {self.slots.numel()} slots, got {self.pages.numel()}")

    @property
    def num_tokens(self) -> int:
        return self.slots.numel()

    @property
    def device(self) -> torch.device:
        return self.slots.device

    @property
    def paged_tokens(self) -> int:
        """Leading tokens copied a whole page per row (the rest go a token per row)."""
        return 0 if self.pages is None else self.pages.numel() * self.page_size

    @classmethod
    def from_block_table(cls, block_table: Ids, num_tokens: int, page_size: int, *, start: int = 0,
                         num_pages: int | None = None, device: torch.device | str | None = None) -> TokenSlots:
        """Tokens ``[start, start + num_tokens)`` of a request with pages ``block_table`` (see ``slot_mapping``)."""
        pages = _table_pages(block_table, num_tokens, page_size, start, num_pages, device)
        slots = _slots_of(pages, page_size, start % page_size, num_tokens)
        # A copy: engines reuse (and rewrite) their block-table tensors from step to step.
        whole = pages[:num_tokens // page_size].clone() if start % page_size == 0 else None
        return cls(slots, page_size, whole)

    @classmethod
    def from_slot_ids(cls, slot_ids: Ids, *, page_size: int = 1, num_slots: int | None = None,
                      device: torch.device | str | None = None) -> TokenSlots:
        """One slot id per token (SGLang's ``req_to_token`` row) in a pool of ``page_size``-token pages.

        When the ids run in whole pages (each ``page_size`` consecutive ids
        start at a multiple of ``page_size``, as SGLang allocates with
        ``--page-size``), copies take the page path; otherwise one row per token.
        """
        _check_int("page_size", page_size, 1)
        slots = _ids("slot_ids", slot_ids, device).clone()
        _check_range("slot_ids", slots, num_slots)
        whole = slots.numel() // page_size * page_size
        runs = slots[:whole].view(-1, page_size)
        firsts = runs[:, 0]
        offsets = torch.arange(page_size, dtype=torch.int64, device=slots.device)
        paged = bool(((firsts % page_size == 0) & (runs == firsts[:, None] + offsets).all(1)).all())  # one sync
        return cls(slots, page_size, firsts // page_size if paged else None)


@dataclass(frozen=True)
class TokenSpan:
    """Tokens ``[start, start + num_tokens)`` of row ``batch`` of a contiguous ``[batch, H, seq, D]`` cache."""

    batch: int
    start: int
    num_tokens: int

    def __post_init__(self) -> None:
        for name in ("batch", "start", "num_tokens"):
            _check_int(name, getattr(self, name))


Location = TokenSlots | TokenSpan


@runtime_checkable
class PagedAdapter(Protocol):
    """Copies between canonical KV and one engine's per-layer KV buffers.

    ``where`` is the adapter's ``locate(...)`` result for one request.
    Layer calls take and return ``[kv_parts, num_tokens, H, D]``; whole
    calls ``[num_layers, kv_parts, num_tokens, H, D]``.
    """

    layout: KVLayout

    def gather_layer(self, layer: int, where: Location, out: torch.Tensor | None = None) -> torch.Tensor: ...

    def scatter_layer(self, layer: int, kv_layer: torch.Tensor, where: Location) -> None: ...

    def gather(self, where: Location, out: torch.Tensor | None = None) -> torch.Tensor: ...

    def scatter(self, kv: torch.Tensor, where: Location) -> None: ...


def _tiles(t: torch.Tensor, size: int) -> bool:
    """Whether ``t`` can be viewed as ``size``-byte words (the checks of ``Tensor.view(dtype)``, plus alignment)."""
    es = t.element_size()
    return (t.dim() > 0 and t.stride(-1) == 1 and t.shape[-1] * es % size == 0 and t.data_ptr() % size == 0
            and t.storage_offset() * es % size == 0 and all(s * es % size == 0 for s in t.stride()[:-1]))


def as_words(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """``tensors`` viewed as the widest words that tile all of them (bitwise copies, see ``_WORDS``)."""
    for word in _WORDS:
        if word.is_complex and tensors[0].device.type not in _COMPLEX_DEVICES:
            continue
        if all(_tiles(t, word.itemsize) for t in tensors):
            return [t.view(word) for t in tensors]
    return list(tensors)


def _scatter_rows(rows: tuple[torch.Tensor, torch.Tensor], src: torch.Tensor, where: TokenSlots) -> None:
    """Copy ``src`` ``[n, H, D]`` into a pool at ``where``.

    ``rows``: the pool as one row per page ``[num_pages, page_size * H * D]``
    and as one row per slot ``[num_slots, H * D]`` (views of one buffer).
    """
    page_rows, token_rows = rows
    whole, n = where.paged_tokens, where.num_tokens
    if whole:
        dst, src_rows = as_words(page_rows, src[:whole].reshape(whole // where.page_size, -1))
        dst.index_copy_(0, where.pages, src_rows)
    if whole < n:
        dst, src_rows = as_words(token_rows, src[whole:].reshape(n - whole, -1))
        dst.index_copy_(0, where.slots[whole:], src_rows)


def _gather_rows(rows: tuple[torch.Tensor, torch.Tensor], where: TokenSlots, out: torch.Tensor) -> None:
    """Copy the tokens at ``where`` of a pool (``rows`` as in ``_scatter_rows``) into ``out`` ``[n, H, D]``."""
    if not out.is_contiguous():
        tmp = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        _gather_rows(rows, where, tmp)
        out.copy_(tmp)
        return
    page_rows, token_rows = rows
    whole, n = where.paged_tokens, where.num_tokens
    if whole:
        src, out_rows = as_words(page_rows, out[:whole].view(whole // where.page_size, -1))
        torch.index_select(src, 0, where.pages, out=out_rows)
    if whole < n:
        src, out_rows = as_words(token_rows, out[whole:].view(n - whole, -1))
        torch.index_select(src, 0, where.slots[whole:], out=out_rows)


def _check_buffers(name: str, buffers: Sequence[torch.Tensor], layout: KVLayout,
                   expected: tuple[int | str, ...]) -> tuple[torch.Tensor, ...]:
    """One contiguous tensor per layer, all of one shape (``expected``; a str names a free size), dtype and device."""
    buffers = tuple(buffers)
    if len(buffers) != layout.num_layers:
        raise ValueError(f"{name}: expected {layout.num_layers} tensors (one per layer), got {len(buffers)}")
    want = "[" + ", ".join(str(e) for e in expected) + "]"
    for i, t in enumerate(buffers):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}[{i}]: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != len(expected) or any(isinstance(e, int) and e != s for e, s in zip(expected, t.shape)):
            raise ValueError(f"{name}[{i}]: expected shape {want}, got {list(t.shape)}")
        if t.shape != buffers[0].shape:
            raise ValueError(f"{name}[{i}]: expected shape {list(buffers[0].shape)} (as layer 0), got {list(t.shape)}")
        if t.dtype != layout.dtype:
            raise ValueError(f"{name}[{i}]: expected dtype {layout.dtype}, got {t.dtype}")
        if t.device != buffers[0].device:
            raise ValueError(f"{name}[{i}]: expected device {buffers[0].device} (as layer 0), got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name}[{i}]: expected a contiguous tensor, got strides {list(t.stride())}")
    return buffers


class _Layerwise:
    """Whole-tensor ``gather``/``scatter`` and input checks, built on an adapter's layer calls."""

    layout: KVLayout

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def _tokens(self, where: Location) -> int:
        """Validate ``where`` for this adapter; its number of tokens."""
        raise NotImplementedError

    def gather_layer(self, layer: int, where: Location, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def scatter_layer(self, layer: int, kv_layer: torch.Tensor, where: Location) -> None:
        raise NotImplementedError

    def _check_kv(self, name: str, kv: torch.Tensor, num_tokens: int, layered: bool) -> None:
        expected = self.layout.shape(num_tokens)[0 if layered else 1:]
        dims = "[layers, kv_parts, tokens, heads, head_dim]" if layered else "[kv_parts, tokens, heads, head_dim]"
        if not isinstance(kv, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(kv).__name__}")
        if tuple(kv.shape) != expected:
            raise ValueError(f"{name}: expected shape {list(expected)} ({dims}), got {list(kv.shape)}")
        if kv.dtype != self.layout.dtype:
            raise ValueError(f"{name}: expected dtype {self.layout.dtype}, got {kv.dtype}")
        if kv.device != self.device:
            raise ValueError(f"{name}: expected device {self.device} (the buffers'), got {kv.device}")

    def _layer_call(self, layer: int, where: Location, name: str, kv: torch.Tensor | None) -> torch.Tensor:
        """Validate a layer call; the layer's canonical tensor (``kv``, or a new one when None)."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.layout.num_layers:
            raise ValueError(f"layer: expected an int in [0, {self.layout.num_layers}), got {layer!r}")
        n = self._tokens(where)
        if kv is None:
            return torch.empty(self.layout.shape(n)[1:], dtype=self.layout.dtype, device=self.device)
        self._check_kv(name, kv, n, layered=False)
        return kv

    def gather(self, where: Location, out: torch.Tensor | None = None) -> torch.Tensor:
        """All layers' KV at ``where``: ``[L, P, n, H, D]`` (into ``out`` when given)."""
        n = self._tokens(where)
        if out is None:
            out = torch.empty(self.layout.shape(n), dtype=self.layout.dtype, device=self.device)
        self._check_kv("out", out, n, layered=True)
        for layer in range(self.layout.num_layers):
            self.gather_layer(layer, where, out[layer])
        return out

    def scatter(self, kv: torch.Tensor, where: Location) -> None:
        """Write ``kv`` ``[L, P, n, H, D]`` into every layer's buffers at ``where``."""
        self._check_kv("kv", kv, self._tokens(where), layered=True)
        for layer in range(self.layout.num_layers):
            self.scatter_layer(layer, kv[layer], where)


class _SlotAdapter(_Layerwise):
    """Layer copies for pools of pages addressed by ``TokenSlots``."""

    @property
    def page_size(self) -> int:
        raise NotImplementedError

    def _rows(self, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Layer ``layer``'s buffer of each K/V part as (page rows, slot rows); see ``_scatter_rows``."""
        raise NotImplementedError

    def _tokens(self, where: Location) -> int:
        if not isinstance(where, TokenSlots):
            raise ValueError(f"where: expected TokenSlots (from locate), got {type(where).__name__}")
        if where.page_size != self.page_size:
            raise ValueError(f"where.page_size: expected {self.page_size} (the buffers'), got {where.page_size}")
        if where.device != self.device:
            raise ValueError(f"where: expected indices on {self.device} (the buffers'), got {where.device}")
        return where.num_tokens

    def gather_layer(self, layer: int, where: Location, out: torch.Tensor | None = None) -> torch.Tensor:
        """Layer ``layer``'s KV at ``where``: ``[P, n, H, D]`` (into ``out`` when given)."""
        out = self._layer_call(layer, where, "out", out)
        for part, rows in enumerate(self._rows(layer)):
            _gather_rows(rows, where, out[part])
        return out

    def scatter_layer(self, layer: int, kv_layer: torch.Tensor, where: Location) -> None:
        """Write ``kv_layer`` ``[P, n, H, D]`` into layer ``layer``'s buffers at ``where``; no other slot changes."""
        self._layer_call(layer, where, "kv_layer", kv_layer)
        for part, rows in enumerate(self._rows(layer)):
            _scatter_rows(rows, kv_layer[part], where)


@dataclass(frozen=True, eq=False)
class VLLMPagedAdapter(_SlotAdapter):
    """vLLM's flash-attention layout: per layer one tensor ``[kv_parts, num_pages, page_size, H, D]``.

    ``page_size`` (tokens) must divide ``layout.block_tokens`` (see ``check_page_size``).
    """

    layout: KVLayout
    kv_caches: Sequence[torch.Tensor]

    def __post_init__(self) -> None:
        lay = self.layout
        expected = (lay.kv_parts, "num_pages", "page_size", lay.num_kv_heads, lay.head_dim)
        object.__setattr__(self, "kv_caches", _check_buffers("kv_caches", self.kv_caches, lay, expected))
        check_page_size(self.page_size, lay.block_tokens)

    @property
    def device(self) -> torch.device:
        return self.kv_caches[0].device

    @property
    def page_size(self) -> int:
        return self.kv_caches[0].shape[2]

    @property
    def num_pages(self) -> int:
        return self.kv_caches[0].shape[1]

    def _rows(self, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        num_slots = self.num_pages * self.page_size
        return [(pool.view(self.num_pages, -1), pool.view(num_slots, -1)) for pool in self.kv_caches[layer]]

    def locate(self, block_table: Ids, num_tokens: int, start: int = 0) -> TokenSlots:
        """Tokens ``[start, start + num_tokens)`` of a request with pages ``block_table``; page ids are checked."""
        return TokenSlots.from_block_table(block_table, num_tokens, self.page_size, start=start,
                                           num_pages=self.num_pages, device=self.device)


@dataclass(frozen=True, eq=False)
class SGLangPoolAdapter(_SlotAdapter):
    """SGLang's token pools: per layer K and V buffers ``[num_slots, H, D]`` (``v_buffers`` None when kv_parts=1).

    ``page_size``: the server's ``--page-size`` (tokens; must divide
    ``layout.block_tokens``). With pages, a request's slot ids run in whole
    pages and copies move a page per row; with 1 (the default) a token per row.
    """

    layout: KVLayout
    k_buffers: Sequence[torch.Tensor]
    v_buffers: Sequence[torch.Tensor] | None = None
    page_size: int = 1

    def __post_init__(self) -> None:
        lay = self.layout
        check_page_size(self.page_size, lay.block_tokens)
        expected = ("num_slots", lay.num_kv_heads, lay.head_dim)
        object.__setattr__(self, "k_buffers", _check_buffers("k_buffers", self.k_buffers, lay, expected))
        if (self.v_buffers is None) != (lay.kv_parts == 1):
            raise ValueError(f"v_buffers: expected {'none' if lay.kv_parts == 1 else 'a V buffer per layer'} for "
                             f"kv_parts={lay.kv_parts}, got {'none' if self.v_buffers is None else 'V buffers'}")
        if self.v_buffers is not None:
            expected = tuple(self.k_buffers[0].shape)
            object.__setattr__(self, "v_buffers", _check_buffers("v_buffers", self.v_buffers, lay, expected))
            if self.v_buffers[0].device != self.device:
                raise ValueError(f"v_buffers: expected device {self.device} (as k_buffers), "
                                 f"got {self.v_buffers[0].device}")

    @property
    def device(self) -> torch.device:
        return self.k_buffers[0].device

    @property
    def num_slots(self) -> int:
        return self.k_buffers[0].shape[0]

    def _rows(self, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        parts = (self.k_buffers,) if self.v_buffers is None else (self.k_buffers, self.v_buffers)
        num_pages = self.num_slots // self.page_size  # slots past the last whole page go by the slot path only
        return [(buf[:num_pages * self.page_size].view(num_pages, -1), buf.view(self.num_slots, -1))
                for buf in (buffers[layer] for buffers in parts)]

    def locate(self, slot_ids: Ids) -> TokenSlots:
        """The tokens at ``slot_ids`` (one per token, e.g. ``req_to_token[req, start:end]``); ids are checked."""
        return TokenSlots.from_slot_ids(slot_ids, page_size=self.page_size, num_slots=self.num_slots,
                                        device=self.device)


@dataclass(frozen=True, eq=False)
class HFContiguousAdapter(_Layerwise):
    """Hugging Face contiguous caches: per layer K and V ``[batch, H, seq, D]`` (``value_cache`` None when kv_parts=1).

    A layer copy is one strided ``copy_`` per part (the canonical layout is
    token-major, the cache head-major); no indices.
    """

    layout: KVLayout
    key_cache: Sequence[torch.Tensor]
    value_cache: Sequence[torch.Tensor] | None = None

    def __post_init__(self) -> None:
        lay = self.layout
        expected = ("batch", lay.num_kv_heads, "seq", lay.head_dim)
        object.__setattr__(self, "key_cache", _check_buffers("key_cache", self.key_cache, lay, expected))
        if (self.value_cache is None) != (lay.kv_parts == 1):
            raise ValueError(f"value_cache: expected {'none' if lay.kv_parts == 1 else 'a V tensor per layer'} for "
                             f"kv_parts={lay.kv_parts}, got {'none' if self.value_cache is None else 'V tensors'}")
        if self.value_cache is not None:
            expected = tuple(self.key_cache[0].shape)
            object.__setattr__(self, "value_cache", _check_buffers("value_cache", self.value_cache, lay, expected))
            if self.value_cache[0].device != self.device:
                raise ValueError(f"value_cache: expected device {self.device} (as key_cache), "
                                 f"got {self.value_cache[0].device}")

    @property
    def device(self) -> torch.device:
        return self.key_cache[0].device

    def locate(self, batch: int, num_tokens: int, start: int = 0) -> TokenSpan:
        """Tokens ``[start, start + num_tokens)`` of batch row ``batch``; checked against the cache's size."""
        span = TokenSpan(batch, start, num_tokens)
        self._tokens(span)
        return span

    def _tokens(self, where: Location) -> int:
        if not isinstance(where, TokenSpan):
            raise ValueError(f"where: expected TokenSpan (from locate), got {type(where).__name__}")
        batch, _, seq, _ = self.key_cache[0].shape
        if where.batch >= batch:
            raise ValueError(f"batch: expected an index in [0, {batch}), got {where.batch}")
        if where.start + where.num_tokens > seq:
            raise ValueError(f"tokens: expected an end <= seq={seq}, "
                             f"got [{where.start}, {where.start + where.num_tokens})")
        return where.num_tokens

    def _spans(self, layer: int, where: TokenSpan) -> list[torch.Tensor]:
        """Layer ``layer``'s ``[H, n, D]`` slice of each part."""
        parts = (self.key_cache,) if self.value_cache is None else (self.key_cache, self.value_cache)
        end = where.start + where.num_tokens
        return [cache[layer][where.batch, :, where.start:end] for cache in parts]

    def gather_layer(self, layer: int, where: Location, out: torch.Tensor | None = None) -> torch.Tensor:
        """Layer ``layer``'s KV at ``where``: ``[P, n, H, D]`` (into ``out`` when given)."""
        out = self._layer_call(layer, where, "out", out)
        for part, span in enumerate(self._spans(layer, where)):
            dst, src = as_words(out[part].transpose(0, 1), span)
            dst.copy_(src)
        return out

    def scatter_layer(self, layer: int, kv_layer: torch.Tensor, where: Location) -> None:
        """Write ``kv_layer`` ``[P, n, H, D]`` into layer ``layer``'s caches at ``where``; the rest is untouched."""
        self._layer_call(layer, where, "kv_layer", kv_layer)
        for part, span in enumerate(self._spans(layer, where)):
            dst, src = as_words(span, kv_layer[part].transpose(0, 1))
            dst.copy_(src)
