"""``RunCursor``: several readers share a run; the count is the leading blocks read, whoever read them."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.tiers.cursor import RunCursor


@settings(max_examples=200, deadline=None)
@given(length=st.integers(0, 40), misses=st.sets(st.integers(0, 45), max_size=5), readers=st.integers(1, 4))
def test_leading_is_the_first_block_not_read_and_every_block_before_it_was_read(length, misses, readers):
    cursor = RunCursor(length)
    read: list[int] = []
    lock = threading.Lock()

    def reader() -> None:
        while (n := cursor.take()) is not None:
            if n in misses:
                cursor.missed(n, OSError(n) if n % 2 else None)
                continue
            with lock:
                read.append(n)
    threads = [threading.Thread(target=reader) for _ in range(readers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first_miss = min((n for n in misses if n < length), default=length)
    assert cursor.leading == first_miss
    assert set(range(first_miss)) <= set(read)
    assert len(read) == len(set(read))  # no block handed out twice
    assert (cursor.error is not None) == (first_miss < length and first_miss % 2 == 1)


def test_a_miss_after_the_end_does_not_move_it_back():
    cursor = RunCursor(8)
    assert [cursor.take() for _ in range(4)] == [0, 1, 2, 3]
    cursor.missed(2)
    cursor.missed(3, OSError("later"))
    assert cursor.take() is None and cursor.leading == 2 and cursor.error is None
