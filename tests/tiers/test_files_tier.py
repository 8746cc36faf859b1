"""FilesTier: one verified file per block in a shared directory, mtime-LRU eviction, corruption, processes."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import TESTS_DIR, as_bytes, assert_same_kv, make_kv, make_tokens, run_threads, tiny_layout
from kvstore.blockformat import HEADER_BYTES, BlockHeader
from kvstore.tiers import fileio
from kvstore.tiers import files as files_module
from kvstore.tiers.base import Tier
from kvstore.tiers.files import FilesTier
from kvstore import KVStore, StoreConfig

from tierkit import A, B, C, D, E, block_path, files_tiers, make_blocks, names as _names, read as _read

BLOCK = 4096 + HEADER_BYTES  # bytes one full tiny-layout fp16 block counts against the capacity
SECOND = 1_000_000_000  # ns


@pytest.fixture
def blocks(layout):
    return make_blocks(layout)


@pytest.fixture
def open_tier(disk_dir, layout):
    """``open_tier(capacity, path=disk_dir, **options)``: a FilesTier (sync off unless asked) closed at teardown."""
    with files_tiers(disk_dir, layout, 3 * BLOCK) as factory:
        yield factory


def all_files(root) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, names in os.walk(str(root)) for f in names)


def disk_usage(root) -> int:
    return sum(os.path.getsize(p) for p in all_files(root) if p.endswith(".kvb"))


def set_mtime(root, key: bytes, seconds: int) -> None:
    os.utime(block_path(root, key), ns=(seconds * SECOND, seconds * SECOND))


# -- basics ----------------------------------------------------------------------------------------------


def test_is_a_tier_and_round_trips_exact_bytes(open_tier, disk_dir, layout, blocks):
    tier = open_tier(10 * BLOCK)
    assert isinstance(tier, Tier) and tier.name == "files"
    partial = make_kv(layout, 5, seed=7)
    assert tier.put_many([(A, blocks[A]), (B, blocks[B]), (C, partial)]) == 3
    assert_same_kv(_read(tier, layout, A), blocks[A])  # contiguous out: read straight into it
    wide = torch.full(layout.shape(40), 7.0, dtype=layout.dtype)
    assert tier.get_into(B, wide[:, :, 8:24])  # strided out: through the scratch buffer
    assert_same_kv(wide[:, :, 8:24], blocks[B])
    assert torch.all(wide[:, :, :8] == 7) and torch.all(wide[:, :, 24:] == 7)  # nothing else written
    assert tier.get_into(C, wide[:, :, 30:35])
    assert_same_kv(wide[:, :, 30:35], partial)
    assert_same_kv(_read(tier, layout, C, 5), partial)
    assert _read(tier, layout, D) is None
    stats = tier.stats()
    assert stats["used_bytes"] == tier.used_bytes() == 2 * BLOCK + 5 * 256 + HEADER_BYTES == disk_usage(disk_dir)
    assert (stats["blocks"], stats["blocks_written"], stats["bytes_written"]) == (3, 3, 2 * 4096 + 5 * 256)
    assert (stats["hits"], stats["misses"], stats["corrupt"]) == (4, 1, 0)
    assert stats["bytes_read"] == 2 * 4096 + 2 * 5 * 256
    assert stats["capacity_bytes"] == 10 * BLOCK
    assert set(stats) >= {"temp_removed", "o_direct_fallbacks", "evictions", "rejected"}


def test_files_are_fanned_out_with_header_and_payload(open_tier, disk_dir, layout, blocks):
    tier = open_tier(sync=True)
    partial = make_kv(layout, 3, seed=9)
    tier.put_many([(A, blocks[A]), (E, partial)])
    assert all_files(disk_dir) == sorted([block_path(disk_dir, A), block_path(disk_dir, E)])  # no temp left
    assert block_path(disk_dir, A) == str(disk_dir / "41" / ("41" * 32 + ".kvb"))  # one level of fan-out
    for key, kv in ((A, blocks[A]), (E, partial)):
        data = open(block_path(disk_dir, key), "rb").read()
        payload = as_bytes(kv)
        assert len(data) == HEADER_BYTES + len(payload)
        assert data[:HEADER_BYTES] == BlockHeader.for_payload(key, layout.fingerprint, payload).pack()
        assert data[HEADER_BYTES:] == payload


def test_a_token_range_of_a_larger_tensor_is_written_and_read_in_place(open_tier, disk_dir, layout):
    """Blocks sliced out of a prompt's KV (strided) go to disk and come back with pwritev/preadv of their
    pieces: the file is the same as for a contiguous block, and the read lands in the slice only."""
    prompt = make_kv(layout, 3 * layout.block_tokens, seed=11)
    sliced = prompt[:, :, layout.block_tokens:2 * layout.block_tokens]
    assert not sliced.is_contiguous()
    tier = open_tier()
    tier.put_many([(A, sliced)])
    data = open(block_path(disk_dir, A), "rb").read()
    payload = as_bytes(sliced.contiguous())
    assert data == BlockHeader.for_payload(A, layout.fingerprint, payload).pack() + payload
    out = torch.zeros_like(prompt)
    assert tier.get_into(A, out[:, :, layout.block_tokens:2 * layout.block_tokens])
    assert_same_kv(out[:, :, layout.block_tokens:2 * layout.block_tokens], sliced)
    assert not out[:, :, :layout.block_tokens].any() and not out[:, :, 2 * layout.block_tokens:].any()


def test_a_batchs_raw_blocks_are_viewed_by_the_writers_one_at_a_time(open_tier, disk_dir, layout, monkeypatch):
    """A put's byte views of each raw block are made by the writer thread that writes it, not all up front by
    the caller: held for the whole batch, 128 blocks' views outlived two collections and made the oldest
    generation's full collections (70 ms each, holding the GIL) run every few puts. The files are exact."""
    prompt = make_kv(layout, 6 * layout.block_tokens, seed=12)
    blocks = prompt.split(layout.block_tokens, dim=2)
    made_on: list[str] = []
    real = files_module.payload_views

    def counted(block):
        made_on.append(threading.current_thread().name)
        return real(block)
    monkeypatch.setattr(files_module, "payload_views", counted)
    tier = open_tier(capacity=10 * BLOCK)
    names = [bytes([n]) * 32 for n in range(6)]
    assert tier.put_many(list(zip(names, blocks))) == 6
    assert len(made_on) == 6 and all(name.startswith("kvstore-files-write") for name in made_on)
    for name, block in zip(names, blocks):
        payload = as_bytes(block.contiguous())
        assert open(block_path(disk_dir, name), "rb").read() == \
            BlockHeader.for_payload(name, layout.fingerprint, payload).pack() + payload


