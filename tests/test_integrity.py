"""Damaged blocks on disk, through the store: real bytes flipped, cut and swapped in LMDB and in block files.

Every case stores a prompt, closes the store, damages the stored bytes the way
a disk, a torn copy or a foreign writer would, and opens a new store on the
same directories. The new store must return exactly the intact prefix (or the
whole prompt from a tier that still holds a good copy), delete the damaged
block, count it once as ``corrupt``, never raise, and take the block again on
the next put. (Tier-level damage tests live in ``tests/tiers``; these go
through ``KVStore``: the read path, the fall-through to the next tier, the
promotion and the re-put.)
"""

from __future__ import annotations

import os
import shutil

import lmdb
import pytest
import torch

from conftest import assert_same_kv, make_kv, make_tokens, tiny_layout
from kvstore.blockformat import HEADER_BYTES, MAGIC
from kvstore.config import StoreConfig
from kvstore.store import KVStore
from kvstore.tiers.fanout import block_path
from kvstore.tiers.files import FilesTier
from kvstore.tiers.lmdb import LmdbTier

STORED = 4096 + HEADER_BYTES  # a full tiny-layout block below host RAM
NUM_TOKENS = 40  # blocks [0:16], [16:32] and the partial tail [32:40]
DAMAGED = 1  # the block every case damages: the middle one
INTACT_PREFIX = 16  # what a store can still return when only block DAMAGED is lost
# header fields: magic 4, version 2, key_len 1, encoding 1, layout 16, key 32, length 8, checksum 8
CHECKSUM_OFFSET = 4 + 2 + 2 + 16 + 32 + 8
LAYOUT_OFFSET = 4 + 2 + 2
# LmdbTier reserves max(2 * capacity, capacity + 1 GiB) of map; reopen the environment with as much.
DISK_BYTES = 64 * STORED
MAP_SIZE = max(2 * DISK_BYTES, DISK_BYTES + (1 << 30))


@pytest.fixture
def prompt(layout):
    return make_tokens(NUM_TOKENS, seed=5), make_kv(layout, NUM_TOKENS, seed=5)


@pytest.fixture
def open_store(tmp_path, layout):
    """``open_store(lmdb=True, files=True, **config)``: a store on fixed dirs under tmp_path, closed at teardown.

    A small host pool sits on top (empty in every new store, so reads go to disk).
    ``slow_factor`` is huge so no scheduler hiccup can mark a tier degraded mid-test.
    """
    stores = []

    def factory(lmdb: bool = True, files: bool = True, lay=None, **config) -> KVStore:
        settings = dict(host_bytes=8 * 4096, disk_dir=str(tmp_path / "lmdb") if lmdb else None,
                        disk_bytes=DISK_BYTES, disk_sync=False,
                        files_dir=str(tmp_path / "files") if files else None,
                        files_bytes=64 * STORED, files_sync=False, slow_factor=1e9)
        settings.update(config)
        store = KVStore(lay or layout, StoreConfig(**settings))
        stores.append(store)
        return store

    yield factory
    for store in stores:
        store.close()


def _seed(open_store, prompt, **tiers) -> list[bytes]:
    """Store the prompt in the given persistent tiers, close; returns its block keys."""
    tokens, kv = prompt
    store = open_store(**tiers)
    assert store.put(tokens, kv) == 3
    assert store.flush(timeout=30)
    keys = [ref.key for ref in store.block_keys(tokens)]
    for tier in (store.disk, store.files):
        if tier is not None:
            assert all(tier.contains(key) for key in keys), tier.name
    store.close()
    return keys


def _tier_stats(store, name: str) -> dict:
    return store.stats()["tiers"][name]


# -- damage helpers --------------------------------------------------------------------------------------


