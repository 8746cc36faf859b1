"""The cache server at the byte level: frames written by hand with ``socket`` + ``kvstore.protocol``.

Every operation's round trip, version negotiation, pipelining, each error
status and limit (each followed by a check that a well-behaved client on
another connection is unaffected), the Prometheus endpoint and graceful
shutdown. Servers are real ``kvstore serve`` processes; most tests share
one module-scoped server with small limits.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import threading
import time
import weakref
import urllib.error
import urllib.request

import pytest

from kvstore.blockformat import HEADER_BYTES as BLOB_HEADER_BYTES
from kvstore.blockformat import BlockHeader
from kvstore.client import Connection, LazyBlob
from kvstore.server.blobs import BLOCK_OVERHEAD_BYTES
from kvstore.protocol import (FLAG_ERROR, FLAG_REPLY, HEADER_BYTES, MAX_KEY_BYTES, MISSING, U64, Header, Op,
                              PutResult, ServerError, Status, Welcome, pack_hello, pack_keys, put_item_header,
                              unpack_json, unpack_keys)

from .conftest import TOKEN, ServerProcess

LAYOUT = b"L" * 16
MAX_FRAME = 1 << 20
MAX_INFLIGHT = 2 << 20
MAX_KEYS = 16
TIMEOUT = 2.0


# -- helpers: blobs and raw frames ------------------------------------------------------------------------------------

def blob(key: bytes, payload: bytes) -> bytes:
    """A valid blob: the 72-byte integrity header naming ``key``, then ``payload``."""
    return BlockHeader.for_payload(key, LAYOUT, payload).pack() + payload


def payload_of(seed: object, size: int) -> bytes:
    return random.Random(repr(seed)).randbytes(size)


def put_payload(items: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(put_item_header(key, len(data)) + data for key, data in items)


def host_port(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


class Raw:
    """A hand-driven connection: frames are whatever the test packs."""

    def __init__(self, url: str, timeout: float = TIMEOUT):
        self.sock = socket.create_connection(host_port(url), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.next_id = 100

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Raw":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def frame(self, op: int, payload: bytes = b"", count: int = 0, *, request_id: int | None = None,
              flags: int = 0, status: int = 0, version: int = 1, payload_len: int | None = None) -> tuple[int, bytes]:
        if request_id is None:
            self.next_id += 1
            request_id = self.next_id
        size = len(payload) if payload_len is None else payload_len
        return request_id, Header(op, request_id, count, size, flags, status, version).pack() + payload

    def send(self, op: int, payload: bytes = b"", count: int = 0, **fields) -> int:
        request_id, data = self.frame(op, payload, count, **fields)
        self.sock.sendall(data)
        return request_id

    def recv_exact(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = self.sock.recv(min(size - len(data), 1 << 20))
            if not chunk:
                raise EOFError(f"server closed the connection after {len(data)} of {size} bytes")
            data += chunk
        return bytes(data)

    def reply(self) -> tuple[Header, bytes]:
        header = Header.unpack(self.recv_exact(HEADER_BYTES))
        return header, self.recv_exact(header.payload_len)

    def ok(self, request_id: int, op: int) -> tuple[Header, bytes]:
        """The next reply, which must be the successful reply to ``request_id``."""
        header, payload = self.reply()
        assert header.flags == FLAG_REPLY, (header, payload[:300])
        assert (header.request_id, header.opcode, header.status) == (request_id, op, Status.OK)
        return header, payload

    def call(self, op: int, payload: bytes = b"", count: int = 0) -> tuple[Header, bytes]:
        return self.ok(self.send(op, payload, count), op)

    def hello(self, token: str | None = TOKEN, low: int = 1, high: int = 1) -> Welcome:
        return Welcome.unpack(self.call(Op.HELLO, pack_hello(token, low, high))[1])

    def error(self, status: Status, request_id: int | None = None, op: int | None = None) -> str:
        """The next reply must be an error with ``status``; then the server must close the connection."""
        header, payload = self.reply()
        message = payload.decode()
        assert header.flags == FLAG_REPLY | FLAG_ERROR, (header, message)
        assert header.status == status, (Status(header.status).name, message)
        assert header.count == 0
        if request_id is not None:
            assert header.request_id == request_id
        if op is not None:
            assert header.opcode == op
        assert message  # a message naming what was expected
        self.assert_closed()
        return message

    def assert_closed(self) -> None:
        try:
            data = self.sock.recv(1 << 16)
        except ConnectionResetError:
            return
        except TimeoutError:
            pytest.fail("the server kept the connection open after an error reply")
        assert data == b"", f"expected the server to close the connection, got {data[:100]!r}"


def sizes_and_blobs(count: int, payload: bytes) -> list[bytes | None]:
    """A GET reply's payload, split into blobs (None for a miss)."""
    sizes = [U64.unpack_from(payload, 8 * i)[0] for i in range(count)]
    out: list[bytes | None] = []
    pos = 8 * count
    for size in sizes:
        if size == MISSING:
            out.append(None)
        else:
            out.append(payload[pos:pos + size])
            pos += size
    assert pos == len(payload)
    return out


def list_all(raw: Raw) -> list[bytes]:
    keys: list[bytes] = []
    while True:
        header, payload = raw.call(Op.LIST, U64.pack(len(keys)), MAX_KEYS)
        page = unpack_keys(payload, header.count)
        keys += page
        if len(page) < MAX_KEYS:
            return keys


# -- servers -----------------------------------------------------------------------------------------------------------

def start_server(tmp_path_factory, name: str, *args: str, token: str | None = TOKEN) -> ServerProcess:
    return ServerProcess(tmp_path_factory.mktemp(name), *args, token=token).start()


def stop_server(server: ServerProcess) -> None:
    server.kill()
    if server.proc is not None and server.proc.stdout is not None:
        server.proc.stdout.close()


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """Small limits: 1 MiB frames, 2 MiB in flight, 16 keys per request."""
    server = start_server(tmp_path_factory, "protocol", "--host-bytes", "32MiB", "--disk-bytes", "64MiB",
                          "--disk-sync", "false", "--max-frame-bytes", "1MiB", "--max-inflight-bytes", "2MiB",
                          "--max-keys", str(MAX_KEYS))
    yield server
    stop_server(server)


KNOWN_KEY = hashlib.sha256(b"known block").digest()
KNOWN_BLOB = blob(KNOWN_KEY, payload_of("known", 50_000))


@pytest.fixture(scope="module")
def witness(srv):
    """A well-behaved client on its own long-lived connection, holding a known block."""
    conn = Connection(srv.url, TOKEN, 10.0)
    assert conn.put([(KNOWN_KEY, [KNOWN_BLOB])])[0] in (PutResult.STORED, PutResult.PRESENT)
    yield conn
    conn.close()


