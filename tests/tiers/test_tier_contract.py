"""Behaviour every tier shares, run against each real tier."""

from __future__ import annotations

import pytest

from conftest import assert_same_kv
from kvstore.blockformat import HEADER_BYTES
from kvstore.tiers.files import FilesTier
from kvstore.tiers.host import HostTier
from kvstore.tiers.lmdb import LmdbTier
from tierkit import A, B, C, D, make_blocks, names, read

# Each factory makes a tier with room for exactly three tiny blocks.
FACTORIES = {
    "host": lambda layout, path: HostTier(layout, 3 * layout.block_bytes, pin_memory=False),
    "lmdb": lambda layout, path: LmdbTier(path, 3 * (layout.block_bytes + HEADER_BYTES), layout, sync=False),
    "lmdb-fsync": lambda layout, path: LmdbTier(path, 3 * (layout.block_bytes + HEADER_BYTES), layout, sync=True),
    "files": lambda layout, path: FilesTier(path, 3 * (layout.block_bytes + HEADER_BYTES), layout, sync=False),
}


@pytest.fixture(params=sorted(FACTORIES))
def tier(request, layout, disk_dir):
    made = FACTORIES[request.param](layout, disk_dir)
    yield made
    made.close()


def test_exact_lru_eviction_order(tier, layout):
    blocks = make_blocks(layout)
    for key in (A, B, C):
        assert tier.put_many([(key, blocks[key])]) == 1
    assert names(tier) == ["A", "B", "C"]
    assert_same_kv(read(tier, layout, A), blocks[A])
    assert names(tier) == ["B", "C", "A"]
    assert tier.put_many([(D, blocks[D])]) == 1
    assert names(tier) == ["C", "A", "D"]
    assert not tier.contains(B)
    assert read(tier, layout, B) is None
    for key in (C, A, D):
        assert_same_kv(read(tier, layout, key), blocks[key])
    stats = tier.stats()
    assert (stats["evictions"], stats["blocks"], stats["hits"], stats["misses"]) == (1, 3, 4, 1)
    assert stats["used_bytes"] <= stats["capacity_bytes"]
