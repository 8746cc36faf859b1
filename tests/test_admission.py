"""AdmissionFilter: a count-min sketch that counts block sightings, never under-counts, and fades."""

from __future__ import annotations

import random
import struct

import pytest

from kvstore.admission import MAX_COUNT, AdmissionFilter


def rand_key(rng: random.Random) -> bytes:
    return rng.randbytes(32)


def key_of(*words: int) -> bytes:
    """A 32-byte key whose four 4-byte row indices (little endian) are ``words``."""
    assert len(words) == 4
    return struct.pack("<4I", *words) + bytes(16)


def test_fresh_key_counts_up_by_exactly_one():
    sketch = AdmissionFilter()
    rng = random.Random(1)
    key, other = rand_key(rng), rand_key(rng)
    assert sketch.estimate(key) == 0
    for n in range(1, 21):
        assert sketch.record(key) == n
        assert sketch.estimate(key) == n
    assert sketch.estimate(other) == 0  # a wide sketch: no collision with the counted key
    assert sketch.record(other) == 1
    assert sketch.estimate(key) == 20  # counting another key leaves it alone


def test_estimate_is_not_changed_by_estimating():
    sketch = AdmissionFilter()
    key = rand_key(random.Random(2))
    sketch.record(key)
    for _ in range(5):
        assert sketch.estimate(key) == 1


@pytest.mark.parametrize("width", [256, 1 << 16])
def test_never_under_counts(width):
    rng = random.Random(width)
    truth = {rand_key(rng): rng.randint(1, 8) for _ in range(5000)}
    sketch = AdmissionFilter(width=width, sample=10**9)  # no halving during the test
    sightings = [key for key, count in truth.items() for _ in range(count)]
    rng.shuffle(sightings)
    for key in sightings:
        assert sketch.record(key) >= 1
    under = [(key, count, sketch.estimate(key)) for key, count in truth.items() if sketch.estimate(key) < count]
    assert under == []
    if width == 1 << 16:
        # 5000 keys in 65536 counters per row: nearly every estimate is exact.
        exact = sum(sketch.estimate(key) == count for key, count in truth.items())
        assert exact >= 0.98 * len(truth), exact


def test_saturates_at_255():
    sketch = AdmissionFilter(width=64, sample=10**6)
    key = rand_key(random.Random(3))
    results = [sketch.record(key) for _ in range(300)]
    assert results[:MAX_COUNT] == list(range(1, MAX_COUNT + 1))
    assert results[MAX_COUNT:] == [MAX_COUNT] * (300 - MAX_COUNT)
    assert MAX_COUNT == 255
    assert sketch.estimate(key) == 255


def test_halves_after_sample_records():
    sketch = AdmissionFilter(width=1024, sample=8)
    hot, warm = key_of(1, 2, 3, 4), key_of(5, 6, 7, 8)
    for _ in range(5):
        sketch.record(hot)
    for _ in range(2):
        sketch.record(warm)
    assert (sketch.estimate(hot), sketch.estimate(warm)) == (5, 2)  # 7 records so far
    sketch.record(warm)  # the 8th record: every counter is halved
    assert (sketch.estimate(hot), sketch.estimate(warm)) == (2, 1)
    for _ in range(7):
        sketch.record(hot)
    assert sketch.estimate(hot) == 9
    sketch.record(hot)  # 8 more records: halved again
    assert (sketch.estimate(hot), sketch.estimate(warm)) == (5, 0)


def test_halving_lets_old_popularity_fade():
    sketch = AdmissionFilter(width=1024, sample=100)
    old = key_of(9, 9, 9, 9)
    for _ in range(60):
        sketch.record(old)
    rng = random.Random(4)
    for _ in range(500):  # five halvings of traffic that never touches ``old``
        sketch.record(key_of(*(rng.randrange(10, 1024) for _ in range(4))))
    assert sketch.estimate(old) <= 60 >> 4


@pytest.mark.parametrize("length", [0, 1, 15])
def test_short_key_rejected(length):
    sketch = AdmissionFilter()
    with pytest.raises(ValueError) as info:
        sketch.record(b"k" * length)
    assert str(info.value) == f"key: expected at least 16 bytes, got {length}"
    with pytest.raises(ValueError):
        sketch.estimate(b"k" * length)


def test_sixteen_byte_key_is_enough():
    sketch = AdmissionFilter()
    assert sketch.record(b"0123456789abcdef") == 1
    assert sketch.estimate(b"0123456789abcdef") == 1


@pytest.mark.parametrize("width", [0, -5])
def test_width_below_one_rejected(width):
    with pytest.raises(ValueError) as info:
        AdmissionFilter(width=width)
    assert str(info.value).startswith("width:")
    assert str(width) in str(info.value)


def test_width_rounds_up_to_power_of_two():
    # 1000 counters become 1024: row indices equal mod 1024 share a counter, mod 512 do not.
    sketch = AdmissionFilter(width=1000, sample=10**6)
    for _ in range(3):
        sketch.record(key_of(7, 7, 7, 7))
    assert sketch.estimate(key_of(7 + 1024, 7 + 2048, 7 + 1024 * 5, 7 + 1024 * 100)) == 3
    assert sketch.estimate(key_of(7 + 512, 7 + 512, 7 + 512, 7 + 512)) == 0
    # Index 1000 is a real counter (a width of exactly 1000 could not hold it) of its own.
    assert sketch.estimate(key_of(1000, 1000, 1000, 1000)) == 0
    assert sketch.record(key_of(1000, 1000, 1000, 1000)) == 1
    assert sketch.estimate(key_of(7, 7, 7, 7)) == 3


def test_width_one_is_one_counter_per_row():
    sketch = AdmissionFilter(width=1, sample=10**6)
    rng = random.Random(5)
    keys = [rand_key(rng) for _ in range(4)]
    for n, key in enumerate(keys, start=1):
        assert sketch.record(key) == n  # every key shares the one counter
    assert all(sketch.estimate(key) == 4 for key in keys)


def test_one_row_collision_does_not_inflate():
    # Two keys that share a counter in only one row: the minimum over rows keeps both exact.
    sketch = AdmissionFilter(width=1024, sample=10**6)
    a, b = key_of(1, 2, 3, 4), key_of(1, 20, 30, 40)
    for _ in range(6):
        sketch.record(a)
    assert sketch.estimate(b) == 0
    sketch.record(b)
    assert (sketch.estimate(a), sketch.estimate(b)) == (6, 1)
