"""The files tier reads a run of blocks as runs side by side: exact bytes, a count that stops at the first block
not there, and no pool deadlock when several callers read runs of large blocks at once."""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import TESTS_DIR, assert_same_kv, make_kv, make_tokens, tiny_layout
from kvstore import KVStore, StoreConfig
from kvstore.blockformat import HEADER_BYTES
from kvstore.tiers import fileio
from kvstore.tiers import files as files_module
from tierkit import block_path, files_tiers

MID = tiny_layout(num_layers=4, num_kv_heads=4, head_dim=64, dtype=torch.bfloat16, block_tokens=256)  # 1 MiB
BLOCKS = 8
FILL = 7.0


@pytest.fixture
def four_cores(monkeypatch):
    """Runs are one per core, up to io_threads: allow four here."""
    monkeypatch.setattr(files_module.os, "cpu_count", lambda: 4)


@pytest.fixture
def stored(tmp_path, four_cores):
    """``stored(io_threads)``: (tier, keys, kv) with BLOCKS 1 MiB blocks written, the tier closed at teardown."""
    with files_tiers(tmp_path / "files", MID, 0) as factory:
        def make(io_threads: int = 4):
            tier = factory(2 * BLOCKS * (MID.block_bytes + HEADER_BYTES), io_threads=io_threads)
            kv = make_kv(MID, BLOCKS * 256, seed=io_threads)
            keys = [bytes([n + 1]) * 32 for n in range(BLOCKS)]
            assert tier.put_many([(key, kv[:, :, n * 256:(n + 1) * 256]) for n, key in enumerate(keys)]) == BLOCKS
            return tier, keys, kv
        yield make


def slices(out: torch.Tensor, blocks: int) -> list[torch.Tensor]:
    return [out[:, :, n * 256:(n + 1) * 256] for n in range(blocks)]  # strided views, as a store passes them


def assert_own_bytes_or_untouched(out: torch.Tensor, kv: torch.Tensor, blocks: range) -> None:
    """Past the count a slice was either not read into or holds its own block: never another block's bytes."""
    for n in blocks:
        got, own = out[:, :, n * 256:(n + 1) * 256], kv[:, :, n * 256:(n + 1) * 256]
        assert torch.equal(got, torch.full_like(got, FILL)) or torch.equal(got, own), n


@pytest.mark.parametrize("io_threads", [1, 2, 4])
def test_a_run_read_side_by_side_is_exact(stored, io_threads):
    tier, keys, kv = stored(io_threads)
    assert BLOCKS * MID.block_bytes >= files_module._SPLIT_RUN_BYTES
    out = torch.full(MID.shape(BLOCKS * 256), FILL, dtype=MID.dtype)
    assert tier.get_run_into(keys, slices(out, BLOCKS)) == BLOCKS
    assert_same_kv(out, kv)
    assert tier.stats()["hits"] == BLOCKS and tier.stats()["misses"] == 0


def test_a_short_run_and_an_empty_one(stored):
    tier, keys, kv = stored()
    out = torch.full(MID.shape(BLOCKS * 256), FILL, dtype=MID.dtype)
    assert tier.get_run_into([], []) == 0
    assert tier.get_run_into(keys[:2], slices(out, 2)) == 2  # 2 MiB: under _SPLIT_RUN_BYTES, block by block
    assert_same_kv(out[:, :, :512], kv[:, :, :512])
    with pytest.raises(ValueError, match="outs: expected one per key"):
        tier.get_run_into(keys[:2], slices(out, 1))


