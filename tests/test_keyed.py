"""Blocks named by the engine (put_keyed / lookup_keyed / get_keyed): exact bytes, scoping, validation."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_same_kv, make_kv, make_tokens, tiny_layout
from kvstore import KVStore, StoreConfig


@pytest.fixture
def store(tmp_path):
    layout = tiny_layout()
    with KVStore(layout, StoreConfig(host_bytes=2 * layout.block_bytes, disk_dir=str(tmp_path / "d"))) as s:
        yield s


def test_round_trip_through_host_and_disk(store):
    layout = store.layout
    pages = {f"page-{i}": make_kv(layout, 16 if i < 4 else 5, seed=i) for i in range(5)}
    assert store.put_keyed(list(pages.items())) == 5
    assert store.put_keyed(list(pages.items())) == 0  # already stored: deduplicated
    store.flush()
    names = list(pages)
    assert store.lookup_keyed(names + ["missing"]) == 5
    outs = [torch.zeros_like(kv) for kv in pages.values()]
    assert store.get_keyed(names, outs) == 5  # host holds 2 slots: the first pages come from LMDB
    for out, kv in zip(outs, pages.values()):
        assert_same_kv(out, kv)
    assert store.stats()["tiers"]["lmdb"]["hits"] >= 3


def test_reading_stops_at_the_first_missing_name(store):
    kv = make_kv(store.layout, 16, seed=1)
    store.put_keyed([("a", kv), ("c", kv)])
    outs = [torch.zeros_like(kv) for _ in range(3)]
    assert store.lookup_keyed(["a", "b", "c"]) == 1
    assert store.get_keyed(["a", "b", "c"], outs) == 1
    assert_same_kv(outs[0], kv)
    assert not outs[2].any()


def test_outs_that_share_memory_are_refused_and_views_that_do_not_are_read_exactly(store):
    """Each out is read into in turn: two that share memory were left holding the later page, both counted
    read. Token ranges of one buffer (runs per layer and part, interleaved) share no byte and are fine."""
    layout = store.layout
    pages = {f"p{i}": make_kv(layout, 16, seed=10 + i) for i in range(2)}
    store.put_keyed(list(pages.items()))
    hits = {name: tier["hits"] for name, tier in store.stats()["tiers"].items()}
    buffer = torch.zeros(layout.shape(48), dtype=layout.dtype)
    for outs in ([buffer[:, :, :16], buffer[:, :, :16]], [buffer[:, :, :16], buffer[:, :, 8:24]],
                 [buffer[:, :, :16], buffer[:, :, 15:31]]):
        with pytest.raises(ValueError, match=r"^outs: expected buffers that share no memory, got outs\[0\] and "
                                             r"outs\[1\] over the same bytes$"):
            store.get_keyed(list(pages), outs)
    assert {name: tier["hits"] for name, tier in store.stats()["tiers"].items()} == hits  # no tier was read
    assert not buffer.any()
    apart = [buffer[:, :, 32:48], buffer[:, :, :16]]  # one buffer, out of order, no byte shared
    assert store.get_keyed(list(pages), apart) == 2
    assert_same_kv(buffer[:, :, 32:48], pages["p0"])
    assert_same_kv(buffer[:, :, :16], pages["p1"])


def test_names_are_scoped_by_salt_and_never_meet_token_keys(store):
    kv = make_kv(store.layout, 16, seed=2)
    store.put_keyed([(b"page", kv)], salt="tenant-a")
    assert store.lookup_keyed([b"page"]) == 0
    assert store.lookup_keyed([b"page"], salt="tenant-b") == 0
    assert store.lookup_keyed(["page"], salt="tenant-a") == 1  # a str name is its UTF-8 bytes
    tokens = make_tokens(16, seed=2)
    store.put(tokens, kv)
    assert store.engine_keys(["page"]) != [store.block_keys(tokens)[0].key]
    other = KVStore(tiny_layout(dtype=torch.bfloat16), StoreConfig(host_bytes=1 << 20))
    with other:
        assert other.engine_keys(["page"]) != store.engine_keys(["page"])  # the layout is in the key


def test_bad_input_stores_nothing(store):
    good = make_kv(store.layout, 16, seed=3)
    with pytest.raises(ValueError, match="tokens|shape|dtype|expected"):
        store.put_keyed([("a", good), ("b", good.to(torch.float32))])
    with pytest.raises(ValueError, match=r"1\.\.16"):
        store.put_keyed([("c", make_kv(store.layout, 32, seed=3))])
    with pytest.raises(ValueError, match="empty"):
        store.put_keyed([("", good)])
    with pytest.raises(ValueError, match="one buffer per name"):
        store.get_keyed(["a", "b"], [torch.zeros_like(good)])
    assert store.lookup_keyed(["a", "b", "c"]) == 0


def test_arguments_that_are_no_list_are_refused(store):
    """A generator was read up by the first of put_keyed's passes: it stored nothing and returned 0."""
    kv = make_kv(store.layout, 16, seed=4)
    with pytest.raises(ValueError, match="items: expected a list or tuple of \\(name, block\\) pairs, got generator"):
        store.put_keyed((name, kv) for name in ["p0", "p1"])
    with pytest.raises(ValueError, match="items: expected a list or tuple .* got dict"):
        store.put_keyed({"p0": kv})
    for bad in (None, "p0", b"p0", (name for name in ["p0"])):
        with pytest.raises(ValueError, match="names: expected a list or tuple of engine keys"):
            store.lookup_keyed(bad)
        with pytest.raises(ValueError, match="names: expected a list or tuple of engine keys"):
            store.get_keyed(bad, [torch.zeros_like(kv)])
    with pytest.raises(ValueError, match="outs: expected a list or tuple of tensors"):
        store.get_keyed(["p0"], (torch.zeros_like(kv) for _ in range(1)))
    assert store.put_keyed((("p0", kv), ("p1", kv))) == 2  # a tuple is a sequence
    assert store.lookup_keyed(("p0", "p1")) == 2


