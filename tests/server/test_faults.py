"""A server killed, stopped and restarted under load: clients recover on their own and nothing acknowledged is lost.

``--durable true``: a PUT is acknowledged only after its LMDB commit (fsync'ed), so every block a
client was told STORED or PRESENT must survive a SIGKILL. Without it, a PUT is acknowledged once in
RAM: a SIGTERM (graceful shutdown) must still write every one of them to disk, a SIGKILL may lose
the newest but never serve wrong bytes.
"""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch

from conftest import make_kv, mounted_tmpfs, remount, tiny_layout
from kvstore.blockformat import BlockHeader
from kvstore.client import Connection
from kvstore.protocol import Header, Op, PutResult, pack_hello, put_item_header
from kvstore.tiers.remote import FAILURES, RemoteTier

from .conftest import TOKEN, ServerProcess

LAYOUT = tiny_layout()
FINGERPRINT = b"fault-test-layer"


def blob_of(key: bytes) -> bytes:
    rng = random.Random(key)
    payload = rng.randbytes(rng.randrange(100, 16 << 10))
    return BlockHeader.for_payload(key, FINGERPRINT, payload).pack() + payload


def kv_of(key: bytes) -> torch.Tensor:
    return make_kv(LAYOUT, 16, seed=int.from_bytes(key[-4:], "little"))


def kv_key(worker: int, i: int) -> bytes:
    return b"kv-%02d-" % worker + b"#" * 22 + i.to_bytes(4, "little")


def missing_or_wrong(server: ServerProcess, keys) -> list[bytes]:
    """The ``keys`` (blobs from ``blob_of``) the server does not return with exact bytes."""
    keys = sorted(keys)
    got: dict[int, bytearray] = {}

    def sink(i: int, size: int) -> list[memoryview]:
        got[i] = bytearray(size)
        return [memoryview(got[i])]

    conn = server.connect(timeout=30)
    try:
        sizes = conn.get(keys, sink)
    finally:
        conn.close()
    return [k for i, (k, size) in enumerate(zip(keys, sizes)) if size is None or bytes(got[i]) != blob_of(k)]


def put_acked(conn: Connection, keys) -> list[bytes]:
    results = conn.put([(k, [blob_of(k)]) for k in keys])
    return [k for k, r in zip(keys, results) if r in (PutResult.STORED, PutResult.PRESENT)]


class BlobWriter(threading.Thread):
    """Puts batches of blobs on its own Connection until stopped, reconnecting after any failure;
    ``acked`` holds every key the server acknowledged."""

    def __init__(self, server: ServerProcess, name: str, batch: int = 4):
        super().__init__(daemon=True)
        self.server, self.tag, self.batch = server, name, batch
        self.acked: set[bytes] = set()
        self.failures = 0
        self.stop = threading.Event()
        self.escaped: list[str] = []

    def run(self) -> None:
        conn, i = None, 0
        try:
            while not self.stop.is_set():
                try:
                    if conn is None:
                        conn = Connection(self.server.url, TOKEN, 2.0)
                    keys = [f"{self.tag}-{i + j}".encode() for j in range(self.batch)]
                    i += self.batch
                    self.acked.update(put_acked(conn, keys))
                except OSError:  # ConnectionError, TimeoutError, ServerError: the server is down
                    self.failures += 1
                    if conn is not None:
                        conn.close()
                    conn = None
                    time.sleep(0.05)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.escaped.append(f"{type(exc).__name__}: {exc}")
        finally:
            if conn is not None:
                conn.close()