def test_a_writer_that_fails_before_its_file_is_open_leaves_no_file_and_the_capacity_holds(open_tier, disk_dir,
                                                                                            layout, monkeypatch):
    """On a full tier the block's write was handed an evicted file to overwrite; its views then failed on the
    writer thread before the file was opened. That file (no block any more) stayed, uncounted: the directory
    held a block more than the capacity after the next put."""
    tier = open_tier(capacity=3 * BLOCK)
    names = [bytes([n]) * 32 for n in range(5)]
    assert tier.put_many([(name, make_kv(layout, layout.block_tokens, seed=n)) for n, name in enumerate(names[:3])]) == 3
    real = files_module.payload_views

    def fails(block):
        raise RuntimeError("no views of this one")
    monkeypatch.setattr(files_module, "payload_views", fails)
    with pytest.raises(RuntimeError, match="no views"):
        tier.put_many([(names[3], make_kv(layout, layout.block_tokens, seed=3))])
    monkeypatch.setattr(files_module, "payload_views", real)
    assert [os.path.basename(p) for p in all_files(disk_dir) if not p.endswith(".kvb")] == []
    assert tier.put_many([(names[4], make_kv(layout, layout.block_tokens, seed=4))]) == 1
    assert disk_usage(disk_dir) <= 3 * BLOCK and tier.used_bytes() == disk_usage(disk_dir)
    assert _read(tier, layout, names[4]) is not None


def test_a_negated_view_is_stored_as_the_values_it_shows(open_tier, layout):
    """A lazily negated view's memory holds the values before the negation: written from that memory, the
    block read back was the negation of what was put."""
    block = make_kv(layout, layout.block_tokens, seed=13)
    negated = torch._neg_view(block)
    tier = open_tier()
    assert tier.put_many([(A, negated)]) == 1
    out = torch.empty_like(block)
    assert tier.get_into(A, out)
    assert_same_kv(out, -block)


def test_present_block_is_not_rewritten(open_tier, disk_dir, layout, blocks):
    tier = open_tier()
    tier.put_many([(A, blocks[A])])
    set_mtime(disk_dir, A, 1000)
    before = os.stat(block_path(disk_dir, A))
    assert tier.put_many([(A, blocks[A]), (A, blocks[A])]) == 2
    other = open_tier(path=disk_dir)  # sees A on disk (scan on open) and does not write it either
    assert other.put_many([(A, blocks[A])]) == 1
    after = os.stat(block_path(disk_dir, A))
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, 1000 * SECOND)
    assert tier.stats()["blocks_written"] == 1 and other.stats()["blocks_written"] == 0
    assert tier.used_bytes() == other.used_bytes() == BLOCK


def test_capacity_below_one_block_and_oversized_block(disk_dir, open_tier, layout):
    with pytest.raises(ValueError) as info:
        FilesTier(disk_dir, BLOCK - 1, layout)
    message = str(info.value)
    assert message.startswith("files_bytes:") and str(BLOCK) in message and str(BLOCK - 1) in message
    tier = open_tier(BLOCK)
    big = make_kv(tiny_layout(dtype=torch.float32), 16)  # 8192 bytes: never fits
    assert tier.put_many([(A, big)]) == 0
    assert tier.stats()["rejected"] == 1 and tier.stats()["blocks"] == 0 and all_files(disk_dir) == []


def test_o_direct_needs_the_platform(disk_dir, layout, monkeypatch):
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    with pytest.raises(ValueError, match="o_direct"):
        FilesTier(disk_dir, BLOCK, layout, o_direct=True)


def test_delete_close_and_reopen(open_tier, disk_dir, layout, blocks):
    tier = open_tier()
    tier.put_many([(A, blocks[A]), (B, blocks[B])])
    assert tier.delete(A) is True and tier.delete(A) is False
    assert not os.path.exists(block_path(disk_dir, A))
    assert _names(tier) == ["B"] and tier.used_bytes() == BLOCK
    assert _read(tier, layout, A) is None
    tier.close()
    tier.close()  # idempotent; the files stay
    assert tier.stats()["blocks"] == 0
    again = open_tier()
    assert _names(again) == ["B"]
    assert_same_kv(_read(again, layout, B), blocks[B])


# -- capacity and eviction -------------------------------------------------------------------------------


def test_eviction_follows_mtimes_learned_from_a_scan(open_tier, disk_dir, layout, blocks):
    writer = open_tier(4 * BLOCK)
    for key in (A, B, C, D):
        writer.put_many([(key, blocks[key])])
    for key, seconds in ((A, 1000), (B, 4000), (C, 2000), (D, 3000)):
        set_mtime(disk_dir, key, seconds)
    reader = open_tier(4 * BLOCK)
    assert _names(reader) == ["A", "C", "D", "B"]
    assert reader.put_many([(E, blocks[E])]) == 1
    assert _names(reader) == ["C", "D", "B", "E"]
    assert not os.path.exists(block_path(disk_dir, A))
    assert reader.stats()["evictions"] == 1 and disk_usage(disk_dir) == 4 * BLOCK


def test_reopening_with_a_smaller_capacity_evicts_down_to_it_at_once(open_tier, disk_dir, layout, blocks):
    writer = open_tier(10 * BLOCK)
    for key, seconds in zip((A, B, C, D, E), (1000, 5000, 2000, 4000, 3000)):
        writer.put_many([(key, blocks[key])])
        set_mtime(disk_dir, key, seconds)
    writer.close()
    smaller = open_tier(3 * BLOCK)
    assert _names(smaller) == ["E", "D", "B"]  # the least recently accessed went first
    assert smaller.used_bytes() == disk_usage(disk_dir) == 3 * BLOCK
    assert smaller.stats()["evictions"] == 2
    for key in (B, D, E):
        assert_same_kv(_read(smaller, layout, key), blocks[key])


def test_a_write_finding_the_room_held_by_another_threads_writes_is_rejected(open_tier, disk_dir, layout, blocks,
                                                                              monkeypatch):
    """Writes in flight cannot be evicted before they are stored: a put from another thread that finds the
    whole capacity reserved by them is rejected, never written past the capacity."""
    tier = open_tier(2 * BLOCK, io_threads=4)
    release, started, real = threading.Event(), threading.Semaphore(0), tier._write_file

    def held_write(*args):
        started.release()
        release.wait(10)
        return real(*args)

    monkeypatch.setattr(tier, "_write_file", held_write)
    first = threading.Thread(target=tier.put_many, args=([(A, blocks[A]), (B, blocks[B])],))
    first.start()
    assert started.acquire(timeout=10) and started.acquire(timeout=10)  # both of its writes hold their room
    try:
        assert tier.put_many([(C, blocks[C])]) == 0
    finally:
        release.set()
        first.join(10)
    assert tier.stats()["rejected"] == 1
    assert _names(tier) == ["A", "B"] and tier.used_bytes() == disk_usage(disk_dir) == 2 * BLOCK
    for key in (A, B):
        assert_same_kv(_read(tier, layout, key), blocks[key])


def test_rescan_places_a_block_touched_elsewhere_by_its_mtime(open_tier, disk_dir, layout, blocks):
    tier = open_tier(3 * BLOCK, rescan_seconds=0)
    for key in (A, B, C):
        tier.put_many([(key, blocks[key])])
    set_mtime(disk_dir, A, 4_000_000_000)  # another process read A long after everything else
    assert tier.put_many([(D, blocks[D])]) == 1
    assert _names(tier) == ["C", "A", "D"]  # B, the oldest of this process's own order, went
    assert not os.path.exists(block_path(disk_dir, B))


