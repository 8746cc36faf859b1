"""Exact bytes or a miss across stores: lossy bytes never reach an exact tier, the header (not the bytes)
says how a payload is encoded, and a caller's bad argument is a ValueError that blames no tier."""

from __future__ import annotations

import struct

import pytest
import torch

from conftest import make_kv, make_tokens, tiny_layout
from kvstore import KVStore, StoreConfig
from kvstore.compression import get_codec
from kvstore.compression.frame import pack_frame, parse_frame

LAYOUT = tiny_layout()  # 16-token blocks of 4096 bytes, fp16
BLOCK = LAYOUT.block_bytes


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def assert_exact_prefix(got: torch.Tensor, kv: torch.Tensor) -> int:
    """``got`` is exactly the first ``n`` tokens of ``kv`` (bit for bit); returns ``n``."""
    n = got.shape[2]
    assert n <= kv.shape[2]
    assert torch.equal(bits(got), bits(kv[:, :, :n])), "approximate or foreign bytes returned as exact KV"
    return n


def exact_reader(shared: str) -> KVStore:
    """A store with exact codecs only, reading the shared directory (as another process would)."""
    return KVStore(LAYOUT, StoreConfig(model_id="m", host_bytes=0, files_dir=shared, files_bytes=64 * BLOCK))


def test_a_promoted_lossy_block_is_not_copied_into_an_exact_shared_tier_by_a_re_put(tmp_path):
    tokens, kv = make_tokens(48), make_kv(LAYOUT, 48)
    shared = str(tmp_path / "shared")
    config = StoreConfig(model_id="m", host_bytes=BLOCK, disk_dir=str(tmp_path / "disk"), disk_bytes=64 * BLOCK,
                         disk_codec="kivi4", files_dir=shared, files_bytes=64 * BLOCK)
    with KVStore(LAYOUT, config) as store:
        store.put(tokens, kv)
        store.flush()
        for block in store.block_keys(tokens):  # the shared copies are evicted (by another process, say)
            store.files.delete(block.key)
        approx = store.get(tokens)  # served from the kivi4 disk tier and promoted into host RAM
        assert approx.shape[2] == 48 and not torch.equal(bits(approx), bits(kv))
        store.put(tokens, kv)  # re-admission: the exact bytes, not the promoted approximation, go down
        store.flush()
        assert store.stats()["tiers"]["files"]["blocks"] >= 1
    with exact_reader(shared) as reader:
        assert assert_exact_prefix(reader.get(tokens), kv) >= 16


def test_promotion_never_writes_approximate_bytes_into_an_exact_faster_persistent_tier(tmp_path):
    """host_bytes=0: LMDB (exact) sits above a lossy files tier; a hit below is not copied up."""
    tokens, kv = make_tokens(48), make_kv(LAYOUT, 48)
    shared = str(tmp_path / "shared")
    writer = StoreConfig(model_id="m", host_bytes=0, files_dir=shared, files_bytes=64 * BLOCK, files_codec="kivi4")
    with KVStore(LAYOUT, writer) as store:
        store.put(tokens, kv)
    config = StoreConfig(model_id="m", host_bytes=0, disk_dir=str(tmp_path / "disk"), disk_bytes=64 * BLOCK,
                         files_dir=shared, files_bytes=64 * BLOCK, files_codec="kivi4")
    with KVStore(LAYOUT, config) as store:
        assert store.get(tokens).shape[2] == 48  # this store opted into kivi4: it may read it
        store.flush()
        assert store.stats()["tiers"]["lmdb"]["blocks"] == 0
        assert store.stats()["tiers"]["lmdb"]["lossy_refused"] >= 1
    with KVStore(LAYOUT, StoreConfig(model_id="m", host_bytes=0, disk_dir=str(tmp_path / "disk"),
                                     disk_bytes=64 * BLOCK)) as exact:
        assert exact.get(tokens).shape[2] == 0


def test_write_back_of_a_lossy_tiers_evictions_skips_an_exact_tier(tmp_path):
    shared = str(tmp_path / "shared")
    config = StoreConfig(model_id="m", host_bytes=BLOCK, disk_dir=str(tmp_path / "disk"), disk_bytes=2 * BLOCK + 400,
                         disk_codec="kivi4", files_dir=shared, files_bytes=64 * BLOCK, files_write_policy="write_back")
    prompts = [(make_tokens(16, seed=i), make_kv(LAYOUT, 16, seed=i)) for i in range(8)]
    with KVStore(LAYOUT, config) as store:
        for tokens, kv in prompts:
            store.put(tokens, kv)
            store.flush()
        stats = store.stats()["tiers"]
        assert stats["lmdb"]["evictions"] >= 1
        assert stats["files"]["lossy_refused"] >= 1
    with exact_reader(shared) as reader:
        for tokens, kv in prompts:
            assert_exact_prefix(reader.get(tokens), kv)


