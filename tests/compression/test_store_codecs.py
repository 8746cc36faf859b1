"""Codecs in the tiers and the store: encoded on the way down, decoded on the way up, capacity in encoded bytes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import TESTS_DIR, assert_same_kv, make_kv, make_tokens, tiny_layout
from kvstore.blockformat import HEADER_BYTES
from kvstore.compression import KiviCodec, get_codec
from kvstore.compression.registry import CODECS
from kvstore.compression.stored import INTACT, LOSSY_MAX_ABS, BlockEncoding
from kvstore.config import StoreConfig
from kvstore.store import KVStore
from kvstore.tiers.files import FilesTier
from kvstore.tiers.lmdb import LmdbTier

sys.path.insert(0, str(TESTS_DIR / "tiers"))
from tierkit import A, B, C, D, make_blocks, read  # noqa: E402

LAYOUT = tiny_layout()  # [2, 2, 16, 2, 16] fp16: 4096-byte blocks
RAW_BLOCK = LAYOUT.block_bytes + HEADER_BYTES
KEYS = [bytes([i]) * 32 for i in range(1, 21)]  # twenty more keys
TIERS = ["lmdb", "files"]


def open_tier(kind: str, path: Path, capacity: int, codec: str | None, layout=LAYOUT):
    codec_obj = get_codec(codec) if codec else None
    if kind == "lmdb":
        return LmdbTier(path, capacity, layout, sync=False, codec=codec_obj)
    return FilesTier(path, capacity, layout, sync=False, codec=codec_obj)


@pytest.fixture
def tiers(tmp_path):
    """``tiers(kind, codec, capacity=1 MiB, path=None)``: a tier closed at teardown."""
    opened = []

    def factory(kind: str, codec: str | None, capacity: int = 1 << 20, path: Path | None = None, layout=LAYOUT):
        tier = open_tier(kind, path or tmp_path / kind, capacity, codec, layout)
        opened.append(tier)
        return tier

    yield factory
    for tier in opened:
        tier.close()


def rel_err(y: torch.Tensor, x: torch.Tensor) -> float:
    return float((y.float() - x.float()).norm() / x.float().norm())


def block_files(path: Path) -> list[Path]:
    return sorted(path.rglob("*.kvb"))


# -- put / get through a tier with a codec ---------------------------------------------------


@pytest.mark.parametrize("spec", ["kivi4", "rq3", "zstd", "int8", "ec4"])
@pytest.mark.parametrize("kind", TIERS)
def test_put_then_get_decodes(tiers, kind, spec):
    tier = tiers(kind, spec)
    codec = get_codec(spec)
    blocks = make_blocks(LAYOUT)
    assert tier.put_many(list(blocks.items())) == 5
    for key, block in blocks.items():
        got = read(tier, LAYOUT, key)
        assert got is not None and got.shape == block.shape and got.dtype == block.dtype
        if codec.lossless:
            assert_same_kv(got, block)
        else:
            assert rel_err(got, block) < 0.25
            assert_same_kv(got, codec.decode(codec.encode(block)))  # what the codec gives, no more loss
    # a partial block (a prompt's tail) too
    tail = make_kv(LAYOUT, 5, seed=9)
    assert tier.put_many([(KEYS[0], tail)]) == 1
    got = read(tier, LAYOUT, KEYS[0], tokens=5)
    assert got is not None
    assert_same_kv(got, codec.decode(codec.encode(tail)))
    assert read(tier, LAYOUT, KEYS[0], tokens=16) is None  # asked as a full block: another size, a miss


@pytest.mark.parametrize("kind", TIERS)
def test_get_into_a_strided_view(tiers, kind):
    tier = tiers(kind, "kivi4")
    block = make_kv(LAYOUT, 16, seed=3)
    tier.put_many([(A, block)])
    big = torch.zeros(LAYOUT.shape(40), dtype=LAYOUT.dtype)
    assert tier.get_into(A, big[:, :, 16:32])
    codec = get_codec("kivi4")
    assert_same_kv(big[:, :, 16:32], codec.decode(codec.encode(block)))
    assert bool((big[:, :, :16] == 0).all()) and bool((big[:, :, 32:] == 0).all())


@pytest.mark.parametrize("spec", ["kivi4", "rq3", "zstd", "ec4"])
@pytest.mark.parametrize("kind", TIERS)
def test_capacity_and_stats_count_encoded_bytes(tiers, kind, spec):
    tier = tiers(kind, spec)
    blocks = make_blocks(LAYOUT)
    tier.put_many(list(blocks.items()))
    frames = {key: len(get_codec(spec).encode(block)) for key, block in blocks.items()}
    assert tier.used_bytes() == sum(frames.values()) + 5 * HEADER_BYTES
    stats = tier.stats()
    assert stats["blocks"] == 5 and stats["used_bytes"] == tier.used_bytes()
    assert stats["bytes_written"] == sum(frames.values())
    assert stats["logical_bytes_written"] == 5 * LAYOUT.block_bytes
    assert stats["bytes_written"] < stats["logical_bytes_written"]
    read(tier, LAYOUT, A)
    assert tier.stats()["bytes_read"] == frames[A]


@pytest.mark.parametrize("kind", TIERS)
def test_raw_tier_counts_block_bytes(tiers, kind):
    tier = tiers(kind, None)
    tier.put_many(list(make_blocks(LAYOUT).items()))
    stats = tier.stats()
    assert tier.used_bytes() == 5 * RAW_BLOCK
    assert stats["bytes_written"] == stats["logical_bytes_written"] == 5 * LAYOUT.block_bytes


@pytest.mark.parametrize("spec", ["kivi4", "rq3", "kivi2", "ec4", None])
@pytest.mark.parametrize("kind", TIERS)
def test_a_codec_fits_more_blocks_before_evicting(tiers, kind, spec):
    """Capacity of 4 raw blocks: the codec's tier holds as many encoded frames (+ headers) as fit, LRU
    evicted; ec's frames differ in size block by block (entropy-coded), so the sizes are each block's own."""
    capacity = 4 * RAW_BLOCK
    tier = tiers(kind, spec, capacity=capacity)
    blocks = [make_kv(LAYOUT, 16, seed=i) for i in range(len(KEYS))]
    sizes = [(key, (len(get_codec(spec).encode(block)) if spec else LAYOUT.block_bytes) + HEADER_BYTES)
             for key, block in zip(KEYS, blocks)]
    if spec in ("kivi4", "kivi2", None):  # kivi4: 1636-byte frames (2.5x), kivi2: 1124 (3.6x)
        assert capacity // sizes[0][1] == {"kivi4": 9, "kivi2": 13, None: 4}[spec]
    evicted = lru_evictions(sizes, capacity)
    held = [key for key, _ in sizes if key not in evicted]
    assert 4 < len(held) < len(KEYS) if spec else len(held) == 4
    for key, block in zip(KEYS, blocks):
        assert tier.put_many([(key, block)]) == 1
    stats = tier.stats()
    assert stats["blocks"] == len(held)
    assert stats["evictions"] == len(evicted)
    assert tier.used_bytes() == sum(size for key, size in sizes if key in held) <= capacity
    assert held == KEYS[len(KEYS) - len(held):]  # the oldest went first
    assert list(tier.keys()) == (held if kind == "lmdb" else [tier.encoding.stored_name(key) for key in held])
    assert read(tier, LAYOUT, KEYS[-1]) is not None
    assert read(tier, LAYOUT, KEYS[0]) is None


@pytest.mark.parametrize("kind", TIERS)
def test_a_frame_larger_than_the_capacity_is_rejected(tiers, kind):
    # zstd of incompressible fp32 data is larger than the raw block: a one-block tier refuses it
    lay = tiny_layout(dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randint(-2**31, 2**31 - 1, lay.block_shape, generator=gen, dtype=torch.int64)
    block = noise.to(torch.int32).view(torch.float32)
    frame = len(get_codec("zstd").encode(block))
    assert frame > lay.block_bytes
    tier = tiers(kind, "zstd", capacity=lay.block_bytes + HEADER_BYTES, layout=lay)
    assert tier.put_many([(A, block)]) == 0
    assert tier.stats()["rejected"] == 1 and tier.used_bytes() == 0


# -- directories shared between configs ----------------------------------------------------------


def test_each_lossy_form_in_a_shared_directory_is_its_own(tiers, tmp_path):
    """Stores of other codecs sharing a files directory: a lossy form's files have names of their own, so an
    exact tier or another lossy codec never counts them as held (they did, and deleted them on reading: two
    live stores of other codecs deleted each other's blocks and neither hit). Exact forms are shared."""
    path = tmp_path / "shared"
    blocks = make_blocks(LAYOUT)
    kivi = tiers("files", "kivi4", path=path)
    kivi.put_many([(A, blocks[A]), (B, blocks[B])])
    tiers("files", "zstd", path=path).put_many([(C, blocks[C])])
    tiers("files", None, path=path).put_many([(D, blocks[D])])
    assert len(block_files(path)) == 4

    again = tiers("files", "kivi4", path=path)  # the codec that wrote them serves them
    codec = get_codec("kivi4")
    assert_same_kv(read(again, LAYOUT, A), codec.decode(codec.encode(blocks[A])))
    assert not again.contains(D)  # an exact store's blocks are under their keys, not this form's names

    rq = tiers("files", "rq3", path=path)  # another lossy codec never meets them
    assert not rq.contains(A) and read(rq, LAYOUT, A) is None

    raw = tiers("files", None, path=path)
    assert not raw.contains(B) and read(raw, LAYOUT, B) is None  # lossy: not even seen here
    assert_same_kv(read(raw, LAYOUT, C), blocks[C])  # lossless: served exactly
    assert_same_kv(read(raw, LAYOUT, D), blocks[D])
    stats = raw.stats()
    assert stats["misses"] == 1 and stats["stale"] == 0 and stats["corrupt"] == 0
    assert raw.put_many([(B, blocks[B])]) == 1  # stored exact beside the lossy copy, which stays
    assert_same_kv(read(raw, LAYOUT, B), blocks[B])
    assert len(block_files(path)) == 5 and again.contains(B)


def test_lmdb_written_lossy_is_stale_for_a_raw_tier(tmp_path):
    path = tmp_path / "lmdb"
    blocks = make_blocks(LAYOUT)
    tier = open_tier("lmdb", path, 1 << 20, "kivi4")
    tier.put_many([(A, blocks[A])])
    tier.close()
    tier = open_tier("lmdb", path, 1 << 20, "zstd")
    tier.put_many([(B, blocks[B])])
    tier.close()
    tier = open_tier("lmdb", path, 1 << 20, "kivi4")
    try:
        codec = get_codec("kivi4")
        assert_same_kv(read(tier, LAYOUT, A), codec.decode(codec.encode(blocks[A])))
        assert_same_kv(read(tier, LAYOUT, B), blocks[B])
        # used bytes after reopening are the encoded sizes, as stored
        assert tier.used_bytes() == (len(codec.encode(blocks[A])) + len(get_codec("zstd").encode(blocks[B]))
                                     + 2 * HEADER_BYTES)
    finally:
        tier.close()
    tier = open_tier("lmdb", path, 1 << 20, None)
    try:
        assert read(tier, LAYOUT, A) is None
        assert_same_kv(read(tier, LAYOUT, B), blocks[B])
        stats = tier.stats()
        assert stats["corrupt"] == 0 and stats["stale"] == 1 and stats["blocks"] == 1 and not tier.contains(A)
        assert tier.put_many([(A, blocks[A])]) == 1
        assert_same_kv(read(tier, LAYOUT, A), blocks[A])
    finally:
        tier.close()


@pytest.mark.parametrize("kind", ["lmdb"])  # a shared files directory: ``test_each_lossy_form_...``
def test_raw_dir_opened_by_a_codec_tier_reads_exactly(tiers, tmp_path, kind):
    path = tmp_path / "raw-first"
    blocks = make_blocks(LAYOUT)
    first = open_tier(kind, path, 1 << 20, None)
    first.put_many(list(blocks.items()))
    first.close()
    tier = tiers(kind, "kivi4", path=path)
    for key, block in blocks.items():
        assert_same_kv(read(tier, LAYOUT, key), block)


def lru_evictions(sizes: list[tuple[bytes, int]], capacity: int) -> list[bytes]:
    """The keys an exact LRU of ``capacity`` bytes evicts when ``sizes`` are put one after another."""
    held: list[tuple[bytes, int]] = []
    evicted = []
    for key, size in sizes:
        while held and sum(s for _, s in held) + size > capacity:
            evicted.append(held.pop(0)[0])
        held.append((key, size))
    return evicted


@pytest.mark.parametrize("spec", ["kivi4", "rq3", "zstd", "ec5:rope=10000"])
def test_lmdb_evictions_pass_decoded_blocks_down(tiers, spec):
    codec = get_codec(spec)
    capacity = 4 * RAW_BLOCK
    tier = tiers("lmdb", spec, capacity=capacity)
    seen = []
    tier.on_evict = lambda key, block, lossy: seen.append((key, block.clone()))
    originals = {key: make_kv(LAYOUT, 16, seed=i) for i, key in enumerate(KEYS)}
    originals[KEYS[0]] = make_kv(LAYOUT, 5, seed=99)  # a partial block is passed down with its own length
    for key, block in originals.items():
        tier.put_many([(key, block)])
    sizes = [(key, len(codec.encode(block)) + HEADER_BYTES) for key, block in originals.items()]
    expected = lru_evictions(sizes, capacity)
    assert len(expected) >= 2
    assert [key for key, _ in seen] == expected
    assert tier.stats()["evictions"] == len(expected)
    for key, block in seen:
        original = originals[key]
        assert block.shape == original.shape and block.dtype == original.dtype and block.device.type == "cpu"
        assert_same_kv(block, codec.decode(codec.encode(original)))


# -- dtypes the frame does not have --------------------------------------------------------------


FP8 = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]


