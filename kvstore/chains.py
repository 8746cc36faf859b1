"""Which prompt a block was put with, for the copies written behind: a tier keeps a prompt's head the most
recently used (``Capability.CHAINS``), so its eviction takes the tail first.

A put's copies to a lower tier go through the write-behind queue, in
batches of whatever is queued when a worker wakes: a prompt's blocks are
often split over two batches, and ordering each batch alone left the tier
holding the prompt's blocks as ``[0, 2, 1]``, its head the least recently
used again. Remembering each queued key's whole chain lets the writer touch
the whole chain with the batch that holds its last block (the others only
order their own blocks).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

# Keys remembered at most (a reference to a shared tuple each): the write-behind queues hold far fewer.
MAX_KEYS = 1 << 14


class ChainMemo:
    """A bounded, thread-safe map from a block's key to the keys of the prompt it was last put with."""

    def __init__(self, max_keys: int = MAX_KEYS):
        if max_keys < 1:
            raise ValueError(f"max_keys: expected >= 1, got {max_keys}")
        self._max_keys = max_keys
        self._chains: OrderedDict[bytes, tuple[bytes, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, chain: Sequence[bytes]) -> None:
        """``chain``, a prompt's block keys in order, was just put (the oldest keys are forgotten past the bound)."""
        chain = tuple(chain)
        with self._lock:
            for key in chain:
                self._chains[key] = chain
                self._chains.move_to_end(key)
            while len(self._chains) > self._max_keys:
                self._chains.popitem(last=False)

    def chains_of(self, keys: Sequence[bytes]) -> list[tuple[bytes, ...]]:
        """The distinct chains ``keys`` were put with, in the order their keys first appear (unknown keys:
        none)."""
        with self._lock:
            found = [self._chains.get(key) for key in keys]
        return list({id(chain): chain for chain in found if chain is not None}.values())
