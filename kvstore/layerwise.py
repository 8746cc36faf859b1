"""Layer-wise load and save: hand the engine layer i while layer i+1 is still being copied.

``LayerLoader`` (``KVStore.load(..., layer_wise=True)``) first makes every
planned block readable (pinned in a memory tier by a prefetch handle, or read
into a private buffer), which fixes how many tokens it delivers; then a
worker copies one layer of every block into a layer buffer on the engine's
device, at most ``lookahead`` layers ahead of the layer the engine holds.
The engine's attention for layer i runs while layer i+1's copy (a
host-to-device transfer on a GPU) is in flight: load time hides behind
compute. Buffers are a ring of ``lookahead + 1`` layers, so memory is
bounded by that many layers, not the whole prefix.

``LayerSaver`` (``KVStore.save(..., layer_wise=True)``) takes one layer at a
time during the forward pass, copies it into a staging buffer and stores the
blocks when their last layer arrives.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch

from kvstore.buffers import BufferPool, empty_host
from kvstore.gate import check_process
from kvstore.keys import BlockRef
from kvstore.layout import KVLayout
from kvstore.prefetch import CLOSE_JOIN_SECONDS, PrefetchHandle

# Reads a block into ``dst`` (its canonical view) from whichever tier has it; False on a miss.
ReadBlock = Callable[[BlockRef, torch.Tensor], bool]
# Reads blocks into their ``dsts`` in order until one is missing; how many were read (a disk tier reads a run of
# them side by side).
ReadRun = Callable[[Sequence[BlockRef], Sequence[torch.Tensor]], int]
# Takes layer ``layer`` of the loaded blocks as ``(first token, [P, block tokens, H, D])`` pairs, in token order.
LayerSink = Callable[[int, list[tuple[int, torch.Tensor]]], None]
log = logging.getLogger(__name__)
# How often a worker waiting for the engine to take layers looks whether its loader was dropped (seconds).
WORKER_POLL_SECONDS = 0.5


class _Pipeline:
    """The copying worker and what it shares with the engine's thread.

    Kept apart from ``LayerLoader`` (it holds no reference to it), so an
    engine that drops a loader half-way, without ``close()``, still gets its
    worker stopped and its pins released when the loader is collected.
    """

    def __init__(self, layout: KVLayout, blocks: Sequence[BlockRef], handle: PrefetchHandle,
                 read_block: ReadBlock, device: torch.device, lookahead: int,
                 on_layer: Callable[[int], None] | None, on_sized: Callable[[int, float], None] | None,
                 buffers: BufferPool | None = None, sink: LayerSink | None = None, read_run: ReadRun | None = None,
                 on_hit: Callable[[bytes], None] | None = None):
        self.layout = layout
        self.read_run = read_run
        self.on_hit = on_hit
        self.buffers = buffers
        self.sink = sink
        self.blocks = list(blocks)
        self.handle = handle
        self.read_block = read_block
        self.device = device
        self.lookahead = lookahead
        self.on_layer = on_layer
        self.on_sized = on_sized
        self.pid = os.getpid()  # its worker's process: a forked child's waits would never end
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.num_tokens: int | None = None
        self.first_token = self.blocks[0].start if self.blocks else 0  # the ring's token 0
        self.loaded = 0  # layers copied
        self.taken = -1  # the layer the engine holds
        self.closed = False
        self.error: BaseException | None = None
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.copied: list[torch.cuda.Event | None] = [None] * layout.num_layers
        self.released: list[torch.cuda.Event | None] = [None] * layout.num_layers
        self.ring: list[torch.Tensor] = []

    def sources(self) -> list[torch.Tensor]:
        """A readable block view per planned block, stopping at the first that cannot be had: the prefetch's
        pinned view, else a private copy (each run of blocks not pinned read by one ``read_run``, if given)."""
        self.handle.result(stop=lambda: self.closed)
        # By key, never by position: a load that skips leading blocks, or a handle of another prompt, has
        # pins that are not its blocks in order (they were handed out as the wrong tokens' KV).
        pinned = {block.key: view for block, view in zip(self.handle.blocks, self.handle.views())}

        def pinned_view(i: int) -> torch.Tensor | None:
            view = pinned.get(self.blocks[i].key)
            return view if view is not None and tuple(view.shape) == self.layout.shape(self.blocks[i].num_tokens) \
                else None

        def is_pinned(i: int) -> bool:
            return pinned_view(i) is not None

        found = self.handle.found_ready
        sources: list[torch.Tensor] = []
        while len(sources) < len(self.blocks) and not self.closed:  # closed: no more reads for nobody
            start = len(sources)
            view = pinned_view(start)
            if view is not None:
                sources.append(view)
                if self.on_hit is not None and self.blocks[start].key in found:
                    self.on_hit(self.blocks[start].key)  # read where it was: a read hit, as a get's
                continue
            end = start + 1
            while self.read_run is not None and end < len(self.blocks) and not is_pinned(end):
                end += 1
            run = self.blocks[start:end]
            privates = [torch.empty(self.layout.shape(block.num_tokens), dtype=self.layout.dtype) for block in run]
            if self.read_run is not None:
                got = self.read_run(run, privates)
            else:
                got = int(self.read_block(run[0], privates[0]))
            sources.extend(privates[:got])
            if got < len(run):
                break
        return sources

    def run(self) -> None:
        try:
            start = time.perf_counter()
            sources = self.sources()
            num_tokens = self.blocks[len(sources) - 1].end if sources else 0
            with self.lock:
                self.num_tokens = num_tokens
                shape = self.layout.shape(max(0, num_tokens - self.first_token))[1:]
                self.ring = [] if self.sink is not None else [
                    self.host_buffer(shape) if self.device.type == "cpu" else
                    torch.empty(shape, dtype=self.layout.dtype, device=self.device)
                    for _ in range(min(self.lookahead + 1, self.layout.num_layers))]
                self.cond.notify_all()
            if self.on_sized is not None:
                self.on_sized(max(0, num_tokens - self.first_token), time.perf_counter() - start)
            for layer in range(self.layout.num_layers):
                with self.lock:  # a sink holds no ring: nothing bounds how far ahead it runs
                    while not self.closed and self.sink is None and layer > self.taken + self.lookahead:
                        self.cond.wait(WORKER_POLL_SECONDS)  # ``abandon`` sets ``closed`` without a notify
                    if self.closed:
                        return
                self.copy_layer(layer, sources)
                with self.lock:
                    self.loaded = layer + 1
                    self.cond.notify_all()
                if self.on_layer is not None:
                    self.on_layer(layer)
        except BaseException as exc:  # handed to the engine's thread by layer()
            with self.lock:
                self.error = exc
                self.cond.notify_all()
        finally:
            self.settle()
            self.handle.close()

    def host_buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.buffers is None:
            return empty_host(shape, self.layout.dtype)
        return self.buffers.take(shape, self.layout.dtype)

    def give_back(self) -> None:
        """Hand the ring to the buffer pool (only once the worker has stopped)."""
        with self.lock:
            ring, self.ring = self.ring, []
        if self.buffers is not None and self.device.type == "cpu":
            for buf in ring:
                self.buffers.give(buf)

    def copy_layer(self, layer: int, sources: Sequence[torch.Tensor]) -> None:
        if self.sink is not None:
            self.sink(layer, [(block.start, src[layer]) for block, src in zip(self.blocks, sources)])
            return
        buf = self.ring[layer % len(self.ring)]
        if self.stream is None:
            for block, src in zip(self.blocks, sources):
                buf[:, block.start - self.first_token:block.end - self.first_token].copy_(src[layer])
            return
        reused = layer - len(self.ring)
        with torch.cuda.stream(self.stream):
            if reused >= 0 and self.released[reused] is not None:
                self.stream.wait_event(self.released[reused])  # the engine's reads of that buffer are done
            for block, src in zip(self.blocks, sources):
                buf[:, block.start - self.first_token:block.end - self.first_token].copy_(src[layer],
                                                                                          non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.copied[layer] = event

    def wait(self, ready: Callable[[], bool]) -> None:
        with self.lock:
            while not ready() and self.error is None and not self.closed:
                self.cond.wait()
            if ready():
                return
            if self.error is not None:
                raise RuntimeError(f"layer-wise load failed: {self.error!r}") from self.error
            raise RuntimeError("layer-wise load is closed")

    def halt(self) -> None:
        """Stop the worker at its next step (from any thread; idempotent)."""
        with self.lock:
            self.closed = True
            self.cond.notify_all()

    def stop(self) -> None:
        """Stop the worker at its next step and release the pins (from any thread; idempotent)."""
        self.halt()
        self.settle()
        self.handle.close()

    def abandon(self) -> None:
        """``stop`` for the loader's finalizer, taking no lock: the garbage collector runs it inside whatever
        lock its thread holds (a slot tier's, the buffer pool's the worker may wait for under ``cond``). The
        worker sees ``closed`` within ``WORKER_POLL_SECONDS``; the pins go to the prefetcher to release."""
        self.closed = True
        self.settle()
        self.handle.abandon()

    def settle(self) -> None:
        """Wait for the copies queued on the loader's stream: they read pinned slots, whose pins go next."""
        if self.stream is not None:
            self.stream.synchronize()


