"""The vLLM worker's copies between its paged KV caches and a ``KVStore``, on CUDA and CPU caches alike.

No vLLM import: a GPU machine with torch but no vLLM tests it (``gpu_check``).

Saves (``CopyEngine.save``), staged on CUDA:

1. the request's tokens are gathered from vLLM's pages into a device
   staging chunk on the *current* (vLLM's compute) stream, so the gather
   runs after the forward that wrote them and before any later kernel may
   reuse the pages: no synchronisation needed for the pages' sake;
2. the copy engine's own stream waits on an event recorded after the
   gather and copies the chunk device-to-host into pinned memory;
3. a background thread waits for that copy's event and stores the chunk
   (``store.put_from``); only then is the staging chunk free again.

Staging is a fixed number of chunks allocated once (``staging_bytes`` of
device memory and as much pinned host memory): no allocation on the hot
path. When every chunk is in flight a save waits up to ``SAVE_WAIT_SECONDS``
and then drops what is left of the request (counted as ``save_skipped``): a
dropped save is a later miss, never a stalled step. On CPU caches a save
gathers straight into the store's host slots (``paged_store.save_paged``:
one copy, nothing staged); ``staged=True`` runs the CUDA path's staging and
thread on CPU caches, so the tests here cover it.

Loads (``CopyEngine.load``): the store's layer-wise loader brings layer i
host-to-device on its own stream and records an event; ``LoadJob.advance``
makes the current stream wait on it before scattering into the pages. A
load whose scatter must be complete before the forward (a FULL CUDA graph
will replay without calling ``wait_for_layer_load``) or an async load (run
in a thread on the engine's stream, reported done only once its event has
completed) is advanced to the last layer at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvstore.buffers import empty_host
from kvstore.integrations.paged_store import PagePlaces, block_sink, check_pages, save_paged

log = logging.getLogger(__name__)

SAVE_WAIT_SECONDS = 0.5  # longest a save waits for a free staging chunk before dropping the rest
MAX_CHUNKS = 4


@dataclass
class LoadJob:
    """One request's layer-wise load into its pages: tokens ``[start, end)`` into ``block_ids``."""

    engine: "CopyEngine"
    loader: Any
    block_ids: Sequence[int]
    start: int
    end: int
    sunk: bool  # the loader scatters into the pages itself (CPU caches)
    next_layer: int = 0
    where: Any = None
    loaded: int = 0  # tokens [0, loaded) are in the pages once every layer is done
    started: float = 0.0
    spec: Any = None  # what the caller loads it for (the connector's LoadSpec)

    @property
    def done(self) -> bool:
        return self.next_layer >= self.engine.num_layers

    def advance(self, upto: int) -> None:
        """Scatter layers ``next_layer .. upto`` into the pages (on the current stream); a failure loads 0."""
        upto = min(upto, self.engine.num_layers - 1)
        adapter = self.engine.adapter
        try:
            if self.sunk and self.next_layer <= upto:
                self.loader.wait_layer(upto)
                self.loaded = min(self.loader.num_tokens, self.end)
                self.next_layer = upto + 1
            while self.next_layer <= upto:
                if self.where is None:
                    self.loaded = min(self.loader.num_tokens, self.end)
                    self.where = (adapter.locate(self.block_ids, self.loaded - self.start, start=self.start)
                                  if self.loaded > self.start else False)
                kv = self.loader.layer(self.next_layer)
                if self.where is not False:
                    first = self.loader.first_token
                    adapter.scatter_layer(self.next_layer, kv[:, self.start - first:self.loaded - first], self.where)
                    if kv.is_cuda:  # the ring is read on this stream, not the loader's
                        kv.record_stream(torch.cuda.current_stream(kv.device))
                self.next_layer += 1
        except Exception as exc:
            log.warning("a load of tokens [%d, %d) failed (vLLM recomputes them): %r", self.start, self.end, exc)
            self.loaded = 0
            self.next_layer = self.engine.num_layers
        if self.done:
            self.loader.close()

    def finish(self) -> int:
        """Every layer's scatter queued on the current stream (ordered before the forward); returns the
        tokens the pages hold once it has run."""
        self.advance(self.engine.num_layers - 1)
        return self.loaded


