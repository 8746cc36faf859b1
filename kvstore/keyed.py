"""Blocks under keys an engine computes itself, for engines that hash their own pages (SGLang's HiCache).

The token API (``put``/``lookup``/``get``) derives keys from tokens; an
engine that already names each page by a prefix hash of its own hands those
names over instead. ``KeyChain.engine_key`` turns each name into a store key
scoped to the model, the layout and the salt, so engine-named blocks share
the tiers, placement, compression and integrity checks of every other block
and can never be confused with them. ``KVStore`` owns one and delegates to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvstore.flow import BlockFlow
from kvstore.gate import Gate, gated
from kvstore.keys import KeyChain, Salt
from kvstore.layout import KVLayout
from kvstore.validation import check_disjoint, check_out

EngineKey = str | bytes


class KeyedBlocks:
    """``put_keyed``, ``lookup_keyed`` and ``get_keyed`` over one store's keys and block flow."""

    def __init__(self, layout: KVLayout, keys: KeyChain, flow: BlockFlow, gate: Gate):
        self.layout = layout
        self._keys = keys
        self._flow = flow
        self._gate = gate

    def engine_keys(self, names: Sequence[EngineKey], salt: Salt = None) -> list[bytes]:
        """Store keys of engine-named blocks (see ``KeyChain.engine_key``)."""
        return [self._keys.engine_key(name, salt) for name in _listed(names, "names", "engine keys")]

    def _check_block(self, name: EngineKey, block: object, what: str) -> None:
        if not isinstance(block, torch.Tensor) or block.dim() != 5 or not 1 <= block.shape[2] <= \
                self.layout.block_tokens:
            raise ValueError(f"{what} {name!r}: expected a tensor [L, P, 1..{self.layout.block_tokens}, H, D], "
                             f"got {getattr(block, 'shape', type(block).__name__)}")

    @gated
    def put_keyed(self, items: Sequence[tuple[EngineKey, torch.Tensor]], salt: Salt = None, *,
                  after: Sequence[EngineKey] = ()) -> int:
        """Store blocks named by the engine: ``(name, [L, P, tokens, H, D])`` with 1..block_tokens tokens.

        ``after``: the names of the engine's blocks before these in the same
        sequence (SGLang's ``prefix_keys``): no tier evicts them for these, as
        a prompt's head is never evicted for its tail. Every block is
        validated before any is stored; returns blocks newly stored.
        """
        items = _listed(items, "items", "(name, block) pairs")
        head = self.engine_keys(_listed(after, "after", "engine block names"), salt)
        for item in items:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"items: expected (name, block) pairs, got {type(item).__name__} {item!r:.80}")
        for name, block in items:
            self._check_block(name, block, "block")
            self.layout.check_kv(block, block.shape[2])
        keys = self.engine_keys([name for name, _ in items], salt)
        unique: dict[bytes, torch.Tensor] = {}
        for key, (_, block) in zip(keys, items):  # a name given again stores nothing, as one stored before
            if key in unique:
                self._flow.count_dedup(block)
            else:
                unique[key] = block
        return self._flow.store_items([(key, block.detach()) for key, block in unique.items()], head)

    @gated
    def lookup_keyed(self, names: Sequence[EngineKey], salt: Salt = None) -> int:
        """How many leading engine-named blocks some tier holds (one round trip to a server for the rest)."""
        return len(self._flow.stack.locate(self.engine_keys(names, salt)))

    @gated
    def get_keyed(self, names: Sequence[EngineKey], outs: Sequence[torch.Tensor], salt: Salt = None) -> int:
        """Read engine-named blocks into ``outs`` (one ``[L, P, tokens, H, D]`` each) in order until one is
        missing; returns how many leading blocks were read (only those ``outs`` are valid)."""
        names, outs = _listed(names, "names", "engine keys"), _listed(outs, "outs", "tensors")
        if len(names) != len(outs):
            raise ValueError(f"outs: expected one buffer per name ({len(names)}), got {len(outs)}")
        for name, out in zip(names, outs):
            self._check_block(name, out, "out for")
            check_out(self.layout, out, out.shape[2], f"out for {name!r}")
        check_disjoint(outs)
        return self._flow.fill_keys(self.engine_keys(names, salt), list(outs))


def _listed(values: object, what: str, of: str) -> Sequence:
    """``values`` if it is a list or tuple, else a ``ValueError``: a generator was read up by the first of
    several passes (``put_keyed`` stored nothing and returned 0), a str or a dict is no sequence of them."""
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{what}: expected a list or tuple of {of}, got {type(values).__name__} {values!r:.80}")
    return values
