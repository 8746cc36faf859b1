"""KVStore end to end: round trips, prefixes, salts, dedup, bad input, keys across processes, threads."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from conftest import TESTS_DIR, assert_same_kv, make_kv, make_tokens, run_python, run_threads, tiny_layout
from kvstore.blockformat import HEADER_BYTES
from kvstore.config import StoreConfig
from kvstore.keys import KeyChain
from kvstore.flow import STORE_COUNTERS
from kvstore.store import KVStore

LAYOUTS = {
    "fp16": tiny_layout(dtype=torch.float16),
    "bf16": tiny_layout(dtype=torch.bfloat16),
    "fp32": tiny_layout(dtype=torch.float32),
    "mla": tiny_layout(dtype=torch.float16, kv_parts=1),
    "mla_fp32": tiny_layout(dtype=torch.float32, kv_parts=1),
}
# Lengths: whole blocks, partial tails (1..15 tokens), shorter than a block.
LENGTHS = [16, 20, 37, 5, 48, 1, 17, 31]


def _prompts(lay, lengths=LENGTHS):
    return [(make_tokens(n, seed=i), make_kv(lay, n, seed=i)) for i, n in enumerate(lengths)]


@pytest.mark.parametrize("mode", ["host", "disk", "both"])
@pytest.mark.parametrize("lay_name", sorted(LAYOUTS))
def test_round_trip_exact(make_store, mode, lay_name):
    lay = LAYOUTS[lay_name]
    store = make_store(mode, lay=lay)
    prompts = _prompts(lay)
    for tokens, kv in prompts:
        assert store.put(tokens, kv) == len(store.block_keys(tokens))
    for tokens, kv in prompts:
        assert store.lookup(tokens) == len(tokens)
        assert_same_kv(store.get(tokens), kv)
        out = torch.full(lay.shape(len(tokens)), 7, dtype=lay.dtype)
        assert store.get_into(tokens, out) == len(tokens)
        assert_same_kv(out, kv)
    total_blocks = sum(len(store.block_keys(t)) for t, _ in prompts)
    assert total_blocks == 15
    store.flush()  # lower tiers are written in the background
    for tier in store.tiers:  # write-through: every tier holds every block
        assert tier.stats()["blocks"] == total_blocks
        for tokens, _ in prompts:
            assert all(tier.contains(ref.key) for ref in store.block_keys(tokens))
    assert store.stats()["store"]["blocks_stored"] == total_blocks


@pytest.mark.parametrize("lay_name", ["fp16", "bf16", "fp32", "mla"])
def test_disk_blocks_survive_restart_and_promote(make_store, tmp_path, lay_name):
    lay = LAYOUTS[lay_name]
    prompts = _prompts(lay)
    first = make_store("both", lay=lay, disk_sync=True)
    for tokens, kv in prompts:
        first.put(tokens, kv)
    first.close()
    second = make_store("both", lay=lay)
    assert second.stats()["tiers"]["host"]["blocks"] == 0
    assert second.stats()["tiers"]["lmdb"]["blocks"] == 15
    for tokens, kv in prompts:
        assert second.lookup(tokens) == len(tokens)
        assert_same_kv(second.get(tokens), kv)  # from disk, promoted to host
    stats = second.stats()
    assert stats["store"]["promotions"] == 15
    assert (stats["tiers"]["lmdb"]["hits"], stats["tiers"]["host"]["misses"]) == (15, 15)
    assert stats["tiers"]["host"]["blocks"] == 15
    for tokens, kv in prompts:
        assert_same_kv(second.get(tokens), kv)  # now from host
    stats = second.stats()
    assert (stats["tiers"]["lmdb"]["hits"], stats["tiers"]["host"]["hits"]) == (15, 15)
    assert stats["store"]["promotions"] == 15


def test_no_promotion_when_disabled(make_store, kv_for):
    tokens, kv = make_tokens(40), kv_for(40)
    first = make_store("both")
    first.put(tokens, kv)
    first.close()
    second = make_store("both", promote=False)
    assert_same_kv(second.get(tokens), kv)
    assert_same_kv(second.get(tokens), kv)
    stats = second.stats()
    assert stats["store"]["promotions"] == 0
    assert stats["tiers"]["host"]["blocks"] == 0
    assert stats["tiers"]["lmdb"]["hits"] == 6


@pytest.mark.parametrize("mode", ["host", "disk"])
def test_token_types_are_equivalent(make_store, kv_for, mode):
    store = make_store(mode)
    tokens = make_tokens(40)
    kv = kv_for(40)
    forms = [
        tokens,
        tuple(tokens),
        np.array(tokens, dtype=np.int32),
        np.array(tokens, dtype=np.int64),
        np.array(tokens, dtype=np.uint32),
        torch.tensor(tokens),
        torch.tensor(tokens, dtype=torch.int32),
        [np.int64(t) for t in tokens],
    ]
    keys = [store.block_keys(form) for form in forms]
    assert all(k == keys[0] for k in keys)
    assert [(r.start, r.end) for r in keys[0]] == [(0, 16), (16, 32), (32, 40)]
    assert store.put(forms[2], kv) == 3
    for form in forms:
        assert store.put(form, kv) == 0
        assert store.lookup(form) == 40
        assert_same_kv(store.get(form), kv)
    assert store.stats()["store"]["dedup_blocks"] == 3 * len(forms)


@pytest.mark.parametrize("mode", ["host", "disk", "both"])
def test_partial_tail_and_shared_prefix(make_store, kv_for, mode):
    store = make_store(mode)
    tokens = make_tokens(20)
    kv = kv_for(20)
    assert store.put(tokens, kv) == 2
    assert store.lookup(tokens) == 20
    assert_same_kv(store.get(tokens), kv)

    # Same first 16 tokens, then 8 others: only the full block is shared.
    other = tokens[:16] + make_tokens(8, seed=99)
    assert store.lookup(other) == 16
    got = store.get(other)
    assert_same_kv(got, kv[:, :, :16])
    # Even the same 4 tail tokens plus more do not hit the stored 4-token tail.
    longer = tokens + make_tokens(4, seed=98)
    assert store.lookup(longer) == 16
    # A prefix of the stored tail is a different partial block too.
    assert store.lookup(tokens[:18]) == 16
    assert store.lookup(tokens[:16]) == 16
    assert store.lookup(tokens[:15]) == 0

    # get_into stops at the first miss and leaves the rest of out untouched.
    out = torch.full(store.layout.shape(24), 3.0, dtype=torch.float16)
    assert store.get_into(other, out) == 16
    assert_same_kv(out[:, :, :16], kv[:, :, :16])
    assert torch.equal(out[:, :, 16:], torch.full_like(out[:, :, 16:], 3.0))


@pytest.mark.parametrize("mode", ["host", "disk"])
def test_shorter_than_one_block(make_store, kv_for, mode):
    store = make_store(mode)
    for n in (1, 5, 15):
        tokens, kv = make_tokens(n, seed=n), kv_for(n, seed=n)
        assert store.put(tokens, kv) == 1
        assert store.lookup(tokens) == n
        assert_same_kv(store.get(tokens), kv)


def test_miss_and_empty(make_store, layout):
    store = make_store("both")
    got = store.get(make_tokens(40))
    assert tuple(got.shape) == layout.shape(0) and got.dtype == torch.float16
    assert store.lookup(make_tokens(40)) == 0
    assert store.put([], torch.empty(layout.shape(0), dtype=torch.float16)) == 0
    assert store.lookup([]) == 0
    assert tuple(store.get([]).shape) == layout.shape(0)
    stats = store.stats()["store"]
    assert stats == {"puts": 1, "blocks_stored": 0, "dedup_blocks": 0, "dedup_bytes": 0, "lookups": 2,
                     "lookup_tokens": 40, "lookup_hit_tokens": 0, "gets": 2, "get_tokens": 40,
                     "get_hit_tokens": 0, "promotions": 0, "demotions": 0, "prefill_tokens_saved": 0,
                     "compute_seconds_saved": 0.0, "load_seconds": 0.0, "prefill_tokens_per_second": 0.0,
                     "plans": 0, "plan_skipped_tokens": 0}


@pytest.mark.parametrize("mode", ["host", "disk"])
def test_salt_separates(make_store, kv_for, mode):
    store = make_store(mode)
    tokens = make_tokens(40)
    kv_a, kv_none, kv_b = kv_for(40, seed=1), kv_for(40, seed=2), kv_for(40, seed=3)
    assert store.put(tokens, kv_a, salt="a") == 3
    assert store.lookup(tokens) == 0
    assert store.lookup(tokens, salt=b"b") == 0
    assert store.lookup(tokens, salt="") == 0
    assert store.lookup(tokens, salt="A") == 0
    assert store.lookup(tokens, salt="a") == 40
    assert store.lookup(tokens, salt=b"a") == 40  # str salts are their UTF-8 bytes
    assert store.put(tokens, kv_none) == 3
    assert store.put(tokens, kv_b, salt=b"b") == 3
    assert store.put(tokens, kv_none, salt="") == 3  # empty salt is not "no salt"
    assert_same_kv(store.get(tokens, salt="a"), kv_a)
    assert_same_kv(store.get(tokens), kv_none)
    assert_same_kv(store.get(tokens, salt=b"b"), kv_b)
    keysets = [{r.key for r in store.block_keys(tokens, salt=s)} for s in ("a", None, b"b", "")]
    assert len(set().union(*keysets)) == 12


def test_model_id_hash_and_layout_separate_on_shared_disk(make_store, kv_for, disk_dir):
    tokens, kv = make_tokens(40), kv_for(40)
    writer = make_store("disk", disk=disk_dir, model_id="m1")
    assert writer.put(tokens, kv) == 3
    writer.close()
    for config in (dict(model_id="m2"), dict(model_id="m1", hash="blake2b"), dict(model_id="m1", hash="xxh3_128")):
        other = make_store("disk", disk=disk_dir, **config)
        assert other.lookup(tokens) == 0
        assert other.get(tokens).shape[2] == 0
        assert not set(r.key for r in other.block_keys(tokens)) & set(r.key for r in writer.block_keys(tokens))
        other.close()
    bf16 = make_store("disk", lay=tiny_layout(dtype=torch.bfloat16), disk=disk_dir, model_id="m1")
    assert bf16.lookup(tokens) == 0
    bf16.close()
    same = make_store("disk", disk=disk_dir, model_id="m1")
    assert same.lookup(tokens) == 40
    assert_same_kv(same.get(tokens), kv)


@pytest.mark.parametrize("mode", ["host", "disk", "both"])
def test_dedup_same_prompt(make_store, kv_for, layout, mode):
    store = make_store(mode)
    tokens, kv = make_tokens(40), kv_for(40)
    assert store.put(tokens, kv) == 3
    assert store.put(tokens, kv) == 0
    stats = store.stats()
    assert stats["store"]["dedup_blocks"] == 3
    assert stats["store"]["dedup_bytes"] == 40 * layout.token_bytes
    assert stats["store"]["blocks_stored"] == 3
    assert stats["store"]["puts"] == 2
    store.flush()
    for tier in store.tiers:
        assert tier.stats()["blocks"] == 3
        assert tier.stats()["blocks_written"] == 3
    # Dedup is by key: different KV bytes for the same tokens are not stored again.
    assert store.put(tokens, kv_for(40, seed=5)) == 0
    assert_same_kv(store.get(tokens), kv)


@pytest.mark.parametrize("mode", ["host", "disk", "both"])
def test_dedup_extension_stores_only_new_blocks(make_store, kv_for, mode):
    store = make_store(mode)
    tokens = make_tokens(56)
    kv = kv_for(56)
    assert store.put(tokens[:32], kv[:, :, :32]) == 2
    assert store.put(tokens, kv) == 2  # block 32..48 and the 8-token tail
    stats = store.stats()["store"]
    assert (stats["dedup_blocks"], stats["blocks_stored"]) == (2, 4)
    # From a prompt with a partial tail: the old tail is not reused.
    assert store.put(tokens[:20], kv[:, :, :20]) == 1  # only the 4-token tail is new
    assert store.put(tokens[:40], kv[:, :, :40]) == 1  # 0..16, 16..32 dedup; 32..40 tail new
    stats = store.stats()["store"]
    assert (stats["dedup_blocks"], stats["blocks_stored"]) == (5, 6)
    store.flush()
    for tier in store.tiers:
        assert tier.stats()["blocks"] == 6
    for n in (20, 32, 40, 56):
        assert store.lookup(tokens[:n]) == n
        assert_same_kv(store.get(tokens[:n]), kv[:, :, :n])


def test_counters_exact(make_store, kv_for):
    store = make_store("host")
    tokens, kv = make_tokens(40), kv_for(40)
    store.put(tokens, kv)
    store.lookup(tokens)
    store.lookup(tokens[:16] + [1] * 8)
    store.get(tokens)
    store.get(tokens[:32] + [2] * 16)
    stats = store.stats()["store"]
    assert {name: stats[name] for name in STORE_COUNTERS} == {
        "puts": 1, "blocks_stored": 3, "dedup_blocks": 0, "dedup_bytes": 0,
        "lookups": 2, "lookup_tokens": 64, "lookup_hit_tokens": 56,
        "gets": 2, "get_tokens": 88, "get_hit_tokens": 72, "promotions": 0, "demotions": 0,
    }
    host = store.stats()["tiers"]["host"]
    assert (host["hits"], host["misses"], host["blocks"]) == (5, 1, 3)
    assert host["bytes_read"] == 72 * store.layout.token_bytes


def test_closed_store(make_store, kv_for):
    store = make_store("both")
    tokens = make_tokens(16)
    store.put(tokens, kv_for(16))
    store.close()
    store.close()  # idempotent
    for call in (lambda: store.put(tokens, kv_for(16)), lambda: store.lookup(tokens), lambda: store.get(tokens)):
        with pytest.raises(RuntimeError, match="closed"):
            call()


def test_a_put_racing_close_stands_in_the_fastest_tier_and_drops_only_its_lower_copy(make_store, kv_for):
    """A put past its open check when ``close`` stops the write-behind raised "write-behind is closed" into the
    engine, though its blocks were stored. Here the write-behind is stopped first, as close does."""
    store = make_store("both")
    tokens = make_tokens(16)
    store._flow.writes.close()
    assert store.put(tokens, kv_for(16)) == 1
    assert store.lookup(tokens) == 16
    lmdb = store.stats()["tiers"]["lmdb"]
    assert lmdb["queue_dropped"] == 1 and lmdb["blocks"] == 0


def test_context_manager_releases_disk(tmp_path, layout, kv_for):
    config = StoreConfig(host_bytes="64KiB", disk_dir=str(tmp_path / "d"), disk_bytes="1MiB", disk_sync=False)
    tokens, kv = make_tokens(32), kv_for(32)
    with KVStore(layout, config) as store:
        store.put(tokens, kv)
    with KVStore(layout, config) as store:  # the directory lock was released
        assert store.lookup(tokens) == 32
        assert_same_kv(store.get(tokens), kv)


def test_failed_host_tier_releases_disk(tmp_path, layout):
    config = StoreConfig(host_bytes=100, disk_dir=str(tmp_path / "d"), disk_bytes="1MiB")
    with pytest.raises(ValueError, match=r"host_bytes: .*4096 bytes, got 100"):
        KVStore(layout, config)
    KVStore(layout, config.replace(host_bytes="64KiB")).close()


def test_constructor_rejects_non_layout_and_non_config(layout):
    with pytest.raises(ValueError, match="layout: expected a KVLayout, got dict"):
        KVStore({}, StoreConfig(host_bytes="64KiB"))
    with pytest.raises(ValueError, match="config: expected a StoreConfig, got dict"):
        KVStore(layout, {"host_bytes": 65536})


# -- bad input: ValueError naming expected and actual; the store is unchanged -------------------------


def _state(store, probes):
    stats = store.stats()
    return stats, [store.lookup(p) for p in probes]


BAD_PUTS = {
    "kv wrong shape": (lambda t, lay: (t[:16], torch.zeros((2, 2, 16, 2, 8), dtype=torch.float16)),
                       ["expected shape [2, 2, 16, 2, 16]", "got [2, 2, 16, 2, 8]"]),
    "kv wrong rank": (lambda t, lay: (t[:16], torch.zeros((2, 16, 2, 16), dtype=torch.float16)),
                      ["expected shape [2, 2, 16, 2, 16]", "got [2, 16, 2, 16]"]),
    "kv wrong dtype": (lambda t, lay: (t[:16], torch.zeros(lay.shape(16), dtype=torch.float32)),
                       ["expected dtype torch.float16", "got torch.float32"]),
    "kv not a tensor": (lambda t, lay: (t[:16], np.zeros(lay.shape(16), dtype=np.float16)),
                        ["expected a torch.Tensor", "got ndarray"]),
    "17 kv tokens for 16 ids": (lambda t, lay: (t[:16], torch.zeros(lay.shape(17), dtype=torch.float16)),
                                ["expected shape [2, 2, 16, 2, 16]", "got [2, 2, 17, 2, 16]"]),
    "15 kv tokens for 16 ids": (lambda t, lay: (t[:16], torch.zeros(lay.shape(15), dtype=torch.float16)),
                                ["expected shape [2, 2, 16, 2, 16]", "got [2, 2, 15, 2, 16]"]),
    "negative id": (lambda t, lay: (t[:3] + [-1] + t[4:16], torch.zeros(lay.shape(16), dtype=torch.float16)),
                    ["0 <= id < 2**32", "got -1 at position 3"]),
    "id 2**32": (lambda t, lay: (t[:15] + [2**32], torch.zeros(lay.shape(16), dtype=torch.float16)),
                 ["0 <= id < 2**32", "got 4294967296 at position 15"]),
    "numpy negative id": (lambda t, lay: (np.array(t[:5] + [-7] + t[6:16], dtype=np.int64),
                                          torch.zeros(lay.shape(16), dtype=torch.float16)),
                          ["0 <= id < 2**32", "got -7 at position 5"]),
    "numpy id 2**32": (lambda t, lay: (np.array([2**32] + t[1:16], dtype=np.uint64),
                                       torch.zeros(lay.shape(16), dtype=torch.float16)),
                       ["0 <= id < 2**32", "got 4294967296 at position 0"]),
    "torch negative id": (lambda t, lay: (torch.tensor(t[:15] + [-2]), torch.zeros(lay.shape(16), dtype=torch.float16)),
                          ["0 <= id < 2**32", "got -2 at position 15"]),
    "float ids": (lambda t, lay: ([float(x) for x in t[:16]], torch.zeros(lay.shape(16), dtype=torch.float16)),
                  ["expected integer token ids", ".0 at position 0"]),
    "one float id": (lambda t, lay: (t[:2] + [2.5] + t[3:16], torch.zeros(lay.shape(16), dtype=torch.float16)),
                     ["expected integer token ids", "got 2.5 at position 2"]),
    "numpy float ids": (lambda t, lay: (np.array(t[:16], dtype=np.float64), torch.zeros(lay.shape(16), dtype=torch.float16)),
                        ["expected an integer array", "got dtype float64"]),
    "torch float ids": (lambda t, lay: (torch.tensor(t[:16], dtype=torch.float32),
                                        torch.zeros(lay.shape(16), dtype=torch.float16)),
                        ["expected an integer tensor", "got dtype torch.float32"]),
    "2-D numpy ids": (lambda t, lay: (np.array(t[:16]).reshape(2, 8), torch.zeros(lay.shape(16), dtype=torch.float16)),
                      ["expected a 1-D array", "got shape [2, 8]"]),
    "2-D torch ids": (lambda t, lay: (torch.tensor(t[:16]).reshape(4, 4), torch.zeros(lay.shape(16), dtype=torch.float16)),
                      ["expected a 1-D array", "got shape [4, 4]"]),
    "string ids": (lambda t, lay: ("hello world", torch.zeros(lay.shape(11), dtype=torch.float16)),
                   ["expected a list of ints", "got str"]),
    "one int for ids": (lambda t, lay: (7, torch.zeros(lay.shape(1), dtype=torch.float16)),
                        ["expected a list of ints", "got int"]),
    "generator ids": (lambda t, lay: ((x for x in t[:16]), torch.zeros(lay.shape(16), dtype=torch.float16)),
                      ["expected a list of ints", "got generator"]),
}


@pytest.mark.parametrize("case", sorted(BAD_PUTS))
@pytest.mark.parametrize("mode", ["host", "both"])
def test_bad_put_rejected_and_store_unchanged(make_store, kv_for, case, mode):
    store = make_store(mode)
    tokens = make_tokens(40)
    kv = kv_for(40)
    store.put(tokens, kv)
    store.flush()
    probes = [tokens, tokens[:16], tokens[:20]]
    before = _state(store, probes)
    before_after_probe = store.stats()
    make, fragments = BAD_PUTS[case]
    bad_tokens, bad_kv = make(tokens, store.layout)
    with pytest.raises(ValueError) as info:
        store.put(bad_tokens, bad_kv)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    assert store.stats() == before_after_probe  # nothing counted, nothing stored
    assert _state(store, probes)[1] == before[1] == [40, 16, 16]
    assert_same_kv(store.get(tokens), kv)
    # Bad token ids are rejected by lookup, get, plan and prefetch too, with the same message.
    if not case.startswith("kv") and "kv tokens" not in case:
        for call in (store.lookup, store.get, store.plan, store.prefetch):
            with pytest.raises(ValueError) as again:
                call(bad_tokens)
            assert str(again.value) == str(info.value)


@pytest.mark.parametrize("timeout", ["x", True, float("nan"), [1]])
def test_flush_timeout_must_be_seconds_or_none(make_store, kv_for, timeout):
    """``flush(timeout="x")`` returned True on an idle store and raised ``TypeError`` on a busy one."""
    store = make_store("both")
    store.put(make_tokens(16), kv_for(16))
    with pytest.raises(ValueError, match=r"timeout: expected seconds \(a number\) or None, got "):
        store.flush(timeout)
    assert store.flush(float("inf")) and store.flush(None)  # ten years and more: until done


@pytest.mark.parametrize("salt", [1, 2.0, ["a"]])
def test_bad_salt(make_store, kv_for, salt):
    store = make_store("host")
    tokens = make_tokens(16)
    with pytest.raises(ValueError, match=rf"salt: expected None, str or bytes, got {type(salt).__name__}"):
        store.put(tokens, kv_for(16), salt=salt)
    assert store.stats()["tiers"]["host"]["blocks"] == 0
    assert store.stats()["store"]["puts"] == 0


def test_kv_dtype_differs_from_store_layout(make_store, kv_for):
    store = make_store("both", lay=tiny_layout(dtype=torch.bfloat16))
    tokens = make_tokens(32)
    good = make_kv(store.layout, 32)
    store.put(tokens[:16], good[:, :, :16])
    store.flush()
    before = store.stats()
    with pytest.raises(ValueError) as info:
        store.put(tokens, kv_for(32))  # float16 KV into a bfloat16 store
    assert "expected dtype torch.bfloat16" in str(info.value) and "got torch.float16" in str(info.value)
    assert store.stats() == before
    assert store.lookup(tokens) == 16


@pytest.mark.parametrize(
    "shape_tokens, dtype, fragments",
    [
        (16, torch.float16, ["expected shape [2, 2, 20, 2, 16]", "got [2, 2, 16, 2, 16]"]),
        (21, torch.float16, ["expected shape [2, 2, 20, 2, 16]", "got [2, 2, 21, 2, 16]"]),
        (20, torch.float32, ["expected dtype torch.float16", "got torch.float32"]),
    ],
)
def test_get_into_bad_out(make_store, kv_for, shape_tokens, dtype, fragments):
    store = make_store("both")
    tokens, kv = make_tokens(20), kv_for(20)
    store.put(tokens, kv)
    store.flush()
    before = store.stats()
    out = torch.full(store.layout.shape(shape_tokens), 5, dtype=dtype)
    with pytest.raises(ValueError) as info:
        store.get_into(tokens, out)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert torch.equal(out, torch.full_like(out, 5))
    assert store.stats() == before


def test_bool_token_ids_are_the_ints_they_are(make_store, kv_for):
    """A list is taken as Python ints: True is id 1 wherever it stands, never a silent mix."""
    store = make_store("host")
    tokens = make_tokens(16)
    as_bools = tokens[:15] + [True]
    as_ints = tokens[:15] + [1]
    assert store.block_keys(as_bools) == store.block_keys(as_ints)
    assert store.block_keys([True] + tokens[1:]) == store.block_keys([1] + tokens[1:])


# -- keys do not depend on the process ---------------------------------------------------------------

KEYS_CODE = """
import json
from conftest import make_tokens, tiny_layout
from kvstore.keys import KeyChain
lay = tiny_layout()
out = {}
for hash_name in ("sha256", "blake2b", "xxh3_128"):
    chain = KeyChain("model-x", lay.fingerprint, lay.block_tokens, hash_name)
    for salt in (None, "tenant"):
        refs = chain.blocks(make_tokens(53, seed=7), salt)
        out[f"{hash_name}/{salt}"] = [[r.key.hex(), r.start, r.end] for r in refs]
