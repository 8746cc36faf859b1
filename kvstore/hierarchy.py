"""The registry of tier kinds, fastest first, and building the tiers a StoreConfig asks for.

Each tier module declares its ``SPEC`` (``kvstore/tiers/spec.py``): adding a
medium is one module and one entry here.
"""

from __future__ import annotations

from kvstore.config import StoreConfig
from kvstore.layout import KVLayout
from kvstore.tiers import device, files, host, lmdb, redis, remote
from kvstore.tiers.base import Tier
from kvstore.tiers.spec import TierSpec

# Fastest first: the order of this registry is the order of the hierarchy.
TIER_SPECS: dict[str, TierSpec] = {spec.name: spec for spec in (
    device.SPEC, host.SPEC, lmdb.SPEC, files.SPEC, remote.SPEC, redis.SPEC)}


def build_tiers(layout: KVLayout, config: StoreConfig) -> list[Tier]:
    """The configured tiers, fastest first; if one fails to open, those already open are closed."""
    wanted = [spec for spec in TIER_SPECS.values() if spec.wanted(config)]
    for spec in wanted:
        spec.check(config)
    tiers: list[Tier] = []
    try:
        for spec in wanted:
            try:
                tiers.append(spec.build(layout, config))
            except ValueError as error:  # a codec this layout cannot take: name the setting that chose it
                if spec.codec_setting is None or not str(error).startswith("codec "):
                    raise
                raise ValueError(f"{spec.codec_setting}: {error}") from None
    except BaseException:
        for tier in tiers:
            tier.close()
        raise
    return tiers