def test_every_layout_dtype_has_a_frame_dtype():
    """A layout dtype a frame cannot name opened fine and then failed every put of a zstd tier (ROCm's fp8)."""
    from kvstore.compression.frame import DTYPE_IDS
    from kvstore.layout import DTYPE_NAMES
    assert set(DTYPE_NAMES) <= set(DTYPE_IDS)
    assert len(set(DTYPE_IDS.values())) == len(DTYPE_IDS)


@pytest.mark.parametrize("dtype", FP8, ids=str)
@pytest.mark.parametrize("kind", TIERS)
def test_zstd_tier_stores_fp8_blocks(tiers, kind, dtype):
    lay = tiny_layout(dtype=dtype)
    block = make_kv(lay, 16)
    tier = tiers(kind, "zstd", layout=lay)
    assert tier.put_many([(A, block)]) == 1
    got = torch.zeros(lay.block_shape, dtype=lay.dtype)
    assert tier.get_into(A, got)
    assert torch.equal(got.view(torch.uint8), block.view(torch.uint8))


@pytest.mark.parametrize("kind", TIERS)
def test_zstd_tier_stores_int8_blocks(tiers, kind):
    lay = tiny_layout(dtype=torch.int8)
    block = torch.randint(-128, 128, lay.block_shape, generator=torch.Generator().manual_seed(0)).to(torch.int8)
    tier = tiers(kind, "zstd", layout=lay)
    assert tier.put_many([(A, block)]) == 1
    got = torch.zeros(lay.block_shape, dtype=lay.dtype)
    assert tier.get_into(A, got) and torch.equal(got, block)


