"""kvstore: a tiered, prefix-deduplicated KV-cache store for LLM serving engines."""

from kvstore.aio import AsyncKVStore
from kvstore.config import StoreConfig
from kvstore.keys import BlockRef, KeyChain
from kvstore.layerwise import LayerLoader, LayerSaver
from kvstore.layout import KVLayout
from kvstore.pending import FillError
from kvstore.planner import LoadPlan
from kvstore.prefetch import PrefetchHandle
from kvstore.sizes import parse_size
from kvstore.store import KVStore
from kvstore.tiers.base import Capability, Tier

__version__ = "0.1.0"

__all__ = ["AsyncKVStore", "BlockRef", "Capability", "FillError", "KVLayout", "KVStore", "KeyChain", "LayerLoader",
           "LayerSaver", "LoadPlan", "PrefetchHandle", "StoreConfig", "Tier", "parse_size", "__version__"]