class TierWorker(threading.Thread):
    """Puts one KV block at a time through a RemoteTier and reads back earlier acknowledged ones. A call
    the server fails raises one of the tier's ``FAILURES`` (counted in ``failures``, as the store's breaker
    would); nothing else may escape. ``last_hit``: when a read last hit."""

    def __init__(self, server: ServerProcess, worker: int):
        super().__init__(daemon=True)
        self.worker = worker
        self.tier = RemoteTier(server.url, LAYOUT, TOKEN, timeout_seconds=1.0)
        self.acked: list[bytes] = []
        self.last_hit = 0.0
        self.wrong: list[bytes] = []
        self.escaped: list[str] = []
        self.failures = 0
        self.stop = threading.Event()

    def run(self) -> None:
        rng = random.Random(self.worker)
        i = 0
        try:
            while not self.stop.is_set():
                k = kv_key(self.worker, i)
                i += 1
                try:
                    if self.tier.put_many([(k, kv_of(k))]) == 1:
                        self.acked.append(k)
                    asked = rng.sample(self.acked, min(3, len(self.acked)))
                    outs = [torch.empty(LAYOUT.block_shape, dtype=LAYOUT.dtype) for _ in asked]
                    for k, ok, out in zip(asked, self.tier.get_many_into(asked, outs), outs):
                        if ok:
                            self.last_hit = time.monotonic()
                            if not torch.equal(out, kv_of(k)):
                                self.wrong.append(k)
                except FAILURES:  # the server is gone (or inside the tier's back-off): try again later
                    self.failures += 1
                time.sleep(0.002)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.escaped.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.tier.close()


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def all_acked_kv_readable(server: ServerProcess, keys) -> list[bytes]:
    tier = RemoteTier(server.url, LAYOUT, TOKEN, timeout_seconds=30.0)
    try:
        keys = sorted(keys)
        outs = [torch.empty(LAYOUT.block_shape, dtype=LAYOUT.dtype) for _ in keys]
        found = tier.get_many_into(keys, outs)
        return [k for k, ok, out in zip(keys, found, outs) if not ok or not torch.equal(out, kv_of(k))]
    finally:
        tier.close()


@pytest.mark.crash
def test_sigkill_under_durable_load_then_restart(tmp_path):
    server = ServerProcess(tmp_path / "srv", "--host-bytes", "8MiB", "--disk-bytes", "256MiB",
                           "--durable", "true").start()
    tiers = [TierWorker(server, w) for w in range(4)]
    writers = [BlobWriter(server, f"blob-{w}") for w in range(2)]
    workers = tiers + writers
    try:
        for worker in workers:
            worker.start()
        assert wait_for(lambda: all(len(w.acked) >= 10 for w in workers), 30)
        server.kill()  # SIGKILL mid-run: no flush, no goodbye
        killed = time.monotonic()
        acked_before = {w.tag: set(w.acked) for w in writers}
        kv_before = {w.worker: list(w.acked) for w in tiers}
        time.sleep(0.3)
        server.restart()  # same data dir, same port
        restarted = time.monotonic()
        # the same RemoteTier objects serve hits again on their own, within their back-off (at most 2 s)
        assert wait_for(lambda: all(w.last_hit > restarted for w in tiers), 30), \
            [(w.worker, w.tier.last_error, w.tier.stats()) for w in tiers]
        assert wait_for(lambda: all(len(w.acked) > len(acked_before[w.tag]) for w in writers), 30)
    finally:
        for worker in workers:
            worker.stop.set()
        for worker in workers:
            worker.join(30)
    assert [e for w in workers for e in w.escaped] == []
    assert [k for w in tiers for k in w.wrong] == []
    assert all(w.failures >= 1 for w in tiers)  # each of them did see the server go
    assert all(w.failures >= 1 for w in writers)
    print(f"\nkilled after {sum(len(a) for a in acked_before.values()) + sum(map(len, kv_before.values()))} "
          f"acknowledged puts; recovered {max(w.last_hit for w in tiers) - killed:.2f} s after the kill")
    # every block acknowledged (before the kill, and after the restart) is there with its exact bytes
    assert missing_or_wrong(server, set().union(*(w.acked for w in writers))) == []
    assert all_acked_kv_readable(server, [k for w in tiers for k in w.acked]) == []
    assert all(set(kv_before[w.worker]) <= set(w.acked) for w in tiers)
    server.kill()