@pytest.mark.parametrize("scans", ["cheap", "costly"])
def test_a_full_tier_rescans_only_while_scans_take_a_small_share_of_the_time(open_tier, disk_dir, layout, blocks,
                                                                              scans):
    """Another process wrote E long ago. Over capacity, a tier whose scans are cheap learns of E and evicts it
    first; one whose last scan took longer than the time since (a huge shared directory) evicts from its own
    index without scanning again, until ``rescan_seconds`` pass."""
    writer, tier = open_tier(4 * BLOCK, rescan_seconds=0), open_tier(3 * BLOCK, rescan_seconds=3600)
    for key in (A, B, C):
        tier.put_many([(key, blocks[key])])
    writer.put_many([(E, blocks[E])])
    set_mtime(disk_dir, E, 1000)
    tier._scan_seconds = 0.0 if scans == "cheap" else 3600.0  # what its last scan cost (seconds)
    assert tier.put_many([(D, blocks[D])]) == 1
    assert _names(tier) == ["B", "C", "D"] and not os.path.exists(block_path(disk_dir, A))
    # cheap: E and A went (E the oldest); costly: E stays, unknown, until the next timed rescan
    assert os.path.exists(block_path(disk_dir, E)) == (scans == "costly")


def test_own_order_is_exact_when_mtimes_tie(open_tier, disk_dir, layout, blocks, monkeypatch):
    # A filesystem with a coarse clock: every file this process writes or touches reads back the same mtime.
    tick = 1_700_000_000 * SECOND
    real_fstat = os.fstat

    def coarse_fstat(fd):
        st = real_fstat(fd)
        return SimpleNamespace(st_size=st.st_size, st_mtime_ns=tick, st_nlink=st.st_nlink, st_dev=st.st_dev,
                               st_ino=st.st_ino, st_mode=st.st_mode)

    tier = open_tier(3 * BLOCK, rescan_seconds=0)
    with monkeypatch.context() as patch:
        patch.setattr(files_module.os, "fstat", coarse_fstat)
        for key in (C, B, A):  # put in the reverse of key order
            tier.put_many([(key, blocks[key])])
            os.utime(block_path(disk_dir, key), ns=(tick, tick))
        assert_same_kv(_read(tier, layout, C), blocks[C])
        os.utime(block_path(disk_dir, C), ns=(tick, tick))
        assert tier.put_many([(D, blocks[D])]) == 1  # rescans: all three files still show the tick
    assert _names(tier) == ["A", "C", "D"]  # B was least recently used here, whatever the key order
    assert not os.path.exists(block_path(disk_dir, B))


def test_block_evicted_during_read_is_returned_and_forgotten(open_tier, disk_dir, layout, blocks, monkeypatch):
    tier = open_tier()
    tier.put_many([(A, blocks[A]), (B, blocks[B])])
    real_preadv = os.preadv

    def evicted_meanwhile(fd, buffers, offset):  # another process unlinks the file after our open
        if os.path.exists(block_path(disk_dir, A)):
            os.unlink(block_path(disk_dir, A))
        return real_preadv(fd, buffers, offset)

    with monkeypatch.context() as patch:
        patch.setattr(files_module.os, "preadv", evicted_meanwhile)
        got = _read(tier, layout, A)
    assert_same_kv(got, blocks[A])  # POSIX kept the open file readable: sound data, a hit
    assert not tier.contains(A) and _names(tier) == ["B"] and tier.used_bytes() == BLOCK
    assert tier.stats()["hits"] == 1 and tier.stats()["corrupt"] == 0


def test_changes_made_during_a_rescan_are_kept(open_tier, disk_dir, layout, blocks):
    tier = open_tier(5 * BLOCK, rescan_seconds=0)
    for key in (A, B, C):
        tier.put_many([(key, blocks[key])])
    real_scan = tier._scan

    def scan_racing_this_process(clean_temps):
        found = real_scan(clean_temps)  # the directory as it was ...
        open_tier(5 * BLOCK, path=disk_dir).put_many([(D, blocks[D])])  # ... then D is written elsewhere,
        assert tier.contains(D)  # learned here by a stat,
        assert_same_kv(_read(tier, layout, A), blocks[A])  # A is read (touched)
        assert tier.delete(B)  # and B deleted, all before the scan is merged
        return found

    tier._scan = scan_racing_this_process
    assert tier.put_many([(E, blocks[E])]) == 1
    del tier._scan
    assert _names(tier) == ["C", "D", "A", "E"]
    assert tier.used_bytes() == disk_usage(disk_dir) == 4 * BLOCK


def test_hit_touches_mtime_and_misses_do_not(open_tier, disk_dir, layout, blocks):
    tier = open_tier()
    tier.put_many([(A, blocks[A])])
    set_mtime(disk_dir, A, 1000)
    assert _read(tier, layout, A, 8) is None  # another token count: a plain miss
    assert os.stat(block_path(disk_dir, A)).st_mtime_ns == 1000 * SECOND
    assert_same_kv(_read(tier, layout, A), blocks[A])
    assert os.stat(block_path(disk_dir, A)).st_mtime_ns > 1_600_000_000 * SECOND


def test_a_full_tier_evicts_what_each_batch_writes_and_overwrites_every_file_it_evicts(open_tier, disk_dir, layout):
    """Evicting down to the low-water mark (18 of 20 blocks here) for a put of one block left files to unlink
    and room the next put filled with new files; a batch evicts for its own blocks only, at most down to
    the low-water mark a round, and overwrites each file it evicts."""
    tier = open_tier(20 * BLOCK)
    keys = [i.to_bytes(32, "little") for i in range(36)]
    for i, key in enumerate(keys[:20]):
        tier.put_many([(key, make_kv(layout, 16, seed=i))])
    assert tier.stats()["evictions"] == 0
    written = 20
    for batch in (1, 5, 10):  # one block; a batch within the low-water gap; one larger than it
        tier.put_many([(key, make_kv(layout, 16, seed=i)) for i, key in enumerate(keys[written:written + batch],
                                                                                   start=written)])
        written += batch
        assert list(tier.keys()) == keys[written - 20:written]  # least recently used evicted first, in order
        assert tier.stats()["evictions"] == tier.stats()["recycled"] == written - 20
        assert disk_usage(disk_dir) == tier.used_bytes() == 20 * BLOCK


def test_capacity_never_exceeded(open_tier, disk_dir, layout):
    capacity = 5 * BLOCK + 1000
    tier = open_tier(capacity)
    sizes: dict[bytes, int] = {}
    for i in range(60):
        tokens = 16 if i % 3 else 1 + i % 16
        key = i.to_bytes(32, "little")
        assert tier.put_many([(key, make_kv(layout, tokens, seed=i))]) == 1
        sizes[key] = tokens * 256 + HEADER_BYTES
        assert tier.used_bytes() == sum(sizes[k] for k in tier.keys()) == disk_usage(disk_dir) <= capacity
        assert list(tier.keys())[-1] == key
    assert tier.stats()["evictions"] == 60 - tier.stats()["blocks"]
    for key in tier.keys():
        i = int.from_bytes(key, "little")
        tokens = 16 if i % 3 else 1 + i % 16
        assert_same_kv(_read(tier, layout, key, tokens), make_kv(layout, tokens, seed=i))