@pytest.mark.parametrize("at", [0, 1, 3, 4, 7])
@pytest.mark.parametrize("fault", ["damaged", "missing"])
def test_the_count_stops_at_the_first_block_not_there_in_any_run(stored, at, fault):
    tier, keys, kv = stored()
    path = block_path(tier._root, keys[at])
    if fault == "damaged":
        data = bytearray(open(path, "rb").read())
        data[HEADER_BYTES + 5] ^= 0x01
        open(path, "wb").write(data)
    else:
        os.unlink(path)
    out = torch.full(MID.shape(BLOCKS * 256), FILL, dtype=MID.dtype)
    assert tier.get_run_into(keys, slices(out, BLOCKS)) == at
    assert_same_kv(out[:, :, :at * 256], kv[:, :, :at * 256])
    assert_own_bytes_or_untouched(out, kv, range(at + 1, BLOCKS))
    assert tier.stats()["corrupt"] == (fault == "damaged")
    assert not os.path.exists(path) and not tier.contains(keys[at])


@pytest.mark.parametrize("at", [0, 5])
def test_a_tier_error_raises_on_the_first_block_and_ends_the_count_further_on(stored, monkeypatch, at):
    tier, keys, kv = stored()
    failing = block_path(tier._root, keys[at])
    real_read = tier._read

    def read(path, key, out, split, stamp):
        if path == failing:
            raise OSError(errno.EIO, "Input/output error", path)
        return real_read(path, key, out, split, stamp)

    monkeypatch.setattr(tier, "_read", read)
    out = torch.full(MID.shape(BLOCKS * 256), FILL, dtype=MID.dtype)
    if at == 0:
        with pytest.raises(OSError) as raised:
            tier.get_run_into(keys, slices(out, BLOCKS))
        assert raised.value.errno == errno.EIO
    else:
        assert tier.get_run_into(keys, slices(out, BLOCKS)) == at
        assert_same_kv(out[:, :, :at * 256], kv[:, :, :at * 256])
    assert tier.contains(keys[at])  # a failing medium is not a damaged block: nothing deleted


READERS = r"""
import os, sys, threading
import torch
from conftest import TESTS_DIR, assert_same_kv, make_kv, tiny_layout
from kvstore.tiers import files as files_module
files_module.os.cpu_count = lambda: 4
lay = tiny_layout(num_layers=8, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, block_tokens=256)
tier = files_module.FilesTier(sys.argv[1], 8 * (lay.block_bytes + 4096), lay, sync=False, io_threads=2)
kv = make_kv(lay, 4 * 256, seed=1)
keys = [bytes([n + 1]) * 32 for n in range(4)]
assert tier.put_many([(key, kv[:, :, n * 256:(n + 1) * 256]) for n, key in enumerate(keys)]) == 4
outs = [torch.zeros(lay.shape(4 * 256), dtype=lay.dtype) for _ in range(3)]
counts = {}
def reader(n):
    for _ in range(3):
        counts[n] = tier.get_run_into(keys, [outs[n][:, :, i * 256:(i + 1) * 256] for i in range(4)])
threads = [threading.Thread(target=reader, args=(n,)) for n in range(3)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
assert counts == {0: 4, 1: 4, 2: 4}, counts
for out in outs:
    assert_same_kv(out, kv)
tier.close()
print("read", sum(counts.values()))
"""


