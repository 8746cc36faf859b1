"""bitpack: b-bit codes (b = 1..8) packed densely into bytes and back, exactly."""

from __future__ import annotations

import math

import pytest
import torch

from kvstore.compression.bitpack import pack, packed_bytes, unpack

ALL_BITS = list(range(1, 9))
GOOD_BITS = list(range(1, 9))


def group_of(bits: int) -> int:
    return 8 // math.gcd(8, bits)


def codes(count: int, bits: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (count,), generator=gen, dtype=torch.int64).to(torch.uint8)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_round_trip_is_exact_for_every_width(bits):
    for count in (0, 1, 2, 3, 7, 8, 9, 15, 17, 63, 64, 65, 1001):
        original = codes(count, bits, seed=count)
        packed = pack(original, bits)
        assert packed.dtype == torch.uint8 and packed.dim() == 1
        assert packed.numel() == packed_bytes(count, bits), (bits, count)
        back = unpack(packed, bits, count)
        assert back.dtype == torch.uint8
        assert torch.equal(back, original), (bits, count)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_extreme_codes_survive(bits):
    """All zeros, all ones (the largest code) and alternating extremes: every bit position is exercised."""
    top = (1 << bits) - 1
    for pattern in ([0] * 24, [top] * 24, [top, 0] * 12, [0, top, top] * 8, list(range(1 << bits)) * 3):
        original = torch.tensor(pattern, dtype=torch.uint8)
        assert torch.equal(unpack(pack(original, bits), bits, original.numel()), original), (bits, pattern)


@pytest.mark.parametrize("bits", GOOD_BITS)
def test_codes_of_any_shape_are_flattened(bits):
    original = codes(3 * 5 * 7, bits).view(3, 5, 7)
    packed = pack(original, bits)
    assert packed.numel() == packed_bytes(105, bits)
    assert torch.equal(unpack(packed, bits, 105), original.reshape(-1))


@pytest.mark.parametrize("bits", GOOD_BITS)
def test_padding_of_a_partial_group_is_zero_and_layout_is_little_endian(bits):
    """Code i of a group sits at bit ``bits * i`` of a little-endian word; the pad codes are zero."""
    group = group_of(bits)
    for count in range(1, 2 * group + 1):
        original = codes(count, bits, seed=count)
        packed = pack(original, bits)
        padded = torch.cat((original, original.new_zeros(-count % group))).tolist()
        word_bytes = group * bits // 8
        expected = bytearray()
        for start in range(0, len(padded), group):
            word = sum(code << (bits * i) for i, code in enumerate(padded[start:start + group]))
            expected += word.to_bytes(word_bytes, "little")
        assert bytes(packed.tolist()) == bytes(expected), (bits, count)


def test_packed_bytes_exact_values():
    # 8 codes of 3 bits are 24 bits: 3 bytes; a 9th code starts a new 8-code group.
    assert packed_bytes(8, 3) == 3
    assert packed_bytes(9, 3) == 6
    assert packed_bytes(1, 3) == 3
    assert packed_bytes(0, 3) == 0
    # 4 bits: two codes a byte, odd counts round up.
    assert [packed_bytes(n, 4) for n in (0, 1, 2, 3, 4, 5)] == [0, 1, 1, 2, 2, 3]
    # 2 bits: four codes a byte; 1 bit: eight.
    assert [packed_bytes(n, 2) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    assert [packed_bytes(n, 1) for n in (0, 1, 8, 9, 16, 17)] == [0, 1, 1, 2, 2, 3]
    # 5 and 7 bits: groups of 8 codes in 5 / 7 bytes; 6 bits: 4 codes in 3 bytes.
    assert packed_bytes(8, 5) == 5 and packed_bytes(9, 5) == 10
    assert packed_bytes(8, 7) == 7 and packed_bytes(1, 7) == 7
    assert packed_bytes(4, 6) == 3 and packed_bytes(5, 6) == 6
    # 8 bits: a byte a code, no padding.
    assert [packed_bytes(n, 8) for n in (0, 1, 7, 1000)] == [0, 1, 7, 1000]


@pytest.mark.parametrize("bits", range(1, 9))
def test_packed_bytes_formula(bits):
    group = group_of(bits)
    for count in range(0, 50):
        assert packed_bytes(count, bits) == math.ceil(count / group) * group * bits // 8
        assert packed_bytes(count, bits) >= math.ceil(count * bits / 8)  # never fewer bits than the codes


@pytest.mark.parametrize("bits", [0, 9, 16, -1])
def test_bad_bit_width_is_a_value_error(bits):
    with pytest.raises(ValueError, match="bits"):
        packed_bytes(4, bits)
    with pytest.raises(ValueError, match="bits"):
        pack(torch.zeros(4, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="bits"):
        unpack(torch.zeros(4, dtype=torch.uint8), bits, 4)


@pytest.mark.parametrize("bits", GOOD_BITS)
def test_wrong_packed_length_is_a_value_error(bits):
    packed = pack(codes(17, bits), bits)
    with pytest.raises(ValueError, match="packed"):
        unpack(packed[:-1], bits, 17)
    with pytest.raises(ValueError, match="packed"):
        unpack(torch.cat((packed, packed.new_zeros(1))), bits, 17)
    with pytest.raises(ValueError, match="packed"):
        unpack(packed, bits, 17 + 8 * group_of(bits))  # a count that needs more groups
    with pytest.raises(ValueError, match="packed"):
        unpack(torch.empty(0, dtype=torch.uint8), bits, 1)


def test_empty_round_trip():
    for bits in range(1, 9):
        packed = pack(torch.empty(0, dtype=torch.uint8), bits)
        assert packed.numel() == 0
        assert unpack(packed, bits, 0).numel() == 0