def _damage_lmdb(path, key: bytes, how: str, layout) -> None:
    """Damage block ``key`` in the LMDB environment at ``path`` (no store has it open)."""
    if how == "other-layout":  # a writer of another dtype stored this very key
        other = tiny_layout(dtype=torch.bfloat16)  # same byte size, another fingerprint
        tier = LmdbTier(path, DISK_BYTES, other, sync=False)
        assert tier.delete(key)
        assert tier.put_many([(key, make_kv(other, 16, seed=99))]) == 1
        tier.close()
        return
    env = lmdb.open(str(path), map_size=MAP_SIZE, max_dbs=2, subdir=True)
    try:
        blocks, meta = env.open_db(b"blocks"), env.open_db(b"meta")
        with env.begin(write=True) as txn:
            payload = bytearray(txn.get(key, db=blocks))
            header = bytearray(txn.get(key, db=meta))
            assert len(payload) in (4096, 8 * 256) and len(header) == HEADER_BYTES + 16  # full block or tail; stamp, form
            assert bytes(header[:4]) == MAGIC
            if how == "payload-bit":
                payload[2000] ^= 0x04
            elif how == "payload-truncated":
                payload = payload[:-100]
            elif how == "payload-empty":
                payload = bytearray()
            elif how == "meta-checksum":
                header[CHECKSUM_OFFSET] ^= 0x01  # parses, but the checksum no longer matches
            elif how == "meta-layout":
                header[LAYOUT_OFFSET + 3] ^= 0x01  # parses, names another layout
            elif how == "meta-magic":
                header[0] ^= 0x01  # does not parse: dropped when the index is rebuilt
            elif how == "meta-truncated":
                header = header[:HEADER_BYTES - 5]  # does not parse: dropped when the index is rebuilt
            else:
                raise AssertionError(how)
            txn.put(key, bytes(payload), db=blocks)
            txn.put(key, bytes(header), db=meta)
    finally:
        env.close()


def _block_file(files_dir, key: bytes) -> str:
    return block_path(str(files_dir), key)


def _damage_file(files_dir, keys: list[bytes], index: int, how: str, layout) -> None:
    """Damage the file of block ``keys[index]`` under ``files_dir`` (no store has it open)."""
    path = _block_file(files_dir, keys[index])
    data = bytearray(open(path, "rb").read())
    assert len(data) in (STORED, HEADER_BYTES + 8 * 256)  # a full block or the 8-token tail
    if how == "payload-bit":
        data[HEADER_BYTES + 1234] ^= 0x80
    elif how == "header-byte":
        data[LAYOUT_OFFSET + 7] ^= 0x20  # the layout fingerprint in the header
    elif how == "checksum-byte":
        data[CHECKSUM_OFFSET + 2] ^= 0x01
    elif how == "truncated":
        data = data[:HEADER_BYTES + 1000]
    elif how == "header-only":
        data = data[:HEADER_BYTES]
    elif how == "grown":  # the whole block, then bytes no block of this size has: not what was written
        data += b"\x00" * 3
    elif how == "empty":
        data = bytearray()
    elif how == "other-block":  # the intact file of the block before it, copied over this one
        data = bytearray(open(_block_file(files_dir, keys[index - 1]), "rb").read())
    elif how == "other-layout":  # a writer of another dtype stored this very key
        os.unlink(path)
        other = tiny_layout(dtype=torch.bfloat16)  # same byte size, another fingerprint
        tier = FilesTier(files_dir, 64 * STORED, other, sync=False)
        assert tier.put_many([(keys[index], make_kv(other, 16, seed=99))]) == 1
        tier.close()
        data = bytearray(open(path, "rb").read())
        assert len(data) == STORED
    else:
        raise AssertionError(how)
    with open(path, "wb") as f:
        f.write(data)


LMDB_DAMAGE = ["payload-bit", "payload-truncated", "payload-empty", "meta-checksum", "meta-layout", "meta-magic",
               "meta-truncated", "other-layout"]
FILE_DAMAGE = ["payload-bit", "header-byte", "checksum-byte", "truncated", "header-only", "empty", "other-block",
               "other-layout", "grown"]


# -- (a) damage in the only tier holding the block ---------------------------------------------------------


