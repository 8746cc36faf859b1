"""LmdbTier: bounded LRU on a real LMDB environment, persistence, directory lock, corruption, races."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import threading

import pytest
import torch

from conftest import TESTS_DIR, assert_same_kv, make_kv, make_tokens, run_python, tiny_layout
from kvstore.blockformat import ENCODING_RAW, FORMAT_VERSION, HEADER_BYTES, MAGIC, BlockHeader
from kvstore.tiers.base import Tier
from kvstore.tiers.lmdb import DirectoryInUseError, LmdbTier

from tierkit import A, B, C, D, E, make_blocks, names as _names, read as _read
BLOCK = 4096 + HEADER_BYTES  # bytes one full tiny-layout fp16 block counts against the capacity


@pytest.fixture
def blocks(layout):
    return make_blocks(layout)


@pytest.fixture
def open_tier(disk_dir, layout):
    """``open_tier(capacity, path=disk_dir)``: an LmdbTier closed at teardown."""
    tiers = []

    def factory(capacity=3 * BLOCK, path=None, sync=False, lay=None):
        tier = LmdbTier(path or disk_dir, capacity, lay or layout, sync=sync)
        tiers.append(tier)
        return tier

    yield factory
    for tier in tiers:
        tier.close()


def test_strided_and_negated_blocks_are_stored_exactly_through_one_reused_gather_buffer(open_tier, layout):
    """Token ranges of a prompt (strided), a permuted block and a lazily negated one are gathered, one at a
    time, into one buffer the tier keeps (gathered up front, a 256 MiB prompt of 2 MiB blocks was 256 MiB of
    fresh memory faulted in at every put), and each comes back as the values it showed."""
    prompt = make_kv(layout, 3 * layout.block_tokens, seed=21)
    blocks = list(prompt.split(layout.block_tokens, dim=2))
    assert not blocks[1].is_contiguous()
    permuted = make_kv(layout, layout.block_tokens, seed=22).permute(1, 0, 2, 3, 4).contiguous().permute(1, 0, 2, 3, 4)
    negated = torch._neg_view(make_kv(layout, layout.block_tokens, seed=23))
    tier = open_tier(10 * BLOCK)
    names = [bytes([n]) * 32 for n in range(5)]
    assert tier.put_many(list(zip(names[:3], blocks))) == 3
    buffer = tier._gather
    assert tier.put_many([(names[3], permuted), (names[4], negated)]) == 2
    assert tier._gather is buffer  # reused, not made again
    for name, expected in zip(names, [*blocks, permuted, negated.resolve_neg()]):
        assert_same_kv(_read(tier, layout, name), expected)


def test_is_a_tier_and_exact_accounting(open_tier, layout, blocks):
    tier = open_tier(10 * BLOCK)
    assert isinstance(tier, Tier)
    assert HEADER_BYTES == 72
    assert tier.put_many([(A, blocks[A]), (B, blocks[B])]) == 2
    assert tier.put_many([(A, blocks[A]), (C, make_kv(layout, 3, seed=7))]) == 2  # A already there counts
    stats = tier.stats()
    assert stats["blocks"] == 3
    assert stats["used_bytes"] == tier.used_bytes() == 2 * BLOCK + 3 * 256 + 72
    assert stats["blocks_written"] == 3
    assert stats["bytes_written"] == 2 * 4096 + 3 * 256
    assert stats["capacity_bytes"] == 10 * BLOCK
    assert_same_kv(_read(tier, layout, C, 3), make_kv(layout, 3, seed=7))
    assert _read(tier, layout, D) is None
    stats = tier.stats()
    assert (stats["hits"], stats["misses"], stats["bytes_read"], stats["corrupt"]) == (1, 1, 3 * 256, 0)


def test_capacity_below_one_block(disk_dir, layout):
    with pytest.raises(ValueError) as info:
        LmdbTier(disk_dir, BLOCK - 1, layout)
    assert str(info.value).startswith("disk_bytes:")
    assert str(BLOCK) in str(info.value) and str(BLOCK - 1) in str(info.value)
    LmdbTier(disk_dir, BLOCK, layout).close()  # the failed attempt held no lock


def test_block_larger_than_capacity_rejected(open_tier, disk_dir, layout):
    tier = open_tier(BLOCK)
    big = make_kv(tiny_layout(dtype=torch.float32), 16)  # 8192 bytes: never fits
    assert tier.put_many([(A, big)]) == 0
    assert tier.stats()["rejected"] == 1 and tier.stats()["blocks"] == 0


def test_batch_evicts_enough_and_keeps_its_own_blocks(open_tier, layout, blocks):
    tier = open_tier(3 * BLOCK)
    tier.put_many([(A, blocks[A]), (B, blocks[B]), (C, blocks[C])])
    assert tier.put_many([(D, blocks[D]), (E, blocks[E])]) == 2
    assert _names(tier) == ["C", "D", "E"]
    assert tier.stats()["evictions"] == 2


def test_a_batch_larger_than_the_tier_stores_its_leading_blocks_within_capacity(open_tier, layout, blocks):
    """One transaction never evicts its own blocks: a batch the tier cannot hold keeps the leading ones that
    fit (those a lookup reaches), and the rest are rejected, never committed past the capacity."""
    tier = open_tier(3 * BLOCK)
    tier.put_many([(A, blocks[A])])
    batch = [(key, blocks[key]) for key in (B, C, D, E)] + [(B, blocks[B])]
    assert tier.put_many(batch) == 4  # B, C, D and B again; E is rejected
    assert _names(tier) == ["B", "C", "D"] and tier.used_bytes() == 3 * BLOCK
    assert tier.stats()["rejected"] == 1 and tier.stats()["evictions"] == 1
    for key in (B, C, D):
        assert_same_kv(_read(tier, layout, key), blocks[key])


def test_the_same_key_twice_in_a_batch_is_counted_once(open_tier, layout, blocks):
    tier = open_tier(3 * BLOCK)
    assert tier.put_many([(A, blocks[A]), (A, blocks[A]), (B, blocks[B])]) == 3
    assert _names(tier) == ["A", "B"] and tier.used_bytes() == 2 * BLOCK


def test_capacity_never_exceeded(open_tier, layout):
    capacity = 5 * BLOCK + 1000
    tier = open_tier(capacity)
    sizes: dict[bytes, int] = {}
    for i in range(80):
        tokens = 16 if i % 3 else 1 + i % 16
        key = i.to_bytes(32, "little")
        assert tier.put_many([(key, make_kv(layout, tokens, seed=i))]) == 1
        sizes[key] = tokens * 256 + HEADER_BYTES
        assert tier.used_bytes() <= capacity
        assert tier.used_bytes() == sum(sizes[k] for k in tier.keys())
        assert list(tier.keys())[-1] == key
        assert tier.stats()["blocks"] == len(list(tier.keys()))
    assert tier.stats()["evictions"] == 80 - tier.stats()["blocks"]
    for key in tier.keys():
        i = int.from_bytes(key, "little")
        tokens = 16 if i % 3 else 1 + i % 16
        assert_same_kv(_read(tier, layout, key, tokens), make_kv(layout, tokens, seed=i))


def test_delete(open_tier, layout, blocks):
    tier = open_tier()
    tier.put_many([(A, blocks[A]), (B, blocks[B])])
    assert tier.delete(A) is True
    assert tier.delete(A) is False
    assert _names(tier) == ["B"] and tier.used_bytes() == BLOCK
    assert _read(tier, layout, A) is None
    assert tier.stats()["evictions"] == 0


# -- persistence -----------------------------------------------------------------------------------------


def test_restart_same_process(open_tier, layout, blocks):
    tier = open_tier(3 * BLOCK, sync=True)
    tier.put_many([(A, blocks[A]), (B, blocks[B])])
    tier.put_many([(C, make_kv(layout, 5, seed=11))])
    tier.close()
    tier.close()  # idempotent
    again = open_tier(3 * BLOCK)
    assert _names(again) == ["A", "B", "C"]
    assert again.used_bytes() == 2 * BLOCK + 5 * 256 + 72
    assert_same_kv(_read(again, layout, A), blocks[A])
    assert_same_kv(_read(again, layout, B), blocks[B])
    assert_same_kv(_read(again, layout, C, 5), make_kv(layout, 5, seed=11))
    assert again.stats()["corrupt"] == 0


def test_lru_order_survives_restart(open_tier, layout, blocks):
    tier = open_tier(3 * BLOCK)
    for key in (A, B, C):
        tier.put_many([(key, blocks[key])])
    _read(tier, layout, A)  # a read: its stamp is written on close
    tier.close()
    again = open_tier(3 * BLOCK)
    assert _names(again) == ["B", "C", "A"]
    again.put_many([(D, blocks[D])])
    assert _names(again) == ["C", "A", "D"]
    again.close()
    third = open_tier(3 * BLOCK)
    assert _names(third) == ["C", "A", "D"]


def test_reopen_with_smaller_capacity_evicts_lru(open_tier, layout, blocks):
    tier = open_tier(5 * BLOCK)
    for key in (A, B, C, D):
        tier.put_many([(key, blocks[key])])
    _read(tier, layout, A)
    tier.close()
    small = open_tier(2 * BLOCK)
    assert _names(small) == ["D", "A"]
    assert small.used_bytes() == 2 * BLOCK
    assert small.stats()["evictions"] == 2
    assert_same_kv(_read(small, layout, A), blocks[A])
    small.close()
    assert _names(open_tier(5 * BLOCK)) == ["D", "A"]


CHILD_PUT = """
import sys
from conftest import make_kv, make_tokens, tiny_layout
from kvstore import KVStore, StoreConfig
lay = tiny_layout(dtype=sys.argv[2])
store = KVStore(lay, StoreConfig(host_bytes=0, disk_dir=sys.argv[1], disk_bytes="4MiB", disk_sync=True))
for seed, n in ((1, 40), (2, 16), (3, 7)):
    assert store.put(make_tokens(n, seed=seed), make_kv(lay, n, seed=seed)) == -(-n // 16)
store.close()
print("stored", store.stats()["tiers"]["lmdb"]["blocks"])
"""


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_restart_across_processes(make_store, disk_dir, dtype):
    result = subprocess.run([sys.executable, "-c", CHILD_PUT, str(disk_dir), dtype], capture_output=True,
                            text=True, cwd=str(TESTS_DIR), timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(TESTS_DIR)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "stored 5"
    lay = tiny_layout(dtype=dtype)
    store = make_store("disk", lay=lay, disk=disk_dir)
    assert store.disk.stats()["blocks"] == 5
    for seed, n in ((1, 40), (2, 16), (3, 7)):
        tokens = make_tokens(n, seed=seed)
        assert store.lookup(tokens) == n
        assert_same_kv(store.get(tokens), make_kv(lay, n, seed=seed))
    assert store.disk.stats()["corrupt"] == 0


# -- one process per directory ---------------------------------------------------------------------------

CHILD_HOLD = """
import sys
from conftest import tiny_layout
from kvstore.tiers.lmdb import LmdbTier
tier = LmdbTier(sys.argv[1], 1 << 20, tiny_layout(), sync=False)
print("ready", flush=True)
sys.stdin.read()
tier.close()
print("closed", flush=True)
"""


def test_directory_in_use_by_other_process(disk_dir, layout, blocks):
    from kvstore.config import StoreConfig
    from kvstore.store import KVStore

    child = subprocess.Popen([sys.executable, "-c", CHILD_HOLD, str(disk_dir)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(TESTS_DIR),
                             env=dict(os.environ, PYTHONPATH=str(TESTS_DIR)))
    try:
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(DirectoryInUseError) as info:
            LmdbTier(disk_dir, 1 << 20, layout)
        assert str(disk_dir) in str(info.value)
        assert isinstance(info.value, RuntimeError)
        with pytest.raises(DirectoryInUseError):
            KVStore(layout, StoreConfig(host_bytes="64KiB", disk_dir=str(disk_dir), disk_bytes="1MiB"))
        stdout, stderr = child.communicate("", timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, stderr
    assert stdout.strip() == "closed"
    tier = LmdbTier(disk_dir, 1 << 20, layout)  # released when the child closed it
    tier.put_many([(A, blocks[A])])
    tier.close()


def test_directory_released_when_holder_process_dies(disk_dir, layout):
    run_python(f"""
        import os
        from conftest import tiny_layout
        from kvstore.tiers.lmdb import LmdbTier
        LmdbTier({str(disk_dir)!r}, 1 << 20, tiny_layout(), sync=False)
        os._exit(0)  # no close: the kernel drops the flock with the process
    """)
    LmdbTier(disk_dir, 1 << 20, layout).close()


def test_directory_in_use_in_same_process(open_tier, disk_dir, layout, blocks):
    # flock locks belong to an open file description; the second open() makes a new one, so a
    # second LmdbTier on the same directory conflicts even inside one process.
    first = open_tier(1 << 20)
    first.put_many([(A, blocks[A])])
    with pytest.raises(DirectoryInUseError):
        LmdbTier(disk_dir, 1 << 20, layout)
    with pytest.raises(DirectoryInUseError):
        LmdbTier(str(disk_dir) + "/", 1 << 20, layout)  # another spelling of the same directory
    assert_same_kv(_read(first, layout, A), blocks[A])  # the failed attempt did not disturb the owner
    first.close()
    second = open_tier(1 << 20)
    assert_same_kv(_read(second, layout, A), blocks[A])


# -- damaged blocks --------------------------------------------------------------------------------------


def _flip_once(path, needle: bytes, offset: int) -> None:
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0, "pattern not found in data.mdb"
    assert data.find(needle, at + 1) == -1, "pattern found twice in data.mdb"
    data[at + offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupt_payload_is_a_miss(make_store, disk_dir, layout):
    tokens = make_tokens(48)
    kv = make_kv(layout, 48)
    store = make_store("disk", disk=disk_dir)
    assert store.put(tokens, kv) == 3
    store.close()
    # The second block's payload: find 64 bytes from its middle in the file, flip one bit in there.
    payload = kv[:, :, 16:32].contiguous().view(torch.uint8).numpy().tobytes()
    assert len(payload) == 4096
    _flip_once(disk_dir / "data.mdb", payload[2000:2064], 31)

    store = make_store("disk", disk=disk_dir)
    assert store.disk.stats()["corrupt"] == 0  # headers are intact: found only when read
    assert store.lookup(tokens) == 48
    got = store.get(tokens)  # no exception: fewer tokens
    assert_same_kv(got, kv[:, :, :16])
    stats = store.stats()["tiers"]["lmdb"]
    assert (stats["corrupt"], stats["misses"], stats["hits"]) == (1, 1, 1)
    assert store.lookup(tokens) == 16  # the damaged block is gone
    assert stats["blocks"] == 2
    assert not store.disk.contains(store.block_keys(tokens)[1].key)
    assert store.put(tokens, kv) == 1  # stored again, the third block is deduplicated
    assert_same_kv(store.get(tokens), kv)
    store.close()
    store = make_store("disk", disk=disk_dir)
    assert_same_kv(store.get(tokens), kv)
    assert store.disk.stats()["corrupt"] == 0


@pytest.mark.parametrize(
    "where, offset, corrupt_on_open",
    [
        ("checksum", 4 + 2 + 2 + 16 + 32 + 8, False),  # header parses, checksum does not match
        ("layout", 4 + 2 + 2 + 3, False),  # header parses, names another layout
        ("length", 4 + 2 + 2 + 16 + 32, False),  # header parses, wrong length
        ("magic", 1, True),  # header does not parse: dropped when the index is rebuilt
    ],
)
def test_corrupt_header_is_a_miss(open_tier, disk_dir, layout, blocks, where, offset, corrupt_on_open):
    tier = open_tier(3 * BLOCK)
    tier.put_many([(A, blocks[A])])
    tier.close()
    _flip_once(disk_dir / "data.mdb", MAGIC + FORMAT_VERSION.to_bytes(2, "little") + bytes([32, ENCODING_RAW]), offset)
    again = open_tier(3 * BLOCK)
    assert again.stats()["corrupt"] == (1 if corrupt_on_open else 0)
    assert _read(again, layout, A) is None
    stats = again.stats()
    assert (stats["corrupt"], stats["hits"], stats["blocks"], stats["used_bytes"]) == (1, 0, 0, 0)
    assert not again.contains(A)
    again.put_many([(A, blocks[A])])
    assert_same_kv(_read(again, layout, A), blocks[A])


def test_blocks_larger_than_a_smaller_tier_are_evicted_at_open_not_counted_corrupt(open_tier, disk_dir, layout):
    """Another layout's intact blocks that no longer fit a smaller ``disk_bytes`` go as evictions: operators
    watch ``corrupt`` for damage."""
    big = tiny_layout(block_tokens=64)  # 16 KiB blocks
    tier = open_tier(10 * BLOCK * 4, lay=big)
    tier.put_many([(A, make_kv(big, 64, seed=1))])
    tier.close()
    again = open_tier(3 * BLOCK)
    assert (again.stats()["corrupt"], again.stats()["evictions"], again.stats()["blocks"]) == (0, 1, 0)


def test_a_meta_record_claiming_a_huge_length_is_dropped_not_trusted(open_tier, disk_dir, layout, blocks):
    """One high bit flipped in one record's length: 2**62 bytes counted used, and every block evicted at open."""
    import lmdb

    tier = open_tier(3 * BLOCK)
    tier.put_many([(A, blocks[A]), (B, blocks[B]), (C, blocks[C])])
    tier.close()
    env = lmdb.open(str(disk_dir), max_dbs=2, map_size=1 << 30)
    meta = env.open_db(b"meta")
    with env.begin(write=True, db=meta) as txn:
        record = bytearray(txn.get(A))
        header = BlockHeader.unpack(bytes(record))
        at = bytes(record).find(header.length.to_bytes(8, "little"), 4)
        record[at + 7] |= 0x40  # bit 62 of the little-endian length
        assert BlockHeader.unpack(bytes(record)).length == header.length | (1 << 62)
        txn.put(A, bytes(record))
    env.close()
    again = open_tier(3 * BLOCK)
    stats = again.stats()
    assert (stats["corrupt"], stats["evictions"], stats["blocks"]) == (1, 0, 2)
    assert sorted(again.keys()) == [B, C] and again.used_bytes() == 2 * BLOCK
    for key in (B, C):
        assert_same_kv(_read(again, layout, key), blocks[key])


# -- races (deterministic interleavings) -----------------------------------------------------------------


def _wait_until_blocked_in(thread: threading.Thread, function: str) -> None:
    """Spin until ``thread``'s innermost Python frame is ``function`` (it waits on a lock there)."""
    while True:
        frame = sys._current_frames().get(thread.ident)
        if frame is not None and frame.f_code.co_name == function:
            return
        assert thread.is_alive()
        threading.Event().wait(0.001)


def test_same_key_put_by_two_threads_counted_once(open_tier, layout, blocks):
    tier = open_tier(3 * BLOCK)
    writers = [threading.Thread(target=tier.put_many, args=([(A, blocks[A])],)) for _ in range(2)]
    with tier._write_lock:  # both writers pass the "already stored?" check, then queue on the lock
        for writer in writers:
            writer.start()
        for writer in writers:
            _wait_until_blocked_in(writer, "_write")
    for writer in writers:
        writer.join()
    stats = tier.stats()
    assert (stats["blocks"], stats["blocks_written"], stats["used_bytes"]) == (1, 1, BLOCK)
    assert_same_kv(_read(tier, layout, A), blocks[A])


def test_block_evicted_during_read_is_a_plain_miss(open_tier, layout, blocks):
    tier = open_tier(3 * BLOCK)
    tier.put_many([(A, blocks[A])])
    source, first = inspect.getsourcelines(LmdbTier._get_into)
    pause_line = first + next(i for i, line in enumerate(source) if "self._env.begin(buffers=True)" in line)
    paused, resume = threading.Event(), threading.Event()

    def tracer(frame, event, arg):
        if frame.f_code is LmdbTier._get_into.__code__:
            if event == "line" and frame.f_lineno == pause_line:
                paused.set()
                resume.wait(10)
            return tracer
        return None

    result = {}

    def reader():
        sys.settrace(tracer)
        try:
            result["got"] = _read(tier, layout, A)
        finally:
            sys.settrace(None)

    thread = threading.Thread(target=reader)
    thread.start()
    assert paused.wait(10)  # the reader has seen A in the index ...
    assert tier.delete(A)  # ... and A is deleted before its read transaction opens
    resume.set()
    thread.join()
    assert result["got"] is None
    stats = tier.stats()
    assert (stats["misses"], stats["corrupt"], stats["hits"]) == (1, 0, 0)


def test_wrong_out_shape_does_not_destroy_block(open_tier, layout, blocks):
    tier = open_tier(3 * BLOCK)
    tier.put_many([(A, blocks[A])])
    assert _read(tier, layout, A, 8) is None
    assert tier.contains(A)
    assert tier.stats()["corrupt"] == 0


@pytest.mark.parametrize("setting", ["disk_dir", "files_dir"])
def test_a_directory_setting_naming_a_file_is_a_value_error_naming_it(tmp_path, setting):
    from kvstore import KVStore, StoreConfig

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    sizes = {"disk_dir": "disk_bytes", "files_dir": "files_bytes"}
    for path in (a_file, a_file / "below"):
        with pytest.raises(ValueError, match=f"^{setting}: expected a folder"):
            KVStore(tiny_layout(), StoreConfig(model_id="m", host_bytes=0, **{setting: str(path),
                                                                              sizes[setting]: "1MiB"}))


@pytest.mark.parametrize("setting", ["disk_dir", "files_dir"])
def test_a_directory_that_cannot_be_made_is_an_error_naming_its_setting(setting):
    """A path on a pseudo filesystem (or a read-only one) was a bare FileNotFoundError naming neither."""
    from kvstore import KVStore, StoreConfig

    sizes = {"disk_dir": "disk_bytes", "files_dir": "files_bytes"}
    with pytest.raises(OSError, match=f"^\\[Errno 2\\] {setting} '/proc/self/kvstore': cannot create it"):
        KVStore(tiny_layout(), StoreConfig(model_id="m", host_bytes=0, **{setting: "/proc/self/kvstore",
                                                                          sizes[setting]: "1MiB"}))


def test_a_capacity_the_machine_cannot_map_is_a_value_error_and_leaves_the_directory_free(disk_dir, layout):
    with pytest.raises(ValueError, match="^disk_bytes: expected a size this machine can map"):
        LmdbTier(disk_dir, 1 << 61, layout)  # 4 EiB of map: more than even 5-level paging addresses
    LmdbTier(disk_dir, 3 * BLOCK, layout).close()  # the failed attempt held no lock


def test_a_layout_with_smaller_blocks_keeps_the_larger_blocks_of_another(open_tier, layout):
    """One directory serves models in turn: a check of records against the opening layout's block size deleted
    every block of a model with more KV heads."""
    big = tiny_layout(num_kv_heads=8)
    block = make_kv(big, 16, seed=4)
    tier = open_tier(64 * BLOCK, lay=big)
    tier.put_many([(A, block)])
    tier.close()
    small = open_tier(64 * BLOCK)
    assert small.stats()["corrupt"] == 0
    small.close()
    again = open_tier(64 * BLOCK, lay=big)
    assert_same_kv(_read(again, big, A), block)


def test_a_fifo_for_data_mdb_is_refused_at_open_not_waited_on(disk_dir):
    """LMDB opened the FIFO and waited for a writer: the store's open hung for ever (a child, so a hang fails)."""
    disk_dir.mkdir(parents=True, exist_ok=True)
    os.mkfifo(disk_dir / "data.mdb")
    out = run_python(f"""
        from conftest import tiny_layout
        from kvstore.tiers.lmdb import LmdbTier
        try:
            LmdbTier({str(disk_dir)!r}, 1 << 20, tiny_layout())
        except OSError as exc:
            print("refused:", exc)
        """, timeout=60)
    assert "data.mdb: expected a regular file (LMDB's), got a FIFO: not a kvstore LMDB environment" in out
    LmdbTier(disk_dir.parent / "fresh", 1 << 20, tiny_layout()).close()  # nothing was left locked


def test_an_environment_of_another_program_is_an_os_error_naming_it(disk_dir, layout):
    """Its main database held plain keys named ``blocks`` and ``meta``: a raw ``lmdb.IncompatibleError``."""
    import lmdb

    env = lmdb.open(str(disk_dir), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"blocks", b"x")
        txn.put(b"meta", b"y")
    env.close()
    with pytest.raises(OSError, match=r"not a kvstore LMDB environment \(another program's\?\)") as info:
        LmdbTier(disk_dir, 3 * BLOCK, layout)
    assert str(disk_dir) in str(info.value)
    with pytest.raises(OSError, match="not a kvstore LMDB environment"):  # the directory lock was let go
        LmdbTier(disk_dir, 3 * BLOCK, layout)


def test_a_victim_is_handed_on_before_the_transaction_that_deletes_it_commits(open_tier, layout, blocks):
    """Write-back: ``on_evict`` (the tier below writes the victim) runs while the victim is still committed
    here. The other order lost a flushed block from every tier when the process died between the two."""
    tier = open_tier(2 * BLOCK)
    seen = []

    def on_evict(key, block, lossy):
        with tier._env.begin() as txn:  # what a process opening the directory now would find
            seen.append((key, txn.get(key, db=tier._blocks) is not None))
        assert_same_kv(block, blocks[key])

    tier.on_evict = on_evict
    tier.put_many([(A, blocks[A]), (B, blocks[B])])
    tier.put_many([(C, blocks[C])])
    assert seen == [(A, True)]
    assert _names(tier) == ["B", "C"]


def test_close_waits_for_a_read_inside_the_map_and_later_calls_miss(disk_dir):
    """A store's ``close`` racing a ``get`` unmapped LMDB while the reader decoded out of it: SIGSEGV in 8 of 10
    runs. Here a read is held inside its transaction while another thread closes the tier (in a child, so
    the old crash cannot take pytest down): close waits for it, the read returns exact bytes, and every call
    after close is a miss."""
    out = run_python(f"""
        import threading, time
        import torch
        from conftest import make_kv, make_tokens, tiny_layout
        from kvstore.keys import KeyChain
        from kvstore.tiers.lmdb import LmdbTier
        layout = tiny_layout()
        tier = LmdbTier({str(disk_dir)!r}, 1 << 20, layout, sync=False)
        kv = make_kv(layout, layout.block_tokens)
        key = b"k" * 32
        tier.put_many([(key, kv)])
        inside, release = threading.Event(), threading.Event()
        decode = tier.encoding.decode_into
        def held_decode(*args):
            inside.set()
            release.wait()
            return decode(*args)
        tier.encoding.decode_into = held_decode
        out = torch.zeros_like(kv)
        got = []
        reader = threading.Thread(target=lambda: got.append(tier.get_into(key, out)))
        reader.start()
        inside.wait()
        closer = threading.Thread(target=tier.close)
        closer.start()
        closer.join(0.3)
        print("close waited", closer.is_alive())
        release.set()
        reader.join()
        closer.join()
        print("read", got, torch.equal(out.view(torch.uint8), kv.view(torch.uint8)))
        print("after close", tier.get_into(key, out), tier.put_many([(b"j" * 32, kv)]), tier.delete(key))
    """)
    assert out.split("\n")[:3] == ["close waited True", "read [True] True", "after close False 0 False"]


def test_a_truncated_data_file_is_an_oserror_not_a_bus_error(tmp_path):
    """A data.mdb cut short (a copy that ran out of room) opened fine, and the first read of a page past its
    end killed the process with SIGBUS: the tier, ``kvstore info`` and the cache server's blob store alike.
    Run in a child, so a regression fails this test instead of killing the run."""
    out = run_python(f"""
        import os
        from pathlib import Path
        from conftest import make_kv, make_tokens, tiny_layout
        from kvstore import KVStore, StoreConfig
        from kvstore.tiers.lmdb import inspect_directory
        layout, disk = tiny_layout(), Path({str(tmp_path / "disk")!r})
        config = StoreConfig(model_id="m", host_bytes=0, disk_dir=str(disk), disk_bytes=1 << 20)
        with KVStore(layout, config) as store:
            for seed in range(20):
                store.put(make_tokens(64, seed=seed), make_kv(layout, 64, seed=seed))
        data = disk / "data.mdb"
        os.truncate(data, os.path.getsize(data) // 2)
        for attempt in (lambda: KVStore(layout, config), lambda: inspect_directory(disk)):
            try:
                attempt()
            except OSError as error:
                print("refused:", error)
    """)
    refused = [line for line in out.splitlines() if line.startswith("refused:")]
    assert len(refused) == 2 and all("truncated" in line and "remove data.mdb" in line for line in refused), out


def test_a_lock_file_that_cannot_be_opened_is_an_oserror_naming_disk_dir(tmp_path, layout):
    """A directory squatting on kvstore.lock (as a read-only mount does with EROFS) raised a bare error that
    named neither the setting nor what to do."""
    (tmp_path / "lmdb" / "kvstore.lock").mkdir(parents=True)
    with pytest.raises(OSError, match=r"disk_dir .*lmdb: cannot open its lock file kvstore\.lock .*files_dir"):
        LmdbTier(tmp_path / "lmdb", 1 << 20, layout)


def test_touch_chain_makes_the_head_the_most_recently_used_and_persists(open_tier, blocks):
    tier = open_tier(3 * BLOCK)
    tier.put_many([(key, blocks[key]) for key in (A, B, C)])
    tier.touch_chain([A, B, D])  # D is not held: passed over
    assert _names(tier) == ["C", "B", "A"]
    tier.close()
    again = open_tier(2 * BLOCK)  # reopened smaller: the least recently used goes, as stamped
    assert _names(again) == ["B", "A"]


def test_puts_as_large_as_the_tier_keep_its_file_near_twice_the_capacity(tmp_path):
    """A put replacing most of the tier in one transaction kept the evicted blocks' pages until it committed,
    beside readers' snapshots: data.mdb grew to 4.7 times the capacity (8 KiB blocks, whole pages of 3 x 4 KiB
    each). Such puts are written in transactions of a quarter of the tier."""
    from kvstore import KVStore, StoreConfig

    layout = tiny_layout(dtype=torch.float32)  # 8 KiB blocks: 8,264 bytes stored, three pages
    capacity = 16 * (layout.block_bytes + HEADER_BYTES)
    config = StoreConfig(model_id="m", host_bytes=0, disk_dir=str(tmp_path / "lmdb"), disk_bytes=capacity,
                         disk_sync=False)
    tokens_per_prompt = 16 * layout.block_tokens
    peak = 0
    with KVStore(layout, config) as store:
        for i in range(24):
            tokens, kv = make_tokens(tokens_per_prompt, seed=i), make_kv(layout, tokens_per_prompt, seed=i)
            assert store.put(tokens, kv) == 16
            peak = max(peak, os.path.getsize(tmp_path / "lmdb" / "data.mdb"))
            assert store.stats()["tiers"]["lmdb"]["used_bytes"] <= capacity
        assert_same_kv(store.get(tokens), kv)  # the last prompt whole
    assert peak <= 3 * capacity, peak / capacity  # 1.5 of it is the pages' rounding


def test_a_put_keeping_its_head_holds_the_capacity_when_another_writer_stores_that_head_first(open_tier, layout,
                                                                                              blocks):
    """The room beside the blocks kept was measured before the write lock: another writer (a landing put,
    the write-behind) storing the head in between left nothing to evict, and the tier held 6 blocks in 4."""
    tier = open_tier(3 * BLOCK)
    write = tier._write
    raced = []

    def another_writer_first(*args, **kwargs):
        if not raced:
            raced.append(True)
            write([(A, blocks[A]), (B, blocks[B])], [])
        return write(*args, **kwargs)

    tier._write = another_writer_first
    assert tier.put_keeping([(C, blocks[C]), (D, blocks[D])], None, {A, B}) == 1  # D finds no room
    assert _names(tier) == ["A", "B", "C"] and tier.used_bytes() == 3 * BLOCK
    assert tier.stats()["rejected"] == 1 and tier.stats()["evictions"] == 0
    for key in (A, B, C):
        assert_same_kv(_read(tier, layout, key), blocks[key])


def test_blocks_kept_in_another_codecs_form_are_not_held_and_take_no_room(disk_dir, layout, blocks):
    """A kept head stored in another codec's lossy form is not held here (a miss): it was shielded from
    eviction all the same, and the tail that needed its room was rejected."""
    from kvstore.compression import get_codec
    lossy = LmdbTier(disk_dir, 3 * BLOCK, layout, sync=False, codec=get_codec("int8"))
    lossy.put_many([(key, blocks[key]) for key in (A, B)])
    lossy.close()
    tier = LmdbTier(disk_dir, 3 * BLOCK, layout, sync=False)
    try:
        assert not tier.contains(A) and not tier.contains(B)
        assert tier.put_keeping([(key, blocks[key]) for key in (C, D, E)], None, {A, B}) == 3
        assert tier.used_bytes() <= 3 * BLOCK and tier.stats()["rejected"] == 0
    finally:
        tier.close()
