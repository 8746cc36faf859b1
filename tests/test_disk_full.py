"""A tier whose disk fills (a real small tmpfs) still serves what it holds: a failed write suspends writes to
the tier for ``degraded_seconds``, never its reads. It made every block there a miss for 30 s, and again
after each retried write while the disk stayed full."""

from __future__ import annotations

import pytest

from conftest import assert_same_kv, make_kv, make_tokens, mounted_tmpfs, remount, tiny_layout
from kvstore.blockformat import HEADER_BYTES
from kvstore import KVStore, StoreConfig

LAYOUT = tiny_layout()


@pytest.mark.parametrize("tier", ["lmdb", "files"])
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
