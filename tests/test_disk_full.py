"""A disk tier on a real small tmpfs, under a real file-size limit, or on a real frozen filesystem: a full
filesystem holds the tier to the room it has; a write that fails with room to spare suspends its writes for
``degraded_seconds``, never its reads; a write that never ends holds up neither puts nor close."""

from __future__ import annotations

import json
import threading
import time

import pytest

from conftest import (assert_same_kv, freeze, make_kv, make_tokens, mounted_ext4, mounted_tmpfs, remount, run_python,
                      tiny_layout)
from kvstore.blockformat import HEADER_BYTES
from kvstore import KVStore, StoreConfig, writebehind
from kvstore.tiers.files import FilesTier
from kvstore.tiers.host import HostTier
from kvstore.tiers import lmdb as lmdb_tier
from kvstore.tiers.lmdb import DirectoryInUseError

LAYOUT = tiny_layout()


_FILE_SIZE_LIMITED = """
import json, resource, signal
from conftest import make_kv, make_tokens, tiny_layout
from kvstore import KVStore, StoreConfig
layout = tiny_layout()
config = StoreConfig(model_id="m", host_bytes=layout.block_bytes if {host} else 0,
                     degraded_seconds=60.0, disk_dir={where!r}, disk_bytes="16MiB")
prompts = [(make_tokens(48, seed=i), make_kv(layout, 48, seed=i)) for i in range(60)]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
with KVStore(layout, config) as store:
    for tokens, kv in prompts[:5]:
        store.put(tokens, kv)
    assert store.flush(timeout=30)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
    for tokens, kv in prompts[5:]:
        store.put(tokens, kv)
    assert store.flush(timeout=30)
    stats = store.stats()["tiers"]["lmdb"]
    found = [store.lookup(tokens) for tokens, _ in prompts[:5]]
    exact = all(store.get(tokens).equal(kv) for tokens, kv in prompts[:5])
    print(json.dumps(dict(stats=stats, found=found, exact=exact, after=store.stats()["tiers"]["lmdb"])))
"""


@pytest.mark.parametrize("host", [False, True])
def test_a_disk_that_fails_writes_keeps_serving_what_it_holds(tmp_path, host):
    """A disk tier whose writes fail with room to spare (here a real file-size limit: EFBIG, which no eviction
    helps) suspends its writes for ``degraded_seconds``, never its reads. It made every block there a miss for
    30 s, and again after each retried write."""
    result = json.loads(run_python(_FILE_SIZE_LIMITED.format(host=host, where=str(tmp_path / "kv")), timeout=120))
    stats, later = result["stats"], result["after"]
    assert stats["errors"] >= 1 and stats["writes"] == "suspended" and stats["filesystem_full"] == 0
    assert stats["state"] == "healthy"  # reads are not bypassed
    assert result["found"] == [48] * 5 and result["exact"]
    assert later["hits"] > stats["hits"]
    if not host:  # the puts after the failure were not sent to the failing disk at all
        assert stats["write_suspended"] >= 1


def test_a_read_only_files_dir_larger_than_files_bytes_is_served_as_it_is(tmp_path):
    """A reader node mounting a shared export read-only, with a smaller ``files_bytes`` than the writers':
    the open tried to evict down to it and raised ``EROFS`` out of the store's constructor."""
    layout = tiny_layout()
    tokens, kv = make_tokens(80, seed=4), make_kv(layout, 80, seed=4)
    with mounted_tmpfs(tmp_path / "export", "size=4m") as point:
        config = StoreConfig(model_id="m", host_bytes=0, files_dir=str(point / "files"), files_bytes=1 << 20)
        with KVStore(layout, config) as writer:
            assert writer.put(tokens, kv) == 5
        assert remount(point, "ro").returncode == 0
        smaller = config.replace(files_bytes=2 * (layout.block_bytes + HEADER_BYTES))
        with KVStore(layout, smaller) as reader:
            assert reader.lookup(tokens) == 80
            assert_same_kv(reader.get(tokens), kv)


