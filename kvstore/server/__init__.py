"""The cache server (``kvstore serve``): one BlobStore shared by engines over a binary protocol.

``docs/protocol.md`` specifies the protocol; ``kvstore/client.py`` and
``tiers/remote.py`` are the client side.
"""

from kvstore.server.app import CacheServer
from kvstore.server.auth import Authenticator, Tenant, load_tenants
from kvstore.server.config import ServerConfig
from kvstore.server.serve import run

__all__ = ["Authenticator", "CacheServer", "ServerConfig", "Tenant", "load_tenants", "run"]