def _check_prefix_then_heal(open_store, prompt, name: str, keys: list[bytes], on_disk, dropped_on_open=False,
                            **tiers) -> None:
    """The damaged block cuts the prompt, is counted once and removed for good; a put stores it again.

    ``on_disk()`` says whether the damaged block's record/file exists (called with no store open).
    """
    tokens, kv = prompt
    store = open_store(**tiers)
    tier = store.disk if name == "lmdb" else store.files
    # A meta record that does not parse is dropped (and counted) when the index is rebuilt on open;
    # any other damage is found when the block is read.
    assert _tier_stats(store, name)["corrupt"] == int(dropped_on_open)
    assert tier.contains(keys[DAMAGED]) == (not dropped_on_open)
    got = store.get(tokens)  # no exception: the intact prefix
    assert_same_kv(got, kv[:, :, :INTACT_PREFIX])
    stats = _tier_stats(store, name)
    assert stats["corrupt"] == 1
    assert stats["hits"] == 1  # block 0; the tail behind the damaged block was never read
    assert not tier.contains(keys[DAMAGED])
    assert tier.contains(keys[0]) and tier.contains(keys[2])
    assert store.lookup(tokens) == INTACT_PREFIX  # nothing claims the damaged block any more
    assert_same_kv(store.get(tokens), kv[:, :, :INTACT_PREFIX])  # a plain miss now, not counted again
    assert _tier_stats(store, name)["corrupt"] == 1
    assert sum(_tier_stats(store, n)["errors"] for n in store.stats()["tiers"]) == 0
    store.close()
    assert not on_disk()  # deleted from the medium, not just forgotten

    store = open_store(**tiers)
    tier = store.disk if name == "lmdb" else store.files
    assert store.lookup(tokens) == INTACT_PREFIX
    assert store.put(tokens, kv) == 1  # only the damaged block is stored again
    assert store.flush(timeout=30)
    assert tier.contains(keys[DAMAGED])
    assert_same_kv(store.get(tokens), kv)
    assert _tier_stats(store, name)["corrupt"] == 0
    store.close()
    assert on_disk()

    store = open_store(**tiers)  # the healed block survives a restart, read from disk this time
    assert_same_kv(store.get(tokens), kv)
    stats = _tier_stats(store, name)
    assert (stats["corrupt"], stats["hits"]) == (0, 3)


def _in_lmdb(path, key: bytes) -> bool:
    """Whether ``key`` has a record in either database of the environment (no store has it open)."""
    env = lmdb.open(str(path), map_size=MAP_SIZE, max_dbs=2, subdir=True)
    try:
        blocks, meta = env.open_db(b"blocks"), env.open_db(b"meta")
        with env.begin() as txn:
            return txn.get(key, db=blocks) is not None or txn.get(key, db=meta) is not None
    finally:
        env.close()


@pytest.mark.parametrize("how", LMDB_DAMAGE)
def test_lmdb_damage_in_the_only_copy_is_a_miss(open_store, prompt, tmp_path, layout, how):
    keys = _seed(open_store, prompt, files=False)
    _damage_lmdb(tmp_path / "lmdb", keys[DAMAGED], how, layout)
    assert _in_lmdb(tmp_path / "lmdb", keys[DAMAGED])
    _check_prefix_then_heal(open_store, prompt, "lmdb", keys, lambda: _in_lmdb(tmp_path / "lmdb", keys[DAMAGED]),
                            dropped_on_open=how in ("meta-magic", "meta-truncated"), files=False)


@pytest.mark.parametrize("how", FILE_DAMAGE)
def test_file_damage_in_the_only_copy_is_a_miss(open_store, prompt, tmp_path, layout, how):
    keys = _seed(open_store, prompt, lmdb=False)
    _damage_file(tmp_path / "files", keys, DAMAGED, how, layout)
    path = _block_file(tmp_path / "files", keys[DAMAGED])
    _check_prefix_then_heal(open_store, prompt, "files", keys, lambda: os.path.exists(path), lmdb=False)
    assert os.path.getsize(path) == STORED