# -- through the store -------------------------------------------------------------------------


def prompt(n: int = 40, seed: int = 0):
    return make_tokens(n, seed=seed), make_kv(LAYOUT, n, seed=seed)


@pytest.mark.parametrize("mode", ["disk", "both"])
def test_store_with_a_lossy_disk_codec_survives_restart_close_to_the_original(make_store, mode):
    tokens, kv = prompt(40)  # two full blocks and an 8-token tail
    first = make_store(mode, disk_codec="kivi4")
    assert first.put(tokens, kv) == 3
    if mode == "both":
        assert_same_kv(first.get(tokens), kv)  # host RAM holds the exact KV
    first.close()
    assert first.disk is not None
    second = make_store(mode, disk_codec="kivi4")
    assert second.lookup(tokens) == 40
    got = second.get(tokens)
    assert got.shape == kv.shape and got.dtype == kv.dtype
    assert not torch.equal(got, kv)
    assert rel_err(got, kv) < 0.15
    codec = get_codec("kivi4")
    for start, end in ((0, 16), (16, 32), (32, 40)):  # each block is the codec's image of it
        assert_same_kv(got[:, :, start:end], codec.decode(codec.encode(kv[:, :, start:end].contiguous())))
    assert_same_kv(second.get(tokens), got)  # read again (from host if promoted): the same values
    stats = second.stats()["tiers"]["lmdb"]
    assert stats["blocks"] == 3
    assert stats["bytes_written"] == 0 and stats["bytes_read"] > 0
    assert second.disk.used_bytes() == sum(
        len(codec.encode(kv[:, :, s:e].contiguous())) + HEADER_BYTES for s, e in ((0, 16), (16, 32), (32, 40)))


