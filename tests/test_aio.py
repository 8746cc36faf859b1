"""AsyncKVStore: the store's calls awaited on an event loop, exact bytes, cancellation, bounded threads, close."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from conftest import assert_same_kv, make_kv, make_tokens
from kvstore import AsyncKVStore, KVStore, StoreConfig


def _aio_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("kvstore-aio")]


def _held(monkeypatch, store: KVStore, name: str) -> threading.Event:
    """The store's call ``name`` held (as by a slow tier) until the returned event is set."""
    release, real = threading.Event(), getattr(store, name)

    def held(*args, **kwargs):
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(store, name, held)
    return release


@pytest.fixture
def store(layout, tmp_path):
    config = StoreConfig(host_bytes=1 << 20, disk_dir=str(tmp_path / "disk"), disk_bytes=8 << 20, disk_sync=False)
    with KVStore(layout, config) as opened:
        yield opened


def test_every_hook_awaited_gives_the_stores_exact_answers(store, layout):
    tokens, kv = make_tokens(80), make_kv(layout, 80)

    async def main():
        async with AsyncKVStore(store) as hooks:
            assert await hooks.put(tokens, kv) == 80 // layout.block_tokens  # blocks newly stored
            assert await hooks.lookup(tokens) == 80
            assert (await hooks.plan(tokens)).load_tokens == store.plan(tokens).load_tokens == 80
            assert_same_kv(await hooks.get(tokens), kv)
            out = torch.empty_like(kv)
            assert await hooks.get_into(tokens, out) == 80
            assert_same_kv(out, kv)
            handle = await hooks.prefetch(tokens, policy="wait")
            assert await hooks.wait(handle, 30) == 80
            assert_same_kv(await hooks.load(tokens, prefetch=handle), kv)
            other, more = make_tokens(48, seed=9), make_kv(layout, 48, seed=9)
            assert await hooks.save(other, more) == 48 // layout.block_tokens and store.lookup(other) == 48
            assert await hooks.flush(30)
            assert_same_kv(await hooks.get(other), more)
        assert _aio_threads() == []

    asyncio.run(main())


def test_the_loop_runs_on_while_a_call_waits_on_a_tier(store, layout, monkeypatch):
    """A get blocked in a tier (a slow share) must not block the event loop's other work."""
    tokens, kv = make_tokens(32), make_kv(layout, 32)
    store.put(tokens, kv)
    release = _held(monkeypatch, store, "get")

    async def main():
        async with AsyncKVStore(store) as hooks:
            pending = asyncio.ensure_future(hooks.get(tokens))
            ticks = 0
            while ticks < 5:  # the loop keeps running its other tasks meanwhile
                await asyncio.sleep(0)
                ticks += 1
            assert not pending.done()
            release.set()
            assert_same_kv(await pending, kv)

    asyncio.run(main())


def test_a_cancelled_await_returns_and_the_store_stays_exact(store, layout, monkeypatch):
    tokens, kv = make_tokens(32), make_kv(layout, 32)
    release = _held(monkeypatch, store, "put")

    async def main():
        hooks = AsyncKVStore(store, max_threads=1)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(hooks.put(tokens, kv), 0.05)
        release.set()
        await hooks.close()  # waits for the put still running on its thread
        assert _aio_threads() == []
        with pytest.raises(RuntimeError, match="closed"):
            await hooks.lookup(tokens)

    asyncio.run(main())
    assert store.lookup(tokens) == 32  # the put ran whole
    assert_same_kv(store.get(tokens), kv)


def test_a_bad_argument_is_the_stores_value_error_and_max_threads_is_checked(store, layout):
    async def main():
        async with AsyncKVStore(store) as hooks:
            with pytest.raises(ValueError, match="kv"):
                await hooks.put(make_tokens(16), torch.zeros(3))
            for bad in (None, "handle", 5):  # an AttributeError ('str' object has no attribute 'wait')
                with pytest.raises(ValueError, match=r"^handle: expected a PrefetchHandle from prefetch\(\), got "):
                    await hooks.wait(bad)

    asyncio.run(main())
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="max_threads"):
            AsyncKVStore(store, max_threads=bad)


@pytest.mark.parametrize("bad", ["a store", None, StoreConfig()], ids=["str", "None", "config"])
def test_only_an_open_store_is_wrapped(bad):
    with pytest.raises(ValueError, match="store: expected a KVStore"):
        AsyncKVStore(bad)
