"""Layer-wise load and save: one layer at a time, exact bytes, a bounded look-ahead, pins released.

Real tiers and a real loader thread. The interleaving test records what the
loader's worker reports (``on_layer``) next to what the consumer asks for,
and waits on a Condition for the loader to get ahead: no sleeps.
"""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import pytest
import torch

from conftest import assert_same_kv, make_kv, make_tokens, tiny_layout
from kvstore.layerwise import LayerLoader, LayerSaver
from kvstore.store import KVStore
from kvstore.tiers.fanout import block_path

LONG = 10.0  # an upper bound on waits that must succeed
STILL_BLOCKED = 0.01  # seconds a loader that must wait is given to (wrongly) run further ahead
LAY = tiny_layout(num_layers=6)  # enough layers for a look-ahead to show


def keys_of(store: KVStore, tokens) -> list[bytes]:
    return [ref.key for ref in store.block_keys(tokens)]


def pinned(store: KVStore) -> int:
    return store.stats()["prefetch"]["pinned_blocks"]


def loader_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "kvstore-layer-loader"}


def stored(make_store, where: str, tokens, kv) -> KVStore:
    """A store holding ``tokens``: in the host tier, on disk only (no host tier), or on disk below an empty host."""
    if where == "disk_only_store":
        store = make_store("disk", lay=LAY)
        store.put(tokens, kv)
        return store
    store = make_store("host" if where == "host" else "both", lay=LAY)
    store.put(tokens, kv)
    assert store.flush(LONG)
    keys = keys_of(store, tokens)
    dropped = {"host": [], "lower_tier": keys, "mix": keys[1::2]}[where]
    for key in dropped:
        assert store.host.delete(key)
    return store


# -- layer-wise load ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["host", "disk_only_store", "lower_tier", "mix"])
@pytest.mark.parametrize("num_tokens", [37, 48, 5])
def test_load_yields_every_layer_once_in_order_exact(make_store, where, num_tokens):
    tokens, kv = make_tokens(num_tokens), make_kv(LAY, num_tokens)
    store = stored(make_store, where, tokens, kv)

    with store.load(tokens, layer_wise=True) as loader:
        assert isinstance(loader, LayerLoader)
        assert loader.num_tokens == num_tokens  # partial tail block included
        seen = []
        for index, layer in loader:
            seen.append(index)
            assert layer.device == torch.device("cpu")
            assert_same_kv(layer, kv[index])  # [P, num_tokens, H, D]
        assert seen == list(range(LAY.num_layers))
        assert loader.loaded_layers == LAY.num_layers

    assert pinned(store) == 0
    stats = store.stats()
    assert stats["store"]["prefill_tokens_saved"] == num_tokens
    assert stats["prefetch"]["prefetch_failed"] == 0
    if store.host is not None:
        keys = keys_of(store, tokens)
        assert all(store.host.contains(key) for key in keys)  # brought up from the disk where needed
        assert all(store.host.delete(key) for key in keys)  # and no pin left behind
        assert stats["prefetch"]["prefetch_fetched"] == {"host": 0, "lower_tier": len(keys),
                                                          "mix": len(keys[1::2])}[where]


def test_load_stops_at_a_missing_block(make_store):
    tokens, kv = make_tokens(48), make_kv(LAY, 48)
    store = stored(make_store, "host", tokens, kv)
    assert store.host.delete(keys_of(store, tokens)[1])
    with store.load(tokens, layer_wise=True) as loader:
        assert loader.num_tokens == 16
        for index, layer in loader:
            assert_same_kv(layer, kv[index][:, :16])
    assert pinned(store) == 0
    assert store.stats()["store"]["prefill_tokens_saved"] == 16


def test_load_stops_at_a_block_lost_after_the_plan(make_store):
    tokens, kv = make_tokens(48), make_kv(LAY, 48)
    store = stored(make_store, "mix", tokens, kv)  # block 1 only on disk
    plan = store.plan(tokens)
    assert plan.load_tokens == 48
    keys = keys_of(store, tokens)
    assert store.disk.delete(keys[1])  # gone from every tier between the plan and the load

    with store.load(tokens, layer_wise=True, plan=plan) as loader:
        assert loader.num_tokens == 16
        layers = [(index, layer.clone()) for index, layer in loader]
    assert [index for index, _ in layers] == list(range(LAY.num_layers))
    for index, layer in layers:
        assert_same_kv(layer, kv[index][:, :16])
    assert store.stats()["prefetch"]["prefetch_failed"] == 1
    assert pinned(store) == 0
    assert store.host.delete(keys[2])  # block 2 was pinned for the load, then released