@pytest.mark.parametrize("mode", ["disk", "both"])
def test_store_with_zstd_disk_codec_is_exact_after_restart(make_store, mode):
    tokens, kv = prompt(40, seed=1)
    first = make_store(mode, disk_codec="zstd")
    first.put(tokens, kv)
    first.close()
    second = make_store(mode, disk_codec="zstd")
    assert_same_kv(second.get(tokens), kv)
    stats = second.stats()["tiers"]["lmdb"]
    assert stats["used_bytes"] < 2 * LAYOUT.block_bytes + 8 * LAYOUT.token_bytes + 3 * HEADER_BYTES


def test_store_files_codec(make_store, tmp_path):
    tokens, kv = prompt(40, seed=2)
    files = tmp_path / "files"
    first = make_store("host", files_dir=str(files), files_codec="rq3", files_sync=False)
    first.put(tokens, kv)
    first.close()
    second = make_store("host", files_dir=str(files), files_codec="rq3", files_sync=False)
    assert second.files.encoding.codec == get_codec("rq3")
    got = second.get(tokens)
    assert got.shape == kv.shape and rel_err(got, kv) < 0.25
    third = make_store("host", files_dir=str(files), files_sync=False)  # raw: the rq3 blocks are not served
    assert third.lookup(tokens) == 0 and third.get(tokens).shape[2] == 0
    assert len(block_files(files)) == 3  # nor deleted: they are rq3's, under its names