# -- sharing a directory ---------------------------------------------------------------------------------


def test_two_tiers_on_one_directory(open_tier, disk_dir, layout):
    capacity = 6 * BLOCK
    first, second = open_tier(capacity, rescan_seconds=0), open_tier(capacity, rescan_seconds=0)
    kv = {i: make_kv(layout, 16, seed=i) for i in range(24)}
    key = {i: hashlib.sha256(b"%d" % i).digest() for i in range(24)}
    first.put_many([(key[0], kv[0])])
    assert key[0] not in list(second.keys()) and second.contains(key[0])  # found by a stat of its path
    assert_same_kv(_read(second, layout, key[0]), kv[0])
    set_mtime(disk_dir, key[0], 1000)  # explicit access times: no ties within the clock's resolution
    for i in range(1, 24):
        (first if i % 2 else second).put_many([(key[i], kv[i])])
        set_mtime(disk_dir, key[i], 1000 + i)
        assert disk_usage(disk_dir) <= capacity
        assert first.used_bytes() <= capacity and second.used_bytes() <= capacity
    on_disk = {bytes.fromhex(os.path.basename(p)[:-4]) for p in all_files(disk_dir)}
    assert on_disk == {key[i] for i in range(18, 24)}  # the oldest went, whoever wrote them
    for tier in (first, second):
        for i in range(18, 24):
            assert_same_kv(_read(tier, layout, key[i]), kv[i])
    assert second.delete(key[23])
    assert _read(first, layout, key[23]) is None  # vanished under first: a plain miss
    assert not first.contains(key[23])
    assert first.stats()["corrupt"] == second.stats()["corrupt"] == 0
    first.put_many([(key[0], kv[0])])  # rescans: learns exactly what is on disk
    assert first.used_bytes() == disk_usage(disk_dir) == 6 * BLOCK


def test_stale_temp_files_removed_on_open(disk_dir, open_tier, layout):
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())
    scope = f"{host}.pidns{os.stat('/proc/self/ns/pid').st_ino}"  # this host and PID namespace
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(done.stdout)
    folder = disk_dir / "41" / "41"
    folder.mkdir(parents=True)
    names = {
        "dead": f".{'41' * 32}~{scope}~{dead_pid}~aaaa.tmp",
        "old": f".{'41' * 32}~elsewhere~123~bbbb.tmp",
        "live": f".{'41' * 32}~{scope}~{os.getpid()}~cccc.tmp",
        # a live writer's parked file keeps its evicted block's old time: removed, it failed the writer's rename
        "live-old": f".{'41' * 32}~{scope}~{os.getpid()}~gggg.tmp",
        "fresh-elsewhere": f".{'41' * 32}~elsewhere~123~dddd.tmp",
        # a container of this node (its hostname) in its own PID namespace: its pid means nothing here
        "other-namespace": f".{'41' * 32}~{host}.pidns1~{dead_pid}~eeee.tmp",
        "hostname-only": f".{'41' * 32}~{host}~{dead_pid}~ffff.tmp",  # an older kvstore's name: no namespace
    }
    for name in names.values():
        (folder / name).write_bytes(b"partial")
    os.utime(folder / names["old"], ns=(1000 * SECOND, 1000 * SECOND))
    an_hour_ago = time.time_ns() - 3600 * SECOND  # past stale_temp_seconds, and its writer alive
    os.utime(folder / names["live-old"], ns=(an_hour_ago, an_hour_ago))
    tier = open_tier(stale_temp_seconds=300)
    assert tier.stats()["temp_removed"] == 2
    assert sorted(os.listdir(folder)) == sorted([names["live"], names["live-old"], names["fresh-elsewhere"],
                                                 names["other-namespace"], names["hostname-only"]])
    assert tier.stats()["blocks"] == 0 and tier.used_bytes() == 0


# -- damaged blocks --------------------------------------------------------------------------------------


def _damage(path: str, how: str, disk_dir, layout, blocks) -> None:
    data = bytearray(open(path, "rb").read())
    if how == "payload-bit":
        data[HEADER_BYTES + 2000] ^= 0x10
    elif how == "header-byte":
        data[1] ^= 0x01  # magic
    elif how == "checksum-byte":
        data[HEADER_BYTES - 1] ^= 0x01
    elif how == "truncated":
        data = data[:-100]
    elif how == "too-long":
        data += b"\0"
    elif how == "empty":
        data = bytearray()
    elif how == "other-key":  # B's intact block renamed onto A's path
        FilesTier(disk_dir / "other", BLOCK, layout, sync=False).put_many([(B, blocks[B])])
        data = bytearray(open(block_path(disk_dir / "other", B), "rb").read())
    elif how == "other-layout":
        lay = tiny_layout(head_dim=8, block_tokens=32)  # 4096 bytes too, another fingerprint
        FilesTier(disk_dir / "other", BLOCK, lay, sync=False).put_many([(A, make_kv(lay, 32))])
        data = bytearray(open(block_path(disk_dir / "other", A), "rb").read())
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("o_direct", [False, True])
@pytest.mark.parametrize("how", ["payload-bit", "header-byte", "checksum-byte", "truncated", "too-long", "empty",
                                 "other-key", "other-layout"])
def test_damaged_file_is_a_counted_miss_and_deleted(open_tier, disk_dir, layout, blocks, how, o_direct):
    if o_direct and not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    tier = open_tier(path=disk_dir / "tier", o_direct=o_direct)
    tier.put_many([(A, blocks[A]), (C, blocks[C])])
    path = block_path(disk_dir / "tier", A)
    _damage(path, how, disk_dir, layout, blocks)
    assert tier.contains(A)
    assert _read(tier, layout, A) is None  # no exception, no wrong data
    stats = tier.stats()
    assert (stats["corrupt"], stats["misses"], stats["hits"]) == (1, 1, 0)
    assert not os.path.exists(path) and not tier.contains(A)
    assert stats["used_bytes"] == BLOCK and stats["blocks"] == 1
    assert tier.put_many([(A, blocks[A])]) == 1  # stored again
    assert_same_kv(_read(tier, layout, A), blocks[A])
    assert_same_kv(_read(tier, layout, C), blocks[C])


def test_damaged_file_replaced_meanwhile_is_kept(open_tier, disk_dir, layout, blocks):
    tier = open_tier()
    tier.put_many([(A, blocks[A])])
    path = block_path(disk_dir, A)
    intact = open(path, "rb").read()
    _damage(path, "payload-bit", disk_dir, layout, blocks)
    real_judge = tier._read_raw

    def judge_then_writer_renames_a_good_copy(*args):
        verdict = real_judge(*args)
        with open(path + ".new", "wb") as f:
            f.write(intact)
        os.rename(path + ".new", path)
        return verdict

    tier._read_raw = judge_then_writer_renames_a_good_copy
    assert _read(tier, layout, A) is None and tier.stats()["corrupt"] == 1
    del tier._read_raw
    assert open(path, "rb").read() == intact  # only the damaged inode was to be deleted
    assert_same_kv(_read(tier, layout, A), blocks[A])