def test_load_of_nothing_stored_yields_empty_layers(make_store):
    store = make_store("both", lay=LAY)
    with store.load(make_tokens(40), layer_wise=True) as loader:
        assert loader.num_tokens == 0
        shapes = [tuple(layer.shape) for _, layer in loader]
    assert shapes == [(2, 0, 2, 16)] * LAY.num_layers
    assert pinned(store) == 0


def test_load_with_a_prefetch_handle_uses_and_closes_it(make_store):
    tokens, kv = make_tokens(40), make_kv(LAY, 40)
    store = stored(make_store, "host", tokens, kv)
    handle = store.prefetch(tokens)
    assert pinned(store) == 3
    with store.load(tokens, layer_wise=True, prefetch=handle) as loader:
        assert loader.num_tokens == 40
        for index, layer in loader:
            assert_same_kv(layer, kv[index])
    assert handle.closed
    assert pinned(store) == 0


@pytest.mark.parametrize("skip", [16, 17, 32])
@pytest.mark.parametrize("with_sink", [False, True])
def test_a_load_skipping_blocks_with_a_prefetch_handle_hands_each_token_its_own_kv(make_store, skip, with_sink):
    """The handle pins the prompt's blocks from block 0; the load starts past ``skip``. Pins are matched by
    key: blocks 0 and 1 were handed out as the KV of tokens 16 to 48."""
    tokens, kv = make_tokens(48), make_kv(LAY, 48)
    store = stored(make_store, "host", tokens, kv)
    handle = store.prefetch(tokens, policy="wait")
    assert handle.wait(LONG) == 48
    got: dict[int, list] = {}
    sink = (lambda layer, parts: got.setdefault(layer, []).extend((t, p.clone()) for t, p in parts)) \
        if with_sink else None
    with store.load(tokens, layer_wise=True, prefetch=handle, skip=skip, sink=sink) as loader:
        first = loader.first_token
        assert first == skip // 16 * 16 and loader.num_tokens == 48
        for index in range(LAY.num_layers):
            if with_sink:
                loader.wait_layer(index)
                for token, part in got[index]:
                    assert_same_kv(part, kv[index][:, token:token + part.shape[1]])
                assert sorted(t for t, _ in got[index]) == list(range(first, 48, 16))
            else:
                assert_same_kv(loader.layer(index), kv[index][:, first:48])
    assert handle.closed and pinned(store) == 0


def test_a_handle_of_another_prompt_is_a_value_error(make_store):
    """Same full blocks, another tail; or the same first block and others after it."""
    a = make_tokens(40)
    store = stored(make_store, "host", a, make_kv(LAY, 40))
    for b in (a[:32] + [7] * 8, a[:16] + [7] * 24):
        store.put(b, make_kv(LAY, 40, seed=1))
        handle = store.prefetch(a, policy="wait")
        for layer_wise in (False, True):
            with pytest.raises(ValueError, match="^prefetch: expected a handle from prefetch\\(\\) of these tokens"):
                store.load(b, layer_wise=layer_wise, prefetch=handle)
        handle.close()
    assert pinned(store) == 0 and not loader_threads()


def test_a_sink_that_cannot_be_called_is_a_value_error_before_any_tier(make_store):
    tokens = make_tokens(40)
    store = stored(make_store, "host", tokens, make_kv(LAY, 40))
    with pytest.raises(ValueError, match="^sink: expected a callable"):
        store.load(tokens, layer_wise=True, sink="not a callable")
    assert pinned(store) == 0 and not loader_threads()


def test_closing_the_store_stops_loaders_and_handles_an_engine_left_open(make_store):
    tokens = make_tokens(40)
    store = stored(make_store, "host", tokens, make_kv(LAY, 40))
    loader = store.load(tokens, layer_wise=True)  # the engine aborts the request before taking a layer
    handle = store.prefetch(tokens)
    assert loader_threads()
    store.close()
    assert not loader_threads() and handle.closed
    with pytest.raises(RuntimeError, match="closed"):
        loader.layer(0)


