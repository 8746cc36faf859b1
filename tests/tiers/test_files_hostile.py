"""FilesTier against a hostile shared directory: whatever sits at a block's path is a bounded, counted miss.

The directory is shared with other processes and machines, so nothing found
there is trusted: a FIFO, a directory, a symlink (to /dev/zero, to another
block's file), a device, a socket, a huge sparse file, an empty or truncated
file, another key's block. Each read of one is a miss counted ``corrupt``,
never an exception, never a hang, in memory bounded by the block size; only
regular files are ever deleted. A read-only directory still serves reads.
Everything here is real (FIFOs, sparse files, a read-only tmpfs mount, a
dropped effective uid); nothing is mocked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import pwd
import shutil
import socket
import stat
import tempfile
import threading

import pytest
import torch

from conftest import assert_same_kv, make_kv, mounted_tmpfs, remount, run_python, run_threads
from kvstore.blockformat import HEADER_BYTES, BlockHeader
from kvstore.compression.registry import get_codec
from kvstore.compression.quant import KiviCodec
from kvstore.tiers.files import FilesTier

from tierkit import A, B, C, D, E, block_path, files_tiers, make_blocks, read as _read

BLOCK = 4096 + HEADER_BYTES  # one full tiny-layout fp16 block on disk
SECOND = 1_000_000_000  # ns
MiB, GiB = 1 << 20, 1 << 30
READ_TIMEOUT = 10.0  # seconds a single get_into may take before it counts as blocked

# The three read paths: raw straight into the output, O_DIRECT through the bounce buffer, a codec's frame.
KINDS = ["raw", "o_direct", "zstd"]


def kind_options(kind: str) -> dict:
    if kind == "o_direct":
        if not hasattr(os, "O_DIRECT"):
            pytest.skip("no O_DIRECT on this platform")
        return {"o_direct": True}
    if kind == "zstd":
        return {"codec": get_codec("zstd")}
    return {}


@pytest.fixture
def blocks(layout):
    return make_blocks(layout)


@pytest.fixture
def open_tier(disk_dir, layout):
    """``open_tier(capacity, path=disk_dir, **options)``: a FilesTier (sync off) closed at teardown."""
    with files_tiers(disk_dir, layout, 10 * BLOCK) as factory:
        yield factory


def read_bounded(tier, key: bytes, out: torch.Tensor, path: str) -> bool:
    """``tier.get_into(key, out)`` in a thread; fails the test if it has not returned within READ_TIMEOUT."""
    result: dict = {}

    def run():
        try:
            result["hit"] = tier.get_into(key, out)
        except BaseException as exc:  # handed to the test thread below
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(READ_TIMEOUT)
    if thread.is_alive():
        with contextlib.suppress(OSError):  # release a reader stuck opening a FIFO, so it does not linger
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(READ_TIMEOUT)
        pytest.fail(f"get_into did not return within {READ_TIMEOUT}s: it blocked on what is at {path}")
    if "error" in result:
        raise result["error"]
    return result["hit"]


# -- what a hostile directory may hold at a block's path ----------------------------------------------------


def _replace(path: str, make) -> None:
    os.unlink(path)
    make(path)


def _huge_sparse(path: str) -> None:
    """1 GiB (sparse, no disk used) whose header is the real one, but claims the whole file as payload."""
    header = BlockHeader.unpack(open(path, "rb").read(HEADER_BYTES))
    forged = dataclasses.replace(header, length=GiB - HEADER_BYTES).pack()
    os.unlink(path)
    with open(path, "wb") as f:
        f.write(forged)
        f.truncate(GiB)


def _unix_socket(path: str) -> None:
    directory, name = os.path.split(path)
    here = os.getcwd()
    os.chdir(directory)  # a relative name: the full path is longer than sun_path allows
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(name)
    finally:
        os.chdir(here)


def _char_device(path: str) -> None:
    try:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # what /dev/zero is
    except PermissionError as exc:
        pytest.skip(f"cannot make a device node here ({exc})")


def make_hostile(how: str, path: str, other: str) -> None:
    """Put ``how`` at block file ``path`` (which holds a valid block now); ``other`` is another block's file."""
    data = open(path, "rb").read()
    if how == "huge-sparse":
        _huge_sparse(path)
    elif how == "fifo":
        _replace(path, os.mkfifo)
    elif how == "directory":
        _replace(path, os.mkdir)
        open(os.path.join(path, "inside"), "wb").close()
    elif how == "symlink-dev-zero":
        _replace(path, lambda p: os.symlink("/dev/zero", p))
    elif how == "symlink-other-block":
        _replace(path, lambda p: os.symlink(other, p))
    elif how == "hardlink-other-block":
        _replace(path, lambda p: os.link(other, p))
    elif how == "other-key-block":
        shutil.copyfile(other, path)
    elif how == "empty":
        open(path, "wb").close()
    elif how == "truncated":
        with open(path, "wb") as f:
            f.write(data[:HEADER_BYTES + 100])
    elif how == "unix-socket":
        _replace(path, _unix_socket)
    elif how == "char-device":
        _replace(path, _char_device)
    else:
        raise AssertionError(how)


