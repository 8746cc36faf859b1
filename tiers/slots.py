"""A fixed pool of block-sized slots on one torch device, with exact LRU and pins.

The host-RAM tier and the device (HBM) tier are both this pool; they differ
only in where the pool lives and how bytes get in and out of it (see
``tiers/host.py`` and ``tiers/device.py``). The pool is allocated once at
start. In plain host memory it is mapped at once and a background thread
faults it in slice by slice (``kvstore/region.py``), handing each slice's
slots out once it is done, so a store of any size opens at once and, once
warm, the hot path never faults; a put that comes before its slot's slice
takes the next unfaulted slot and faults those pages itself. Pinned and
device pools are written through once at start.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kvstore.background import lower_priority
from kvstore.layout import KVLayout
from kvstore.metrics import Counters
from kvstore.pending import PendingBlock
from kvstore.region import HostRegion
from kvstore.tiers.base import TIER_COUNTERS, Capability, EvictCallback, tier_stats


_FAULT_SLICE_BYTES = 64 << 20  # faulted in per step of the fault thread
_CLOSE_FILL_SECONDS = 10.0  # how long close waits for copies into slots other threads are making
_FILL_WAIT_SECONDS = 10.0  # how long a put of a key waits for another thread's copy of the same key


@dataclass
class _Entry:
    slot: int
    num_tokens: int
    pins: int = 0
    lossy: str | None = None  # the lossy codec these bytes went through (None: exactly what was put)


@dataclass
class _Claim:
    """A slot a put took for one block, before the block is copied into it."""

    key: bytes
    block: torch.Tensor | PendingBlock
    slot: int
    victim: tuple[bytes, _Entry] | None  # the block evicted from the slot for it
    first: bool  # whether this put marked the key filling (not a fill of the same thread further up)


@dataclass
class _Run:
    """Blocks of a put that ``SlotTier._claim_run`` looked at under one lock."""

    claims: list[_Claim]  # the ones given a slot, in order
    held: list[bytes]  # the keys held already (or twice in the run)


class SlotTier:
    """Blocks in slots of one pool of ``capacity_bytes // layout.block_bytes`` full-block slots.

    A partial block takes a whole slot. Eviction is least-recently-used among
    blocks nobody has pinned; ``on_evict`` sees an evicted block's bytes
    before its slot is reused (that is how write-back to a lower tier works).
    Subclasses choose the device and may override ``_copy_in`` /
    ``_copy_out`` / ``_ready`` to make copies asynchronous.
    """

    name = "slots"
    persistent = False
    capabilities = Capability.SLOTS | Capability.EVICTS | Capability.CHAINS
    setting = "slot_bytes"  # the config field that sized the pool, for error messages

    def __init__(self, layout: KVLayout, capacity_bytes: int, device: torch.device,
                 on_evict: EvictCallback | None = None, pin_memory: bool = False):
        self.layout = layout
        self.device = device
        self._slots = max(0, capacity_bytes) // layout.block_bytes
        if capacity_bytes < 0 or (capacity_bytes > 0 and self._slots == 0):
            raise ValueError(
                f"{self.setting}: expected 0 (no {self.name} tier) or at least one block of "
                f"{layout.block_bytes} bytes, got {capacity_bytes}"
            )
        numel = self._slots * layout.block_bytes // layout.element_bytes
        self._region: HostRegion | None = None
        if device.type == "cpu" and not pin_memory and self._slots:
            self._region = HostRegion(self._slots * layout.block_bytes, self.setting)
            pool = torch.from_numpy(self._region.array).view(layout.dtype)
        else:
            pool = torch.empty(numel, dtype=layout.dtype, device=device, pin_memory=pin_memory)
            pool.view(torch.uint8).zero_()  # fault every page in now, not on the hot path
        self._pool = pool.view(self._slots, layout.block_bytes // layout.element_bytes)
        self._block_shape = layout.block_shape
        self._token_bytes = layout.token_bytes
        self._blocks = pool.view(self._slots, *layout.block_shape)  # slot -> full block view in one index
        self.on_evict = on_evict
        self._lock = threading.Lock()
        self._faulted = threading.Condition(self._lock)  # a slice's slots became free
        self._closed = False
        self._pinned = pin_memory and device.type == "cpu"
        self._filling: dict[bytes, int] = {}  # keys being copied into a slot -> the thread copying (one slot)
        self._filled = threading.Condition(self._lock)  # one of them was indexed (or failed)
        self._index: OrderedDict[bytes, _Entry] = OrderedDict()  # LRU first
        self._free: list[int] = []
        self._fresh = 0  # slots [_fresh, _slots) are neither faulted in nor handed out
        self._faulting = False  # the fault thread holds a slice it is about to free
        self._counters = Counters(*TIER_COUNTERS)
        self._stop = threading.Event()
        self._fault_thread: threading.Thread | None = None
        if self._region is None:
            self._free, self._fresh = list(range(self._slots - 1, -1, -1)), self._slots
        elif self._slots:
            self._fault_thread = threading.Thread(target=self._fault_in, name=f"kvstore-{self.name}-fault",
                                                  daemon=True)
            self._fault_thread.start()

    def _fault_in(self) -> None:
        """The fault thread: claim the next slice of slots, fault it in, hand its slots out."""
        lower_priority()  # a put ahead of it takes an unfaulted slot: the engine's threads come first
        per_slice = max(1, _FAULT_SLICE_BYTES // self.layout.block_bytes)
        while not self._stop.is_set():
            with self._lock:
                start = self._fresh
                if start >= self._slots:
                    return
                self._fresh = end = min(start + per_slice, self._slots)
                self._faulting = True
            try:
                self._region.fault_in(start * self.layout.block_bytes, end * self.layout.block_bytes)
            finally:
                with self._lock:
                    self._free.extend(range(end - 1, start - 1, -1))
                    self._faulting = False
                    self._faulted.notify_all()

    # -- copies (overridden where they can run asynchronously) -------------------

    def _copy_in(self, slot: int, dst: torch.Tensor, block: torch.Tensor) -> None:
        """Copy ``block`` into slot ``slot`` (its view ``dst``); done when this returns."""
        dst.copy_(block)

    def _copy_out(self, slot: int, out: torch.Tensor, src: torch.Tensor) -> None:
        """Copy slot ``slot`` (its view ``src``) into ``out``; ``out`` is usable when this returns."""
        out.copy_(src)

    def _ready(self, slot: int) -> None:
        """Wait until the last copy into ``slot`` has landed (the host may then read its view)."""

    # -- the tier protocol ---------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self._slots * self.layout.block_bytes

    @property
    def num_slots(self) -> int:
        return self._slots

    def used_bytes(self) -> int:
        """Bytes of slots in use (a partial block counts its whole slot)."""
        with self._lock:
            return len(self._index) * self.layout.block_bytes

    def _view(self, slot: int, num_tokens: int) -> torch.Tensor:
        if num_tokens == self._block_shape[2]:  # a full block is its slot's whole row: one index, no view
            return self._blocks[slot]
        shape = self.layout.shape(num_tokens)
        return self._pool[slot, : self._token_bytes // self.layout.element_bytes * num_tokens].view(shape)

    def contains(self, key: bytes) -> bool:
        # A dict membership test is atomic under the GIL; no lock on the lookup hot path.
        return key in self._index

    def keys(self) -> Iterator[bytes]:
        with self._lock:
            return iter(list(self._index))

    def _take_slot(self, keep: Collection[bytes] = (),
                   also: Collection[bytes] = ()) -> tuple[int, tuple[bytes, _Entry] | None] | None:
        """Under the lock: a free slot, or the slot of the LRU unpinned block in neither ``keep`` nor ``also``
        (removed from the index)."""
        if self._free:
            return self._free.pop(), None
        if self._fresh < self._slots:  # ahead of the fault thread: this put faults the slot's pages itself
            self._fresh += 1
            return self._fresh - 1, None
        while self._faulting and not self._free:  # slots about to be free: evict nothing for want of them
            self._faulted.wait()
        if self._free:
            return self._free.pop(), None
        for key, entry in self._index.items():
            if entry.pins == 0 and key not in keep and key not in also:
                del self._index[key]
                return entry.slot, (key, entry)
        return None

    def put_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> int:
        return self._put_each(items, None)

    def put_lossy(self, items: Sequence[tuple[bytes, torch.Tensor]], codec: str) -> int:
        """``put_many`` of blocks decoded from the lossy ``codec``: they keep that mark while held here."""
        if not codec:
            raise ValueError(f"codec: expected the name of a lossy codec, got {codec!r}")
        return self._put_each(items, codec)

    def put_keeping(self, items: Sequence[tuple[bytes, torch.Tensor]], lossy: str | None,
                    keep: Collection[bytes]) -> int:
        """``ChainTier.put_keeping``: a read's promotions evicted the request's own blocks, and a head held only
        here was lost (lookup 87 tokens, then 0)."""
        return self._put_each(items, lossy, keep)

    def _put_each(self, items: Sequence[tuple[bytes, torch.Tensor | PendingBlock]], lossy: str | None,
                  keep: Collection[bytes] = ()) -> int:
        """``put`` of each item in turn, a run of them at a time: the run's slots taken under one lock, its
        copies made, the run indexed under one lock. (One block at a time, a 2 MiB block's three lock
        sections were a third of its bookkeeping, and the bookkeeping a tenth of a put next to its copies.)

        No block of the batch evicts one the batch put before it: a batch
        larger than the pool keeps its leading blocks and its trailing ones
        are ``rejected``. Evicting its own leading blocks left only blocks
        no lookup reaches (a prefix is read from its first block).
        """
        held = 0
        own: set[bytes] = set()  # ``keep`` is not copied: a request's promotions come one block at a time
        position = 0
        while position < len(items):
            with self._lock:
                run, position = self._claim_run(items, position, lossy, own, keep)
            filled = self._fill_run(run.claims, lossy)
            own.update(run.held, filled)
            held += len(run.held) + len(filled)
        return held

    def _claim_run(self, items: Sequence[tuple[bytes, torch.Tensor | PendingBlock]], position: int,
                   lossy: str | None, own: Collection[bytes], keep: Collection[bytes]) -> tuple[_Run, int]:
        """Under the lock: from ``items[position]`` on, a slot for each block not held already (one refused is
        ``rejected``), up to a key another thread is copying into a slot; and the position after the run.

        A run that begins at such a key waits for that copy first (bounded:
        an engine's fill may wait for this very put), then takes a slot of
        its own, and the later of the two copies is dropped. A run never
        waits while it has slots taken, so two puts of the same keys in
        opposite orders do not wait for each other.
        """
        me = threading.get_ident()
        run = _Run([], [])
        claimed: set[bytes] = set()
        while position < len(items):
            key, block = items[position]
            if self._filling.get(key, me) != me:
                if run.claims:
                    break
                self._filled.wait_for(lambda: self._filling.get(key, me) == me, _FILL_WAIT_SECONDS)
            position += 1
            if key in claimed or key in own:
                run.held.append(key)
                continue
            entry = self._index.get(key)
            if entry is not None:
                self._index.move_to_end(key)
                if entry.lossy is None or lossy is not None or entry.pins:
                    run.held.append(key)
                    continue
                del self._index[key]  # exact bytes replace approximate ones: a fresh slot, same order
                self._free.append(entry.slot)
            taken = self._take_slot(keep, own)
            if taken is None:
                self._counters.add("rejected")
                continue
            # unless this thread fills it further up (an engine's fill saving), or another still does
            first = key not in self._filling
            if first:
                self._filling[key] = me
            claimed.add(key)
            run.claims.append(_Claim(key, block, *taken, first))
        return run, position

    def touch_chain(self, keys: Sequence[bytes]) -> None:
        """``ChainTier.touch_chain``: the held ``keys`` become the most recently used, the first most of all."""
        with self._lock:
            for key in reversed(keys):
                if key in self._index:
                    self._index.move_to_end(key)

    @property
    def fills_in_place(self) -> bool:
        """Whether a ``PendingBlock`` may be filled straight into a slot (host memory: the engine's gather
        writes there); slots on another device take it materialized."""
        return self.device.type == "cpu"

    def put(self, key: bytes, block: torch.Tensor | PendingBlock, lossy: str | None = None) -> bool:
        """Copy ``block`` into a slot (a pending block fills it); False if every slot is pinned by readers.

        ``lossy``: the lossy codec ``block`` went through. Exact bytes put
        for a key held with a lossy mark replace them (unless a reader has
        the slot pinned).
        """
        return self._put_each([(key, block)], lossy) == 1

    def _fill_run(self, claims: list[_Claim], lossy: str | None) -> list[bytes]:
        """``_claim_run``'s copies into the slots it took (each victim's ``on_evict`` first), then the index
        entries and the counters; returns the keys now held (one another thread stored meanwhile as well).

        A copy that raises frees its slot; the blocks copied before it are
        indexed, and the slots of the ones after it get their victims back.
        """
        made = 0
        try:
            for claim in claims:
                if claim.victim is not None and self.on_evict is not None:
                    victim_key, victim_entry = claim.victim
                    self._ready(claim.slot)
                    self.on_evict(victim_key, self._view(claim.slot, victim_entry.num_tokens), victim_entry.lossy)
                view = self._view(claim.slot, claim.block.shape[2])
                if isinstance(claim.block, PendingBlock):
                    claim.block.write_into(view)
                else:
                    self._copy_in(claim.slot, view, claim.block)
                made += 1
        finally:
            evictions = sum(claim.victim is not None for claim in claims[:made + 1])  # the failed copy's too
            if evictions:
                self._counters.add("evictions", evictions)
            with self._lock:
                held = [] if self._closed else self._index_run(claims[:made], lossy)  # closed: the pool is gone
                if made < len(claims):
                    self._free.append(claims[made].slot)
                    self._unclaim(claims[made + 1:])
                for claim in claims:
                    if claim.first:
                        del self._filling[claim.key]
                self._filled.notify_all()
        return held

    def _index_run(self, claims: list[_Claim], lossy: str | None) -> list[bytes]:
        """Under the lock: index the slots ``claims`` filled, and count their writes."""
        blocks = nbytes = 0
        for claim in claims:
            if claim.key in self._index:  # another thread stored it meanwhile
                self._free.append(claim.slot)
                continue
            num_tokens = claim.block.shape[2]
            self._index[claim.key] = _Entry(claim.slot, num_tokens, lossy=lossy)
            blocks += 1
            nbytes += num_tokens * self._token_bytes
        if blocks:
            self._counters.add("blocks_written", blocks)
            self._counters.add("bytes_written", nbytes)
        return [claim.key for claim in claims]

    def _unclaim(self, claims: list[_Claim]) -> None:
        """Under the lock: slots taken for copies never made go back; a victim evicted for one is held again,
        the least recently used (its slot was not touched; its ``on_evict`` was not called)."""
        for claim in claims:
            if self._closed or claim.victim is None or claim.victim[0] in self._index:
                self._free.append(claim.slot)
                continue
            victim_key, victim_entry = claim.victim
            self._index[victim_key] = victim_entry
            self._index.move_to_end(victim_key, last=False)

    def pin(self, key: bytes) -> torch.Tensor | None:
        """Pin ``key`` against eviction and return a view of its bytes (None on a miss).

        The view stays valid until the matching ``unpin(key)``; background
        writers hold a pin while a lower tier copies the block.
        """
        pinned = self.pinned_marked(key)
        return None if pinned is None else pinned[0]

    def pinned_marked(self, key: bytes) -> tuple[torch.Tensor, str | None] | None:
        """``pin`` that also says which lossy codec the pinned bytes went through (None: exact)."""
        with self._lock:
            entry = self._index.get(key)
            if entry is None:
                return None
            entry.pins += 1
            self._index.move_to_end(key)
        self._ready(entry.slot)
        return self._view(entry.slot, entry.num_tokens), entry.lossy

    def lossy_of(self, key: bytes) -> str | None:
        """The lossy codec the bytes held for ``key`` went through (None: exact, or not held)."""
        entry = self._index.get(key)
        return None if entry is None else entry.lossy

    def unpin(self, key: bytes) -> None:
        """Release one pin taken by ``pin(key)``."""
        with self._lock:
            entry = self._index.get(key)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1

    @contextmanager
    def reading(self, key: bytes) -> Iterator[torch.Tensor | None]:
        """Pin ``key`` and yield a view of its stored block (None on a miss); unpinned on exit."""
        view = self.pin(key)
        try:
            yield view
        finally:
            if view is not None:
                self.unpin(key)

    def get_into(self, key: bytes, out: torch.Tensor) -> bool:
        return self.get_into_marked(key, out)[0]

    def get_into_marked(self, key: bytes, out: torch.Tensor) -> tuple[bool, str | None]:
        """``get_into``, and the lossy codec the bytes copied out went through (None: exact)."""
        marks = self.get_run_marked([key], [out])
        if not marks:
            self._counters.add("misses")
            return False, None
        return True, marks[0]

    def count_misses(self, count: int) -> None:
        self._counters.add("misses", count)

    def get_run_marked(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor]) -> list[str | None]:
        """Copy the leading ``keys`` held here into ``outs``, up to the first one not held (or held with
        another number of tokens than its ``out``); the lossy mark of each block copied (None: exact).

        One lock to pin the run and one to release it: a hit on a 2 MiB block
        copies in about 100 us, and per-block bookkeeping was a tenth of that.
        No miss is counted (the caller asks the next tier for the next key).
        """
        entries: list[_Entry] = []
        full = self._block_shape[2]
        with self._lock:
            for key, out in zip(keys, outs):
                entry = self._index.get(key)
                if entry is None or out.shape != (self._block_shape if entry.num_tokens == full
                                                  else self.layout.shape(entry.num_tokens)):
                    break
                entry.pins += 1
                self._index.move_to_end(key)
                entries.append(entry)
        try:
            for entry, out in zip(entries, outs):
                self._copy_out(entry.slot, out, self._view(entry.slot, entry.num_tokens))
        finally:
            with self._lock:
                for entry in entries:
                    entry.pins -= 1
        if entries:
            self._counters.add("hits", len(entries))
            self._counters.add("bytes_read", sum(entry.num_tokens for entry in entries) * self._token_bytes)
        return [entry.lossy for entry in entries]

    def delete(self, key: bytes) -> bool:
        """Drop ``key``; refused (False) while a reader has it pinned."""
        with self._lock:
            entry = self._index.get(key)
            if entry is None or entry.pins:
                return False
            del self._index[key]
            self._free.append(entry.slot)
            return True

    def wait_warm(self, timeout: float | None = None) -> bool:
        """Wait until the background fault thread has backed the whole pool (a warm hot path: no page faults);
        False if ``timeout`` seconds ran out first. For an engine that would rather start serving warm, and
        for benchmarks of the steady state."""
        if self._fault_thread is not None:
            self._fault_thread.join(timeout)
            return not self._fault_thread.is_alive()
        return True

    def stats(self) -> dict[str, int]:
        with self._lock:
            blocks = len(self._index)
        return tier_stats(self._counters, blocks, blocks * self.layout.block_bytes, self.capacity_bytes)

    def close(self) -> None:
        """Stop faulting in, forget every block and let the pool go: its memory goes back to the system once
        no view of it is left (a closed store kept 8 GiB of host RAM for as long as the object lived). A put
        after close is refused."""
        self._stop.set()
        if self._fault_thread is not None:
            self._fault_thread.join()
        me = threading.get_ident()
        with self._lock:
            self._closed = True
            # copies other threads are making into slots finish first (an engine's fill: bounded)
            self._filled.wait_for(lambda: all(thread == me for thread in self._filling.values()),
                                  _CLOSE_FILL_SECONDS)
            self._index.clear()
            self._free, self._fresh = [], self._slots
            self._pool = self._pool[:0].clone()
            self._blocks = self._blocks[:0].clone()
            self._region = None
        if self._pinned:  # torch caches freed pinned memory: give it back
            empty_cache = getattr(torch._C, "_host_emptyCache", None)
            if empty_cache is not None:
                empty_cache()
