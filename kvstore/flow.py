"""How blocks move through the tier stack: landing a put, copies down, promotion, write-back, reads.

``BlockFlow`` carries out ``Placement``'s decisions on a ``TierStack``:

- A put lands in the fastest level that takes it; lower levels with
  ``write_through`` get a copy from the write-behind queues once the block
  has been seen ``admit_after`` times.
- A read hit in a lower level is promoted into the faster ones: memory
  levels at once, persistent ones through the write-behind.
- A level that evicts for room hands the block to the ``write_back`` level
  below it; on close, blocks only memory levels hold go to the first
  persistent ``write_back`` level.

Exact bytes or a miss: every block travels with the lossy codec it went
through (None: exactly what the engine put). Approximate bytes are kept
only in this store's memory slots, which mark them; they are never written
into a level below (``Level.takes``), so a tier another process reads never
holds approximate bytes under an exact header. A put of exact bytes for a
block held approximately stores them again instead of counting dedup.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from functools import partial

import torch

from kvstore.background import run_while_progressing
from kvstore.chains import ChainMemo
from kvstore.config import StoreConfig
from kvstore.keys import BlockRef, block_slices
from kvstore.layout import KVLayout
from kvstore.levels import Level, TierStack
from kvstore.metrics import Counters
from kvstore.pending import PendingBlock
from kvstore.placement import Placement
from kvstore.tiers.base import Capability
from kvstore.writebehind import WriteBehind, WriteBehindClosed

# How long a put waits for another landing the same blocks before it lands them itself (an engine's ``fill``
# runs inside a landing: one that blocks must not hold every other save of its prompt).
_LANDING_WAIT_SECONDS = 10.0

STORE_COUNTERS = ("puts", "blocks_stored", "dedup_blocks", "dedup_bytes", "lookups", "lookup_tokens",
                  "lookup_hit_tokens", "gets", "get_tokens", "get_hit_tokens", "promotions", "demotions")
# Blocks a batch level (cache server, Redis) is asked for in one read.
BATCH_READ_BLOCKS = 64

Item = tuple[bytes, "torch.Tensor | PendingBlock"]


class BlockFlow:
    """Puts, reads, promotions and lower-tier copies of one store's blocks over ``stack``."""

    def __init__(self, layout: KVLayout, config: StoreConfig, stack: TierStack, placement: Placement):
        self.layout = layout
        self.stack = stack
        self.placement = placement
        self.counters = Counters(*STORE_COUNTERS)
        self._targets = {level.index: level for level in stack if level.index > 0 or level.persistent}
        self.writes = WriteBehind({level.name: partial(self._write_queued, level) for level in self._targets.values()},
                                  self._queue_bound(config), config.queue_full, on_stall=self._stalled)
        for level in stack:
            if Capability.EVICTS in level.capabilities and placement.on_evict(level.index) is not None:
                level.tier.on_evict = partial(self.evicted, level)
        self._scratch = threading.local()
        self._landing: dict[bytes, int] = {}  # keys a put is landing now -> the thread landing them
        self._landed_lock = threading.Lock()
        self._landed = threading.Condition(self._landed_lock)  # some of them were landed
        self._waiting = 0  # threads waiting for another's landing
        self._chains = ChainMemo()
        # Where a put looks for blocks stored already: the local levels. Asking the cache server or Redis cost
        # a put a round trip a new block (32 EXISTS for 32), and a hung server its whole timeout; their copies
        # are checked for on the write-behind's side instead (``_write_queued``).
        self._dedup = stack.local or stack.levels
        # Memory levels hold approximate copies only of what a lossy level served: none, none to replace.
        self._lossy = any(level.lossy for level in stack)
        self._marks = [level for level in stack if level.slots] if self._lossy else []

    def _queue_bound(self, config: StoreConfig) -> int:
        """Queued jobs pin their source slots: keep the pins to half the fastest slot pool. A worker's batch
        out of its queue holds pins too, as many as the queue at most: a bound of a quarter per target (the
        queue alone at half let a slow tier's jobs pin every slot of a 16-slot pool)."""
        bound = config.write_queue_blocks
        fastest = self.stack.fastest
        if fastest is not None and fastest.slots:
            bound = min(bound, max(1, fastest.tier.num_slots // (4 * max(1, len(self._targets)))))
        return bound

    # -- writes -------------------------------------------------------------------------

    def _held_by(self, level: Level, keys: Iterable[bytes]) -> set[bytes]:
        """Of ``keys``, those batch ``level`` holds: a put does not ask it (``_dedup``), so where blocks go
        to it, the ones it holds are not sent again. One round trip a prompt (its keys here in its order: a
        cache server answers for the leading run, as a shared prefix is held), not one a block: 32 EXISTS
        round trips for a 32-block put."""
        wanted = list(dict.fromkeys(keys))
        asked = set(wanted)
        runs = [[key for key in chain if key in asked] for chain in self._chains.chains_of(wanted)]
        covered = {key for run in runs for key in run}
        runs.append([key for key in wanted if key not in covered])  # blocks of no known prompt, in their order
        held: set[bytes] = set()
        for run in runs:
            if run:
                held |= self.stack.guarded(level, "held", lambda run=run: level.tier.held(run), set())
        return held

    def _write_queued(self, level: Level, items: Sequence[tuple[bytes, torch.Tensor]]) -> None:
        if level.batch:
            held = self._held_by(level, (key for key, _ in items))
            items = [(key, block) for key, block in items if key not in held]
        keys = [key for key, _ in items]
        written = set(keys)
        chains = self._chains.chains_of(keys) if level.chains else []
        # each prompt's blocks before the first of them here: a queued tail evicted the head it follows
        keep = {key for chain in chains for key in itertools.takewhile(lambda key: key not in written, chain)}
        self.stack.write(level, items, keep=keep)  # queued copies are exact: approximate ones are never queued
        if level.chains:  # each prompt these blocks came with: its head the most recently used
            for chain in chains or [keys]:
                # the whole chain once, with its last block (written last): after every batch it cost a 4,096-
                # block prompt 2.6 s of LMDB stamps instead of 0.25 s
                self.stack.touch_chain(level, chain if chain[-1] in written else keys)

    def store_kv(self, blocks: Sequence[BlockRef], kv: torch.Tensor, head: Sequence[bytes] = ()) -> int:
        """Store ``blocks`` whose KV is ``kv`` (its token 0 is ``blocks[0].start``, its shape checked by the
        caller), one put; ``head``: the keys of the prompt's blocks before them. Returns blocks newly stored."""
        kv = kv.detach()  # the bytes, not an autograd graph: stored copies never require grad
        pieces = block_slices(kv, blocks, self.layout.block_tokens)
        return self.store_items([(b.key, piece) for b, piece in zip(blocks, pieces)], head)

    def store_items(self, items: Sequence[Item], head: Sequence[bytes] = ()) -> int:
        """Store blocks ``(key, [L, P, tokens, H, D])`` not stored yet, one put of a prompt's blocks after
        ``head`` (its head left the most recently used); returns blocks newly stored."""
        keys = [*head, *(key for key, _ in items)]
        lossy = self.begin_put(keys, len(head))
        stored = self.store_blocks(items, set(head), lossy)
        self.end_put(keys)
        return stored

    def _taint_of(self, head: Iterable[bytes]) -> str | None:
        """The lossy codec of the first of a prompt's stored blocks ``head`` that a read gets approximately
        (its fastest holder is a memory slot marked lossy, or a level that stores with a lossy codec); None
        if every one reads exact, and at once in a store with no lossy level.

        KV an engine computed after an approximate head is approximate too,
        whatever its keys: saved as exact, an ec4 disk's head made the tail
        another store read from a shared raw directory 0.15 off in the last
        logit. Such blocks go to memory (marked) and to lossy tiers only.
        """
        if not self._lossy:
            return None
        for key in head:
            level = self.stack.where(key, self._dedup)
            lossy = None if level is None else self._held_lossy(level, key)
            if lossy is not None:
                return lossy
        return None

    def _held_lossy(self, level: Level, key: bytes) -> str | None:
        """The lossy codec the copy of ``key`` that ``level`` holds went through (None: exact)."""
        return level.tier.lossy_of(key) if level.slots else level.lossy

    def _served_back(self, level: Level, key: bytes, block: torch.Tensor | PendingBlock) -> bool:
        """Whether ``block``, put for ``key``, is the approximate copy ``level`` holds (the engine saving what
        it was served) rather than KV it computed itself; a block still to be filled is taken for it."""
        if isinstance(block, PendingBlock):
            return True
        if level.slots:
            pinned = self.stack.pin(level, key)
            if pinned is None:
                return False
            try:
                return _same_bytes(pinned[0], block)
            finally:
                self.stack.unpin(level, key)
        held = torch.empty(self.layout.shape(block.shape[2]), dtype=self.layout.dtype)
        return self.stack.read(level, key, held) not in (False, None) and _same_bytes(held, block)

    def begin_put(self, keys: Sequence[bytes], stored: int = 0) -> str | None:
        """A put of the prompt whose blocks' keys are ``keys`` (in token order) begins, its first ``stored``
        stored already: those become the most recently used (a tier evicting for the rest then finds its
        victims at once, not behind them), and its copies written behind keep its head (``_write_queued``),
        however the write-behind batches them. Returns the lossy codec that head reads through, if it reads
        approximately (``_taint_of``): the put's other blocks are approximate too."""
        if stored > 1:
            for level in self.stack:
                self.stack.touch_chain(level, keys[:stored])
        if len(keys) > 1 and self._targets:
            self._chains.remember(keys)
        return self._taint_of(keys[:stored])

    def end_put(self, keys: Sequence[bytes]) -> None:
        """Count one put of a prompt whose blocks' keys are ``keys`` (in token order, each stored by
        ``store_blocks`` or before), and leave its head the most recently used (``ChainTier``)."""
        self.counters.add("puts")
        if len(keys) > 1:
            for level in self.stack:
                self.stack.touch_chain(level, keys)

    def store_blocks(self, items: Sequence[Item], head: Collection[bytes] = frozenset(),
                     lossy: str | None = None) -> int:
        """``store_items`` less ``begin_put`` and ``end_put``: for a put that stores its prompt a block at a
        time. No level evicts the prompt's blocks ``head`` (keys before ``items``) for them; ``lossy``: the
        codec an approximate head went through (``_taint_of``), which makes these blocks approximate too.

        Keys another thread's put is landing now are left to it, then looked
        at again once it is done (as stored blocks: dedup), or after
        ``_LANDING_WAIT_SECONDS`` (then stored here). Two threads saving one
        prompt both stored every block: each counted them all stored (and
        was told so), and each landing evicted room for them. A put inside a
        put of the same thread (an engine's fill that saves) never waits.
        """
        me = threading.get_ident()
        ours: list[Item] = []
        theirs: list[Item] = []
        claimed: list[bytes] = []
        with self._landed_lock:
            for item in items:
                holder = self._landing.get(item[0])
                if holder is None:
                    self._landing[item[0]] = me
                    claimed.append(item[0])
                if holder is None or holder == me:
                    ours.append(item)
                else:
                    theirs.append(item)
        if theirs and ours:  # the blocks before ours another thread is landing are this prompt's head too
            first = next(n for n, item in enumerate(items) if item is ours[0])
            head = {*head, *(key for key, _ in items[:first])}
        try:
            stored = self._store_now(ours, head, lossy)
        finally:
            if claimed:
                with self._landed_lock:
                    for key in claimed:
                        del self._landing[key]
                    if self._waiting:
                        self._landed.notify_all()
        if theirs:
            with self._landed_lock:
                self._waiting += 1
                try:
                    self._landed.wait_for(lambda: not any(key in self._landing for key, _ in theirs),
                                          _LANDING_WAIT_SECONDS)
                finally:
                    self._waiting -= 1
            stored += self._store_now(theirs, head, lossy)  # found now (dedup), or the other put failed (or lands)
        self.counters.add("blocks_stored", stored)
        return stored

    def _store_now(self, items: Sequence[Item], head: Collection[bytes], lossy: str | None) -> int:
        """``store_blocks`` of keys no other thread's put is landing, after the prompt's blocks ``head``
        (approximate through ``lossy``, if not None); returns blocks newly stored.

        A block held approximately is replaced by the put's bytes, unless
        they are that approximation put back (an engine saving the prefix it
        was served): then it and every block after it are approximate.
        """
        new = []
        lead = []  # the blocks before the first new one, with ``head``: landing evicts none of them
        for key, block in items:
            sightings = self.placement.sighted(key)
            where = self.stack.where(key, self._dedup)
            held = None if where is None else self._held_lossy(where, key)
            if held is not None and lossy is None and self._served_back(where, key, block):
                lossy = held
            if where is None or (held is not None and lossy is None):
                new.append((key, block, sightings))  # not stored, or held approximately: store these exact bytes
                continue
            if not new:
                lead.append(key)
            self.count_dedup(block)
            if held is None:
                self._send_down(where, key, None, sightings, newly_admitted=True)
        stored = self._land(new, {*head, *lead} if lead else head, lossy)
        for level in self._marks if lossy is None else ():  # an approximate copy left was served later
            exact = [(key, block) for key, block in items if self._marked(level, key)]
            if exact:
                self.stack.write(level, exact)
        return stored

    def count_dedup(self, block: torch.Tensor | PendingBlock) -> None:
        """A block a put gave that was stored already: counted, not stored again."""
        self.counters.add("dedup_blocks")
        self.counters.add("dedup_bytes", block.shape[2] * self.layout.token_bytes)

    @staticmethod
    def _marked(level: Level, key: bytes) -> bool:
        """Whether a memory level holds ``key`` with approximate bytes (read from a lossy tier)."""
        return level.slots and level.tier.lossy_of(key) is not None

    def _land(self, items: list[tuple[bytes, torch.Tensor | PendingBlock, int]], keep: Collection[bytes],
              lossy: str | None = None) -> int:
        """Put blocks in the fastest available level that takes them (none evicting ``keep``, the prompt's
        blocks before them), then queue the lower copies. Blocks approximate through ``lossy`` go only to
        memory slots (marked) and to levels that store with a lossy codec, whose readers take approximations.

        Blocks a level rejects (the batch is larger than it) go on to the
        level below in the same call. That level is then also written the
        copies it is due of the blocks landed above, in token order, so it
        keeps the prompt's leading blocks: queued behind the overflow, those
        copies evicted it (host 2 and files 3 blocks left files holding
        blocks 0, 1 and 3 of an 8-block prompt, so a lookup reached 2).
        """
        order = {key: position for position, (key, _, _) in enumerate(items)}
        landed: list[tuple[Level, bytes, torch.Tensor | PendingBlock, int]] = []
        written: dict[bytes, set[int]] = {}  # key -> levels its copy was written to with an overflow
        for level in self.stack:
            if not items:
                break
            if lossy is not None and not (level.slots or level.lossy):
                continue
            copies = [(key, block) for holder, key, block, sightings in landed
                      if self._copy_due(holder, level, sightings)]
            for key, _ in copies:
                written.setdefault(key, set()).add(level.index)
            batch = sorted(copies + [(key, block) for key, block, _ in items], key=lambda item: order[item[0]])
            if level.batch and level not in self._dedup:
                held = self._held_by(level, (key for key, _ in batch))
                batch = [(key, block) for key, block in batch if key not in held]
                for key, block, _ in items:
                    if key in held:
                        self.count_dedup(block)
                items = [item for item in items if item[0] not in held]
            self.stack.write(level, batch, lossy if level.slots else None, keep)
            rest = []
            for key, block, sightings in items:
                if self.stack.contains(level, key) and (lossy is not None or not self._marked(level, key)):
                    landed.append((level, key, block, sightings))
                else:
                    rest.append((key, block, sightings))
            items = rest
        for holder, key, block, sightings in landed:
            self._send_down(holder, key, block, sightings, skip=written.get(key, ()), approximate=lossy is not None)
        return len(landed)

    def _copy_due(self, holder: Level, level: Level, sightings: int) -> bool:
        """Whether ``level`` takes a write-through copy of a block that just landed in ``holder``."""
        return level.index in self.placement.write_through(holder.index) and self.placement.admits(level.index,
                                                                                                   sightings)

    def _send_down(self, landed: Level, key: bytes, block: torch.Tensor | PendingBlock | None, sightings: int,
                   newly_admitted: bool = False, skip: Collection[int] = (), approximate: bool = False) -> None:
        """Queue write-through copies of a block held by ``landed`` for the levels below it.

        ``newly_admitted``: only for levels whose admission threshold this
        very sighting reached (a block seen again that was kept out before).
        ``skip``: levels the copy was written to already. ``approximate``:
        the block is (computed after an approximate head): only levels that
        store with a lossy codec take it.
        """
        for index in self.placement.write_through(landed.index):
            level = self.stack[index]
            if index in skip or (newly_admitted and sightings != level.policy.admit_after) or (
                    approximate and not level.lossy):
                continue
            if not self.placement.admits(index, sightings):
                level.counters.add("admission_rejected")
                continue
            if self.writes.pending(level.name, key) or (
                    not level.batch and self.stack.contains(level, key) and not self._marked(level, key)):
                continue  # held exactly, or on its way (a copy held approximately is replaced by exact bytes)
            self._queue(level, key, block, landed)

    def _queue(self, target: Level, key: bytes, block: torch.Tensor | PendingBlock | None, holder: Level) -> None:
        """Hand an exact copy of ``key`` for ``target`` to the write-behind, from a pinned slot if one holds it.

        The slot is taken from the slowest memory level above ``target`` that
        holds the block (host RAM before HBM): the copy's source is then CPU
        memory, and the scarce HBM slots stay free for puts and promotions.
        """
        release = None
        for level in reversed(self.stack.levels[:target.index]):
            if not level.slots:
                continue
            pinned = self.stack.pin(level, key)
            if pinned is None:
                continue
            view, lossy = pinned
            if lossy is not None:  # held approximately here: look for an exact copy in a faster level
                self.stack.unpin(level, key)
                continue
            block, release = view, partial(self.stack.unpin, level, key)
            break
        else:
            if block is None:  # only a persistent level holds it exactly, if any: read a private copy
                block = torch.empty(self.layout.block_shape, dtype=self.layout.dtype)
                got = self.stack.read(holder, key, block)
                if got is not None:  # a miss (False) or approximate bytes: no exact copy to give
                    if got is not False:
                        target.counters.add("lossy_refused")
                    return
            elif isinstance(block, PendingBlock):
                block = block.materialize()  # a host tensor of the store's own
            else:
                block = block.detach().to("cpu", copy=True)  # the caller may reuse its buffer after put
        try:
            accepted = self.writes.submit(target.name, key, block, release)
        except WriteBehindClosed:  # a put racing the store's close: it stands in the faster level, not below
            if release is not None:
                release()
            accepted = False
        if not accepted:
            target.counters.add("queue_dropped")

    def evicted(self, level: Level, key: bytes, block: torch.Tensor, lossy: str | None = None) -> None:
        """Write-back: ``level`` evicts ``key`` (bytes that went through ``lossy``); the level below keeps it
        if it admits it and may hold such bytes."""
        index = self.placement.on_evict(level.index)
        if index is None:
            return
        below = self.stack[index]
        if self.stack.contains(below, key) and not (lossy is None and self._marked(below, key)):
            return  # held there, unless approximately while these bytes are exact
        if not self.placement.admits(index, self.placement.sightings(key)):
            below.counters.add("admission_rejected")
            return
        self._written_back(below, key, block, lossy)

    def _written_back(self, target: Level, key: bytes, block: torch.Tensor, lossy: str | None) -> None:
        """Write ``key`` back to ``target``; one it refuses (a codec's frame larger than the tier, a failed
        write) goes on down as if ``target`` evicted it. Blocks a write-back target refused were lost: only a
        put's overflow went on to the level below."""
        self.stack.write(target, [(key, block)], lossy)
        if not target.takes(lossy):
            return
        if self.stack.contains(target, key):
            self.counters.add("demotions")
        else:
            self.evicted(target, key, block, lossy)

    def write_back_all(self) -> None:
        """On close: blocks only memory levels hold go to the first persistent ``write_back`` level."""
        target = self.placement.on_close()
        if target is None:
            return
        persistent = [level for level in self.stack if level.persistent]
        for level in self.stack:
            if level.persistent or not level.slots:
                continue
            for key in level.tier.keys():
                if any(self.stack.contains(p, key) for p in persistent):
                    continue
                pinned = self.stack.pin(level, key)
                if pinned is None:
                    continue
                try:
                    self._written_back(self.stack[target], key, pinned[0], pinned[1])
                finally:
                    self.stack.unpin(level, key)

    # -- reads --------------------------------------------------------------------------

    def read_block(self, key: bytes, dst: torch.Tensor) -> bool:
        """Read ``key`` from the fastest level that has it, then promote it into the faster ones."""
        return self._read_promoted(key, dst) is not False

    def _read_promoted(self, key: bytes, dst: torch.Tensor) -> str | None | bool:
        """``read_block``, returning False on a miss, else the lossy codec the bytes went through (None: exact)."""
        for level in self.stack:
            lossy = self.stack.read(level, key, dst)
            if lossy is not False:
                self._was_read(level, key, dst, lossy)
                return lossy
        return False

    def _was_read(self, level: Level, key: bytes, dst: torch.Tensor, lossy: str | None) -> None:
        """``level`` served ``key`` into ``dst``: count the sighting, promote, maybe admit it below."""
        promotions = getattr(self._scratch, "promotions", None)
        sightings = self.placement.sighted(key)
        if promotions is None:
            self._promote(level, key, dst, sightings, lossy)
        else:  # a request's read: promoted once all of it is read (``fill_keys``)
            promotions.append((level, key, dst, sightings, lossy))
        self._admit_below(level, key, sightings)

    def _admit_below(self, level: Level, key: bytes, sightings: int) -> None:
        if self.placement.counting:  # a read hit may be the sighting that admits it below
            self._send_down(level, key, None, sightings, newly_admitted=True)

    def pinned_hit(self, key: bytes) -> None:
        """A layer-wise load read ``key`` from its pin in the fastest level, where the prefetch found it: a
        read hit like a get's, counted as a sighting (a vLLM engine's re-reads never admitted a block to a
        tier with ``admit_after`` > 1, so a second engine sharing that tier was offered nothing)."""
        fastest = self.stack.fastest
        if fastest is not None:
            self._admit_below(fastest, key, self.placement.sighted(key))

    def fill(self, blocks: Sequence[BlockRef], out: torch.Tensor) -> int:
        """Copy a request's ``blocks`` into ``out`` (token 0 is ``blocks[0]``'s first) in order until one is
        missing; returns tokens filled, and counts the get."""
        offset = blocks[0].start if blocks else 0
        got = self.fill_keys([b.key for b in blocks], block_slices(out, blocks, self.layout.block_tokens))
        filled = blocks[got - 1].end - offset if got else 0
        self.counters.add("gets")
        self.counters.add("get_tokens", blocks[-1].end - offset if blocks else 0)
        self.counters.add("get_hit_tokens", filled)
        return filled

    def fill_keys(self, keys: Sequence[bytes], dsts: Sequence[torch.Tensor]) -> int:
        """Read blocks ``keys`` into ``dsts`` in order until one is missing; returns blocks read.

        A run of blocks no local level holds is read from the batch levels
        (cache server, Redis) in one round trip; a run the files tier holds
        is read there side by side, so ``dsts`` past the count returned may
        have been read into.
        """
        # The promotions this read's blocks are due (``_was_read``): made once every block is read, since a
        # promotion's eviction written back below could evict the request's next block there (write_back:
        # lookup 64 tokens, then get 48).
        promotions = self._scratch.promotions = []
        try:
            n = self._fill_keys(keys, dsts)
        finally:
            self._scratch.promotions = None
        request = set(keys[:n])  # a promotion into memory evicts none of the request's blocks
        for level, key, dst, sightings, lossy in promotions:
            self._promote(level, key, dst, sightings, lossy, request)
        self.touch_read(keys[:n])
        return n

    def touch_read(self, keys: Sequence[bytes]) -> None:
        """A prompt's blocks ``keys`` (its head first) were read: every level that holds them keeps the head the
        most recently used. Read head first, the head became the least recently used: evicted first, it took the
        rest. Every level, not only those read: a prompt always read from host RAM went first from the disks."""
        if len(keys) > 1:
            for level in self.stack:
                self.stack.touch_chain(level, keys)

    def _fill_keys(self, keys: Sequence[bytes], dsts: Sequence[torch.Tensor]) -> int:
        """``fill_keys``' reads."""
        n = 0
        while n < len(keys):
            run = self.stack.local_run(keys[n:n + BATCH_READ_BLOCKS]) if self.stack.batch else 0
            if run:
                got = self._read_run(keys[n:n + run], dsts[n:n + run])
            else:
                ahead, into = keys[n:n + BATCH_READ_BLOCKS], dsts[n:n + BATCH_READ_BLOCKS]
                got = (self._read_fastest_run(ahead, into) or self._read_side_by_side(ahead, into)
                       or int(self.read_block(keys[n], dsts[n])))
            if not got:
                break
            n += got
        return n

    def _read_fastest_run(self, keys: Sequence[bytes], dsts: Sequence[torch.Tensor]) -> int:
        """Read the leading ``keys`` the fastest level holds, if it is a memory level, in one call; returns
        blocks read (0: the first key is not there, and ``read_block`` asks every level for it)."""
        level = self.stack.fastest
        if level is None or not level.slots:
            return 0
        marks = self.stack.read_run(level, keys, dsts)
        for key, dst, lossy in zip(keys, dsts, marks):
            self._was_read(level, key, dst, lossy)
        return len(marks)

    def _read_side_by_side(self, keys: Sequence[bytes], dsts: Sequence[torch.Tensor]) -> int:
        """Read the leading ``keys`` whose fastest holder is the level holding the first, if that level reads
        runs side by side (the files tier), in one call; blocks read (0: a run of one, or no such level, and
        ``read_block`` reads the first)."""
        level = self.stack.where(keys[0])
        if level is None or not level.runs:
            return 0
        up_to = self.stack.levels[:level.index + 1]  # memory and local disk levels: no round trip to ask them
        run = 1
        while run < len(keys) and self.stack.where(keys[run], up_to) is level:
            run += 1
        if run == 1:
            return 0
        got = self.stack.read_side_by_side(level, keys[:run], dsts[:run])
        for key, dst in zip(keys[:got], dsts):
            self._was_read(level, key, dst, level.lossy)
        for above in up_to[:-1]:  # as many misses as ``read_block`` would have counted asking them one by one
            if above.slots and self.stack.available(above):
                above.tier.count_misses(got)
        return got

    def _read_run(self, keys: Sequence[bytes], dsts: Sequence[torch.Tensor]) -> int:
        """Read ``keys`` from the first batch level that serves the first; returns leading blocks read."""
        for level in self.stack.batch:
            got = self.stack.read_many(level, keys, dsts)
            if got:
                for key, dst in zip(keys[:got], dsts):
                    self._was_read(level, key, dst, level.lossy)
                return got
        return 0

    def _promote(self, hit: Level, key: bytes, block: torch.Tensor, sightings: int, lossy: str | None,
                 keep: Collection[bytes] = ()) -> None:
        for index in self.placement.promote_into(hit.index):
            level = self.stack[index]
            if self.stack.contains(level, key) or not self.stack.available(level):
                continue
            if not self.placement.admits(index, sightings):
                level.counters.add("admission_rejected")
            elif not level.takes(lossy):
                level.counters.add("lossy_refused")
            elif level.persistent:
                self._queue(level, key, block, hit)
                self.counters.add("promotions")
            else:
                self.stack.write(level, [(key, block)], lossy, keep)
                if self.stack.contains(level, key):
                    self.counters.add("promotions")

    def bring_up(self, key: bytes, num_tokens: int) -> bool:
        """Read ``key`` (a block of ``num_tokens``) from where it is into the fastest level (a prefetch job)."""
        fastest = self.stack.fastest
        if fastest is None:
            return False
        if self.stack.contains(fastest, key):
            return True
        scratch = getattr(self._scratch, "buffer", None)
        if scratch is None:
            scratch = self._scratch.buffer = torch.empty(self.layout.block_shape, dtype=self.layout.dtype)
        dst = scratch.view(-1)[:self.layout.token_bytes // self.layout.element_bytes * num_tokens]
        dst = dst.view(self.layout.shape(num_tokens))
        lossy = self._read_promoted(key, dst)
        if lossy is False:
            return False
        if not self.stack.contains(fastest, key):
            self.stack.write(fastest, [(key, dst)], lossy)
        return self.stack.contains(fastest, key)

    def _stalled(self, name: str, seconds: float) -> None:
        """The write-behind found level ``name`` stuck in a write: its writes are suspended."""
        for level in self._targets.values():
            if level.name == name:
                level.note_failure("write-behind", TimeoutError(f"a write has not ended in {seconds:g} s"),
                                   write=True)

    def close(self) -> dict[str, Callable[[], None]]:
        """Flush and stop the write-behind workers, then write back what only memory levels hold; returns the
        levels left stuck in a write, each with a wait for that write to end (their writes are suspended
        afresh: the write-back skips them). The write-back itself is given up while it makes no progress
        for ``stall_seconds`` (its target stuck: close waited for ever)."""
        seconds = self.writes.stall_seconds
        stuck: dict[str, Callable[[], None]] = {name: partial(self.writes.join, name) for name in self.writes.close()}
        for name in stuck:
            self._stalled(name, seconds)
        target = self.placement.on_close()
        if target is None or self.stack[target].name in stuck:
            return stuck
        level = self.stack[target]
        def progress() -> int:  # blocks the write-back handled at its target, written or refused
            return sum(level.counters.get(name) for name in ("errors", "write_suspended")) + \
                self.counters.get("demotions")

        running = run_while_progressing(self.write_back_all, progress, seconds, "kvstore-write-back")
        if running is not None:
            self._stalled(level.name, seconds)
            stuck[level.name] = running.join
        return stuck


def _same_bytes(held: torch.Tensor, block: torch.Tensor) -> bool:
    """Whether ``block`` holds exactly the bytes of ``held`` (a host tensor of the same dtype)."""
    if tuple(held.shape) != tuple(block.shape) or held.dtype != block.dtype:
        return False
    return torch.equal(held.contiguous().view(torch.uint8), block.detach().to("cpu").contiguous().view(torch.uint8))
