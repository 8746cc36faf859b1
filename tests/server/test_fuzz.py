"""Fuzzing the cache server with hypothesis: random bytes, random headers and mutated valid frames.

Every frame goes to a real server, on fresh and reused connections, after
HELLO and before it, one at a time or pipelined. A small model of the
protocol (``expect``) says what each frame may get: a complete frame gets
its reply or an error reply (never ``INTERNAL``, never silence), a frame
over a header-level limit gets that limit's error, and after an error the
server closes the connection. The client always half-closes its side after
a frame it did not finish, so a server waiting for bytes that will never
come sees the end of the stream: nothing may hang. After each example the
server is alive, a long-lived well-behaved connection still reads a known
block's exact bytes, and a new connection can PUT and GET.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import struct
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.blockformat import BlockHeader
from kvstore.client import Connection
from kvstore.protocol import (FLAG_ERROR, FLAG_REPLY, HEADER, HEADER_BYTES, MAGIC, MISSING, SUPPORTED_VERSIONS, U64,
                              Header, Op, ProtocolError, PutResult, Status, Welcome, pack_hello, pack_keys,
                              put_item_header, unpack_json, unpack_keys)
from kvstore.server.blobs import blob_intact

from .conftest import TOKEN, ServerProcess

LAYOUT = b"F" * 16
MAX_FRAME = 64 << 10
MAX_INFLIGHT = 256 << 10
MAX_KEYS = 32
MAX_HELLO = 4096
TIMEOUT = 2.0  # no reply or close within this: the server hangs
EXAMPLES = 400

WITNESS_KEY = hashlib.sha256(b"fuzz witness").digest()  # never named by a fuzzed frame
WITNESS_BLOB = BlockHeader.for_payload(WITNESS_KEY, LAYOUT, b"w" * 3000).pack() + b"w" * 3000
KNOWN = [hashlib.sha256(f"fuzz/known/{i}".encode()).digest()[:20] for i in range(6)]
UNKNOWN = [b"fuzz/unknown/1", b"u", b"x" * 64]


def blob(key: bytes, payload: bytes) -> bytes:
    return BlockHeader.for_payload(key, LAYOUT, payload).pack() + payload


def host_port(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


# -- the server and the well-behaved client ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("fuzz"), "--host-bytes", "16MiB", "--disk-bytes", "32MiB",
                           "--disk-sync", "false", "--max-frame-bytes", "64KiB", "--max-inflight-bytes", "256KiB",
                           "--max-keys", str(MAX_KEYS)).start()
    yield server
    server.kill()
    if server.proc is not None and server.proc.stdout is not None:
        server.proc.stdout.close()


@pytest.fixture(scope="module")
def witness(fuzz_server):
    conn = Connection(fuzz_server.url, TOKEN, 10.0)
    assert conn.put([(WITNESS_KEY, [WITNESS_BLOB])] + [(k, [blob(k, k * 10)]) for k in KNOWN]) == \
        [PutResult.STORED] * (1 + len(KNOWN))
    yield conn
    conn.close()


_checks = iter(range(1 << 30))


def assert_server_fine(server: ServerProcess, witness: Connection) -> None:
    assert server.alive(), "".join(server.output)
    out = bytearray(len(WITNESS_BLOB))
    assert witness.get([WITNESS_KEY], lambda i, size: [memoryview(out)]) == [len(WITNESS_BLOB)]
    assert bytes(out) == WITNESS_BLOB
    key = f"fuzz/check/{next(_checks)}".encode()
    data = blob(key, key * 7)
    conn = Connection(server.url, TOKEN, 5.0)
    try:
        assert conn.put([(key, [data])]) == [PutResult.STORED]
        out = bytearray(len(data))
        assert conn.get([key], lambda i, size: [memoryview(out)]) == [len(data)] and bytes(out) == data
    finally:
        conn.close()


# -- the model: what a byte stream may get back ------------------------------------------------------------------------

@dataclass
class Expect:
    """What the server may send for one frame of the stream."""

    header: Header | None  # None: the header itself is bad (magic or version)
    payload: bytes
    complete: bool
    errors: frozenset[int]  # statuses an error reply may have
    must_fail: bool  # a header-level violation: an error reply is the only answer


def header_violations(header: Header, authenticated: bool) -> set[int]:
    found = set()
    if header.flags or header.status:
        found.add(Status.MALFORMED)
    if header.opcode not in Op._value2member_map_:
        found.add(Status.UNKNOWN_OPCODE)
    if header.payload_len > MAX_FRAME:
        found.add(Status.TOO_LARGE)
    if header.count > MAX_KEYS:
        found.add(Status.TOO_MANY_KEYS)
    if not authenticated and header.opcode != Op.HELLO:
        found.add(Status.NOT_AUTHENTICATED)
    return found


def payload_errors(header: Header, authenticated: bool) -> set[int]:
    """Statuses a request that passed the header checks may still get: its payload does not parse, etc."""
    allowed = {Status.MALFORMED}
    if header.opcode == Op.GET:
        allowed.add(Status.TOO_LARGE)
    if header.opcode == Op.HELLO and not authenticated:
        allowed |= {Status.TOO_LARGE, Status.UNSUPPORTED_VERSION, Status.UNAUTHORIZED}
    return allowed


def split_stream(data: bytes) -> list[tuple[Header | None, bytes, bool, int]]:
    """The frames the server will see in ``data``: (header or None if bad, payload, complete, bad-header status)."""
    frames = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < HEADER_BYTES:
            frames.append((None, data[pos:], False, -1))  # a partial header: the server waits, then sees EOF
            break
        try:
            header = Header.unpack(data[pos:pos + HEADER_BYTES])
        except ProtocolError as exc:
            frames.append((None, b"", True, int(exc.status)))
            break
        body = data[pos + HEADER_BYTES:pos + HEADER_BYTES + header.payload_len]
        complete = len(body) == header.payload_len
        frames.append((header, body, complete, 0))
        if not complete:
            break
        pos += HEADER_BYTES + header.payload_len
    return frames


class Replies:
    """Reads replies from a socket; every read must finish within TIMEOUT (else the server hangs)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""
        self.eof = False

    def _fill(self, size: int) -> bool:
        while len(self.buffer) < size and not self.eof:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            except TimeoutError:
                pytest.fail(f"the server neither answered nor closed within {TIMEOUT} s")
            if not chunk:
                self.eof = True
            self.buffer += chunk
        return len(self.buffer) >= size

    def next(self) -> tuple[Header, bytes] | None:
        """The next reply, or None if the server closed the connection first."""
        if not self._fill(HEADER_BYTES):
            assert self.buffer == b"", f"the server closed mid-header: {self.buffer!r}"
            return None
        header = Header.unpack(self.buffer[:HEADER_BYTES])
        assert header.payload_len <= MAX_INFLIGHT + 4096, header
        assert self._fill(HEADER_BYTES + header.payload_len), f"the server closed mid-reply: {header}"
        payload = self.buffer[HEADER_BYTES:HEADER_BYTES + header.payload_len]
        self.buffer = self.buffer[HEADER_BYTES + header.payload_len:]
        return header, payload

    def closed(self) -> bool:
        """True if the server closed without sending anything more."""
        return not self._fill(1)