REGULAR = {"huge-sparse", "hardlink-other-block", "other-key-block", "empty", "truncated"}
NOT_REGULAR = {"fifo", "directory", "symlink-dev-zero", "symlink-other-block", "unix-socket", "char-device"}


# -- reads ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", sorted(REGULAR | NOT_REGULAR))
def test_anything_at_a_blocks_path_is_a_counted_miss(open_tier, disk_dir, layout, blocks, how, kind):
    tier = open_tier(**kind_options(kind))
    assert tier.put_many([(A, blocks[A]), (C, blocks[C])]) == 2
    path, other = block_path(disk_dir, A), block_path(disk_dir, C)
    other_bytes = open(other, "rb").read()
    make_hostile(how, path, other)
    out = torch.zeros(layout.block_shape, dtype=layout.dtype)

    assert read_bounded(tier, A, out, path) is False  # no exception, no hang, no wrong data
    stats = tier.stats()
    assert (stats["misses"], stats["corrupt"], stats["hits"]) == (1, 1, 0)
    assert not tier.contains(A) and stats["blocks"] == 1 and stats["used_bytes"] == len(other_bytes)
    if how in REGULAR:
        assert not os.path.lexists(path)  # a damaged regular file is deleted ...
    else:
        assert os.path.lexists(path)  # ... anything else is left alone: never followed, never rmdir'ed
    assert open(other, "rb").read() == other_bytes  # a link's target is untouched
    assert_same_kv(_read(tier, layout, C), blocks[C])

    # A put replaces what squats there (rename over it), except a directory: that is refused, not removed.
    if how == "directory":
        assert tier.put_many([(A, blocks[A])]) == 0
        assert tier.stats()["rejected"] == 1 and os.path.isdir(path)
        assert os.listdir(path) == ["inside"]
        assert not any(name.endswith(".tmp") for name in os.listdir(os.path.dirname(path)))
    else:
        assert tier.put_many([(A, blocks[A])]) == 1
        assert stat.S_ISREG(os.lstat(path).st_mode)
        assert_same_kv(_read(tier, layout, A), blocks[A])
        assert open(other, "rb").read() == other_bytes
    assert_same_kv(_read(tier, layout, C), blocks[C])