def test_other_token_count_is_a_plain_miss(open_tier, disk_dir, layout):
    tier = open_tier()
    partial = make_kv(layout, 5, seed=3)
    tier.put_many([(C, partial)])
    assert _read(tier, layout, C) is None
    assert _read(tier, layout, C, 4) is None
    assert tier.stats()["corrupt"] == 0 and tier.contains(C) and os.path.exists(block_path(disk_dir, C))
    assert_same_kv(_read(tier, layout, C, 5), partial)


def test_vanished_file_is_a_plain_miss(open_tier, disk_dir, layout, blocks):
    tier = open_tier()
    tier.put_many([(A, blocks[A]), (B, blocks[B])])
    os.unlink(block_path(disk_dir, A))
    assert tier.contains(A)  # the index does not know yet ...
    assert _read(tier, layout, A) is None  # ... the read finds out
    stats = tier.stats()
    assert (stats["misses"], stats["corrupt"], stats["blocks"], stats["used_bytes"]) == (1, 0, 1, BLOCK)
    assert not tier.contains(A)


def test_other_os_errors_propagate(open_tier, disk_dir, layout, blocks):
    tier = open_tier()
    tier.put_many([(A, blocks[A])])
    path = block_path(disk_dir, A)
    os.unlink(path)
    os.mkdir(path)  # not a block file: a counted miss, and never removed
    assert not tier.get_into(A, torch.zeros(layout.block_shape, dtype=layout.dtype))
    assert tier.stats()["corrupt"] == 1 and os.path.isdir(path)


# -- O_DIRECT --------------------------------------------------------------------------------------------

needs_o_direct = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")


@needs_o_direct
def test_o_direct_round_trip(open_tier, disk_dir, layout, blocks):
    tier = open_tier(o_direct=True, sync=True)
    partial = make_kv(layout, 3, seed=5)
    assert tier.put_many([(A, blocks[A]), (C, partial)]) == 2
    assert os.path.getsize(block_path(disk_dir, C)) == HEADER_BYTES + 3 * 256  # padding cut off
    buffered = open_tier(path=disk_dir)
    assert_same_kv(_read(buffered, layout, C, 3), partial)
    assert_same_kv(_read(tier, layout, A), blocks[A])
    wide = torch.zeros(layout.shape(20), dtype=layout.dtype)
    assert tier.get_into(C, wide[:, :, 2:5])
    assert_same_kv(wide[:, :, 2:5], partial)
    assert _read(tier, layout, C) is None and tier.stats()["corrupt"] == 0
    assert all(not p.endswith(".tmp") for p in all_files(disk_dir))


@needs_o_direct
def test_o_direct_refused_falls_back_to_buffered(open_tier, disk_dir, layout, blocks, monkeypatch):
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):  # what tmpfs did before Linux 6.6
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    tier = open_tier(o_direct=True)
    os.makedirs(os.path.dirname(block_path(disk_dir, A)))  # so the refused open is the only failure
    monkeypatch.setattr(files_module.os, "open", refusing_open)
    assert tier.put_many([(A, blocks[A])]) == 1
    assert_same_kv(_read(tier, layout, A), blocks[A])
    assert tier.stats()["o_direct_fallbacks"] == 2  # one write, one read
    monkeypatch.undo()
    assert_same_kv(_read(tier, layout, A), blocks[A])
    assert tier.stats()["o_direct_fallbacks"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_round_trip(open_tier, layout, blocks):
    tier = open_tier()
    assert tier.put_many([(A, blocks[A].cuda())]) == 1
    out = torch.zeros(layout.block_shape, dtype=layout.dtype, device="cuda")
    assert tier.get_into(A, out)  # through the scratch buffer, then one copy to the device
    assert_same_kv(out.cpu(), blocks[A])


# -- concurrency -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity_blocks", [12, 2])
def test_threads_share_one_tier(open_tier, disk_dir, layout, capacity_blocks):
    """Four threads put and read at once; with room for two blocks, each finds the room held by the others'
    writes in flight now and then: the capacity holds throughout, and every block is written or rejected."""
    tier = open_tier(capacity_blocks * BLOCK, io_threads=4)
    errors: list[BaseException] = []
    used: list[int] = []

    def work(t: int) -> None:
        try:
            for i in range(20):
                seed = 100 * t + i
                key = seed.to_bytes(32, "big")
                tier.put_many([(key, make_kv(layout, 16, seed=seed))])
                used.append(tier.used_bytes())
                got = _read(tier, layout, key)
                if got is not None:
                    assert_same_kv(got, make_kv(layout, 16, seed=seed))
        except BaseException as exc:  # reported below
            errors.append(exc)

    run_threads(work, 4)
    assert errors == []
    assert max(used) <= capacity_blocks * BLOCK and tier.stats()["corrupt"] == 0
    assert tier.stats()["blocks_written"] + tier.stats()["rejected"] == 80
    assert sorted(tier.keys()) == sorted(bytes.fromhex(os.path.basename(p)[:-4]) for p in all_files(disk_dir))
    assert tier.used_bytes() == disk_usage(disk_dir) <= capacity_blocks * BLOCK


CHILD = r"""
import hashlib, sys, time
import torch
from conftest import as_bytes, make_kv, tiny_layout
from kvstore.tiers.files import FilesTier
from kvstore import KVStore, StoreConfig

def key_of(seed):
    return hashlib.sha256(b"block %d" % seed).digest()

def tokens_of(seed):
    return 16 if seed % 5 else 1 + seed % 16

me, other, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
lay = tiny_layout()
tier = FilesTier(path, 1 << 20, lay, sync=False, rescan_seconds=0.05)
mine = [1000 * me + i for i in range(40)]
shared = [9000 + i for i in range(20)]
for seed in [s for pair in zip(mine[:20], shared) for s in pair] + mine[20:]:
    assert tier.put_many([(key_of(seed), make_kv(lay, tokens_of(seed), seed=seed))]) == 1
wanted = [1000 * other + i for i in range(40)] + shared
found = 0
deadline = time.monotonic() + 30
while wanted and time.monotonic() < deadline:
    seed = wanted[0]
    out = torch.zeros(lay.shape(tokens_of(seed)), dtype=lay.dtype)
    if tier.get_into(key_of(seed), out):
        assert as_bytes(out) == as_bytes(make_kv(lay, tokens_of(seed), seed=seed)), seed
        found += 1
        wanted.pop(0)
    else:
        time.sleep(0.01)
assert tier.stats()["corrupt"] == 0, tier.stats()
print("verified", found)
"""


def test_two_processes_write_and_read_one_directory(disk_dir, layout):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(me), str(1 - me), str(disk_dir)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                 cwd=str(TESTS_DIR)) for me in (0, 1)]
    results = []
    for child in children:
        try:
            stdout, stderr = child.communicate(timeout=90)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        results.append((child.returncode, stdout, stderr))
    for code, stdout, stderr in results:
        assert code == 0, stderr
        assert stdout.strip() == "verified 60"
    seeds = [1000 * me + i for me in (0, 1) for i in range(40)] + [9000 + i for i in range(20)]
    by_key = {hashlib.sha256(b"block %d" % seed).digest(): seed for seed in seeds}
    paths = all_files(disk_dir)
    assert len(paths) == 100 and all(p.endswith(".kvb") for p in paths)
    for path in paths:
        key = bytes.fromhex(os.path.basename(path)[:-4])
        seed = by_key[key]
        payload = as_bytes(make_kv(layout, 16 if seed % 5 else 1 + seed % 16, seed=seed))
        data = open(path, "rb").read()
        assert data == BlockHeader.for_payload(key, layout.fingerprint, payload).pack() + payload