@pytest.mark.parametrize("tier", ["disk", "files"])
def test_store_switching_off_a_lossy_codec_serves_the_prompt_again_after_a_put(make_store, tier, tmp_path):
    """LMDB reads every header at open: blocks in another codec's lossy form are not held there. The files
    tier stores a lossy form under names of its own: a store without that codec never sees them (it saw them,
    learnt they were stale one read at a time, and re-stored the prompt one block a request)."""
    tokens, kv = prompt(40, seed=3)
    where = {"disk": {}, "files": dict(files_dir=str(tmp_path / "files"), files_sync=False)}[tier]
    first = make_store("host" if tier == "files" else tier, **where, **{f"{tier}_codec": "kivi4"})
    first.put(tokens, kv)
    first.close()
    second = make_store("host" if tier == "files" else tier, **where)  # raw
    assert second.get(tokens).shape[2] == 0  # the lossy blocks are not served to a raw store
    second.put(tokens, kv)
    assert second.lookup(tokens) == 40
    assert_same_kv(second.get(tokens), kv)


@pytest.mark.parametrize("before, after", [("kivi4", "kivi2"), ("rq4", "rq3"), ("ec4", "ec5"),
                                           ("int8", "int8:zstd=3"), ("kivi4", "raw")])
def test_lmdb_reopened_with_another_lossy_form_stores_the_prompt_again_in_one_put(make_store, before, after):
    """kivi4 and kivi2 (rq4 and rq3, ...) share a codec id: blocks of the old parameters were counted as held,
    so lookup promised 40 tokens, get returned none, and a put skipped them: one block came back a request."""
    tokens, kv = prompt(40, seed=5)
    first = make_store("disk", disk_codec=before)
    first.put(tokens, kv)
    first.close()
    second = make_store("disk", disk_codec=after)
    assert second.lookup(tokens) == 0  # nothing it would serve is promised
    assert second.put(tokens, kv) == 3
    assert second.lookup(tokens) == 40 and second.get(tokens).shape[2] == 40
    second.close()
    third = make_store("disk", disk_codec=after)  # its own form survives a restart
    assert third.lookup(tokens) == 40 and third.get(tokens).shape[2] == 40