class LoaderWorkers:
    """The worker threads of the layer-wise loads a store gave out, held until each ends.

    A loader the engine dropped is collected while its worker may still be
    inside a tier's read; the store's ``close`` returned at once and the
    worker read the files tier a second later, after close. ``close`` now
    halts every worker and waits for them, ``CLOSE_JOIN_SECONDS`` at most.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[threading.Thread, _Pipeline] = {}

    def start(self, thread: threading.Thread, pipe: _Pipeline) -> None:
        """Start ``thread`` (running ``pipe``), held until it ends."""
        with self._lock:
            for done in [t for t in self._live if not t.is_alive()]:
                del self._live[done]
            self._live[thread] = pipe
        thread.start()

    def close(self) -> None:
        """Halt every worker still running and wait for them (bounded; one stuck in a read is left to it)."""
        with self._lock:
            live, self._live = self._live, {}
        for pipe in live.values():
            pipe.halt()
        deadline = time.monotonic() + CLOSE_JOIN_SECONDS
        for thread in live:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("a layer-wise load's worker is still inside a read at the store's close (its tier has "
                            "stopped answering?); left to it")


class LayerLoader:
    """Yields ``(layer, kv)`` with ``kv`` of shape ``[P, num_tokens, H, D]``, in layer order.

    A layer's tensor stays valid until the next layer is asked for (the
    ring reuses it then): copy it into the engine's own cache first, as
    engines do. ``on_layer(i)``, if given, is called from the worker as soon
    as layer i is copied (for tracing). With a ``sink``, the worker hands
    each layer of the loaded blocks, in place, to ``sink(layer, parts)``
    instead (an engine scattering straight into its own cache: one copy,
    no ring), as fast as it can; the engine then calls ``wait_layer(i)``
    rather than ``layer(i)``. Blocks the prefetch did not pin are read with
    ``read_block``, or each run of them with one ``read_run`` call if given
    (the files tier reads a run side by side). ``close()`` stops the worker and
    releases every pin (its layer buffers go back to the store for reuse: do
    not keep a layer tensor past it); a loader used as a context manager closes itself,
    and one dropped without either is stopped when it is garbage collected.
    """

    def __init__(self, layout: KVLayout, blocks: Sequence[BlockRef], handle: PrefetchHandle,
                 read_block: ReadBlock, device: torch.device | str = "cpu", lookahead: int = 2,
                 on_layer: Callable[[int], None] | None = None, on_sized: Callable[[int, float], None] | None = None,
                 buffers: BufferPool | None = None, sink: LayerSink | None = None, read_run: ReadRun | None = None,
                 on_hit: Callable[[bytes], None] | None = None, workers: LoaderWorkers | None = None):
        if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 1:
            raise ValueError(f"lookahead: expected an integer >= 1, got {lookahead!r}")
        self.layout = layout
        self.device = torch.device(device)
        self.lookahead = lookahead
        self._pipe = _Pipeline(layout, blocks, handle, read_block, self.device, lookahead, on_layer, on_sized,
                               buffers, sink, read_run, on_hit)
        self._thread = threading.Thread(target=self._pipe.run, name="kvstore-layer-loader", daemon=True)
        self._finalizer = weakref.finalize(self, self._pipe.abandon)
        (workers or LoaderWorkers()).start(self._thread, self._pipe)

    @property
    def num_tokens(self) -> int:
        """Leading tokens every layer holds (waits until the blocks are readable)."""
        self._pipe.wait(lambda: self._pipe.num_tokens is not None)
        return self._pipe.num_tokens

    @property
    def first_token(self) -> int:
        """The token a layer's tensor starts at (0 unless the load skipped leading blocks)."""
        return self._pipe.first_token

    @property
    def loaded_layers(self) -> int:
        """Layers copied so far."""
        with self._pipe.lock:
            return self._pipe.loaded

    def wait_layer(self, index: int) -> None:
        """Wait until layer ``index`` is delivered (into the sink, or the ring); raises what the worker raised."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.layout.num_layers:
            raise ValueError(f"layer: expected an int in [0, {self.layout.num_layers}), got {index!r}")
        pipe = self._pipe
        check_process(pipe.pid, "the store of this layer-wise load")
        with pipe.lock:
            reach = pipe.taken + pipe.lookahead
        if pipe.sink is None and index > reach:  # the worker waits for layers to be taken: this would never return
            raise ValueError(f"layer: expected at most layer {reach} until more are taken (a loader without a "
                             f"sink copies {pipe.lookahead} layer(s) ahead of the engine), got {index}")
        pipe.wait(lambda: pipe.loaded > index)

    def layer(self, index: int) -> torch.Tensor:
        """Layer ``index`` as ``[P, num_tokens, H, D]``; layers are asked for in order, each once."""
        pipe = self._pipe
        check_process(pipe.pid, "the store of this layer-wise load")  # before its lock: a fork copies it held
        if pipe.sink is not None:
            raise ValueError("layer: this loader hands layers to its sink; expected wait_layer(index)")
        with pipe.lock:
            if pipe.closed:
                raise RuntimeError("layer-wise load is closed")
            expected = pipe.taken + 1
            if index != expected:
                raise ValueError(f"layer: expected layer {expected} next (layers come in order, once each), "
                                 f"got {index}")
            if index >= self.layout.num_layers:
                raise ValueError(f"layer: expected < {self.layout.num_layers} layers, got {index}")
        if pipe.stream is not None and index > 0:
            released = torch.cuda.Event()
            released.record(torch.cuda.current_stream(self.device))
            pipe.released[index - 1] = released
        with pipe.lock:
            pipe.taken = index
            pipe.cond.notify_all()
        pipe.wait(lambda: pipe.loaded > index)
        if pipe.stream is not None:
            torch.cuda.current_stream(self.device).wait_event(pipe.copied[index])
        with pipe.lock:  # a close from another thread (the store's) may have handed the ring back meanwhile
            if pipe.closed or not pipe.ring:
                raise RuntimeError("layer-wise load is closed")
            return pipe.ring[index % len(pipe.ring)]

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        for index in range(self._pipe.taken + 1, self.layout.num_layers):
            yield index, self.layer(index)

    def close(self) -> None:
        """Stop copying, release the prefetch pins and the layer buffers. A worker still inside a tier's read
        after ``CLOSE_JOIN_SECONDS`` (a share that stopped answering) is left to it: it releases the pins
        itself when the read returns (close waited for ever)."""
        if self._thread is not threading.current_thread():
            # The pins go once the worker is done: on a CPU its copy out of a pinned slot runs in the
            # worker itself, and a slot unpinned before it ends could be refilled under it.
            self._pipe.halt()
            self._thread.join(CLOSE_JOIN_SECONDS)
            self._finalizer.detach()
            if self._thread.is_alive():
                log.warning("a layer-wise load's worker is still inside a read at close (its tier has stopped "
                            "answering?); left to it")
                return
            self._pipe.stop()
            self._pipe.give_back()
        else:
            self._finalizer.detach()
            self._pipe.stop()
            with self._pipe.lock:
                self._pipe.ring = []

    def __enter__(self) -> "LayerLoader":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class LayerSaver:
    """Takes a request's KV one layer at a time; stores its blocks when the last layer arrives.

    ``kv`` for ``save_layer`` covers tokens ``[start, len(tokens))`` as
    ``[P, tokens, H, D]``. Blocks before ``start`` (already stored, or loaded
    from the store) are not written. ``store_blocks(blocks, kv, head)``
    writes the blocks whose KV is ``kv`` (token 0 of ``kv`` is
    ``blocks[0].start``) after the prompt's blocks ``head`` (their keys) and
    returns how many were newly stored.
    """

    def __init__(self, layout: KVLayout, blocks: Sequence[BlockRef], start: int,
                 store_blocks: Callable[[Sequence[BlockRef], torch.Tensor, Sequence[bytes]], int],
                 buffers: BufferPool | None = None):
        total = blocks[-1].end if blocks else 0
        bounds = {0, total} | {block.start for block in blocks}
        if isinstance(start, bool) or not isinstance(start, int) or start not in bounds:
            raise ValueError(f"start: expected a block boundary in {sorted(bounds)}, got {start!r}")
        self.layout = layout
        self.start = start
        self.num_tokens = total
        self._blocks = [block for block in blocks if block.start >= start]
        self._head = [block.key for block in blocks if block.start < start]
        self._store_blocks = store_blocks
        self._buffers = buffers
        shape = layout.shape(total - start)
        self._staging = empty_host(shape, layout.dtype) if buffers is None else buffers.take(shape, layout.dtype)
        self._seen = [False] * layout.num_layers
        self._copied = 0
        self._lock = threading.Lock()
        self.stored: int | None = None

    @property
    def done(self) -> bool:
        """True once every layer arrived and the blocks were stored."""
        return self.stored is not None

    def layer_buffer(self, layer: int) -> torch.Tensor:
        """Where layer ``layer`` is staged, ``[P, tokens, H, D]``: an engine may write the layer there
        itself and pass this tensor to ``save_layer``, which then copies nothing."""
        return self._staging[layer]

    def save_layer(self, layer: int, kv: torch.Tensor) -> int | None:
        """Take layer ``layer``'s KV; returns blocks newly stored when this was the last layer, else None."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.layout.num_layers:
            raise ValueError(f"layer: expected an int in [0, {self.layout.num_layers}), got {layer!r}")
        expected = self.layout.shape(self.num_tokens - self.start)[1:]
        if not isinstance(kv, torch.Tensor) or tuple(kv.shape) != expected:
            got = list(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__
            raise ValueError(f"kv: expected shape {list(expected)} ([kv_parts, tokens from {self.start}, heads, "
                             f"head_dim]), got {got}")
        if kv.dtype != self.layout.dtype:
            raise ValueError(f"kv: expected dtype {self.layout.dtype}, got {kv.dtype}")
        if kv.layout != torch.strided or kv.device.type == "meta":
            raise ValueError(f"kv: expected a dense tensor that holds data, got layout {kv.layout} on {kv.device}")
        with self._lock:
            if self._seen[layer]:
                raise ValueError(f"layer: expected each layer once, got layer {layer} again")
            self._seen[layer] = True
        staged = self._staging[layer]
        if kv.data_ptr() != staged.data_ptr() or kv.stride() != staged.stride():
            staged.copy_(kv.detach())
        with self._lock:
            self._copied += 1
            if self._copied < self.layout.num_layers:
                return None
        staging, self._staging = self._staging, torch.empty(0)
        try:
            self.stored = self._store_blocks(self._blocks, staging, self._head) if self._blocks else 0
        finally:
            if self._buffers is not None:
                self._buffers.give(staging)
        return self.stored
