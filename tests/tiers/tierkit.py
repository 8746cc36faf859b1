"""Helpers the tier tests share: five named keys, their blocks, and reads into a fresh buffer."""

from __future__ import annotations

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