print(json.dumps(out, sort_keys=True))
"""


def _keys_here():
    exec_globals: dict = {}
    import contextlib
    import io
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(KEYS_CODE, exec_globals)
    return json.loads(buffer.getvalue())


@pytest.mark.slow
def test_keys_equal_across_processes_and_hash_seeds():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    children = [
        subprocess.Popen([sys.executable, "-c", KEYS_CODE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=str(TESTS_DIR), env=dict(env, PYTHONHASHSEED=seed))
        for seed in ("1", "2")
    ]
    results = []
    for child in children:
        stdout, stderr = child.communicate(timeout=120)
        assert child.returncode == 0, stderr
        results.append(json.loads(stdout))
    here = _keys_here()
    assert results[0] == results[1] == here
    assert len(here) == 6
    assert [(s, e) for _, s, e in here["sha256/None"]] == [(0, 16), (16, 32), (32, 48), (48, 53)]
    all_keys = [k for refs in here.values() for k, _, _ in refs]
    assert len(set(all_keys)) == len(all_keys) == 24
    # The chain root is pinned by docs/keys.md's encoding: recompute block 0 by hand.
    import hashlib
    import struct
    lay = tiny_layout()
    root = hashlib.sha256(b"kvstore/root/v1\x00" + struct.pack("<I", 7) + b"model-x" + struct.pack("<I", 16)
                          + lay.fingerprint + b"\x00").digest()
    block0 = hashlib.sha256(root + np.array(make_tokens(53, seed=7)[:16], dtype="<u4").tobytes()).digest()
    assert here["sha256/None"][0][0] == block0.hex()
    chain = KeyChain("model-x", lay.fingerprint, 16)
    assert chain.root() == root


# -- threads ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["host", "disk", "both"])
def test_one_prompt_saved_by_two_threads_at_once_is_stored_and_counted_once(make_store, layout, mode):
    """Each thread was told it stored every block (``blocks_stored`` 2x, dedup 0), each filled every block, and
    each landing evicted room for them: older prompts were lost to a prompt stored once."""
    store = make_store(mode, host_bytes=20 * layout.block_bytes, disk_bytes=40 * (layout.block_bytes + 72))
    older = [(make_tokens(16, seed=i), make_kv(layout, 16, seed=i)) for i in range(16)]
    for tokens, kv in older:
        store.put(tokens, kv)
    tokens, kv = make_tokens(64, seed=99), make_kv(layout, 64, seed=99)
    together, told, fills = threading.Barrier(2), [], []

    def fill(block, dst) -> None:
        fills.append(block.start)
        if block.start == 0:  # both savers inside their first block at once, if both may fill it
            with contextlib.suppress(threading.BrokenBarrierError):
                together.wait(0.5)
        dst.copy_(kv[:, :, block.start:block.end])

    threads = [threading.Thread(target=lambda: told.append(store.put_from(tokens, fill))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    store.flush()
    counted = store.stats()["store"]
    assert sorted(fills) == [0, 16, 32, 48]  # each block filled once (both filled block 0 before)
    assert sum(told) == 4 and counted["blocks_stored"] == 16 + 4  # a put_from lands a block at a time
    assert counted["dedup_blocks"] == 4
    for name, tier in store.stats()["tiers"].items():
        assert tier["blocks_written"] == 16 + 4, name  # one copy of each block written, in each tier
    assert sum(store.lookup(t) == 16 for t, _ in older) == 16  # the 20-block tiers evicted nothing
    assert_same_kv(store.get(tokens), kv)


@pytest.mark.parametrize("mode", ["host", "disk", "both"])
def test_a_fill_waiting_for_another_threads_save_of_its_prompt_is_bounded(make_store, layout, mode, monkeypatch):
    """The fill of a ``put_from`` waits for a second thread's ``put`` of the same prompt: that put waited for the
    fill's block (a landing, a slot being filled) and the fill for it, for ever on a store with host RAM."""
    import kvstore.flow
    import kvstore.tiers.slots

    monkeypatch.setattr(kvstore.flow, "_LANDING_WAIT_SECONDS", 0.2)
    monkeypatch.setattr(kvstore.tiers.slots, "_FILL_WAIT_SECONDS", 0.2)
    store = make_store(mode)
    tokens, kv = make_tokens(32), make_kv(layout, 32)

    def fill(block, dst) -> None:
        dst.copy_(kv[:, :, block.start:block.end])
        if block.start == 0:
            other = threading.Thread(target=store.put, args=(tokens, kv))
            other.start()
            other.join(30)

    saver = threading.Thread(target=store.put_from, args=(tokens, fill))
    saver.start()
    saver.join(30)
    assert not saver.is_alive()
    store.flush()
    assert store.lookup(tokens) == 32
    assert_same_kv(store.get(tokens), kv)
    for name, tier in store.stats()["tiers"].items():
        assert tier["blocks"] == 2 and tier["used_bytes"] <= tier["capacity_bytes"], name


