"""The engine hooks of a ``KVStore``: plan, prefetch, load (whole or layer by layer) and save.

An object the store owns (``KVStore.hooks``) and delegates to, built on the
tier stack's guarded calls (``kvstore/levels.py``) and the block flow's
reads and puts (``kvstore/flow.py``). Arguments are validated before any
tier is touched.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from typing import TypeVar

import torch

from kvstore.buffers import BufferPool
from kvstore.config import StoreConfig
from kvstore.flow import BlockFlow
from kvstore.gate import Gate, gated
from kvstore.keys import BlockRef, KeyChain, Salt, Tokens
from kvstore.layerwise import LayerLoader, LayerSaver, LayerSink, LoaderWorkers
from kvstore.layout import KVLayout
from kvstore.levels import Level
from kvstore.planner import LoadPlan, Planner, TierCost, tier_bandwidth
from kvstore.prefetch import WAIT, Prefetcher, PrefetchHandle, PrefetchPolicy
from kvstore.validation import check_device, check_out

# What ``_pin_fastest`` returns for a block a fastest level that cannot pin holds: it is ready where it is.
_PRESENT = torch.empty(0)


_Closing = TypeVar("_Closing", PrefetchHandle, LayerLoader)


def num_tokens_of(blocks: Sequence[BlockRef]) -> int:
    """Tokens covered by ``blocks`` (a request's blocks, in order)."""
    return blocks[-1].end if blocks else 0


class EngineHooks:
    """``plan``, ``record_prefill``, ``prefetch``, ``load`` and ``save`` over one store's keys and tiers.

    ``gate`` is the store's (``kvstore/gate.py``): every hook runs inside
    it. Nothing here refers to the store itself, so a store dropped unclosed
    is collected (and closed) like any object.
    """

    def __init__(self, layout: KVLayout, config: StoreConfig, keys: KeyChain, flow: BlockFlow, gate: Gate):
        self.layout = layout
        self.config = config
        self._keys = keys
        self._flow = flow
        self._stack = flow.stack
        self._gate = gate
        self.planner = Planner(config.prefill_tokens_per_second)
        self._policy = PrefetchPolicy(config.prefetch_policy, config.prefetch_timeout_base_seconds,
                                      config.prefetch_timeout_per_1k_tokens_seconds)
        self.buffers = BufferPool(config.staging_bytes)
        fastest = self._stack.fastest
        slots = fastest.tier.num_slots if fastest is not None and fastest.slots else None
        # prefetches pin at most half the fastest slot pool
        self._opened: weakref.WeakSet[_Closing] = weakref.WeakSet()  # loaders and handles given out
        self._workers = LoaderWorkers()  # their worker threads, held until they end (a dropped loader's too)
        self.prefetcher = Prefetcher(lambda block: flow.bring_up(block.key, block.num_tokens), self._pin_fastest,
                                     self._unpin_fastest, config.prefetch_workers, config.prefetch_queue_blocks,
                                     max_pins=None if slots is None else slots // 2)

    def close(self) -> None:
        """Stop the layer loaders and prefetch handles still open, the prefetch workers; drop idle staging
        buffers. A loader an engine dropped unread waited on its lookahead for ever, pins held."""
        for opened in list(self._opened):
            opened.close()
        self._workers.close()
        self.prefetcher.close()
        self.buffers.clear()

    @gated
    def plan(self, tokens: Tokens, salt: Salt = None) -> LoadPlan:
        """How many leading tokens of ``tokens`` to load, and from which tiers (see ``kvstore/planner.py``).

        Never plans a load expected to take longer than recomputing the same
        tokens at the engine's prefill throughput.
        """
        return self._plan(self._keys.blocks(tokens, salt))

    def _plan(self, blocks: Sequence[BlockRef]) -> LoadPlan:
        costs: dict[int, TierCost] = {}
        found = []
        for block, level in zip(blocks, self._stack.locate([b.key for b in blocks])):
            if level.index not in costs:
                costs[level.index] = self._tier_cost(level)
            found.append((block.end, block.num_tokens * self.layout.token_bytes, costs[level.index]))
        return self.planner.plan(num_tokens_of(blocks), found)

    @staticmethod
    def _tier_cost(level: Level) -> TierCost:
        bandwidth = tier_bandwidth(level.bandwidth_prior, level.health.read_bandwidth, level.decode_bytes_per_second)
        return TierCost(level.name, bandwidth)

    def record_prefill(self, num_tokens: int, seconds: float) -> None:
        """Tell the planner the engine prefilled ``num_tokens`` tokens in ``seconds`` (its throughput estimate)."""
        self.planner.record_prefill(num_tokens, seconds)

    @gated
    def prefetch(self, tokens: Tokens, salt: Salt = None, policy: str | None = None) -> PrefetchHandle:
        """Start bringing the stored leading blocks of ``tokens`` into the fastest tier; returns at once.

        ``policy`` (default: the config's ``prefetch_policy``) says how long
        ``handle.result()`` and ``load(..., prefetch=handle)`` wait. The
        handle pins what it brought up until it is closed or consumed by ``load``.
        """
        blocks = self._keys.blocks(tokens, salt)
        chosen = self._policy if policy is None else PrefetchPolicy(
            policy, self._policy.timeout_base_seconds, self._policy.timeout_per_1k_tokens_seconds)
        located = self._stack.locate([b.key for b in blocks])
        return self._live(self.prefetcher.start(blocks[:len(located)], chosen, num_tokens_of(blocks),
                                                blocks[0].key if blocks else None))

    def _live(self, opened: _Closing) -> _Closing:
        """``opened`` (a prefetch handle or a layer loader) is closed with the store if still open then."""
        self._opened.add(opened)
        return opened

    def _pin_fastest(self, key: bytes) -> torch.Tensor | None:
        """Pin ``key`` in the fastest level; one that cannot pin (persistent) gives an empty marker if it has it."""
        fastest = self._stack.fastest
        if fastest is None:
            return None
        if fastest.slots:
            pinned = self._stack.pin(fastest, key)
            return None if pinned is None else pinned[0]
        return _PRESENT if self._stack.contains(fastest, key) else None

    def _unpin_fastest(self, key: bytes) -> None:
        fastest = self._stack.fastest
        if fastest is not None and fastest.slots:
            self._stack.unpin(fastest, key)

    @gated
    def load(self, tokens: Tokens, salt: Salt = None, *, layer_wise: bool = False,
             device: torch.device | str = "cpu", prefetch: PrefetchHandle | None = None,
             plan: LoadPlan | None = None, out: torch.Tensor | None = None,
             sink: LayerSink | None = None, skip: int = 0) -> torch.Tensor | LayerLoader:
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
        store's blocks into its own cache. ``skip`` (with ``layer_wise``):
        tokens the engine already holds; blocks that end at or before it are
        not read, and the loader's layers start at ``loader.first_token``.
        """
        blocks = self._keys.blocks(tokens, salt)
        device = check_device(device)
        if not isinstance(layer_wise, bool):
            raise ValueError(f"layer_wise: expected True or False, got {layer_wise!r}")
        if prefetch is not None and not isinstance(prefetch, PrefetchHandle):
            raise ValueError(f"prefetch: expected a PrefetchHandle from prefetch(), got {type(prefetch).__name__}")
        if plan is not None and not isinstance(plan, LoadPlan):
            raise ValueError(f"plan: expected a LoadPlan from plan(), got {type(plan).__name__}")
        if out is not None:
            if layer_wise:
                raise ValueError("out: expected None with layer_wise=True (the loader yields layers), got a tensor")
            check_out(self.layout, out, num_tokens_of(blocks))
        if sink is not None and not layer_wise:
            raise ValueError("sink: expected None without layer_wise=True, got a callable")
        if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0 or (skip and not layer_wise):
            raise ValueError(f"skip: expected an int >= 0 (and layer_wise=True when > 0), got {skip!r}")
        if prefetch is not None and not prefetch.made_by(self.prefetcher):  # another store's pins and readiness
            raise ValueError("prefetch: expected a handle from this store's prefetch(), got one from another store")
        if prefetch is not None and prefetch.closed:
            raise ValueError("prefetch: expected an open handle, got a closed one (a load consumes its handle)")
        if prefetch is not None and (any(a.key != b.key for a, b in zip(prefetch.blocks, blocks))
                                     or prefetch.request_key != (blocks[0].key if blocks else None)):
            raise ValueError("prefetch: expected a handle from prefetch() of these tokens and salt, got one of others")
        if sink is not None and not callable(sink):
            raise ValueError(f"sink: expected a callable sink(layer, parts), got {type(sink).__name__}")
        if plan is not None and plan.num_tokens != num_tokens_of(blocks):
            raise ValueError(f"plan: expected a plan of these {num_tokens_of(blocks)} tokens, got {plan.num_tokens}")
        if plan is not None and not (isinstance(plan.load_tokens, int) and 0 <= plan.load_tokens <= plan.num_tokens):
            raise ValueError(f"plan: expected load_tokens between 0 and {plan.num_tokens}, got {plan.load_tokens!r}")
        num_tokens = (plan or self._plan(blocks)).load_tokens
        if prefetch is not None:
            ready = prefetch.result()
            if prefetch.policy.policy != WAIT:  # use what is ready; ``wait`` reads the rest from where it is
                num_tokens = min(num_tokens, ready)
        chosen = [block for block in blocks if block.end <= num_tokens]
        if layer_wise:
            chosen = [block for block in chosen if block.end > skip]
            handle = prefetch.hand_over() if prefetch is not None else self._live(self.prefetcher.start(
                chosen, PrefetchPolicy(WAIT), num_tokens_of(chosen)))

            def sized(loaded: int, seconds: float) -> None:  # the loader's blocks are known: as a get's read
                self._loaded(loaded, seconds)
                end = (chosen[0].start if chosen else 0) + loaded
                self._flow.touch_read([block.key for block in blocks if block.end <= end])  # the skipped head too
            return self._live(LayerLoader(
                self.layout, chosen, handle, lambda block, dst: self._flow.read_block(block.key, dst), device,
                self.config.load_lookahead_layers, on_sized=sized, buffers=self.buffers, sink=sink,
                read_run=lambda run, dsts: self._flow.fill_keys([b.key for b in run], dsts),
                on_hit=self._flow.pinned_hit, workers=self._workers))
        start = time.perf_counter()
        if out is None:
            out = torch.empty(self.layout.shape(num_tokens), dtype=self.layout.dtype, device=device)
        try:
            filled = self._flow.fill(chosen, out)
        finally:
            if prefetch is not None:
                prefetch.close()
        self._loaded(filled, time.perf_counter() - start)
        return out[:, :, :filled]

    def _loaded(self, num_tokens: int, seconds: float) -> None:
        self.planner.record_load(num_tokens, seconds)

    @gated
    def save(self, tokens: Tokens, kv: torch.Tensor | None = None, salt: Salt = None, *,
             layer_wise: bool = False, start: int = 0) -> int | LayerSaver:
        """Store the KV the engine computed: ``put`` at once, or with ``layer_wise`` a ``LayerSaver``.

        The saver takes ``[P, tokens, H, D]`` per layer for tokens ``[start,
        len(tokens))`` (``start`` on a block boundary: the blocks before it
        are already stored) and stores the blocks when the last layer arrives.
        """
        if not layer_wise and (isinstance(start, bool) or start != 0):
            raise ValueError(f"start: expected 0 without layer_wise=True (put_from stores from a token), got {start!r}")
        if not layer_wise:
            if kv is None:
                raise ValueError("kv: expected a tensor [L, P, len(tokens), H, D] (or layer_wise=True), got None")
            blocks = self._keys.blocks(tokens, salt)
            self.layout.check_kv(kv, num_tokens_of(blocks))
            return self._flow.store_kv(blocks, kv)
        if kv is not None:
            raise ValueError(f"kv: expected None with layer_wise=True (layers go to save_layer), got "
                             f"{type(kv).__name__}")
        return LayerSaver(self.layout, self._keys.blocks(tokens, salt), start, self._store_kv, self.buffers)

    @gated
    def _store_kv(self, blocks: Sequence[BlockRef], kv: torch.Tensor, head: Sequence[bytes]) -> int:
        """A layer-wise save's blocks (after the prompt's blocks ``head``), when its last layer came: refused if
        the store closed meanwhile."""
        return self._flow.store_kv(blocks, kv, head)