def test_damaged_first_block_returns_nothing(open_store, prompt, tmp_path, layout):
    tokens, kv = prompt
    keys = _seed(open_store, prompt, lmdb=False)
    _damage_file(tmp_path / "files", keys, 0, "payload-bit", layout)
    store = open_store(lmdb=False)
    got = store.get(tokens)
    assert tuple(got.shape) == layout.shape(0) and got.dtype == layout.dtype
    assert _tier_stats(store, "files")["corrupt"] == 1
    assert not os.path.exists(_block_file(tmp_path / "files", keys[0]))
    assert store.lookup(tokens) == 0
    out = torch.full(layout.shape(NUM_TOKENS), 7.0, dtype=layout.dtype)
    assert store.get_into(tokens, out) == 0
    assert store.put(tokens, kv) == 1
    assert_same_kv(store.get(tokens), kv)


def test_damaged_tail_keeps_the_full_blocks(open_store, prompt, tmp_path, layout):
    tokens, kv = prompt
    keys = _seed(open_store, prompt, files=False)
    _damage_lmdb(tmp_path / "lmdb", keys[2], "payload-bit", layout)
    store = open_store(files=False)
    assert_same_kv(store.get(tokens), kv[:, :, :32])
    assert _tier_stats(store, "lmdb")["corrupt"] == 1
    assert not store.disk.contains(keys[2])
    assert store.put(tokens, kv) == 1
    assert_same_kv(store.get(tokens), kv)


def test_only_damaged_blocks_that_are_read_are_counted(open_store, prompt, tmp_path, layout):
    """Two damaged blocks: the get stops at the first, so the second is found (and counted) only later."""
    tokens, kv = prompt
    keys = _seed(open_store, prompt, lmdb=False)
    _damage_file(tmp_path / "files", keys, 1, "payload-bit", layout)
    _damage_file(tmp_path / "files", keys, 2, "truncated", layout)
    store = open_store(lmdb=False)
    assert_same_kv(store.get(tokens), kv[:, :, :16])
    assert _tier_stats(store, "files")["corrupt"] == 1
    assert os.path.exists(_block_file(tmp_path / "files", keys[2]))  # not read yet: still there
    # The put stores block 1 again; block 2's file exists, so it counts as stored (judged on read only).
    assert store.put(tokens, kv) == 1
    assert store.flush(timeout=30)
    assert_same_kv(store.get(tokens), kv[:, :, :32])
    assert _tier_stats(store, "files")["corrupt"] == 2
    assert not os.path.exists(_block_file(tmp_path / "files", keys[2]))
    assert store.put(tokens, kv) == 1
    assert_same_kv(store.get(tokens), kv)
    assert _tier_stats(store, "files")["corrupt"] == 2


# -- (b) damage in one tier while another holds a good copy -----------------------------------------------


@pytest.mark.parametrize("promote", [True, False])
@pytest.mark.parametrize("how", ["payload-bit", "meta-checksum", "payload-truncated", "other-layout"])
def test_lmdb_damage_falls_through_to_the_files_copy(open_store, prompt, tmp_path, layout, how, promote):
    tokens, kv = prompt
    keys = _seed(open_store, prompt)
    _damage_lmdb(tmp_path / "lmdb", keys[DAMAGED], how, layout)

    store = open_store(promote=promote)
    assert_same_kv(store.get(tokens), kv)  # the whole prompt, the middle block from the files tier
    lmdb_stats, files_stats = _tier_stats(store, "lmdb"), _tier_stats(store, "files")
    assert lmdb_stats["corrupt"] == 1 and lmdb_stats["hits"] == 2
    assert files_stats["corrupt"] == 0 and files_stats["hits"] == 1
    assert os.path.exists(_block_file(tmp_path / "files", keys[DAMAGED]))
    assert store.flush(timeout=30)
    if promote:  # the good copy went back up into LMDB
        assert store.disk.contains(keys[DAMAGED])
        out = torch.empty(layout.shape(16), dtype=layout.dtype)
        assert store.disk.get_into(keys[DAMAGED], out)
        assert_same_kv(out, kv[:, :, 16:32])
    else:
        assert not store.disk.contains(keys[DAMAGED])
    assert_same_kv(store.get(tokens), kv)
    assert _tier_stats(store, "lmdb")["corrupt"] == 1
    store.close()

    again = open_store()
    assert_same_kv(again.get(tokens), kv)
    assert _tier_stats(again, "lmdb")["corrupt"] == 0 and _tier_stats(again, "files")["corrupt"] == 0


