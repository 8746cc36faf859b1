"""Host-RAM tier: a fixed pool of block-sized slots with LRU eviction and pins."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kvstore.layout import KVLayout
from kvstore.metrics import Counters
from kvstore.tiers.base import TIER_COUNTERS

EvictCallback = Callable[[bytes, torch.Tensor], None]


@dataclass
class _Entry:
    slot: int
    num_tokens: int
    pins: int = 0


class HostTier:
    """Blocks in host RAM, in slots of one pool allocated once at start.

    The pool is ``capacity_bytes // layout.block_bytes`` full-block slots (a
    partial block takes a whole slot), pinned when CUDA is available so copies
    to the GPU can run asynchronously. Eviction is least-recently-used among
    blocks nobody is reading; ``on_evict`` sees an evicted block's bytes
    before its slot is reused (write-back to a lower tier).
    """

    name = "host"

    def __init__(self, layout: KVLayout, capacity_bytes: int, on_evict: EvictCallback | None = None,
                 pin_memory: bool | None = None):
        self.layout = layout
        self._slots = capacity_bytes // layout.block_bytes
        if capacity_bytes > 0 and self._slots == 0:
            raise ValueError(
                f"host_bytes: expected 0 (no host tier) or at least one block of {layout.block_bytes} bytes, "
                f"got {capacity_bytes}"
            )
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        numel = self._slots * layout.block_bytes // layout.element_bytes
        pool = torch.empty(numel, dtype=layout.dtype, pin_memory=pin_memory)
        pool.view(torch.uint8).zero_()  # fault every page in now, not on the hot path
        self._pool = pool.view(self._slots, -1)
        self._on_evict = on_evict
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, _Entry] = OrderedDict()  # LRU first
        self._free = list(range(self._slots - 1, -1, -1))
        self._counters = Counters(*TIER_COUNTERS)

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
        shape = self.layout.shape(num_tokens)
        return self._pool[slot, : self.layout.token_bytes // self.layout.element_bytes * num_tokens].view(shape)

    def contains(self, key: bytes) -> bool:
        # A dict membership test is atomic under the GIL; no lock on the lookup hot path.
        return key in self._index

    def keys(self) -> Iterator[bytes]:
        with self._lock:
            return iter(list(self._index))

    def _take_slot(self) -> tuple[int, tuple[bytes, _Entry] | None] | None:
        """Under the lock: a free slot, or the LRU unpinned block's slot (removed from the index)."""
        if self._free:
            return self._free.pop(), None
        for key, entry in self._index.items():
            if entry.pins == 0:
                del self._index[key]
                return entry.slot, (key, entry)
        return None

    def put_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> int:
        return sum(self.put(key, block) for key, block in items)

    def put(self, key: bytes, block: torch.Tensor) -> bool:
        """Copy ``block`` into a slot; False if every slot is pinned by readers."""
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
                return True
            taken = self._take_slot()
            if taken is None:
                self._counters.add("rejected")
                return False
        slot, victim = taken
        if victim is not None:
            self._counters.add("evictions")
            if self._on_evict is not None:
                victim_key, victim_entry = victim
                self._on_evict(victim_key, self._view(slot, victim_entry.num_tokens))
        num_tokens = block.shape[2]
        self._view(slot, num_tokens).copy_(block)
        with self._lock:
            if key in self._index:  # another thread stored it meanwhile
                self._free.append(slot)
                return True
            self._index[key] = _Entry(slot, num_tokens)
        self._counters.add("blocks_written")
        self._counters.add("bytes_written", block.numel() * block.element_size())
        return True

    @contextmanager
    def reading(self, key: bytes) -> Iterator[torch.Tensor | None]:
        """Pin ``key`` and yield a view of its stored block (None on a miss); unpinned on exit."""
        with self._lock:
            entry = self._index.get(key)
            if entry is not None:
                entry.pins += 1
                self._index.move_to_end(key)
        if entry is None:
            yield None
            return
        try:
            yield self._view(entry.slot, entry.num_tokens)
        finally:
            with self._lock:
                entry.pins -= 1

    def get_into(self, key: bytes, out: torch.Tensor) -> bool:
        with self.reading(key) as view:
            if view is None or view.shape != out.shape:
                self._counters.add("misses")
                return False
            out.copy_(view)
        self._counters.add("hits")
        self._counters.add("bytes_read", out.numel() * out.element_size())
        return True

    def delete(self, key: bytes) -> bool:
        """Drop ``key``; refused (False) while a reader has it pinned."""
        with self._lock:
            entry = self._index.get(key)
            if entry is None or entry.pins:
                return False
            del self._index[key]
            self._free.append(entry.slot)
            return True

    def stats(self) -> dict[str, int]:
        snapshot = self._counters.snapshot()
        with self._lock:
            snapshot.update(blocks=len(self._index), used_bytes=len(self._index) * self.layout.block_bytes)
        snapshot["capacity_bytes"] = self.capacity_bytes
        return snapshot

    def close(self) -> None:
        """Forget every block (the pool is freed with the object)."""
        with self._lock:
            self._index.clear()
            self._free = list(range(self._slots - 1, -1, -1))