_fresh = iter(range(1 << 30))


def assert_unaffected(server: ServerProcess, witness: Connection) -> None:
    """The server is up, the long-lived connection still gets exact bytes, and a new one can PUT + GET."""
    assert server.alive()
    got = {}
    assert witness.get([KNOWN_KEY], lambda i, size: [memoryview(got.setdefault(i, bytearray(size)))]) == \
        [len(KNOWN_BLOB)]
    assert bytes(got[0]) == KNOWN_BLOB
    key = f"fresh/{next(_fresh)}".encode()
    data = blob(key, payload_of(key, 3000))
    conn = Connection(server.url, TOKEN, 10.0)
    try:
        assert conn.put([(key, [data])]) == [PutResult.STORED]
        out = bytearray(len(data))
        assert conn.get([key], lambda i, size: [memoryview(out)]) == [len(data)]
        assert bytes(out) == data
    finally:
        conn.close()


# -- version negotiation ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("low, high", [(1, 1), (0, 1), (1, 9), (0, 65535)])
def test_hello_negotiates_version_1_and_reports_the_limits(srv, low, high):
    with Raw(srv.url) as raw:
        welcome = raw.hello(TOKEN, low, high)
        assert welcome.version == 1
        assert (welcome.max_frame_bytes, welcome.max_keys, welcome.max_inflight_bytes) == \
            (MAX_FRAME, MAX_KEYS, MAX_INFLIGHT)
        assert welcome.namespace == "default"
        assert welcome.quota_bytes == 64 << 20  # no quota: the server's capacity (its disk)
        assert raw.call(Op.PING, b"after hello")[1] == b"after hello"


@pytest.mark.parametrize("low, high", [(2, 5), (0, 0), (3, 2), (1, 0)])
def test_hello_without_a_common_version_is_refused_and_closed(srv, witness, low, high):
    with Raw(srv.url) as raw:
        request_id = raw.send(Op.HELLO, pack_hello(TOKEN, low, high))
        message = raw.error(Status.UNSUPPORTED_VERSION, request_id, Op.HELLO)
        assert f"[{low}, {high}]" in message
    assert_unaffected(srv, witness)


@pytest.mark.parametrize("authenticated", [False, True])
def test_a_frame_of_version_9_is_unsupported_and_closed(srv, witness, authenticated):
    with Raw(srv.url) as raw:
        if authenticated:
            raw.hello()
        raw.send(Op.PING, b"hi", version=9)
        assert "9" in raw.error(Status.UNSUPPORTED_VERSION)
    assert_unaffected(srv, witness)


def test_a_frame_with_a_bad_magic_is_malformed(srv, witness):
    with Raw(srv.url) as raw:
        raw.hello()
        raw.sock.sendall(b"HTTP" + Header(Op.PING, 5).pack()[4:])
        raw.error(Status.MALFORMED, request_id=0)  # the header could not be read: id 0
    assert_unaffected(srv, witness)


# -- every operation at the byte level -----------------------------------------------------------------------------

@pytest.mark.parametrize("payload", [b"", b"hi", bytes(range(256)) * 400])
def test_ping_echoes_the_payload_and_the_request_id(srv, payload):
    with Raw(srv.url) as raw:
        raw.hello()
        request_id = raw.send(Op.PING, payload, request_id=0xDEADBEEF_12345678)
        header, echoed = raw.ok(0xDEADBEEF_12345678, Op.PING)
        assert request_id == header.request_id
        assert echoed == payload and header.count == 0 and header.payload_len == len(payload)


def test_the_spec_example_ping_bytes(srv):
    with Raw(srv.url) as raw:
        raw.hello()
        raw.sock.sendall(bytes.fromhex("4b565350010200000700000000000000000000000000000002000000000000006869"))
        assert raw.recv_exact(34) == bytes.fromhex(
            "4b565350010201000700000000000000000000000000000002000000000000006869")


def test_put_many_blocks_then_again_reports_present(srv):
    items = [(f"put/{i}".encode(), blob(f"put/{i}".encode(), payload_of(i, 100 * i))) for i in range(12)]
    with Raw(srv.url) as raw:
        raw.hello()
        header, results = raw.call(Op.PUT, put_payload(items), len(items))
        assert list(results) == [PutResult.STORED] * 12 and header.count == 12
        header, results = raw.call(Op.PUT, put_payload(items), len(items))
        assert list(results) == [PutResult.PRESENT] * 12 and header.count == 0
        # Mixed: some present, some new.
        more = [items[3], (b"put/new", blob(b"put/new", b"fresh")), items[0]]
        header, results = raw.call(Op.PUT, put_payload(more), 3)
        assert list(results) == [PutResult.PRESENT, PutResult.STORED, PutResult.PRESENT] and header.count == 1
        header, payload = raw.call(Op.GET, pack_keys([k for k, _ in items]), 12)
        assert sizes_and_blobs(12, payload) == [b for _, b in items]


def test_put_of_an_empty_batch_and_of_an_empty_payload_block(srv):
    with Raw(srv.url) as raw:
        raw.hello()
        header, results = raw.call(Op.PUT, b"", 0)
        assert (header.count, results) == (0, b"")
        key = b"put/empty-payload"
        header, results = raw.call(Op.PUT, put_payload([(key, blob(key, b""))]), 1)
        assert list(results) == [PutResult.STORED]
        assert sizes_and_blobs(1, raw.call(Op.GET, pack_keys([key]), 1)[1]) == [blob(key, b"")]


def _invalid_blobs() -> dict[str, tuple[bytes, bytes]]:
    key = b"invalid/key"
    good = blob(key, payload_of("invalid", 5000))
    flipped = bytearray(good)
    flipped[-1] ^= 1
    longer_key = b"k" * 40
    return {
        "names another key": (key, blob(b"invalid/other", payload_of("invalid", 5000))),
        "bad checksum": (key, bytes(flipped)),
        "truncated payload": (key, good[:-1]),
        "extra byte": (key, good + b"\0"),
        "header only, short": (key, good[:BLOB_HEADER_BYTES - 1]),
        "no header": (key, payload_of("invalid", 5000)),
        "empty": (key, b""),
        "key longer than 32 bytes": (longer_key, blob(longer_key, b"payload")),
    }