@pytest.mark.parametrize("tier", ["files", "lmdb"])
@pytest.mark.parametrize("host", [False, True])
def test_a_disk_tier_on_a_filesystem_smaller_than_its_setting_keeps_to_the_room_it_has(tmp_path, monkeypatch,
                                                                                         host, tier):
    """A 1 MiB filesystem under a 16 MiB tier: the first ENOSPC (LMDB: a short write it reports as EIO)
    suspended the tier's writes (files: for good; LMDB: at each retry); it kept its oldest blocks and the
    newest prompts never landed. It now evicts within the room it has, and holds more again once room comes
    back."""
    monkeypatch.setattr(lmdb_tier, "_ROOM_RECHECK_SECONDS", 0.0)  # looks for room at every write
    with mounted_tmpfs(tmp_path / "small", "size=1m") as point:
        disk = FilesTier(point / "kv", 16 << 20, LAYOUT, rescan_seconds=0.0) if tier == "files" else \
            lmdb_tier.LmdbTier(point / "kv", 16 << 20, LAYOUT)
        tiers = [HostTier(LAYOUT, LAYOUT.block_bytes, pin_memory=False), disk] if host else [disk]
        config = StoreConfig(model_id="m", degraded_seconds=60.0)  # its tiers are these
        prompts = [(make_tokens(48, seed=i), make_kv(LAYOUT, 48, seed=i)) for i in range(120)]
        ballast = point / "ballast"
        ballast.write_bytes(b"x" * (256 << 10))  # another user's quarter of the filesystem
        with KVStore(LAYOUT, config, tiers=tiers) as store:
            for tokens, kv in prompts[:100]:
                store.put(tokens, kv)
                assert store.flush(timeout=30)
            stats = store.stats()["tiers"][tier]
            assert stats["filesystem_full"] >= 1 and stats["errors"] == 0 and stats["writes"] != "suspended"
            assert stats["capacity_bytes"] <= 768 << 10 and stats["used_bytes"] <= stats["capacity_bytes"]
            for tokens, kv in prompts[97:100]:  # the newest prompts landed, exact
                assert store.lookup(tokens) == 48
                assert_same_kv(store.get(tokens), kv)
            assert store.lookup(prompts[0][0]) < 48  # the oldest made room
            ballast.unlink()
            for tokens, kv in prompts[100:]:  # room came back: a later check raises the capacity again
                store.put(tokens, kv)
                assert store.flush(timeout=30)
            later = store.stats()["tiers"][tier]
            assert later["capacity_bytes"] > stats["capacity_bytes"] + (100 << 10) and later["errors"] == 0
            for tokens, kv in prompts[-3:]:
                assert_same_kv(store.get(tokens), kv)


def test_a_files_dir_that_stops_answering_blocks_neither_puts_nor_close(tmp_path, monkeypatch):
    """A files tier on a share that stopped answering (a real ext4 frozen: its writes block until thawed):
    with the write-behind queue full a put waited for ever, and so did ``close`` (SGLang's shutdown and its
    backups with it). After ``STALL_SECONDS`` the tier's copies are dropped and its writes suspended; host
    RAM serves every prompt; ``close`` returns and leaves the stuck tier to its write."""
    monkeypatch.setattr(writebehind, "STALL_SECONDS", 0.5)
    prompts = [(make_tokens(48, seed=i), make_kv(LAYOUT, 48, seed=i)) for i in range(12)]
    with mounted_ext4(tmp_path / "share") as point:
        config = StoreConfig(model_id="m", host_bytes=64 * LAYOUT.block_bytes, files_dir=str(point / "kv"),
                             files_bytes="16MiB", files_sync=True, write_queue_blocks=2, queue_full="block")
        store = KVStore(LAYOUT, config)
        try:
            store.put(*prompts[0])
            assert store.flush(timeout=30)
            freeze(point)
            try:
                for tokens, kv in prompts[1:]:
                    store.put(tokens, kv)
                files = store.stats()["tiers"]["files"]
                assert files["writes"] == "suspended" and "has not ended" in files["last_error"]
                assert store.stats()["write_behind"]["dropped"] >= 1
                for tokens, kv in prompts:
                    assert_same_kv(store.get(tokens), kv)
                closing = threading.Thread(target=store.close)
                closing.start()
                closing.join(30)
                assert not closing.is_alive()
                assert _files_threads()  # left to its write
            finally:
                freeze(point, frozen=False)
        finally:
            store.close()
        for _ in range(300):  # once its write ended the tier was closed: its threads stopped
            if not _files_threads():
                break
            time.sleep(0.1)
        assert not _files_threads()


