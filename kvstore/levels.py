"""The tier stack: one ``Level`` per tier and the guarded calls the store makes on them.

A level is everything the store knows about one tier: the tier, the
capabilities its class declared (checked once here, never probed with
``hasattr``), its placement policy, its health breaker, its counters, the
lossy codec it stores with (if any) and its last error. ``TierStack`` owns
every call into a tier: a call that raises is counted, logged (rate-limited
per tier) and trips the tier's breaker, and a bypassed tier is skipped, so no
tier failure ever reaches the engine. ``locate`` finds where each leading
block of a request is held, once per operation: lookup, plan, get and load
share its answer.

Blame: only the tier's own failures land here. Callers validate their
arguments (``ValueError``) before any tier is touched, and an engine's own
``fill`` failing (``FillError``) is passed through, never blamed on a tier.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from kvstore.health import MIN_SLOW_SECONDS, ReadTimer, TierHealth
from kvstore.metrics import Counters, LogLimit
from kvstore.pending import FillError, PendingBlock, as_tensor
from kvstore.placement import TierPolicy
from kvstore.tiers.base import Capability, Tier, declared_capabilities

log = logging.getLogger(__name__)

# Store-side counters kept per tier, shown beside the tier's own in ``stats()``.
PER_TIER_COUNTERS = ("admission_rejected", "queue_dropped", "bypassed", "errors", "lossy_refused", "write_suspended")
# A read must take this many GIL switch intervals (5 ms each by default) to be judged slow.
SLOW_READ_SWITCH_INTERVALS = 10
# At most one log record per tier in this many seconds; the rest are counted in the next record.
LOG_INTERVAL_SECONDS = 10.0

T = TypeVar("T")


@dataclass(eq=False)
class Level:
    """One tier of the stack and what the store keeps about it. ``index``: 0 is the fastest."""

    index: int
    tier: Tier
    capabilities: Capability
    policy: TierPolicy
    health: TierHealth
    bandwidth_prior: float
    lossy: str | None  # the lossy codec this tier stores with; None: it returns exactly what it was given
    decode_bytes_per_second: float
    counters: Counters = field(default_factory=lambda: Counters(*PER_TIER_COUNTERS))
    last_error: str | None = None
    _failures_logged: LogLimit = field(default_factory=lambda: LogLimit(LOG_INTERVAL_SECONDS))

    @property
    def name(self) -> str:
        return self.tier.name

    @property
    def persistent(self) -> bool:
        return self.policy.persistent

    slots: bool = field(init=False)  # a memory slot pool (host RAM, HBM): pins, in-place fills, lossy marks
    chains: bool = field(init=False)  # evicts a prompt's blocks tail first (``touch_chain``)

    def __post_init__(self) -> None:
        self.slots = Capability.SLOTS in self.capabilities  # asked once a block stored or read
        self.chains = Capability.CHAINS in self.capabilities

    @property
    def batch(self) -> bool:
        """Answers for many keys in one round trip (cache server, Redis)."""
        return Capability.BATCH in self.capabilities

    @property
    def runs(self) -> bool:
        """Reads a run of blocks side by side (the files tier)."""
        return Capability.RUNS in self.capabilities

    def takes(self, lossy: str | None) -> bool:
        """Whether bytes that went through the lossy codec ``lossy`` (None: exact) may be written here.

        Exact bytes go anywhere. Approximate bytes only into this store's
        memory slots, which keep the mark: never into a tier below, whose
        readers (other processes among them) would take them for exact KV.
        """
        return lossy is None or self.slots

    def note_failure(self, operation: str, error: BaseException, *, write: bool = False) -> None:
        """Count, remember and log (at most once per ``LOG_INTERVAL_SECONDS``) a failure of this tier; a failed
        ``write`` suspends writes to it, any other failure bypasses it (``TierHealth``)."""
        self.counters.add("errors")
        self.last_error = f"{operation}: {type(error).__name__}: {error}"
        if write:
            self.health.record_write_error()
        else:
            self.health.record_error()
        events = self._failures_logged.due()
        if not events:
            return
        suppressed = events - 1
        log.warning("tier %s: %s failed (%s: %s); %s for now%s", self.name, operation, type(error).__name__,
                    error, "writes suspended" if write else "bypassed",
                    f" ({suppressed} more failures since the last report)" if suppressed else "")

    def record_read(self, nbytes: int, seconds: float) -> None:
        """A read of ``nbytes`` took ``seconds``; a tier whose reads slowed down is bypassed, and says so (it
        was bypassed without a word, ``last_error`` None)."""
        if self.health.record_read(nbytes, seconds):
            self.last_error = "reads: most of the last ones far slower than this tier's usual"
            log.warning("tier %s: most of its last reads were slow (this one: %.1f ms for %d bytes); bypassed for "
                        "now", self.name, seconds * 1e3, nbytes)

    def snapshot(self) -> dict[str, object]:
        """The store's view of this tier for ``stats()``: its counters, health and last error."""
        entry: dict[str, object] = dict(self.counters.snapshot())
        health = self.health.snapshot()
        del health["errors"]  # the per-tier "errors" count the same events
        entry.update(health)
        entry["last_error"] = self.last_error
        entry["lossy_codec"] = self.lossy
        return entry