def test_layers_must_be_asked_for_in_order_once_each(make_store):
    tokens, kv = make_tokens(40), make_kv(LAY, 40)
    store = stored(make_store, "host", tokens, kv)
    with store.load(tokens, layer_wise=True) as loader:
        with pytest.raises(ValueError, match=r"^layer: expected layer 0 next \(layers come in order, once each\), "
                                             r"got 1$"):
            loader.layer(1)
        assert_same_kv(loader.layer(0), kv[0])
        with pytest.raises(ValueError, match=r"^layer: expected layer 1 next .*, got 0$"):
            loader.layer(0)
        for index in range(1, LAY.num_layers):
            assert_same_kv(loader.layer(index), kv[index])
        with pytest.raises(ValueError, match=rf"^layer: expected < {LAY.num_layers} layers, got {LAY.num_layers}$"):
            loader.layer(LAY.num_layers)
        assert list(loader) == []  # every layer was taken
    assert pinned(store) == 0


@pytest.mark.parametrize("lookahead", [1, 2, 3])
def test_next_layers_load_while_the_consumer_holds_one(make_store, lookahead):
    store = make_store("host", lay=LAY)
    tokens, kv = make_tokens(40), make_kv(LAY, 40)
    store.put(tokens, kv)
    num_layers = LAY.num_layers
    events: list[tuple[str, int]] = []
    cond = threading.Condition()

    def on_layer(index: int) -> None:  # called from the loader's worker once layer ``index`` is copied
        with cond:
            events.append(("loaded", index))
            cond.notify_all()

    misses: list[int] = []
    handle = store.prefetch(tokens, policy="wait")
    loader = LayerLoader(LAY, store.block_keys(tokens), handle, lambda block, dst: misses.append(block.start) or False,
                         "cpu", lookahead=lookahead, on_layer=on_layer)
    try:
        assert loader.lookahead == lookahead
        assert loader.num_tokens == 40
        for index in range(num_layers):
            with cond:
                events.append(("ask", index))
            layer = loader.layer(index)
            held = layer.clone()
            assert_same_kv(held, kv[index])
            ahead = min(index + lookahead, num_layers - 1)
            with cond:  # holding layer ``index``, wait for the loader to copy the layers after it
                assert cond.wait_for(lambda: ("loaded", ahead) in events, LONG)
            assert loader.loaded_layers == ahead + 1  # and no further: it waits for the consumer
            if ahead + 1 < num_layers:
                with cond:  # a bounded check that it stays blocked (a correct loader never fails it)
                    assert not cond.wait_for(lambda: ("loaded", ahead + 1) in events, STILL_BLOCKED)
            assert_same_kv(layer, held)  # the ring did not reuse the buffer the consumer holds
    finally:
        loader.close()

    assert misses == []  # every block came from the prefetch handle's pinned host views
    loaded = [i for kind, i in events if kind == "loaded"]
    assert loaded == list(range(num_layers))
    asked = -1
    for kind, index in events:  # never more than ``lookahead`` layers past the one the consumer holds
        if kind == "ask":
            asked = index
        else:
            assert index <= asked + lookahead, (index, asked, events)
    assert handle.closed and pinned(store) == 0


def test_store_loader_uses_the_configured_lookahead(make_store):
    store = make_store("host", lay=LAY, load_lookahead_layers=3)
    tokens = make_tokens(16)
    store.put(tokens, make_kv(LAY, 16))
    with store.load(tokens, layer_wise=True) as loader:
        assert loader.lookahead == 3
        assert loader.device == torch.device("cpu")