def test_a_save_inside_a_save_of_the_same_prompt_does_not_wait_for_itself(make_store, layout):
    """An engine's fill that saves the same prompt (re-entrant) waited on its own thread's landing."""
    store = make_store("both")
    tokens, kv = make_tokens(32), make_kv(layout, 32)
    inner = []

    def fill(block, dst) -> None:
        dst.copy_(kv[:, :, block.start:block.end])
        if block.start == 0 and not inner:
            inner.append(store.put(tokens, kv))

    done = threading.Thread(target=store.put_from, args=(tokens, fill))
    done.start()
    done.join(20)
    assert not done.is_alive() and inner and store.lookup(tokens) == 32
    assert_same_kv(store.get(tokens), kv)


@pytest.mark.parametrize("write_policy", ["write_through", "write_back"])
def test_threads_overlapping_prefixes(make_store, layout, write_policy):
    block_size = layout.block_bytes
    store = make_store("both", host_bytes=6 * block_size, disk_bytes=10 * (block_size + 72),
                       write_policy=write_policy)
    shared_tokens = make_tokens(32, seed=1000)
    shared_kv = make_kv(layout, 32, seed=1000)
    prompts = {}
    for thread in range(4):
        for j in range(4):
            n_tail = 5 + 9 * j  # 5, 14, 23, 32 tail tokens: partial and full blocks
            seed = 100 * thread + j
            tokens = shared_tokens + make_tokens(n_tail, seed=seed)
            kv = torch.cat([shared_kv, make_kv(layout, n_tail, seed=seed)], dim=2)
            prompts[(thread, j)] = (tokens, kv)
    boundaries = {key: {0} | {r.end for r in store.block_keys(t)} for key, (t, _) in prompts.items()}
    errors: list[BaseException] = []
    checked = [0] * 4
    start = threading.Barrier(4)

    def worker(thread: int) -> None:
        rng = random.Random(thread)
        try:
            start.wait()
            for _ in range(60):
                key = (thread, rng.randrange(4))
                tokens, kv = prompts[key]
                store.put(tokens, kv)
                for probe in (key, (rng.randrange(4), rng.randrange(4))):
                    p_tokens, p_kv = prompts[probe]
                    found = store.lookup(p_tokens)
                    assert found in boundaries[probe]
                    got = store.get(p_tokens)
                    n = got.shape[2]
                    assert n in boundaries[probe], (n, probe)
                    assert_same_kv(got, p_kv[:, :, :n])
                    checked[thread] += n
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    run_threads(worker, 4)
    assert not errors, errors
    assert all(c > 0 for c in checked)
    host, disk = store.host, store.disk
    assert host.used_bytes() <= host.capacity_bytes and host.stats()["blocks"] <= host.num_slots == 6
    assert disk.used_bytes() <= disk.capacity_bytes
    stats = store.stats()
    assert stats["tiers"]["lmdb"]["corrupt"] == 0
    assert stats["tiers"]["host"]["evictions"] > 0
    assert stats["tiers"]["lmdb"]["evictions"] > 0
    # After the threads: what is stored still reads back exactly.
    for tokens, kv in prompts.values():
        got = store.get(tokens)
        assert_same_kv(got, kv[:, :, :got.shape[2]])
    store.close()
    # What is really on disk (the index rebuilt from LMDB) fits the budget and reads back exactly.
    reopened = make_store("disk", disk_bytes=10 * (block_size + 72))
    assert reopened.disk.stats()["evictions"] == 0
    assert 0 < reopened.disk.used_bytes() <= reopened.disk.capacity_bytes
    for tokens, kv in prompts.values():
        got = reopened.get(tokens)
        assert_same_kv(got, kv[:, :, :got.shape[2]])
    assert reopened.disk.stats()["corrupt"] == 0


