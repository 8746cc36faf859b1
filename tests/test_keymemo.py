"""The key memo: reused keys are exactly the keys the chain computes, and the memo stays within its bounds."""

from __future__ import annotations

import array

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_threads
from kvstore import KeyChain
from kvstore.keymemo import KeyMemo, common_bytes
from kvstore.keys import packed_tokens

BT = 4
FINGERPRINT = b"layout"


def spec_keys(tokens: list[int], salt: str | None = None) -> list[bytes]:
    """Keys of a chain that has never seen a token (a fresh memo)."""
    return list(KeyChain("m", FINGERPRINT, BT).iter_keys(tokens, salt))


def packed(tokens: list[int]) -> memoryview:
    return memoryview(array.array("I", tokens)).cast("B")


# Sequences built from a few shared stems, so they share prefixes of every length, differ by one token
# anywhere, end mid-block or on a block edge.
stems = st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=3 * BT + 1)
sequences = st.tuples(st.sampled_from([[], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 5]]), stems).map(
    lambda pair: pair[0] + pair[1])
asks = st.lists(st.tuples(sequences, st.sampled_from([None, "a", "b"]), st.integers(0, 8)), max_size=25)


@settings(max_examples=200, deadline=None)
@given(asks=asks, entries=st.integers(0, 4))
def test_every_key_drawn_is_the_key_the_spec_gives(asks, entries):
    """Keys drawn lazily (some draws stop early) through one memo, in any order, with salts: always the
    spec's keys, whatever the memo held, however small it is."""
    chain = KeyChain("m", FINGERPRINT, BT)
    chain._memo = KeyMemo(max_entries=entries, min_blocks=1)
    for tokens, salt, draw in asks:
        keys = chain.iter_keys(tokens, salt)
        drawn = [key for key, _ in zip(keys, range(draw))]
        keys.close()
        assert drawn == spec_keys(tokens, salt)[:draw]
        assert [b.key for b in chain.blocks(tokens, salt)] == spec_keys(tokens, salt)