HUGE_READS = """
import json, resource, time, tracemalloc
import torch
from conftest import tiny_layout
from kvstore.compression.registry import get_codec
from kvstore.tiers.files import FilesTier

A, C = {keys!r}
layout = tiny_layout()
out = torch.zeros(layout.block_shape, dtype=layout.dtype)
reports = {{}}
for kind, root in {roots!r}.items():
    options = dict(o_direct=kind == "o_direct", codec=get_codec("zstd") if kind == "zstd" else None)
    tier = FilesTier(root, 2 << 30, layout, sync=False, **options)  # room for the 1 GiB file: kept at open
    assert tier.get_into(C, out)  # the usual buffers, allocated before measuring
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    started = time.monotonic()
    hit = tier.get_into(A, out)
    elapsed = time.monotonic() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024  # KiB on Linux
    reports[kind] = dict(hit=hit, peak=peak, rss_growth=rss_growth, elapsed=elapsed, stats=tier.stats())
print(json.dumps(reports))
"""


def test_huge_file_is_refused_without_reading_it(tmp_path, layout, blocks):
    """A sparse 1 GiB file whose header claims it all: a miss, in no more memory or time than a block needs.

    Measured in a fresh process, where peak RSS (ru_maxrss) is not hidden by what earlier tests used;
    one after another per read path (a path that allocated the GiB would raise the peak for good)."""
    kinds = [kind for kind in KINDS if kind != "o_direct" or hasattr(os, "O_DIRECT")]
    roots = {kind: str(tmp_path / kind) for kind in kinds}
    tiers = {}
    for kind in kinds:
        tiers[kind] = FilesTier(roots[kind], 1 << 20, layout, sync=False, **kind_options(kind))
        tiers[kind].put_many([(A, blocks[A]), (C, blocks[C])])
        make_hostile("huge-sparse", block_path(roots[kind], A), block_path(roots[kind], C))
        assert os.path.getsize(block_path(roots[kind], A)) == GiB
    reports = json.loads(run_python(HUGE_READS.format(keys=(A, C), roots=roots)))
    for kind in kinds:
        report = reports[kind]
        assert report["hit"] is False, kind
        assert report["peak"] < 64 * MiB, f"{kind}: the read allocated {report['peak'] / MiB:.0f} MiB"
        assert report["rss_growth"] < 64 * MiB, f"{kind}: peak RSS grew by {report['rss_growth'] / MiB:.0f} MiB"
        assert report["elapsed"] < 2.0, kind  # nothing near a GiB was read
        stats = report["stats"]
        assert (stats["misses"], stats["corrupt"], stats["hits"]) == (1, 1, 1), kind
        assert not os.path.exists(block_path(roots[kind], A))  # a regular file: deleted
        assert_same_kv(_read(tiers[kind], layout, C), blocks[C])


def test_fifo_at_a_blocks_path_does_not_block_the_reader(open_tier, disk_dir, layout, blocks):
    """No writer ever opens the FIFO: a blocking open would wait forever."""
    tier = open_tier()
    tier.put_many([(A, blocks[A])])
    path = block_path(disk_dir, A)
    make_hostile("fifo", path, path)
    out = torch.zeros(layout.block_shape, dtype=layout.dtype)
    for attempt in range(3):  # again and again: each one a counted miss, none waits
        assert read_bounded(tier, A, out, path) is False
    assert (tier.stats()["misses"], tier.stats()["corrupt"]) == (3, 3)
    assert stat.S_ISFIFO(os.lstat(path).st_mode)


def test_symlink_to_dev_zero_is_a_miss_and_not_read(open_tier, disk_dir, layout, blocks):
    tier = open_tier()
    tier.put_many([(A, blocks[A]), (B, blocks[B])])
    path = block_path(disk_dir, A)
    make_hostile("symlink-dev-zero", path, "")
    out = torch.full(layout.block_shape, 3.0, dtype=layout.dtype)
    assert read_bounded(tier, A, out, path) is False
    assert torch.all(out == 3)  # not a byte of /dev/zero reached the output
    assert (tier.stats()["misses"], tier.stats()["corrupt"]) == (1, 1)
    assert os.path.islink(path) and os.readlink(path) == "/dev/zero"
    assert_same_kv(_read(tier, layout, B), blocks[B])


# -- scan, contains, delete, eviction -------------------------------------------------------------------------