@pytest.mark.slow
@pytest.mark.crash
def test_repeated_sigkill_and_restart_cycles_lose_nothing_acknowledged(tmp_path):
    server = ServerProcess(tmp_path / "srv", "--host-bytes", "4MiB", "--disk-bytes", "128MiB",
                           "--durable", "true").start()
    acked: set[bytes] = set()
    try:
        for cycle in range(5):
            assert missing_or_wrong(server, acked) == []
            conn = server.connect()
            try:
                keys = [f"cycle-{cycle}-{i}".encode() for i in range(40)]
                done = put_acked(conn, keys)
                assert done == keys
                acked.update(done)
            finally:
                conn.close()
            writer = BlobWriter(server, f"during-{cycle}")  # and some more in flight when the kill comes
            writer.start()
            assert wait_for(lambda: len(writer.acked) >= 8, 30)
            server.kill()
            writer.stop.set()
            writer.join(30)
            assert writer.escaped == []
            acked.update(writer.acked)
            server.restart()
            assert server.alive()
        assert missing_or_wrong(server, acked) == []
        conn = server.connect()
        try:
            assert conn.stats()["blocks"]["blocks"] >= len(acked)
        finally:
            conn.close()
    finally:
        server.kill()


@pytest.mark.crash
def test_without_durable_a_sigkill_may_lose_the_newest_puts_but_never_serves_wrong_bytes(tmp_path):
    server = ServerProcess(tmp_path / "srv", "--host-bytes", "8MiB", "--disk-bytes", "64MiB").start()
    try:
        conn = server.connect()
        keys = [f"volatile-{i}".encode() for i in range(300)]
        try:
            assert put_acked(conn, keys) == keys
        finally:
            conn.close()
        server.kill()
        server.restart()
        conn = server.connect()
        try:
            got: dict[int, bytearray] = {}
            sizes = conn.get(keys, lambda i, size: [memoryview(got.setdefault(i, bytearray(size)))])
        finally:
            conn.close()
        present = [k for k, size in zip(keys, sizes) if size is not None]
        assert all(bytes(got[keys.index(k)]) == blob_of(k) for k in present)
        print(f"\n{len(present)} of {len(keys)} RAM-acknowledged blocks survived the SIGKILL")
    finally:
        server.kill()


def test_sigterm_under_load_writes_every_acknowledged_block_and_exits_0(tmp_path):
    # not durable: acknowledged once in RAM; the graceful shutdown must flush them all to LMDB
    server = ServerProcess(tmp_path / "srv", "--host-bytes", "64MiB", "--disk-bytes", "256MiB").start()
    idle = server.connect()  # an idle connection must not hold the shutdown up
    writers = [BlobWriter(server, f"term-{w}", batch=16) for w in range(3)]
    try:
        for writer in writers:
            writer.start()
        assert wait_for(lambda: all(len(w.acked) >= 100 for w in writers), 30)
        start = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - start < 15
        assert any("stopped" in line for line in server.output)
        for writer in writers:
            writer.stop.set()
            writer.join(30)
        assert [e for w in writers for e in w.escaped] == []
        acked = set().union(*(w.acked for w in writers))
        server.restart()
        assert missing_or_wrong(server, acked) == []
        conn = server.connect()
        try:
            stats = conn.stats()
        finally:
            conn.close()
        assert stats["blocks"]["blocks"] == len(acked)
        assert stats["blocks"]["hits_disk"] > 0  # read back from LMDB after the restart
    finally:
        idle.close()
        server.kill()


