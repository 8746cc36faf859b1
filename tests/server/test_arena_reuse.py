"""The server's receive arena: blocks land in it, its extents are reused as blocks are evicted, and no reply
ever carries bytes of a block that replaced the one asked for."""

from __future__ import annotations

import random
import threading
import urllib.request

from kvstore.blockformat import BlockHeader
from kvstore.client import Connection
from kvstore.protocol import PutResult

from .conftest import TOKEN

FINGERPRINT = b"arena-test-layout"
BLOB_PAYLOAD = 192 << 10  # 8 MiB of RAM hold about 40 of them: every round evicts and reuses extents


def blob_of(key: bytes) -> bytes:
    payload = random.Random(key).randbytes(BLOB_PAYLOAD)
    return BlockHeader.for_payload(key, FINGERPRINT, payload).pack() + payload


def _operator_stats(server) -> dict:
    conn = server.connect()
    try:
        return conn.stats()["server"]
    finally:
        conn.close()


def test_puts_land_in_the_arena_and_a_concurrent_get_never_sees_a_reused_extent(server_factory):
    server = server_factory("--host-bytes", "8MiB", "--disk-bytes", "0")
    keys = [f"arena/{i}".encode() for i in range(400)]
    done = threading.Event()
    failures: list[str] = []
    hits = [0]

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        conn = server.connect()
        try:
            while not done.is_set():
                wanted = rng.sample(keys, 6)
                outs = {}

                def sink(i: int, size: int) -> list[memoryview]:
                    outs[i] = bytearray(size)
                    return [memoryview(outs[i])]
                for i, size in enumerate(conn.get(wanted, sink)):
                    if size is None:
                        continue
                    hits[0] += 1
                    if bytes(outs[i]) != blob_of(wanted[i]):
                        failures.append(f"GET {wanted[i]!r} returned other bytes")
        finally:
            conn.close()

    readers = [threading.Thread(target=reader, args=(seed,)) for seed in range(3)]
    for thread in readers:
        thread.start()
    writer = server.connect()
    try:
        for start in range(0, len(keys), 8):  # 400 blobs through 8 MiB: most are evicted, their extents reused
            batch = keys[start:start + 8]
            assert writer.put([(k, [blob_of(k)]) for k in batch]) == [PutResult.STORED] * len(batch)
    finally:
        done.set()
        for thread in readers:
            thread.join(60)
        writer.close()
    assert not failures, failures[:3]
    assert hits[0] > 0  # the readers did overlap the writer
    stats = _operator_stats(server)
    assert stats["arena_capacity"] >= 8 << 20
    assert 0 < stats["arena_taken"] <= stats["arena_capacity"]
    assert stats["ram_bytes"] <= 8 << 20
    metrics = urllib.request.urlopen(server.metrics_url + "/metrics", timeout=5).read().decode()
    assert 'kvstore_server_arena_bytes{state="taken"}' in metrics
    # The newest blocks are all still there, exact.
    conn = server.connect()
    try:
        outs = {}

        def keep(i: int, size: int) -> list[memoryview]:
            outs[i] = bytearray(size)
            return [memoryview(outs[i])]
        newest = keys[-16:]
        assert None not in conn.get(newest, keep)
        assert all(bytes(outs[i]) == blob_of(k) for i, k in enumerate(newest))
    finally:
        conn.close()


def test_preallocate_false_allocates_per_block(server_factory):
    server = server_factory("--host-bytes", "8MiB", "--disk-bytes", "0", "--preallocate", "false")
    assert not any("preallocating" in line for line in server.output)
    conn = Connection(server.url, TOKEN, 10.0)
    try:
        key = b"arena/off"
        assert conn.put([(key, [blob_of(key)])]) == [PutResult.STORED]
        assert conn.stats()["server"]["arena_capacity"] == 0
    finally:
        conn.close()


def test_the_banner_says_what_is_preallocated(server_factory):
    server = server_factory("--host-bytes", "8MiB", "--disk-bytes", "0")
    assert any("preallocating 8.0 MiB of RAM" in line for line in server.output), server.output
