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

# Keys remembered at most, and keys held by the distinct chains they point to: a chain stays alive while
# one of its keys is remembered, so 16,384 prompts of 257 blocks sharing a 256-block head held 4.2 million
# references (about 0.5 GiB with the keys' own bytes) under a bound of 16,384 keys.
MAX_KEYS = 1 << 14
MAX_HELD = 1 << 16


class ChainMemo:
    """A bounded, thread-safe map from a block's key to the keys of the prompt it was last put with."""

    def __init__(self, max_keys: int = MAX_KEYS, max_held: int = MAX_HELD):
        if max_keys < 1 or max_held < 1:
            raise ValueError(f"max_keys, max_held: expected >= 1, got {max_keys} and {max_held}")
        self._max_keys = max_keys
        self._max_held = max_held
        self._chains: OrderedDict[bytes, tuple[bytes, ...]] = OrderedDict()
        self._users: dict[int, int] = {}  # id of a remembered chain -> its keys that point to it
        self._held = 0  # keys of the distinct remembered chains
        self._lock = threading.Lock()

    def remember(self, chain: Sequence[bytes]) -> None:
        """``chain``, a prompt's block keys in order, was just put (the oldest keys are forgotten past the
        bounds; a chain longer than ``max_held`` is not remembered)."""
        chain = tuple(list(chain))  # a new tuple, always: its id names it in ``_users``
        with self._lock:
            if not chain or len(chain) > self._max_held:
                for key in chain:  # not remembered: its keys no longer name an older chain either
                    old = self._chains.pop(key, None)
                    if old is not None:
                        self._drop_user(old)
                return
            self._held += len(chain)
            self._users[id(chain)] = 0
            for key in chain:
                old = self._chains.get(key)
                if old is chain:  # a key twice in one chain
                    self._chains.move_to_end(key)
                    continue
                if old is not None:
                    self._drop_user(old)
                self._chains[key] = chain
                self._chains.move_to_end(key)
                self._users[id(chain)] += 1
            while len(self._chains) > self._max_keys or self._held > self._max_held:
                _, old = self._chains.popitem(last=False)
                self._drop_user(old)

    def _drop_user(self, chain: tuple[bytes, ...]) -> None:
        users = self._users[id(chain)] - 1
        if users:
            self._users[id(chain)] = users
        else:
            del self._users[id(chain)]
            self._held -= len(chain)

    def held(self) -> int:
        """Keys held by the distinct chains remembered (the memory bound, in keys)."""
        with self._lock:
            return self._held

    def chains_of(self, keys: Sequence[bytes]) -> list[tuple[bytes, ...]]:
        """The distinct chains ``keys`` were put with, in the order their keys first appear (unknown keys:
        none)."""
        with self._lock:
            found = [self._chains.get(key) for key in keys]
        return list({id(chain): chain for chain in found if chain is not None}.values())
