"""Storage tiers, one medium per module: host RAM (``host``), local NVMe via LMDB (``lmdb``)."""

from kvstore.tiers.base import Tier
from kvstore.tiers.host import HostTier
from kvstore.tiers.lmdb import DirectoryInUseError, LmdbTier

__all__ = ["DirectoryInUseError", "HostTier", "LmdbTier", "Tier"]
