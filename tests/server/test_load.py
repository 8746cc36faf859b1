"""Many clients at once against one server: mixed PUTs and GETs, shared keys put by many clients together.

Every blob's bytes derive from its key, so any client can check any hit byte for byte. A PUT
acknowledged STORED or PRESENT is a promise: the block is readable afterwards with the exact bytes
(the server has room for everything, so nothing may be evicted). Of all the clients that put the
same key at once, exactly one is told STORED.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import TESTS_DIR, make_kv, tiny_layout
from kvstore.blockformat import BlockHeader
from kvstore.client import Connection
from kvstore.protocol import Header, Op, PutResult, ServerError, put_item_header
from kvstore.server.blobs import BLOCK_OVERHEAD_BYTES
from kvstore.tiers.remote import RemoteTier

from .conftest import TOKEN

FINGERPRINT = b"load-test-layout"  # the server checks blobs, it does not know layouts
THREAD_CLIENTS = 32
TIER_CLIENTS = 8
PROCESS_CLIENTS = 2
ROUNDS = 25
SHARED = 48  # blob keys every Connection client puts, all at once
SHARED_KV = 16  # KV blocks every RemoteTier client puts
LAYOUT = tiny_layout()


def blob_key(*parts: object) -> bytes:
    return repr(parts).encode()[:32]  # an integrity header holds keys of at most 32 bytes


def blob_of(key: bytes) -> bytes:
    """The blob stored under ``key``: its size (100 B to 24 KiB) and payload derive from the key."""
    rng = random.Random(key)
    payload = rng.randbytes(rng.randrange(100, 24 << 10))
    return BlockHeader.for_payload(key, FINGERPRINT, payload).pack() + payload


def kv_of(key: bytes) -> torch.Tensor:
    seed = int.from_bytes(key[:8], "little") % (1 << 31)
    return make_kv(LAYOUT, 16 if seed % 5 else 1 + seed % 16, seed=seed)


def kv_key(*parts: object) -> bytes:
    return repr(parts).encode().ljust(32, b"#")[:32]


def blob_client(url: str, token: str, client: int, rounds: int, seed: int) -> dict:
    """One client on its own Connection: each round PUTs new private blobs and some shared ones, then GETs a
    mix of its own acknowledged keys (each must hit), shared keys and keys that may not exist yet. Every hit
    is compared with ``blob_of``. Returns what it saw (keys as hex, for a parent process)."""
    rng = random.Random(seed)
    shared = [blob_key("shared", i) for i in range(SHARED)]
    rng.shuffle(shared)
    acked: list[bytes] = []
    stored_shared: list[bytes] = []
    report = {"puts": 0, "gets": 0, "hits": 0, "bytes": 0, "problems": []}
    conn = Connection(url, token, 30.0)
    try:
        for r in range(rounds):
            keys = [blob_key("private", client, r, i) for i in range(3)] + shared[2 * r % SHARED:2 * r % SHARED + 2]
            results = conn.put([(k, [blob_of(k)]) for k in keys])
            report["puts"] += len(keys)
            for k, result in zip(keys, results):
                if result in (PutResult.STORED, PutResult.PRESENT):
                    acked.append(k)
                    if result == PutResult.STORED and k in shared:
                        stored_shared.append(k)
                else:
                    report["problems"].append(f"put {k!r}: {result.name}")
            mine = rng.sample(acked, min(6, len(acked)))
            maybe = [blob_key("private", rng.randrange(THREAD_CLIENTS), rng.randrange(rounds), 0),
                     rng.choice(shared), blob_key("never", client, r)]
            asked = mine + maybe
            buffers: dict[int, bytearray] = {}

            def sink(i: int, size: int) -> list[memoryview]:
                buffers[i] = bytearray(size)
                return [memoryview(buffers[i])]

            sizes = conn.get(asked, sink)
            report["gets"] += len(asked)
            for i, (k, size) in enumerate(zip(asked, sizes)):
                if size is None:
                    if i < len(mine):
                        report["problems"].append(f"acknowledged {k!r} missing")
                    continue
                report["hits"] += 1
                report["bytes"] += size
                if bytes(buffers[i]) != blob_of(k):
                    report["problems"].append(f"get {k!r}: wrong bytes")
    finally:
        conn.close()
    report["acked"] = [k.hex() for k in acked]
    report["stored_shared"] = [k.hex() for k in stored_shared]
    return report


def tier_client(url: str, token: str, client: int, rounds: int, seed: int) -> dict:
    """One RemoteTier (its own pool of 2 connections) putting and getting KV blocks, shared ones included."""
    rng = random.Random(seed)
    shared = [kv_key("kv-shared", i) for i in range(SHARED_KV)]
    acked: list[bytes] = []
    report = {"puts": 0, "gets": 0, "hits": 0, "bytes": 0, "problems": []}
    tier = RemoteTier(url, LAYOUT, token, timeout_seconds=30.0, connections=2)
    try:
        for r in range(rounds):
            keys = [kv_key("kv", client, r, i) for i in range(2)] + rng.sample(shared, 2)
            held = tier.put_many([(k, kv_of(k)) for k in keys])
            report["puts"] += len(keys)
            if held == len(keys):
                acked.extend(keys)
            else:
                report["problems"].append(f"put_many held {held} of {len(keys)}: {tier.last_error}")
            asked = rng.sample(acked, min(5, len(acked))) + [kv_key("kv", rng.randrange(TIER_CLIENTS), r, 1)]
            outs = [torch.empty_like(kv_of(k)) for k in asked]
            found = tier.get_many_into(asked, outs)
            report["gets"] += len(asked)
            for i, (k, ok, out) in enumerate(zip(asked, found, outs)):
                if not ok:
                    if i < len(asked) - 1:
                        report["problems"].append(f"acknowledged {k!r} missing")
                    continue
                report["hits"] += 1
                report["bytes"] += out.nbytes
                if not torch.equal(out.view(torch.uint8), kv_of(k).view(torch.uint8)):
                    report["problems"].append(f"get {k!r}: wrong bytes")
        stats = tier.stats()
        if stats["errors"] or stats["corrupt"]:
            report["problems"].append(f"tier stats {stats}, last error {tier.last_error}")
    finally:
        tier.close()
    report["acked"] = [k.hex() for k in acked]
    report["stored_shared"] = []
    return report


def start_process_client(url: str, client: int) -> subprocess.Popen:
    code = (f"import json; from server.test_load import blob_client; "
            f"print(json.dumps(blob_client({url!r}, {TOKEN!r}, {client}, {ROUNDS}, {1000 + client})))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", code], cwd=str(TESTS_DIR), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_many_clients_put_and_get_and_nothing_acknowledged_is_lost(server_factory):
    # 4 MiB of RAM over 512 MiB of LMDB: reads come from both; nothing is evicted
    server = server_factory("--host-bytes", "4MiB", "--disk-bytes", "512MiB", "--disk-sync", "false")
    processes = [start_process_client(server.url, THREAD_CLIENTS + i) for i in range(PROCESS_CLIENTS)]
    reports: list[dict] = []
    crashed: list[str] = []
    barrier = threading.Barrier(THREAD_CLIENTS + TIER_CLIENTS)

    def run(worker, client: int) -> None:
        try:
            barrier.wait(60)
            reports.append(worker(server.url, TOKEN, client, ROUNDS, client))
        except BaseException as exc:  # noqa: BLE001 - reported below
            crashed.append(f"client {client}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(blob_client, i)) for i in range(THREAD_CLIENTS)]
    threads += [threading.Thread(target=run, args=(tier_client, i)) for i in range(TIER_CLIENTS)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    for proc in processes:
        out, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            crashed.append(f"process client: exit {proc.returncode}: {err[-2000:]}")
        else:
            reports.append(json.loads(out.strip().splitlines()[-1]))
    elapsed = time.perf_counter() - start
    assert not any(thread.is_alive() for thread in threads)
    assert crashed == []
    assert len(reports) == THREAD_CLIENTS + TIER_CLIENTS + PROCESS_CLIENTS
    problems = [p for report in reports for p in report["problems"]]
    assert problems == []

    blocks = sum(r["puts"] + r["gets"] for r in reports)
    moved = sum(r["bytes"] for r in reports)
    print(f"\nload: {len(reports)} clients, {sum(r['puts'] for r in reports)} blocks put, "
          f"{sum(r['gets'] for r in reports)} asked ({sum(r['hits'] for r in reports)} hits, "
          f"{moved / 1e6:.1f} MB read) in {elapsed:.2f} s: {blocks / elapsed:.0f} blocks/s")

    # of all the clients that put a shared key at once, exactly one stored it
    stored = [k for r in reports for k in r["stored_shared"]]
    assert sorted(stored) == sorted({blob_key("shared", i).hex() for i in range(SHARED)})

    # every acknowledged block is there, with its exact bytes
    acked = {bytes.fromhex(k) for r in reports for k in r["acked"]}
    blobs = sorted(k for k in acked if not k.startswith(b"('kv"))
    kvs = sorted(k for k in acked if k.startswith(b"('kv"))
    conn = server.connect()
    try:
        got: dict[int, bytearray] = {}

        def sink(i: int, size: int) -> list[memoryview]:
            got[i] = bytearray(size)
            return [memoryview(got[i])]

        sizes = conn.get(blobs, sink)
        assert [k for k, size in zip(blobs, sizes) if size is None] == []
        assert [k for i, k in enumerate(blobs) if bytes(got[i]) != blob_of(k)] == []
        stats = conn.stats()
    finally:
        conn.close()
    tier = RemoteTier(server.url, LAYOUT, TOKEN, timeout_seconds=30.0)
    try:
        outs = [torch.empty_like(kv_of(k)) for k in kvs]
        assert tier.get_many_into(kvs, outs) == [True] * len(kvs)
        assert all(torch.equal(out, kv_of(k)) for k, out in zip(kvs, outs))
    finally:
        tier.close()

    ns, totals = stats["blocks"], stats["server"]
    assert ns["evicted_capacity"] == 0 and ns["evicted_quota"] == 0
    assert ns["invalid"] == 0 and ns["rejected"] == 0 and ns["corrupt"] == 0
    assert ns["blocks"] == len(acked) == ns["stored"]
    assert ns["hits_ram"] > 0 and ns["hits_disk"] > 0  # 4 MiB of RAM: most reads came from LMDB
    assert totals["ram_bytes"] <= 4 << 20 or totals["write_backlog_bytes"] > 0


def test_more_clients_than_the_connection_limit_get_a_clean_refusal(server_factory):
    server = server_factory("--host-bytes", "16MiB", "--disk-bytes", "0", "--max-connections", "8")
    held = [server.connect() for _ in range(8)]
    try:
        tier = RemoteTier(server.url, LAYOUT, TOKEN, timeout_seconds=2.0)
        block = kv_of(kv_key("limit"))
        with pytest.raises(ServerError):  # refused: a failure the store's breaker sees, not a miss
            tier.put_many([(kv_key("limit"), block)])
        assert "TOO_MANY_CONNECTIONS" in (tier.last_error or "")
        for conn in held[:2]:
            conn.close()

        def put() -> int:
            try:
                return tier.put_many([(kv_key("limit"), block)])
            except ConnectionError:  # still refused, or inside the tier's back-off
                return 0

        deadline = time.monotonic() + 15
        while put() != 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        out = torch.empty_like(block)
        assert tier.get_into(kv_key("limit"), out) and torch.equal(out, block)
        tier.close()
        for conn in held[2:]:
            assert conn.ping(b"still here") == b"still here"
    finally:
        for conn in held:
            conn.close()


def test_one_remote_tier_shared_by_many_threads(server_factory):
    """16 threads on one RemoteTier (a pool of 4 connections): the pool lends each connection to one thread at
    a time, every hit is exact, and the tier's counters add up to what the threads saw."""
    server = server_factory("--host-bytes", "64MiB", "--disk-bytes", "0")
    tier = RemoteTier(server.url, LAYOUT, TOKEN, timeout_seconds=30.0, connections=4)
    seen = {"hits": 0, "misses": 0, "problems": []}
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def run(client: int) -> None:
        rng = random.Random(client)
        hits = misses = 0
        try:
            barrier.wait(60)
            mine: list[bytes] = []
            for r in range(20):
                keys = [kv_key("pool", client, r)] + [kv_key("kv-shared-pool", rng.randrange(8))]
                assert tier.put_many([(k, kv_of(k)) for k in keys]) == 2
                mine.append(keys[0])
                asked = rng.sample(mine, min(3, len(mine))) + [kv_key("pool-never", client, r)]
                outs = [torch.empty_like(kv_of(k)) for k in asked]
                found = tier.get_many_into(asked, outs)
                assert found == [True] * (len(asked) - 1) + [False]
                assert all(torch.equal(out, kv_of(k)) for k, out in zip(asked[:-1], outs))
                hits += len(asked) - 1
                misses += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            with lock:
                seen["problems"].append(f"client {client}: {type(exc).__name__}: {exc}")
        with lock:
            seen["hits"] += hits
            seen["misses"] += misses

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    try:
        assert seen["problems"] == []
        stats = tier.stats()
        assert stats["hits"] == seen["hits"]
        assert (stats["errors"], stats["timeouts"], stats["unavailable"], stats["corrupt"]) == (0, 0, 0, 0)
        assert stats["blocks_written"] == 16 * 20 + 8 and stats["blocks"] == 16 * 20 + 8
    finally:
        tier.close()


