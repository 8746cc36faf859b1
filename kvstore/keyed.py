"""Blocks under keys an engine computes itself, for engines that hash their own pages (SGLang's HiCache).

The token API (``put``/``lookup``/``get``) derives keys from tokens; an
engine that already names each page by a prefix hash of its own hands those
names over instead. ``KeyChain.engine_key`` turns each name into a store key
scoped to the model, the layout and the salt, so engine-named blocks share
the tiers, placement, compression and integrity checks of every other block
and can never be confused with them. ``KVStore`` inherits these methods.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvstore.keys import Salt

EngineKey = str | bytes


class KeyedBlocks:
    """``put_keyed``, ``lookup_keyed`` and ``get_keyed`` of a ``KVStore``."""

    def engine_keys(self, names: Sequence[EngineKey], salt: Salt = None) -> list[bytes]:
        """Store keys of engine-named blocks (see ``KeyChain.engine_key``)."""
        return [self._keys.engine_key(name, salt) for name in names]

    def put_keyed(self, items: Sequence[tuple[EngineKey, torch.Tensor]], salt: Salt = None) -> int:
        """Store blocks named by the engine: ``(name, [L, P, tokens, H, D])`` with 1..block_tokens tokens.

        Every block is validated before any is stored; returns blocks newly stored.
        """
        self._check_open()
        for name, block in items:
            if not isinstance(block, torch.Tensor) or block.dim() != 5 or not 1 <= block.shape[2] <= \
                    self.layout.block_tokens:
                raise ValueError(f"block {name!r}: expected a tensor [L, P, 1..{self.layout.block_tokens}, H, D], "
                                 f"got {getattr(block, 'shape', type(block).__name__)}")
            self.layout.check_kv(block, block.shape[2])
        keys = self.engine_keys([name for name, _ in items], salt)
        return self._store_items([(key, block) for key, (_, block) in zip(keys, items)])

    def lookup_keyed(self, names: Sequence[EngineKey], salt: Salt = None) -> int:
        """How many leading engine-named blocks some tier holds (one round trip to a server for the rest)."""
        self._check_open()
        return len(self._locate(self.engine_keys(names, salt)))

    def get_keyed(self, names: Sequence[EngineKey], outs: Sequence[torch.Tensor], salt: Salt = None) -> int:
        """Read engine-named blocks into ``outs`` (one ``[L, P, tokens, H, D]`` each) in order until one is
        missing; returns how many leading blocks were read (only those ``outs`` are valid)."""
        self._check_open()
        if len(names) != len(outs):
            raise ValueError(f"outs: expected one buffer per name ({len(names)}), got {len(outs)}")
        for name, out in zip(names, outs):
            if not isinstance(out, torch.Tensor) or out.dim() != 5:
                raise ValueError(f"out for {name!r}: expected a tensor [L, P, tokens, H, D], got "
                                 f"{getattr(out, 'shape', type(out).__name__)}")
            self.layout.check_kv(out, out.shape[2])
        return self._fill_keys(self.engine_keys(names, salt), list(outs))
