"""The engine hooks for an asyncio event loop: ``await`` a lookup, a load, a save, a prefetch's tokens.

An engine that schedules on an event loop (vLLM's API server, SGLang's
tokenizer manager, an async router) must never block the loop on a tier: a
read from a slow share or a cache server stalls every request the loop
serves. Each call here runs the store's own call on one of a few threads of
its own (``max_threads``, a bounded pool) and awaits it, so the loop goes
on. A cancelled or timed-out ``await`` (``asyncio.wait_for``) returns at
once: a call that had not started on a thread yet is dropped, one that had
runs to its end there (the store's calls are bounded and leave nothing
half done: a put is whole or not at all), and ``close`` waits for it. A
layer-wise ``load`` or ``save`` gives the store's own ``LayerLoader`` /
``LayerSaver``, whose per-layer calls block: they are for the thread that
runs the model's layers, not for the loop.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from kvstore.layerwise import LayerLoader, LayerSaver
from kvstore.planner import LoadPlan
from kvstore.prefetch import PrefetchHandle
from kvstore.store import KVStore
from kvstore.validation import check_timeout

_Result = TypeVar("_Result")


class AsyncKVStore:
    """``store``'s calls as coroutines, each run on a thread of this object's bounded pool.

    Use it as ``async with AsyncKVStore(store) as hooks:``, or ``await
    hooks.close()``; closing it stops its threads, not the store (the
    store may have other users: close it yourself). A call after ``close``
    raises ``RuntimeError``.
    """

    def __init__(self, store: KVStore, max_threads: int = 4):
        if not isinstance(store, KVStore):
            raise ValueError(f"store: expected a KVStore (AsyncKVStore(store) wraps an open store), got "
                             f"{type(store).__name__}")
        if isinstance(max_threads, bool) or not isinstance(max_threads, int) or max_threads < 1:
            raise ValueError(f"max_threads: expected an int >= 1, got {max_threads!r}")
        self.store = store
        self._pool = ThreadPoolExecutor(max_threads, thread_name_prefix="kvstore-aio")
        self._closed = False

    async def _run(self, call: Callable[..., _Result], *args: Any, **kwargs: Any) -> _Result:
        if self._closed:
            raise RuntimeError("AsyncKVStore is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(call, *args, **kwargs))

    async def lookup(self, tokens: Any, salt: Any = None) -> int:
        """``KVStore.lookup``: leading tokens stored (any tier)."""
        return await self._run(self.store.lookup, tokens, salt)

    async def plan(self, tokens: Any, salt: Any = None) -> LoadPlan:
        """``KVStore.plan``: how many leading tokens loading beats recomputing."""
        return await self._run(self.store.plan, tokens, salt)

    async def get(self, tokens: Any, salt: Any = None, device: torch.device | str = "cpu") -> torch.Tensor:
        return await self._run(self.store.get, tokens, salt, device)

    async def get_into(self, tokens: Any, out: torch.Tensor, salt: Any = None) -> int:
        """``KVStore.get_into``. A cancelled await does not stop the copy into ``out``: reuse ``out`` only once
        the call has ended (``close`` waits for it)."""
        return await self._run(self.store.get_into, tokens, out, salt)

    async def put(self, tokens: Any, kv: torch.Tensor, salt: Any = None) -> int:
        return await self._run(self.store.put, tokens, kv, salt)

    async def prefetch(self, tokens: Any, salt: Any = None, policy: str | None = None) -> PrefetchHandle:
        """``KVStore.prefetch``: it queues fetches, but first asks the tiers which blocks they hold (a round
        trip to a cache server, a ``stat`` on a share)."""
        return await self._run(self.store.prefetch, tokens, salt, policy)

    async def wait(self, handle: PrefetchHandle, timeout: float | None = None) -> int:
        """``handle.wait(timeout)`` without blocking the loop: leading tokens ready in the fastest tier."""
        if not isinstance(handle, PrefetchHandle):
            raise ValueError(f"handle: expected a PrefetchHandle from prefetch(), got {type(handle).__name__}")
        return await self._run(handle.wait, check_timeout(timeout))

    async def load(self, tokens: Any, salt: Any = None, **options: Any) -> torch.Tensor | LayerLoader:
        """``KVStore.load`` (``prefetch=``, ``layer_wise=``, ... as there). A load cancelled while it runs (a
        ``wait_for`` timeout) goes on in its thread: an ``out=`` you gave may still be written after the
        cancellation returns, as ``get_into``'s may."""
        return await self._run(self.store.load, tokens, salt, **options)

    async def save(self, tokens: Any, kv: torch.Tensor | None = None, salt: Any = None,
                   **options: Any) -> int | LayerSaver:
        """``KVStore.save`` (``layer_wise=``, ``start=`` as there)."""
        return await self._run(self.store.save, tokens, kv, salt, **options)

    async def flush(self, timeout: float | None = None) -> bool:
        return await self._run(self.store.flush, timeout)

    async def close(self) -> None:
        """Stop taking calls; wait (off the loop) for those running, then stop the threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(None, functools.partial(self._pool.shutdown, wait=True))

    async def __aenter__(self) -> "AsyncKVStore":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
