"""What each tier module declares about its medium, so adding a medium is one module and one registry entry.

A ``TierSpec`` says which ``StoreConfig`` settings turn the tier on and
size it, how to build it, whether what it holds survives the process, the
read bandwidth the planner assumes before it has measured one, and which
setting names its codec. ``kvstore/hierarchy.py`` lists the specs fastest
first; that order is the order of the hierarchy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvstore.config import StoreConfig
from kvstore.layout import KVLayout
from kvstore.tiers.base import Tier

# Read bandwidth (bytes/s) the planner assumes for a tier nobody declared a prior for.
DEFAULT_BANDWIDTH_PRIOR = 0.5e9


@dataclass(frozen=True)
class TierSpec:
    """One kind of tier: ``name`` (as in ``stats()``), its settings, how to build it, its medium's traits.

    ``wanted(config)``: whether the config asks for it (a size of 0 turns a
    tier off). ``admit_after(config)``: sightings before a block is written
    to it. ``bandwidth_prior``: bytes/s. ``codec_setting``: the config field
    naming its codec (None: it stores raw blocks in memory). ``check(layout, config)``
    raises a ``ValueError`` naming a setting the tier could not use (a file
    it reads at open); the store checks every wanted tier before it builds
    any, so a bad setting touches no tier.
    """

    name: str
    wanted: Callable[[StoreConfig], bool]
    build: Callable[[KVLayout, StoreConfig], Tier]
    persistent: bool
    bandwidth_prior: float
    admit_after: Callable[[StoreConfig], int] = lambda config: 1
    codec_setting: str | None = None
    check: Callable[[KVLayout, StoreConfig], None] = lambda layout, config: None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: expected a tier name, got an empty one")
        if not self.bandwidth_prior > 0:
            raise ValueError(f"bandwidth_prior: expected bytes/s > 0, got {self.bandwidth_prior!r}")