def check_success(header: Header, request: Header, payload: bytes, body: bytes) -> None:
    """A successful reply must fit its request."""
    op = request.opcode
    assert header.status == 0
    if op == Op.HELLO:
        welcome = Welcome.unpack(payload)
        assert (welcome.version, welcome.namespace) == (1, "default")
        assert (welcome.max_frame_bytes, welcome.max_keys, welcome.max_inflight_bytes) == \
            (MAX_FRAME, MAX_KEYS, MAX_INFLIGHT)
    elif op == Op.PING:
        assert payload == body and header.count == 0
    elif op == Op.EXISTS_PREFIX:
        assert payload == b"" and header.count <= request.count
    elif op == Op.GET:
        keys = unpack_keys(body, request.count)
        assert header.count == request.count and len(payload) >= 8 * request.count
        pos = 8 * request.count
        for i, key in enumerate(keys):
            (size,) = U64.unpack_from(payload, 8 * i)
            if size == MISSING:
                continue
            found = payload[pos:pos + size]
            assert len(found) == size and blob_intact(key, found), f"GET returned a blob not of key {key!r}"
            pos += size
        assert pos == len(payload)
    elif op == Op.PUT:
        assert len(payload) == request.count and set(payload) <= {r.value for r in PutResult}
        assert header.count == payload.count(PutResult.STORED)
    elif op == Op.DELETE:
        assert len(payload) == request.count and set(payload) <= {0, 1} and header.count == sum(payload)
    elif op == Op.STATS:
        assert unpack_json(payload)["namespace"] == "default"
    elif op == Op.LIST:
        assert header.count <= request.count
        unpack_keys(payload, header.count)
    else:
        pytest.fail(f"a success reply to unknown opcode {op}")


