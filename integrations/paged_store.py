"""Moving a request's KV between a ``KVStore`` and an engine's paged buffers with as few copies as it takes.

Two ways to save, picked by how many engine pages a store block spans:

* ``put_from`` (``kvstore/pending.py``): each new block's layers are
  gathered from the pages straight into its host slot: one copy. Each block
  costs ``layers x kv_parts`` gather calls, so this wins when a block spans
  many pages (256-token blocks over 16-token pages: 16 pages a call);
* staged (``store.save(layer_wise=True)``): one gather per layer for the whole
  request into a reused staging buffer, then one copy per block into its
  slot: two copies, but a few large calls instead of thousands of small
  ones when a block is a page or two.

Loading goes through ``store.load(layer_wise=True, sink=...)``: the loader's
worker hands each layer of the stored blocks, in place, and ``block_sink``
scatters them straight into the pages (one copy, no ring).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvstore.keys import BlockRef, Salt, Tokens

# A block spanning at least this many engine pages is saved straight into its slot (``put_from``).
DIRECT_PAGES = 8


class PagePlaces:
    """Where tokens ``[start, start + n)`` of a request sit in the adapter's pages, located once per range."""

    def __init__(self, adapter: Any, block_table: Sequence[int]):
        self.adapter = adapter
        self.block_table = block_table
        self._places: dict[tuple[int, int], Any] = {}

    def __call__(self, start: int, num_tokens: int) -> Any:
        key = (start, num_tokens)
        if key not in self._places:
            self._places[key] = self.adapter.locate(self.block_table, num_tokens, start=start)
        return self._places[key]


def check_pages(places: PagePlaces, tokens: Tokens, start: int) -> None:
    """A ``ValueError`` now if ``places``' block table does not place every token ``[start, len(tokens))``
    in its adapter's pages: checked block by block, a bad id stored the blocks before it and then raised (a
    ``FillError``, from the direct path). The range located stays in ``places`` for the save to use."""
    try:
        total = len(tokens)
    except TypeError:
        return  # not a sequence: the store's own check names it
    if total > start:
        places(start, total - start)


def save_paged(store: Any, tokens: Tokens, adapter: Any, block_table: Sequence[int], salt: Salt = None,
               start: int = 0) -> int:
    """Store tokens ``[start, len(tokens))`` of a request whose KV sits at ``block_table`` in ``adapter``'s
    pages (``start`` on a store block boundary); returns blocks newly stored."""
    layers = store.layout.num_layers
    places = PagePlaces(adapter, block_table)
    check_pages(places, tokens, start)
    if store.layout.block_tokens >= DIRECT_PAGES * adapter.page_size:
        def fill(block: BlockRef, dst: torch.Tensor) -> None:
            where = places(block.start, block.num_tokens)
            for layer in range(layers):
                adapter.gather_layer(layer, where, out=dst[layer])
        return store.put_from(tokens, fill, salt=salt, start=start)
    saver = store.save(tokens, salt=salt, layer_wise=True, start=start)
    if saver.num_tokens > start:
        where = places(start, saver.num_tokens - start)
        for layer in range(layers):
            saver.save_layer(layer, adapter.gather_layer(layer, where, out=saver.layer_buffer(layer)))
    return saver.stored or 0


def block_sink(adapter: Any, block_table: Sequence[int], start: int = 0,
               end: int | None = None) -> Callable[[int, list[tuple[int, torch.Tensor]]], None]:
    """A loader sink scattering tokens ``[start, end)`` of each loaded block into ``adapter``'s pages.

    Blocks spanning many pages are scattered one by one, straight from the
    store's slots (one copy). Blocks of a page or two would cost thousands
    of small calls a request: a layer's blocks are then first joined into
    one reused buffer and scattered in one call (two copies, few calls).
    """
    places = PagePlaces(adapter, block_table)
    joined: dict[tuple[int, ...], torch.Tensor] = {}

    def sink(layer: int, parts: list[tuple[int, torch.Tensor]]) -> None:
        spans = []
        for first, block in parts:
            last = first + block.shape[1]
            lo, hi = max(first, start), (last if end is None else min(last, end))
            if lo < hi:
                spans.append((lo, hi, block[:, lo - first:hi - first]))
        if len(spans) > 1 and parts[0][1].shape[1] < DIRECT_PAGES * adapter.page_size:
            lo, hi = spans[0][0], spans[-1][1]
            shape = (spans[0][2].shape[0], hi - lo, *spans[0][2].shape[2:])
            if shape not in joined:
                joined[shape] = torch.empty(shape, dtype=spans[0][2].dtype, device=spans[0][2].device)
            torch.cat([kv for _, _, kv in spans], dim=1, out=joined[shape])
            spans = [(lo, hi, joined[shape])]
        for lo, hi, kv in spans:
            adapter.scatter_layer(layer, kv, places(lo, hi - lo))
    return sink