def test_close_midway_stops_the_worker_and_releases_pins(make_store):
    store = make_store("host", lay=LAY, load_lookahead_layers=1)
    tokens, kv = make_tokens(40), make_kv(LAY, 40)
    store.put(tokens, kv)
    keys = keys_of(store, tokens)
    before = loader_threads()

    loader = store.load(tokens, layer_wise=True)
    assert_same_kv(loader.layer(0), kv[0])
    workers = loader_threads() - before
    assert len(workers) == 1  # waiting: it may copy layer 1 but not layer 2 before layer 1 is asked for
    assert pinned(store) == 3
    assert [store.host.delete(key) for key in keys] == [False, False, False]

    loader.close()
    assert not any(t.is_alive() for t in workers)
    assert pinned(store) == 0
    assert [store.host.delete(key) for key in keys] == [True, True, True]
    with pytest.raises(RuntimeError, match="closed"):
        loader.layer(1)
    loader.close()  # idempotent


def test_dropping_an_unfinished_loader_releases_its_pins(make_store):
    store = make_store("host", lay=LAY, load_lookahead_layers=1)
    tokens = make_tokens(40)
    store.put(tokens, make_kv(LAY, 40))
    before = loader_threads()
    loader = store.load(tokens, layer_wise=True)
    loader.layer(0)
    workers = loader_threads() - before
    assert pinned(store) == 3
    del loader  # e.g. the engine's forward pass raised before the last layer
    gc.collect()
    assert pinned(store) == 0
    assert all(store.host.delete(key) for key in keys_of(store, tokens))
    for worker in workers:
        worker.join(LONG)
        assert not worker.is_alive()


@pytest.mark.parametrize("stuck", [False, True], ids=["read-returns", "read-hangs"])
def test_closing_the_store_waits_for_a_dropped_loaders_worker_inside_a_read_bounded(make_store, monkeypatch,
                                                                                     caplog, stuck):
    """A loader dropped while its worker was inside a tier's read was forgotten by the store: close returned
    at once and the worker read the files tier after it. Close now waits for it, and a read that never
    returns (a hung share) is left to it after ``CLOSE_JOIN_SECONDS``, as a loader's own close does."""
    import kvstore.layerwise as layerwise
    monkeypatch.setattr(layerwise, "CLOSE_JOIN_SECONDS", 0.5)
    store = make_store("disk", lay=LAY)
    tokens = make_tokens(40)
    store.put(tokens, make_kv(LAY, 40))
    store.flush(10)
    inside, release, finished = threading.Event(), threading.Event(), []
    flow = store.hooks._flow
    real = flow.fill_keys

    def slow(keys, dsts):
        inside.set()
        release.wait(0.2 if not stuck else 30)
        finished.append(real(keys, dsts))
        return finished[-1]
    monkeypatch.setattr(flow, "fill_keys", slow)
    loader = store.load(tokens, layer_wise=True)
    assert inside.wait(LONG)
    del loader  # the engine dropped it mid-read
    gc.collect()
    with caplog.at_level("WARNING", logger="kvstore.layerwise"):
        store.close()
    if stuck:
        assert not finished and "left to it" in caplog.text  # close returned; the read is left to it
        release.set()
    else:
        assert finished and "left to it" not in caplog.text  # the read ended before close returned


def test_a_failing_read_surfaces_in_the_consumer(make_store):
    store = make_store("host", lay=LAY)
    tokens = make_tokens(40)  # nothing stored: the handle pins nothing and every block is read privately
    handle = store.prefetch(tokens)
    assert handle.blocks == []

    def read_block(block, dst):
        raise OSError("injected read failure")

    loader = LayerLoader(LAY, store.block_keys(tokens), handle, read_block)
    with pytest.raises(RuntimeError, match="^layer-wise load failed: OSError") as info:
        loader.num_tokens
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(RuntimeError, match="^layer-wise load failed"):
        loader.layer(0)
    loader.close()
    assert handle.closed


@pytest.mark.parametrize("lookahead", [0, -1, True, 1.5])
def test_loader_rejects_a_bad_lookahead(make_store, lookahead):
    store = make_store("host", lay=LAY)
    handle = store.prefetch(make_tokens(16))
    with pytest.raises(ValueError, match=rf"^lookahead: expected an integer >= 1, got {lookahead!r}$"):
        LayerLoader(LAY, [], handle, lambda block, dst: False, lookahead=lookahead)
    handle.close()


