"""Placement: which tier a block goes to, when, and which tiers it is promoted into.

Every placement rule of the store lives here, so the tiers stay plain storage:

- A put lands in the fastest tier that takes it (synchronously).
- A lower tier with policy ``write_through`` gets every block once it has
  been seen ``admit_after`` times, written in the background (write-behind).
- A lower tier with policy ``write_back`` gets a block when the tier directly
  above it evicts it; on close, blocks held only in volatile tiers (device,
  host) go to the first persistent ``write_back`` tier.
- A hit in a lower tier is promoted into every faster tier (if ``promote``).
- Admission: a block is written to a tier only after ``admit_after``
  sightings (puts and read hits), counted by a TinyLFU-like sketch, so
  one-off blocks do not spend disk write bandwidth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvstore.admission import AdmissionFilter
from kvstore.config import WRITE_POLICIES

WRITE_THROUGH, WRITE_BACK = WRITE_POLICIES


@dataclass(frozen=True)
class TierPolicy:
    """How one tier receives blocks. ``persistent``: it survives the process (lmdb, files)."""

    write: str = WRITE_THROUGH
    admit_after: int = 1
    persistent: bool = False

    def __post_init__(self) -> None:
        if self.write not in WRITE_POLICIES:
            raise ValueError(f"write: expected one of {list(WRITE_POLICIES)}, got {self.write!r}")
        if isinstance(self.admit_after, bool) or not isinstance(self.admit_after, int) or self.admit_after < 1:
            raise ValueError(f"admit_after: expected an integer >= 1, got {self.admit_after!r}")


class Placement:
    """The placement decisions for tiers ordered fastest first (index 0 is the fastest)."""

    def __init__(self, policies: Sequence[TierPolicy], promote: bool = True):
        if not policies:
            raise ValueError("policies: expected at least one tier, got none")
        self.policies = tuple(policies)
        self.promote = promote
        needs_filter = any(p.admit_after > 1 for p in self.policies)
        self._filter = AdmissionFilter() if needs_filter else None
        self._write_through = tuple(  # asked once a block stored: worked out once here
            tuple(i for i in range(landed + 1, len(self.policies)) if self.policies[i].write == WRITE_THROUGH)
            for landed in range(len(self.policies)))

    @property
    def counting(self) -> bool:
        """True when some tier's admission needs more than one sighting (the sketch is in use)."""
        return self._filter is not None

    def sighted(self, key: bytes) -> int:
        """Count a sighting of ``key`` (a put or a read hit); returns its sightings so far."""
        return self._filter.record(key) if self._filter is not None else 1

    def sightings(self, key: bytes) -> int:
        """Sightings of ``key`` so far, without counting one more."""
        return self._filter.estimate(key) if self._filter is not None else 1

    def admits(self, tier: int, sightings: int) -> bool:
        return sightings >= self.policies[tier].admit_after

    def write_through(self, landed: int) -> tuple[int, ...]:
        """Tiers below ``landed`` that get a copy in the background as soon as it lands."""
        return self._write_through[landed]

    def on_evict(self, tier: int) -> int | None:
        """The tier that receives a block evicted from ``tier`` (write-back), if any."""
        below = tier + 1
        if below < len(self.policies) and self.policies[below].write == WRITE_BACK:
            return below
        return None

    def promote_into(self, hit: int) -> list[int]:
        """Faster tiers a block found in tier ``hit`` is copied into."""
        return list(range(hit)) if self.promote else []

    def on_close(self) -> int | None:
        """The persistent tier that keeps blocks only volatile tiers hold when the store closes."""
        for i, policy in enumerate(self.policies):
            if policy.persistent and policy.write == WRITE_BACK:
                return i
        return None