@pytest.mark.parametrize("case", list(_invalid_blobs()))
def test_a_blob_that_does_not_match_its_key_or_bytes_is_invalid_and_not_stored(srv, case):
    key, bad = _invalid_blobs()[case]
    good_key = b"invalid/" + hashlib.sha256(case.encode()).digest()[:16]
    good = blob(good_key, b"neighbour")
    with Raw(srv.url) as raw:
        raw.hello()
        header, results = raw.call(Op.PUT, put_payload([(good_key, good), (key, bad)]), 2)
        assert list(results) == [PutResult.STORED, PutResult.INVALID] and header.count == 1
        assert sizes_and_blobs(2, raw.call(Op.GET, pack_keys([key, good_key]), 2)[1]) == [None, good]
        assert raw.call(Op.EXISTS_PREFIX, pack_keys([key]), 1)[0].count == 0


def test_exists_prefix_returns_the_index_of_the_first_gap(srv):
    chain = [hashlib.sha256(f"chain/{i}".encode()).digest() for i in range(10)]
    with Raw(srv.url) as raw:
        raw.hello()
        held = [k for i, k in enumerate(chain) if i != 6]
        assert raw.call(Op.PUT, put_payload([(k, blob(k, k * 3)) for k in held]), 9)[0].count == 9
        for keys, expected in [(chain, 6), (chain[:6], 6), (chain[:3], 3), (chain[7:], 3), (chain[6:], 0),
                               ([], 0), ([b"chain/absent"] + chain, 0)]:
            header, payload = raw.call(Op.EXISTS_PREFIX, pack_keys(keys), len(keys))
            assert (header.count, payload) == (expected, b""), keys
        # Filling the gap extends the prefix to the whole chain.
        raw.call(Op.PUT, put_payload([(chain[6], blob(chain[6], b"gap"))]), 1)
        assert raw.call(Op.EXISTS_PREFIX, pack_keys(chain), 10)[0].count == 10


def test_get_returns_exact_bytes_for_hits_and_missing_for_misses_in_order(srv):
    hits = {f"get/{i}".encode(): blob(f"get/{i}".encode(), payload_of(("get", i), 777 * i)) for i in range(5)}
    with Raw(srv.url) as raw:
        raw.hello()
        raw.call(Op.PUT, put_payload(list(hits.items())), 5)
        keys = [b"get/0", b"get/miss-a", b"get/3", b"get/1", b"get/miss-b", b"get/4", b"get/3", b"get/2"]
        header, payload = raw.call(Op.GET, pack_keys(keys), len(keys))
        assert header.count == len(keys)
        table = [U64.unpack_from(payload, 8 * i)[0] for i in range(len(keys))]
        assert table == [len(hits[k]) if k in hits else MISSING for k in keys]
        assert table[1] == table[4] == 2 ** 64 - 1
        assert payload[8 * len(keys):] == b"".join(hits[k] for k in keys if k in hits)
        # Only misses, and no keys at all.
        header, payload = raw.call(Op.GET, pack_keys([b"get/miss-a"]), 1)
        assert (header.count, payload) == (1, U64.pack(MISSING))
        header, payload = raw.call(Op.GET, b"", 0)
        assert (header.count, payload) == (0, b"")


def test_delete_reports_per_key_flags_and_the_keys_are_gone(srv):
    keys = [f"delete/{i}".encode() for i in range(4)]
    with Raw(srv.url) as raw:
        raw.hello()
        raw.call(Op.PUT, put_payload([(k, blob(k, k)) for k in keys]), 4)
        asked = [keys[0], b"delete/absent", keys[2], keys[0]]
        header, flags = raw.call(Op.DELETE, pack_keys(asked), 4)
        assert (header.count, list(flags)) == (2, [1, 0, 1, 0])
        assert sizes_and_blobs(4, raw.call(Op.GET, pack_keys(keys), 4)[1]) == \
            [None, blob(keys[1], keys[1]), None, blob(keys[3], keys[3])]
        assert raw.call(Op.EXISTS_PREFIX, pack_keys(keys[:1]), 1)[0].count == 0
        header, flags = raw.call(Op.DELETE, pack_keys(keys), 4)
        assert (header.count, list(flags)) == (2, [0, 1, 0, 1])
        # A deleted key can be stored again.
        assert list(raw.call(Op.PUT, put_payload([(keys[0], blob(keys[0], b"again"))]), 1)[1]) == [0]


def test_stats_is_json_with_the_namespace_and_its_counters(srv):
    with Raw(srv.url) as raw:
        raw.hello()
        before = unpack_json(raw.call(Op.STATS)[1])
        assert before["namespace"] == "default"
        key = b"stats/one"
        raw.call(Op.PUT, put_payload([(key, blob(key, b"x" * 1000))]), 1)
        raw.call(Op.GET, pack_keys([key, b"stats/miss"]), 2)
        header, payload = raw.call(Op.STATS)
        after = unpack_json(payload)
    assert header.count == 0
    ns, server = after["blocks"], after["server"]
    assert after["namespace"] == "default"
    for name in ("hits_ram", "hits_disk", "misses", "bytes_in", "bytes_out", "stored", "present", "rejected",
                 "invalid", "deleted", "blocks", "used_bytes", "quota_bytes"):
        assert isinstance(ns[name], int), name
    assert ns["stored"] == before["blocks"]["stored"] + 1
    assert ns["blocks"] == before["blocks"]["blocks"] + 1
    assert ns["used_bytes"] == before["blocks"]["used_bytes"] + BLOB_HEADER_BYTES + 1000 + BLOCK_OVERHEAD_BYTES
    assert ns["bytes_in"] == before["blocks"]["bytes_in"] + BLOB_HEADER_BYTES + 1000
    assert ns["misses"] >= before["blocks"]["misses"] + 1
    assert ns["hits_ram"] + ns["hits_disk"] >= before["blocks"]["hits_ram"] + before["blocks"]["hits_disk"] + 1
    assert ns["quota_bytes"] == 0
    assert server["connections"] >= 1 and server["uptime_seconds"] > 0
    assert server["capacity_bytes"] == 64 << 20 and server["ram_capacity_bytes"] == 32 << 20
    assert server["blocks"] >= ns["blocks"]


def test_list_returns_the_namespace_keys_least_recently_used_first(srv):
    keys = [f"list/{i}".encode() for i in range(5)]
    with Raw(srv.url) as raw:
        raw.hello()
        raw.call(Op.PUT, put_payload([(k, blob(k, k)) for k in keys]), 5)  # a chain: list/0 the most recent
        raw.call(Op.GET, pack_keys([keys[1]]), 1)  # a read makes list/1 the most recently used
        listed = list_all(raw)
        assert [k for k in listed if k.startswith(b"list/")] == [keys[4], keys[3], keys[2], keys[0], keys[1]]
        assert listed[-1] == keys[1] and len(listed) == len(set(listed))
        # Paging: an offset past the end is empty; a limit of 2 gives 2.
        header, payload = raw.call(Op.LIST, U64.pack(len(listed)), MAX_KEYS)
        assert (header.count, payload) == (0, b"")
        header, payload = raw.call(Op.LIST, U64.pack(len(listed) - 3), 2)
        assert unpack_keys(payload, header.count) == listed[-3:-1]
        header, payload = raw.call(Op.LIST, U64.pack(0), 0)
        assert (header.count, payload) == (0, b"")


