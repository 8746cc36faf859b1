"""kvstore: a tiered, prefix-deduplicated KV-cache store for LLM serving engines."""

from kvstore.config import StoreConfig
from kvstore.keys import BlockRef, KeyChain
from kvstore.layout import KVLayout
from kvstore.pending import FillError
from kvstore.sizes import parse_size
from kvstore.store import KVStore

__version__ = "0.1.0"

__all__ = ["BlockRef", "FillError", "KVLayout", "KVStore", "KeyChain", "StoreConfig", "parse_size", "__version__"]