# -- a batch written by several threads ------------------------------------------------------------------


def _recording_pwritev(monkeypatch, meet: int = 0, fail_key: bytes | None = None):
    """Patch the tier's pwritev: record each write's thread; the first ``meet`` writes wait for each other
    (they can only pass together if they run at once); a write of ``fail_key``'s temp file fails with ENOSPC."""
    threads, barrier, real = [], threading.Barrier(meet, timeout=10) if meet else None, os.pwritev

    def pwritev(fd, buffers, offset):
        threads.append(threading.current_thread().name)
        if barrier is not None and len(threads) <= meet:
            barrier.wait()
        if fail_key is not None and f".{fail_key.hex()}~" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, buffers, offset)

    monkeypatch.setattr(files_module.os, "pwritev", pwritev)
    return threads


def test_a_batch_is_written_by_several_threads_at_once(open_tier, disk_dir, layout, blocks, monkeypatch):
    tier = open_tier(10 * BLOCK, io_threads=4)
    threads = _recording_pwritev(monkeypatch, meet=2)  # deadlocks (BrokenBarrierError) if written one by one
    assert tier.put_many(list(blocks.items())) == 5
    assert len(threads) == 5 and all(name.startswith("kvstore-files-write") for name in threads)
    assert _names(tier) == ["A", "B", "C", "D", "E"]  # indexed in the batch's order, whoever finished first
    for key, kv in blocks.items():
        assert_same_kv(_read(tier, layout, key), kv)
    assert tier.used_bytes() == disk_usage(disk_dir) == 5 * BLOCK
    assert tier.stats()["blocks_written"] == 5


def test_one_write_thread_writes_in_the_callers_thread(open_tier, layout, blocks, monkeypatch):
    tier = open_tier(10 * BLOCK, io_threads=1)
    threads = _recording_pwritev(monkeypatch)
    assert tier.put_many(list(blocks.items())) == 5
    assert threads == [threading.current_thread().name] * 5


@pytest.mark.parametrize("io_threads", [1, 4])
def test_a_batch_larger_than_the_tier_keeps_its_leading_blocks(open_tier, disk_dir, layout, blocks, io_threads):
    """It evicted its own leading blocks for its trailing ones, and kept only blocks no lookup reaches."""
    tier = open_tier(3 * BLOCK, io_threads=io_threads)
    tier.put_many([(A, blocks[A])])
    assert tier.put_many([(key, blocks[key]) for key in (B, C, D, E)]) == 3  # E rejected, A evicted
    assert _names(tier) == ["B", "C", "D"] and disk_usage(disk_dir) == tier.used_bytes() == 3 * BLOCK
    stats = tier.stats()
    assert (stats["evictions"], stats["rejected"]) == (1, 1)
    for key in (B, C, D):
        assert_same_kv(_read(tier, layout, key), blocks[key])


@pytest.mark.parametrize("io_threads", [1, 4])
def test_a_batch_never_evicts_its_own_blocks_found_stored(open_tier, disk_dir, layout, blocks, io_threads):
    """Blocks of a batch stored already (by another process, or an earlier put) were skipped but stayed the
    oldest here: the batch's new blocks evicted them, leaving blocks after a hole no lookup reaches."""
    tier = open_tier(3 * BLOCK, io_threads=io_threads)
    tier.put_many([(A, blocks[A]), (B, blocks[B])])
    tier.put_many([(C, blocks[C])])
    assert tier.put_many([(key, blocks[key]) for key in (A, B, D, E)]) == 3  # C evicted, E rejected
    assert _names(tier) == ["A", "B", "D"] and disk_usage(disk_dir) == tier.used_bytes() == 3 * BLOCK
    tier.put_many([(E, blocks[E])])  # the batch touched A and B in its order: A is the oldest now
    assert _names(tier) == ["B", "D", "E"]


def test_touch_chain_makes_the_head_the_most_recently_accessed(open_tier, blocks):
    tier = open_tier(3 * BLOCK)
    tier.put_many([(key, blocks[key]) for key in (A, B, C)])
    tier.touch_chain([A, B, D])  # D is not held: passed over
    assert _names(tier) == ["C", "B", "A"]
    tier.put_many([(E, blocks[E])])
    assert _names(tier) == ["B", "A", "E"]


def test_a_write_failing_in_a_batch_raises_after_the_others_are_stored(open_tier, disk_dir, layout, blocks,
                                                                        monkeypatch):
    tier = open_tier(10 * BLOCK, io_threads=4)
    _recording_pwritev(monkeypatch, fail_key=C)
    with pytest.raises(OSError) as raised:
        tier.put_many(list(blocks.items()))
    assert raised.value.errno == errno.ENOSPC
    assert C not in set(tier.keys()) and not os.path.exists(block_path(disk_dir, C))
    stored = set(tier.keys())
    assert {A, B} <= stored  # written before the failure was seen; the rest as far as they got
    for key in stored:
        assert_same_kv(_read(tier, layout, key), blocks[key])
    assert all(path.endswith(".kvb") for path in all_files(disk_dir))  # no temp file left behind
    assert tier.used_bytes() == disk_usage(disk_dir)
    monkeypatch.undo()
    assert tier.put_many(list(blocks.items())) == 5  # the disk has room again: the rest is stored


def test_a_squatted_path_in_a_batch_rejects_that_block_only(open_tier, disk_dir, layout, blocks):
    tier = open_tier(10 * BLOCK, io_threads=4)
    os.makedirs(block_path(disk_dir, B))  # a directory where B's file would go
    assert tier.put_many(list(blocks.items())) == 4
    assert _names(tier) == ["A", "C", "D", "E"] and tier.stats()["rejected"] == 1
    assert tier.used_bytes() == disk_usage(disk_dir) == 4 * BLOCK


def test_the_same_key_twice_in_a_batch_is_written_once(open_tier, disk_dir, layout, blocks):
    tier = open_tier(10 * BLOCK, io_threads=4)
    assert tier.put_many([(A, blocks[A]), (A, blocks[A]), (B, blocks[B])]) == 3  # counts items held
    assert tier.stats()["blocks_written"] == 2 and disk_usage(disk_dir) == 2 * BLOCK


def test_io_threads_must_be_a_positive_integer(disk_dir, layout):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            FilesTier(disk_dir, 10 * BLOCK, layout, io_threads=bad)


# -- a large block read in parts side by side --------------------------------------------------------------

BIG = tiny_layout(num_layers=8, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, block_tokens=256)  # 8 MiB


@pytest.fixture
def four_cores(monkeypatch):
    """Reads split a large block into one part per core, up to io_threads: make it four parts here."""
    monkeypatch.setattr(files_module.os, "cpu_count", lambda: 4)