# -- pipelining ------------------------------------------------------------------------------------------------------

def test_fifty_pipelined_requests_are_answered_in_order_with_exact_bytes(srv):
    rng = random.Random(50)
    stored: dict[bytes, bytes] = {}
    fresh = (f"pipe/{i}".encode() for i in range(10_000))
    requests = []  # (request frame, op, expected count, expected payload)
    raw = Raw(srv.url)
    raw.hello()
    for i in range(50):
        op = [Op.PUT, Op.GET, Op.EXISTS_PREFIX, Op.PING][i % 4] if i < 8 else rng.choice(
            [Op.PUT, Op.GET, Op.EXISTS_PREFIX, Op.PING])
        if op == Op.PUT:
            items = [(k, blob(k, payload_of(k, rng.randrange(0, 1500)))) for k in
                     [next(fresh) for _ in range(rng.randrange(1, 4))]]
            again = [(k, stored[k]) for k in rng.sample(sorted(stored), min(len(stored), rng.randrange(0, 2)))]
            batch = items + again
            results = [PutResult.STORED] * len(items) + [PutResult.PRESENT] * len(again)
            stored.update(items)
            frame = raw.frame(op, put_payload(batch), len(batch))
            requests.append((frame, op, len(items), bytes(results)))
        elif op == Op.GET:
            keys = rng.sample(sorted(stored), min(len(stored), rng.randrange(0, 4))) + [b"pipe/missing"]
            rng.shuffle(keys)
            table = b"".join(U64.pack(len(stored[k]) if k in stored else MISSING) for k in keys)
            frame = raw.frame(op, pack_keys(keys), len(keys))
            requests.append((frame, op, len(keys), table + b"".join(stored[k] for k in keys if k in stored)))
        elif op == Op.EXISTS_PREFIX:
            chain = rng.sample(sorted(stored), min(len(stored), rng.randrange(0, 4)))
            gap = rng.random() < 0.5
            keys = chain + [b"pipe/missing"] + list(stored)[:1] if gap else chain
            frame = raw.frame(op, pack_keys(keys), len(keys))
            requests.append((frame, op, len(chain), b""))
        else:
            data = rng.randbytes(rng.randrange(0, 300))
            requests.append((raw.frame(op, data), op, 0, data))
    assert {op for _, op, _, _ in requests} == {Op.PUT, Op.GET, Op.EXISTS_PREFIX, Op.PING}
    # Every request is on the wire before any reply is read.
    raw.sock.sendall(b"".join(frame for (_, frame), _, _, _ in requests))
    for (request_id, _), op, count, expected in requests:
        header, payload = raw.ok(request_id, op)
        assert header.count == count, (op.name, request_id)
        assert payload == expected, (op.name, request_id)
    raw.sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        raw.sock.recv(1)  # 50 requests, 50 replies, nothing more
    raw.close()


# -- the client reads GET replies into the caller's buffers ---------------------------------------------------------------

def test_client_get_reads_blobs_into_the_callers_buffers(srv):
    blobs = {f"sink/{i}".encode(): blob(f"sink/{i}".encode(), payload_of(("sink", i), 20_000 + 3 * i))
             for i in range(6)}
    keys = [b"sink/0", b"sink/missing", b"sink/1", b"sink/2", b"sink/3", b"sink/4", b"sink/5"]
    arena = bytearray(b"\xee" * (sum(len(b) for b in blobs.values()) + 64 * len(keys)))
    views: dict[int, list[memoryview]] = {}
    offsets: dict[int, int] = {}
    asked: list[tuple[int, int]] = []

    def sink(i: int, size: int) -> list[memoryview] | None:
        asked.append((i, size))
        if keys[i] == b"sink/3":
            return None  # not wanted: the call ends here, and the connection is closed rather than read through
        start = 64 * i + sum(len(blobs[keys[j]]) for j in range(i) if keys[j] in blobs)
        offsets[i] = start
        whole = memoryview(arena)[start:start + size]
        # Header and payload into two separate buffers, as the remote tier does.
        views[i] = [whole[:BLOB_HEADER_BYTES], whole[BLOB_HEADER_BYTES:]]
        return views[i]

    conn = Connection(srv.url, TOKEN, 10.0)
    try:
        assert conn.put([(k, [b[:100], b[100:]]) for k, b in blobs.items()]) == [PutResult.STORED] * 6
        sizes = conn.get(keys, sink)
    finally:
        conn.close()
    unwanted = keys.index(b"sink/3")
    assert sizes == [len(blobs[k]) if k in blobs and i <= unwanted else None for i, k in enumerate(keys)]
    assert asked == [(i, len(blobs[k])) for i, k in enumerate(keys) if k in blobs and i <= unwanted]
    assert conn.closed
    for i, k in enumerate(keys):
        if i in offsets:
            start = offsets[i]
            assert bytes(arena[start:start + len(blobs[k])]) == blobs[k]
            assert arena[start - 1] == 0xEE and arena[start + len(blobs[k])] == 0xEE  # nothing spilled over


# -- errors: each is answered and closes only its own connection -----------------------------------------------------

ALL_OPS = [Op.PING, Op.EXISTS_PREFIX, Op.GET, Op.PUT, Op.DELETE, Op.STATS, Op.LIST]


@pytest.mark.parametrize("op", ALL_OPS, ids=lambda op: op.name)
def test_a_request_before_hello_is_not_authenticated(srv, witness, op):
    payload = {Op.PUT: put_payload([(KNOWN_KEY, KNOWN_BLOB)]), Op.LIST: U64.pack(0)}.get(
        op, pack_keys([KNOWN_KEY]) if op in (Op.EXISTS_PREFIX, Op.GET, Op.DELETE) else b"")
    with Raw(srv.url) as raw:
        request_id = raw.send(op, payload, 1 if op in (Op.EXISTS_PREFIX, Op.GET, Op.DELETE, Op.PUT) else 0)
        assert "HELLO" in raw.error(Status.NOT_AUTHENTICATED, request_id, op)
    assert_unaffected(srv, witness)  # the DELETE before HELLO deleted nothing


@pytest.mark.parametrize("opcode", [77, 0, 9, 255])
def test_an_unknown_opcode_is_refused_and_closed(srv, witness, opcode):
    with Raw(srv.url) as raw:
        raw.hello()
        request_id = raw.send(opcode, b"whatever")
        assert str(opcode) in raw.error(Status.UNKNOWN_OPCODE, request_id, opcode)
    assert_unaffected(srv, witness)


