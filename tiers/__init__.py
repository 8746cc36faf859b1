"""Storage tiers, one medium per module, fastest first: HBM (``device``), host RAM (``host``),
local NVMe via LMDB (``lmdb``), shared storage (``files``), a ``kvstore serve`` cache server
(``remote``) and Redis/Valkey (``redis``). ``slots`` is the pool the first two share."""

from kvstore.tiers.base import Tier
from kvstore.tiers.device import DeviceTier
from kvstore.tiers.files import FilesTier
from kvstore.tiers.host import HostTier
from kvstore.tiers.lmdb import DirectoryInUseError, LmdbTier
from kvstore.tiers.redis import RedisTier
from kvstore.tiers.remote import RemoteTier

__all__ = ["DeviceTier", "DirectoryInUseError", "FilesTier", "HostTier", "LmdbTier", "RedisTier", "RemoteTier",
           "Tier"]