def check_stream(replies: Replies, data: bytes, authenticated: bool, stats: Counter) -> tuple[bool, bool]:
    """Match what the server sends for ``data`` against the model; (connection still open, authenticated)."""
    for header, body, complete, bad_status in split_stream(data):
        stats["frames_seen"] += 1
        if header is None:
            reply = replies.next()
            if bad_status < 0:  # a partial header: the server may only wait for the rest, then close
                assert reply is None, f"a reply to a partial header: {reply}"
                return False, authenticated
            assert reply is not None, "no error reply to a frame with a bad magic or version"
            got, message = reply
            assert got.flags == FLAG_REPLY | FLAG_ERROR and got.status == bad_status, (got, message)
            assert got.request_id == 0
            assert replies.closed()
            stats["errors"] += 1
            stats[f"status {Status(bad_status).name}"] += 1
            return False, authenticated
        violations = header_violations(header, authenticated)
        reply = replies.next()
        if violations:
            assert reply is not None, f"no error reply to {header} (expected one of {violations})"
        elif not complete:  # the server read what there was, then saw the end of the stream
            if reply is None:
                return False, authenticated
        assert reply is not None, f"the server closed instead of answering a complete frame {header}"
        got, payload = reply
        assert (got.request_id, got.opcode) == (header.request_id, header.opcode), (got, header)
        assert got.count == 0 or not got.flags & FLAG_ERROR
        if got.flags & FLAG_ERROR:
            assert got.flags == FLAG_REPLY | FLAG_ERROR
            allowed = violations or payload_errors(header, authenticated)
            assert got.status in allowed, (Status(got.status).name, payload, header, allowed)
            assert got.status != Status.INTERNAL, payload
            assert payload.decode()  # a message
            assert replies.closed(), "the server kept the connection open after an error reply"
            stats["errors"] += 1
            stats[f"status {Status(got.status).name}"] += 1
            return False, authenticated
        assert not violations and complete, (got, header, violations)
        assert got.flags == FLAG_REPLY, got
        check_success(got, header, payload, body)
        stats["answered"] += 1
        if header.opcode == Op.HELLO:
            authenticated = True
    return True, authenticated


# -- strategies ---------------------------------------------------------------------------------------------------------

request_ids = st.integers(0, (1 << 64) - 1)
keys = st.one_of(st.sampled_from(KNOWN + UNKNOWN), st.binary(min_size=1, max_size=64))


@st.composite
def valid_frames(draw) -> bytes:
    op = draw(st.sampled_from([Op.PING, Op.EXISTS_PREFIX, Op.GET, Op.PUT, Op.DELETE, Op.STATS, Op.LIST, Op.HELLO]))
    count = 0
    if op == Op.PING:
        payload = draw(st.binary(max_size=200))
    elif op in (Op.EXISTS_PREFIX, Op.GET):
        chosen = draw(st.lists(keys, max_size=6))
        payload, count = pack_keys(chosen), len(chosen)
    elif op == Op.DELETE:
        chosen = draw(st.lists(st.sampled_from(UNKNOWN) | st.binary(min_size=1, max_size=64), max_size=4))
        payload, count = pack_keys(chosen), len(chosen)
    elif op == Op.PUT:
        items = []
        for _ in range(draw(st.integers(0, 3))):
            key = draw(st.binary(min_size=1, max_size=32) | st.sampled_from(KNOWN))
            data = draw(st.binary(max_size=120))
            items.append((key, blob(key, data) if draw(st.booleans()) else data))
        payload, count = b"".join(put_item_header(k, len(v)) + v for k, v in items), len(items)
    elif op == Op.STATS:
        payload = b""
    elif op == Op.LIST:
        payload, count = U64.pack(draw(st.integers(0, 50))), draw(st.integers(0, MAX_KEYS))
    else:
        token = draw(st.sampled_from([TOKEN, TOKEN, "", "wrong-token-wrong-token", TOKEN + "x"]))
        low, high = draw(st.sampled_from([(1, 1), (1, 1), (0, 3), (2, 5), (1, 0)]))
        payload = pack_hello(token, low, high)
    return Header(op, draw(request_ids), count, len(payload)).pack() + payload