@pytest.mark.parametrize("io_threads", [1, 2, 4])
def test_a_large_block_read_in_parts_is_exact(open_tier, disk_dir, four_cores, io_threads):
    assert BIG.block_bytes >= files_module._SPLIT_READ_BYTES
    tier = open_tier(4 * (BIG.block_bytes + HEADER_BYTES), lay=BIG, io_threads=io_threads)
    kv = make_kv(BIG, 3 * 256, seed=3)
    blocks = {key: kv[:, :, i * 256:(i + 1) * 256] for i, key in enumerate((A, B, C))}  # strided slices
    assert tier.put_many(list(blocks.items())) == 3
    out = torch.zeros(BIG.shape(3 * 256), dtype=BIG.dtype)
    for i, key in enumerate((A, B, C)):
        assert tier.get_into(key, out[:, :, i * 256:(i + 1) * 256])
    assert_same_kv(out, kv)
    assert tier.stats()["hits"] == 3 and tier.stats()["corrupt"] == 0


@pytest.mark.parametrize("damage", ["first-part", "last-part", "truncated", "one-byte-longer"])
def test_damage_anywhere_in_a_large_block_read_in_parts_is_a_miss(open_tier, disk_dir, four_cores, damage):
    tier = open_tier(4 * (BIG.block_bytes + HEADER_BYTES), lay=BIG, io_threads=4)
    kv = make_kv(BIG, 256, seed=4)
    assert tier.put_many([(A, kv)]) == 1
    path = block_path(disk_dir, A)
    data = bytearray(open(path, "rb").read())
    if damage == "first-part":
        data[HEADER_BYTES + 10] ^= 0x01
    elif damage == "last-part":
        data[-10] ^= 0x01
    elif damage == "truncated":
        data = data[:-4096]
    else:
        data += b"\0"
    open(path, "wb").write(data)
    out = torch.zeros(BIG.shape(256), dtype=BIG.dtype)
    assert not tier.get_into(A, out)
    assert tier.stats()["corrupt"] == 1 and not os.path.exists(path) and not tier.contains(A)


def test_a_damaged_large_block_ends_the_read_and_nothing_after_it_holds_other_bytes(tmp_path, four_cores):
    config = StoreConfig(host_bytes=0, files_dir=str(tmp_path / "files"), files_sync=False, slow_factor=1e9)
    tokens, kv = list(range(3 * 256)), make_kv(BIG, 3 * 256, seed=5)
    with KVStore(BIG, config) as store:
        assert store.put(tokens, kv) == 3
        keys = [ref.key for ref in store.block_keys(tokens)]
    path = block_path(tmp_path / "files", keys[1])
    data = bytearray(open(path, "rb").read())
    data[-100] ^= 0x01  # in the part another thread reads
    open(path, "wb").write(data)
    with KVStore(BIG, config) as store:
        out = torch.full(BIG.shape(3 * 256), 7.0, dtype=BIG.dtype)
        assert store.get_into(tokens, out) == 256
        assert_same_kv(out[:, :, :256], kv[:, :, :256])
        after = out[:, :, 512:]  # read side by side with the damaged block, or not read at all
        assert torch.equal(after, torch.full_like(after, 7.0)) or torch.equal(after, kv[:, :, 512:])
        assert store.stats()["tiers"]["files"]["corrupt"] == 1


def test_a_long_lived_tier_removes_what_dead_writers_left_at_its_periodic_scan(open_tier, disk_dir, layout, blocks):
    """A writer killed mid-write leaves its temp file; a process that keeps the directory open for days
    removed such files only at open, and they grew the directory past its capacity."""
    host = fileio.process_scope()
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True).stdout)
    tier = open_tier(10 * BLOCK, rescan_seconds=0)
    folder = disk_dir / "41"
    folder.mkdir(exist_ok=True)
    left = folder / f".{'41' * 32}~{host}~{dead_pid}~aaaa.tmp"
    left.write_bytes(b"partial")
    tier.put_many([(A, blocks[A])])  # a put past rescan_seconds scans the directory
    assert not left.exists() and tier.stats()["temp_removed"] == 1
    assert_same_kv(_read(tier, layout, A), blocks[A])


def test_a_periodic_scan_that_takes_long_runs_behind_the_write_due_it(open_tier, disk_dir, layout, blocks):
    """50,000 files took 2.4 s to scan, inside the write that was due the scan: the write-behind queue filled
    and the engine's puts waited for it. A costly scan now runs on a pool thread, one at a time."""
    tier = open_tier(10 * BLOCK, rescan_seconds=0, io_threads=2)
    real_scan, started, release, scans = tier._scan, threading.Event(), threading.Event(), []

    def slow_scan(clean_temps):
        scans.append(clean_temps)
        started.set()
        assert release.wait(30)
        return real_scan(clean_temps)

    tier._scan = slow_scan
    tier._scan_seconds, tier._last_scan = 1.0, time.monotonic() - 60  # the last scan was long, long ago
    assert tier.put_many([(A, blocks[A])]) == 1  # returns while the scan waits
    assert started.wait(10)
    assert tier.put_many([(B, blocks[B])]) == 1  # a second write queues no second scan
    release.set()
    deadline = time.monotonic() + 10
    while tier._scan_queued_by and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tier._scan_queued_by == 0 and tier._scan_seconds < 1.0  # the scan ran, and took this long
    assert scans == [True]  # once, and it removed what dead writers left
    assert _names(tier) == ["A", "B"]
    for key in (A, B):
        assert_same_kv(_read(tier, layout, key), blocks[key])


def test_a_scan_under_way_re_indexes_no_block_an_eviction_is_removing(open_tier, disk_dir, layout, blocks,
                                                                       monkeypatch):
    """A background scan that began after an eviction picked its victims, but before it removed their files,
    indexed a victim again from its file: a ghost entry, counted in the bytes used (over capacity)."""
    tier = open_tier(4 * BLOCK, io_threads=2, rescan_seconds=1000)
    assert tier.put_many([(key, blocks[key]) for key in (A, B, C, D)]) == 4
    picked, go = threading.Event(), threading.Event()
    real_unlink, real_park = files_module.unlink_file, files_module.ParkedFiles.park

    def held_unlink(path):
        picked.set()
        assert go.wait(10)
        return real_unlink(path)

    def held_park(self, path, temp, size):
        picked.set()
        assert go.wait(10)
        return real_park(self, path, temp, size)

    monkeypatch.setattr(files_module, "unlink_file", held_unlink)
    monkeypatch.setattr(files_module.ParkedFiles, "park", held_park)
    writer = threading.Thread(target=tier.put_many, args=([(E, blocks[E])],))
    writer.start()
    assert picked.wait(10)  # the victim is out of the index, its file still there
    tier._scan_behind()  # the periodic scan, on a pool thread, runs meanwhile
    deadline = time.monotonic() + 10
    while tier._scan_queued_by and time.monotonic() < deadline:
        time.sleep(0.01)
    go.set()
    writer.join(10)
    assert len(_names(tier)) == 4 and tier.used_bytes() == disk_usage(disk_dir) == 4 * BLOCK