@pytest.mark.parametrize("policy", ["write_through", "write_back"])
def test_a_store_left_open_at_exit_is_closed_and_loses_nothing(tmp_path, policy):
    """No ``close()``: the interpreter killed the write-behind threads inside a torch call at finalization,
    so 9 runs in 10 aborted (SIGABRT) and the queued writes were lost (LMDB held 720 of 800 blocks)."""
    disk = tmp_path / "disk"
    code = f"""
        from conftest import make_kv, tiny_layout
        from kvstore import KVStore, StoreConfig
        layout = tiny_layout()
        store = KVStore(layout, StoreConfig(host_bytes="1MiB", disk_dir={str(disk)!r}, disk_bytes="8MiB",
                                            disk_sync=False, write_policy={policy!r}))
        for n in range(40):
            store.put([n * 1000 + t for t in range(160)], make_kv(layout, 160, seed=n))
        """
    for _ in range(3):
        run_python(code)  # exit status 0, every run
        with KVStore(tiny_layout(), StoreConfig(host_bytes=0, disk_dir=str(disk), disk_bytes="8MiB")) as store:
            assert all(store.lookup([n * 1000 + t for t in range(160)]) == 160 for n in range(40))


def test_a_store_that_fails_to_open_late_leaves_no_thread_and_no_lock(tmp_path, monkeypatch):
    """The OS refusing a prefetch worker's thread left the write-behind workers running and the LMDB
    directory locked for the rest of the process (``DirectoryInUseError`` on every reopen)."""
    import kvstore.hooks

    def refused(*args, **kwargs):
        raise RuntimeError("can't start new thread")

    before = set(threading.enumerate())
    config = StoreConfig(host_bytes="1MiB", disk_dir=str(tmp_path / "disk"), disk_bytes="8MiB", disk_sync=False)
    with monkeypatch.context() as patch:
        patch.setattr(kvstore.hooks, "Prefetcher", refused)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            KVStore(tiny_layout(), config)
    assert set(threading.enumerate()) <= before
    with KVStore(tiny_layout(), config) as store:  # the directory is free again
        assert store.put(make_tokens(16), make_kv(tiny_layout(), 16)) == 1


