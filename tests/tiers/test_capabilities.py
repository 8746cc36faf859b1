"""Tier capabilities are declared by the tier's class and checked once, when a store opens."""

from __future__ import annotations

import pytest
import torch

from conftest import make_kv, make_tokens, tiny_layout
from kvstore import Capability, KVStore, StoreConfig
from kvstore.hierarchy import TIER_SPECS
from kvstore.tiers.base import declared_capabilities
from kvstore.tiers.files import FilesTier
from kvstore.tiers.host import HostTier
from kvstore.tiers.lmdb import LmdbTier

LAYOUT = tiny_layout()


class MisspeltSlots(HostTier):
    """Declares a slot pool but its pin method is misspelt: the store must refuse it, not run it slowly."""

    def __getattribute__(self, name: str):
        if name == "pinned_marked":
            raise AttributeError(name)
        return super().__getattribute__(name)


class PlainDict:
    """A minimal custom tier that declares nothing: a plain Tier the store uses without pins or batches."""

    name = "dict"
    persistent = False
    capacity_bytes = 1 << 20
    layout = LAYOUT

    def __init__(self):
        self.blocks: dict[bytes, torch.Tensor] = {}

    def used_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks.values())

    def contains(self, key: bytes) -> bool:
        return key in self.blocks

    def put_many(self, items) -> int:
        for key, block in items:
            self.blocks[key] = block.detach().clone()
        return len(items)

    def get_into(self, key: bytes, out: torch.Tensor) -> bool:
        block = self.blocks.get(key)
        if block is None or block.shape != out.shape:
            return False
        out.copy_(block)
        return True

    def delete(self, key: bytes) -> bool:
        return self.blocks.pop(key, None) is not None

    def keys(self):
        return iter(list(self.blocks))

    def stats(self) -> dict[str, int]:
        return {"blocks": len(self.blocks)}

    def close(self) -> None:
        self.blocks.clear()


def test_real_tiers_declare_what_they_implement(tmp_path):
    host = HostTier(LAYOUT, 2 * LAYOUT.block_bytes)
    lmdb = LmdbTier(tmp_path / "lmdb", 8 * LAYOUT.block_bytes, LAYOUT)
    files = FilesTier(tmp_path / "files", 8 * LAYOUT.block_bytes, LAYOUT)
    try:
        assert declared_capabilities(host) == Capability.SLOTS | Capability.EVICTS | Capability.CHAINS
        assert declared_capabilities(lmdb) == Capability.EVICTS | Capability.ENCODED | Capability.CHAINS
        assert declared_capabilities(files) == Capability.ENCODED | Capability.RUNS | Capability.CHAINS
    finally:
        for tier in (host, lmdb, files):
            tier.close()
    assert list(TIER_SPECS) == ["device", "host", "lmdb", "files", "remote", "redis"]  # fastest first
    assert [spec.persistent for spec in TIER_SPECS.values()] == [False, False, True, True, True, True]


def test_a_tier_that_lacks_a_declared_member_is_refused_at_open():
    with pytest.raises(ValueError, match="declares SLOTS but lacks \\['pinned_marked'\\]"):
        KVStore(LAYOUT, StoreConfig(model_id="m"), tiers=[MisspeltSlots(LAYOUT, 2 * LAYOUT.block_bytes)])


def test_an_object_that_is_no_tier_is_refused_at_open():
    class NoTier:
        name = "x"

    with pytest.raises(ValueError, match="expected the Tier protocol .* without \\['persistent'"):
        KVStore(LAYOUT, StoreConfig(model_id="m"), tiers=[NoTier()])


@pytest.mark.parametrize("kind", ["host", "lmdb", "files"])
@pytest.mark.parametrize("other", [dict(dtype=torch.bfloat16), dict(num_layers=1), dict(head_dim=8, dtype=torch.float32),
                                   dict(block_tokens=8), dict(tp_rank=1, tp_size=2)])
def test_a_tier_made_for_another_layout_is_refused_at_open(tmp_path, kind, other):
    """A host tier made for bf16 took a store's fp16 blocks of the same size and gave back other bytes; one made
    for fewer layers promised blocks it could not return. Nothing is written to it."""
    layout = tiny_layout(**other)
    tier = {"host": lambda: HostTier(layout, 8 * layout.block_bytes),
            "lmdb": lambda: LmdbTier(tmp_path / "lmdb", 1 << 20, layout),
            "files": lambda: FilesTier(tmp_path / "files", 1 << 20, layout)}[kind]()
    try:
        with pytest.raises(ValueError, match=f"tier '{tier.name}': expected a tier of the store's layout "
                                             f"\\(kvstore-layout.*\\), got one of kvstore-layout"):
            KVStore(LAYOUT, StoreConfig(model_id="m"), tiers=[HostTier(LAYOUT, 4 * LAYOUT.block_bytes), tier])
        assert tier.used_bytes() == 0 and list(tier.keys()) == []
    finally:
        tier.close()


def test_one_tier_given_twice_is_refused_at_open():
    tier = HostTier(LAYOUT, 4 * LAYOUT.block_bytes)
    with pytest.raises(ValueError, match="tiers: expected each tier once, got tier 'host' twice"):
        KVStore(LAYOUT, StoreConfig(model_id="m"), tiers=[tier, tier])


def test_a_custom_tier_declaring_nothing_serves_exact_bytes():
    tokens, kv = make_tokens(40), make_kv(LAYOUT, 40)
    with KVStore(LAYOUT, StoreConfig(model_id="m"), tiers=[PlainDict()]) as store:
        assert store.put(tokens, kv) == 3
        assert store.lookup(tokens) == 40
        assert torch.equal(store.get(tokens), kv)
        with store.prefetch(tokens) as handle:
            assert handle.wait(5) == 40 and handle.views() == []  # nothing to pin: ready where it is
        assert torch.equal(store.load(tokens), kv)
        assert store.stats()["tiers"]["dict"]["errors"] == 0