def _files_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith(("kvstore-files",
                                                                                        "kvstore-close"))]


def test_an_lmdb_tier_at_zero_free_bytes_gives_up_its_reserve_to_evict(tmp_path):
    """16 KiB blocks (LMDB overflow pages) on a 2 MiB tmpfs: once the filesystem had no byte left, the
    eviction that would make room failed too (LMDB writes new pages to commit a delete) and the tier's writes
    stayed suspended at every retry. Its reserve file's room is given up for that eviction."""
    layout = tiny_layout(num_kv_heads=8)
    prompts = [(make_tokens(64, seed=i), make_kv(layout, 64, seed=i)) for i in range(200)]
    with mounted_tmpfs(tmp_path / "small", "size=2m") as point:
        config = StoreConfig(model_id="m", host_bytes=0, degraded_seconds=0.5, disk_dir=str(point / "kv"),
                             disk_bytes="64MiB")
        with KVStore(layout, config) as store:
            assert (point / "kv" / lmdb_tier.RESERVE_NAME).exists()
            for tokens, kv in prompts:
                store.put(tokens, kv)
            stats = store.stats()["tiers"]["lmdb"]
            assert stats["errors"] == 0 and stats["writes"] == "ok" and stats["filesystem_full"] >= 1
            assert not (point / "kv" / lmdb_tier.RESERVE_NAME).exists()
            for tokens, kv in prompts[-5:]:
                assert_same_kv(store.get(tokens), kv)


def test_close_gives_up_writing_back_to_a_files_dir_that_stops_answering(tmp_path, monkeypatch):
    """``files_write_policy="write_back"``: close writes host RAM's blocks back to the files tier itself, not
    through the write-behind; on a frozen share it waited for ever. It gives up once no block is written for
    ``STALL_SECONDS``, and the tier is closed once its write ends."""
    monkeypatch.setattr(writebehind, "STALL_SECONDS", 0.5)
    prompts = [(make_tokens(48, seed=i), make_kv(LAYOUT, 48, seed=i)) for i in range(6)]
    with mounted_ext4(tmp_path / "share") as point:
        config = StoreConfig(model_id="m", host_bytes=64 * LAYOUT.block_bytes, files_dir=str(point / "kv"),
                             files_bytes="16MiB", files_sync=True, files_write_policy="write_back")
        store = KVStore(LAYOUT, config)
        try:
            freeze(point)
            try:
                for tokens, kv in prompts:  # host RAM holds them: nothing goes to the share yet
                    store.put(tokens, kv)
                closing = threading.Thread(target=store.close)
                closing.start()
                closing.join(30)
                assert not closing.is_alive()
                assert store.stats()["tiers"]["files"]["writes"] == "suspended"
            finally:
                freeze(point, frozen=False)
        finally:
            store.close()
    for _ in range(300):
        if not _files_threads():
            break
        time.sleep(0.1)
    assert not _files_threads()


def test_a_second_store_on_a_held_disk_dir_of_a_frozen_disk_is_refused_at_once(tmp_path):
    """Opening a directory another store holds, on a filesystem that stopped answering: ``mkdir`` of the
    existing directory and the lock file's open for writing waited for the thaw before the lock said no."""
    with mounted_ext4(tmp_path / "share") as point:
        config = StoreConfig(model_id="m", host_bytes=0, disk_dir=str(point / "kv"), disk_bytes="4MiB")
        with KVStore(LAYOUT, config):
            freeze(point)
            try:
                refused = []

                def second() -> None:
                    with pytest.raises(DirectoryInUseError):
                        KVStore(LAYOUT, config)
                    refused.append(True)
                opening = threading.Thread(target=second, daemon=True)
                opening.start()
                opening.join(20)
                assert refused == [True]
            finally:
                freeze(point, frozen=False)