def test_a_child_forked_during_a_background_scan_scans_for_itself(open_tier, disk_dir, layout, blocks):
    """The scan's lock, held by the parent's pool thread at the fork, was held for ever in the child: every scan
    of the child was skipped, and it never learned what other processes wrote."""
    tier = open_tier(10 * BLOCK, io_threads=2, rescan_seconds=0)
    real_scan, scanning, release = tier._scan, threading.Event(), threading.Event()

    def slow_scan(clean_temps):
        scanning.set()
        release.wait(10)
        return real_scan(clean_temps)

    tier._scan = slow_scan
    tier._scan_seconds, tier._last_scan = 1.0, time.monotonic() - 60
    tier.put_many([(A, blocks[A])])  # queues the periodic scan behind it
    assert scanning.wait(10)
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 if its own scan learns of B, written by another process
        try:
            tier._scan = real_scan
            other = FilesTier(disk_dir, 10 * BLOCK, layout, sync=False)
            other.put_many([(B, blocks[B])])
            other.close()
            tier._rescan_unless_scanning(clean_temps=True)
            os._exit(0 if B in tier._index else 1)
        except BaseException:
            os._exit(2)
    release.set()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_an_index_entry_another_process_evicted_is_not_promised(disk_dir, open_tier, layout, blocks, monkeypatch):
    """Process A indexed its blocks; B, sharing the directory with a smaller capacity, evicted them. A's
    ``contains`` trusted its index: lookup promised the blocks, get found none, and a put deduplicated
    against them, so the prompt came back one block a request. An entry not seen for ``_VERIFY_SECONDS``
    is looked at again."""
    monkeypatch.setattr(files_module, "_VERIFY_SECONDS", 0.0)
    a = open_tier(8 * BLOCK)
    assert a.put_many([(A, blocks[A]), (B, blocks[B]), (C, blocks[C])]) == 3
    b = open_tier(BLOCK)  # opening brings the directory within its capacity: two of A's files go
    there = [os.path.exists(block_path(disk_dir, key)) for key in (A, B, C)]
    assert sum(there) == 1
    assert [a.contains(key) for key in (A, B, C)] == there
    assert a.stats()["blocks"] == 1 and a.used_bytes() == BLOCK
    gone = [key for key, kept in zip((A, B, C), there) if not kept][0]
    assert a.put_many([(gone, blocks[gone])]) == 1  # stored again, not deduplicated against a gone file
    assert_same_kv(_read(a, layout, gone), blocks[gone])
    assert b.contains(gone)


def test_a_recently_seen_entry_is_trusted_without_a_look(disk_dir, open_tier, blocks, monkeypatch):
    tier = open_tier(8 * BLOCK)
    assert tier.put_many([(A, blocks[A])]) == 1
    looks = []
    real_lstat = os.lstat
    monkeypatch.setattr(files_module.os, "lstat", lambda path, *a, **k: looks.append(path) or real_lstat(path, *a, **k))
    assert all(tier.contains(A) for _ in range(100))
    assert looks == []  # a lookup of a prompt it just stored costs no system call a block


def test_touching_a_block_does_not_vouch_for_its_file(disk_dir, open_tier, blocks, monkeypatch):
    """A put of a prompt held elsewhere touches its blocks here (``touch_chain``), which counted as having
    seen their files: a file another process removed was promised for another second after each touch."""
    monkeypatch.setattr(files_module, "_VERIFY_SECONDS", 0.2)
    tier = open_tier(8 * BLOCK)
    assert tier.put_many([(A, blocks[A])]) == 1
    os.unlink(block_path(disk_dir, A))  # another process evicted it
    time.sleep(0.25)
    tier.touch_chain([A])
    assert not tier.contains(A)


# -- a chain's head outlives its tail across processes ------------------------------------------------------


def _chain(layout, n: int) -> list[tuple[bytes, torch.Tensor]]:
    return [(bytes([i + 1]) * 32, make_kv(layout, 16, seed=100 + i)) for i in range(n)]


def test_a_chain_written_then_reopened_smaller_keeps_its_leading_blocks(open_tier, disk_dir, layout):
    """File times are the directory's shared recency: a chain stamped in write order made its head the oldest,
    so a restart with a smaller ``files_bytes`` (or another process's eviction) kept only blocks no lookup
    reaches."""
    chain = _chain(layout, 10)
    assert open_tier(10 * BLOCK).put_many(chain) == 10
    again = open_tier(4 * BLOCK)
    assert sorted(again.keys()) == sorted(key for key, _ in chain[:4])
    for key, kv in chain[:4]:
        assert_same_kv(_read(again, layout, key), kv)


def test_a_chain_read_as_a_run_is_stamped_head_newest(open_tier, disk_dir, layout):
    chain = _chain(layout, 6)
    tier = open_tier(10 * BLOCK)
    tier.put_many(chain)
    for key, _ in chain:
        set_mtime(disk_dir, key, 1_000)  # read long after it was written
    outs = [torch.empty_like(kv) for _, kv in chain]
    assert tier.get_run_into([key for key, _ in chain], outs) == 6
    stamps = [os.stat(block_path(disk_dir, key)).st_mtime_ns for key, _ in chain]
    assert stamps == sorted(stamps, reverse=True) and len(set(stamps)) == 6 and stamps[-1] > 1_000 * SECOND
    other = open_tier(3 * BLOCK)  # another process's view, at a smaller capacity: the head's run is kept
    assert sorted(other.keys()) == sorted(key for key, _ in chain[:3])


@pytest.mark.parametrize("path", ["written behind", "written behind, the stamps kept near their bound", "read"])
def test_a_prompt_of_several_batches_keeps_its_head_newest_in_the_file_times(tmp_path, layout, path, monkeypatch):
    """Each batch (the write-behind's 16 blocks, a read's 64) was stamped head newest, but a later batch newer
    than the head's: a restart with less room kept blocks behind a missing head. The stamps kept to stamp a
    chain again are bounded: crossing the bound in the middle of a chain must not split it."""
    blocks = 80  # five write-behind batches, two read runs
    tokens, kv = make_tokens(blocks * 16), make_kv(layout, blocks * 16)
    files = str(tmp_path / "files")
    config = StoreConfig(host_bytes=1 << 20, files_dir=files, files_bytes=blocks * BLOCK, files_sync=False)
    with KVStore(layout, config) as store:
        if "bound" in path:
            monkeypatch.setattr(files_module, "_STAMPED_MOST", 100)
            store.files._stamped.update({bytes([1, i]) * 16: 0 for i in range(90)})  # older blocks' stamps
        store.put(tokens, kv)
        assert store.flush(60)
    if path == "read":
        for name in all_files(files):  # written long ago, in another order
            os.utime(name, ns=(1000 * SECOND, 1000 * SECOND))
        with KVStore(layout, dataclasses.replace(config, host_bytes=0)) as store:
            assert_same_kv(store.get(tokens), kv)
    smaller = dataclasses.replace(config, host_bytes=0, files_bytes=48 * BLOCK)
    with KVStore(layout, smaller) as store:  # restarted with less room: the tail goes first
        assert store.lookup(tokens) == 48 * 16
        assert_same_kv(store.get(tokens), kv[:, :, :48 * 16])
