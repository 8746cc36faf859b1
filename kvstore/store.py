"""KVStore: put, find and get the KV of token prefixes across the host-RAM and NVMe tiers."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import torch

from kvstore.config import StoreConfig
from kvstore.keys import BlockRef, KeyChain, Salt, Tokens
from kvstore.layout import KVLayout
from kvstore.metrics import Counters
from kvstore.tiers.base import Tier
from kvstore.tiers.host import HostTier
from kvstore.tiers.lmdb import LmdbTier

STORE_COUNTERS = ("puts", "blocks_stored", "dedup_blocks", "dedup_bytes", "lookups", "lookup_tokens",
                  "lookup_hit_tokens", "gets", "get_tokens", "get_hit_tokens", "promotions")


class KVStore:
    """A prefix-deduplicated KV-cache store for one model shard.

    ``put`` lands blocks in host RAM (if configured) and writes them to the
    LMDB tier at once (write-through) or when host RAM evicts them
    (write-back). ``lookup`` and ``get`` search the tiers fastest first. A
    miss or a damaged block is never an exception: fewer tokens come back,
    and ``stats()`` counts why. Safe to call from many threads.
    """

    def __init__(self, layout: KVLayout, config: StoreConfig | None = None):
        if not isinstance(layout, KVLayout):
            raise ValueError(f"layout: expected a KVLayout, got {type(layout).__name__}")
        config = StoreConfig() if config is None else config
        if not isinstance(config, StoreConfig):
            raise ValueError(f"config: expected a StoreConfig, got {type(config).__name__}")
        self.layout = layout
        self.config = config
        self._keys = KeyChain(config.model_id, layout.fingerprint, layout.block_tokens, config.hash)
        self._counters = Counters(*STORE_COUNTERS)
        self._closed = False
        self._close_lock = threading.Lock()
        self.disk: LmdbTier | None = None
        if config.disk_dir is not None:
            self.disk = LmdbTier(config.disk_dir, config.disk_bytes, layout, sync=config.disk_sync)
        write_back = config.write_policy == "write_back" and self.disk is not None
        try:
            self.host: HostTier | None = (
                HostTier(layout, config.host_bytes, on_evict=self._write_back if write_back else None)
                if config.host_bytes > 0 else None
            )
        except BaseException:
            if self.disk is not None:
                self.disk.close()
            raise
        self.tiers: list[Tier] = [t for t in (self.host, self.disk) if t is not None]

    # -- context management -------------------------------------------------

    def __enter__(self) -> "KVStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Write back blocks only host RAM holds (write-back policy), then close every tier."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self.host is not None and self.disk is not None and self.config.write_policy == "write_back":
            for key in self.host.keys():
                with self.host.reading(key) as view:
                    if view is not None:
                        self._write_back(key, view)
        for tier in self.tiers:
            tier.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("KVStore is closed")

    # -- the contract -----------------------------------------------------------

    def block_keys(self, tokens: Tokens, salt: Salt = None) -> list[BlockRef]:
        """The keys and token ranges of ``tokens``' blocks (full blocks, then the partial tail)."""
        return self._keys.blocks(tokens, salt)

    def _stored_anywhere(self, key: bytes) -> bool:
        return any(tier.contains(key) for tier in self.tiers)

    def put(self, tokens: Tokens, kv: torch.Tensor, salt: Salt = None) -> int:
        """Store the KV of ``tokens`` (``kv``: ``[L, P, len(tokens), H, D]``); returns blocks newly stored.

        Blocks already stored in any tier are skipped and counted as dedup.
        Everything is validated before anything is stored.
        """
        self._check_open()
        blocks = self._keys.blocks(tokens, salt)
        self.layout.check_kv(kv, _num_tokens(blocks))
        self._counters.add("puts")
        new = []
        for block in blocks:
            if self._stored_anywhere(block.key):
                self._counters.add("dedup_blocks")
                self._counters.add("dedup_bytes", block.num_tokens * self.layout.token_bytes)
            else:
                new.append((block.key, kv[:, :, block.start:block.end]))
        if not new:
            return 0
        self._put_blocks(new)
        stored = sum(self._stored_anywhere(key) for key, _ in new)
        self._counters.add("blocks_stored", stored)
        return stored

    def _put_blocks(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> None:
        if self.host is None:
            if self.disk is not None:
                self.disk.put_many(items)
            return
        for key, block in items:
            self.host.put(key, block)
        if self.disk is None or self.config.write_policy != "write_through":
            return
        # Write to disk from the contiguous host slots (pinned meanwhile), not the strided input.
        with ExitStack() as stack:
            sources = []
            for key, block in items:
                view = stack.enter_context(self.host.reading(key))
                sources.append((key, block if view is None else view))
            self.disk.put_many(sources)

    def _write_back(self, key: bytes, block: torch.Tensor) -> None:
        if self.disk is not None and not self.disk.contains(key):
            self.disk.put_many([(key, block)])

    def lookup(self, tokens: Tokens, salt: Salt = None) -> int:
        """Number of leading tokens of ``tokens`` whose KV is stored in some tier (partial tail included)."""
        self._check_open()
        found = 0
        total = len(tokens)
        for block in self._keys.iter_blocks(tokens, salt):
            if not self._stored_anywhere(block.key):
                break
            found = block.end
        self._counters.add("lookups")
        self._counters.add("lookup_tokens", total)
        self._counters.add("lookup_hit_tokens", found)
        return found

    def get(self, tokens: Tokens, salt: Salt = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """KV of the longest stored prefix of ``tokens``: a tensor ``[L, P, n, H, D]`` on ``device``.

        ``n`` is ``len(tokens)`` when every block is found (as ``lookup``
        promised), fewer if a block was evicted or damaged in between.
        """
        self._check_open()
        blocks = self._keys.blocks(tokens, salt)
        num_tokens = _num_tokens(blocks)
        out = torch.empty(self.layout.shape(num_tokens), dtype=self.layout.dtype, device=device)
        filled = self._fill(blocks, out)
        return out if filled == num_tokens else out[:, :, :filled].clone()

    def get_into(self, tokens: Tokens, out: torch.Tensor, salt: Salt = None) -> int:
        """Copy the KV of ``tokens`` into ``out`` (``[L, P, len(tokens), H, D]``); returns tokens filled.

        Filling stops at the first block no tier can return; the rest of
        ``out`` is left as it was.
        """
        self._check_open()
        blocks = self._keys.blocks(tokens, salt)
        self.layout.check_kv(out, _num_tokens(blocks))
        return self._fill(blocks, out)

    def _fill(self, blocks: Sequence[BlockRef], out: torch.Tensor) -> int:
        """Copy blocks into ``out`` in order until one is missing; returns tokens filled."""
        filled = 0
        for block in blocks:
            if not self._read_block(block.key, out[:, :, block.start:block.end]):
                break
            filled = block.end
        self._counters.add("gets")
        self._counters.add("get_tokens", _num_tokens(blocks))
        self._counters.add("get_hit_tokens", filled)
        return filled

    def _read_block(self, key: bytes, dst: torch.Tensor) -> bool:
        if self.host is not None and self.host.get_into(key, dst):
            return True
        if self.disk is None or not self.disk.get_into(key, dst):
            return False
        if self.host is not None and self.config.promote and self.host.put(key, dst):
            self._counters.add("promotions")
        return True

    def stats(self) -> dict[str, Any]:
        """Counters of the store and of each tier (hits, misses, bytes, evictions, dedup, ...)."""
        return {"store": self._counters.snapshot(), "tiers": {t.name: t.stats() for t in self.tiers}}


def _num_tokens(blocks: Sequence[BlockRef]) -> int:
    return blocks[-1].end if blocks else 0