@pytest.mark.parametrize("where", ["host", "disk_only_store", "mix"])
def test_a_sink_gets_every_layer_of_every_block_in_place(make_store, where):
    tokens, kv = make_tokens(37), make_kv(LAY, 37)
    store = stored(make_store, where, tokens, kv)
    got = torch.zeros_like(kv)
    calls = []

    def sink(layer, parts):
        calls.append((layer, [start for start, _ in parts]))
        for start, block in parts:
            got[layer, :, start:start + block.shape[1]] = block

    with store.load(tokens, layer_wise=True, sink=sink) as loader:
        loader.wait_layer(LAY.num_layers - 1)
        assert loader.num_tokens == 37 and loader.loaded_layers == LAY.num_layers
        with pytest.raises(ValueError, match=r"^layer: this loader hands layers to its sink; expected wait_layer"):
            loader.layer(0)
    assert calls == [(layer, [0, 16, 32]) for layer in range(LAY.num_layers)]
    assert_same_kv(got, kv)
    assert pinned(store) == 0
    assert store.hooks.buffers.idle_bytes == 0  # no ring was taken


def test_a_failing_sink_surfaces_in_wait_layer_and_stops_the_worker(make_store):
    tokens, kv = make_tokens(48), make_kv(LAY, 48)
    store = stored(make_store, "host", tokens, kv)
    layers = []

    def sink(layer, parts):
        layers.append(layer)
        if layer == 2:
            raise OSError("engine cache gone")

    loader = store.load(tokens, layer_wise=True, sink=sink)
    loader.wait_layer(1)
    with pytest.raises(RuntimeError, match=r"^layer-wise load failed: OSError\('engine cache gone'\)"):
        loader.wait_layer(LAY.num_layers - 1)
    loader.close()
    assert layers == [0, 1, 2] and pinned(store) == 0
    with pytest.raises(ValueError, match=r"^layer: expected an int in \[0, 6\), got 6$"):
        loader.wait_layer(6)


def test_a_sink_needs_a_layer_wise_load(make_store):
    store = make_store("host", lay=LAY)
    with pytest.raises(ValueError, match=r"^sink: expected None without layer_wise=True, got a callable$"):
        store.load(make_tokens(16), sink=lambda layer, parts: None)


# -- layer-wise save ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["host", "disk", "both"])
@pytest.mark.parametrize("num_tokens", [37, 48])
def test_save_stores_the_blocks_after_the_last_layer_in_any_order(make_store, mode, num_tokens):
    store = make_store(mode, lay=LAY)
    tokens, kv = make_tokens(num_tokens), make_kv(LAY, num_tokens)
    saver = store.save(tokens, layer_wise=True)
    assert isinstance(saver, LayerSaver)
    assert (saver.start, saver.num_tokens, saver.done, saver.stored) == (0, num_tokens, False, None)

    order = [3, 0, 5, 1, 4, 2]
    for layer in order[:-1]:
        assert saver.save_layer(layer, kv[layer]) is None
        assert store.lookup(tokens) == 0  # nothing stored before the last layer
    assert saver.save_layer(order[-1], kv[order[-1]].clone()) == 3

    assert saver.done and saver.stored == 3
    assert store.lookup(tokens) == num_tokens
    assert_same_kv(store.get(tokens), kv)
    assert store.stats()["store"]["blocks_stored"] == 3