@pytest.mark.parametrize("op, payload_len", [(Op.PUT, MAX_FRAME + 1), (Op.PING, 64 << 20), (Op.GET, 2 ** 64 - 1),
                                             (Op.HELLO, 4097)], ids=lambda v: getattr(v, "name", str(v)))
def test_a_payload_over_the_limit_is_too_large_before_the_server_reads_it(srv, witness, op, payload_len):
    with Raw(srv.url) as raw:
        if op != Op.HELLO:
            raw.hello()
        # Only the header goes out: a reply can only come if the server does not wait for the payload.
        request_id = raw.send(op, b"", 1, payload_len=payload_len)
        start = time.monotonic()
        message = raw.error(Status.TOO_LARGE, request_id, op)
        assert time.monotonic() - start < TIMEOUT
        assert str(payload_len) in message
    assert_unaffected(srv, witness)


def test_a_too_large_put_is_answered_while_its_payload_is_still_coming(srv, witness):
    with Raw(srv.url) as raw:
        raw.hello()
        request_id, frame = raw.frame(Op.PUT, b"", 1, payload_len=2 * MAX_FRAME)
        raw.sock.sendall(frame + b"\0" * 65536)
        raw.error(Status.TOO_LARGE, request_id, Op.PUT)
    assert_unaffected(srv, witness)


@pytest.mark.parametrize("count", [MAX_KEYS + 1, 1000, 2 ** 32 - 1])
def test_a_count_over_max_keys_is_refused(srv, witness, count):
    keys = [f"many/{i}".encode() for i in range(min(count, 1000))]
    with Raw(srv.url) as raw:
        raw.hello()
        request_id = raw.send(Op.GET, pack_keys(keys), count)
        assert str(count) in raw.error(Status.TOO_MANY_KEYS, request_id, Op.GET)
    assert_unaffected(srv, witness)


def test_max_keys_itself_is_accepted(srv):
    keys = [f"many/{i}".encode() for i in range(MAX_KEYS)]
    with Raw(srv.url) as raw:
        raw.hello()
        assert raw.call(Op.GET, pack_keys(keys), MAX_KEYS)[0].count == MAX_KEYS


@pytest.mark.parametrize("flags, status", [(FLAG_REPLY, 0), (FLAG_ERROR, 0), (FLAG_REPLY | FLAG_ERROR, 0),
                                           (0x8000, 0), (0, 1), (0, Status.INTERNAL), (0, 2 ** 32 - 1)])
@pytest.mark.parametrize("authenticated", [True, False])
def test_non_zero_flags_or_status_in_a_request_is_malformed(srv, witness, flags, status, authenticated):
    with Raw(srv.url) as raw:
        if authenticated:
            raw.hello()
        request_id = raw.send(Op.PING, b"hi", flags=flags, status=status)
        raw.error(Status.MALFORMED, request_id, Op.PING)
    assert_unaffected(srv, witness)


def _malformed_requests() -> dict[str, tuple[int, bytes, int]]:
    key = b"malformed/key"
    item = put_item_header(key, 80) + blob(key, b"x" * 8)
    return {
        "second HELLO": (Op.HELLO, pack_hello(TOKEN), 0),
        "GET: fewer keys than count": (Op.GET, pack_keys([b"a"]), 2),
        "GET: more keys than count": (Op.GET, pack_keys([b"a", b"b"]), 1),
        "GET: key of length 0": (Op.GET, b"\x00", 1),
        "GET: key of length 65": (Op.GET, b"\x41" + b"k" * 65, 1),
        "GET: payload over 65 bytes per key": (Op.GET, b"\x01a" + b"\0" * 200, 1),
        "EXISTS_PREFIX: key length past the end": (Op.EXISTS_PREFIX, b"\x09abc", 1),
        "DELETE: trailing bytes": (Op.DELETE, pack_keys([b"a"]) + b"\x01", 1),
        "PUT: blob length past the payload": (Op.PUT, put_item_header(key, 1000) + b"short", 1),
        "PUT: key of length 0": (Op.PUT, b"\x00" + U64.pack(0) + b"\0" * 10, 1),
        "PUT: key of length 65": (Op.PUT, b"\x41" + b"k" * 65 + U64.pack(0), 1),
        "PUT: bytes left over": (Op.PUT, item + b"junk", 1),
        "PUT: fewer blocks than count": (Op.PUT, item, 2),
        "PUT: payload but count 0": (Op.PUT, item, 0),
        "PUT: payload shorter than an item header": (Op.PUT, b"\x01a", 1),
        "LIST: no offset": (Op.LIST, b"", 4),
        "LIST: offset of 4 bytes": (Op.LIST, b"\0" * 4, 4),
        "LIST: offset of 9 bytes": (Op.LIST, b"\0" * 9, 4),
    }


@pytest.mark.parametrize("case", list(_malformed_requests()))
def test_a_payload_that_does_not_parse_is_malformed(srv, witness, case):
    op, payload, count = _malformed_requests()[case]
    with Raw(srv.url) as raw:
        raw.hello()
        request_id = raw.send(op, payload, count)
        raw.error(Status.MALFORMED, request_id, op)
    assert_unaffected(srv, witness)


@pytest.mark.parametrize("payload", [b"", b"\x01\x00\x01\x00", pack_hello(TOKEN) + b"x", pack_hello(TOKEN)[:-1],
                                     b"\x01\x00\x01\x00\x02\x00\xff\xfe"])
def test_a_hello_that_does_not_parse_is_malformed(srv, witness, payload):
    with Raw(srv.url) as raw:
        request_id = raw.send(Op.HELLO, payload)
        raw.error(Status.MALFORMED, request_id, Op.HELLO)
    assert_unaffected(srv, witness)


def test_a_malformed_put_stores_none_of_its_blocks(srv, witness):
    first, second = b"atomic/1", b"atomic/2"
    payload = put_payload([(first, blob(first, b"one")), (second, blob(second, b"two"))])
    with Raw(srv.url) as raw:
        raw.hello()
        request_id = raw.send(Op.PUT, payload + b"\x00", 2)  # one byte left over after both blocks
        raw.error(Status.MALFORMED, request_id, Op.PUT)
    with Raw(srv.url) as raw:
        raw.hello()
        assert sizes_and_blobs(2, raw.call(Op.GET, pack_keys([first, second]), 2)[1]) == [None, None]
    assert_unaffected(srv, witness)


