"""The engine hooks of ``KVStore``: plan, prefetch, load (whole or layer by layer) and save.

Kept apart from the store's put/lookup/get core so each reads on its own;
``KVStore`` inherits them. They use the store's keys (``_keys``), tiers and
their health (``tiers``, ``_health``), and its guarded tier calls
(``_where``, ``_contains``, ``_available``, ``_read_block``, ``_write``,
``_fill``, ``_store_blocks``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence

import torch

from kvstore.buffers import BufferPool
from kvstore.config import StoreConfig
from kvstore.keys import BlockRef, Salt, Tokens
from kvstore.layerwise import LayerLoader, LayerSaver, LayerSink
from kvstore.planner import LoadPlan, Planner, TierCost, tier_bandwidth
from kvstore.prefetch import WAIT, Prefetcher, PrefetchHandle, PrefetchPolicy

# What ``_pin_fastest`` returns for a block a tier that cannot pin holds: it is ready where it is.
_PRESENT = torch.empty(0)


def num_tokens_of(blocks: Sequence[BlockRef]) -> int:
    """Tokens covered by ``blocks`` (a request's blocks, in order)."""
    return blocks[-1].end if blocks else 0


class EngineHooks:
    """``plan``, ``record_prefill``, ``prefetch``, ``load`` and ``save`` of a ``KVStore``."""

    def _start_hooks(self, config: StoreConfig) -> None:
        """The planner and the prefetch workers (stopped by ``close``)."""
        self._planner = Planner(config.prefill_tokens_per_second)
        self._policy = PrefetchPolicy(config.prefetch_policy, config.prefetch_timeout_base_seconds,
                                      config.prefetch_timeout_per_1k_tokens_seconds)
        self._scratch = threading.local()
        self._buffers = BufferPool(config.staging_bytes)
        slots = getattr(self.tiers[0], "num_slots", None)  # prefetches pin at most half the fastest slot pool
        self._prefetcher = Prefetcher(self._bring_up, self._pin_fastest, self._unpin_fastest,
                                      config.prefetch_workers, config.prefetch_queue_blocks,
                                      max_pins=None if slots is None else slots // 2)

    def plan(self, tokens: Tokens, salt: Salt = None) -> LoadPlan:
        """How many leading tokens of ``tokens`` to load, and from which tiers (see ``kvstore/planner.py``).

        Never plans a load expected to take longer than recomputing the same
        tokens at the engine's prefill throughput.
        """
        self._check_open()
        return self._plan(self._keys.blocks(tokens, salt))

    def _plan(self, blocks: Sequence[BlockRef]) -> LoadPlan:
        costs: dict[int, TierCost] = {}
        found = []
        for block, where in zip(blocks, self._locate([b.key for b in blocks])):
            if where not in costs:
                costs[where] = self._tier_cost(where)
            found.append((block.end, block.num_tokens * self.layout.token_bytes, costs[where]))
        return self._planner.plan(num_tokens_of(blocks), found)

    def _tier_cost(self, i: int) -> TierCost:
        codec = getattr(getattr(self.tiers[i], "encoding", None), "codec", None)
        decode = codec.decode_bytes_per_second if codec is not None else math.inf
        name = self.tiers[i].name
        return TierCost(name, tier_bandwidth(name, self._health[i].read_bandwidth, decode))

    def record_prefill(self, num_tokens: int, seconds: float) -> None:
        """Tell the planner the engine prefilled ``num_tokens`` tokens in ``seconds`` (its throughput estimate)."""
        self._planner.record_prefill(num_tokens, seconds)

    def prefetch(self, tokens: Tokens, salt: Salt = None, policy: str | None = None) -> PrefetchHandle:
        """Start bringing the stored leading blocks of ``tokens`` into the fastest tier; returns at once.

        ``policy`` (default: the config's ``prefetch_policy``) says how long
        ``handle.result()`` and ``load(..., prefetch=handle)`` wait. The
        handle pins what it brought up until it is closed or consumed by ``load``.
        """
        self._check_open()
        blocks = self._keys.blocks(tokens, salt)
        chosen = self._policy if policy is None else PrefetchPolicy(
            policy, self._policy.timeout_base_seconds, self._policy.timeout_per_1k_tokens_seconds)
        return self._prefetcher.start(blocks, lambda key: self._where(key) is not None, chosen)

    def _pin_fastest(self, key: bytes) -> torch.Tensor | None:
        """Pin ``key`` in the fastest tier; a tier that cannot pin (persistent) gives an empty marker if it has it."""
        pin = getattr(self.tiers[0], "pin", None)
        if pin is not None:
            return pin(key) if self._available(0) else None
        return _PRESENT if self._contains(0, key) else None

    def _unpin_fastest(self, key: bytes) -> None:
        unpin = getattr(self.tiers[0], "unpin", None)
        if unpin is not None:
            unpin(key)

    def _bring_up(self, block: BlockRef) -> bool:
        """Read ``block`` from the tier that has it into the fastest tier (a prefetch worker's job)."""
        if self._contains(0, block.key):
            return True
        scratch = getattr(self._scratch, "buffer", None)
        if scratch is None:
            scratch = self._scratch.buffer = torch.empty(self.layout.block_shape, dtype=self.layout.dtype)
        dst = scratch.view(-1)[:self.layout.token_bytes // self.layout.element_bytes * block.num_tokens]
        dst = dst.view(self.layout.shape(block.num_tokens))
        if not self._read_block(block.key, dst):
            return False
        if not self._contains(0, block.key):
            self._write(0, [(block.key, dst)])
        return self._contains(0, block.key)

    def load(self, tokens: Tokens, salt: Salt = None, *, layer_wise: bool = False,
             device: torch.device | str = "cpu", prefetch: PrefetchHandle | None = None,
             plan: LoadPlan | None = None, out: torch.Tensor | None = None,
             sink: LayerSink | None = None) -> torch.Tensor | LayerLoader:
        """Load the KV of the leading tokens of ``tokens`` the planner says are worth loading.

        Returns ``[L, P, n, H, D]`` on ``device``, or with ``layer_wise`` a
        ``LayerLoader`` that yields one layer at a time while it copies the
        next (``loader.num_tokens`` is ``n``). ``prefetch``: a handle from
        ``prefetch(tokens)``: with ``best_effort`` or ``timeout`` only what its
        policy finds ready in the fastest tier is loaded (the engine computes
        the rest), with ``wait`` everything planned; the handle is closed.
        ``plan``: a plan made by ``plan(tokens)`` (else one is made now).
        ``out``: a buffer ``[L, P, len(tokens), H, D]`` to load into (an
        engine's preallocated one); the result is then a view of it.
        ``sink``: with ``layer_wise``, ``sink(layer, [(first token, block
        layer)])`` receives each layer in place of the loader's ring (see
        ``LayerLoader``): an engine on the CPU scatters straight from the
        store's blocks into its own cache.
        """
        self._check_open()
        blocks = self._keys.blocks(tokens, salt)
        if out is not None:
            if layer_wise:
                raise ValueError("out: expected None with layer_wise=True (the loader yields layers), got a tensor")
            self.layout.check_kv(out, num_tokens_of(blocks))
        if sink is not None and not layer_wise:
            raise ValueError("sink: expected None without layer_wise=True, got a callable")
        if prefetch is not None and prefetch.blocks and (not blocks or prefetch.blocks[0].key != blocks[0].key):
            raise ValueError("prefetch: expected a handle from prefetch() of these tokens and salt, got one of others")
        if plan is not None and plan.num_tokens != num_tokens_of(blocks):
            raise ValueError(f"plan: expected a plan of these {num_tokens_of(blocks)} tokens, got {plan.num_tokens}")
        num_tokens = (plan or self._plan(blocks)).load_tokens
        if prefetch is not None:
            ready = prefetch.result()
            if prefetch.policy.policy != WAIT:  # use what is ready; ``wait`` reads the rest from where it is
                num_tokens = min(num_tokens, ready)
        chosen = [block for block in blocks if block.end <= num_tokens]
        if layer_wise:
            handle = prefetch if prefetch is not None else self._prefetcher.start(
                chosen, lambda key: True, PrefetchPolicy(WAIT))
            return LayerLoader(self.layout, chosen, handle, lambda block, dst: self._read_block(block.key, dst),
                               device, self.config.load_lookahead_layers, on_sized=self._loaded, buffers=self._buffers,
                               sink=sink)
        start = time.perf_counter()
        if out is None:
            out = torch.empty(self.layout.shape(num_tokens), dtype=self.layout.dtype, device=device)
        try:
            filled = self._fill(chosen, out)
        finally:
            if prefetch is not None:
                prefetch.close()
        self._loaded(filled, time.perf_counter() - start)
        return out[:, :, :filled]

    def _loaded(self, num_tokens: int, seconds: float) -> None:
        self._planner.record_load(num_tokens, seconds)

    def save(self, tokens: Tokens, kv: torch.Tensor | None = None, salt: Salt = None, *,
             layer_wise: bool = False, start: int = 0) -> int | LayerSaver:
        """Store the KV the engine computed: ``put`` at once, or with ``layer_wise`` a ``LayerSaver``.

        The saver takes ``[P, tokens, H, D]`` per layer for tokens ``[start,
        len(tokens))`` (``start`` on a block boundary: the blocks before it
        are already stored) and stores the blocks when the last layer arrives.
        """
        self._check_open()
        if not layer_wise:
            if kv is None:
                raise ValueError("kv: expected a tensor [L, P, len(tokens), H, D] (or layer_wise=True), got None")
            return self.put(tokens, kv, salt)
        if kv is not None:
            raise ValueError(f"kv: expected None with layer_wise=True (layers go to save_layer), got "
                             f"{type(kv).__name__}")
        return LayerSaver(self.layout, self._keys.blocks(tokens, salt), start, self._store_blocks, self._buffers)