@pytest.mark.parametrize("name, value", [("prefetch_workers", 257), ("files_io_threads", 10**6),
                                         ("remote_connections", 1025), ("load_lookahead_layers", 4097)])
def test_thread_and_connection_counts_are_bounded(name, value):
    with pytest.raises(ValueError, match=f"^{name}: expected an integer >= 1 and <= "):
        StoreConfig(**{name: value})


@pytest.mark.parametrize("bad", [dict(files_bytes=100), dict(files_dir="FILE"), dict(disk_bytes=2**62),
                                 dict(disk_bytes=100), dict(disk_dir="FILE")])
def test_a_tier_setting_opening_would_refuse_leaves_no_tier_made(tmp_path, bad):
    """LMDB (opened first) had made its files, and the host pool its memory, when the files tier or LMDB's
    own map refused a setting: the ValueError came after tiers were touched."""
    (tmp_path / "FILE").write_text("not a directory")
    settings = dict(host_bytes="1MiB", disk_dir=str(tmp_path / "disk"), disk_bytes="8MiB", disk_sync=False,
                    files_dir=str(tmp_path / "files"), files_bytes="8MiB")
    settings.update({key: str(tmp_path / value) if key.endswith("_dir") else value for key, value in bad.items()})
    with pytest.raises(ValueError, match=f"^{next(iter(bad))}: expected"):
        KVStore(tiny_layout(), StoreConfig(**settings))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["FILE"]


