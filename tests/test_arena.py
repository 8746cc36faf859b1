"""The preallocated arena: extents never overlap, come back when their last view is gone, and run out cleanly."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvstore.arena import PAGE_BYTES, Arena

MiB = 1 << 20


def _fill(view: memoryview, value: int) -> None:
    np.frombuffer(view, dtype=np.uint8)[:] = value


def _holds(view: memoryview, value: int) -> bool:
    return bool((np.frombuffer(view, dtype=np.uint8) == value).all())


def test_an_extent_comes_back_only_when_its_last_view_is_gone():
    with Arena(4 * MiB, fault_in_background=False) as arena:
        whole = arena.take(4 * MiB)
        assert whole is not None and len(whole) == 4 * MiB
        assert arena.take(1) is None  # full: the caller allocates elsewhere
        tail = whole[3 * MiB:]  # a slice (what a reply sends) keeps the extent
        del whole
        assert arena.take(1) is None
        del tail
        again = arena.take(4 * MiB)  # the whole region again: the extent was merged back
        assert again is not None
        assert arena.stats()["misses"] == 2


def test_exact_sizes_and_page_rounding():
    with Arena(2 * MiB, fault_in_background=False) as arena:
        a, b = arena.take(1), arena.take(PAGE_BYTES + 1)
        assert (len(a), len(b)) == (1, PAGE_BYTES + 1)
        assert arena.stats()["taken"] == 3 * PAGE_BYTES
        _fill(a, 7)
        _fill(b, 9)
        assert _holds(a, 7) and _holds(b, 9)


def test_background_fault_in_hands_out_only_faulted_slices():
    arena = Arena(256 * MiB)
    try:
        views = []
        while True:
            done = arena.stats()["faulted"] == arena.capacity_bytes  # before the take: no slice can be missed
            view = arena.take(8 * MiB)
            if view is not None:
                views.append(view)
                stats = arena.stats()
                assert stats["taken"] <= stats["faulted"]
            elif done:
                break
        assert len(views) == 32  # every slice, once faulted in, was handed out
    finally:
        arena.close()


def test_close_stops_the_fault_thread_and_extents_stay_valid():
    arena = Arena(128 * MiB)
    arena.close()
    assert not any(t.name == "kvstore-arena-fault" for t in threading.enumerate())
    view = arena.take(PAGE_BYTES)
    if view is not None:
        _fill(view, 3)
        assert _holds(view, 3)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1GiB"])
def test_a_bad_capacity_is_refused(bad):
    with pytest.raises(ValueError, match="capacity_bytes"):
        Arena(bad)


class ArenaMachine(RuleBasedStateMachine):
    """Random takes and drops: live extents never share a byte, and all of it comes back."""

    def __init__(self):
        super().__init__()
        self.arena = Arena(64 * PAGE_BYTES, fault_in_background=False)
        self.live: dict[int, memoryview] = {}
        self.next = 1

    @rule(size=st.integers(1, 20 * PAGE_BYTES))
    def take(self, size):
        view = self.arena.take(size)
        if view is None:
            return
        assert len(view) == size
        value = self.next % 251 + 1
        self.next += 1
        _fill(view, value)
        self.live[value] = view

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def drop(self, data):
        value = data.draw(st.sampled_from(sorted(self.live)))
        del self.live[value]

    @invariant()
    def extents_are_disjoint(self):
        for value, view in self.live.items():
            assert _holds(view, value)
        stats = self.arena.stats()
        assert stats["taken"] + stats["free"] == stats["capacity"]

    def teardown(self):
        self.live.clear()  # the last views go: their extents come back at once (reference counting, no gc)
        assert self.arena.stats()["largest_free"] == self.arena.capacity_bytes
        self.arena.close()


TestArenaMachine = ArenaMachine.TestCase
TestArenaMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
