"""The chain memo: which prompt a queued block was put with (``kvstore/chains.py``)."""

from __future__ import annotations

import pytest

from kvstore.chains import ChainMemo


def test_chains_of_gives_each_prompt_once_in_the_order_its_keys_appear():
    memo = ChainMemo()
    memo.remember([b"a0", b"a1", b"a2"])
    memo.remember([b"b0", b"b1"])
    assert memo.chains_of([b"b1", b"a2", b"b0", b"x"]) == [(b"b0", b"b1"), (b"a0", b"a1", b"a2")]
    assert memo.chains_of([b"x"]) == []


def test_a_key_put_again_with_a_longer_prompt_names_that_prompt():
    memo = ChainMemo()
    memo.remember([b"a0", b"a1"])
    memo.remember([b"a0", b"a1", b"a2"])
    assert memo.chains_of([b"a1"]) == [(b"a0", b"a1", b"a2")]


def test_the_oldest_keys_are_forgotten_past_the_bound():
    memo = ChainMemo(max_keys=3)
    memo.remember([b"a0", b"a1"])
    memo.remember([b"b0", b"b1"])
    assert memo.chains_of([b"a0"]) == [] and memo.chains_of([b"a1"]) == [(b"a0", b"a1")]
    with pytest.raises(ValueError, match="max_keys"):
        ChainMemo(max_keys=0)


def test_the_keys_held_by_remembered_chains_stay_bounded():
    """Prompts sharing a long head, each with its own last block: every last block's key kept its whole
    chain alive, so a bound on keys let 16,384 chains of 257 keys live (about 0.5 GiB)."""
    memo = ChainMemo(max_keys=64, max_held=200)
    head = [b"h%d" % i for i in range(40)]
    for n in range(500):
        memo.remember(head + [b"tail%d" % n])
        assert memo.held() <= 200
    assert memo.chains_of([b"tail499"]) == [tuple(head + [b"tail499"])]
    assert memo.chains_of([b"h0"]) == [tuple(head + [b"tail499"])]
    assert memo.chains_of([b"tail0"]) == []
    memo.remember([b"x%d" % i for i in range(201)])  # longer than the bound: not remembered
    assert memo.chains_of([b"x0"]) == [] and memo.held() <= 200
    memo.remember([b"d", b"d"])  # a key twice: counted once
    assert memo.chains_of([b"d"]) == [(b"d", b"d")]


def test_one_chain_object_remembered_twice_is_counted_once():
    memo = ChainMemo(max_keys=64, max_held=100)
    chain = (b"a", b"b", b"c")
    memo.remember(chain)
    memo.remember(chain)
    assert memo.held() == 3
    memo.remember(())
    assert memo.held() == 3
    for n in range(100):  # every key pushed out: nothing held
        memo.remember([b"x%d" % n, b"y%d" % n])
    assert memo.chains_of([b"a"]) == [] and memo.held() <= 100