def test_requests_before_an_error_on_the_same_connection_are_answered(srv, witness):
    with Raw(srv.url) as raw:
        raw.hello()
        first = raw.frame(Op.PING, b"one")
        bad = raw.frame(Op.GET, b"\x00", 1)
        after = raw.frame(Op.PING, b"never answered")
        raw.sock.sendall(first[1] + bad[1] + after[1])
        assert raw.ok(first[0], Op.PING)[1] == b"one"
        raw.error(Status.MALFORMED, bad[0], Op.GET)
    assert_unaffected(srv, witness)


BIG = 900 << 10  # three of these are more than max_inflight_bytes (2 MiB); two are not


@pytest.fixture(scope="module")
def big_blobs(srv):
    keys = [f"big/{i}".encode() for i in range(3)]
    blobs = [blob(k, payload_of(k, BIG)) for k in keys]
    conn = Connection(srv.url, TOKEN, 10.0)
    try:
        assert conn.put(list(zip(keys, [[b] for b in blobs]))) == [PutResult.STORED] * 3  # one frame each
    finally:
        conn.close()
    return keys, blobs


def test_a_get_whose_reply_would_exceed_max_inflight_bytes_is_too_large(srv, witness, big_blobs):
    keys, blobs = big_blobs
    with Raw(srv.url) as raw:
        raw.hello()
        assert sizes_and_blobs(2, raw.call(Op.GET, pack_keys(keys[:2]), 2)[1]) == blobs[:2]
        request_id = raw.send(Op.GET, pack_keys(keys), 3)
        assert "max_inflight_bytes" in raw.error(Status.TOO_LARGE, request_id, Op.GET)
    assert_unaffected(srv, witness)


def test_client_get_with_expected_sizes_splits_a_reply_over_max_inflight_bytes(srv, big_blobs):
    keys, blobs = big_blobs
    conn = Connection(srv.url, TOKEN, 10.0)
    try:
        got: dict[int, bytearray] = {}
        sizes = conn.get(keys, lambda i, size: [memoryview(got.setdefault(i, bytearray(size)))],
                         expected=[len(b) for b in blobs])
    finally:
        conn.close()
    assert sizes == [len(b) for b in blobs]
    assert [bytes(got[i]) for i in range(3)] == blobs


def test_the_client_raises_server_error_for_an_error_reply(srv, witness, big_blobs):
    keys, _ = big_blobs
    conn = Connection(srv.url, TOKEN, 10.0)
    with pytest.raises(ServerError) as info:
        conn.get(keys, lambda i, size: None)
    assert info.value.status == Status.TOO_LARGE
    conn.close()
    assert_unaffected(srv, witness)


def test_client_put_of_a_block_over_max_frame_bytes_rejects_only_that_block(srv):
    """Regression: such a block used to go out in a frame of its own, get TOO_LARGE and cost the connection."""
    small = [(f"overframe/{i}".encode(), blob(f"overframe/{i}".encode(), payload_of(("overframe", i), 1000)))
             for i in range(2)]
    big_key = b"overframe/big"
    big = blob(big_key, payload_of(big_key, MAX_FRAME + 1000))
    conn = Connection(srv.url, TOKEN, 10.0)
    try:
        results = conn.put([(small[0][0], [small[0][1]]), (big_key, [big]), (small[1][0], [small[1][1]])])
        assert results == [PutResult.STORED, PutResult.REJECTED, PutResult.STORED]
        assert conn.ping(b"still connected") == b"still connected"
    finally:
        conn.close()


@pytest.mark.skipif(not hasattr(__import__("resource"), "prlimit") or not os.path.isdir("/proc/self/fd"),
                    reason="needs Linux (prlimit, /proc)")
def test_the_server_accepts_again_after_running_out_of_file_descriptors(tmp_path_factory):
    """Regression: one EMFILE from accept() used to end the accept loop for good (the process stayed up)."""
    import resource

    server = start_server(tmp_path_factory, "emfile", "--host-bytes", "8MiB", "--disk-bytes", "0",
                          "--max-connections", "1000")
    sockets = []
    try:
        pid = server.proc.pid
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        in_use = len(os.listdir(f"/proc/{pid}/fd"))
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 3, hard))
        for _ in range(10):  # the 4th and later cannot be accepted: EMFILE
            sockets.append(socket.create_connection(host_port(server.url), timeout=TIMEOUT))
        time.sleep(0.3)
        for sock in sockets:
            sock.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert server.alive()
        deadline = time.monotonic() + 3.0
        while True:  # descriptors are free again: the server must take new connections again
            try:
                conn = Connection(server.url, TOKEN, 1.0)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server no longer accepts connections"
        assert conn.ping(b"back") == b"back"
        conn.close()
        text = _http_get(server.metrics_url + "/metrics")[1]
        assert (_metric(text, "kvstore_server_errors_total", status="ACCEPT") or 0) >= 1  # the limit did bite
    finally:
        for sock in sockets:
            sock.close()
        stop_server(server)


@pytest.fixture(scope="module")
def two_connection_server(tmp_path_factory):
    server = start_server(tmp_path_factory, "maxconn", "--host-bytes", "8MiB", "--disk-bytes", "0",
                          "--max-connections", "2")
    yield server
    stop_server(server)


def test_a_connection_over_max_connections_is_refused(two_connection_server):
    server = two_connection_server
    first, second = Connection(server.url, TOKEN, 5.0), Connection(server.url, TOKEN, 5.0)
    key = b"maxconn/block"
    data = blob(key, payload_of(key, 10_000))
    assert first.put([(key, [data])]) == [PutResult.STORED]
    with Raw(server.url) as raw:  # the third: refused at once, before its HELLO
        raw.error(Status.TOO_MANY_CONNECTIONS, request_id=0)
    with Raw(server.url) as raw:  # refused even with a HELLO on the way
        raw.send(Op.HELLO, pack_hello(TOKEN))
        raw.error(Status.TOO_MANY_CONNECTIONS, request_id=0)
    with pytest.raises(ServerError) as info:
        Connection(server.url, TOKEN, 5.0)
    assert info.value.status == Status.TOO_MANY_CONNECTIONS
    # The two admitted connections are unaffected.
    out = bytearray(len(data))
    assert second.get([key], lambda i, size: [memoryview(out)]) == [len(data)] and bytes(out) == data
    assert first.ping(b"still here") == b"still here"
    # A freed slot admits the next connection.
    first.close()
    deadline = time.monotonic() + 5
    while True:
        try:
            third = Connection(server.url, TOKEN, 5.0)
            break
        except ServerError as exc:
            assert exc.status == Status.TOO_MANY_CONNECTIONS and time.monotonic() < deadline
            time.sleep(0.02)
    out = bytearray(len(data))
    assert third.get([key], lambda i, size: [memoryview(out)]) == [len(data)] and bytes(out) == data
    third.close()
    second.close()


