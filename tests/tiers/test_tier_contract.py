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


def test_put_keeping_evicts_none_of_the_blocks_kept(tier, layout):
    """``put_keeping`` of a prompt's tail evicts none of its head (``keep``): a head stored already was the
    least recently used and went to its own tail, which no lookup then reached. What finds no room beside
    the kept blocks is rejected; anything else is evicted as ever, the oldest first."""
    blocks = make_blocks(layout)
    tier.put_many([(A, blocks[A])])
    tier.put_many([(B, blocks[B])])
    tier.put_many([(C, blocks[C])])
    assert tier.put_keeping([(D, blocks[D])], None, {A, B}) == 1  # C, the only block not kept, goes
    assert names(tier) == ["A", "B", "D"]
    assert tier.put_keeping([(C, blocks[C])], None, {A, B, D}) == 0  # no room beside them: rejected
    assert names(tier) == ["A", "B", "D"]
    stats = tier.stats()
    assert (stats["evictions"], stats["rejected"]) == (1, 1)
    assert stats["used_bytes"] <= stats["capacity_bytes"]
    for key in (A, B, D):
        assert_same_kv(read(tier, layout, key), blocks[key])


def test_put_keeping_takes_no_approximate_bytes_below_memory(tier, layout):
    if isinstance(tier, HostTier):
        pytest.skip("memory slots hold approximate bytes, marked")
    with pytest.raises(ValueError, match="lossy: expected None"):
        tier.put_keeping([(A, make_blocks(layout)[A])], "kivi4", ())
    assert names(tier) == []