def _set(frame: bytearray, fmt: str, offset: int, value: int) -> None:
    if len(frame) >= offset + struct.calcsize(fmt):
        struct.pack_into(fmt, frame, offset, value)


@st.composite
def mutated_frames(draw) -> bytes:
    frame = bytearray(draw(valid_frames()))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "flip", "truncate", "length", "count", "append", "byte", "opcode",
                                     "flags", "version"]))
        if kind == "flip" and frame:
            pos = draw(st.integers(0, len(frame) - 1))
            frame[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate" and frame:
            del frame[draw(st.integers(0, len(frame) - 1)):]
        elif kind == "length":
            actual = max(0, len(frame) - HEADER_BYTES)
            _set(frame, "<Q", 24, draw(st.sampled_from([0, 1, actual + 1, max(0, actual - 1), actual + 1000,
                                                          MAX_FRAME, MAX_FRAME + 1, (1 << 64) - 1]) |
                                       st.integers(0, 2 * actual + 10)))
        elif kind == "count":
            _set(frame, "<I", 16, draw(st.integers(0, 40) | st.sampled_from([MAX_KEYS + 1, (1 << 32) - 1])))
        elif kind == "append":
            frame += draw(st.binary(min_size=1, max_size=40))
        elif kind == "byte" and frame:
            frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
        elif kind == "opcode":
            _set(frame, "<B", 5, draw(st.integers(0, 255)))
        elif kind == "flags":
            _set(frame, "<H", 6, draw(st.integers(1, 0xFFFF)))
        elif kind == "version":
            _set(frame, "<B", 4, draw(st.sampled_from([0, 2, 9, 255])))
    return bytes(frame)


@st.composite
def random_headers(draw) -> bytes:
    payload = draw(st.binary(max_size=120))
    exact = draw(st.booleans())
    return HEADER.pack(
        MAGIC,
        draw(st.sampled_from(SUPPORTED_VERSIONS) | st.integers(0, 255)),
        draw(st.integers(1, 8) | st.integers(0, 255)),
        draw(st.just(0) | st.integers(0, 0xFFFF)),
        draw(request_ids),
        draw(st.integers(0, 8) | st.integers(0, (1 << 32) - 1)),
        draw(st.just(0) | st.integers(0, (1 << 32) - 1)),
        len(payload) if exact else draw(st.integers(0, 300) | st.integers(0, (1 << 64) - 1)),
    ) + payload


frames = st.one_of(valid_frames(), mutated_frames(), mutated_frames(), random_headers(),
                   st.binary(min_size=1, max_size=80))


@dataclass
class Session:
    hello: bool
    pipelined: bool
    frames: list[bytes] = field(default_factory=list)


sessions = st.builds(Session, hello=st.booleans() | st.just(True), pipelined=st.booleans(),
                     frames=st.lists(frames, min_size=1, max_size=14))


# -- running a session ---------------------------------------------------------------------------------------------------

HELLO_FRAME = Header(Op.HELLO, 1, 0, len(pack_hello(TOKEN))).pack() + pack_hello(TOKEN)


def open_connection(url: str) -> socket.socket:
    sock = socket.create_connection(host_port(url), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered an earlier frame with an error and closed: its reply is still readable


def finish(sock: socket.socket, replies: Replies) -> None:
    """Half-close: the server sees the end of the stream and must close its side, at once."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    assert replies.closed(), f"unexpected bytes after the last reply: {replies.buffer[:100]!r}"
    sock.close()


def run_session(url: str, session: Session, stats: Counter) -> None:
    if session.pipelined:
        data = (HELLO_FRAME if session.hello else b"") + b"".join(session.frames)
        sock = open_connection(url)
        send(sock, data)
        try:
            sock.shutdown(socket.SHUT_WR)  # everything is on the wire: the rest must come out by itself
        except OSError:
            pass
        replies = Replies(sock)
        check_stream(replies, data, False, stats)
        assert replies.closed(), f"unexpected bytes after the last reply: {replies.buffer[:100]!r}"
        sock.close()
        stats["frames_sent"] += len(session.frames)
        stats["connections"] += 1
        return
    sock = None
    replies = None
    authenticated = False
    for frame in session.frames:
        if sock is None:
            sock = open_connection(url)
            replies = Replies(sock)
            stats["connections"] += 1
            authenticated = False
            if session.hello:
                send(sock, HELLO_FRAME)
                assert check_stream(replies, HELLO_FRAME, False, stats) == (True, True)
                authenticated = True
        send(sock, frame)
        stats["frames_sent"] += 1
        parts = split_stream(frame)
        incomplete = bool(parts) and not parts[-1][2]
        if incomplete:  # the frame ends early: the server may wait for the rest, so end the stream
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        still_open, authenticated = check_stream(replies, frame, authenticated, stats)
        if not still_open or incomplete:
            finish(sock, replies)
            sock = None
    if sock is not None:
        finish(sock, replies)


# -- the tests -----------------------------------------------------------------------------------------------------------

def test_the_model_splits_streams_like_the_server():
    ping = Header(Op.PING, 3, 0, 2).pack() + b"hi"
    assert [(h.request_id if h else None, b, c) for h, b, c, _ in split_stream(ping + ping[:10])] == \
        [(3, b"hi", True), (None, ping[:10], False)]
    assert split_stream(b"JUNK" + ping[4:])[0][3] == Status.MALFORMED
    assert split_stream(ping[:4] + b"\x09" + ping[5:])[0][3] == Status.UNSUPPORTED_VERSION
    assert split_stream(ping[:-1])[0][2] is False
    assert header_violations(Header(Op.GET, 1, MAX_KEYS + 1, MAX_FRAME + 1, 1), False) == {
        Status.MALFORMED, Status.TOO_MANY_KEYS, Status.TOO_LARGE, Status.NOT_AUTHENTICATED}
    assert header_violations(Header(77, 1), True) == {Status.UNKNOWN_OPCODE}
    assert header_violations(Header(Op.HELLO, 1), False) == set()


def open_descriptors(server: ServerProcess) -> int | None:
    try:
        return len(os.listdir(f"/proc/{server.proc.pid}/fd"))
    except OSError:  # not Linux
        return None


def internal_errors(server: ServerProcess) -> float:
    text = urllib.request.urlopen(server.metrics_url + "/metrics", timeout=5).read().decode()
    match = re.search(r'^kvstore_server_errors_total\{status="INTERNAL"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_fuzzed_frames_never_hurt_the_server(fuzz_server, witness):
    stats: Counter = Counter()
    descriptors = open_descriptors(fuzz_server)
    started = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                                     HealthCheck.function_scoped_fixture])
    @given(st.lists(sessions, min_size=1, max_size=4))
    def run(examples: list[Session]) -> None:
        for session in examples:
            run_session(fuzz_server.url, session, stats)
        stats["examples"] += 1
        assert_server_fine(fuzz_server, witness)

    run()
    elapsed = time.monotonic() - started
    print(f"\nfuzz: {dict(stats)} in {elapsed:.1f} s")
    assert stats["frames_sent"] >= 3000, stats
    assert stats["answered"] > 300 and stats["errors"] > 300, stats
    for status in ("MALFORMED", "UNKNOWN_OPCODE", "TOO_LARGE", "TOO_MANY_KEYS", "NOT_AUTHENTICATED",
                   "UNSUPPORTED_VERSION"):
        assert stats[f"status {status}"] > 0, (status, stats)
    assert_server_fine(fuzz_server, witness)
    assert internal_errors(fuzz_server) == 0
    if descriptors is not None:  # every fuzzing connection was closed on the server's side too
        deadline = time.monotonic() + 5
        while open_descriptors(fuzz_server) > descriptors + 2:
            assert time.monotonic() < deadline, (open_descriptors(fuzz_server), descriptors)
            time.sleep(0.05)


def test_random_garbage_connections_in_a_burst(fuzz_server, witness):
    """Many short-lived connections sending garbage, some closing at once: the server keeps serving."""
    rng = random.Random(1234)
    for i in range(200):
        sock = open_connection(fuzz_server.url)
        data = rng.randbytes(rng.randrange(0, 200))
        if i % 3 == 0:
            data = HELLO_FRAME + data
        send(sock, data)
        if i % 2:
            sock.close()  # gone without waiting
            continue
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        replies = Replies(sock)
        while replies.next() is not None:
            pass
        sock.close()
    assert_server_fine(fuzz_server, witness)
