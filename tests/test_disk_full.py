"""A tier whose disk fills (a real small tmpfs) still serves what it holds: a failed write suspends writes to
the tier for ``degraded_seconds``, never its reads. It made every block there a miss for 30 s, and again
after each retried write while the disk stayed full."""

from __future__ import annotations

import pytest

from conftest import assert_same_kv, make_kv, make_tokens, mounted_tmpfs, remount, tiny_layout
from kvstore.blockformat import HEADER_BYTES
from kvstore import KVStore, StoreConfig
from kvstore.tiers.files import FilesTier
from kvstore.tiers.host import HostTier

LAYOUT = tiny_layout()


@pytest.mark.parametrize("tier", ["lmdb"])
@pytest.mark.parametrize("host", [False, True])
def test_a_full_disk_keeps_serving_what_it_holds(tmp_path, tier, host):
    with mounted_tmpfs(tmp_path / "small", "size=1m") as point:
        where = str(point / "kv")
        settings = dict(disk_dir=where, disk_bytes="16MiB") if tier == "lmdb" else dict(files_dir=where,
                                                                                         files_bytes="16MiB")
        # A host tier of one block: reads of the early prompts must come from the full disk.
        config = StoreConfig(model_id="m", host_bytes=LAYOUT.block_bytes if host else 0, degraded_seconds=60.0,
                             **settings)
        prompts = [(make_tokens(48, seed=i), make_kv(LAYOUT, 48, seed=i)) for i in range(200)]
        with KVStore(LAYOUT, config) as store:
            for tokens, kv in prompts[:5]:
                store.put(tokens, kv)
            assert store.flush(timeout=30)
            for tokens, kv in prompts[5:]:  # 1 MiB fills: a write fails (ENOSPC, or LMDB's commit fails)
                store.put(tokens, kv)
            assert store.flush(timeout=30)
            stats = store.stats()["tiers"][tier]
            assert stats["errors"] >= 1 and stats["writes"] == "suspended"
            assert stats["state"] == "healthy"  # reads are not bypassed
            for tokens, kv in prompts[:5]:
                assert store.lookup(tokens) == 48
                assert_same_kv(store.get(tokens), kv)
            later = store.stats()["tiers"][tier]
            assert later["hits"] > stats["hits"]
            if not host:  # the puts after the failure were not sent to the full disk at all
                assert later["write_suspended"] >= 1


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


@pytest.mark.parametrize("host", [False, True])
def test_a_files_tier_on_a_filesystem_smaller_than_files_bytes_keeps_to_the_room_it_has(tmp_path, host):
    """A 1 MiB filesystem under ``files_bytes=16MiB``: the first ENOSPC suspended the tier's writes for good;
    it kept its oldest blocks and the newest prompts never landed. It now evicts within the room it has, and
    holds more again once room comes back."""
    with mounted_tmpfs(tmp_path / "small", "size=1m") as point:
        files = FilesTier(point / "kv", 16 << 20, LAYOUT, rescan_seconds=0.0)  # scans at every write
        tiers = [HostTier(LAYOUT, LAYOUT.block_bytes, pin_memory=False), files] if host else [files]
        config = StoreConfig(model_id="m", degraded_seconds=60.0)  # its tiers are these
        prompts = [(make_tokens(48, seed=i), make_kv(LAYOUT, 48, seed=i)) for i in range(120)]
        ballast = point / "ballast"
        ballast.write_bytes(b"x" * (256 << 10))  # another user's quarter of the filesystem
        with KVStore(LAYOUT, config, tiers=tiers) as store:
            for tokens, kv in prompts[:100]:
                store.put(tokens, kv)
                assert store.flush(timeout=30)
            stats = store.stats()["tiers"]["files"]
            assert stats["filesystem_full"] >= 1 and stats["errors"] == 0 and stats["writes"] != "suspended"
            assert stats["capacity_bytes"] <= 768 << 10 and stats["used_bytes"] <= stats["capacity_bytes"]
            for tokens, kv in prompts[97:100]:  # the newest prompts landed, exact
                assert store.lookup(tokens) == 48
                assert_same_kv(store.get(tokens), kv)
            assert store.lookup(prompts[0][0]) < 48  # the oldest made room
            ballast.unlink()
            for tokens, kv in prompts[100:]:  # room came back: a scan raises the capacity again
                store.put(tokens, kv)
                assert store.flush(timeout=30)
            later = store.stats()["tiers"]["files"]
            assert later["capacity_bytes"] > stats["capacity_bytes"] + (128 << 10) and later["errors"] == 0
            for tokens, kv in prompts[-3:]:
                assert_same_kv(store.get(tokens), kv)
