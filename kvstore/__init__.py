"""kvstore: a tiered, prefix-deduplicated KV-cache store for LLM serving engines.

The public names are imported when first used (PEP 562), so ``import
kvstore`` costs nothing: the ``kvstore`` command's entry point
(``kvstore.console``) can then catch a Ctrl-C that lands while torch is
still being imported (it printed a traceback).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Each public name -> the module that defines it.
_EXPORTS = {
    "AsyncKVStore": "kvstore.aio",
    "BlockRef": "kvstore.keys",
    "Capability": "kvstore.tiers.base",
    "FillError": "kvstore.pending",
    "KVLayout": "kvstore.layout",
    "KVStore": "kvstore.store",
    "KeyChain": "kvstore.keys",
    "LayerLoader": "kvstore.layerwise",
    "LayerSaver": "kvstore.layerwise",
    "LoadPlan": "kvstore.planner",
    "PrefetchHandle": "kvstore.prefetch",
    "StoreConfig": "kvstore.config",
    "Tier": "kvstore.tiers.base",
    "parse_size": "kvstore.sizes",
}

__all__ = [*sorted(_EXPORTS, key=str.lower), "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
