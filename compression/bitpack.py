"""Packing b-bit codes (b = 1..8) densely into bytes, and back, with vectorized torch ops.

Codes are taken in groups of ``8 / gcd(8, b)`` (2 codes per byte at 4 bits,
8 codes per 3 bytes at 3 bits); the flat code count is padded with zeros to a
whole group, so ``packed_bytes(n, b) = ceil(n / group) * group * b / 8``.
Within a group, code ``i`` sits at bit ``b * i`` of a little-endian word.
"""

from __future__ import annotations

import math
import sys

import torch

_LITTLE_ENDIAN = sys.byteorder == "little"


def _group(bits: int) -> int:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits: expected 1 to 8, got {bits}")
    return 8 // math.gcd(8, bits)


def packed_bytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take once packed."""
    group = _group(bits)
    return -(-count // group) * bits * group // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat uint8 tensor of ``codes`` (uint8, each < 2**bits) packed ``bits`` bits apiece."""
    group = _group(bits)
    flat = codes.reshape(-1)
    pad = -flat.numel() % group
    if pad:
        flat = torch.cat((flat, flat.new_zeros(pad)))
    if bits == 8:
        return flat
    if bits == 4 and _LITTLE_ENDIAN:  # pairs of codes read as one int16: half the passes of the generic path
        pairs = flat.view(torch.int16)
        return ((pairs & 0x0F) | ((pairs >> 4) & 0xF0)).to(torch.uint8)
    grouped = flat.view(-1, group)
    if bits * group == 8:  # 1, 2 or 4 bits: the group fits one byte
        word = grouped[:, 0].clone()
        for i in range(1, group):
            word |= grouped[:, i] << (bits * i)
        return word
    width = bits * group // 8  # bytes per group: 3 at 3 and 6 bits, 5 at 5 bits, 7 at 7 bits
    word = grouped[:, 0].to(torch.int64)
    for i in range(1, group):
        word |= grouped[:, i].to(torch.int64) << (bits * i)
    out = torch.empty((word.numel(), width), dtype=torch.uint8, device=codes.device)
    for j in range(width):
        out[:, j] = (word >> (8 * j)) & 0xFF
    return out.view(-1)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` codes (flat uint8) of ``packed``; the inverse of ``pack``."""
    group = _group(bits)
    if packed.numel() != packed_bytes(count, bits):
        raise ValueError(f"packed: expected {packed_bytes(count, bits)} bytes for {count} {bits}-bit codes, "
                         f"got {packed.numel()}")
    if bits == 8:
        return packed[:count]
    mask = (1 << bits) - 1
    if bits * group == 8:
        parts = [(packed >> (bits * i)) & mask for i in range(group)]
    else:
        width = bits * group // 8
        byte_groups = packed.view(-1, width)
        word = byte_groups[:, 0].to(torch.int64)
        for j in range(1, width):
            word |= byte_groups[:, j].to(torch.int64) << (8 * j)
        parts = [((word >> (bits * i)) & mask).to(torch.uint8) for i in range(group)]
    return torch.stack(parts, dim=1).view(-1)[:count]
