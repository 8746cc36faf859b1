"""Helpers the tier tests share: five named keys, their blocks, and reads into a fresh buffer."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from conftest import make_kv

A, B, C, D, E = (bytes([ord(c)]) * 32 for c in "ABCDE")
NAMES = {A: "A", B: "B", C: "C", D: "D", E: "E"}


def names(tier) -> list:
    """The tier's keys, least recently used first, as letters."""
    return [NAMES.get(k, k) for k in tier.keys()]


def read(tier, layout, key, tokens=16):
    """The block ``key`` as a new tensor, or None on a miss."""
    out = torch.zeros(layout.shape(tokens), dtype=layout.dtype)
    return out if tier.get_into(key, out) else None


def make_blocks(layout) -> dict:
    """A distinct full block of KV per key."""
    return {key: make_kv(layout, 16, seed=i) for i, key in enumerate((A, B, C, D, E))}


def block_path(root, key: bytes) -> str:
    """Where a files tier rooted at ``root`` keeps block ``key``."""
    h = key.hex()
    return os.path.join(str(root), h[:2], h + ".kvb")


@contextmanager
def files_tiers(disk_dir, layout, default_capacity: int) -> Iterator:
    """``factory(capacity, path=disk_dir, lay=layout, **options)``: FilesTiers (sync off unless asked),
    all closed on exit."""
    from kvstore.tiers.files import FilesTier

    tiers = []

    def factory(capacity=default_capacity, path=None, lay=None, **options):
        options.setdefault("sync", False)
        tier = FilesTier(path or disk_dir, capacity, lay or layout, **options)
        tiers.append(tier)
        return tier

    try:
        yield factory
    finally:
        for tier in tiers:
            tier.close()