def test_a_forked_child_exits_without_closing_its_parents_store(tmp_path):
    """The store closed at exit in a child forked with writes queued: no thread of the child would ever write
    them, so its exit waited for ever on the flush."""
    out = run_python(f"""
        import os, sys, time
        from conftest import make_kv, tiny_layout
        from kvstore import KVStore, StoreConfig
        layout = tiny_layout()
        store = KVStore(layout, StoreConfig(host_bytes="1MiB", disk_dir={str(tmp_path / "disk")!r},
                                            disk_bytes="8MiB", disk_sync=True))
        for n in range(20):
            store.put([n * 1000 + t for t in range(160)], make_kv(layout, 160, seed=n))
        pid = os.fork()
        if pid == 0:
            sys.exit(0)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
            time.sleep(0.05)
        if time.monotonic() >= deadline:
            os.kill(pid, 9)
        print("child exited" if time.monotonic() < deadline else "child hung")
        store.close()
        """)
    assert "child exited" in out


@pytest.mark.parametrize("lower", ["lmdb", "files"])
def test_host_misses_count_the_blocks_read_below_it(tmp_path, layout, lower):
    """The files tier reads a run side by side without asking host RAM block by block: host RAM counted no miss
    for the same read that counted 4 with LMDB below."""
    tokens, kv = make_tokens(64), make_kv(layout, 64)
    below = dict(disk_dir=str(tmp_path / "d"), disk_bytes="1MiB") if lower == "lmdb" else \
        dict(files_dir=str(tmp_path / "f"), files_bytes="1MiB")
    config = StoreConfig(model_id="m", host_bytes="1MiB", **below)
    with KVStore(layout, config) as store:
        store.put(tokens, kv)
    with KVStore(layout, config) as store:  # host RAM empty
        assert_same_kv(store.get(tokens), kv)
        tiers = store.stats()["tiers"]
        assert (tiers["host"]["hits"], tiers["host"]["misses"]) == (0, 4)
        assert tiers[lower]["hits"] == 4


