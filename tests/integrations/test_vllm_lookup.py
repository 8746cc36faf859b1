"""The scheduler asking every worker's store over abstract Unix sockets: ``LookupServer`` and ``LookupClient``.

Answers are the lookup function's, merged over ranks as the smallest. A
rank that is down, goes away or answers late is a miss (never an exception
into vLLM), and is not asked again for ``RETRY_SECONDS``, after which it is.
A hostile or broken client loses its connection and nothing else: the
server goes on serving good ones, and stops its threads on ``close()``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
import types
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.integrations import vllm_lookup
from kvstore.integrations.vllm_lookup import MAX_CONNECTIONS, MAX_HEADER, Answer, LookupClient, LookupServer, address


def _name() -> str:
    return address(f"test-{uuid.uuid4().hex}", 0, 0, 0)


def _table_lookup(held: int, tier: str = "host"):
    """A rank holding the first ``held`` tokens of any prompt; records what it was asked."""
    asked = []

    def lookup(tokens, salt):
        asked.append((list(tokens), salt))
        n = min(held, len(tokens))
        return Answer(n, {tier: n} if n else {})
    lookup.asked = asked
    return lookup


@pytest.fixture
def servers():
    made = []

    def factory(lookup, name: str | None = None) -> LookupServer:
        made.append(LookupServer(name or _name(), lookup))
        return made[-1]
    yield factory
    for server in made:
        server.close()


@pytest.fixture
def clients():
    made = []

    def factory(names, timeout: float = 5) -> LookupClient:
        made.append(LookupClient(list(names), timeout=timeout))
        return made[-1]
    yield factory
    for client in made:
        client.close()


@pytest.fixture
def clock(monkeypatch):
    """The module's clock, moved by hand: the retry back-off without sleeping."""
    now = [1000.0]
    monkeypatch.setattr(vllm_lookup, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    return now


def _raw(name: str) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(5)
    conn.connect(name)
    return conn


def _dropped(conn: socket.socket) -> bool:
    """Whether the server closed ``conn``: reads reach EOF (a hang fails by the socket timeout)."""
    with conn, contextlib.suppress(ConnectionResetError):
        while conn.recv(1 << 16):
            pass
    return True


def _frame(payload: bytes) -> bytes:
    return struct.pack("<I", len(payload)) + payload


def _header(**fields) -> bytes:
    return _frame(json.dumps(fields).encode())


def _serves(name: str) -> bool:
    with contextlib.closing(LookupClient([name], timeout=5)) as client:
        return client.lookup([1, 2, 3], None).load_tokens == 3


def test_answers_are_the_lookup_functions(servers, clients):
    lookup = _table_lookup(5)
    server = servers(lookup)
    client = clients([server.name])
    tokens = [0, 1, 2**31, 2**32 - 1, 7, 9, 11]
    assert client.lookup(tokens, "salt") == Answer(5, {"host": 5})
    assert client.lookup(tokens[:3], None) == Answer(3, {"host": 3})  # the same connection, asked again
    assert client.lookup([], None) == Answer(0, {})
    assert lookup.asked == [(tokens, "salt"), (tokens[:3], None), ([], None)]
    assert client.failures == 0


def test_ranks_are_merged_as_the_smallest_answer(servers, clients):
    ranks = [servers(_table_lookup(held, tier)) for held, tier in ((9, "host"), (4, "disk"), (6, "host"))]
    client = clients([r.name for r in ranks])
    for _ in range(3):  # first asked one by one, then side by side on kept connections
        assert client.lookup(list(range(12)), None) == Answer(4, {"disk": 4})
    assert client.lookup([5, 6], "x") == Answer(2, {"host": 2})
    with pytest.raises(ValueError, match="names"):
        LookupClient([])


def test_a_rank_that_is_down_is_a_miss_and_is_retried_after_the_back_off(servers, clients, clock, monkeypatch):
    monkeypatch.setattr(vllm_lookup, "RETRY_SECONDS", 0.5)
    up, down = servers(_table_lookup(8)), _name()
    client = clients([up.name, down])
    assert client.lookup(list(range(10)), None) == Answer()
    assert client.failures == 1
    late = _table_lookup(8)
    servers(late, down)
    for _ in range(4):  # the scheduler asks every step: the back-off is not extended by asking
        clock[0] += 0.1
        assert client.lookup(list(range(10)), None) == Answer()
    assert late.asked == []  # not asked during the back-off
    clock[0] += 0.2
    assert client.lookup(list(range(10)), None) == Answer(8, {"host": 8})
    assert len(late.asked) == 1


def test_a_rank_closed_mid_way_is_a_miss_then_served_again_when_back(servers, clients, clock, monkeypatch):
    monkeypatch.setattr(vllm_lookup, "RETRY_SECONDS", 0.5)
    first, other = servers(_table_lookup(100)), servers(_table_lookup(100))
    client = clients([other.name, first.name])  # the other rank is asked first: its answer is in flight
    assert client.lookup([1, 2, 3, 4], None).load_tokens == 4
    first.close()
    assert client.lookup([1, 2, 3], None) == Answer()
    servers(_table_lookup(100), first.name)  # the address can be bound again
    clock[0] += 0.6
    assert client.lookup(list(range(8)), None).load_tokens == 8  # not the stale answer of 3


def test_a_slow_rank_is_a_miss_within_the_timeout(servers, clients, clock):
    release = threading.Event()

    def slow(tokens, salt):
        release.wait(5)
        return Answer(len(tokens))
    server = servers(slow)
    client = clients([server.name], timeout=0.05)
    try:
        assert client.lookup([1, 2], None) == Answer()
        assert client.failures == 1
        assert client.lookup([1, 2], None) == Answer()  # in its back-off: not asked, no wait
    finally:
        release.set()
    clock[0] += vllm_lookup.RETRY_SECONDS + 0.1
    client._peers[0].timeout = 5  # the answer is not slow now: no timing assumption below
    assert client.lookup([1, 2, 3], None) == Answer(3)  # a fresh connection: no stale answer read as this one's


def test_a_lookup_function_that_raises_is_a_miss(servers, clients):
    def broken(tokens, salt):
        raise RuntimeError("tier failed")
    server = servers(broken)
    client = clients([server.name])
    assert client.lookup([1, 2, 3], None) == Answer()
    assert client.lookup([1, 2, 3], None) == Answer()  # the connection stays usable
    assert client.failures == 0


@pytest.mark.parametrize("request_bytes", [
    struct.pack("<I", 1 << 30), struct.pack("<I", MAX_HEADER + 1) + b"{" * 64,  # length prefixes over the limit
    _frame(b"{not json"), _frame(b"\xff\xfe\x00"), _frame(b"[1, 2]"),
    _header(tokens=-1, salt=None), _header(tokens=True, salt=None), _header(tokens=2, salt=5),
    _header(tokens=vllm_lookup.MAX_TOKENS + 1),
    _header(tokens=3, salt=None) + _frame(b"\0" * 8),  # wrong token byte count
    _header(tokens=1, salt=None) + struct.pack("<I", 1 << 31),  # a token frame over the limit
], ids=lambda b: b[:12].hex())
def test_a_malformed_request_drops_that_connection_only(servers, clients, request_bytes):
    server = servers(_table_lookup(3))
    client = clients([server.name])
    assert client.lookup([1, 2, 3], None).load_tokens == 3
    hostile = _raw(server.name)
    hostile.sendall(request_bytes)
    assert _dropped(hostile)
    assert client.lookup([1, 2, 3], None).load_tokens == 3  # a good client's kept connection is unaffected
    assert _serves(server.name)


@settings(max_examples=40, deadline=None)
@given(junk=st.binary(min_size=0, max_size=300))
def test_random_bytes_never_break_the_server(junk):
    with LookupServer(_name(), _table_lookup(3)) as server:
        hostile = _raw(server.name)
        hostile.sendall(junk)
        hostile.shutdown(socket.SHUT_WR)  # an incomplete frame then ends: the server must not wait on it forever
        assert _dropped(hostile)
        assert _serves(server.name)


@pytest.mark.parametrize("reply", [
    b"", _frame(b"nope"), struct.pack("<I", MAX_HEADER + 1), _frame(b'{"load_tokens": 2}'),
    _frame(b'{"load_tokens": -3, "sources": {}}'), _frame(b'{"load_tokens": true, "sources": {}}'),
    _frame(b'{"load_tokens": 2, "sources": {"host": "2"}}'),
], ids=lambda b: b[:12].hex() or "eof")
def test_a_rank_that_answers_garbage_is_a_miss(clients, reply):
    name = _name()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(name)
    listener.listen(1)

    def fake_rank():
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            conn.recv(1 << 16)
            conn.sendall(reply)
    thread = threading.Thread(target=fake_rank, daemon=True)
    thread.start()
    client = clients([name])
    with listener:
        assert client.lookup([1, 2], None) == Answer()
        assert client.failures == 1
        thread.join(5)


def test_connections_past_the_limit_are_closed_and_the_server_keeps_serving(servers, clients):
    server = servers(_table_lookup(3))
    held = [_raw(server.name) for _ in range(MAX_CONNECTIONS)]
    for conn in held:  # each one is served: the server holds MAX_CONNECTIONS threads
        conn.sendall(_header(tokens=1, salt=None) + _frame(b"\0" * 4))
        assert json.loads(conn.recv(1 << 16)[4:])["load_tokens"] == 1
    assert _dropped(_raw(server.name))
    client = clients([server.name])
    assert client.lookup([1, 2], None) == Answer()  # over the limit: a miss, not a hang
    for conn in held:
        conn.close()
    for _ in range(200):  # the server notices the closed connections as their threads read EOF
        if len(server._conns) == 0:
            break
        time.sleep(0.01)
    assert _serves(server.name)


def test_close_stops_every_thread_and_frees_the_address(servers, clients):
    release, plain = threading.Event(), _table_lookup(3)

    def lookup(tokens, salt):
        if salt == "slow":
            release.wait(5)
        return plain(tokens, salt)
    server = servers(lookup)
    idle = [_raw(server.name) for _ in range(3)]  # connections with threads blocked in recv
    busy = _raw(server.name)
    busy.sendall(_header(tokens=0, salt="slow") + _frame(b""))  # a thread inside the lookup when close() starts
    assert _serves(server.name)
    threads = [server._acceptor, *server._threads]
    assert server._acceptor.is_alive() and len(threads) == 6
    opener = threading.Timer(0.1, release.set)
    opener.start()
    server.close()  # waits for the busy thread to leave the lookup
    assert not any(t.is_alive() for t in threads)
    opener.join()
    assert all(_dropped(conn) for conn in [*idle, busy])
    server.close()  # twice: nothing left to do
    with pytest.raises(OSError):
        _raw(server.name)
    again = servers(_table_lookup(1), server.name)
    assert clients([again.name]).lookup([4, 5], None).load_tokens == 1