def test_a_sequence_one_token_apart_shares_only_the_blocks_before_that_token():
    chain = KeyChain("m", FINGERPRINT, BT)
    chain._memo = KeyMemo(min_blocks=1)
    tokens = list(range(1, 4 * BT + 1))
    assert chain.blocks(tokens)  # remembered
    for position in range(len(tokens)):
        other = tokens.copy()
        other[position] += 1
        got = [b.key for b in chain.blocks(other)]
        assert got == spec_keys(other)
        assert got[:position // BT] == spec_keys(tokens)[:position // BT]
        assert got[position // BT] != spec_keys(tokens)[position // BT]


def test_known_keys_stop_where_the_bytes_differ_and_where_the_memo_stopped_drawing():
    memo = KeyMemo(min_blocks=1)
    tokens = list(range(10, 10 + 4 * BT))
    keys = spec_keys(tokens)
    memo.remember(b"root", packed(tokens), 4 * BT, keys[:3])
    assert memo.known(b"root", packed(tokens), 4 * BT) == tuple(keys[:3])
    assert memo.known(b"other root", packed(tokens), 4 * BT) == ()
    changed = tokens[:BT + 1] + [0] + tokens[BT + 2:]
    assert memo.known(b"root", packed(changed), 4 * BT) == tuple(keys[:1])
    assert memo.known(b"root", packed(tokens[:2 * BT + 3]), 4 * BT) == tuple(keys[:2])
    assert memo.known(b"root", packed(tokens[:BT - 1]), 4 * BT) == ()


@pytest.mark.parametrize("max_entries, max_bytes", [(0, 1 << 20), (3, 1 << 20), (16, 4 * 4 * BT * 5)])
def test_the_memo_holds_at_most_its_entries_and_bytes_and_drops_the_least_recently_used(max_entries, max_bytes):
    memo = KeyMemo(max_entries=max_entries, max_bytes=max_bytes, min_blocks=1)
    prompts = [[n] * (4 * BT) for n in range(1, 40)]
    for tokens in prompts:
        memo.remember(b"root", packed(tokens), 4 * BT, spec_keys(tokens))
        held = [bool(memo.known(b"root", packed(t), 4 * BT)) for t in prompts]
        assert sum(held) <= max_entries and 4 * 4 * BT * sum(held) <= max_bytes
    # the most recent ones are held, up to the bounds
    expected = min(max_entries, max_bytes // (4 * 4 * BT))
    assert [bool(memo.known(b"root", packed(t), 4 * BT)) for t in prompts[-expected - 1:]] == (
        [False] + [True] * expected)


def test_a_sequence_longer_than_the_memo_is_not_remembered():
    memo = KeyMemo(max_bytes=4 * BT, min_blocks=1)
    tokens = list(range(2 * BT))
    memo.remember(b"root", packed(tokens), 4 * BT, spec_keys(tokens))
    assert memo.known(b"root", packed(tokens), 4 * BT) == ()


def test_bad_sizes_are_a_value_error():
    with pytest.raises(ValueError, match="expected sizes >= 0"):
        KeyMemo(max_entries=-1)
    with pytest.raises(ValueError, match="min_blocks >= 1, got .* min_blocks 0"):
        KeyMemo(min_blocks=0)


def test_sequences_shorter_than_min_blocks_are_hashed_not_remembered():
    memo = KeyMemo(min_blocks=3)
    short, long = list(range(2 * BT + 1)), list(range(3 * BT))
    memo.remember(b"root", packed(short), 4 * BT, spec_keys(short)[:2])
    memo.remember(b"root", packed(long), 4 * BT, spec_keys(long))
    assert memo.known(b"root", packed(short), 4 * BT) == ()  # it would match two blocks of ``long``
    assert memo.known(b"root", packed(long), 4 * BT) == tuple(spec_keys(long))


def test_of_many_entries_under_one_head_the_longest_match_is_found_whichever_was_used_last():
    """Entries compared whole only where they hold the block after the best match so far must still
    yield the longest match: here the longest is the least recently used."""
    memo = KeyMemo(min_blocks=1)
    base = list(range(100, 100 + 8 * BT))
    for cut in (8, 2, 5, 3, 1):  # entries sharing the first ``cut`` blocks with ``base``, the 8 first
        tokens = base[:cut * BT] + [7] * ((8 - cut) * BT)
        memo.remember(b"root", packed(tokens), 4 * BT, spec_keys(tokens))
    asked = base[:6 * BT] + [9] * (2 * BT)
    assert memo.known(b"root", packed(asked), 4 * BT) == tuple(spec_keys(base)[:6])
    assert memo.known(b"root", packed(base), 4 * BT) == tuple(spec_keys(base))


@pytest.mark.parametrize("size", [0, 1, 7, 8, 4096])
def test_common_bytes_is_the_first_differing_token(size):
    a = np.arange(size, dtype="<u4")
    for position in range(0, size, max(1, size // 7)):
        b = a.copy()
        b[position] ^= 1
        assert common_bytes(memoryview(a).cast("B"), memoryview(b).cast("B"), 4 * size) == 4 * position
        assert common_bytes(memoryview(a).cast("B"), memoryview(b).cast("B"), 4 * position) == 4 * position
    assert common_bytes(memoryview(a).cast("B"), memoryview(a.copy()).cast("B"), 4 * size) == 4 * size


def test_threads_sharing_one_chain_draw_the_spec_keys():
    chain = KeyChain("m", FINGERPRINT, BT)
    rng = np.random.default_rng(7)
    base = rng.integers(0, 50, 64 * BT).tolist()
    prompts = [base[:rng.integers(1, len(base))] + rng.integers(0, 50, rng.integers(0, 9)).tolist()
               for _ in range(40)]
    expected = {i: spec_keys(p) for i, p in enumerate(prompts)}
    wrong = []

    def worker(seed: int) -> None:
        order = np.random.default_rng(seed).permutation(len(prompts))
        for i in order:
            if list(chain.iter_keys(prompts[i])) != expected[i]:
                wrong.append(i)

    run_threads(worker, 4)
    assert wrong == []


def test_the_memo_holds_its_own_copy_of_the_tokens():
    chain = KeyChain("m", FINGERPRINT, BT)
    chain._memo = KeyMemo(min_blocks=1)
    tokens = np.arange(1, 4 * BT + 1, dtype=np.uint32)
    first = [b.key for b in chain.blocks(tokens)]
    tokens[BT] = 999  # the caller reuses its buffer for another prompt
    assert [b.key for b in chain.blocks(tokens)] == spec_keys(tokens.tolist())
    assert [b.key for b in chain.blocks(np.arange(1, 4 * BT + 1))] == first
    assert bytes(packed_tokens(tokens)) == tokens.astype("<u4").tobytes()
