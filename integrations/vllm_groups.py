"""vLLM's KV-cache groups as kvstore stores them: full attention, sliding window and chunked local attention.

vLLM's hybrid allocator (``SupportsHMA``) gives each group of layers its
own block table. A full-attention group keeps a page for every token. A
sliding-window group (Gemma 2/3, gpt-oss, Mistral) or a chunked-local one
(Llama 4) keeps only the pages its next token can attend to: pages below
the window are freed (and reused by other requests) as the request
advances, and a request admitted with a hit gets vLLM's *null block* in
their place.

What kvstore stores exactly: every stored block holds every attention
layer's K and V of its tokens, whatever the layer's group, saved while the
pages still hold them. A block is saved in the step that completes it
(``incremental`` saves), from pages each group still holds; a block some of
whose window pages were freed before it could be saved (a window shorter
than a store block plus a chunk's misalignment) is not saved, nor any after
it (``save_window_gaps``), and is recomputed. A load writes each group's
pages that vLLM allocated (never its null block), so what vLLM then caches
as computed is exact.

What is recomputed: a model with any other group (Mamba and linear
attention states, cross-attention, sink or reversed sliding windows, groups
whose layers differ in shape) is served nothing and saves nothing; vLLM
computes it as without kvstore (``cache_groups`` returns None and says why).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

NO_PAGE = -1  # a block-table entry whose page vLLM freed, or its null block: nothing to read or write there

# Tokens whose pages vLLM may have freed once ``computed`` tokens are computed, by how a group attends; an
# upper bound (vLLM retains extra pages for multi-token prediction, never fewer).
_FREED: dict[str, Callable[[int, int], int]] = {
    "full": lambda computed, span: 0,
    "window": lambda computed, span: max(0, computed - span + 1),
    "chunk": lambda computed, span: computed // span * span,
}

# vLLM's spec classes kvstore stores, by exact class name (subclasses such as sink or reversed windows attend
# otherwise): (kind, the spec's attribute holding the window or chunk in tokens).
_SPECS: dict[str, tuple[str, str | None]] = {
    "FullAttentionSpec": ("full", None),
    "MLAAttentionSpec": ("full", None),
    "SlidingWindowSpec": ("window", "sliding_window"),
    "SlidingWindowMLASpec": ("window", "sliding_window"),
    "ChunkedLocalAttentionSpec": ("chunk", "attention_chunk_size"),
}


@dataclass(frozen=True)
class Group:
    """One KV-cache group: its layers, and how it attends (``span``: window or chunk, tokens)."""

    index: int
    layer_names: frozenset[str]
    kind: str = "full"
    span: int = 0
    every_layer: bool = False  # the stand-in group when vLLM gives no config; a group vLLM gives holds its names

    def freed_tokens(self, computed: int) -> int:
        """How many leading tokens' pages vLLM may have freed once ``computed`` tokens are computed."""
        return _FREED[self.kind](computed, self.span)


@dataclass(frozen=True)
class CacheGroups:
    """The groups of one engine's KV-cache config, in vLLM's order (the order of its block tables)."""

    groups: tuple[Group, ...]

    @property
    def hybrid(self) -> bool:
        """More than one block table, or one whose pages vLLM frees as the prompt goes on (a sliding window, a
        chunked local span): saves go block by block, loads are async and fail whole requests. vLLM takes
        no per-block load errors from multi-group models; for a window-only model (Mistral-7B-v0.1) a failed
        block's cut point left null pages inside the window, and a prompt longer than one prefill chunk was
        never saved (its first pages were freed by the time the whole prompt was computed)."""
        return len(self.groups) > 1 or any(group.kind != "full" for group in self.groups)

    def layer_group(self, layer_name: str) -> int | None:
        """The group holding ``layer_name`` (group 0 when vLLM gave no config), None when no group does.

        A group vLLM gives with no layers (a pipeline rank's share of a model whose other ranks hold that
        group's layers: Gemma-3-1B at PP=4) holds none: read as every layer's, it gave a full-attention layer
        an empty sliding-window group's block table, and its KV went to and came from that table's pages.
        """
        for group in self.groups:
            if group.every_layer or layer_name in group.layer_names:
                return group.index
        return None

    def save_tables(self, block_ids: Sequence[Sequence[int]], computed: int, page_size: int,
                    pages: int) -> tuple[list[int], ...]:
        """Each group's first ``pages`` block ids, ``NO_PAGE`` where the group may have freed the page by the
        time a step starting at ``computed`` tokens runs."""
        tables = []
        for group, ids in zip(self.groups, block_ids):
            freed = group.freed_tokens(computed) // page_size
            tables.append([NO_PAGE if i < freed else int(b) for i, b in enumerate(ids[:pages])])
        return tuple(tables)


def single_group() -> CacheGroups:
    """The groups when vLLM gives no KV-cache config: one full-attention group of every layer."""
    return CacheGroups((Group(0, frozenset(), every_layer=True),))


def cache_groups(kv_cache_config: Any, page_size: int) -> tuple[CacheGroups | None, str]:
    """The groups kvstore stores, or None and the reason when some group's state cannot be stored exactly."""
    specs = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
    if not specs:
        return single_group(), ""
    groups = []
    for i, group in enumerate(specs):
        spec = group.kv_cache_spec
        name = type(spec).__name__
        if name not in _SPECS:
            return None, f"group {i} is {name}, a state kvstore does not store"
        if spec.block_size != page_size:
            return None, f"group {i} has {spec.block_size}-token blocks, not vLLM's {page_size}"
        kind, attr = _SPECS[name]
        span = int(getattr(spec, attr) or 0) if attr else 0
        if attr and span <= 0:
            kind = "full"  # a window vLLM does not enforce in its allocation: every page is kept
        groups.append(Group(i, frozenset(group.layer_names), kind, span))
    return CacheGroups(tuple(groups)), ""


def load_tables(blocks: Any) -> tuple[list[int], ...]:
    """vLLM's ``KVCacheBlocks`` of a request as one block table per group, ``NO_PAGE`` for its null blocks."""
    return tuple([NO_PAGE if b.is_null else int(b.block_id) for b in group] for group in blocks.blocks)
