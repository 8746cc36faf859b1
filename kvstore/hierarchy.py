"""The registry of tier kinds, fastest first, and building the tiers a StoreConfig asks for.

Each tier module declares its ``SPEC`` (``kvstore/tiers/spec.py``): adding a
medium is one module and one entry here.
"""

from __future__ import annotations

from kvstore.compression import get_codec
from kvstore.compression.stored import BlockEncoding
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
        spec.check(layout, config)
        _check_codec(spec, layout, config)
    tiers: list[Tier] = []
    try:
        for spec in wanted:
            tiers.append(spec.build(layout, config))
    except BaseException:
        for tier in tiers:
            tier.close()
        raise
    return tiers


def _check_codec(spec: TierSpec, layout: KVLayout, config: StoreConfig) -> None:
    """A codec this layout cannot take is a ``ValueError`` naming the setting that chose it, raised before
    any tier is opened (an LMDB environment, a files directory and the host pool were made before it)."""
    if spec.codec_setting is None:
        return
    try:
        BlockEncoding(layout, get_codec(getattr(config, spec.codec_setting)))
    except ValueError as error:
        raise ValueError(f"{spec.codec_setting}: {error}") from None
