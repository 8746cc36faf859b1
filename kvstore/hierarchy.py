"""The tiers a StoreConfig asks for, built fastest first, each with its placement policy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from kvstore.compression.registry import get_codec
from kvstore.config import StoreConfig
from kvstore.layout import KVLayout
from kvstore.placement import TierPolicy
from kvstore.tiers.base import Tier
from kvstore.tiers.device import DeviceTier
from kvstore.tiers.files import FilesTier
from kvstore.tiers.host import HostTier
from kvstore.tiers.lmdb import LmdbTier


class TierKind(NamedTuple):
    """How to build one kind of tier from the config, and whether the config asks for it."""

    wanted: Callable[[StoreConfig], bool]
    build: Callable[[KVLayout, StoreConfig], Tier]
    admit_after: Callable[[StoreConfig], int]


# Fastest first: the order of this registry is the order of the hierarchy.
TIER_KINDS: dict[str, TierKind] = {
    "device": TierKind(
        lambda c: c.device_bytes > 0,
        lambda layout, c: DeviceTier(layout, c.device_bytes, c.device),
        lambda c: 1,
    ),
    "host": TierKind(
        lambda c: c.host_bytes > 0,
        lambda layout, c: HostTier(layout, c.host_bytes),
        lambda c: 1,
    ),
    "lmdb": TierKind(
        lambda c: c.disk_dir is not None,
        lambda layout, c: LmdbTier(c.disk_dir, c.disk_bytes, layout, sync=c.disk_sync,
                                    codec=get_codec(c.disk_codec)),
        lambda c: c.disk_admit_after,
    ),
    "files": TierKind(
        lambda c: c.files_dir is not None,
        lambda layout, c: FilesTier(c.files_dir, c.files_bytes, layout, sync=c.files_sync,
                                     o_direct=c.files_o_direct, codec=get_codec(c.files_codec)),
        lambda c: c.files_admit_after,
    ),
    "remote": TierKind(
        lambda c: c.remote_url is not None,
        lambda layout, c: _remote_tier(layout, c),
        lambda c: c.remote_admit_after,
    ),
    "redis": TierKind(
        lambda c: c.redis_url is not None,
        lambda layout, c: _redis_tier(layout, c),
        lambda c: c.redis_admit_after,
    ),
}


def _remote_tier(layout: KVLayout, config: StoreConfig) -> Tier:
    from kvstore.tiers.remote import RemoteTier

    token = config.remote_token
    if token is None and config.remote_token_file is not None:
        token = Path(config.remote_token_file).read_text().strip()
    return RemoteTier(config.remote_url, layout, token, timeout_seconds=config.remote_timeout_seconds,
                      connections=config.remote_connections, codec=get_codec(config.remote_codec),
                      tls_ca_file=config.remote_tls_ca_file)


def _redis_tier(layout: KVLayout, config: StoreConfig) -> Tier:
    from kvstore.tiers.redis import RedisTier  # redis-py is imported only when a Redis tier is configured

    return RedisTier(config.redis_url, layout, namespace=config.redis_namespace, ttl_seconds=config.redis_ttl_seconds,
                     codec=get_codec(config.redis_codec), timeout_seconds=config.redis_timeout_seconds)


def build_tiers(layout: KVLayout, config: StoreConfig) -> list[Tier]:
    """The configured tiers, fastest first; if one fails to open, those already open are closed."""
    tiers: list[Tier] = []
    try:
        for kind in TIER_KINDS.values():
            if kind.wanted(config):
                tiers.append(kind.build(layout, config))
    except BaseException:
        for tier in tiers:
            tier.close()
        raise
    return tiers


def policies_for(tiers: Sequence[Tier], config: StoreConfig) -> list[TierPolicy]:
    """Each tier's placement policy from the config, found by tier name (unknown names get the defaults)."""
    policies = []
    for tier in tiers:
        kind = TIER_KINDS.get(tier.name)
        policies.append(TierPolicy(
            write=config.tier_write_policy(tier.name),
            admit_after=kind.admit_after(config) if kind is not None else 1,
            persistent=bool(getattr(tier, "persistent", False)),
        ))
    return policies
