"""One level of fan-out directories, and the two-level layout of older versions moved up (tiers/fanout.py)."""

from __future__ import annotations

import errno
import logging
import os

import pytest

from conftest import as_bytes, make_kv
from kvstore.blockformat import HEADER_BYTES

from tierkit import block_path, files_tiers, read

BLOCK = 4096 + HEADER_BYTES  # one full tiny-layout fp16 block, as the capacity counts it


def key_of(i: int) -> bytes:
    return bytes([i % 256, i // 256]) * 16  # spread over many first bytes, so over many fan-out directories


def old_path(root, key: bytes) -> str:
    """Where a tier of an older version kept block ``key``: two levels of fan-out."""
    h = key.hex()
    return os.path.join(str(root), h[:2], h[2:4], h + ".kvb")


@pytest.fixture
def open_tier(disk_dir, layout):
    with files_tiers(disk_dir, layout, 400 * BLOCK) as factory:
        yield factory


def directories_under(root) -> list[str]:
    return sorted(os.path.relpath(d, root) for d, _, _ in os.walk(str(root)) if d != str(root))


def to_old_layout(root, keys) -> None:
    """Move the blocks ``keys`` of a closed tier to where an older version kept them, as it left them."""
    for key in keys:
        os.makedirs(os.path.dirname(old_path(root, key)), exist_ok=True)
        os.rename(block_path(root, key), old_path(root, key))


def test_a_fresh_tier_makes_one_level_of_at_most_256_directories(open_tier, disk_dir, layout):
    tier = open_tier()
    assert tier.put_many([(key_of(i), make_kv(layout, 16, seed=i)) for i in range(300)]) == 300
    dirs = directories_under(disk_dir)
    assert len(dirs) == 256 and all(len(d) == 2 for d in dirs)  # 300 keys over all 256 first bytes, one level


def test_blocks_of_the_two_level_layout_are_moved_up_on_open_and_read_back_exactly(open_tier, disk_dir, layout,
                                                                                     caplog):
    keys = [key_of(i) for i in range(20)]
    tier = open_tier()
    assert tier.put_many([(key, make_kv(layout, 16, seed=i)) for i, key in enumerate(keys)]) == 20
    tier.close()
    to_old_layout(disk_dir, keys)
    assert len(directories_under(disk_dir)) > 20  # a second level, as an older version left it
    with caplog.at_level(logging.INFO, logger="kvstore.tiers.files"):
        tier = open_tier()
    assert tier.stats()["moved_up"] == 20
    assert [r.getMessage() for r in caplog.records if r.name == "kvstore.tiers.files"] == [
        f"files tier {disk_dir}: moved 20 block files of the two-level layout up"]  # one line, not one a folder
    for i, key in enumerate(keys):
        assert as_bytes(read(tier, layout, key)) == as_bytes(make_kv(layout, 16, seed=i))
    assert all(len(d) == 2 for d in directories_under(disk_dir))  # the emptied second level is gone
    assert tier.used_bytes() == 20 * BLOCK


def test_moving_up_counts_each_block_and_keeps_the_capacity(open_tier, disk_dir, layout):
    keys = [key_of(i) for i in range(12)]
    tier = open_tier()
    tier.put_many([(key, make_kv(layout, 16, seed=i)) for i, key in enumerate(keys)])
    tier.close()
    to_old_layout(disk_dir, keys)
    tier = open_tier(capacity=10 * BLOCK)  # smaller than what the old layout holds: evicted down to it at open
    assert tier.stats()["moved_up"] == 12
    assert set(tier.keys()) < set(keys) and len(list(tier.keys())) == 10 and tier.stats()["evictions"] == 2
    assert tier.used_bytes() == 10 * BLOCK
    assert tier.put_many([(key_of(99), make_kv(layout, 16, seed=99))]) == 1
    assert tier.used_bytes() <= 10 * BLOCK
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(str(disk_dir)) for f in files)
    assert on_disk == tier.used_bytes()


def test_what_is_not_an_old_block_file_is_never_moved(open_tier, disk_dir, layout, tmp_path):
    good, wrong_dir, linked, squatted = key_of(1), key_of(2), key_of(3), key_of(4)
    tier = open_tier()
    tier.put_many([(key, make_kv(layout, 16, seed=i)) for i, key in enumerate((good, wrong_dir, squatted))])
    tier.close()
    to_old_layout(disk_dir, [good, squatted])
    elsewhere = os.path.join(str(disk_dir), "01", "ff")  # a block file in a second-level directory not its own
    os.makedirs(elsewhere)
    os.rename(block_path(disk_dir, wrong_dir), os.path.join(elsewhere, wrong_dir.hex() + ".kvb"))
    outside = tmp_path / "outside.kvb"
    outside.write_bytes(b"x" * BLOCK)
    os.makedirs(os.path.dirname(old_path(disk_dir, linked)), exist_ok=True)
    os.symlink(outside, old_path(disk_dir, linked))  # a link is never followed, nor moved
    os.makedirs(block_path(disk_dir, squatted))  # a directory sits where the block would move to
    tier = open_tier()
    assert tier.stats()["moved_up"] == 1
    assert as_bytes(read(tier, layout, good)) == as_bytes(make_kv(layout, 16, seed=0))
    for key in (wrong_dir, linked, squatted):
        assert read(tier, layout, key) is None  # a miss, not an error
    assert os.path.islink(old_path(disk_dir, linked)) and outside.read_bytes() == b"x" * BLOCK
    assert os.path.isfile(old_path(disk_dir, squatted))  # could not be moved: left where it was
    assert os.path.isfile(os.path.join(elsewhere, wrong_dir.hex() + ".kvb"))
    assert sorted(tier.keys()) == [good]


def test_stale_temp_files_of_the_old_layout_are_removed_and_live_ones_kept(open_tier, disk_dir, layout):
    key = key_of(7)
    tier = open_tier()
    tier.put_many([(key, make_kv(layout, 16, seed=7))])
    host = tier._host
    tier.close()
    to_old_layout(disk_dir, [key])
    level2 = os.path.dirname(old_path(disk_dir, key))
    dead = os.path.join(level2, f".{key.hex()}~{host}~{2**22 + 12345}~dead.tmp")  # no such pid
    live = os.path.join(level2, f".{key.hex()}~{host}~{os.getpid()}~live.tmp")  # a writer still at work
    for path in (dead, live):
        with open(path, "wb") as f:
            f.write(b"partial")
    tier = open_tier()
    assert not os.path.exists(dead) and os.path.exists(live)
    assert os.path.isdir(level2)  # not empty: an older writer may be filling it
    assert as_bytes(read(tier, layout, key)) == as_bytes(make_kv(layout, 16, seed=7))
    os.unlink(live)


def test_a_block_an_older_version_puts_beside_an_open_tier_is_moved_up_by_its_next_rescan(open_tier, disk_dir,
                                                                                           layout):
    first, later, third = key_of(10), key_of(11), key_of(12)
    writer = open_tier()
    writer.put_many([(later, make_kv(layout, 16, seed=11))])
    writer.close()
    to_old_layout(disk_dir, [later])  # the file an older process sharing the directory wrote
    os.rename(old_path(disk_dir, later), str(disk_dir / "held"))  # ... not there yet when the tier opens
    tier = open_tier(rescan_seconds=0.0)
    tier.put_many([(first, make_kv(layout, 16, seed=10))])
    assert read(tier, layout, later) is None
    os.makedirs(os.path.dirname(old_path(disk_dir, later)), exist_ok=True)  # (the open removed it, empty)
    os.rename(str(disk_dir / "held"), old_path(disk_dir, later))  # now the older process puts it
    tier.put_many([(third, make_kv(layout, 16, seed=12))])  # a write rescans (rescan_seconds=0)
    assert tier.stats()["moved_up"] == 1
    assert as_bytes(read(tier, layout, later)) == as_bytes(make_kv(layout, 16, seed=11))
    assert as_bytes(read(tier, layout, first)) == as_bytes(make_kv(layout, 16, seed=10))


def test_an_old_copy_never_replaces_a_block_already_at_its_new_path(open_tier, disk_dir, layout):
    key = key_of(20)
    tier = open_tier()
    tier.put_many([(key, make_kv(layout, 16, seed=20))])
    tier.close()
    os.makedirs(os.path.dirname(old_path(disk_dir, key)))
    with open(block_path(disk_dir, key), "rb") as f:
        damaged = bytearray(f.read())
    damaged[-3] ^= 0xFF
    with open(old_path(disk_dir, key), "wb") as f:  # an older process's copy, damaged on its disk
        f.write(damaged)
    tier = open_tier()
    assert tier.stats()["moved_up"] == 0
    assert not os.path.exists(old_path(disk_dir, key))
    assert as_bytes(read(tier, layout, key)) == as_bytes(make_kv(layout, 16, seed=20))


def test_old_block_files_that_cannot_be_moved_are_read_where_they_are(open_tier, disk_dir, layout, monkeypatch):
    """A read-only directory (EROFS; as root no permission bit refuses, so the refusal is injected into the
    one call): its blocks of the old layout still serve exact bytes, and eviction and a later put of such a
    block go through the one-level paths."""
    keys = [key_of(i) for i in range(6)]
    tier = open_tier()
    tier.put_many([(key, make_kv(layout, 16, seed=i)) for i, key in enumerate(keys)])
    tier.close()
    to_old_layout(disk_dir, keys)
    real_rename = os.rename

    def read_only(src, dst, *args, **kwargs):
        if os.path.basename(os.path.dirname(os.path.dirname(src))) != os.path.basename(str(disk_dir)):
            raise OSError(errno.EROFS, "Read-only file system", src)  # a file two levels down
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", read_only)
    tier = open_tier()
    monkeypatch.setattr(os, "rename", real_rename)
    assert tier.stats()["moved_up"] == 0 and sorted(tier.keys()) == sorted(keys)
    for _ in range(2):  # a hit leaves the block where it is for the next
        for i, key in enumerate(keys):
            assert as_bytes(read(tier, layout, key)) == as_bytes(make_kv(layout, 16, seed=i))
            assert os.path.isfile(old_path(disk_dir, key)) and not os.path.exists(block_path(disk_dir, key))
    assert tier.delete(keys[0]) and not os.path.exists(old_path(disk_dir, keys[0]))
    assert tier.put_many([(keys[0], make_kv(layout, 16, seed=0))]) == 1
    assert os.path.isfile(block_path(disk_dir, keys[0]))  # written again: the one-level path
    assert as_bytes(read(tier, layout, keys[0])) == as_bytes(make_kv(layout, 16, seed=0))