def test_a_store_with_exact_codecs_never_reads_another_stores_lossy_frames(tmp_path):
    tokens, kv = make_tokens(40), make_kv(LAYOUT, 40)
    shared = str(tmp_path / "shared")
    with KVStore(LAYOUT, StoreConfig(model_id="m", host_bytes=0, files_dir=shared, files_bytes=64 * BLOCK,
                                     files_codec="kivi4")) as lossy:
        lossy.put(tokens, kv)
    with exact_reader(shared) as reader:
        assert reader.lookup(tokens) == 0  # the files are there, in a lossy form's names: not promised
        assert reader.get(tokens).shape[2] == 0
        reader.put(tokens, kv)  # stored exact beside them: both stores hit from now on
        assert reader.lookup(tokens) == 40 and bits(reader.get(tokens)).equal(bits(kv))
    with KVStore(LAYOUT, StoreConfig(model_id="m", host_bytes=0, files_dir=shared, files_bytes=64 * BLOCK,
                                     files_codec="kivi4")) as lossy:
        assert lossy.lookup(tokens) == 40 and lossy.get(tokens).shape[2] == 40


def crafted_frame_block() -> torch.Tensor:
    """Raw fp16 KV whose bytes are exactly a valid zstd frame (good checksum) of an all-zero block."""
    frame = get_codec("zstd").encode(torch.zeros(LAYOUT.shape(16), dtype=LAYOUT.dtype))
    header, body = parse_frame(frame)
    pad = BLOCK - (len(bytes(frame)) - len(body)) - len(body) - 8
    skippable = struct.pack("<II", 0x184D2A50, pad) + bytes(pad)  # a zstd skippable frame: decoders ignore it
    crafted = bytes(pack_frame(header.codec_id, header.dtype, header.shape, header.params, [bytes(body) + skippable]))
    assert len(crafted) == BLOCK
    return torch.frombuffer(bytearray(crafted), dtype=LAYOUT.dtype).view(LAYOUT.shape(16)).clone()


@pytest.mark.parametrize("reader_codec", ["raw", "zstd"])
def test_raw_kv_that_forms_a_valid_frame_comes_back_as_stored(tmp_path, reader_codec):
    tokens, kv = make_tokens(16), crafted_frame_block()
    assert torch.count_nonzero(bits(kv)) > 0
    for medium in ("files", "disk"):
        folder = str(tmp_path / medium)
        settings = ({"files_dir": folder, "files_bytes": 8 * BLOCK} if medium == "files"
                    else {"disk_dir": folder, "disk_bytes": 8 * BLOCK})
        codec_key = "files_codec" if medium == "files" else "disk_codec"
        with KVStore(LAYOUT, StoreConfig(model_id="m", host_bytes=0, **settings)) as store:
            store.put(tokens, kv)
        with KVStore(LAYOUT, StoreConfig(model_id="m", host_bytes=0, **settings,
                                         **{codec_key: reader_codec})) as store:
            got = store.get(tokens)
            assert got.shape[2] == 16 and torch.equal(bits(got), bits(kv))


# -- a caller's bad argument blames no tier ---------------------------------------------------------


def _sparse(kv: torch.Tensor) -> torch.Tensor:
    return kv.to_sparse()


BAD_CALLS = {
    "put kv on meta": lambda s, t, kv: s.put(t, torch.empty(kv.shape, dtype=kv.dtype, device="meta")),
    "put sparse kv": lambda s, t, kv: s.put(t, _sparse(kv)),
    "put_keyed meta block": lambda s, t, kv: s.put_keyed([("a", torch.empty(LAYOUT.shape(16), dtype=kv.dtype,
                                                                           device="meta"))]),
    "get_into out requires grad": lambda s, t, kv: s.get_into(t, torch.zeros(kv.shape, dtype=torch.float32,
                                                                             requires_grad=True).to(kv.dtype)),
    "get_into out leaf requires grad": lambda s, t, kv: s.get_into(
        t, torch.zeros(kv.shape, dtype=kv.dtype).requires_grad_()),
    "get_into meta out": lambda s, t, kv: s.get_into(t, torch.empty(kv.shape, dtype=kv.dtype, device="meta")),
    "get_keyed out requires grad": lambda s, t, kv: s.get_keyed(
        ["a"], [torch.zeros(LAYOUT.shape(16), dtype=kv.dtype).requires_grad_()]),
    "tokens on meta": lambda s, t, kv: s.put(torch.tensor(t).to("meta"), kv),
    "lookup tokens on meta": lambda s, t, kv: s.lookup(torch.tensor(t).to("meta")),
    "unknown device": lambda s, t, kv: s.get(t, device="gpu7"),
    "meta device": lambda s, t, kv: s.get(t, device="meta"),
    "load unknown device": lambda s, t, kv: s.load(t, device="nonsense:0"),
    "salt not utf-8": lambda s, t, kv: s.put(t, kv, salt="\ud800"),
    "lookup salt not utf-8": lambda s, t, kv: s.lookup(t, salt="tenant-\udcff"),
    "engine key not utf-8": lambda s, t, kv: s.lookup_keyed(["page-\ud800"]),
}


