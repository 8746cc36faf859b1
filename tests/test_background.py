"""Background threads leave the cores to the engine's: niced, and their torch ops on one thread."""

import os
import threading

import pytest
import torch

from kvstore import KVStore, StoreConfig
from kvstore.background import BACKGROUND_NICENESS, IOPool, become_background_worker
from kvstore.layout import KVLayout
from kvstore.writebehind import WriteBehind

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float16, block_tokens=4)


def _in_thread(fn):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()))
    thread.start()
    thread.join()
    return result["value"]


def _state() -> tuple[int, int]:
    """(torch threads, nice value) of the calling thread."""
    return torch.get_num_threads(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="torch runs one thread here anyway")
def test_a_background_worker_runs_torch_on_one_thread_and_nobody_else_changes():
    default = _in_thread(torch.get_num_threads)
    main_before = _state()

    def worker():
        become_background_worker()
        return _state()

    threads, nice = _in_thread(worker)
    assert threads == 1
    assert nice == BACKGROUND_NICENESS == 19
    assert _state() == main_before  # the caller's thread is untouched
    assert _in_thread(torch.get_num_threads) == default  # threads started later (an engine's) keep the default


def test_write_behind_workers_are_background_workers():
    seen = []

    def writer(items):
        seen.append(_state())

    writes = WriteBehind({"disk": writer}, max_blocks=4)
    try:
        writes.submit("disk", b"k", torch.zeros(4))
        writes.flush()
    finally:
        writes.close()
    assert seen == [(1, BACKGROUND_NICENESS)]


def test_a_store_with_a_codec_tier_leaves_the_callers_threads_as_they_were(tmp_path):
    before = _state()
    config = StoreConfig(model_id="m", host_bytes=8 * LAYOUT.block_bytes, disk_dir=str(tmp_path / "lmdb"),
                         disk_bytes="4MiB", disk_codec="ec4")
    kv = torch.randn(LAYOUT.shape(8)).to(LAYOUT.dtype)
    with KVStore(LAYOUT, config) as store:
        store.put(list(range(8)), kv)
        store.flush()
        assert store.stats()["tiers"]["lmdb"]["blocks"] == 2  # encoded on the (background) writer
    assert _state() == before


def test_an_io_pool_runs_calls_on_its_threads_and_inline_when_it_has_one_or_is_closed():
    here = threading.current_thread().name
    with IOPool(2, "test-pool") as pool:
        assert pool.submit(lambda: threading.current_thread().name).result().startswith("test-pool")
    assert pool.submit(lambda: threading.current_thread().name).result() == here  # closed: inline
    assert IOPool(1, "one").submit(lambda: threading.current_thread().name).result() == here


def test_an_io_pool_hands_back_a_calls_exception():
    for threads in (1, 2):
        with IOPool(threads, "test-pool") as pool:
            with pytest.raises(OSError, match="disk full"):
                pool.submit(_raise, OSError("disk full")).result()


def _raise(exc):
    raise exc


def test_an_io_pool_used_before_a_fork_works_in_the_child():
    with IOPool(2, "test-pool") as pool:
        assert pool.submit(lambda: 1).result() == 1  # threads started in the parent
        pid = os.fork()
        if pid == 0:  # the child: its inherited executor has no threads; a new one must run this
            code = 0
            try:
                code = 0 if pool.submit(lambda: 2).result(timeout=10) == 2 else 1
            except BaseException:
                code = 2
            os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "2"])
def test_an_io_pool_needs_a_positive_thread_count(bad):
    with pytest.raises(ValueError, match="threads: expected an integer >= 1"):
        IOPool(bad, "test-pool")


def test_a_refused_thread_stops_the_ones_already_started():
    """The OS refusing the third prefetch worker left the first two running after the store failed to open."""
    from kvstore.background import start_threads

    stop_event = threading.Event()

    class Refused(threading.Thread):
        def start(self) -> None:
            raise RuntimeError("can't start new thread")

    threads = [threading.Thread(target=stop_event.wait), threading.Thread(target=stop_event.wait),
               Refused(target=stop_event.wait)]
    closed = []

    def close():  # the owner's close: it joins the threads left in its list
        closed.append(list(threads))
        stop_event.set()
        for thread in threads:
            thread.join()

    started = list(threads)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        start_threads(threads, close)
    assert closed == [started[:2]] and threads == started[:2]
    assert not any(thread.is_alive() for thread in started[:2])
