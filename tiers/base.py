"""The protocol every storage tier implements, and helpers they share."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch

from kvstore.blockformat import HEADER_BYTES, BlockHeader
from kvstore.compression.stored import CORRUPT, BlockEncoding
from kvstore.metrics import Counters

# Counters every tier reports in ``stats()``.
TIER_COUNTERS = ("hits", "misses", "bytes_read", "bytes_written", "blocks_written",
                 "evictions", "rejected", "corrupt")


@runtime_checkable
class Tier(Protocol):
    """A storage medium for KV blocks, addressed by prefix-chained key.

    Blocks travel as canonical tensors ``[L, P, tokens, H, D]`` (a view into a
    caller's buffer may be strided). A tier never raises on a miss or on a
    damaged block: ``get_into`` returns False and the event is counted.
    """

    name: str

    @property
    def capacity_bytes(self) -> int: ...

    def used_bytes(self) -> int: ...

    def contains(self, key: bytes) -> bool: ...

    def put_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> int:
        """Store blocks; returns how many are stored afterwards (already present counts)."""
        ...

    def get_into(self, key: bytes, out: torch.Tensor) -> bool:
        """Copy block ``key`` into ``out`` (its shape says how many tokens); False on a miss."""
        ...

    def delete(self, key: bytes) -> bool: ...

    def keys(self) -> Iterator[bytes]:
        """Stored keys, least recently used first."""
        ...

    def stats(self) -> dict[str, int]: ...

    def close(self) -> None: ...


def tier_stats(counters: Counters, blocks: int, used_bytes: int, capacity_bytes: int) -> dict[str, int]:
    """The ``stats()`` every tier returns: its counters plus blocks held, bytes used and byte capacity."""
    snapshot = counters.snapshot()
    snapshot.update(blocks=blocks, used_bytes=used_bytes, capacity_bytes=capacity_bytes)
    return snapshot



def decode_blob(encoding: BlockEncoding, key: bytes, fingerprint: bytes, blob: object, out: torch.Tensor) -> str:
    """Verdict of a stored blob (integrity header, then payload) read for ``key``: ``INTACT`` only if its
    header names ``key`` and ``fingerprint``, its checksum holds and ``encoding`` decoded it into ``out``."""
    header = BlockHeader.unpack(blob)
    payload = memoryview(blob)[HEADER_BYTES:]
    if header is None or not header.verifies(key, fingerprint, payload):
        return CORRUPT
    return encoding.decode_into(payload, out, header.encoding)
