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