def make_level(index: int, tier: Tier, write: str, admit_after: int, slow_factor: float, degraded_seconds: float,
               bandwidth_prior: float) -> Level:
    """A level for ``tier`` with its placement policy (``write``, ``admit_after``); the tier's protocol and
    declared capabilities are checked here, once (``ValueError`` naming what is missing).

    A read timed in a busy process includes waits for the GIL (a switch
    interval each): only reads longer than many switch intervals are judged
    slow, and only on persistent tiers (a memory tier's read time is all
    scheduling).
    """
    capabilities = declared_capabilities(tier)
    policy = TierPolicy(write=write, admit_after=admit_after, persistent=bool(tier.persistent))
    min_slow = max(MIN_SLOW_SECONDS, SLOW_READ_SWITCH_INTERVALS * sys.getswitchinterval())
    health = TierHealth(slow_factor if policy.persistent else float("inf"), degraded_seconds,
                        min_slow_seconds=min_slow)
    codec = tier.encoding.codec if Capability.ENCODED in capabilities else None
    lossy = None if codec is None or codec.lossless else codec.name
    decode = codec.decode_bytes_per_second if codec is not None else float("inf")
    return Level(index, tier, capabilities, policy, health, bandwidth_prior, lossy, decode)


class TierStack:
    """The levels, fastest first, and every guarded call into them."""

    def __init__(self, levels: Sequence[Level]):
        self.levels = tuple(levels)
        self.local = tuple(level for level in self.levels if not level.batch)
        self.batch = tuple(level for level in self.levels if level.batch)

    def __iter__(self) -> Iterator[Level]:
        return iter(self.levels)

    def __len__(self) -> int:
        return len(self.levels)

    def __getitem__(self, index: int) -> Level:
        return self.levels[index]

    @property
    def fastest(self) -> Level | None:
        return self.levels[0] if self.levels else None

    def available(self, level: Level) -> bool:
        if level.health.available():
            return True
        level.counters.add("bypassed")
        return False

    def guarded(self, level: Level, operation: str, call: Callable[[], T], default: T) -> T:
        """``call()`` on ``level``'s tier if it is available; ``default`` if it is bypassed or raises."""
        if not self.available(level):
            return default
        try:
            return call()
        except FillError:
            raise  # the engine's fill failed, not the tier
        except Exception as error:
            level.note_failure(operation, error)
            return default

    def contains(self, level: Level, key: bytes) -> bool:
        """``guarded`` spelled out without its closure: a lookup asks this once a block and level."""
        if not self.available(level):
            return False
        try:
            return level.tier.contains(key)
        except FillError:
            raise
        except Exception as error:
            level.note_failure("contains", error)
            return False

    def where(self, key: bytes, levels: Sequence[Level] | None = None) -> Level | None:
        """The fastest available level holding ``key``, of ``levels`` (default: all of them)."""
        for level in self.levels if levels is None else levels:
            if self.contains(level, key):
                return level
        return None

    def held_run(self, keys: Iterable[bytes]) -> int:
        """How many leading ``keys`` some available level holds; draws no key past the first miss.

        Availability is judged once a run, not once a key and level (a
        lookup of 512 blocks spent a third of its time outside hashing on
        it); a level whose ``contains`` raises is left out for the rest of
        the run.
        """
        asked = [level for level in self.levels if self.available(level)]
        held = 0
        for key in keys:
            failed = []
            # ``contains`` less its availability check, spelled out: a helper call cost a third more (83
            # against 62 us for 512 keys)
            for level in asked:
                try:
                    if level.tier.contains(key):
                        break
                except FillError:
                    raise
                except Exception as error:
                    level.note_failure("contains", error)
                    failed.append(level)
            else:
                return held
            if failed:
                asked = [level for level in asked if level not in failed]
            held += 1
        return held

    def prefix_length(self, level: Level, keys: Sequence[bytes]) -> int:
        return self.guarded(level, "prefix_length", lambda: level.tier.prefix_length(keys), 0)

    def locate(self, keys: Sequence[bytes]) -> list[Level]:
        """The fastest available level holding each leading key, up to the first key no level holds.

        Batch levels (the cache server, Redis) answer for all the remaining
        keys in one round trip when the local levels first miss, and again
        only past the end of the run they reported.
        """
        runs: dict[int, tuple[int, int]] = {}  # batch level -> [start, end) of blocks it holds
        where: list[Level] = []
        for n, key in enumerate(keys):
            for level in self.levels:
                if not level.batch:
                    if self.contains(level, key):
                        break
                    continue
                run = runs.get(level.index)
                if run is None or n > run[1]:
                    run = runs[level.index] = (n, n + self.prefix_length(level, keys[n:]))
                if run[0] <= n < run[1]:
                    break
            else:
                return where
            where.append(level)
        return where

    def local_run(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` no local (non-batch) level holds."""
        run = 0
        for key in keys:
            if any(self.contains(level, key) for level in self.local):
                break
            run += 1
        return run

    def read(self, level: Level, key: bytes, dst: torch.Tensor) -> str | None | bool:
        """Read ``key`` from ``level`` into ``dst``: False on a miss, else the lossy codec the bytes went
        through (None: exact). A successful read feeds the level's bandwidth estimate."""
        if not self.available(level):
            return False
        timer = ReadTimer().start() if level.persistent else None
        start = time.perf_counter()
        try:
            if level.slots:
                found, lossy = level.tier.get_into_marked(key, dst)
            else:
                found, lossy = level.tier.get_into(key, dst), level.lossy
        except Exception as error:
            level.note_failure("get_into", error)
            return False
        if not found:
            return False
        seconds = timer.stop() if timer is not None else time.perf_counter() - start
        level.record_read(dst.nbytes, seconds)
        return lossy

    def read_run(self, level: Level, keys: Sequence[bytes], dsts: Sequence[torch.Tensor]) -> list[str | None]:
        """Read the leading ``keys`` a memory level holds into ``dsts`` in one call: the lossy mark of each
        block read (None: exact), fewer than ``keys`` where the next is not held there. The run feeds the
        level's bandwidth estimate as one read."""
        if not self.available(level):
            return []
        start = time.perf_counter()
        try:
            marks = level.tier.get_run_marked(keys, dsts)
        except Exception as error:
            level.note_failure("get_into", error)
            return []
        if marks:
            nbytes = sum(dst.nbytes for dst in dsts[:len(marks)])
            level.record_read(nbytes, time.perf_counter() - start)
        return marks

    def read_side_by_side(self, level: Level, keys: Sequence[bytes], dsts: Sequence[torch.Tensor]) -> int:
        """Read ``keys`` from a level that reads runs side by side (the files tier); how many leading blocks
        it read."""
        return self._read_leading(level, "get_run_into", lambda: level.tier.get_run_into(keys, dsts), dsts)

    def read_many(self, level: Level, keys: Sequence[bytes], dsts: Sequence[torch.Tensor]) -> int:
        """Read ``keys`` from a batch level in one round trip; returns how many leading blocks it read."""
        def leading() -> int:
            found = level.tier.get_many_into(list(keys), list(dsts))
            return next((k for k, ok in enumerate(found) if not ok), len(found))
        return self._read_leading(level, "get_many_into", leading, dsts)

    def _read_leading(self, level: Level, operation: str, call: Callable[[], int],
                      dsts: Sequence[torch.Tensor]) -> int:
        """``call()``, guarded, reads leading blocks into ``dsts``; it feeds the level's bandwidth estimate
        as one read."""
        if not self.available(level):
            return 0
        timer = ReadTimer().start()
        try:
            got = call()
        except Exception as error:
            level.note_failure(operation, error)
            return 0
        if got:
            nbytes = sum(d.nbytes for d in dsts[:got])
            level.record_read(nbytes, timer.stop())
        return got

    def write(self, level: Level, items: Sequence[tuple[bytes, torch.Tensor | PendingBlock]],
              lossy: str | None = None, keep: Collection[bytes] = ()) -> None:
        """Write blocks that all went through ``lossy`` (None: exact) to ``level``, if it may take them; a level
        that evicts chains tail first evicts none of ``keep`` for them (``ChainTier.put_keeping``)."""
        if not items or not self.available(level):
            return
        if not level.health.writes_available():
            level.counters.add("write_suspended", len(items))
            return
        if not level.takes(lossy):
            level.counters.add("lossy_refused", len(items))
            return
        if not (level.slots and level.tier.fills_in_place):
            items = [(key, as_tensor(block)) for key, block in items]
        try:
            if keep and level.chains:
                level.tier.put_keeping(items, lossy, keep)
            elif lossy is None:
                level.tier.put_many(items)
            else:
                level.tier.put_lossy(items, lossy)
        except FillError:
            raise  # the engine's fill failed, not the tier
        except Exception as error:
            level.note_failure("put_many", error, write=True)
        else:
            level.health.record_ok()

    def touch_chain(self, level: Level, keys: Sequence[bytes]) -> None:
        """A prompt's blocks ``keys`` were just read: ``level`` keeps their head the most recently used, if it
        evicts chains tail first (``Capability.CHAINS``)."""
        if level.chains:
            self.guarded(level, "touch_chain", lambda: level.tier.touch_chain(keys), None)

    def pin(self, level: Level, key: bytes) -> tuple[torch.Tensor, str | None] | None:
        """Pin ``key`` in a slot level: (a view of its bytes, its lossy mark), or None."""
        return self.guarded(level, "pin", lambda: level.tier.pinned_marked(key), None)

    @staticmethod
    def unpin(level: Level, key: bytes) -> None:
        """Release a pin ``pin`` took, even on a bypassed level; a tier whose unpin raises is blamed for it
        (a custom tier's raised into the write-behind worker and killed it), never the caller."""
        try:
            level.tier.unpin(key)
        except Exception as error:
            level.note_failure("unpin", error)