def test_a_name_given_twice_in_one_call_is_stored_once(store):
    """Both copies were counted stored (2 for a tier holding one block); the second is dedup, as a name stored by
    an earlier call is."""
    first, second = make_kv(store.layout, 16, seed=5), make_kv(store.layout, 16, seed=6)
    assert store.put_keyed([("d", first), ("e", second), ("d", second)]) == 2
    counters = store.stats()["store"]
    assert counters["blocks_stored"] == 2 and counters["dedup_blocks"] == 1
    out = torch.zeros_like(first)
    assert store.get_keyed(["d"], [out]) == 1
    assert_same_kv(out, first)


def test_engine_key_is_the_documented_hash(store):
    import hashlib

    root = store._keys.root("s")
    assert store.engine_keys(["page-7"], salt="s") == [hashlib.sha256(b"E" + root + b"page-7").digest()]


def test_blocks_put_after_named_ones_never_evict_them(tmp_path):
    """An engine backs a sequence up in batches (SGLang's ``prefix_keys``): a full tier evicted the earlier
    pages, the least recently used, for the later ones. Named in ``after``, they stay; the later pages that
    find no room are refused."""
    layout = tiny_layout()
    pages = {f"page-{i}": make_kv(layout, layout.block_tokens, seed=i) for i in range(4)}
    names = list(pages)
    with KVStore(layout, StoreConfig(model_id="m", host_bytes=2 * layout.block_bytes)) as store:
        store.put_keyed([(name, pages[name]) for name in names[:2]])
        assert store.put_keyed([(name, pages[name]) for name in names[2:]], after=names[:2]) == 0
        assert store.lookup_keyed(names) == 2
        outs = [torch.empty_like(pages[name]) for name in names[:2]]
        assert store.get_keyed(names[:2], outs) == 2
        for name, out in zip(names, outs):
            assert_same_kv(out, pages[name])
        with pytest.raises(ValueError, match="after: expected a list or tuple"):
            store.put_keyed([(names[2], pages[names[2]])], after=iter(names[:2]))
        store.put_keyed([(name, pages[name]) for name in names[2:]])  # not named: evicted as ever
        assert store.lookup_keyed(names) == 0 and store.lookup_keyed(names[2:]) == 2