class _Chunk:
    """One staging chunk: ``[L, P, chunk_tokens, H, D]`` pinned on the host, and on the device for CUDA caches."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.host = (torch.empty(shape, dtype=dtype, pin_memory=True) if device.type == "cuda"
                     else empty_host(shape, dtype))
        self.device = torch.empty(shape, dtype=dtype, device=device) if device.type == "cuda" else self.host


class CopyEngine:
    """Saves and loads of one worker's caches (see module docstring); ``close()`` drains and stops its thread."""

    def __init__(self, store: Any, adapter: Any, staging_bytes: int, staged: bool | None = None):
        self.store = store
        self.adapter = adapter
        self.layout = store.layout
        self.num_layers = store.layout.num_layers
        self.device = adapter.device
        self.cuda = self.device.type == "cuda"
        self.staged = self.cuda if staged is None else staged
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.skipped = 0  # saves (or their tails) dropped for want of staging
        self.staging_bytes = 0
        self._chunks: list[_Chunk] = []
        self._free: queue.Queue[_Chunk] = queue.Queue()
        self._jobs: queue.Queue[tuple | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._idle_lock = threading.RLock()
        self._idle = threading.Condition(self._idle_lock)
        if self.staged:
            lay = self.layout
            per_token = lay.token_bytes * (2 if self.cuda else 1)  # device + pinned host
            chunk = max(lay.block_tokens, staging_bytes // MAX_CHUNKS // per_token // lay.block_tokens * lay.block_tokens)
            count = max(1, min(MAX_CHUNKS, staging_bytes // (chunk * per_token)))
            self.chunk_tokens = chunk
            for _ in range(count):
                c = _Chunk(lay.shape(chunk), lay.dtype, self.device)
                self._chunks.append(c)
                self._free.put(c)
            self.staging_bytes = count * chunk * per_token
            self._thread = threading.Thread(target=self._store_chunks, name="kvstore-vllm-save", daemon=True)
            self._thread.start()

    # -- saves ---------------------------------------------------------------------------------------

    def save(self, tokens: Sequence[int], salt: str | None, block_ids: Sequence[int], start: int) -> int:
        """Store tokens ``[start, len(tokens))`` (``start`` a store block boundary) from the pages at
        ``block_ids``; returns the tokens handed over (fewer if staging stayed full)."""
        if not self.staged:
            save_paged(self.store, tokens, self.adapter, block_ids, salt, start)
            return len(tokens) - start
        check_pages(PagePlaces(self.adapter, block_ids), tokens, start)  # all of it, before a chunk is stored
        for lo in range(start, len(tokens), self.chunk_tokens):
            hi = min(len(tokens), lo + self.chunk_tokens)
            try:
                chunk = self._free.get(timeout=SAVE_WAIT_SECONDS)
            except queue.Empty:
                self.skipped += 1
                log.info("staging full for %.1f s: tokens [%d, %d) of a request are not saved", SAVE_WAIT_SECONDS,
                         lo, len(tokens))
                return lo - start
            try:
                where = self.adapter.locate(block_ids, hi - lo, start=lo)
                for layer in range(self.num_layers):
                    self.adapter.gather_layer(layer, where, out=chunk.device[layer, :, :hi - lo])
            except BaseException:
                self._free.put(chunk)  # a gather that fails (bad block ids) must not leak its staging
                raise
            copied = None
            if self.cuda:
                gathered = torch.cuda.Event()
                gathered.record(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self.stream):
                    self.stream.wait_event(gathered)
                    chunk.host[:, :, :hi - lo].copy_(chunk.device[:, :, :hi - lo], non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record(self.stream)
            with self._idle_lock:
                self._pending += 1
            self._jobs.put((chunk, copied, list(tokens[:hi]), salt, lo))
        return len(tokens) - start

    def _store_chunks(self) -> None:
        while (job := self._jobs.get()) is not None:
            chunk, copied, tokens, salt, lo = job
            try:
                if copied is not None:
                    copied.synchronize()
                host = chunk.host

                def fill(block: Any, dst: torch.Tensor) -> None:
                    dst.copy_(host[:, :, block.start - lo:block.end - lo])
                self.store.put_from(tokens, fill, salt=salt, start=lo)
            except Exception as exc:  # a save that cannot be made is a later miss
                log.warning("storing tokens [%d, %d) failed: %r", lo, len(tokens), exc)
            finally:
                self._free.put(chunk)
                with self._idle_lock:
                    self._pending -= 1
                    self._idle.notify_all()

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every staged save is stored; False if ``timeout`` seconds passed first."""
        deadline = time.monotonic() + timeout
        with self._idle_lock:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    # -- loads ----------------------------------------------------------------------------------------

    def load(self, tokens: Sequence[int], salt: str | None, block_ids: Sequence[int], start: int,
             end: int) -> LoadJob:
        """Start loading tokens ``[start, end)`` of ``tokens`` into ``block_ids`` (blocks before ``start`` not read)."""
        sunk = not self.cuda
        sink = block_sink(self.adapter, block_ids, start, end) if sunk else None
        loader = self.store.load(tokens, salt, layer_wise=True, device=self.device, sink=sink, skip=start)
        return LoadJob(self, loader, block_ids, start, end, sunk, started=time.perf_counter())

    def load_now(self, job: LoadJob) -> int:
        """Run ``job`` to the end on the engine's own stream (an async load's thread); returns tokens loaded."""
        if not self.cuda:
            return job.finish()
        with torch.cuda.stream(self.stream):
            loaded = job.finish()
        self.stream.synchronize()  # reported finished only once the bytes are in the pages
        return loaded

    def close(self) -> None:
        if self._thread is not None:
            self.drain()
            self._jobs.put(None)
            self._thread.join(timeout=30)
            self._thread = None
        self._chunks.clear()