def test_files_damage_behind_a_good_lmdb_copy_is_never_read(open_store, prompt, tmp_path, layout):
    tokens, kv = prompt
    keys = _seed(open_store, prompt)
    _damage_file(tmp_path / "files", keys, DAMAGED, "payload-bit", layout)
    store = open_store()
    assert_same_kv(store.get(tokens), kv)
    assert _tier_stats(store, "files")["corrupt"] == 0 and _tier_stats(store, "files")["hits"] == 0
    assert _tier_stats(store, "lmdb")["hits"] == 3


def test_damage_in_every_tier_is_a_miss(open_store, prompt, tmp_path, layout):
    tokens, kv = prompt
    keys = _seed(open_store, prompt)
    _damage_lmdb(tmp_path / "lmdb", keys[DAMAGED], "payload-bit", layout)
    _damage_file(tmp_path / "files", keys, DAMAGED, "other-block", layout)
    store = open_store()
    assert_same_kv(store.get(tokens), kv[:, :, :INTACT_PREFIX])
    assert _tier_stats(store, "lmdb")["corrupt"] == 1 and _tier_stats(store, "files")["corrupt"] == 1
    assert not store.disk.contains(keys[DAMAGED]) and not store.files.contains(keys[DAMAGED])
    assert not os.path.exists(_block_file(tmp_path / "files", keys[DAMAGED]))
    assert store.put(tokens, kv) == 1
    assert store.flush(timeout=30)
    assert store.disk.contains(keys[DAMAGED]) and store.files.contains(keys[DAMAGED])
    assert_same_kv(store.get(tokens), kv)
    store.close()
    again = open_store()
    assert_same_kv(again.get(tokens), kv)
    assert _tier_stats(again, "lmdb")["corrupt"] == 0


# -- another layout, same key -----------------------------------------------------------------------------


def test_block_of_another_layout_at_the_same_key_is_a_miss(open_store, prompt, tmp_path, layout):
    """A file written for another dtype under this key (same size): no bytes of it come back."""
    tokens, kv = prompt
    keys = _seed(open_store, prompt, lmdb=False)
    foreign = tmp_path / "foreign"
    other = tiny_layout(dtype=torch.bfloat16)
    tier = FilesTier(foreign, 64 * STORED, other, sync=False)
    assert tier.put_many([(keys[0], make_kv(other, 16, seed=5))]) == 1
    tier.close()
    shutil.copyfile(_block_file(foreign, keys[0]), _block_file(tmp_path / "files", keys[0]))

    store = open_store(lmdb=False)
    assert store.lookup(tokens) == NUM_TOKENS  # present by name; judged when read
    out = torch.full(layout.shape(NUM_TOKENS), 3.0, dtype=layout.dtype)
    assert store.get_into(tokens, out) == 0  # only the count is valid: the failed block's slice was read into
    rest = out.shape[2] - 16
    assert torch.equal(out[:, :, 16:], torch.full(layout.shape(rest), 3.0, dtype=layout.dtype))  # never reached
    assert _tier_stats(store, "files")["corrupt"] == 1
    assert not os.path.exists(_block_file(tmp_path / "files", keys[0]))
    assert store.put(tokens, kv) == 1
    assert_same_kv(store.get(tokens), kv)