# -- config ------------------------------------------------------------------------------


def test_config_codec_defaults():
    config = StoreConfig()
    assert (config.host_codec, config.disk_codec, config.files_codec) == ("raw", "raw", "raw")


@pytest.mark.parametrize("field", ["disk_codec", "files_codec"])
@pytest.mark.parametrize("spec", ["nope", "kivi3", "", "kivi4:bits=9", "kivi4:foo=1", "zstd:level"])
def test_config_bad_codec_is_a_value_error(field, spec):
    with pytest.raises(ValueError) as info:
        StoreConfig(**{field: spec})
    if spec in ("nope", "kivi3", ""):
        assert "kivi4" in str(info.value) and "zstd" in str(info.value)  # names the codecs there are


@pytest.mark.parametrize("spec", ["kivi4", "zstd", "rq3", "int8", "nope"])
def test_config_host_codec_is_raw_only(spec):
    with pytest.raises(ValueError, match="host_codec|codec"):
        StoreConfig(host_codec=spec)
    assert StoreConfig(host_codec="raw").host_codec == "raw"


def test_config_codecs_from_the_environment(tmp_path):
    environ = {"KVSTORE_DISK_CODEC": "kivi2:group=64", "KVSTORE_FILES_CODEC": "zstd:level=3",
               "KVSTORE_DISK_DIR": str(tmp_path / "disk"), "KVSTORE_FILES_DIR": str(tmp_path / "files"),
               "KVSTORE_HOST_BYTES": "0", "KVSTORE_DISK_BYTES": "4MiB", "KVSTORE_FILES_BYTES": "4MiB",
               "KVSTORE_DISK_SYNC": "false", "KVSTORE_FILES_SYNC": "false"}
    config = StoreConfig.load(environ=environ)
    assert config.disk_codec == "kivi2:group=64" and config.files_codec == "zstd:level=3"
    with KVStore(LAYOUT, config) as store:
        assert store.disk.encoding.codec == KiviCodec(bits=2, group=64)
        assert store.files.encoding.codec == get_codec("zstd:level=3")
        tokens, kv = prompt(16, seed=4)
        store.put(tokens, kv)
        store.flush()
        got = store.get(tokens)
        assert got.shape == kv.shape and rel_err(got, kv) < 0.6
    with pytest.raises(ValueError, match="kivi4"):
        StoreConfig.load(environ={"KVSTORE_DISK_CODEC": "nope"})
    with pytest.raises(ValueError, match="host_codec"):
        StoreConfig.load(environ={"KVSTORE_HOST_CODEC": "kivi4"})


def test_config_from_file_with_codecs(tmp_path):
    path = tmp_path / "kv.toml"
    path.write_text('[kvstore]\ndisk_codec = "rq3:zstd=3"\nfiles_codec = "zstd"\n')
    config = StoreConfig.from_file(path)
    assert config.disk_codec == "rq3:zstd=3" and config.files_codec == "zstd"
    assert config.replace(disk_codec="kivi4").disk_codec == "kivi4"
    with pytest.raises(ValueError):
        config.replace(disk_codec="nope")


@pytest.mark.parametrize("setting, size", [("disk_codec", "disk"), ("files_codec", "files")])
def test_a_codec_the_layout_cannot_take_names_its_setting(tmp_path, setting, size):
    from kvstore import KVLayout

    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=1, dtype=torch.float16, block_tokens=4)
    dirs = {"disk": dict(disk_dir=str(tmp_path / "d"), disk_bytes="1MiB"),
            "files": dict(files_dir=str(tmp_path / "f"), files_bytes="1MiB")}[size]
    with pytest.raises(ValueError, match=f"^{setting}: codec rq4: cannot store this layout's blocks"):
        KVStore(layout, StoreConfig(model_id="m", host_bytes="64KiB", **dirs, **{setting: "rq4"}))


