"""KVStore: put, find and get the KV of token prefixes across a hierarchy of tiers.

The store owns the tiers (fastest first), asks ``Placement`` where blocks go,
hands lower-tier copies to ``WriteBehind`` and guards every tier call with
its ``TierHealth``: a tier that raises or turns slow is bypassed, never an
exception into the engine.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch

from kvstore.config import StoreConfig
from kvstore.health import MIN_SLOW_SECONDS, TierHealth
from kvstore.hierarchy import build_tiers, policies_for
from kvstore.hooks import EngineHooks, num_tokens_of
from kvstore.keyed import KeyedBlocks
from kvstore.keys import BlockRef, KeyChain, Salt, Tokens
from kvstore.layout import KVLayout
from kvstore.metrics import Counters
from kvstore.pending import Fill, FillError, PendingBlock, as_tensor
from kvstore.placement import Placement
from kvstore.tiers.base import Tier
from kvstore.writebehind import WriteBehind

STORE_COUNTERS = ("puts", "blocks_stored", "dedup_blocks", "dedup_bytes", "lookups", "lookup_tokens",
                  "lookup_hit_tokens", "gets", "get_tokens", "get_hit_tokens", "promotions", "demotions")
# A read must take this many GIL switch intervals (5 ms each by default) to be judged slow.
SLOW_READ_SWITCH_INTERVALS = 10
# Blocks a batch tier (cache server, Redis) is asked for in one read.
BATCH_READ_BLOCKS = 64
# Store-side counters kept per tier, shown beside the tier's own in ``stats()``.
PER_TIER_COUNTERS = ("admission_rejected", "queue_dropped", "bypassed", "errors")


class KVStore(EngineHooks, KeyedBlocks):
    """A prefix-deduplicated KV-cache store for one model shard.

    ``put`` lands blocks in the fastest tier that takes them and returns;
    lower tiers get them in the background (write-through) or when the tier
    above evicts them (write-back), as ``Placement`` decides. ``lookup`` and
    ``get`` search the tiers fastest first and promote what they find. A
    miss, a damaged block or a failing tier is never an exception: fewer
    tokens come back and ``stats()`` counts why. Safe to call from many threads.
    The engine hooks (``plan``, ``prefetch``, ``load``, ``save``,
    ``record_prefill``) come from ``EngineHooks`` (``kvstore/hooks.py``); blocks an engine names
    itself (``put_keyed``, ``lookup_keyed``, ``get_keyed``) from ``KeyedBlocks`` (``kvstore/keyed.py``).

    ``tiers`` (fastest first) replaces the tiers the config would build, for
    custom media; their policies still come from the config, by tier name.
    """

    def __init__(self, layout: KVLayout, config: StoreConfig | None = None, tiers: Sequence[Tier] | None = None):
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
        self.tiers: list[Tier] = list(tiers) if tiers is not None else build_tiers(layout, config)
        if not self.tiers:
            raise ValueError("tiers: expected at least one tier, got none")
        self.placement = Placement(policies_for(self.tiers, config), promote=config.promote)
        # A read timed in a busy process includes waits for the GIL (a switch interval each):
        # only reads longer than many switch intervals are judged slow, and only on persistent
        # tiers (a memory tier's read time is all scheduling). Any tier that raises is bypassed.
        min_slow = max(MIN_SLOW_SECONDS, SLOW_READ_SWITCH_INTERVALS * sys.getswitchinterval())
        self._health = [TierHealth(config.slow_factor if policy.persistent else math.inf, config.degraded_seconds,
                                   min_slow_seconds=min_slow) for policy in self.placement.policies]
        self._tier_counters = [Counters(*PER_TIER_COUNTERS) for _ in self.tiers]
        self._batch_tiers = frozenset(i for i, t in enumerate(self.tiers)
                                      if hasattr(t, "prefix_length") and hasattr(t, "get_many_into"))
        self._writes = WriteBehind({self.tiers[i].name: partial(self._write, i) for i in range(1, len(self.tiers))},
                                   self._queue_bound(), config.queue_full)
        for i, tier in enumerate(self.tiers):
            if hasattr(tier, "on_evict") and self.placement.on_evict(i) is not None:
                tier.on_evict = partial(self._evicted, i)
        self._start_hooks(config)

    def _queue_bound(self) -> int:
        """Queued jobs pin their source slots: keep the pins to half the fastest slot pool."""
        bound = self.config.write_queue_blocks
        slots = getattr(self.tiers[0], "num_slots", None)
        targets = max(1, len(self.tiers) - 1)
        if slots is not None:
            bound = min(bound, max(1, slots // (2 * targets)))
        return bound

    def _tier(self, name: str) -> Tier | None:
        return next((t for t in self.tiers if t.name == name), None)

    @property
    def device(self) -> Tier | None:
        return self._tier("device")

    @property
    def host(self) -> Tier | None:
        return self._tier("host")

    @property
    def disk(self) -> Tier | None:
        return self._tier("lmdb")

    @property
    def files(self) -> Tier | None:
        return self._tier("files")

    # -- context management -------------------------------------------------

    def __enter__(self) -> "KVStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every copy ``put`` queued for a lower tier has been written or has failed.

        With ``disk_sync`` / ``files_sync`` on (the default) the written ones
        are then durable. A write that failed (a cache server down, a full
        disk) is not retried: it is counted in the tier's ``errors`` (``stats()``) and the
        block stays where it was, so True means the queues are empty, not
        that every tier holds every block. False if ``timeout`` seconds ran
        out first.
        """
        self._check_open()
        return self._writes.flush(timeout)

    def close(self) -> None:
        """Flush the write-behind queues, stop their workers, write back what only volatile tiers hold, close tiers."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._prefetcher.close()
        self._buffers.clear()
        self._writes.close()
        target = self.placement.on_close()
        if target is not None:
            persistent = [i for i, p in enumerate(self.placement.policies) if p.persistent]
            for i, tier in enumerate(self.tiers):
                if self.placement.policies[i].persistent or not hasattr(tier, "reading"):
                    continue
                for key in tier.keys():
                    if any(self._contains(j, key) for j in persistent):
                        continue
                    with tier.reading(key) as view:
                        if view is not None:
                            self._write(target, [(key, view)])
        for tier in self.tiers:
            tier.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("KVStore is closed")

    # -- guarded tier calls --------------------------------------------------------

    def _available(self, i: int) -> bool:
        if self._health[i].available():
            return True
        self._tier_counters[i].add("bypassed")
        return False

    def _failed(self, i: int) -> None:
        """Tier ``i`` raised: count it and bypass the tier for its back-off period."""
        self._tier_counters[i].add("errors")
        self._health[i].record_error()

    def _contains(self, i: int, key: bytes) -> bool:
        if not self._available(i):
            return False
        try:
            return self.tiers[i].contains(key)
        except Exception:
            self._failed(i)
            return False

    def _where(self, key: bytes) -> int | None:
        """The fastest available tier holding ``key``."""
        for i in range(len(self.tiers)):
            if self._contains(i, key):
                return i
        return None

    def _locate(self, keys: Sequence[bytes]) -> list[int]:
        """The fastest available tier holding each leading key, up to the first key no tier holds.

        Tiers with ``prefix_length`` (the cache server, Redis) answer for all
        the remaining keys in one round trip when the local tiers first miss,
        and again only past the end of the run they reported.
        """
        runs: dict[int, tuple[int, int]] = {}  # batch tier -> [start, end) of blocks it holds
        where = []
        for n, key in enumerate(keys):
            for i in range(len(self.tiers)):
                if i not in self._batch_tiers:
                    if self._contains(i, key):
                        break
                    continue
                run = runs.get(i)
                if run is None or n > run[1]:
                    run = runs[i] = (n, n + self._prefix_length(i, keys[n:]))
                if run[0] <= n < run[1]:
                    break
            else:
                return where
            where.append(i)
        return where

    def _prefix_length(self, i: int, keys: Sequence[bytes]) -> int:
        if not self._available(i):
            return 0
        try:
            return self.tiers[i].prefix_length(keys)
        except Exception:
            self._failed(i)
            return 0

    def _read(self, i: int, key: bytes, dst: torch.Tensor) -> bool:
        if not self._available(i):
            return False
        start = time.perf_counter()
        try:
            found = self.tiers[i].get_into(key, dst)
        except Exception:
            self._failed(i)
            return False
        if found:
            self._health[i].record_read(dst.numel() * dst.element_size(), time.perf_counter() - start)
        return found

    def _write(self, i: int, items: Sequence[tuple[bytes, torch.Tensor | PendingBlock]]) -> None:
        if not items or not self._available(i):
            return
        tier = self.tiers[i]
        if not getattr(tier, "fills_in_place", False):
            items = [(key, as_tensor(block)) for key, block in items]
        try:
            tier.put_many(items)
        except FillError:
            raise  # the engine's fill failed, not the tier
        except Exception:
            self._failed(i)
            return
        self._health[i].record_ok()

    # -- the contract -----------------------------------------------------------

    def block_keys(self, tokens: Tokens, salt: Salt = None) -> list[BlockRef]:
        """The keys and token ranges of ``tokens``' blocks (full blocks, then the partial tail)."""
        return self._keys.blocks(tokens, salt)

    def put(self, tokens: Tokens, kv: torch.Tensor, salt: Salt = None) -> int:
        """Store the KV of ``tokens`` (``kv``: ``[L, P, len(tokens), H, D]``); returns blocks newly stored.

        Returns once the blocks are in the fastest tier that takes them;
        lower tiers are written in the background (see ``flush``). Blocks
        already stored in any tier are skipped and counted as dedup.
        Everything is validated before anything is stored.
        """
        self._check_open()
        blocks = self._keys.blocks(tokens, salt)
        self.layout.check_kv(kv, num_tokens_of(blocks))
        return self._store_blocks(blocks, kv)

    def put_from(self, tokens: Tokens, fill: Fill, salt: Salt = None, *, start: int = 0) -> int:
        """Store the KV of ``tokens`` written by ``fill(block, dst)`` straight into the store's memory.

        For engines whose KV sits in their own (paged) buffers: each block
        not stored yet is handed to ``fill`` with ``dst``, a tensor ``[L, P,
        block.num_tokens, H, D]`` in the host tier's slot, and the engine
        gathers the block there: one copy, nothing staged (see
        ``kvstore/pending.py``). Blocks before token ``start`` (a block
        boundary) are skipped. Returns blocks newly stored. If ``fill``
        raises, that block is not stored and the error (``FillError``)
        reaches the caller; blocks filled before it stay stored.
        """
        self._check_open()
        blocks = self._keys.blocks(tokens, salt)
        bounds = {0, num_tokens_of(blocks)} | {b.start for b in blocks}
        if isinstance(start, bool) or not isinstance(start, int) or start not in bounds:
            raise ValueError(f"start: expected a block boundary in {sorted(bounds)}, got {start!r}")
        if not callable(fill):
            raise ValueError(f"fill: expected a callable fill(block, dst), got {type(fill).__name__}")
        stored = 0
        for block in blocks:  # one at a time: a fill that raises leaves every earlier block fully stored
            if block.start >= start:
                stored += self._store_items([(block.key, PendingBlock(self.layout, block, fill))])
        return stored

    def _store_blocks(self, blocks: Sequence[BlockRef], kv: torch.Tensor) -> int:
        """Store ``blocks`` whose KV is ``kv`` (its token 0 is ``blocks[0].start``); returns blocks newly stored."""
        offset = blocks[0].start if blocks else 0
        return self._store_items([(b.key, kv[:, :, b.start - offset:b.end - offset]) for b in blocks])

    def _store_items(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> int:
        """Store blocks ``(key, [L, P, tokens, H, D])`` not stored yet; returns blocks newly stored."""
        self._check_open()
        self._counters.add("puts")
        new = []
        for key, block in items:
            sightings = self.placement.sighted(key)
            where = self._where(key)
            if where is None:
                new.append((key, block, sightings))
                continue
            self._counters.add("dedup_blocks")
            self._counters.add("dedup_bytes", block.shape[2] * self.layout.token_bytes)
            self._send_down(where, key, None, sightings, newly_admitted=True)
        stored = self._land(new)
        self._counters.add("blocks_stored", stored)
        return stored

    def _land(self, items: list[tuple[bytes, torch.Tensor, int]]) -> int:
        """Put blocks in the fastest available tier that takes them, then queue the lower copies."""
        stored = 0
        for i in range(len(self.tiers)):
            if not items:
                break
            self._write(i, [(key, block) for key, block, _ in items])
            rest = []
            for key, block, sightings in items:
                if self._contains(i, key):
                    stored += 1
                    self._send_down(i, key, block, sightings)
                else:
                    rest.append((key, block, sightings))
            items = rest
        return stored

    def _send_down(self, landed: int, key: bytes, block: torch.Tensor | None, sightings: int,
                   newly_admitted: bool = False) -> None:
        """Queue write-through copies of a block held by tier ``landed`` for the tiers below it.

        ``newly_admitted``: only for tiers whose admission threshold this
        very sighting reached (a block seen again that was kept out before).
        """
        for j in self.placement.write_through(landed):
            threshold = self.placement.policies[j].admit_after
            if newly_admitted and sightings != threshold:
                continue
            if not self.placement.admits(j, sightings):
                self._tier_counters[j].add("admission_rejected")
                continue
            if self._contains(j, key) or self._writes.pending(self.tiers[j].name, key):
                continue
            self._queue(j, key, block, landed)

    def _queue(self, j: int, key: bytes, block: torch.Tensor | None, holder: int) -> None:
        """Hand a copy of ``key`` for tier ``j`` to the write-behind, from a pinned slot if one holds it.

        The slot is taken from the slowest memory tier above ``j`` that holds
        the block (host RAM before HBM): the copy's source is then CPU memory,
        and the scarce HBM slots stay free for puts and promotions.
        """
        release = None
        for i in reversed(range(j)):
            tier = self.tiers[i]
            pin = getattr(tier, "pin", None)
            view = pin(key) if pin is not None and self._available(i) else None
            if view is not None:
                block, release = view, partial(tier.unpin, key)
                break
        else:
            if block is None:  # only a persistent tier holds it: read a private copy
                block = torch.empty(self.layout.block_shape, dtype=self.layout.dtype)
                if not self._read(holder, key, block):
                    return
            elif isinstance(block, PendingBlock):
                block = block.materialize()  # a host tensor of the store's own
            else:
                block = block.detach().to("cpu", copy=True)  # the caller may reuse its buffer after put
        if not self._writes.submit(self.tiers[j].name, key, block, release):
            self._tier_counters[j].add("queue_dropped")

    def _evicted(self, i: int, key: bytes, block: torch.Tensor) -> None:
        """Write-back: tier ``i`` evicts ``key``; the tier below keeps it if it admits it."""
        j = self.placement.on_evict(i)
        if j is None or self._contains(j, key):
            return
        if not self.placement.admits(j, self.placement.sightings(key)):
            self._tier_counters[j].add("admission_rejected")
            return
        self._write(j, [(key, block)])
        self._counters.add("demotions")

    def lookup(self, tokens: Tokens, salt: Salt = None) -> int:
        """Number of leading tokens of ``tokens`` whose KV is stored in some tier (partial tail included)."""
        self._check_open()
        total = len(tokens)
        if self._batch_tiers:
            blocks = self._keys.blocks(tokens, salt)
            found = num_tokens_of(blocks[:len(self._locate([b.key for b in blocks]))])
        else:  # keys are chained lazily: a miss early on hashes no more blocks
            found = 0
            for block in self._keys.iter_blocks(tokens, salt):
                if self._where(block.key) is None:
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
        num_tokens = num_tokens_of(blocks)
        out = torch.empty(self.layout.shape(num_tokens), dtype=self.layout.dtype, device=device)
        filled = self._fill(blocks, out)
        return out if filled == num_tokens else out[:, :, :filled].clone()

    def get_into(self, tokens: Tokens, out: torch.Tensor, salt: Salt = None) -> int:
        """Copy the KV of ``tokens`` into ``out`` (``[L, P, len(tokens), H, D]``); returns tokens filled.

        Filling stops at the first block no tier can return. Only the
        returned count of tokens is valid: the slice of a block that failed
        its checksum may have been read into (tiers read straight into
        ``out``, without a bounce copy), and slices after it are untouched.
        """
        self._check_open()
        blocks = self._keys.blocks(tokens, salt)
        self.layout.check_kv(out, num_tokens_of(blocks))
        return self._fill(blocks, out)

    def _fill(self, blocks: Sequence[BlockRef], out: torch.Tensor) -> int:
        """Copy blocks into ``out`` in order until one is missing; returns tokens filled."""
        got = self._fill_keys([b.key for b in blocks], [out[:, :, b.start:b.end] for b in blocks])
        filled = blocks[got - 1].end if got else 0
        self._counters.add("gets")
        self._counters.add("get_tokens", num_tokens_of(blocks))
        self._counters.add("get_hit_tokens", filled)
        return filled

    def _fill_keys(self, keys: Sequence[bytes], dsts: Sequence[torch.Tensor]) -> int:
        """Read blocks ``keys`` into ``dsts`` in order until one is missing; returns blocks read.

        A run of blocks no local tier holds is read from the batch tiers
        (cache server, Redis) in one round trip.
        """
        n = 0
        while n < len(keys):
            run = self._remote_run(keys, n)
            if run:
                got = self._read_run(keys[n:n + run], dsts[n:n + run])
            else:
                got = int(self._read_block(keys[n], dsts[n]))
            if not got:
                break
            n += got
        return n

    def _read_block(self, key: bytes, dst: torch.Tensor) -> bool:
        """Read ``key`` from the fastest tier that has it, then promote it into the faster ones."""
        for i in range(len(self.tiers)):
            if self._read(i, key, dst):
                self._was_read(i, key, dst)
                return True
        return False

    def _was_read(self, i: int, key: bytes, dst: torch.Tensor) -> None:
        """Tier ``i`` served ``key`` into ``dst``: count the sighting, promote, maybe admit it below."""
        sightings = self.placement.sighted(key)
        self._promote(i, key, dst, sightings)
        if self.placement.counting:  # a read hit may be the sighting that admits it below
            self._send_down(i, key, None, sightings, newly_admitted=True)

    def _remote_run(self, keys: Sequence[bytes], n: int) -> int:
        """How many blocks from ``n`` on no local tier holds (at most ``BATCH_READ_BLOCKS``; 0 without batch tiers)."""
        if not self._batch_tiers:
            return 0
        local = [i for i in range(len(self.tiers)) if i not in self._batch_tiers]
        run = 0
        for key in keys[n:n + BATCH_READ_BLOCKS]:
            if any(self._contains(i, key) for i in local):
                break
            run += 1
        return run

    def _read_run(self, keys: Sequence[bytes], dsts: Sequence[torch.Tensor]) -> int:
        """Read ``keys`` from the first batch tier that serves the first; returns leading blocks read."""
        for i in sorted(self._batch_tiers):
            if not self._available(i):
                continue
            start = time.perf_counter()
            try:
                found = self.tiers[i].get_many_into(list(keys), list(dsts))
            except Exception:
                self._failed(i)
                continue
            got = next((k for k, ok in enumerate(found) if not ok), len(found))
            if got:
                nbytes = sum(d.numel() * d.element_size() for d in dsts[:got])
                self._health[i].record_read(nbytes, time.perf_counter() - start)
                for key, dst in zip(keys[:got], dsts):
                    self._was_read(i, key, dst)
                return got
        return 0

    def _promote(self, hit: int, key: bytes, block: torch.Tensor, sightings: int) -> None:
        for j in self.placement.promote_into(hit):
            if self._contains(j, key) or not self._available(j):
                continue
            if not self.placement.admits(j, sightings):
                self._tier_counters[j].add("admission_rejected")
            elif self.placement.policies[j].persistent:
                self._queue(j, key, block, hit)
                self._counters.add("promotions")
            else:
                self._write(j, [(key, block)])
                if self._contains(j, key):
                    self._counters.add("promotions")

    def stats(self) -> dict[str, Any]:
        """Counters of the store, of the write-behind and of each tier with its health and queue depth."""
        depth = self._writes.depth()
        tiers = {}
        for i, tier in enumerate(self.tiers):
            entry: dict[str, Any] = dict(tier.stats())
            for name, value in self._tier_counters[i].snapshot().items():
                entry[name] = entry.get(name, 0) + value  # "errors": what the tier counted and what it raised
            health = self._health[i].snapshot()
            del health["errors"]  # the store's per-tier "errors" count the same events
            entry.update(health)
            entry["queue_depth"] = depth.get(tier.name, 0)
            entry["write_policy"] = self.placement.policies[i].write if i else "landing"
            tiers[tier.name] = entry
        store: dict[str, Any] = dict(self._counters.snapshot())
        store.update(self._planner.snapshot())
        prefetch: dict[str, Any] = dict(self._prefetcher.counters.snapshot())
        prefetch["pinned_blocks"] = self._prefetcher.pinned()
        return {"store": store, "prefetch": prefetch, "write_behind": self._writes.counters.snapshot(),
                "tiers": tiers}