def test_scan_and_contains_see_only_regular_block_files(open_tier, disk_dir, layout, blocks):
    writer = open_tier()
    writer.put_many([(key, blocks[key]) for key in (A, B, C, D, E)])
    good = block_path(disk_dir, C)
    make_hostile("fifo", block_path(disk_dir, A), good)
    make_hostile("directory", block_path(disk_dir, B), good)
    make_hostile("symlink-other-block", block_path(disk_dir, D), good)
    make_hostile("symlink-dev-zero", block_path(disk_dir, E), good)
    # Names no block of this tier has: upper-case hex, a key too long to address, the wrong fan-out folder.
    upper = os.path.join(str(disk_dir), "ab", "ab", "AB" * 32 + ".kvb")
    long_key = block_path(disk_dir, b"C" * 40)
    misplaced = os.path.join(str(disk_dir), "44", "44", "43" * 32 + ".kvb")
    for path in (upper, long_key, misplaced):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(good, path)
        os.utime(path, ns=(1000 * SECOND, 1000 * SECOND))  # would be evicted first, if indexed

    tier = open_tier(2 * BLOCK)  # the scan on open
    assert list(tier.keys()) == [C]
    assert tier.used_bytes() == BLOCK
    assert [tier.contains(key) for key in (A, B, C, D, E)] == [False, False, True, False, False]
    # Filling it evicts only its own block files, and never fails on a name it cannot address. A, D and E
    # are written over the FIFO and the symlinks; C's file, which D pointed to, is evicted as the oldest.
    for key in (A, D, E):
        assert tier.put_many([(key, blocks[key])]) == 1
    assert list(tier.keys()) == [D, E] and tier.used_bytes() == 2 * BLOCK
    assert tier.stats()["evictions"] == 2 and tier.stats()["corrupt"] == 0
    assert all(os.path.exists(path) for path in (upper, long_key, misplaced))
    assert os.path.isdir(block_path(disk_dir, B))
    assert stat.S_ISREG(os.lstat(block_path(disk_dir, D)).st_mode)
    assert_same_kv(_read(tier, layout, D), blocks[D])


def test_delete_and_eviction_never_remove_a_directory_or_follow_a_symlink(open_tier, disk_dir, layout, blocks,
                                                                            tmp_path):
    outside = tmp_path / "outside.kvb"
    outside.write_bytes(b"not ours")
    tier = open_tier(3 * BLOCK, rescan_seconds=3600)
    tier.put_many([(A, blocks[A]), (B, blocks[B]), (C, blocks[C])])
    make_hostile("directory", block_path(disk_dir, A), "")
    _replace(block_path(disk_dir, B), lambda p: os.symlink(str(outside), p))
    # The index still lists A and B as the oldest blocks: room for D and E is made without touching them.
    assert tier.put_many([(D, blocks[D]), (E, blocks[E])]) == 2
    assert os.path.isdir(block_path(disk_dir, A)) and outside.read_bytes() == b"not ours"
    assert os.path.islink(block_path(disk_dir, B))
    assert tier.delete(A) is False and os.path.isdir(block_path(disk_dir, A))
    assert tier.delete(B) is False and outside.read_bytes() == b"not ours"
    assert_same_kv(_read(tier, layout, E), blocks[E])
    assert tier.delete(E) is True and not os.path.exists(block_path(disk_dir, E))