def _save_tail(store, tokens, kv, how, start):
    """Store ``tokens`` whose blocks before ``start`` are stored already, the way an engine does after a hit."""
    if how == "put":
        store.put(tokens, kv)
    elif how == "put_from":
        store.put_from(tokens, lambda block, dst: dst.copy_(kv[:, :, block.start:block.end]), start=start)
    else:
        saver = store.save(tokens, layer_wise=True, start=start)
        for layer in range(store.layout.num_layers):
            saver.save_layer(layer, kv[layer, :, start:])
        assert saver.done


HEAD_TIERS = {  # each with room for the prompt's two leading blocks only, below host RAM too
    "host": lambda lay, path: dict(host_bytes=2 * lay.block_bytes),
    "lmdb": lambda lay, path: dict(host_bytes=0, disk_dir=str(path / "lmdb"), disk_sync=False,
                                   disk_bytes=2 * (lay.block_bytes + HEADER_BYTES)),
    "files": lambda lay, path: dict(host_bytes=0, files_dir=str(path / "files"), files_sync=False,
                                    files_bytes=2 * (lay.block_bytes + HEADER_BYTES)),
    "host+lmdb": lambda lay, path: dict(host_bytes=8 * lay.block_bytes, disk_dir=str(path / "lmdb"),
                                        disk_sync=False, disk_bytes=2 * (lay.block_bytes + HEADER_BYTES)),
}