# -- Prometheus ------------------------------------------------------------------------------------------------------

def _http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_prometheus_metrics_and_healthz(srv, witness):
    key = b"metrics/block"
    data = blob(key, payload_of(key, 4000))
    with Raw(srv.url) as raw:
        raw.hello()
        raw.call(Op.PUT, put_payload([(key, data)]), 1)
        raw.call(Op.GET, pack_keys([key, b"metrics/miss"]), 2)
        held = Raw(srv.url)
        held.hello()  # an open connection while scraping
        status, text = _http_get(srv.metrics_url + "/metrics")
        assert status == 200
        assert _metric(text, "kvstore_server_hits_total", tier="host") >= 1  # summed: no namespace is named
        assert _metric(text, "kvstore_server_misses_total") >= 1
        assert re.search(r'^kvstore_server_request_seconds_bucket\{[^}]*op="GET"[^}]*\} \d', text, re.M)
        assert _metric(text, "kvstore_server_request_seconds_count", op="GET") >= 1
        assert _metric(text, "kvstore_server_requests_total", op="PUT") >= 1
        assert _metric(text, "kvstore_server_connections") >= 2
        assert _metric(text, "kvstore_server_namespace_bytes") >= len(data) + len(KNOWN_BLOB)
        assert _metric(text, "kvstore_server_put_blocks_total", outcome="stored") >= 2
        assert 'namespace="' not in text
        held.close()
    before = _metric(_http_get(srv.metrics_url + "/metrics")[1], "kvstore_server_errors_total",
                     status="UNKNOWN_OPCODE") or 0.0
    with Raw(srv.url) as raw:
        raw.hello()
        raw.send(77)
        raw.error(Status.UNKNOWN_OPCODE)
    text = _http_get(srv.metrics_url + "/metrics")[1]
    assert _metric(text, "kvstore_server_errors_total", status="UNKNOWN_OPCODE") == before + 1
    assert _http_get(srv.metrics_url + "/healthz") == (200, "ok\n")
    assert _http_get(srv.metrics_url + "/nowhere")[0] == 404
    assert_unaffected(srv, witness)


# -- graceful shutdown ---------------------------------------------------------------------------------------------------

def test_sigterm_lets_an_inflight_put_finish_then_exits_0_and_the_block_survives_a_restart(server_factory):
    server = server_factory("--host-bytes", "64MiB", "--disk-bytes", "256MiB", "--disk-sync", "false")
    key = hashlib.sha256(b"shutdown/block").digest()
    data = blob(key, payload_of("shutdown", 6 << 20))
    idle = Raw(server.url)
    idle.hello()
    raw = Raw(server.url, timeout=10.0)
    raw.hello()
    frame_id, wire = raw.frame(Op.PUT, put_item_header(key, len(data)) + data, 1)
    piece = 1 << 20
    raw.sock.sendall(wire[:piece])
    time.sleep(0.3)  # the server is now reading the PUT
    codes: list[int] = []
    stopper = threading.Thread(target=lambda: codes.append(server.stop()))
    stopper.start()
    # While the PUT is in flight, the server accepts no new connections, says it is stopping, and closes idle ones.
    deadline = time.monotonic() + 5
    while True:
        try:
            socket.create_connection(host_port(server.url), timeout=1).close()
        except ConnectionRefusedError:
            break
        assert time.monotonic() < deadline, "the server still accepts connections after SIGTERM"
        time.sleep(0.02)
    assert _http_get(server.metrics_url + "/healthz")[0] == 503
    idle.assert_closed()
    idle.close()
    for start in range(piece, len(wire), piece):
        raw.sock.sendall(wire[start:start + piece])
        time.sleep(0.02)
    header, results = raw.ok(frame_id, Op.PUT)
    assert (header.count, list(results)) == (1, [PutResult.STORED])
    raw.assert_closed()
    raw.close()
    stopper.join(30)
    assert codes == [0], server.output
    assert "stopped" in "".join(server.output)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(host_port(server.url), timeout=1)
    server.restart()
    conn = Connection(server.url, TOKEN, 10.0)
    try:
        out = bytearray(len(data))
        assert conn.get([key], lambda i, size: [memoryview(out)]) == [len(data)]
        assert bytes(out) == data
    finally:
        conn.close()


def test_many_keys_of_every_length_round_trip(srv):
    """Keys of 1 to 32 bytes (a blob header holds at most 32) in one PUT and one GET, at the limit of 16 keys."""
    keys = [bytes([i]) * i for i in range(17, 33)]
    assert len(keys) == MAX_KEYS and max(map(len, keys)) <= 32 < MAX_KEY_BYTES
    blobs = [blob(k, k * 10) for k in keys]
    with Raw(srv.url) as raw:
        raw.hello()
        assert list(raw.call(Op.PUT, put_payload(list(zip(keys, blobs))), MAX_KEYS)[1]) == [0] * MAX_KEYS
        assert sizes_and_blobs(MAX_KEYS, raw.call(Op.GET, pack_keys(keys), MAX_KEYS)[1]) == blobs


def test_every_phase_of_a_request_has_a_deadline(server_factory):
    """Slowloris: a HELLO header announcing a payload that never comes, and an authenticated PUT whose payload
    stalls, are closed at their deadlines, while a client already connected (the server at its connection
    limit) keeps getting exact bytes, and a new one gets in once the slots are free."""
    srv = server_factory("--max-connections", "3", "--hello-timeout-seconds", "0.5",
                         "--request-timeout-seconds", "0.5", "--disk-bytes", "0")
    good = srv.connect()
    key, data = b"deadline-key", os.urandom(4096)
    hello = put = None
    try:
        assert good.put([(key, [blob(key, data)])]) == [PutResult.STORED]
        hello = Raw(srv.url, timeout=10)
        hello.send(Op.HELLO, b"", payload_len=100)  # the header only: the payload never comes
        put = Raw(srv.url, timeout=10)
        put.hello()
        body = put_payload([(b"stalled", blob(b"stalled", os.urandom(8192)))])
        put.send(Op.PUT, body[:100], 1, payload_len=len(body))  # the first 100 bytes, then nothing
        started = time.monotonic()
        for raw in (hello, put):
            with pytest.raises(EOFError):
                raw.reply()  # no reply: closed by the server at the deadline
        assert time.monotonic() - started < 8
        out = bytearray(len(blob(key, data)))
        assert good.get([key], lambda i, size: [memoryview(out)]) == [len(out)]  # the kept client is served
        assert bytes(out) == blob(key, data)
        late = srv.connect()  # the slots the stalled ones held are free again
        assert late.ping(b"ok") == b"ok"
        late.close()
        assert _metric(_http_get(srv.metrics_url + "/metrics")[1], "kvstore_server_errors_total",
                       status="DEADLINE") == 2
    finally:
        good.close()
        for raw in (hello, put):
            if raw is not None:
                raw.close()