def test_a_codec_a_later_tier_cannot_take_is_refused_before_any_tier_is_made(tmp_path):
    """The redis codec was checked when its tier was built, after LMDB and the files tier had made their
    directories and files: a bad argument is refused before any tier is touched."""
    from kvstore import KVLayout

    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float8_e4m3fn, block_tokens=4)
    config = StoreConfig(model_id="m", host_bytes="1MiB", disk_dir=str(tmp_path / "d"), disk_bytes="1MiB",
                         files_dir=str(tmp_path / "f"), files_bytes="1MiB", redis_url="redis://127.0.0.1:9",
                         redis_codec="kivi4")
    with pytest.raises(ValueError, match="^redis_codec: codec kivi4: cannot store this layout's blocks"):
        KVStore(layout, config)
    assert not (tmp_path / "d").exists() and not (tmp_path / "f").exists()


@pytest.mark.parametrize("host_policy", ["write_through", "write_back"])
@pytest.mark.parametrize("device", [False, True])
def test_a_put_of_the_exact_bytes_replaces_approximate_copies_in_every_memory_tier_and_reaches_disk(tmp_path, device,
                                                                                                   host_policy):
    """Approximate copies read from a kivi4 files tier sit in host RAM (and HBM). The engine then puts the exact
    bytes: they must replace every approximate copy and be written to the exact LMDB tier. With a device
    tier, only the device copy was replaced; the host kept its approximate one, the LMDB copy was refused as
    lossy, and gets served approximate bytes again once the device tier had moved on. A write-back host
    kept its approximate copy even then: only write-through levels were refreshed, and the device's exact
    block, evicted, was not written back over it."""
    layout = tiny_layout()
    tokens, kv = make_tokens(32, seed=3), make_kv(layout, 32, seed=3)
    files = dict(files_dir=str(tmp_path / "files"), files_bytes="1MiB", files_codec="kivi4")
    with KVStore(layout, StoreConfig(model_id="m", host_bytes=0, **files)) as writer:
        writer.put(tokens, kv)
    config = StoreConfig(model_id="m", host_bytes=64 * layout.block_bytes, disk_dir=str(tmp_path / "lmdb"),
                         disk_bytes="1MiB", disk_sync=False, host_write_policy=host_policy, **files,
                         **(dict(device="cpu", device_bytes=2 * layout.block_bytes) if device else {}))
    with KVStore(layout, config) as store:
        assert not torch.equal(store.get(tokens), kv)  # approximate, from the files tier
        store.put(tokens, kv)
        assert store.flush(30)
        other = make_tokens(32, seed=4)
        store.put(other, make_kv(layout, 32, seed=4))
        store.get(other)  # the device tier (two blocks) now holds other blocks
        assert_same_kv(store.get(tokens), kv)
    with KVStore(layout, config.replace(files_codec="raw", device_bytes=0)) as reopened:
        assert_same_kv(reopened.get(tokens), kv)  # the exact bytes reached the disk


# -- non-finite KV under a lossy codec ----------------------------------------------------------