@pytest.mark.parametrize("how", ["put", "put_from", "layer-wise save"])
@pytest.mark.parametrize("tiers", sorted(HEAD_TIERS))
def test_a_prompt_whose_head_is_stored_never_evicts_it_for_its_tail(tmp_path, tiers, how):
    """An engine saves a prompt after a hit on its head: the tail's blocks evicted the head (stored earlier,
    so the least recently used), and the prompt, then every prompt sharing that head, missed (lookup 64
    tokens, then 0). The head stays; what has no room beside it is rejected or goes to the tier below."""
    lay = tiny_layout(dtype=torch.float32)
    bt = lay.block_tokens
    tokens, kv = make_tokens(4 * bt + 2), make_kv(lay, 4 * bt + 2, seed=3)
    with KVStore(lay, StoreConfig(model_id="m", **HEAD_TIERS[tiers](lay, tmp_path))) as store:
        store.put(tokens[:2 * bt], kv[:, :, :2 * bt])
        store.flush()
        _save_tail(store, tokens, kv, how, 2 * bt)
        store.flush()
        assert store.lookup(tokens) >= 2 * bt
        assert_same_kv(store.get(tokens[:2 * bt]), kv[:, :, :2 * bt])
    if tiers == "host+lmdb":  # the copies written behind kept the head in LMDB as well
        with KVStore(lay, StoreConfig(model_id="m", **HEAD_TIERS["lmdb"](lay, tmp_path))) as disk_only:
            assert disk_only.lookup(tokens) == 2 * bt
            assert_same_kv(disk_only.get(tokens[:2 * bt]), kv[:, :, :2 * bt])