def test_get_into_counts_only_verified_tokens_when_damage_was_read_into_out(tmp_path):
    """A contiguous slice of ``out`` is read into straight from the file, before the checksum says no.

    The contract: the returned count covers only verified tokens; the damaged
    block's slice may hold its bad bytes, and blocks after it are not touched.
    """
    lay = tiny_layout(num_layers=1, kv_parts=1)  # out[:, :, a:b] is contiguous
    tokens, kv = make_tokens(NUM_TOKENS, seed=8), make_kv(lay, NUM_TOKENS, seed=8)
    config = StoreConfig(host_bytes=0, files_dir=str(tmp_path / "files"), files_sync=False, slow_factor=1e9)
    with KVStore(lay, config) as store:
        assert store.put(tokens, kv) == 3
        keys = [ref.key for ref in store.block_keys(tokens)]
    path = _block_file(tmp_path / "files", keys[DAMAGED])
    data = bytearray(open(path, "rb").read())
    data[HEADER_BYTES + 100] ^= 0x01
    open(path, "wb").write(data)
    with KVStore(lay, config) as store:
        out = torch.full(lay.shape(NUM_TOKENS), 7.0, dtype=lay.dtype)
        assert store.get_into(tokens, out) == INTACT_PREFIX
        assert store.stats()["tiers"]["files"]["corrupt"] == 1
        assert_same_kv(out[:, :, :INTACT_PREFIX], kv[:, :, :INTACT_PREFIX])
        damaged_end = store.block_keys(tokens)[DAMAGED].end
        assert not torch.equal(out[:, :, INTACT_PREFIX:damaged_end], kv[:, :, INTACT_PREFIX:damaged_end])
        assert torch.equal(out[:, :, damaged_end:], torch.full(lay.shape(NUM_TOKENS - damaged_end), 7.0,
                                                               dtype=lay.dtype))


# -- (e) a header whose encoding byte flipped ----------------------------------------------------------------

ENCODING_OFFSET = 4 + 2 + 1  # magic, version, key_len


def _kv_whose_zstd_frame_is_one_raw_block(layout) -> torch.Tensor:
    """KV whose zstd frame is exactly as long as the raw block: read as raw, its length would pass."""
    from kvstore.compression import get_codec
    zstd = get_codec("zstd")
    gen = torch.Generator().manual_seed(4)
    noise = torch.randint(0, 256, (layout.block_bytes,), dtype=torch.uint8, generator=gen)
    low = torch.randint(0, 200, (layout.block_bytes,), dtype=torch.uint8, generator=gen)
    for random_bytes in range(layout.block_bytes):
        raw = low.clone()
        raw[:random_bytes] = noise[:random_bytes]
        kv = raw.view(layout.dtype).view(layout.shape(layout.block_tokens))
        if len(zstd.encode(kv)) == layout.block_bytes:
            return kv
    raise AssertionError("no KV found whose frame is one raw block long")


@pytest.mark.parametrize("name", ["lmdb", "files"])
def test_a_frame_whose_header_says_raw_is_a_miss_not_its_frame_bytes(open_store, tmp_path, layout, name):
    """One bit of the header's encoding byte (zstd frame -> raw) served the frame's own bytes as the KV when
    the frame was as long as the raw block: the checksum covered the payload, not how to read it."""
    kv = _kv_whose_zstd_frame_is_one_raw_block(layout)
    tokens = make_tokens(16, seed=6)
    codec = dict(disk_codec="zstd") if name == "lmdb" else dict(files_codec="zstd")
    tiers = dict(lmdb=name == "lmdb", files=name == "files", **codec)
    store = open_store(**tiers)
    assert store.put(tokens, kv) == 1 and store.flush(timeout=30)
    (key,) = [ref.key for ref in store.block_keys(tokens)]
    store.close()
    if name == "files":
        with open(_block_file(tmp_path / "files", key), "r+b") as f:
            f.seek(ENCODING_OFFSET)
            assert f.read(1) == b"\x02"  # zstd's codec id + 1
            f.seek(ENCODING_OFFSET)
            f.write(b"\x00")
    else:
        env = lmdb.open(str(tmp_path / "lmdb"), map_size=MAP_SIZE, max_dbs=2, subdir=True)
        try:
            with env.begin(write=True) as txn:
                meta = env.open_db(b"meta", txn=txn)
                header = bytearray(txn.get(key, db=meta))
                assert header[ENCODING_OFFSET] == 2
                header[ENCODING_OFFSET] = 0
                txn.put(key, bytes(header), db=meta)
        finally:
            env.close()
    store = open_store(**tiers)
    got = store.get(tokens)
    assert got.shape[2] == 0  # a miss, never the frame's bytes
    assert _tier_stats(store, name)["corrupt"] == 1
    assert store.put(tokens, kv) == 1 and store.flush(timeout=30)
    assert torch.equal(store.get(tokens).view(torch.uint8), kv.view(torch.uint8))  # random bytes hold NaNs