def test_save_layers_from_threads(make_store):
    store = make_store("host", lay=LAY)
    tokens, kv = make_tokens(40), make_kv(LAY, 40)
    saver = store.save(tokens, layer_wise=True)
    results: list[int | None] = []
    lock = threading.Lock()

    def save(layer: int) -> None:
        result = saver.save_layer(layer, kv[layer])
        with lock:
            results.append(result)

    threads = [threading.Thread(target=save, args=(layer,)) for layer in range(LAY.num_layers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(LONG)
    assert sorted(results, key=lambda r: r is not None) == [None] * (LAY.num_layers - 1) + [3]
    assert_same_kv(store.get(tokens), kv)


def test_save_from_a_block_boundary_stores_only_the_suffix(make_store):
    store = make_store("host", lay=LAY)
    tokens, kv = make_tokens(45), make_kv(LAY, 45)
    assert store.put(tokens[:32], kv[:, :, :32]) == 2

    saver = store.save(tokens, layer_wise=True, start=32)
    assert (saver.start, saver.num_tokens) == (32, 45)
    for layer in range(LAY.num_layers):
        result = saver.save_layer(layer, kv[layer][:, 32:])  # [P, 13, H, D]: the suffix only
    assert result == 1

    assert store.lookup(tokens) == 45
    assert_same_kv(store.get(tokens), kv)
    assert store.stats()["store"]["blocks_stored"] == 3


def test_save_of_already_stored_blocks_stores_none_again(make_store):
    store = make_store("host", lay=LAY)
    tokens, kv = make_tokens(40), make_kv(LAY, 40)
    store.put(tokens, kv)
    saver = store.save(tokens, layer_wise=True)
    for layer in range(LAY.num_layers):
        result = saver.save_layer(layer, kv[layer])
    assert result == 0
    end = store.save(tokens, layer_wise=True, start=40)  # everything is before ``start``
    for layer in range(LAY.num_layers):
        result = end.save_layer(layer, kv[layer][:, 40:])
    assert result == 0 and end.done
    assert store.stats()["store"]["dedup_blocks"] == 3


def test_nothing_is_stored_while_a_layer_is_missing(make_store):
    store = make_store("both", lay=LAY)
    tokens, kv = make_tokens(40), make_kv(LAY, 40)
    saver = store.save(tokens, layer_wise=True)
    for layer in range(LAY.num_layers):
        if layer != 2:
            assert saver.save_layer(layer, kv[layer]) is None
    assert store.flush(LONG)
    assert not saver.done and saver.stored is None
    assert store.lookup(tokens) == 0
    stats = store.stats()
    assert stats["store"]["blocks_stored"] == 0
    assert stats["tiers"]["host"]["blocks"] == 0 and stats["tiers"]["lmdb"]["blocks"] == 0


def test_save_layer_rejects_bad_input_and_keeps_going(make_store):
    store = make_store("host", lay=LAY)
    tokens, kv = make_tokens(40), make_kv(LAY, 40)
    saver = store.save(tokens, layer_wise=True)
    with pytest.raises(ValueError, match=r"^kv: expected shape \[2, 40, 2, 16\] \(\[kv_parts, tokens from 0, heads, "
                                         r"head_dim\]\), got \[2, 39, 2, 16\]$"):
        saver.save_layer(0, kv[0][:, :39])
    with pytest.raises(ValueError, match=r"^kv: expected shape \[2, 40, 2, 16\] .*, got \[6, 2, 40, 2, 16\]$"):
        saver.save_layer(0, kv)
    with pytest.raises(ValueError, match=r"^kv: expected shape \[2, 40, 2, 16\] .*, got list$"):
        saver.save_layer(0, kv[0].tolist())
    with pytest.raises(ValueError, match=r"^kv: expected dtype torch.float16, got torch.float32$"):
        saver.save_layer(0, kv[0].float())
    for layer in (-1, LAY.num_layers, True, 1.0):
        with pytest.raises(ValueError, match=rf"^layer: expected an int in \[0, {LAY.num_layers}\), got {layer!r}$"):
            saver.save_layer(layer, kv[0])
    assert saver.save_layer(0, kv[0]) is None  # a rejected call did not count layer 0 as seen
    with pytest.raises(ValueError, match=r"^layer: expected each layer once, got layer 0 again$"):
        saver.save_layer(0, kv[0])
    for layer in range(1, LAY.num_layers):
        result = saver.save_layer(layer, kv[layer])
    assert result == 3
    assert_same_kv(store.get(tokens), kv)


def test_save_rejects_bad_arguments(make_store):
    store = make_store("host", lay=LAY)
    tokens, kv = make_tokens(40), make_kv(LAY, 40)
    for start in (5, 17, 41, -16, True, 16.0):
        with pytest.raises(ValueError, match=rf"^start: expected a block boundary in \[0, 16, 32, 40\], "
                                             rf"got {start!r}$"):
            store.save(tokens, layer_wise=True, start=start)
    with pytest.raises(ValueError, match=r"^kv: expected None with layer_wise=True .*, got Tensor$"):
        store.save(tokens, kv, layer_wise=True)
    with pytest.raises(ValueError, match=r"^kv: expected a tensor .*, got None$"):
        store.save(tokens)
    for start in (16, True, "x"):
        with pytest.raises(ValueError, match="^start: expected 0 without layer_wise=True"):
            store.save(tokens, kv, start=start)
    assert store.save(tokens, kv) == 3  # not layer-wise: a put
    assert store.lookup(tokens) == 40


def test_a_layer_written_into_its_buffer_is_saved_without_a_copy(tmp_path):
    from kvstore import StoreConfig

    layout = tiny_layout()
    tokens, kv = make_tokens(40, seed=8), make_kv(layout, 40, seed=8)
    with KVStore(layout, StoreConfig(host_bytes=8 * layout.block_bytes)) as store:
        saver = store.save(tokens, layer_wise=True)
        for layer in range(layout.num_layers):
            buffer = saver.layer_buffer(layer)
            buffer.copy_(kv[layer])
            saver.save_layer(layer, buffer)
        assert saver.stored == 3
        assert_same_kv(store.get(tokens), kv)


@pytest.mark.parametrize("damaged", [None, 0, 2, 5])
def test_a_files_only_store_loads_layer_wise_in_runs_up_to_a_damaged_block(tmp_path, monkeypatch, damaged):
    """No host RAM to prefetch into: the loader reads its blocks privately, as one run the files tier reads
    side by side (8 blocks of 1 MiB); a damaged block ends the load at the tokens before it."""
    from kvstore.config import StoreConfig
    from kvstore.tiers import files as files_module
    monkeypatch.setattr(files_module.os, "cpu_count", lambda: 2)
    lay = tiny_layout(num_layers=4, num_kv_heads=4, head_dim=64, dtype=torch.bfloat16, block_tokens=256)  # 1 MiB
    config = StoreConfig(host_bytes=0, files_dir=str(tmp_path / "files"), files_sync=False, slow_factor=1e9)
    tokens, kv = make_tokens(8 * 256 - 100), make_kv(lay, 8 * 256 - 100)  # a partial tail block too
    with KVStore(lay, config) as store:
        assert store.put(tokens, kv) == 8
        if damaged is not None:
            path = Path(block_path(str(tmp_path / "files"), store.block_keys(tokens)[damaged].key))
            data = bytearray(path.read_bytes())
            data[-7] ^= 0x01
            path.write_bytes(data)
        expected = len(tokens) if damaged is None else damaged * 256
        with store.load(tokens, layer_wise=True, plan=store.plan(tokens)) as loader:
            assert loader.num_tokens == expected
            for index, layer in loader:
                assert_same_kv(layer, kv[index, :, :expected])
        files = store.stats()["tiers"]["files"]
        assert files["corrupt"] == (damaged is not None)
        assert pinned(store) == 0


def test_a_store_closed_from_another_thread_as_a_layer_is_handed_over_is_a_clean_error(make_store):
    """The store's ``close`` hands a loader's ring back from its own thread. Closed right after the engine's
    ``layer()`` found its layer loaded, the engine got ``ZeroDivisionError`` (an emptied ring), not the
    loader's closed error."""
    store = make_store("host", lay=LAY)
    tokens = make_tokens(4 * LAY.block_tokens)
    store.put(tokens, make_kv(LAY, len(tokens)))
    loader = store.load(tokens, layer_wise=True)
    pipe = loader._pipe
    waited = pipe.wait

    def wait_then_close(ready):
        waited(ready)
        closer = threading.Thread(target=store.close)
        closer.start()
        closer.join(LONG)
    pipe.wait = wait_then_close
    with pytest.raises(RuntimeError, match="layer-wise load is closed"):
        loader.layer(0)
    assert not loader_threads()


@pytest.mark.parametrize("how", ["with-block", "close", "cancel"])
def test_the_engine_closing_its_handle_leaves_the_loaders_pins(make_store, how):
    """``with store.prefetch(t) as h: loader = store.load(t, layer_wise=True, prefetch=h)``: the block's end
    released the pins of the slots the loader was still copying from; other puts took those slots, and the
    loader handed out their KV as this prompt's layers."""
    slots = 8
    store = make_store("host", lay=LAY, host_bytes=slots * LAY.block_bytes, load_lookahead_layers=1)
    tokens, kv = make_tokens(48, seed=40), make_kv(LAY, 48, seed=40)
    store.put(tokens, kv)
    handle = store.prefetch(tokens, policy="wait")
    assert handle.wait(LONG) == 48
    loader = store.load(tokens, layer_wise=True, prefetch=handle)
    got = [loader.layer(0).clone()]  # the worker copied layer 1 ahead and waits
    {"with-block": lambda: handle.__exit__(None, None, None), "close": handle.close,
     "cancel": handle.cancel}[how]()
    assert handle.closed and pinned(store) == 3  # the loader's pins stay
    with pytest.raises(ValueError, match="a load consumes its handle"):
        store.load(tokens, prefetch=handle)
    for n in range(4):  # other requests fill the pool
        store.put(make_tokens(16 * slots, seed=41 + n), make_kv(LAY, 16 * slots, seed=41 + n))
    got += [loader.layer(layer).clone() for layer in range(1, LAY.num_layers)]
    assert loader.num_tokens == 48
    loader.close()
    for layer, tensor in enumerate(got):
        assert_same_kv(tensor, kv[layer])
    assert pinned(store) == 0


def test_waiting_for_a_layer_past_the_look_ahead_is_refused_not_a_hang(make_store):
    store = make_store("host", lay=LAY, load_lookahead_layers=1)
    tokens, kv = make_tokens(40, seed=42), make_kv(LAY, 40, seed=42)
    store.put(tokens, kv)
    with store.load(tokens, layer_wise=True) as loader:
        loader.wait_layer(0)  # within the look-ahead
        with pytest.raises(ValueError, match="expected at most layer 0 until more are taken .*got 3"):
            loader.wait_layer(3)
        assert_same_kv(loader.layer(0), kv[0])
        loader.wait_layer(1)


def test_a_handle_of_an_empty_prompt_is_refused_for_another(make_store):
    """``prefetch([])`` recorded no request, so its handle passed for any prompt's: a best-effort load of a
    stored prompt then loaded nothing."""
    store = make_store("host", lay=LAY)
    tokens, kv = make_tokens(32, seed=43), make_kv(LAY, 32, seed=43)
    store.put(tokens, kv)
    for layer_wise in (False, True):
        with pytest.raises(ValueError, match="prefetch: expected a handle from prefetch\\(\\) of these tokens"):
            store.load(tokens, layer_wise=layer_wise, prefetch=store.prefetch([]))
    assert store.load(tokens).shape[2] == 32


@pytest.mark.parametrize("sink", [False, True])
def test_a_layer_wise_read_is_a_sighting_that_admits_below(make_store, tmp_path, sink):
    """``files_admit_after=2``: a put and a read hit admit a block to the files tier. A layer-wise load (how
    vLLM's worker reads) took blocks from the prefetch's pins and counted no sighting, so an engine's re-reads
    never reached the shared tier and a second engine sharing it was offered nothing."""
    store = make_store("host", lay=LAY, files_dir=str(tmp_path / "files"), files_admit_after=2, files_sync=False)
    tokens, kv = make_tokens(40, seed=44), make_kv(LAY, 40, seed=44)
    store.put(tokens, kv)
    assert store.flush(LONG) and store.stats()["tiers"]["files"]["blocks"] == 0
    layers = []
    with store.load(tokens, layer_wise=True, sink=(lambda n, parts: layers.append(n)) if sink else None) as loader:
        if sink:
            loader.wait_layer(LAY.num_layers - 1)
        else:
            for n in range(LAY.num_layers):
                assert_same_kv(loader.layer(n), kv[n])
    assert store.flush(LONG)
    assert store.stats()["tiers"]["files"]["blocks"] == 3
    store.host.delete(keys_of(store, tokens)[0])
    assert store.lookup(tokens) == 40  # block 0 from the files tier now


def test_a_handle_is_handed_over_once(make_store):
    store = make_store("host", lay=LAY)
    tokens = make_tokens(32, seed=45)
    store.put(tokens, make_kv(LAY, 32, seed=45))
    handle = store.prefetch(tokens, policy="wait")
    owner = handle.hand_over()
    with pytest.raises(ValueError, match="a load consumes its handle"):
        handle.hand_over()
    assert pinned(store) == 2
    owner.close()
    assert pinned(store) == 0
