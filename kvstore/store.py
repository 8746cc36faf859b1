"""KVStore: put, find and get the KV of token prefixes across a hierarchy of tiers.

The store is a facade over parts it owns (composition, no mixins):

- ``TierStack`` (``kvstore/levels.py``): one level per tier with its
  declared capabilities, policy, health and counters; every guarded tier
  call and the one ``locate`` that lookup, plan, get and load share.
- ``BlockFlow`` (``kvstore/flow.py``): landing puts, copies down,
  promotions, write-back, reads; the exact-or-miss rule for lossy bytes.
- ``EngineHooks`` (``kvstore/hooks.py``): plan, prefetch, load, save.
- ``KeyedBlocks`` (``kvstore/keyed.py``): blocks an engine names itself.

Arguments are validated before any tier is touched (``ValueError``); a
tier's failure is counted, logged and bypassed, never an exception into the
engine.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvstore.config import StoreConfig
from kvstore.flow import BlockFlow
from kvstore.gate import Gate, gated
from kvstore.health import HEALTHY
from kvstore.hierarchy import TIER_SPECS, build_tiers
from kvstore.hooks import EngineHooks, num_tokens_of
from kvstore.keyed import EngineKey, KeyedBlocks
from kvstore.keys import BlockRef, KeyChain, Salt, Tokens
from kvstore.layerwise import LayerLoader, LayerSaver, LayerSink
from kvstore.layout import KVLayout
from kvstore.levels import Level, TierStack, make_level
from kvstore.pending import Fill, PendingBlock
from kvstore.placement import Placement
from kvstore.planner import LoadPlan
from kvstore.prefetch import PrefetchHandle
from kvstore.tiers.base import Tier, check_tier, check_tier_layout
from kvstore.tiers.spec import DEFAULT_BANDWIDTH_PRIOR
from kvstore.validation import check_device, check_out, check_timeout

log = logging.getLogger(__name__)

# How long ``close`` waits for calls other threads have inside the store (a read from a remote tier is bounded by
# its own timeouts, far below this) before it closes the tiers under them.
CLOSE_WAIT_SECONDS = 30.0


class KVStore:
    """A prefix-deduplicated KV-cache store for one model shard.

    ``put`` lands blocks in the fastest tier that takes them and returns;
    lower tiers get them in the background (write-through) or when the tier
    above evicts them (write-back), as ``Placement`` decides. ``lookup`` and
    ``get`` search the tiers fastest first and promote what they find. A
    miss, a damaged block or a failing tier is never an exception: fewer
    tokens come back and ``stats()`` counts why. Safe to call from many threads.

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
        self._gate = Gate()
        built = list(tiers) if tiers is not None else build_tiers(layout, config)
        if not built:
            raise ValueError("tiers: expected at least one tier, got none")
        started: list[BlockFlow | EngineHooks] = []  # what runs threads, closed if a later part fails
        try:
            levels = []
            for index, tier in enumerate(built):
                check_tier(tier)
                check_tier_layout(tier, layout, built[:index])
                spec = TIER_SPECS.get(tier.name)
                admit_after = spec.admit_after(config) if spec is not None else 1
                prior = spec.bandwidth_prior if spec is not None else DEFAULT_BANDWIDTH_PRIOR
                levels.append(make_level(index, tier, config.tier_write_policy(tier.name), admit_after,
                                         config.slow_factor, config.degraded_seconds, prior))
            self.stack = TierStack(levels)
            self.placement = Placement([level.policy for level in levels], promote=config.promote)
            self._flow = BlockFlow(layout, config, self.stack, self.placement)
            started.append(self._flow)
            self.hooks = EngineHooks(layout, config, self._keys, self._flow, self._gate)
            started.append(self.hooks)
            self.keyed = KeyedBlocks(layout, self._keys, self._flow, self._gate)
        except BaseException:  # a thread the OS refused, say: nothing left running, no directory left locked
            for part in reversed(started):
                part.close()
            if tiers is None:
                for tier in built:
                    tier.close()
            raise
        # A store dropped unclosed is closed when it is collected, and one left open at exit while the
        # interpreter still runs: its write-behind threads, killed inside a torch call at finalization,
        # aborted the process (and lost the queued writes). Its parts do not refer to it.
        self._finalizer = weakref.finalize(self, _close_dropped, self._parts())

    def _parts(self) -> _Parts:
        return _Parts(self._gate, self.hooks, self._flow, self.stack)

    @property
    def tiers(self) -> list[Tier]:
        """The tiers, fastest first."""
        return [level.tier for level in self.stack]

    def _tier(self, name: str) -> Tier | None:
        return next((level.tier for level in self.stack if level.name == name), None)

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

    @gated
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every copy ``put`` queued for a lower tier has been written or has failed.

        With ``disk_sync`` / ``files_sync`` on (the default) the written ones
        are then durable. A write that failed (a cache server down, a full
        disk) is not retried: it is counted in the tier's ``errors`` (``stats()``) and the
        block stays where it was, so True means the queues are empty, not
        that every tier holds every block. False if ``timeout`` seconds ran
        out first.
        """
        return self._flow.writes.flush(check_timeout(timeout))

    def close(self) -> None:
        """Wait for calls other threads have inside, flush the write-behind queues, stop their workers, write
        back what only volatile tiers hold, close the tiers (the host pool's memory goes back to the system)."""
        if self._gate.forked():  # the parent's threads and LMDB are not this process's to close
            self._finalizer.detach()
        elif self._finalizer.detach() is not None or self._gate.interrupted:
            self._parts().close()
        elif not self._gate.in_call():  # a second close returns once the first has closed everything
            self._gate.wait_done(2 * CLOSE_WAIT_SECONDS)

    # -- the contract -----------------------------------------------------------

    def block_keys(self, tokens: Tokens, salt: Salt = None) -> list[BlockRef]:
        """The keys and token ranges of ``tokens``' blocks (full blocks, then the partial tail)."""
        return self._keys.blocks(tokens, salt)

    @gated
    def put(self, tokens: Tokens, kv: torch.Tensor, salt: Salt = None) -> int:
        """Store the KV of ``tokens`` (``kv``: ``[L, P, len(tokens), H, D]``); returns blocks newly stored.

        Returns once the blocks are in the fastest tier that takes them;
        lower tiers are written in the background (see ``flush``). Blocks
        already stored in a local tier (HBM, host RAM, LMDB, files) are
        skipped and counted as dedup; the cache server and Redis are asked
        nothing here (a round trip a block, and a hung server's timeout), but
        where a block goes to them: one they hold is not sent again.
        Everything is validated before anything is stored.
        """
        blocks = self._keys.blocks(tokens, salt)
        self.layout.check_kv(kv, num_tokens_of(blocks))
        return self._flow.store_kv(blocks, kv)

    @gated
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
        blocks = self._keys.blocks(tokens, salt)
        bounds = {0, num_tokens_of(blocks)} | {b.start for b in blocks}
        if isinstance(start, bool) or not isinstance(start, int) or start not in bounds:
            raise ValueError(f"start: expected a block boundary in {sorted(bounds)}, got {start!r}")
        if not callable(fill):
            raise ValueError(f"fill: expected a callable fill(block, dst), got {type(fill).__name__}")
        keys = [block.key for block in blocks]
        before = {block.key for block in blocks if block.start < start}  # grows: no copy per block
        stored = 0
        lossy = self._flow.begin_put(keys, len(before))  # an approximate head: what follows is approximate too
        try:
            for block in blocks:  # one at a time: a fill that raises leaves every earlier block stored
                if self._gate.is_done():  # a fill closed the store (another thread's close waits for this call)
                    break
                if block.start >= start:  # evicting none of the blocks before it
                    stored += self._flow.store_blocks([(block.key, PendingBlock(self.layout, block, fill))], before,
                                                      lossy)
                    before.add(block.key)
        finally:  # one put, whose head (blocks before ``start`` too) is left the most recently used
            self._flow.end_put(keys)
        return stored

    @gated
    def lookup(self, tokens: Tokens, salt: Salt = None) -> int:
        """Number of leading tokens of ``tokens`` whose KV is stored in some tier (partial tail included)."""
        if self.stack.batch:
            blocks = self._keys.blocks(tokens, salt)
            total = len(tokens)
            found = num_tokens_of(blocks[:len(self.stack.locate([b.key for b in blocks]))])
        else:  # keys are chained lazily: a miss early on hashes no more blocks
            keys = self._keys.iter_keys(tokens, salt)  # checks tokens before any tier is asked
            total = len(tokens)
            found = min(total, self.stack.held_run(keys) * self._keys.block_tokens)
        counters = self._flow.counters
        counters.add("lookups")
        counters.add("lookup_tokens", total)
        counters.add("lookup_hit_tokens", found)
        return found

    @gated
    def get(self, tokens: Tokens, salt: Salt = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """KV of the longest stored prefix of ``tokens``: a tensor ``[L, P, n, H, D]`` on ``device``.

        ``n`` is ``len(tokens)`` when every block is found (as ``lookup``
        promised), fewer if a block was evicted or damaged in between.
        """
        blocks = self._keys.blocks(tokens, salt)
        device = check_device(device)
        num_tokens = num_tokens_of(blocks)
        out = torch.empty(self.layout.shape(num_tokens), dtype=self.layout.dtype, device=device)
        filled = self._flow.fill(blocks, out)
        return out if filled == num_tokens else out[:, :, :filled].clone()

    @gated
    def get_into(self, tokens: Tokens, out: torch.Tensor, salt: Salt = None) -> int:
        """Copy the KV of ``tokens`` into ``out`` (``[L, P, len(tokens), H, D]``); returns tokens filled.

        Filling stops at the first block no tier can return. Only the
        returned count of tokens is valid: the slice of a block that failed
        its checksum may have been read into (tiers read straight into
        ``out``, without a bounce copy), and so may slices after it where
        the files tier reads a run of blocks on several threads side by side.
        ``out`` must be writable memory: torch cannot tell a tensor over a
        read-only mapping (``np.memmap(mode="r")``), and a copy into one
        kills the process (SIGSEGV).
        """
        blocks = self._keys.blocks(tokens, salt)
        check_out(self.layout, out, num_tokens_of(blocks))
        return self._flow.fill(blocks, out)

    # -- the engine hooks (``kvstore/hooks.py``) --------------------------------------

    def plan(self, tokens: Tokens, salt: Salt = None) -> LoadPlan:
        """How many leading tokens of ``tokens`` to load, and from which tiers (``EngineHooks.plan``)."""
        return self.hooks.plan(tokens, salt)

    def record_prefill(self, num_tokens: int, seconds: float) -> None:
        """Tell the planner the engine prefilled ``num_tokens`` tokens in ``seconds``."""
        self.hooks.record_prefill(num_tokens, seconds)

    def prefetch(self, tokens: Tokens, salt: Salt = None, policy: str | None = None) -> PrefetchHandle:
        """Start bringing the stored leading blocks of ``tokens`` into the fastest tier (``EngineHooks.prefetch``)."""
        return self.hooks.prefetch(tokens, salt, policy)

    def load(self, tokens: Tokens, salt: Salt = None, *, layer_wise: bool = False,
             device: torch.device | str = "cpu", prefetch: PrefetchHandle | None = None,
             plan: LoadPlan | None = None, out: torch.Tensor | None = None,
             sink: LayerSink | None = None, skip: int = 0) -> torch.Tensor | LayerLoader:
        """Load the KV of the leading tokens the planner says are worth loading (``EngineHooks.load``)."""
        return self.hooks.load(tokens, salt, layer_wise=layer_wise, device=device, prefetch=prefetch, plan=plan,
                               out=out, sink=sink, skip=skip)

    def save(self, tokens: Tokens, kv: torch.Tensor | None = None, salt: Salt = None, *,
             layer_wise: bool = False, start: int = 0) -> int | LayerSaver:
        """Store the KV the engine computed, at once or layer by layer (``EngineHooks.save``)."""
        return self.hooks.save(tokens, kv, salt, layer_wise=layer_wise, start=start)

    # -- engine-named blocks (``kvstore/keyed.py``) ----------------------------------------

    def engine_keys(self, names: Sequence[EngineKey], salt: Salt = None) -> list[bytes]:
        """Store keys of engine-named blocks (see ``KeyChain.engine_key``)."""
        return self.keyed.engine_keys(names, salt)

    def put_keyed(self, items: Sequence[tuple[EngineKey, torch.Tensor]], salt: Salt = None, *,
                  after: Sequence[EngineKey] = ()) -> int:
        """Store blocks named by the engine, after its blocks ``after`` (``KeyedBlocks.put_keyed``)."""
        return self.keyed.put_keyed(items, salt, after=after)

    def lookup_keyed(self, names: Sequence[EngineKey], salt: Salt = None) -> int:
        """How many leading engine-named blocks some tier holds (``KeyedBlocks.lookup_keyed``)."""
        return self.keyed.lookup_keyed(names, salt)

    def get_keyed(self, names: Sequence[EngineKey], outs: Sequence[torch.Tensor], salt: Salt = None) -> int:
        """Read engine-named blocks into ``outs`` in order until one is missing (``KeyedBlocks.get_keyed``)."""
        return self.keyed.get_keyed(names, outs, salt)

    def stats(self) -> dict[str, Any]:
        """Counters of the store, of the write-behind and of each tier with its health, queue depth and last error.

        Also after ``close`` (never while the tiers close: a Redis tier's figures raced its client's teardown)."""
        with self._gate.visit(2 * CLOSE_WAIT_SECONDS):
            return self._stats()

    @staticmethod
    def _tier_figures(level: Level) -> dict[str, Any]:
        """``level``'s own figures; a bypassed cache server or Redis is not asked for its server's (asking one
        that hangs cost every ``stats()`` its timeout, and counted an error each time)."""
        if level.batch and level.health.state != HEALTHY:  # a data call probes it, not this
            return dict(level.tier.cached_stats())
        return dict(level.tier.stats())

    def _stats(self) -> dict[str, Any]:
        depth = self._flow.writes.depth()
        tiers = {}
        for level in self.stack:
            entry: dict[str, Any] = self._tier_figures(level)
            for name, value in level.snapshot().items():
                if name == "errors":
                    entry[name] = entry.get(name, 0) + value  # what the tier counted and what it raised
                else:
                    entry[name] = value
            if entry.get("token_refused"):  # a server refusing the token: the fix is the operator's, say so
                entry["state"] = "token refused"
            entry["queue_depth"] = depth.get(level.name, 0)
            entry["write_policy"] = level.policy.write if level.index else "landing"
            tiers[level.name] = entry
        store: dict[str, Any] = dict(self._flow.counters.snapshot())
        store.update(self.hooks.planner.snapshot())
        prefetcher = self.hooks.prefetcher
        prefetch: dict[str, Any] = dict(prefetcher.counters.snapshot())
        prefetch["pinned_blocks"] = prefetcher.pinned()
        return {"store": store, "prefetch": prefetch, "write_behind": self._flow.writes.counters.snapshot(),
                "tiers": tiers}


@dataclass(frozen=True)
class _Parts:
    """What closing a store closes, without the store: its finalizer must not refer to it."""

    gate: Gate
    hooks: EngineHooks
    flow: BlockFlow
    stack: TierStack

    def close(self) -> None:
        try:
            self.gate.shut(CLOSE_WAIT_SECONDS)
            self.hooks.close()
            stuck = self.flow.close()
            for level in self.stack:  # each tier closes, whatever another's close raised
                if level.name in stuck:  # its close would wait for the write inside it
                    log.warning("tier %s: a write to it has not ended; it is closed once that write ends",
                                level.name)
                    threading.Thread(target=self._close_when_written, args=(level, stuck[level.name]), daemon=True,
                                     name=f"kvstore-close-{level.name}").start()
                    continue
                self._close_tier(level)
        except (KeyboardInterrupt, SystemExit):  # a signal's: the next close() does what is left (each step is
            self.gate.interrupted = True         # idempotent); done, it left threads running, the directory held
            raise
        except BaseException:
            self.gate.done()
            raise
        self.gate.done()

    def _close_when_written(self, level: Level, written: Callable[[], None]) -> None:
        written()
        self._close_tier(level)

    @staticmethod
    def _close_tier(level: Level) -> None:
        try:
            level.tier.close()
        except Exception as error:
            level.note_failure("close", error)


def _close_dropped(parts: _Parts) -> None:
    """A store collected unclosed, or open at exit: closed as by ``close()``. Not in a forked child, which has
    none of the threads that would flush it; on a thread of its own (a collection can run on any), by another,
    since closing joins them."""
    if parts.gate.forked():
        return
    if threading.current_thread().name.startswith("kvstore-"):
        threading.Thread(target=parts.close, name="kvstore-close-dropped", daemon=True).start()
    else:
        parts.close()