@pytest.mark.parametrize("call", list(BAD_CALLS), ids=list(BAD_CALLS))
def test_a_bad_argument_is_a_value_error_and_no_tier_is_blamed(tmp_path, call):
    config = StoreConfig(model_id="m", host_bytes=4 * BLOCK, disk_dir=str(tmp_path / "disk"), disk_bytes=16 * BLOCK,
                         files_dir=str(tmp_path / "files"), files_bytes=16 * BLOCK)
    tokens, kv = make_tokens(32), make_kv(LAYOUT, 32)
    other, other_kv = make_tokens(32, seed=9), make_kv(LAYOUT, 32, seed=9)
    with KVStore(LAYOUT, config) as store:
        store.put(tokens, kv)
        store.flush()
        with pytest.raises(ValueError):
            BAD_CALLS[call](store, other, other_kv)
        store.flush()
        for name, tier in store.stats()["tiers"].items():
            assert tier["state"] == "healthy" and tier["errors"] == 0 and tier["bypassed"] == 0, name
        assert torch.equal(bits(store.get(tokens)), bits(kv))  # what was stored is still served
        assert store.put(other, other_kv) == 2  # and the next put stores
        assert torch.equal(bits(store.get(other)), bits(other_kv))


def test_a_tier_that_raises_is_logged_once_per_interval_and_shows_its_last_error(tmp_path, caplog):
    from faulty import FaultyTier
    from kvstore.tiers.files import FilesTier
    from kvstore.tiers.host import HostTier

    files = FaultyTier(FilesTier(tmp_path / "files", 16 * BLOCK, LAYOUT))
    files.fail = True
    with caplog.at_level("WARNING", logger="kvstore.levels"):
        with KVStore(LAYOUT, StoreConfig(model_id="m", degraded_seconds=0.0),
                     tiers=[HostTier(LAYOUT, 2 * BLOCK), files]) as store:
            for seed in range(5):
                store.put(make_tokens(16, seed=seed), make_kv(LAYOUT, 16, seed=seed))
                store.flush()
            entry = store.stats()["tiers"]["files"]
    assert entry["errors"] >= 2
    assert "injected I/O error" in entry["last_error"]
    records = [r for r in caplog.records if r.name == "kvstore.levels"]
    assert len(records) == 1 and "tier files" in records[0].getMessage()


def test_kv_that_requires_grad_is_stored_as_plain_bytes_and_blames_no_tier(tmp_path):
    config = StoreConfig(model_id="m", host_bytes=8 * BLOCK, disk_dir=str(tmp_path / "disk"), disk_bytes=16 * BLOCK,
                         files_dir=str(tmp_path / "files"), files_bytes=16 * BLOCK)
    tokens = make_tokens(40)
    kv = make_kv(LAYOUT, 40).float().requires_grad_().to(LAYOUT.dtype)  # a non-leaf with a graph behind it
    with KVStore(LAYOUT, config) as store:
        assert store.put(tokens, kv) == 3
        saver = store.save(make_tokens(16, seed=3), layer_wise=True)
        for layer in range(LAYOUT.num_layers):
            saver.save_layer(layer, make_kv(LAYOUT, 16, seed=3)[layer].requires_grad_())
        store.flush()
        got = store.get(tokens)
        assert not got.requires_grad and torch.equal(bits(got), bits(kv.detach()))
        assert torch.equal(bits(store.get(make_tokens(16, seed=3))), bits(make_kv(LAYOUT, 16, seed=3)))
        for name, tier in store.stats()["tiers"].items():
            assert tier["errors"] == 0 and tier["state"] == "healthy", name


def test_a_layer_on_the_meta_device_is_a_value_error_and_the_layer_can_be_saved_again(tmp_path):
    with KVStore(LAYOUT, StoreConfig(model_id="m", host_bytes=4 * BLOCK)) as store:
        saver = store.save(make_tokens(16), layer_wise=True)
        kv = make_kv(LAYOUT, 16)
        with pytest.raises(ValueError, match="meta"):
            saver.save_layer(0, torch.empty(kv[0].shape, dtype=kv.dtype, device="meta"))
        for layer in range(LAYOUT.num_layers):
            saver.save_layer(layer, kv[layer])
        assert saver.stored == 1 and torch.equal(bits(store.get(make_tokens(16))), bits(kv))
