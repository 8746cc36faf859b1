"""Copies between kvstore's blocks and vLLM's per-layer paged KV caches, in every layout vLLM 0.33 hands out.

vLLM 0.33 registers one standardized view per layer, ``[num_blocks, H,
page, Dk + Dv]`` with K and V side by side in the last dimension, whose
memory order depends on the attention backend (``LBNHC``, ``LBHNC``, ...);
earlier versions registered ``[2, num_blocks, page, H, D]``, which
``integrations/paged.py``'s ``VLLMPagedAdapter`` handles. ``paged_adapter``
picks the right one. No vLLM import: the copies are plain torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvstore.integrations.paged import VLLMPagedAdapter, as_words, check_page_size, request_table
from kvstore.integrations.vllm_groups import NO_PAGE
from kvstore.layout import KVLayout


@dataclass(frozen=True)
class PageSlots:
    """Tokens ``[start, start + num_tokens)`` of a request: whole pages by id, then single tokens."""

    num_tokens: int
    whole_pages: torch.Tensor  # page ids of the leading whole pages (start on a page boundary), int64
    pages: torch.Tensor  # page id of each remaining token
    offsets: torch.Tensor  # its slot in the page


class StandardizedPagedAdapter:
    """vLLM 0.33's standardized per-layer views ``[num_blocks, H, page, P * D]`` (K then V in the last dim;
    an MLA latent cache is ``P = 1``, ``H = 1``).

    The views may have any strides (``LBNHC``, ``LBHNC``...). Whole pages
    move by one indexed copy per part and layer; a range starting or ending
    inside a page moves its partial pages token by token.
    """

    def __init__(self, layout: KVLayout, kv_caches: Sequence[torch.Tensor]):
        caches = [as_dtype(t, layout.dtype, f"kv_caches[{i}]") for i, t in enumerate(kv_caches)]
        if len(caches) != layout.num_layers:
            raise ValueError(f"kv_caches: expected {layout.num_layers} layers, got {len(caches)}")
        h, c = layout.num_kv_heads, layout.kv_parts * layout.head_dim
        for i, t in enumerate(caches):
            if t.dim() != 4 or t.shape[1] != h or t.shape[3] != c or t.shape != caches[0].shape:
                raise ValueError(f"kv_caches[{i}]: expected [num_blocks, {h}, page, {c}] as layer 0, "
                                 f"got {list(t.shape)}")
            if t.dtype != layout.dtype:
                raise ValueError(f"kv_caches[{i}]: expected dtype {layout.dtype}, got {t.dtype}")
        check_page_size(caches[0].shape[2], layout.block_tokens)
        self.layout = layout
        self.kv_caches = caches

    @property
    def device(self) -> torch.device:
        return self.kv_caches[0].device

    @property
    def page_size(self) -> int:
        return self.kv_caches[0].shape[2]

    @property
    def num_pages(self) -> int:
        return self.kv_caches[0].shape[0]

    def locate(self, block_table: Sequence[int], num_tokens: int, start: int = 0) -> PageSlots:
        page = self.page_size
        table = request_table(block_table, num_tokens, start)
        end = start + num_tokens
        if table.numel() < -(-end // page):
            raise ValueError(f"block_table: expected at least {-(-end // page)} block ids for tokens "
                             f"[{start}, {end}), got {table.numel()}")
        if table.numel() and (int(table.min()) < 0 or int(table.max()) >= self.num_pages):
            raise ValueError(f"block_table: expected ids in [0, {self.num_pages}), got {table.tolist()}")
        whole = (end // page - start // page) if start % page == 0 else 0
        whole_pages = table[start // page:start // page + whole]
        rest = torch.arange(start + whole * page, end, dtype=torch.int64)
        dev = self.device
        return PageSlots(num_tokens, whole_pages.to(dev), table[rest // page].to(dev), (rest % page).to(dev))

    def gather_layer(self, layer: int, where: PageSlots, out: torch.Tensor | None = None) -> torch.Tensor:
        """Layer ``layer``'s KV at ``where`` as ``[2, n, H, D]``."""
        lay, cache = self.layout, self.kv_caches[layer]
        d = lay.head_dim
        if out is None:
            out = torch.empty(lay.shape(where.num_tokens)[1:], dtype=lay.dtype, device=self.device)
        w = where.whole_pages.numel() * self.page_size
        if w:
            phys = _token_major(cache)
            if phys is not None and out.is_contiguous():  # each part straight out of its slice, as words
                for part in range(lay.kv_parts):
                    src, dst = as_words(phys[..., part * d:(part + 1) * d],
                                        out[part, :w].view(-1, self.page_size, lay.num_kv_heads, d))
                    torch.index_select(src, 0, where.whole_pages, out=dst)
            else:
                pages = cache[where.whole_pages].transpose(1, 2)  # [np, page, H, P * D]
                for part in range(lay.kv_parts):
                    out[part, :w].view(-1, self.page_size, lay.num_kv_heads, d).copy_(
                        pages[..., part * d:(part + 1) * d])
        if w < where.num_tokens:
            rows = cache[where.pages, :, where.offsets]  # [n, H, P * D]
            for part in range(lay.kv_parts):
                out[part, w:].copy_(rows[..., part * d:(part + 1) * d])
        return out

    def scatter_layer(self, layer: int, kv_layer: torch.Tensor, where: PageSlots) -> None:
        """Write ``kv_layer`` ``[2, n, H, D]`` into layer ``layer``'s pages at ``where``."""
        lay, cache = self.layout, self.kv_caches[layer]
        if tuple(kv_layer.shape) != lay.shape(where.num_tokens)[1:] or kv_layer.dtype != lay.dtype:
            raise ValueError(f"kv_layer: expected {list(lay.shape(where.num_tokens)[1:])} {lay.dtype}, "
                             f"got {list(kv_layer.shape)} {kv_layer.dtype}")
        w = where.whole_pages.numel() * self.page_size
        d = lay.head_dim
        if w:  # each part straight into its slice of the last dim: no interleaved copy first
            phys = _token_major(cache)
            target = phys if phys is not None else cache
            for part in range(lay.kv_parts):
                pages = kv_layer[part, :w].reshape(-1, self.page_size, lay.num_kv_heads, d)
                dst, src = as_words(target[..., part * d:(part + 1) * d],
                                    pages if phys is not None else pages.transpose(1, 2))
                dst.index_copy_(0, where.whole_pages, src)
        if w < where.num_tokens:
            rows = torch.cat(list(kv_layer[:, w:]), dim=-1)  # [n, H, P * D]
            cache.index_put_((where.pages[:, None], torch.arange(lay.num_kv_heads, device=self.device)[None, :],
                              where.offsets[:, None]), rows)


