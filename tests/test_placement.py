"""Placement: per-tier policies and the decisions the store takes from them."""

from __future__ import annotations

import random

import pytest

from kvstore.placement import WRITE_BACK, WRITE_THROUGH, Placement, TierPolicy

DEVICE = TierPolicy()  # volatile, write-through (the fastest tier's policy is never used to write into it)
HOST_WT = TierPolicy(write="write_through")
HOST_WB = TierPolicy(write="write_back")
LMDB_WT = TierPolicy(write="write_through", persistent=True)
LMDB_WB = TierPolicy(write="write_back", persistent=True)
FILES_WT = TierPolicy(write="write_through", persistent=True)
FILES_WB = TierPolicy(write="write_back", persistent=True)


def key(i: int) -> bytes:
    return random.Random(i).randbytes(32)


# -- TierPolicy ------------------------------------------------------------------------------------------


def test_policy_defaults():
    policy = TierPolicy()
    assert (policy.write, policy.admit_after, policy.persistent) == ("write_through", 1, False)
    assert (WRITE_THROUGH, WRITE_BACK) == ("write_through", "write_back")


def test_policy_is_frozen():
    with pytest.raises(AttributeError):
        TierPolicy().write = "write_back"  # type: ignore[misc]


@pytest.mark.parametrize("write", ["write_around", "", "WRITE_BACK", None])
def test_policy_bad_write(write):
    with pytest.raises(ValueError) as info:
        TierPolicy(write=write)
    message = str(info.value)
    assert message.startswith("write:")
    assert "write_through" in message and "write_back" in message
    assert f"got {write!r}" in message


@pytest.mark.parametrize("admit_after", [0, -1, 1.5, 2.0, "2", True, None])
def test_policy_bad_admit_after(admit_after):
    with pytest.raises(ValueError) as info:
        TierPolicy(admit_after=admit_after)
    message = str(info.value)
    assert message.startswith("admit_after:")
    assert "expected an integer >= 1" in message
    assert f"got {admit_after!r}" in message


@pytest.mark.parametrize("admit_after", [1, 2, 1000])
def test_policy_good_admit_after(admit_after):
    assert TierPolicy(admit_after=admit_after).admit_after == admit_after


def test_placement_needs_a_tier():
    with pytest.raises(ValueError) as info:
        Placement([])
    assert str(info.value).startswith("policies:")


# -- write-through, write-back, promotion, close ---------------------------------------------------------


def test_write_through_targets():
    placement = Placement([DEVICE, HOST_WT, LMDB_WB, FILES_WT])
    assert placement.write_through(0) == (1, 3)  # every write-through tier below, not the write-back one
    assert placement.write_through(1) == (3,)
    assert placement.write_through(2) == (3,)
    assert placement.write_through(3) == ()
    assert Placement([DEVICE]).write_through(0) == ()
    assert Placement([HOST_WT, LMDB_WB]).write_through(0) == ()


def test_on_evict_only_into_next_write_back_tier():
    placement = Placement([DEVICE, HOST_WB, LMDB_WT, FILES_WB])
    assert placement.on_evict(0) == 1  # host is write-back: gets device evictions
    assert placement.on_evict(1) is None  # lmdb is write-through: already has its copy
    assert placement.on_evict(2) == 3
    assert placement.on_evict(3) is None  # the last tier: evictions are gone
    # Never skips a tier: a write-back tier two levels down gets nothing from the top.
    assert Placement([DEVICE, HOST_WT, LMDB_WB]).on_evict(0) is None
    assert Placement([DEVICE, HOST_WT, LMDB_WB]).on_evict(1) == 2


def test_promote_into_every_faster_tier():
    placement = Placement([DEVICE, HOST_WT, LMDB_WB, FILES_WT])
    assert placement.promote_into(0) == []
    assert placement.promote_into(1) == [0]
    assert placement.promote_into(3) == [0, 1, 2]
    off = Placement([DEVICE, HOST_WT, LMDB_WB], promote=False)
    assert off.promote is False
    assert [off.promote_into(i) for i in range(3)] == [[], [], []]


def test_on_close_first_persistent_write_back_tier():
    assert Placement([DEVICE, HOST_WB, LMDB_WB, FILES_WB]).on_close() == 2  # host is write-back but volatile
    assert Placement([DEVICE, HOST_WT, LMDB_WT, FILES_WB]).on_close() == 3
    assert Placement([DEVICE, HOST_WT, LMDB_WT]).on_close() is None  # write-through: already there
    assert Placement([DEVICE, HOST_WB]).on_close() is None  # nothing persistent
    assert Placement([HOST_WT]).on_close() is None


def test_policies_kept_in_order():
    policies = [DEVICE, HOST_WB, LMDB_WT]
    placement = Placement(policies)
    assert placement.policies == tuple(policies)
    policies.append(FILES_WB)  # the placement keeps its own copy
    assert len(placement.policies) == 3


# -- admission -------------------------------------------------------------------------------------------


def test_admit_after_one_needs_no_counting():
    placement = Placement([DEVICE, HOST_WT, LMDB_WT])
    assert placement.counting is False
    k = key(1)
    assert placement.sighted(k) == 1
    assert placement.sighted(k) == 1  # nothing is counted
    assert placement.sightings(k) == 1
    assert placement.sightings(key(2)) == 1  # never seen, still admitted on first sight
    assert all(placement.admits(tier, 1) for tier in range(3))


def test_admit_after_three_counts_sightings():
    placement = Placement([HOST_WT, TierPolicy(admit_after=3, persistent=True)])
    assert placement.counting is True
    k, other = key(1), key(2)
    assert placement.sightings(k) == 0
    assert [placement.sighted(k) for _ in range(4)] == [1, 2, 3, 4]
    assert placement.sightings(k) == 4
    assert placement.sightings(k) == 4  # looking does not count
    assert placement.sightings(other) == 0
    assert placement.sighted(other) == 1
    # Tier 0 admits on the first sighting, tier 1 on the third.
    assert [placement.admits(0, n) for n in (1, 2, 3)] == [True, True, True]
    assert [placement.admits(1, n) for n in (1, 2, 3, 4)] == [False, False, True, True]
    assert placement.admits(1, placement.sightings(k))
    assert not placement.admits(1, placement.sightings(other))


def test_admission_over_a_stream_of_keys():
    placement = Placement([HOST_WT, TierPolicy(admit_after=3, persistent=True)])
    rng = random.Random(7)
    keys = [key(100 + i) for i in range(200)]
    truth = {k: 0 for k in keys}
    admitted = set()
    for _ in range(1000):
        k = rng.choice(keys)
        truth[k] += 1
        if placement.admits(1, placement.sighted(k)):
            admitted.add(k)
    # Every key seen three times was admitted; (in a wide sketch) none seen fewer times was.
    assert admitted == {k for k, n in truth.items() if n >= 3}