def test_a_client_that_vanishes_mid_put_stores_nothing_and_disturbs_no_one(tmp_path):
    server = ServerProcess(tmp_path / "srv", "--host-bytes", "16MiB", "--disk-bytes", "0").start()
    try:
        witness = server.connect()
        half = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        payload = pack_hello(TOKEN)
        half.sendall(Header(Op.HELLO, 1, 0, len(payload)).pack() + payload)
        reply = b""
        while len(reply) < 32:
            reply += half.recv(4096)
        blob = blob_of(b"half-put")
        body = put_item_header(b"half-put", len(blob)) + blob
        half.sendall(Header(Op.PUT, 2, 1, len(body)).pack() + body[:len(body) // 2])
        half.close()  # gone mid-frame
        assert put_acked(witness, [b"whole-put"]) == [b"whole-put"]
        assert witness.get([b"half-put"], lambda i, size: None) == [None]
        assert missing_or_wrong(server, [b"whole-put"]) == []
        assert witness.ping(b"fine") == b"fine"
        witness.close()
    finally:
        server.kill()


# -- a full disk -----------------------------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    """A 3 MiB tmpfs to fill (grown back with ``remount(point, "size=...")``); skips where mounting is refused."""
    with mounted_tmpfs(tmp_path / "small", "size=3m") as point:
        yield point


def _metric_value(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return float(next(line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(name + " ")))


@pytest.mark.slow
def test_a_full_disk_refuses_puts_at_once_serves_reads_and_recovers_on_its_own(server_factory, small_fs):
    """The data directory on a 3 MiB filesystem: once it is full every PUT gets its reply at once (REJECTED,
    not stored) instead of hanging, GETs go on, stats and /metrics say the disk is failing; when space comes
    back, writes resume without a restart; and every block acknowledged (durable PUTs) is exact afterwards."""
    srv = server_factory("--durable", "true", "--host-bytes", "8MiB", "--disk-bytes", "64MiB",
                         "--disk-sync", "false", data_dir=small_fs / "data")
    conn = Connection(srv.url, TOKEN, 5.0)
    acknowledged: dict[bytes, bytes] = {}
    try:
        refused = None
        for i in range(64):  # 64 x 128 KiB: twice what the filesystem holds
            key = b"full-%03d" % i
            data = BlockHeader.for_payload(key, b"F" * 16, random.Random(i).randbytes(128 << 10)).pack() + \
                random.Random(i).randbytes(128 << 10)
            started = time.monotonic()
            result = conn.put([(key, [data])])[0]
            assert time.monotonic() - started < 5  # a reply within the client's timeout, never a hang
            if result == PutResult.STORED:
                acknowledged[key] = data
            elif refused is None:
                refused = i
        assert refused is not None and acknowledged, "the filesystem never filled"
        stats = conn.stats()["server"]
        assert stats["disk_failing"] == 1 and stats["disk_refused_blocks"] >= 1
        assert _metric_value(srv.metrics_url, "kvstore_server_disk_failing") == 1
        shown = subprocess.run([sys.executable, "-m", "kvstore.cli", "stats", "--url", srv.url, "--token", TOKEN],
                               capture_output=True, text=True, timeout=60, cwd=small_fs.parent)
        assert "DISK FAILING" in shown.stdout, shown
        for key, data in list(acknowledged.items())[:4]:  # reads go on while writes fail
            out = bytearray(len(data))
            assert conn.get([key], lambda i, size: [memoryview(out)]) == [len(data)] and bytes(out) == data
        assert remount(small_fs, "size=128m").returncode == 0  # space comes back
        deadline, stored = time.monotonic() + 20, False
        while time.monotonic() < deadline and not stored:
            key = b"after-%d" % int(time.monotonic() * 1000)
            data = BlockHeader.for_payload(key, b"F" * 16, b"x" * 4096).pack() + b"x" * 4096
            stored = conn.put([(key, [data])])[0] == PutResult.STORED
            if stored:
                acknowledged[key] = data
            time.sleep(0.2)
        assert stored, "writes did not resume once the filesystem had room"
        assert conn.stats()["server"]["disk_failing"] == 0
    finally:
        conn.close()
    assert srv.stop() == 0
    srv.restart()  # every acknowledged block, exact, from the disk
    conn = Connection(srv.url, TOKEN, 10.0)
    try:
        for key, data in acknowledged.items():
            out = bytearray(len(data))
            assert conn.get([key], lambda i, size: [memoryview(out)]) == [len(data)], key
            assert bytes(out) == data
    finally:
        conn.close()