@dataclass(frozen=True)
class GroupSlots:
    """Where one group's layers read or write tokens ``[start + skip, start + n)``; the first ``skip`` have no
    page in that group (freed, or vLLM's null block)."""

    skip: int
    slots: PageSlots | None


class GroupedAdapter:
    """One adapter over the layers of several KV-cache groups: each layer reads and writes its own group's
    block table (``tables[layer_groups[layer]]``), and a table's ``NO_PAGE`` entries are never touched.

    A load scatters each group's tokens from its first page on; a gather (a
    save) of tokens a group has no page for raises ``ValueError``: the
    caller saves only what ``first_token`` says every group still holds.
    """

    def __init__(self, inner: Any, layer_groups: Sequence[int]):
        if len(layer_groups) != inner.layout.num_layers:
            raise ValueError(f"layer_groups: expected one group per layer ({inner.layout.num_layers}), "
                             f"got {len(layer_groups)}")
        self.inner = inner
        self.layout = inner.layout
        self.layer_groups = list(layer_groups)

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def page_size(self) -> int:
        return self.inner.page_size

    @property
    def num_pages(self) -> int:
        return self.inner.num_pages

    def first_token(self, tables: Sequence[Sequence[int]], end: int) -> int:
        """The first token from which every group holds a page for each token up to ``end``."""
        page, first = self.page_size, 0
        for table in tables:
            used = list(table[:-(-end // page)])
            missing = [i for i, b in enumerate(used) if b == NO_PAGE]
            if missing:
                first = max(first, (missing[-1] + 1) * page)
        return min(first, end)

    def locate(self, tables: Sequence[Sequence[int]], num_tokens: int, start: int = 0) -> list[GroupSlots]:
        end, page = start + num_tokens, self.page_size
        out = []
        for table in tables:
            skip = max(0, self.first_token([table], end) - start)
            if skip >= num_tokens:
                out.append(GroupSlots(num_tokens, None))
                continue
            ids = [max(b, 0) for b in table[:-(-end // page)]]  # entries before start + skip are not read
            out.append(GroupSlots(skip, self.inner.locate(ids, num_tokens - skip, start=start + skip)))
        return out

    def gather_layer(self, layer: int, where: list[GroupSlots], out: torch.Tensor | None = None) -> torch.Tensor:
        at = where[self.layer_groups[layer]]
        if at.skip:
            raise ValueError(f"layer {layer}: its KV-cache group holds no page for {at.skip} of the tokens to save")
        return self.inner.gather_layer(layer, at.slots, out)

    def scatter_layer(self, layer: int, kv_layer: torch.Tensor, where: list[GroupSlots]) -> None:
        at = where[self.layer_groups[layer]]
        if at.slots is not None:
            self.inner.scatter_layer(layer, kv_layer[:, at.skip:], at.slots)


def as_dtype(cache: torch.Tensor, dtype: torch.dtype, name: str = "kv_cache") -> torch.Tensor:
    """``cache`` as ``dtype``: vLLM allocates fp8 caches as ``uint8`` views of the same bytes."""
    if cache.dtype == dtype:
        return cache
    if cache.dtype in (torch.uint8, torch.int8) and dtype.itemsize == 1:
        return cache.view(dtype)
    raise ValueError(f"{name}: expected dtype {dtype} (or uint8 bytes of an fp8 cache), got {cache.dtype}")


def _token_major(cache: torch.Tensor) -> torch.Tensor | None:
    """``cache`` ``[B, H, page, 2D]`` as the contiguous ``[B, page, H, 2D]`` it is in memory (vLLM's default
    ``LBNHC``), or None if it is laid out otherwise."""
    phys = cache.transpose(1, 2)
    return phys if phys.is_contiguous() else None


def paged_adapter(layout: KVLayout, kv_caches: Sequence[torch.Tensor]) -> Any:
    """The adapter for vLLM's per-layer caches: standardized 4-D views, or the pre-0.33 5-D ``[2, B, page, H, D]``."""
    if kv_caches and kv_caches[0].dim() == 5:
        return VLLMPagedAdapter(layout, [as_dtype(t, layout.dtype, f"kv_caches[{i}]") for i, t in enumerate(kv_caches)])
    return StandardizedPagedAdapter(layout, kv_caches)