def test_callers_reading_runs_of_large_blocks_at_once_do_not_wait_on_each_other(tmp_path):
    """Runs on the pool read whole 8 MiB blocks: were they to queue parts of a block on the same two pool
    threads, three callers' runs could hold both threads and wait on each other forever (the child is
    killed after 120 s, and the test fails)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    try:
        done = subprocess.run([sys.executable, "-c", READERS, str(tmp_path / "files")], capture_output=True,
                              text=True, env=env, cwd=str(TESTS_DIR), timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("readers of runs of large blocks deadlocked on the read pool")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "read 12"


@pytest.mark.parametrize("host", [False, True])
def test_a_store_reads_the_files_tier_in_runs_and_promotes_them(tmp_path, four_cores, host):
    blocks = 2 * BLOCKS
    config = StoreConfig(host_bytes=(blocks + 1) * MID.block_bytes if host else 0, files_dir=str(tmp_path / "f"),
                         files_sync=False, files_write_policy="write_through", slow_factor=1e9)
    tokens, kv = make_tokens(blocks * 256, seed=3), make_kv(MID, blocks * 256, seed=3)
    with KVStore(MID, config) as store:
        assert store.put(tokens, kv) == blocks
        store.flush()
    with KVStore(MID, config) as store:  # a new process's view: every block on disk, none in RAM
        out = torch.full(MID.shape(blocks * 256), FILL, dtype=MID.dtype)
        assert store.get_into(tokens, out) == blocks * 256
        assert_same_kv(out, kv)
        tiers = store.stats()["tiers"]
        assert tiers["files"]["hits"] == blocks
        if host:
            assert tiers["host"]["blocks"] == blocks  # every block of the runs promoted
            assert store.get_into(tokens, torch.empty_like(out)) == blocks * 256
            assert store.stats()["tiers"]["files"]["hits"] == blocks  # the second read came from RAM


BIG = tiny_layout(num_layers=8, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, block_tokens=256)  # 8 MiB


@pytest.mark.parametrize("damage", [None, "first-piece", "second-piece", "truncated-in-first", "one-byte-longer"])
def test_a_block_read_and_checksummed_in_pieces_is_exact_or_a_miss(tmp_path, damage):
    """One thread reads an 8 MiB block in 4 MiB pieces, checksumming each as it comes in."""
    assert BIG.block_bytes >= 2 * fileio.HASH_PIECE_BYTES
    with files_tiers(tmp_path / "files", BIG, 0) as factory:
        tier = factory(4 * (BIG.block_bytes + HEADER_BYTES), io_threads=1)
        kv = make_kv(BIG, 256, seed=9)
        key = b"\x09" * 32
        assert tier.put_many([(key, kv)]) == 1
        path = block_path(tier._root, key)
        data = bytearray(open(path, "rb").read())
        if damage == "first-piece":
            data[HEADER_BYTES + 100] ^= 0x01
        elif damage == "second-piece":
            data[-100] ^= 0x01
        elif damage == "truncated-in-first":
            data = data[:HEADER_BYTES + fileio.HASH_PIECE_BYTES // 2]
        elif damage == "one-byte-longer":
            data += b"\0"
        open(path, "wb").write(data)
        out = torch.full(BIG.shape(256), FILL, dtype=BIG.dtype)
        assert tier.get_into(key, out) == (damage is None)
        if damage is None:
            assert_same_kv(out, kv)
        else:
            assert tier.stats()["corrupt"] == 1 and not os.path.exists(path)


@pytest.mark.parametrize("mode", ["zstd", "o_direct", "kivi4"])
def test_runs_through_a_codec_or_o_direct_decode_each_block_and_promote_it_marked(tmp_path, four_cores, mode):
    """Encoded or O_DIRECT blocks take the whole-file path, each on the thread of its run; approximate
    (kivi4) blocks reach host RAM marked lossy, never as exact ones."""
    blocks = BLOCKS
    codec = {"zstd": "zstd", "o_direct": "raw", "kivi4": "kivi4"}[mode]
    config = StoreConfig(host_bytes=0, files_dir=str(tmp_path / "f"), files_sync=False, files_codec=codec,
                         files_o_direct=mode == "o_direct", slow_factor=1e9)
    tokens, kv = make_tokens(blocks * 256, seed=4), make_kv(MID, blocks * 256, seed=4)
    with KVStore(MID, config) as store:
        assert store.put(tokens, kv) == blocks
        store.flush()
    with KVStore(MID, dataclasses.replace(config, host_bytes=(blocks + 1) * MID.block_bytes)) as store:
        out = torch.full(MID.shape(blocks * 256), FILL, dtype=MID.dtype)
        assert store.get_into(tokens, out) == blocks * 256
        if mode == "kivi4":
            assert not torch.equal(out, kv)  # approximate, as that codec stores it
            assert (out.float() - kv.float()).abs().max() < 2.0
        else:
            assert_same_kv(out, kv)
        again = torch.empty_like(out)
        assert store.get_into(tokens, again) == blocks * 256  # from host RAM now
        assert torch.equal(again, out)
        host = store.stats()["tiers"]["host"]
        assert host["blocks"] == blocks and store.stats()["tiers"]["files"]["hits"] == blocks
        marks = {store.tiers[0].lossy_of(ref.key) for ref in store.block_keys(tokens)}
        assert marks == {"kivi4" if mode == "kivi4" else None}


def test_every_reader_has_ended_when_another_reader_raises(stored, monkeypatch):
    """A reader that raises something unexpected is passed on only once the other readers have stopped
    writing into ``outs`` (the caller may reuse them at once), and they take no block after it."""
    tier, keys, kv = stored(io_threads=4)
    real_get, finished = tier._get, []

    def get(key, out, split, stamp):
        index = keys.index(key)
        if index == 2:
            raise RuntimeError("injected")
        time.sleep(0.05)
        found = real_get(key, out, split, stamp)
        finished.append(index)
        return found

    monkeypatch.setattr(tier, "_get", get)
    out = torch.full(MID.shape(BLOCKS * 256), FILL, dtype=MID.dtype)
    with pytest.raises(RuntimeError, match="injected"):
        tier.get_run_into(keys, slices(out, BLOCKS))
    done = sorted(finished)
    time.sleep(0.2)
    assert sorted(finished) == done  # nobody still reading
    assert {0, 1} <= set(done) and 2 not in done
    assert max(done) < 2 + 4  # only blocks the other three readers had taken before block 2 raised


def test_a_run_stops_where_host_ram_holds_a_block_and_starts_again_after_it(tmp_path, four_cores):
    """Files hold every block and host RAM blocks 3 and 4: blocks 0-2 come from the files tier as one run,
    3-4 from RAM, 5-7 from the files tier again; every byte exact."""
    config = StoreConfig(host_bytes=0, files_dir=str(tmp_path / "f"), files_sync=False, slow_factor=1e9)
    tokens, kv = make_tokens(BLOCKS * 256, seed=6), make_kv(MID, BLOCKS * 256, seed=6)
    with KVStore(MID, config) as store:
        assert store.put(tokens, kv) == BLOCKS
    with KVStore(MID, dataclasses.replace(config, host_bytes=(BLOCKS + 1) * MID.block_bytes, promote=False)) as store:
        refs = store.block_keys(tokens)
        host = store.tiers[0]
        assert host.put_many([(refs[n].key, kv[:, :, n * 256:(n + 1) * 256]) for n in (3, 4)]) == 2
        out = torch.full(MID.shape(BLOCKS * 256), FILL, dtype=MID.dtype)
        assert store.get_into(tokens, out) == BLOCKS * 256
        assert_same_kv(out, kv)
        tiers = store.stats()["tiers"]
        assert tiers["files"]["hits"] == BLOCKS - 2 and tiers["host"]["hits"] == 2


@pytest.mark.parametrize("known", [False, True])
def test_a_read_that_comes_up_short_goes_on_where_it_stopped(tmp_path, known):
    """A medium that moves at most 1,000 bytes a call (NFS, a FUSE mount): every byte lands in its buffer."""
    data = os.urandom(10_000)
    path = tmp_path / "block"
    path.write_bytes(data)
    buffers = [bytearray(72), memoryview(bytearray(4000)), memoryview(bytearray()), bytearray(5928), bytearray(1)]

    def at_most_1000(fd, views, offset):
        room, limited = 1000, []
        for view in views:
            view = memoryview(view).cast("B")[:room]
            limited.append(view)
            room -= view.nbytes
        return os.preadv(fd, limited, offset)

    fd = os.open(path, os.O_RDONLY)
    try:
        got = fileio.transfer(at_most_1000, fd, buffers, 0, 10_001 if known else None)
    finally:
        os.close(fd)
    assert got == 10_000 and bytes(b"".join(bytes(b) for b in buffers[:4])) == data and buffers[4] == bytearray(1)
