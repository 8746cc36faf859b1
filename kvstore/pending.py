"""A block whose KV the engine writes straight into the tier's memory: ``KVStore.put_from``.

``put`` takes a tensor, so an engine whose KV lives in paged buffers first
gathers it into one (a copy) and the host tier then copies that into a slot
(a second copy). ``put_from(tokens, fill)`` hands each new block to the
store as a ``PendingBlock`` instead: a tier that keeps blocks in host memory
slots calls ``fill(block, slot_view)`` and the engine gathers the block's
pages right there, one copy in all. Tiers that serialize a block (LMDB,
files, the cache server, Redis) or live on another device get it
``materialize``-d once into a plain tensor first. Blocks already stored are
never filled (dedup happens before), so a repeated prefix costs no copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvstore.buffers import empty_host
from kvstore.keys import BlockRef
from kvstore.layout import KVLayout

# Writes the KV of ``block`` into ``dst`` (``[L, P, block.num_tokens, H, D]``, the tier's memory).
Fill = Callable[[BlockRef, torch.Tensor], None]


class FillError(RuntimeError):
    """The engine's ``fill`` raised: the block is not stored, and no tier is blamed for it."""


@dataclass(eq=False)
class PendingBlock:
    """One block of a ``put_from``: its place in the request and the engine's ``fill``."""

    layout: KVLayout
    ref: BlockRef
    fill: Fill
    _materialized: torch.Tensor | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.shape(self.ref.num_tokens)

    def write_into(self, dst: torch.Tensor) -> None:
        """Have the engine write the block into ``dst`` (a tier's slot), or copy it there if materialized."""
        if self._materialized is not None:
            dst.copy_(self._materialized)
            return
        try:
            with torch.no_grad():  # the store's memory never joins an autograd graph, whatever the engine hands
                self.fill(self.ref, dst)
        except Exception as exc:
            raise FillError(f"fill of tokens [{self.ref.start}, {self.ref.end}) raised {exc!r}") from exc

    def materialize(self) -> torch.Tensor:
        """The block as a host tensor (filled once, then kept), for tiers that take a tensor."""
        if self._materialized is None:
            out = empty_host(self.shape, self.layout.dtype)
            self.write_into(out)
            self._materialized = out
        return self._materialized


def as_tensor(block: torch.Tensor | PendingBlock) -> torch.Tensor:
    """``block`` as a tensor: a pending block is materialized (once)."""
    return block.materialize() if isinstance(block, PendingBlock) else block
