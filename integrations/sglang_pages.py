"""SGLang's host-pool pages as kvstore blocks: views of a page in each host layout, and a pool's page geometry.

A page in SGLang's host pool, in any of its layouts (``layer_first``
``[2, L, T, H, D]``, ``page_first`` ``[2, T, L, H, D]``,
``page_first_direct`` ``[2, 1, L, T, H, D]``, ``page_head``
``[2, 1, H, T, L, D]``; MLA without the K/V axis), is viewed as kvstore's
canonical ``[L, P, T, H, D]`` by a permutation of strides, without a copy,
so the store copies once, between the pool and its own tier.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from kvstore import KVLayout

# A page view (``host_pool.get_data_page(i, flat=False)``) -> canonical [L, P, T, H, D], by host layout.
_MHA_VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "layer_first": lambda v: v.transpose(0, 1),            # [2, L, T, H, D]
    "page_first": lambda v: v.permute(2, 0, 1, 3, 4),      # [2, T, L, H, D]
    "page_first_direct": lambda v: v[:, 0].transpose(0, 1),  # [2, 1, L, T, H, D]
    "page_head": lambda v: v[:, 0].permute(3, 0, 2, 1, 4),  # [2, 1, H, T, L, D]
}
_MLA_VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "layer_first": lambda v: v.unsqueeze(1),                # [L, T, 1, D]
    "page_first": lambda v: v.transpose(0, 1).unsqueeze(1),  # [T, L, 1, D]
    "page_first_direct": lambda v: v[0].unsqueeze(1),       # [1, L, T, 1, D]
}


def host_page_tokens(pool: Any) -> int:
    """Tokens a page of ``pool`` spans in SGLang's host indices: its logical page (``page_size * dcp_size`` under
    decode context parallelism, where each rank's page holds its share of them), else its ``page_size``."""
    return int(getattr(pool, "logical_page_size", None) or getattr(pool, "page_size", 1) or 1)


def page_starts(host_indices: Any, count: int, page: int, size: int | None, what: str) -> list[int]:
    """The first host index of each of ``count`` pages ``host_indices`` names: ``page`` consecutive indices a
    page, each page starting at a multiple of ``page`` inside a pool of ``size`` tokens (None: not known).

    SGLang always sends such pages. Anything else is a ``ValueError`` (a
    miss): only the first index of a page was read, so a run from 8 tokens
    before the pool's end stored a half page under the key (read back by
    nothing, and deduplicating the whole page later), and a run starting
    mid-page wrote the whole page it fell in.
    """
    if not isinstance(host_indices, torch.Tensor) or host_indices.numel() != count * page:
        got = host_indices.numel() if isinstance(host_indices, torch.Tensor) else type(host_indices).__name__
        raise ValueError(f"{what}: expected {count * page} indices for {count} pages of {page}, got {got}")
    if host_indices.dtype.is_floating_point or host_indices.dtype.is_complex or host_indices.dtype == torch.bool:
        raise ValueError(f"{what}: expected integer indices, got dtype {host_indices.dtype}")
    if not count:
        return []
    pages = host_indices.reshape(count, page).to(device="cpu", dtype=torch.int64)
    starts = pages[:, 0]
    inside = bool((starts >= 0).all()) and (size is None or bool((starts + page <= size).all()))
    if not inside or bool((starts % page).any()) or not torch.equal(pages, starts[:, None] + torch.arange(page)):
        raise ValueError(f"{what}: expected pages of {page} consecutive indices, each starting at a multiple of "
                         f"{page} inside the pool ({size} tokens), got {host_indices.tolist()!r:.200}")
    return starts.tolist()


def canonical_page_view(page: torch.Tensor, host_layout: str, mla: bool = False) -> torch.Tensor:
    """SGLang's page view (``get_data_page(i, flat=False)``) as kvstore's ``[L, P, T, H, D]``: a view, no copy."""
    views = _MLA_VIEWS if mla else _MHA_VIEWS
    if host_layout not in views:
        raise ValueError(f"host layout: expected one of {sorted(views)} for {'MLA' if mla else 'MHA'}, "
                         f"got {host_layout!r}")
    return views[host_layout](page)


class RefusedPool(ValueError):
    """A pool configuration kvstore refuses at attach: raised to SGLang, never stored as flat pages instead (a
    split-heads pool stored so was keyed by its own TP size, and a decode rank of another never hit)."""


class PoolKindMismatch(RefusedPool):
    """An MHA pool where SGLang said MLA (rank-replicated KV), or the other way round: a configuration error."""


class PageGeometry(NamedTuple):
    """One page of a host pool: its ``KVLayout``, host layout, page view -> canonical, and page view's shape."""

    layout: KVLayout
    host_layout: str
    to_canonical: Callable[[torch.Tensor], torch.Tensor]
    page_shape: tuple[int, ...]


def describe_pool(pool: Any, storage_config: Any, expect_mla: bool | None = None) -> PageGeometry:
    """The KVLayout of one page of ``pool``, its host layout, page view -> canonical, and the page view's shape;
    ``expect_mla``: the kind the backend was configured for (None: whatever the pool is)."""
    if getattr(pool, "kv_buffer", None) is None:
        raise ValueError(f"host pool {type(pool).__name__}: expected a materialized kv_buffer (hybrid/logical "
                         f"anchor pools are not supported by the kvstore backend)")
    host_layout = pool.layout
    c = storage_config
    mla = hasattr(pool, "kv_cache_dim")
    if expect_mla is not None and mla != expect_mla:
        raise PoolKindMismatch(f"host pool {type(pool).__name__}: expected an {'MLA' if expect_mla else 'MHA'} pool "
                         f"(storage_config.is_mla_model={expect_mla}), got {'MLA' if mla else 'MHA'}")
    if mla:
        heads, head_dim, parts, tp_rank, tp_size = 1, pool.kv_cache_dim, 1, 0, 1  # replicated on every rank
    else:
        head_dim, v_head_dim = pool.head_dim, getattr(pool, "v_head_dim", pool.head_dim)
        if v_head_dim != head_dim:
            raise ValueError(f"host pool: expected equal K and V head dims, got {head_dim} and {v_head_dim}")
        if getattr(c, "should_split_heads", False):
            raise RefusedPool("storage_config.should_split_heads: split-heads heterogeneous TP is not supported "
                             "by the kvstore backend")
        heads, parts, tp_rank, tp_size = pool.head_num, 2, c.tp_rank, c.tp_size
    # first_layer: a pipeline stage holds layers [start_layer, ...]; after a re-partition another stage of as
    # many layers was served these layers' pages as its own
    layout = KVLayout(num_layers=pool.layer_num, num_kv_heads=heads, head_dim=head_dim, dtype=pool.dtype,
                      block_tokens=pool.page_size, kv_parts=parts, tp_rank=tp_rank, tp_size=tp_size,
                      first_layer=int(getattr(pool, "start_layer", 0) or 0))
    views = _MLA_VIEWS if mla else _MHA_VIEWS
    if host_layout not in views:
        raise ValueError(f"host pool layout: expected one of {sorted(views)}, got {host_layout!r}")
    to_canonical = views[host_layout]
    sample = pool.get_data_page(0, flat=False)
    canonical = to_canonical(sample)
    if tuple(canonical.shape) != layout.block_shape:
        raise ValueError(f"host pool page: expected a view of shape {list(layout.block_shape)} after mapping "
                         f"{host_layout!r}, got {list(canonical.shape)} from {list(sample.shape)}")
    return PageGeometry(layout, host_layout, to_canonical, tuple(sample.shape))