def test_concurrent_puts_keep_the_write_backlog_within_its_bound(server_factory):
    """Eight connections PUT 8 MiB frames behind a 1 MiB backlog over a synced disk. Each PUT checked the
    backlog before reading its payload and added to it after, so every connection got past the check at
    once: the backlog reached 24 MiB, and the RAM held past host_bytes + backlog + one frame. Now a PUT is
    admitted while the backlog and the PUTs being received leave room for it, or when nothing is queued."""
    frame_blobs, blob_bytes = 8, 1 << 20
    server = server_factory("--host-bytes", "4MiB", "--disk-bytes", "512MiB", "--write-backlog-bytes", "1MiB",
                            "--disk-sync", "true", "--preallocate", "false")
    frame = frame_blobs * (blob_bytes + 72)
    payload = os.urandom(blob_bytes)

    def writer(client: int) -> None:
        conn = server.connect(timeout=60.0)
        try:
            for round_ in range(3):
                items = []
                for i in range(frame_blobs):
                    key = blob_key("backlog", client, round_, i)
                    items.append((key, [BlockHeader.for_payload(key, FINGERPRINT, payload).pack(), payload]))
                assert set(conn.put(items)) <= {PutResult.STORED, PutResult.PRESENT}
        finally:
            conn.close()

    threads = [threading.Thread(target=writer, args=(c,)) for c in range(8)]
    monitor = server.connect()
    peak_backlog = peak_ram = 0
    try:
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            totals = monitor.stats()["server"]
            peak_backlog = max(peak_backlog, totals["write_backlog_bytes"])
            peak_ram = max(peak_ram, totals["ram_bytes"])
            time.sleep(0.002)
    finally:
        for thread in threads:
            thread.join(120)
        monitor.close()
    frame_cost = frame + frame_blobs * BLOCK_OVERHEAD_BYTES  # a block counts its overhead too (blobs.py)
    assert 0 < peak_backlog <= max(1 << 20, frame_cost), peak_backlog  # the bound, or one frame alone
    assert peak_ram <= (4 << 20) + (1 << 20) + frame_cost, peak_ram


def test_a_put_that_stalls_after_announcing_a_large_blob_blocks_no_one(server_factory):
    """The admission counted a PUT's whole announced payload from its header on: one client announcing the
    backlog's worth and sending nothing more made every other tenant's PUT wait for its request timeout
    (60 s). Bytes count now as they are about to arrive, a chunk ahead at most."""
    server = server_factory("--host-bytes", "64MiB", "--disk-bytes", "256MiB", "--write-backlog-bytes", "16MiB",
                            "--disk-sync", "false", "--preallocate", "false")
    staller = server.connect()
    key = blob_key("stalled")
    staller._sock.sendall(Header(int(Op.PUT), 1000, 1, 1 + len(key) + 8 + (16 << 20)).pack()
                          + put_item_header(key, 16 << 20) + b"x" * 1000)  # then nothing
    other = server.connect(timeout=5.0)
    try:
        items = [(blob_key("other", i), [blob_of(blob_key("other", i))]) for i in range(8)]
        assert other.put(items) == [PutResult.STORED] * 8  # timed out after 5 s before
    finally:
        other.close()
        staller.close()