def test_a_silent_connection_is_closed_and_frees_its_slot(server_factory):
    """Sockets that never say HELLO cannot hold the connection slots (anyone can open them, no token needed)."""
    import socket as socket_module

    srv = server_factory("--max-connections", "2", "--hello-timeout-seconds", "0.5", "--disk-bytes", "0")
    host, port = srv.url.split("://")[1].split(":")
    silent = [socket_module.create_connection((host, int(port)), timeout=5) for _ in range(2)]
    try:
        for sock in silent:
            assert sock.recv(1) == b""  # closed by the server after the HELLO deadline
        conn = srv.connect()
        assert conn.ping(b"ok") == b"ok"
        conn.close()
    finally:
        for sock in silent:
            sock.close()


def test_a_get_of_several_keys_leaves_the_first_the_most_recently_used(srv):
    """A GET reads a prompt's blocks in order: its head must end the most recent, not the oldest of them."""
    keys = [f"chain-get/{i}".encode() for i in range(4)]
    with Raw(srv.url) as raw:
        raw.hello()
        for k in keys:  # one PUT each: the last the most recent
            raw.call(Op.PUT, put_payload([(k, blob(k, k))]), 1)
        raw.call(Op.GET, pack_keys(keys[:3]), 3)
        listed = [k for k in list_all(raw) if k.startswith(b"chain-get/")]
        assert listed == [keys[3], keys[2], keys[1], keys[0]]


def test_a_chain_put_in_several_frames_leaves_its_first_blob_the_most_recently_used(srv):
    keys = [f"frames/{i}".encode() for i in range(6)]
    items = [(k, [blob(k, payload_of(k, MAX_FRAME // 3))]) for k in keys]  # two blobs a frame
    conn = Connection(srv.url, TOKEN, 10.0)
    try:
        assert conn.put(items) == [PutResult.STORED] * 6
    finally:
        conn.close()
    with Raw(srv.url) as raw:
        raw.hello()
        assert [k for k in list_all(raw) if k.startswith(b"frames/")] == keys[::-1]


def _lazy_blobs(prefix: str, count: int, parts: int, part_bytes: int, alive: list[int]) -> list:
    """``count`` LazyBlobs of ``parts`` numpy parts each; ``alive[0]`` counts parts made and not yet freed,
    ``alive[1]`` the most at once."""
    import numpy as np

    def made(data: bytes) -> "np.ndarray":
        array = np.frombuffer(bytearray(data), dtype=np.uint8)
        alive[0] += 1
        alive[1] = max(alive)
        weakref.finalize(array, lambda: alive.__setitem__(0, alive[0] - 1))
        return array
    items = []
    for n in range(count):
        key = f"{prefix}/{n}".encode()
        data = blob(key, payload_of(key, parts * part_bytes - BLOB_HEADER_BYTES))
        pieces = [data[k * part_bytes:(k + 1) * part_bytes] for k in range(parts)]
        items.append((key, LazyBlob(len(data), lambda pieces=pieces: [made(piece) for piece in pieces]), data))
    return items


def test_a_put_of_lazy_blobs_stores_them_exactly_and_makes_them_a_few_at_a_time(srv):
    """A frame's blobs are made as they are sent, so only a few blobs' parts exist at once (the views of 32
    blocks of 2 MiB, held for a whole frame, reached the oldest GC generation and its 70 ms collections)."""
    alive = [0, 0]
    items = _lazy_blobs("lazy", 16, 64, 1024, alive)  # 16 blobs of 64 parts: 1,024 parts in one frame
    conn = Connection(srv.url, TOKEN, 10.0)
    try:
        assert conn.put([(key, lazy) for key, lazy, _ in items]) == [PutResult.STORED] * 16
        got: dict[int, bytearray] = {}
        assert conn.get([key for key, _, _ in items], lambda i, size: [memoryview(got.setdefault(i, bytearray(size)))]) \
            == [len(data) for _, _, data in items]
    finally:
        conn.close()
    assert [bytes(got[i]) for i in range(16)] == [data for _, _, data in items]
    assert alive[0] == 0 and alive[1] <= 5 * 64  # a send's worth of views (256) and the blob that passed it


def test_a_lazy_blob_of_the_wrong_size_is_refused_and_nothing_of_its_frame_is_stored(srv, witness):
    good = [(f"wrongsize/{n}".encode(), blob(f"wrongsize/{n}".encode(), payload_of(("wrongsize", n), 5000)))
            for n in range(3)]
    liar = LazyBlob(len(good[2][1]), lambda: [good[2][1][:-1]])  # one byte short of what it announced
    conn = Connection(srv.url, TOKEN, 10.0)
    with pytest.raises(ValueError, match="expected the blob of key 2 to make"):
        conn.put([(good[0][0], [good[0][1]]), (good[1][0], [good[1][1]]), (good[2][0], liar)])
    assert not conn.alive()  # half a frame went out: the connection is not used again
    conn = Connection(srv.url, TOKEN, 10.0)
    try:
        assert conn.exists_prefix([key for key, _ in good]) == 0  # the cut frame stored none of its blobs
    finally:
        conn.close()
    assert_unaffected(srv, witness)


def test_a_put_whose_blob_fails_to_be_made_closes_the_connection_and_stores_nothing_of_its_frame(srv, witness):
    """Part of the frame went out before the failing blob was made: the connection is closed (its next bytes
    would have been read as the rest of the frame), its next call says so, and the server stored nothing."""
    alive = [0, 0]
    items = _lazy_blobs("failmake", 8, 64, 1024, alive)

    def fails() -> list:
        raise RuntimeError("the engine's buffer is gone")
    conn = Connection(srv.url, TOKEN, 10.0)
    with pytest.raises(RuntimeError, match="buffer is gone"):
        conn.put([(key, lazy) for key, lazy, _ in items[:6]] + [(items[6][0], LazyBlob(items[6][1].nbytes, fails))])
    assert conn.closed and not conn.alive()
    with pytest.raises(ConnectionError, match="closed after a call on it failed"):
        conn.ping(b"again")
    conn = Connection(srv.url, TOKEN, 10.0)
    try:
        assert conn.exists_prefix([key for key, _, _ in items]) == 0
        generated = LazyBlob(len(items[7][2]), lambda: (part for part in [items[7][2]]))  # an iterator of parts
        assert conn.put([(items[7][0], generated)]) == [PutResult.STORED]
        assert conn.exists_prefix([items[7][0]]) == 1
    finally:
        conn.close()
    assert_unaffected(srv, witness)