@pytest.mark.parametrize("spec", ["int8", "kivi4", "rq4", "ec4"])
@pytest.mark.parametrize("kind", TIERS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_a_lossy_tier_keeps_a_non_finite_block_exact(tiers, kind, spec, bad):
    """Quantising a block with one NaN or infinity spread it over its group or channel: kivi4 turned 31
    finite values into NaN, rq4 a whole head. Such a block is stored as an exact frame instead."""
    tier = tiers(kind, spec)
    poisoned, clean = make_kv(LAYOUT, 16, seed=3), make_kv(LAYOUT, 16, seed=4)
    poisoned[0, 0, 5, 1, 7] = bad
    assert tier.put_many([(A, poisoned), (B, clean)]) == 2
    got = read(tier, LAYOUT, A)
    assert got is not None and torch.equal(got.view(torch.uint8), poisoned.view(torch.uint8))
    lossy = read(tier, LAYOUT, B)  # a finite block is still encoded by the tier's codec
    assert lossy is not None and torch.isfinite(lossy).all() and not torch.equal(lossy, clean)
    assert rel_err(lossy, clean) < 0.3


LOSSY_SPECS = sorted(name for name in CODECS if not get_codec(name).lossless)
# Steps a user may set at their extremes: the step stored in fp16 rounded up to inf, decoded as NaN (0 x inf).
EXTREME_SPECS = ["ec4:value_step=100000", "ec4:key_step=100000", "ec5:value_step=6000,key_step=6000"]


@pytest.mark.parametrize("spec", LOSSY_SPECS + EXTREME_SPECS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_a_lossy_codec_never_turns_finite_kv_into_nan(spec, dtype):
    """Finite values near a dtype's limits overflowed the codecs' arithmetic (rq's centring in fp16 at
    |x| = 60,000; ec's squares at 1e19; rq's norms at 1e38) and decoded into NaN. Blocks up to
    ``LOSSY_MAX_ABS`` are approximated finite; larger ones are stored exact."""
    layout = tiny_layout(dtype=dtype)
    encoding = BlockEncoding(layout, get_codec(spec))
    limit = LOSSY_MAX_ABS[dtype]
    unit = make_kv(layout, layout.block_tokens, seed=5).float().clamp(-1, 1)
    for scale in (limit / 1e6, 1000.0, 15000.0, limit, 60000.0, 1e19, 1e38, float(torch.finfo(dtype).max)):
        block = (unit * scale).to(dtype)
        if not torch.isfinite(block).all():
            continue  # the scale is past this dtype: not a finite block
        out = torch.empty_like(block)
        payload = encoding.encode(block)
        assert encoding.decode_into(payload, out, encoding.header_encoding(payload)) == INTACT
        assert torch.isfinite(out).all(), f"{spec} {dtype} at |x| <= {scale:g}"
        if block.abs().max() > limit:
            assert torch.equal(out.view(torch.uint8), block.view(torch.uint8))  # stored exact


@pytest.mark.parametrize("how", ["put", "put_from", "layer-wise save"])
def test_kv_computed_after_an_approximate_head_never_reaches_an_exact_tier(tmp_path, how):
    """An engine served a prompt's head from a lossy disk computes the rest on it: that KV is approximate
    whatever its keys. Saved as exact, it went to a shared raw directory, and a store configured exact-only
    was served it (SmolLM2: last logit 0.15 off). It is held marked in host RAM and in the lossy tier, whose
    readers take approximations; the head it was given back stays approximate; the exact tier never gets
    it."""
    layout = tiny_layout()
    bt = layout.block_tokens
    tokens, kv = make_tokens(4 * bt, seed=7), make_kv(layout, 4 * bt, seed=7)
    files = dict(files_dir=str(tmp_path / "files"), files_bytes="1MiB", files_sync=False)
    lossy = StoreConfig(model_id="m", host_bytes=64 * layout.block_bytes, disk_dir=str(tmp_path / "lmdb"),
                        disk_bytes="1MiB", disk_sync=False, disk_codec="kivi4", **files)
    with KVStore(layout, lossy) as store:
        store.put(tokens[:2 * bt], kv[:, :, :2 * bt])
        assert store.flush(30)
    with KVStore(layout, lossy) as store:  # reopened: host RAM empty
        served = store.get(tokens[:2 * bt])  # from the kivi4 disk (before the files tier), promoted marked
        assert served.shape[2] == 2 * bt and not torch.equal(served, kv[:, :, :2 * bt])
        computed = torch.cat([served, kv[:, :, 2 * bt:]], dim=2)  # the engine's KV of the whole prompt
        if how == "put":
            store.put(tokens, computed)
        elif how == "put_from":
            store.put_from(tokens, lambda block, dst: dst.copy_(computed[:, :, block.start:block.end]), start=2 * bt)
        else:
            saver = store.save(tokens, layer_wise=True, start=2 * bt)
            for layer in range(layout.num_layers):
                saver.save_layer(layer, computed[layer, :, 2 * bt:])
        assert store.flush(30)
        assert store.lookup(tokens) == 4 * bt  # this store holds it all, approximately
        assert store.stats()["tiers"]["lmdb"]["blocks"] == 4  # its kivi4 disk takes approximations
    with KVStore(layout, StoreConfig(model_id="m", host_bytes=0, **files)) as exact:
        assert exact.lookup(tokens) == 2 * bt  # the exact head, never the approximate tail
        assert_same_kv(exact.get(tokens[:2 * bt]), kv[:, :, :2 * bt])
