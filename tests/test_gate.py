"""Closing a store: calls inside finish first, a dropped store is closed when collected, the host pool goes back."""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
import weakref

import pytest
import torch

from conftest import assert_same_kv, make_kv, make_tokens
from kvstore.config import StoreConfig
from kvstore.gate import Gate
from kvstore.store import KVStore


def _kvstore_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("kvstore-")]


def test_gate_refuses_calls_once_shut_and_waits_for_those_inside():
    gate = Gate("thing")
    inside, release = threading.Event(), threading.Event()

    def call():
        with gate:
            inside.set()
            release.wait(10)

    caller = threading.Thread(target=call)
    caller.start()
    assert inside.wait(10)
    shutter = threading.Thread(target=gate.shut)
    shutter.start()
    shutter.join(0.2)
    assert shutter.is_alive()  # the call inside has not returned: shut waits for it
    with pytest.raises(RuntimeError, match="thing is closed"):
        with gate:
            pass
    release.set()
    shutter.join(10)
    caller.join(10)
    assert not shutter.is_alive() and not gate.shut()  # shut once; the second says so


def test_close_waits_for_a_put_from_inside(layout, tmp_path):
    store = KVStore(layout, StoreConfig(host_bytes=1 << 20, disk_dir=str(tmp_path / "disk"), disk_bytes=4 << 20,
                                        disk_sync=False))
    tokens, kv = make_tokens(48), make_kv(layout, 48)
    filling, release = threading.Event(), threading.Event()
    stored = []

    def fill(block, dst):
        filling.set()
        release.wait(10)
        dst.copy_(kv[:, :, block.start:block.end])

    putter = threading.Thread(target=lambda: stored.append(store.put_from(tokens, fill)))
    putter.start()
    assert filling.wait(10)
    closer = threading.Thread(target=store.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # LMDB and the host pool stay open under the engine's fill
    with pytest.raises(RuntimeError, match="closed"):
        store.lookup(tokens)
    release.set()
    putter.join(10)
    closer.join(10)
    assert stored == [3] and not closer.is_alive()
    with KVStore(layout, StoreConfig(host_bytes=0, disk_dir=str(tmp_path / "disk"), disk_bytes=4 << 20)) as again:
        assert again.lookup(tokens) == 48  # written through before the tiers closed
        assert_same_kv(again.get(tokens), kv)


def test_close_from_inside_a_fill_does_not_wait_for_itself(layout):
    store = KVStore(layout, StoreConfig(host_bytes=1 << 20))
    tokens, kv = make_tokens(32), make_kv(layout, 32)

    def fill(block, dst):
        dst.copy_(kv[:, :, block.start:block.end])
        store.close()

    store.put_from(tokens, fill)  # returns: the fill's close did not wait for the put around it
    with pytest.raises(RuntimeError, match="closed"):
        store.get(tokens)


def test_a_dropped_store_is_collected_and_closed(layout, tmp_path):
    before = _kvstore_threads()
    store = KVStore(layout, StoreConfig(host_bytes=1 << 20, disk_dir=str(tmp_path / "disk"), disk_bytes=4 << 20,
                                        disk_sync=False, write_policy="write_back"))
    tokens, kv = make_tokens(40), make_kv(layout, 40)
    store.put(tokens, kv)
    store.prefetch(tokens)  # a handle dropped with it
    gone = weakref.ref(store)
    del store
    gc.collect()
    assert gone() is None
    assert _kvstore_threads() == before  # its prefetch workers stopped
    # closing wrote back what only host RAM held, and let go of the LMDB directory
    with KVStore(layout, StoreConfig(host_bytes=0, disk_dir=str(tmp_path / "disk"), disk_bytes=4 << 20)) as again:
        assert again.lookup(tokens) == 40
        assert_same_kv(again.get(tokens), kv)


def test_closed_store_still_referenced_holds_no_host_pool(layout):
    store = KVStore(layout, StoreConfig(host_bytes=64 << 20))
    store.put(make_tokens(16), make_kv(layout, 16))
    host = store.host
    store.close()
    assert host.used_bytes() == 0
    assert not host.put(b"k" * 32, torch.zeros(layout.block_shape, dtype=layout.dtype))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_is_refused_the_parents_store_and_the_parent_keeps_it(layout, tmp_path):
    """The child's puts, flushes and prefetches waited for ever on worker threads a fork does not copy."""
    store = KVStore(layout, StoreConfig(host_bytes=1 << 20, disk_dir=str(tmp_path / "disk"), disk_bytes=4 << 20,
                                        disk_sync=False))
    tokens, kv = make_tokens(32), make_kv(layout, 32)
    store.put(tokens, kv)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: every call refused at once, close harmless, exit without the parent's at-exit
        os.close(read)
        said = []
        for call in (lambda: store.put(make_tokens(16, seed=5), make_kv(layout, 16)), store.flush,
                     lambda: store.lookup(tokens), lambda: store.prefetch(tokens)):
            try:
                call()
                said.append("ran")
            except RuntimeError as exc:
                said.append("refused" if "before a fork" in str(exc) else repr(exc))
        store.close()
        os.write(write, ",".join(said).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        said = pipe.read()
    assert os.waitpid(pid, 0)[1] == 0
    assert said == "refused,refused,refused,refused"
    assert store.lookup(tokens) == 32  # the parent's store is unharmed
    assert_same_kv(store.get(tokens), kv)
    store.close()


def test_a_second_close_returns_once_the_store_is_closed(layout, tmp_path):
    """It returned at once while the first still waited for a call inside: the LMDB directory stayed locked."""
    config = StoreConfig(host_bytes=1 << 20, disk_dir=str(tmp_path / "disk"), disk_bytes=4 << 20, disk_sync=False)
    store = KVStore(layout, config)
    tokens, kv = make_tokens(32), make_kv(layout, 32)
    filling, release = threading.Event(), threading.Event()

    def fill(block, dst):
        filling.set()
        release.wait(10)
        dst.copy_(kv[:, :, block.start:block.end])

    putter = threading.Thread(target=store.put_from, args=(tokens, fill))
    putter.start()
    assert filling.wait(10)
    first = threading.Thread(target=store.close)
    first.start()
    second = threading.Thread(target=store.close)
    second.start()
    second.join(0.2)
    assert second.is_alive()  # waits for the first close, which waits for the put
    release.set()
    for thread in (putter, first, second):
        thread.join(10)
    assert not second.is_alive()
    with KVStore(layout, config) as again:  # the directory is free the moment close returned
        assert again.lookup(tokens) == 32


# -- a signal's exception (KeyboardInterrupt) inside the store's own code ------------------------------------


def _interrupt_at(event: int):
    """A tracer raising KeyboardInterrupt at the ``event``-th place inside the gate (or the ``threading`` code it
    calls) where a signal's handler may run: a function's start, or a line run for the first time in its frame
    (a ``with`` block's exit runs its first line again, and no handler runs there before the lock's C
    ``__exit__``); returns (tracer, whether it fired)."""
    seen, fired = [0], [False]

    def fire() -> None:
        seen[0] += 1
        if seen[0] == event and not fired[0]:
            fired[0] = True
            raise KeyboardInterrupt

    def tracer(frame, kind, arg):
        if not frame.f_code.co_filename.endswith(("gate.py", "threading.py")):
            return None
        lines: set[int] = set()
        fire()

        def local(frame, kind, arg):
            if kind == "line" and frame.f_lineno not in lines:
                lines.add(frame.f_lineno)
                fire()
            return local
        return local
    return tracer, fired


def test_an_interrupt_anywhere_in_the_gate_leaves_no_lock_held_and_no_call_another_close_waits_for():
    """A KeyboardInterrupt inside a Condition's Python ``__enter__`` left the gate's lock held (every later call
    and close() waited for ever), or a call counted that this thread's close() waited 30 s for."""
    event = 0
    while True:
        event += 1
        gate = Gate("thing")
        tracer, fired = _interrupt_at(event)
        sys.settrace(tracer)
        try:
            with gate:
                pass
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        if not fired[0]:
            break  # past the last line the gate runs
        assert not gate._lock.locked(), event
        with gate._lock:  # a call the interrupt left counted is this thread's, whose own close does not wait
            assert gate._others_inside(threading.get_ident()) == 0, event
        assert gate.shut(None) is True
    assert event > 10


def test_a_prefetch_interrupted_after_its_fetch_was_queued_keeps_the_workers(layout, tmp_path, monkeypatch):
    """The fetch was queued before it was registered: the worker's KeyError ended it, and with both workers
    gone every later prefetch waited for ever."""
    config = StoreConfig(host_bytes=1 << 20, disk_dir=str(tmp_path / "disk"), disk_bytes=4 << 20, disk_sync=False)
    prompts = [(make_tokens(64, seed=i), make_kv(layout, 64, seed=i)) for i in range(3)]
    with KVStore(layout, config) as store:
        for tokens, kv in prompts:
            store.put(tokens, kv)
    with KVStore(layout, config) as store:  # host RAM empty: the prefetches read from LMDB
        prefetcher = store.hooks.prefetcher
        real = prefetcher._queue.put_nowait

        def queued_then_interrupted(item):
            real(item)
            raise KeyboardInterrupt  # a SIGINT delivered as put_nowait returned

        def interrupted_before_queueing(item):
            raise KeyboardInterrupt  # ... or as it was entered: a fetch registered, never run, was joined

        for (tokens, _), interrupted in zip(prompts[:2], (queued_then_interrupted, interrupted_before_queueing)):
            monkeypatch.setattr(prefetcher._queue, "put_nowait", interrupted)
            with pytest.raises(KeyboardInterrupt):
                store.prefetch(tokens, policy="wait")
            monkeypatch.setattr(prefetcher._queue, "put_nowait", real)
        for tokens, kv in prompts[1:]:
            handle = store.prefetch(tokens, policy="wait")
            assert handle.wait(30) == 64 and handle.done()
            assert_same_kv(store.load(tokens, prefetch=handle), kv)
        assert len([name for name in _kvstore_threads() if name.startswith("kvstore-prefetch")]) == 2


def test_a_close_interrupted_is_finished_by_the_next(layout, tmp_path, monkeypatch):
    """The first close had already marked the store closed: a second returned at once, its workers ran on and
    its directory stayed locked for the process's life."""
    config = StoreConfig(host_bytes=1 << 20, disk_dir=str(tmp_path / "disk"), disk_bytes=4 << 20, disk_sync=False)
    store = KVStore(layout, config)
    tokens, kv = make_tokens(64), make_kv(layout, 64)
    store.put(tokens, kv)
    writes = store._flow.writes
    real = writes.close

    def interrupted():
        monkeypatch.setattr(writes, "close", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(writes, "close", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.close()
    store.close()
    assert _kvstore_threads() == []
    with KVStore(layout, config) as again:  # the directory is free
        assert again.lookup(tokens) == 64
        assert_same_kv(again.get(tokens), kv)


def test_a_forked_child_is_refused_figures_and_waits_on_the_parents_threads(layout, tmp_path):
    """``stats()`` in a child asked a remote tier over the parent's socket (scrambling its replies); a parent's
    prefetch handle or layer loader waited in the child for ever on threads a fork does not copy; an LMDB
    directory the parent had open could not be opened in the child, even after the parent closed it."""
    config = StoreConfig(host_bytes=1 << 20, disk_dir=str(tmp_path / "disk"), disk_bytes=4 << 20, disk_sync=False)
    store = KVStore(layout, config)
    tokens, kv = make_tokens(64), make_kv(layout, 64)
    store.put(tokens, kv)
    handle = store.prefetch(tokens)
    loader = store.load(tokens, layer_wise=True)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        signal.alarm(60)  # a child that hangs is killed: the test fails instead of waiting for ever
        os.close(read)
        said = []
        for call in (store.stats, lambda: handle.wait(5), lambda: loader.layer(0)):
            try:
                call()
                said.append("ran")
            except RuntimeError as exc:
                said.append("refused" if "before a fork" in str(exc) else repr(exc))
            except BaseException as exc:
                said.append(repr(exc))
        time.sleep(1)  # the parent has closed its store by now
        try:
            KVStore(layout, config).close()
            said.append("opened")
        except OSError as exc:
            said.append("spawned" if "spawned process" in str(exc) else repr(exc))
        os.write(write, ",".join(said).encode())
        os._exit(0)
    os.close(write)
    loader.close()
    store.close()
    with os.fdopen(read) as pipe:
        said = pipe.read()
    assert os.waitpid(pid, 0)[1] == 0
    assert said == "refused,refused,refused,spawned"