def test_no_block_is_written_through_a_symlinked_fanout_directory(open_tier, disk_dir, layout, blocks, tmp_path,
                                                                  caplog):
    """Writes went through a fan-out directory that is a symlink (``ab -> /disk2/ab``) while the scans skipped
    it: after each rescan its blocks were uncounted, and the directory grew to 6x files_bytes."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.makedirs(disk_dir, exist_ok=True)
    for key in (A, B):
        os.symlink(str(elsewhere), os.path.dirname(block_path(disk_dir, key)))
    tier = open_tier(3 * BLOCK)
    with caplog.at_level("WARNING", logger="kvstore.tiers.files"):
        assert tier.put_many([(A, blocks[A]), (B, blocks[B]), (C, blocks[C])]) == 1
    assert list(elsewhere.iterdir()) == []  # nothing written there, temp files included
    assert tier.stats()["rejected"] == 2 and list(tier.keys()) == [C]
    assert any("its directory refused" in record.getMessage() for record in caplog.records)
    tier._rescan()
    assert tier.used_bytes() == BLOCK and tier.used_bytes() <= tier.capacity_bytes
    assert_same_kv(_read(tier, layout, C), blocks[C])


def test_an_evicted_file_overwritten_never_moves_through_a_symlinked_fanout_directory(open_tier, disk_dir, layout,
                                                                                     blocks, tmp_path):
    """A full tier overwrites an evicted (parked) file and renames it onto the new block's path: only new temp
    files were checked for a symlinked fan-out directory, so blocks landed outside files_dir, uncounted (and
    on another filesystem the rename's EXDEV suspended the tier). The block is refused; the tier stays up."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tier = open_tier(3 * BLOCK)
    assert tier.put_many([(A, blocks[A]), (B, blocks[B]), (C, blocks[C])]) == 3
    os.symlink(str(elsewhere), os.path.dirname(block_path(disk_dir, D)))
    assert tier.put_many([(D, blocks[D])]) == 0  # refused: no tier failure raised for the store to blame
    assert list(elsewhere.iterdir()) == []
    assert tier.stats()["rejected"] == 1
    assert tier.put_many([(E, blocks[E])]) == 1
    tier._rescan()
    assert tier.used_bytes() <= tier.capacity_bytes
    for key in tier.keys():
        assert_same_kv(_read(tier, layout, key), blocks[key])


def test_codec_frame_a_read_would_refuse_is_not_written(open_tier, disk_dir, layout, blocks):
    """A codec whose frame outgrows the raw block by far (8-bit codes, a scale and offset per element) would
    write files every read refuses as too large: it is rejected at put instead."""
    codec = KiviCodec(bits=8, group=1)
    assert len(codec.encode(blocks[A])) > 2 * layout.block_bytes
    tier = open_tier(100 * BLOCK, codec=codec)
    assert tier.put_many([(A, blocks[A])]) == 0
    assert tier.stats()["rejected"] == 1 and not os.path.exists(block_path(disk_dir, A))
    zstd = open_tier(path=disk_dir / "zstd", codec=get_codec("zstd"))  # incompressible noise: frame > raw
    gen = torch.Generator().manual_seed(5)
    noise = torch.randint(-32768, 32768, layout.block_shape, dtype=torch.int16, generator=gen)
    assert zstd.put_many([(B, noise.view(layout.dtype))]) == 1
    assert os.path.getsize(block_path(disk_dir / "zstd", B)) > HEADER_BYTES + layout.block_bytes
    out = torch.zeros(layout.block_shape, dtype=layout.dtype)
    assert zstd.get_into(B, out) and torch.equal(out.view(torch.int16), noise)  # bit-exact (NaNs included)


# -- read-only directories ----------------------------------------------------------------------------------


def populate(root, layout, blocks) -> dict:
    """Blocks A, B and C (C's file holding B's block: corrupt), a stale temp file, old mtimes; paths by name."""
    tier = FilesTier(root, 10 * BLOCK, layout, sync=False)
    tier.put_many([(A, blocks[A]), (B, blocks[B]), (C, blocks[C])])
    tier.close()
    paths = {key: block_path(root, key) for key in (A, B, C)}
    shutil.copyfile(paths[B], paths[C])
    paths["temp"] = os.path.join(os.path.dirname(paths[A]), f".{A.hex()}~elsewhere~123~bbbb.tmp")
    with open(paths["temp"], "wb") as f:
        f.write(b"partial")
    for path in paths.values():
        os.utime(path, ns=(1000 * SECOND, 1000 * SECOND))  # old: the temp file is stale
    return paths


def check_serves_reads(root, layout, blocks, paths, stamp_refused: bool) -> None:
    """Open on the read-only directory, hit, miss on the corrupt block: nothing raises, nothing is removed."""
    tier = FilesTier(root, 10 * BLOCK, layout, sync=False)  # cannot remove the stale temp file: still opens
    try:
        assert tier.stats()["temp_removed"] == 0 and os.path.exists(paths["temp"])
        assert sorted(tier.keys()) == [A, B, C]
        assert_same_kv(_read(tier, layout, A), blocks[A])  # the access stamp fails: still a hit
        if stamp_refused:
            assert os.stat(paths[A]).st_mtime_ns == 1000 * SECOND
        assert _read(tier, layout, C) is None  # corrupt, and cannot be deleted: still just a miss
        assert os.path.exists(paths[C])
        assert_same_kv(_read(tier, layout, B), blocks[B])
        stats = tier.stats()
        assert (stats["hits"], stats["misses"], stats["corrupt"]) == (2, 1, 1)
    finally:
        tier.close()


@pytest.fixture
def tmpfs(tmp_path):
    """A fresh tmpfs (remount it read-only with ``remount(point, "ro")``); skips if mounting is not permitted."""
    with mounted_tmpfs(tmp_path / "mnt", "size=16m,mode=0755") as point:
        yield point


def test_read_only_filesystem_still_serves_reads(tmpfs, layout, blocks):
    root = tmpfs / "kv"
    paths = populate(root, layout, blocks)
    done = remount(tmpfs, "ro")
    assert done.returncode == 0, done.stderr
    with pytest.raises(OSError) as info:
        os.utime(paths[A])
    assert info.value.errno == errno.EROFS  # the filesystem really is read-only
    check_serves_reads(root, layout, blocks, paths, stamp_refused=True)


def test_a_batch_filling_a_real_filesystem_stores_what_fits(tmpfs, layout):
    """A batch written by four threads onto a 1 MiB tmpfs with room for far fewer blocks than it holds: the
    disk's ENOSPC holds the tier to the room it has and the batch is written again in it (what fits, as a
    batch larger than the tier); each block indexed reads back exact, no temp file is left,
    the tier counts what is on disk, and writes go on."""
    done = remount(tmpfs, "size=1m")
    assert done.returncode == 0, done.stderr
    root = tmpfs / "kv"
    keys = [hashlib.sha256(b"%d" % i).digest() for i in range(300)]
    kv = {key: make_kv(layout, 16, seed=i) for i, key in enumerate(keys)}
    tier = FilesTier(root, 400 * BLOCK, layout, sync=False, io_threads=4)
    try:
        stored_count = tier.put_many([(key, kv[key]) for key in keys])
        assert tier.stats()["filesystem_full"] == 1 and tier.capacity_bytes <= 1 << 20
        stored = list(tier.keys())
        assert 0 < len(stored) == stored_count < len(keys)
        for key in stored:
            assert_same_kv(_read(tier, layout, key), kv[key])
        files = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]
        assert all(path.endswith(".kvb") for path in files)  # every failed write's temp file is gone
        assert tier.used_bytes() == sum(os.path.getsize(path) for path in files) == len(stored) * BLOCK
        for key in stored[:len(stored) // 2]:
            assert tier.delete(key)
        late, late_kv = hashlib.sha256(b"late").digest(), make_kv(layout, 16, seed=1000)
        assert tier.put_many([(late, late_kv)]) == 1  # room again: a new block is stored
        assert_same_kv(_read(tier, layout, late), late_kv)
    finally:
        tier.close()


def test_a_quota_the_free_space_does_not_show_holds_the_tier_to_what_it_stores(tmp_path, layout, monkeypatch):
    """EDQUOT: the filesystem shows free space, the writer's quota has none. (No quota runs on this kernel's
    tmpfs or ext4: the write refuses as a quota would, once the directory holds six blocks.)"""
    root = tmp_path / "kv"
    real_pwritev = os.pwritev

    def quota_pwritev(fd, buffers, offset):
        held = sum(name.endswith(".kvb") for _, _, names in os.walk(root) for name in names)
        if held >= 6:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return real_pwritev(fd, buffers, offset)
    monkeypatch.setattr(os, "pwritev", quota_pwritev)
    tier = FilesTier(root, 400 * BLOCK, layout, sync=False, io_threads=1, rescan_seconds=0.0)
    try:
        blocks = {hashlib.sha256(b"q%d" % i).digest(): make_kv(layout, 16, seed=i) for i in range(10)}
        for key, kv in blocks.items():
            assert tier.put_many([(key, kv)]) == 1  # each new block evicts the oldest once the quota is met
        # met once: a scan (at every write here) does not raise the capacity again from the free space it sees
        assert tier.stats()["filesystem_full"] == 1 and tier.capacity_bytes == 6 * BLOCK
        assert list(tier.keys()) == list(blocks)[-6:]
        for key in list(blocks)[-6:]:
            assert_same_kv(_read(tier, layout, key), blocks[key])
    finally:
        tier.close()


def test_threads_meeting_a_full_filesystem_together_each_store_what_fits(tmpfs, layout):
    """Two threads' batches meeting ENOSPC together: the second found the capacity lowered by the first and
    raised ENOSPC (the store suspended the tier's writes), or counted the first's failing writes in flight
    as room and set the capacity above what the filesystem holds."""
    done = remount(tmpfs, "size=1m")
    assert done.returncode == 0, done.stderr
    kv = make_kv(layout, 16, seed=1)
    for trial in range(8):
        tier = FilesTier(tmpfs / f"kv{trial}", 400 * BLOCK, layout, sync=False, io_threads=4, rescan_seconds=3600)
        barrier, raised = threading.Barrier(2), []

        def put(n: int) -> None:
            items = [(hashlib.sha256(b"%d-%d-%d" % (trial, n, i)).digest(), kv) for i in range(200)]
            barrier.wait()
            try:
                tier.put_many(items)
            except OSError as exc:
                raised.append(exc)
        run_threads(put, 2)
        try:
            assert raised == []
            files = [os.path.join(d, f) for d, _, names in os.walk(tmpfs / f"kv{trial}") for f in names]
            assert tier.used_bytes() == sum(os.path.getsize(path) for path in files) <= tier.capacity_bytes
            assert tier.capacity_bytes <= 1 << 20
        finally:
            tier.close()
            shutil.rmtree(tmpfs / f"kv{trial}")


@contextlib.contextmanager
def unprivileged():
    """As root: effective uid/gid ``nobody`` for the block (root ignores file modes); otherwise a no-op."""
    if os.geteuid() != 0:
        yield
        return
    try:
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
    except KeyError:
        uid = gid = 65534
    groups = os.getgroups()
    os.setgroups([])
    os.setegid(gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


@pytest.fixture
def shared_dir():
    """A directory every user may traverse (pytest's tmp_path is root's alone), removed afterwards."""
    path = tempfile.mkdtemp(prefix="kvstore-files-")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        for directory, dirs, files in os.walk(path):
            os.chmod(directory, 0o755)
        shutil.rmtree(path)


def _make_read_only(root: str) -> None:
    """Directories r-x, files r-- for everyone but the owner (root, unless tests run unprivileged)."""
    mine = os.geteuid() != 0
    for directory, _, files in os.walk(root):
        for name in files:
            os.chmod(os.path.join(directory, name), 0o444 if mine else 0o644)
        os.chmod(directory, 0o555 if mine else 0o755)


def test_directory_not_writable_by_this_user_still_serves_reads(shared_dir, layout, blocks):
    """No mount needed: another user's directory, readable but not writable (as root: run as nobody)."""
    root = os.path.join(shared_dir, "kv")
    paths = populate(root, layout, blocks)
    _make_read_only(shared_dir)
    with unprivileged():
        with pytest.raises(PermissionError):
            open(os.path.join(os.path.dirname(paths[A]), "probe"), "wb")  # really not writable
        check_serves_reads(root, layout, blocks, paths, stamp_refused=os.geteuid() != os.stat(paths[A]).st_uid)


def test_unreadable_block_file_still_raises(shared_dir, layout, blocks):
    """EACCES on a regular block file is a tier fault (the store tracks health), not a corrupt block."""
    root = os.path.join(shared_dir, "kv")
    paths = populate(root, layout, blocks)
    _make_read_only(shared_dir)
    os.chmod(paths[A], 0)
    with unprivileged():
        tier = FilesTier(root, 10 * BLOCK, layout, sync=False)
        with pytest.raises(PermissionError):
            tier.get_into(A, torch.zeros(layout.block_shape, dtype=layout.dtype))
        assert tier.stats()["corrupt"] == 0 and os.path.exists(paths[A])
        assert_same_kv(_read(tier, layout, B), blocks[B])


def test_a_block_file_eviction_cannot_remove_is_kept_and_the_next_oldest_goes(shared_dir, layout, blocks, caplog):
    """One block file in a fan-out directory of another owner: its ``EACCES`` escaped the eviction, the put
    failed (the tier's writes suspended), and every later eviction met it again first."""
    root = os.path.join(shared_dir, "kv")
    os.mkdir(root)
    os.chmod(root, 0o777)
    with unprivileged():
        tier = FilesTier(root, 3 * BLOCK, layout, sync=False)
    try:
        with unprivileged():
            assert tier.put_many([(A, blocks[A]), (B, blocks[B]), (C, blocks[C])]) == 3
        foreign = os.path.dirname(block_path(root, A))
        if os.geteuid() == 0:
            os.chown(foreign, 0, 0)  # root's now: nobody may not remove what is in it
        os.chmod(foreign, 0o755 if os.geteuid() == 0 else 0o555)
        with unprivileged(), caplog.at_level("WARNING", logger="kvstore.tiers.files"):
            assert tier.put_many([(D, blocks[D]), (E, blocks[E])]) == 2
        assert sorted(tier.keys()) == [A, D, E] and os.path.exists(block_path(root, A))
        assert tier.used_bytes() == 3 * BLOCK <= tier.capacity_bytes and tier.stats()["evictions"] == 2
        assert any("could not be evicted" in record.getMessage() for record in caplog.records)
        for key in (A, D, E):
            assert_same_kv(_read(tier, layout, key), blocks[key])
    finally:
        tier.close()


def test_a_file_larger_than_the_tier_is_evicted_first_not_the_blocks(open_tier, disk_dir, layout, blocks):
    """Junk at a block's name (a sparse 1 TiB file) took its place in the eviction order by its mtime, and
    every block went before it: the tier opened empty."""
    tier = open_tier(10 * BLOCK)
    assert tier.put_many([(A, blocks[A]), (B, blocks[B]), (C, blocks[C])]) == 3
    tier.close()
    junk = block_path(disk_dir, D)
    os.makedirs(os.path.dirname(junk), exist_ok=True)
    with open(junk, "wb") as f:
        f.truncate(1 << 40)  # sparse: no disk used
    os.utime(junk, ns=(10**18 * 4, 10**18 * 4))  # and newer than every block
    again = open_tier(10 * BLOCK)
    assert sorted(again.keys()) == [A, B, C] and not os.path.exists(junk)
    assert again.stats()["evictions"] == 1 and again.used_bytes() == 3 * BLOCK
    for key in (A, B, C):
        assert_same_kv(_read(again, layout, key), blocks[key])
