"""RemoteTier against real ``kvstore serve`` processes: exact bytes, batches, codecs, integrity, a server
that is down, slow or misbehaving, and a KVStore whose lowest tier is the server.

One server (64 MiB RAM, 256 MiB LMDB) is shared by the module; every test gets its own namespace (a
tenant of the server's tokens file), so counters and key listings start empty. Tests that stop,
start or limit a server start their own.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import socket
import threading
import time
import urllib.request

import pytest
import torch

from conftest import assert_same_kv, make_kv, make_tokens, run_threads, tiny_layout
from kvstore import KVStore, StoreConfig
from kvstore.blockformat import HEADER_BYTES, BlockHeader
from kvstore.client import Connection
from kvstore.compression.registry import get_codec
from kvstore.protocol import FLAG_REPLY, HEADER_BYTES as FRAME_HEADER_BYTES, Header, Op, PutResult, Welcome
from kvstore.server.blobs import BLOCK_OVERHEAD_BYTES
from kvstore.tiers.base import Tier
from kvstore.tiers.remote import FAILURES, RemoteTier
from server.conftest import TOKEN, ServerProcess

FP16 = tiny_layout()
BLOB = FP16.block_bytes + HEADER_BYTES  # one full fp16 tiny block's bytes on the server
OVERHEAD = BLOCK_OVERHEAD_BYTES  # what the server counts for each block besides its bytes
TENANTS = 40
QUOTA_TOKEN = "quota-tenant-token-0123456789"
_next_tenant = itertools.count()


def tenant_token(i: int) -> str:
    return f"tenant-{i:03d}-token-0123456789abcdef"


def key(*parts: object) -> bytes:
    """A 32-byte block key named by ``parts``."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=32).digest()


def zeros(layout, tokens: int = 16) -> torch.Tensor:
    return torch.zeros(layout.shape(tokens), dtype=layout.dtype)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests(server: ServerProcess, op: str) -> float:
    """The server's request counter for ``op`` (Prometheus ``/metrics``)."""
    text = urllib.request.urlopen(server.metrics_url + "/metrics", timeout=10).read().decode()
    match = re.search(rf'^kvstore_server_requests_total{{op="{op}"}} (\S+)$', text, flags=re.M)
    return float(match.group(1)) if match else 0.0


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    config = tmp_path_factory.mktemp("remote-tokens") / "tokens.toml"
    lines = []
    for i in range(TENANTS):
        lines += [f"[tenants.ns{i:03d}]", f'token = "{tenant_token(i)}"']
    lines += ["[tenants.small]", f'token = "{QUOTA_TOKEN}"', 'quota = "1MiB"']
    config.write_text("\n".join(lines) + "\n")
    server = ServerProcess(tmp_path_factory.mktemp("remote-srv"), "--host-bytes", "64MiB", "--disk-bytes", "256MiB",
                           "--tokens-file", str(config), token=None).start()
    yield server
    server.kill()


@pytest.fixture
def token() -> str:
    """A namespace of the module's server no other test uses."""
    i = next(_next_tenant)
    assert i < TENANTS, "add tenants to the module server's tokens file"
    return tenant_token(i)


@pytest.fixture
def remote(srv, token):
    """``remote(layout=FP16, token=<this test's>, url=srv.url, **kwargs)``: RemoteTiers closed at teardown."""
    tiers = []

    def factory(layout=FP16, token=token, url=None, **kwargs) -> RemoteTier:
        tier = RemoteTier(url or srv.url, layout, token, **kwargs)
        tiers.append(tier)
        return tier

    yield factory
    for tier in tiers:
        tier.close()


# -- the data path -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_round_trip_is_byte_exact(remote, dtype):
    layout = tiny_layout(dtype=dtype)
    tier = remote(layout)
    assert isinstance(tier, Tier) and tier.persistent
    blocks = {key("full"): make_kv(layout, 16, seed=1), key("tail"): make_kv(layout, 5, seed=2),
              key("one"): make_kv(layout, 1, seed=3)}
    assert tier.put_many(list(blocks.items())) == 3
    for k, block in blocks.items():
        out = zeros(layout, block.shape[2])
        assert tier.get_into(k, out)
        assert_same_kv(out, block)
    assert tier.put_many(list(blocks.items())) == 3  # already held: counts, is not written again
    stats = tier.stats()
    assert stats["blocks_written"] == 3 and stats["hits"] == 3 and stats["corrupt"] == 0
    assert tier.get_into(key("never"), zeros(layout)) is False


def test_batches_take_one_round_trip_each(srv, remote):
    tier = remote()
    blocks = [(key("batch", i), make_kv(FP16, 16 if i % 4 else 7, seed=i)) for i in range(12)]
    before = requests(srv, "PUT")
    assert tier.put_many(blocks) == 12
    assert requests(srv, "PUT") - before == 1
    # hits and misses interleaved, a partial block among them: one GET, results in order
    keys = [k for k, _ in blocks[:6]] + [key("missing", 0)] + [k for k, _ in blocks[6:]] + [key("missing", 1)]
    outs = [zeros(FP16, b.shape[2]) for _, b in blocks[:6]] + [zeros(FP16)] + \
           [zeros(FP16, b.shape[2]) for _, b in blocks[6:]] + [zeros(FP16)]
    before = requests(srv, "GET")
    found = tier.get_many_into(keys, outs)
    assert requests(srv, "GET") - before == 1
    assert found == [True] * 6 + [False] + [True] * 6 + [False]
    for (_, block), out in zip(blocks, outs[:6] + outs[7:13]):
        assert_same_kv(out, block)
    assert not outs[6].any() and not outs[13].any()
    before = requests(srv, "EXISTS_PREFIX")
    assert tier.prefix_length([k for k, _ in blocks] + [key("missing", 2)]) == 12
    assert requests(srv, "EXISTS_PREFIX") - before == 1
    assert tier.stats()["hits"] == 12


def test_prefix_length_and_contains(remote):
    tier = remote()
    chain = [key("chain", i) for i in range(8)]
    held = [0, 1, 2, 3, 4, 6]
    assert tier.put_many([(chain[i], make_kv(FP16, 16, seed=i)) for i in held]) == 6
    assert tier.prefix_length(chain) == 5
    assert tier.prefix_length(chain[:3]) == 3
    assert tier.prefix_length(chain[5:]) == 0
    assert tier.prefix_length(chain[6:7]) == 1
    assert tier.prefix_length([]) == 0
    assert tier.contains(chain[4]) and tier.contains(chain[6])
    assert not tier.contains(chain[5]) and not tier.contains(chain[7])


def test_delete_and_keys_in_lru_order(remote):
    tier = remote()
    a, b, c = key("a"), key("b"), key("c")
    assert list(tier.keys()) == []
    assert tier.put_many([(a, make_kv(FP16, 16, 1)), (b, make_kv(FP16, 16, 2)), (c, make_kv(FP16, 3, 3))]) == 3
    assert list(tier.keys()) == [c, b, a]  # a chain: its first block the most recently used
    assert tier.get_into(b, zeros(FP16))  # a read makes it the most recently used
    assert list(tier.keys()) == [c, a, b]
    assert tier.delete(b) is True
    assert tier.delete(b) is False
    assert list(tier.keys()) == [c, a]
    assert tier.get_into(b, zeros(FP16)) is False
    assert not tier.contains(b)
    assert tier.stats()["blocks"] == 2 and tier.used_bytes() == BLOB + 3 * FP16.token_bytes + HEADER_BYTES + 2 * OVERHEAD


def test_keys_are_per_namespace(remote):
    mine, theirs = remote(), remote(token=tenant_token(next(_next_tenant)))
    mine.put_many([(key("ns", 0), make_kv(FP16, 16))])
    theirs.put_many([(key("ns", 1), make_kv(FP16, 16))])
    assert list(mine.keys()) == [key("ns", 0)] and list(theirs.keys()) == [key("ns", 1)]
    assert theirs.get_into(key("ns", 0), zeros(FP16)) is False  # another namespace's block is not ours
    assert not theirs.contains(key("ns", 0))


def test_stats_count_hits_misses_and_bytes(remote):
    tier = remote()
    full, tail = make_kv(FP16, 16, seed=4), make_kv(FP16, 5, seed=5)
    assert tier.put_many([(key("s", 0), full), (key("s", 1), full), (key("s", 2), tail)]) == 3
    assert tier.get_into(key("s", 0), zeros(FP16)) and tier.get_into(key("s", 2), zeros(FP16, 5))
    assert tier.get_into(key("s", 9), zeros(FP16)) is False
    stats = tier.stats()
    assert (stats["hits"], stats["corrupt"]) == (2, 0)  # misses: see the test below
    assert stats["bytes_read"] == FP16.block_bytes + 5 * FP16.token_bytes
    assert stats["bytes_written"] == 2 * FP16.block_bytes + 5 * FP16.token_bytes
    assert stats["blocks_written"] == 3
    assert stats["blocks"] == 3
    assert stats["used_bytes"] == tier.used_bytes() == 2 * BLOB + 5 * FP16.token_bytes + HEADER_BYTES + 3 * OVERHEAD
    assert stats["capacity_bytes"] == 256 << 20
    assert (stats["errors"], stats["timeouts"], stats["unavailable"]) == (0, 0, 0)


def test_a_key_the_server_does_not_hold_counts_a_miss(remote):
    tier = remote()
    tier.put_many([(key("m", 0), make_kv(FP16, 16))])
    assert tier.get_into(key("m", 1), zeros(FP16)) is False
    assert tier.get_many_into([key("m", 0), key("m", 2)], [zeros(FP16), zeros(FP16)]) == [True, False]
    stats = tier.stats()
    assert (stats["hits"], stats["misses"]) == (1, 2)


def test_capacity_is_the_quota_or_the_servers_capacity(remote):
    assert remote().capacity_bytes == 256 << 20  # no quota: the server's LMDB capacity
    small = remote(token=QUOTA_TOKEN)
    assert small.capacity_bytes == 1 << 20  # asked before any other call: it connects to learn it
    assert small.stats()["capacity_bytes"] == 1 << 20


def test_lossless_codec_frames_travel_and_read_back_exactly(remote):
    zstd = remote(codec=get_codec("zstd"))
    blocks = [(key("zstd", i), make_kv(FP16, 16 if i else 6, seed=i)) for i in range(4)]
    assert zstd.put_many(blocks) == 4
    frames = sum(len(zstd.encoding.encode(b)) for _, b in blocks)
    assert zstd.used_bytes() == frames + 4 * (HEADER_BYTES + OVERHEAD)  # the server holds the frames, not raw bytes
    assert zstd.stats()["bytes_written"] == frames
    raw = remote()  # a tier without the codec reads lossless frames too
    for k, block in blocks:
        out = zeros(FP16, block.shape[2])
        assert zstd.get_into(k, out)
        assert_same_kv(out, block)
        out = zeros(FP16, block.shape[2])
        assert raw.get_into(k, out)
        assert_same_kv(out, block)


def test_lossy_codec_reads_back_what_the_codec_gives(remote):
    codec = get_codec("int8")
    tier = remote(codec=codec)
    block = make_kv(FP16, 16, seed=7)
    assert tier.put_many([(key("int8"), block)]) == 1
    assert tier.used_bytes() - OVERHEAD < BLOB * 3 // 4  # a frame of about half the raw size travelled
    out = zeros(FP16)
    assert tier.get_into(key("int8"), out)
    assert_same_kv(out, codec.decode(codec.encode(block)))
    assert (out.float() - block.float()).abs().max() <= 0.05 * block.float().abs().max()
    assert remote().get_into(key("int8"), zeros(FP16)) is False  # a lossy frame only for its own codec


def test_an_exact_reader_never_meets_a_lossy_blob_and_both_keep_their_own(remote):
    """A fleet that turned its lossy ``remote_codec`` off (or runs both): the exact reader counted the int8 blob
    corrupt and left it, the server answered its put ``PRESENT``, and the prefix was a miss for good; deleting
    it instead made the two kinds of client delete each other's blocks. A lossy form has names of its own."""
    block = make_kv(FP16, 16, seed=8)
    lossy = remote(codec=get_codec("int8"))
    assert lossy.put_many([(key("was-lossy"), block)]) == 1
    exact = remote()
    assert not exact.contains(key("was-lossy")) and exact.get_into(key("was-lossy"), zeros(FP16)) is False
    stats = exact.stats()
    assert (stats["stale"], stats["corrupt"]) == (0, 0)
    assert exact.put_many([(key("was-lossy"), block)]) == 1
    out = zeros(FP16)
    assert exact.get_into(key("was-lossy"), out)
    assert_same_kv(out, block)
    assert lossy.contains(key("was-lossy")) and lossy.get_into(key("was-lossy"), zeros(FP16))
    assert lossy.delete(key("was-lossy")) and exact.contains(key("was-lossy"))

def test_raw_blocks_land_in_the_output_without_a_bounce_buffer(remote, monkeypatch):
    tier = remote()
    block, tail = make_kv(FP16, 16, seed=8), make_kv(FP16, 5, seed=9)
    tier.put_many([(key("direct"), block), (key("direct-tail"), tail)])
    decodes = []
    decode = tier.encoding.decode_into
    monkeypatch.setattr(tier.encoding, "decode_into",
                        lambda payload, out, encoding: decodes.append(1) or decode(payload, out, encoding))
    out, out_tail = zeros(FP16), zeros(FP16, 5)
    assert tier.get_many_into([key("direct"), key("direct-tail")], [out, out_tail]) == [True, True]
    assert_same_kv(out, block)
    assert_same_kv(out_tail, tail)
    assert decodes == []  # read from the socket straight into the tensors
    # a token range of a larger buffer is strided, but each (layer, part) of it is contiguous: still direct
    big = torch.full(FP16.shape(40), 7.0, dtype=FP16.dtype)
    view = big[:, :, 12:28]
    assert not view.is_contiguous()
    assert tier.get_into(key("direct"), view)
    assert_same_kv(big[:, :, 12:28], block)
    assert bool((big[:, :, :12] == 7).all()) and bool((big[:, :, 28:] == 7).all())
    assert decodes == []
    # heads and head_dim swapped in memory: only a bounce buffer can fill it
    swapped = torch.zeros(2, 2, 16, FP16.head_dim, FP16.num_kv_heads, dtype=FP16.dtype).transpose(3, 4)
    assert tuple(swapped.shape) == tuple(FP16.shape(16))
    assert tier.get_into(key("direct"), swapped)
    assert_same_kv(swapped.contiguous(), block)
    assert decodes == [1]


def test_an_output_of_another_size_is_a_miss(remote):
    tier = remote()
    tier.put_many([(key("size"), make_kv(FP16, 5, seed=1))])
    out = torch.full(FP16.shape(16), 3.0, dtype=FP16.dtype)
    assert tier.get_into(key("size"), out) is False
    assert tier.stats()["misses"] == 1
    assert tier.get_into(key("size"), zeros(FP16, 5))


# -- integrity ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("other", [dict(dtype=torch.bfloat16), dict(num_layers=3)], ids=["same-size", "other-size"])
def test_a_block_of_another_layout_under_a_key_is_a_miss_and_repaired(remote, other):
    """A store's keys derive from its layout, so a blob under one of them whose header names another layout
    is no honest writer's: it was kept, and the key stayed a miss for good (a put of it answered PRESENT).
    It is a miss, deleted, and the next put stores the right block."""
    mine, theirs = tiny_layout(), tiny_layout(**other)
    assert mine.fingerprint != theirs.fingerprint
    writer, reader = remote(theirs), remote(mine)
    assert writer.put_many([(key("layout"), make_kv(theirs, 16, seed=3))]) == 1
    out = torch.full(mine.shape(16), 5.0, dtype=mine.dtype)
    assert reader.get_into(key("layout"), out) is False
    assert reader.stats()["hits"] == 0 and reader.stats()["misses"] == 1 and reader.stats()["corrupt"] == 1
    assert not reader.contains(key("layout"))
    block = make_kv(mine, 16, seed=4)
    assert reader.put_many([(key("layout"), block)]) == 1
    again = zeros(mine)
    assert reader.get_into(key("layout"), again)
    assert_same_kv(again, block)


def test_the_server_rejects_blobs_that_do_not_verify(srv, token):
    payload = make_kv(FP16, 16, seed=6).contiguous().view(torch.uint8).numpy().tobytes()
    good = BlockHeader.for_payload(key("good"), FP16.fingerprint, payload)
    bad_sum = BlockHeader(key("bad-sum"), FP16.fingerprint, len(payload), good.checksum ^ 1).pack() + payload
    other_key = BlockHeader.for_payload(key("someone-else"), FP16.fingerprint, payload).pack() + payload
    flipped = bytearray(good.pack() + payload)
    flipped[-1] ^= 0x40
    conn = srv.connect(token)
    try:
        results = conn.put([(key("bad-sum"), [bad_sum]), (key("other-key"), [other_key]), (key("short"), [b"KVSB"]),
                            (key("flipped"), [bytes(flipped)]), (key("good"), [good.pack(), payload])])
        assert results == [PutResult.INVALID] * 4 + [PutResult.STORED]
        sizes = conn.get([key("bad-sum"), key("other-key"), key("short"), key("flipped"), key("good")],
                         lambda i, size: [memoryview(bytearray(size))])
        assert sizes == [None, None, None, None, len(payload) + HEADER_BYTES]
        assert conn.stats()["blocks"]["invalid"] == 4
    finally:
        conn.close()


# -- a server that is down, slow or misbehaving --------------------------------------------------------------


def test_a_down_server_costs_failures_then_the_tier_comes_back_on_its_own(tmp_path):
    port = free_port()
    block = make_kv(FP16, 16, seed=1)
    tier = RemoteTier(f"kvstore://127.0.0.1:{port}", FP16, TOKEN, timeout_seconds=1.0, backoff_seconds=1.0,
                      max_backoff_seconds=2.0)
    try:
        start = time.monotonic()
        # the data calls raise (the store's breaker counts them and bypasses the tier): the first one
        # tried and was refused, the others fell inside the back-off and were not even tried
        failing = [
            lambda: tier.contains(key("down")),
            lambda: tier.get_into(key("down"), zeros(FP16)),
            lambda: tier.put_many([(key("down"), block)]),
            lambda: tier.prefix_length([key("down"), key("down", 1)]),
            lambda: tier.get_many_into([key("down"), key("down", 1)], [zeros(FP16), zeros(FP16)]),
        ]
        for call in failing:
            with pytest.raises(ConnectionError):
                call()
        # deletes, listings and figures answer as if the server held nothing
        quiet = [
            lambda: tier.delete(key("down")) is False,
            lambda: list(tier.keys()) == [],
            lambda: tier.used_bytes() == 0,
            lambda: tier.capacity_bytes == 0,
        ]
        for call in quiet:
            assert call()
        assert time.monotonic() - start < 5
        stats = tier.stats()
        assert stats["timeouts"] == 0 and stats["misses"] == 0
        assert stats["unavailable"] == len(failing) - 1 + len(quiet) + 1  # stats() asked once more (its figures)
        assert stats["errors"] == 0  # the only failure tried was raised: the caller's to count
        assert "refused" in (tier.last_error or "").lower()
        server = ServerProcess(tmp_path / "srv", "--host-bytes", "16MiB", "--disk-bytes", "0")
        server.port = port
        server.start()
        try:
            # no reset, no new tier: once the back-off has passed, the next call connects
            assert wait_for(lambda: tier.put_many([(key("down"), block)]) == 1)
            out = zeros(FP16)
            assert tier.get_into(key("down"), out)
            assert_same_kv(out, block)
            assert tier.prefix_length([key("down"), key("down", 1)]) == 1
        finally:
            server.kill()
    finally:
        tier.close()


class FakeServer:
    """A TCP listener on 127.0.0.1 that speaks as much of the protocol as ``answer(header)`` says.

    ``answer`` returns (count, payload) for a reply, or None to never answer. ``answer=None``: the
    listener never even accepts (the kernel completes the handshake, nothing is read).
    """

    def __init__(self, answer=None, trickle: float = 0.0):
        self.answer = answer
        self.trickle = trickle  # seconds between the bytes of each reply after HELLO's (0: all at once)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.url = f"kvstore://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.closed = threading.Event()
        if answer is not None:
            threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    @staticmethod
    def _recv(sock: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _serve(self, sock: socket.socket) -> None:
        try:
            while True:
                header = Header.unpack(self._recv(sock, FRAME_HEADER_BYTES))
                self._recv(sock, header.payload_len)
                reply = self.answer(header)
                if reply is None:
                    self.closed.wait()
                    return
                count, payload, *declared = reply  # declared: a payload length other than the payload's
                frame = Header(header.opcode, header.request_id, count, declared[0] if declared else len(payload),
                               FLAG_REPLY).pack() + payload
                if not self.trickle or header.opcode == Op.HELLO:
                    sock.sendall(frame)
                    continue
                for i in range(len(frame)):
                    sock.sendall(frame[i:i + 1])
                    if self.closed.wait(self.trickle):
                        return
        except (OSError, EOFError):
            pass

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        for sock in self.sockets:
            sock.close()


WELCOME = Welcome(1, 1 << 20, 64, 1 << 21, 0, "default").pack()


@pytest.fixture
def fake():
    servers = []

    def factory(answer=None, trickle: float = 0.0) -> FakeServer:
        servers.append(FakeServer(answer, trickle))
        return servers[-1]

    yield factory
    for server in servers:
        server.close()


def test_a_server_that_never_answers_costs_a_timeout_not_a_hang(fake):
    server = fake(None)  # accepts no connection: the kernel completes the handshake, nothing answers
    tier = RemoteTier(server.url, FP16, TOKEN, timeout_seconds=0.3)
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            tier.get_into(key("silent"), zeros(FP16))
        with pytest.raises(ConnectionError):  # inside the back-off: not tried
            tier.put_many([(key("silent"), make_kv(FP16, 16))])
        assert time.monotonic() - start < 5
        stats = tier.stats()
        assert stats["timeouts"] == 1 and stats["errors"] == 0 and stats["unavailable"] >= 1
        assert "timed out" in (tier.last_error or "")
    finally:
        tier.close()


def test_a_server_that_stops_answering_after_hello_costs_timeouts_then_back_off(fake):
    server = fake(lambda h: (0, WELCOME) if h.opcode == Op.HELLO else None)
    tier = RemoteTier(server.url, FP16, TOKEN, timeout_seconds=0.3, backoff_seconds=0.5, max_backoff_seconds=0.5)
    try:
        block = make_kv(FP16, 16)
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            tier.get_into(key("slow"), zeros(FP16))
        assert time.monotonic() - start < 5
        with pytest.raises(ConnectionError):
            tier.contains(key("slow"))  # inside the back-off: not even tried
        for call in (lambda: tier.contains(key("slow")), lambda: tier.put_many([(key("slow"), block)]),
                     lambda: tier.prefix_length([key("slow")])):
            time.sleep(0.6)  # past the back-off: the tier tries again, on a fresh connection
            start = time.monotonic()
            with pytest.raises(TimeoutError):
                call()
            assert time.monotonic() - start < 5
        stats = tier.stats()  # inside the back-off again: stats() does not try
        assert stats["unavailable"] >= 2
        assert stats["timeouts"] == 4 and stats["errors"] == 0  # one timeout per call tried, all of them raised
        assert stats["misses"] == 0
    finally:
        tier.close()


@pytest.mark.parametrize("sizes, declared", [
    ([2**62], 8 + 2**62),  # a blob past the server's own max_inflight_bytes: it was read (and waited for) for ever
    ([2**62], 8),  # a payload length that disagrees with the size table
    ([100], 8 + 50),
])
def test_a_get_reply_naming_more_bytes_than_it_may_send_is_the_servers_failure(fake, sizes, declared):
    def answer(header: Header):
        if header.opcode == Op.HELLO:
            return 0, WELCOME
        table = b"".join(size.to_bytes(8, "little") for size in sizes)
        return len(sizes), table, declared

    tier = RemoteTier(fake(answer).url, FP16, TOKEN, timeout_seconds=30.0)
    try:
        with pytest.raises(ConnectionError, match="expected a GET reply of its size table and the blobs it names"):
            tier.get_into(key("x"), zeros(FP16))  # at once, not at the timeout
        assert "GET reply" in tier.last_error
    finally:
        tier.close()


def _misbehave(case: str):
    """Replies that follow the frame format but not the protocol: a short HELLO, a PUT result this client
    does not know (a newer server's), a STATS reply that is not JSON, a LIST reply with a broken key, an
    EXISTS_PREFIX count larger than the keys asked."""
    def answer(header: Header):
        if header.opcode == Op.HELLO:
            return (0, b"?") if case == "short-hello" else (0, WELCOME)
        if header.opcode == Op.PUT:
            return header.count, bytes([7]) * header.count
        if header.opcode == Op.STATS:
            return 0, b"<html>not json</html>"
        if header.opcode == Op.LIST:
            return 2, b"\x05ab"
        if header.opcode == Op.EXISTS_PREFIX:
            return 1000, b""
        return 0, b""
    return answer


@pytest.mark.parametrize("case", ["short-hello", "bad-replies"])
def test_a_server_breaking_the_protocol_costs_failures_not_wrong_answers(fake, case):
    """Data calls raise only the tier's failures (for the store's breaker); listings and figures never raise."""
    server = fake(_misbehave(case))
    tier = RemoteTier(server.url, FP16, TOKEN, timeout_seconds=2.0, backoff_seconds=0.001, max_backoff_seconds=0.001)
    raised, failed = {}, []
    try:
        for name, call in [("contains", lambda: tier.contains(key("x"))),
                           ("put_many", lambda: tier.put_many([(key("x"), make_kv(FP16, 16))])),
                           ("prefix_length", lambda: tier.prefix_length([key("x"), key("y")])),
                           ("keys", lambda: list(tier.keys())), ("used_bytes", tier.used_bytes),
                           ("stats", tier.stats)]:
            time.sleep(0.01)
            try:
                result = call()
            except FAILURES as exc:
                if name in ("keys", "used_bytes", "stats"):
                    raised[name] = f"{type(exc).__name__}: {exc}"
                failed.append(name)
            except Exception as exc:  # noqa: BLE001 - the point is that nothing else escapes
                raised[name] = f"{type(exc).__name__}: {exc}"
            else:
                if name == "prefix_length" and result > 2:
                    raised[name] = f"returned {result} for 2 keys"
    finally:
        tier.close()
    assert raised == {}
    # a HELLO this client cannot read fails every data call; a PUT result it does not know fails the put
    assert failed == (["contains", "put_many", "prefix_length"] if case == "short-hello" else ["put_many"])


def test_a_server_that_trickles_its_replies_costs_one_timeout_per_call(fake):
    """A byte every 0.2 s: each receive returns within the socket's timeout, so a timeout per socket
    operation let one lookup run 12 s against a 1 s timeout. The call has one deadline."""
    server = fake(lambda h: (0, WELCOME) if h.opcode == Op.HELLO else (0, b""), trickle=0.2)
    tier = RemoteTier(server.url, FP16, TOKEN, timeout_seconds=0.5, backoff_seconds=0.001, max_backoff_seconds=0.001)
    try:
        for call in (lambda: tier.contains(key("x")), lambda: tier.prefix_length([key("x")])):
            start = time.monotonic()
            with pytest.raises(TimeoutError):
                call()
            assert time.monotonic() - start < 3.0  # 0.5 s and the connect; a frame header alone took 6.4 s
            time.sleep(0.01)
    finally:
        tier.close()
    with KVStore(FP16, StoreConfig(host_bytes=4 * FP16.block_bytes, remote_url=server.url, remote_token=TOKEN,
                                   remote_timeout_seconds=0.5)) as store:
        start = time.monotonic()
        assert store.lookup(make_tokens(64)) == 0
        assert time.monotonic() - start < 3.0


def test_calls_beyond_the_pool_wait_within_one_timeout_in_all(fake):
    """Eight callers, a pool of four, a server that never answers after HELLO: a caller that waited the
    whole timeout for a free connection then had a whole timeout more to connect and call."""
    server = fake(lambda h: (0, WELCOME) if h.opcode == Op.HELLO else None)
    tier = RemoteTier(server.url, FP16, TOKEN, timeout_seconds=1.0, connections=4)
    took = []

    def call(_: int) -> None:
        start = time.monotonic()
        with pytest.raises((TimeoutError, ConnectionError)):
            tier.contains(key("x"))
        took.append(time.monotonic() - start)

    try:
        run_threads(call, 8)
    finally:
        tier.close()
    assert len(took) == 8 and max(took) < 1.8, took  # the ones that waited for a slot took 2 s


@pytest.mark.parametrize("stats, delete", [(b"[]", b"\x01"), (b'{"blocks": null}', b"\x01"),
                                           (b'{"blocks": {"blocks": "many", "used_bytes": -5}}', b"\x01"),
                                           (b"{}", b"")])
def test_replies_of_another_shape_are_failures_or_nothing_never_exceptions(fake, stats, delete):
    """STATS JSON that is not the figures the client knows, a DELETE reply shorter than the keys asked:
    ``tier.stats()`` (so ``store.stats()``) raised AttributeError or ValueError, ``delete`` IndexError."""
    replies = {Op.HELLO: (0, WELCOME), Op.STATS: (0, stats), Op.DELETE: (0, delete)}
    server = fake(lambda h: replies.get(h.opcode, (0, b"")))
    tier = RemoteTier(server.url, FP16, TOKEN, timeout_seconds=1.0, backoff_seconds=0.001, max_backoff_seconds=0.001)
    try:
        figures = tier.stats()
        assert figures["blocks"] == 0 and figures["used_bytes"] == 0
        assert tier.used_bytes() == 0
        time.sleep(0.01)
        assert tier.delete(key("x")) is (delete == b"\x01")
    finally:
        tier.close()
    with KVStore(FP16, StoreConfig(host_bytes=4 * FP16.block_bytes, remote_url=server.url,
                                   remote_token=TOKEN)) as store:
        assert store.stats()["tiers"]["remote"]["used_bytes"] == 0


def test_a_peer_declaring_a_huge_reply_is_a_failure_not_an_allocation(fake):
    """A HELLO reply claiming 2**62 bytes: the client allocated it, and MemoryError came out of KVStore()."""
    server = fake(lambda h: (0, WELCOME, 1 << 62) if h.opcode == Op.HELLO else (0, b""))
    with KVStore(FP16, StoreConfig(host_bytes=4 * FP16.block_bytes, remote_url=server.url, remote_token=TOKEN,
                                   remote_timeout_seconds=0.5)) as store:
        tokens = make_tokens(32)
        assert store.put(tokens, make_kv(FP16, 32)) == 2
        assert store.lookup(tokens) == 32  # the host tier still serves
        remote = store.stats()["tiers"]["remote"]
        assert remote["errors"] >= 1


def test_a_graceful_restart_of_the_server_costs_no_bypass(tmp_path):
    """SIGTERM, then the server starts again on its port and data: the pooled connections the old one
    closed were reused, the first call failed, and the store bypassed a healthy server for 30 s."""
    server = ServerProcess(tmp_path / "srv", "--host-bytes", "16MiB", "--disk-bytes", "64MiB").start()
    tokens, kv = make_tokens(128, seed=3), make_kv(FP16, 128, seed=3)
    try:
        with KVStore(FP16, store_config(server, TOKEN, 1, degraded_seconds=30.0)) as store:
            store.put(tokens, kv)
            assert store.flush(timeout=30)
            assert store.lookup(tokens) == 128
            assert server.stop() == 0
            server.restart()
            assert store.lookup(tokens) == 128  # at once: no failure, no bypass
            assert_same_kv(store.get(tokens), kv)
            remote = store.stats()["tiers"]["remote"]
            assert remote["state"] == "healthy" and remote["errors"] == 0
    finally:
        server.stop()


# -- a KVStore whose lowest tier is the server -----------------------------------------------------------------


def store_config(server: ServerProcess, token: str, host_blocks: int, **extra) -> StoreConfig:
    return StoreConfig(host_bytes=host_blocks * FP16.block_bytes, remote_url=server.url, remote_token=token, **extra)


def test_a_fresh_store_gets_the_kv_back_from_the_server(srv, token, tmp_path):
    tokens = make_tokens(100, seed=11)  # 6 full blocks and a 4-token tail
    kv = make_kv(FP16, 100, seed=11)
    with KVStore(FP16, store_config(srv, token, 2)) as first:
        assert first.put(tokens, kv) == 7
        assert first.flush(timeout=30)
        stats = first.stats()["tiers"]
        assert stats["host"]["rejected"] == 5  # two blocks of host RAM (the leading ones): the rest on the server
        assert stats["remote"]["blocks_written"] == 7
    with KVStore(FP16, store_config(srv, token, 2)) as fresh:
        assert fresh.lookup(tokens) == 100
        assert fresh.lookup(tokens[:40]) == 32  # its 8-token tail is another key than the stored full block
        got = fresh.get(tokens)
        assert_same_kv(got, kv)
        remote = fresh.stats()["tiers"]["remote"]
        assert remote["hits"] == 7 and remote["corrupt"] == 0
    # the token file form of the same config reaches the same namespace
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    config = StoreConfig(host_bytes=2 * FP16.block_bytes, remote_url=srv.url, remote_token_file=str(token_file))
    with KVStore(FP16, config) as again:
        assert again.lookup(tokens) == 100


@pytest.mark.parametrize("setting, content, message", [
    ("remote_token_file", None, "remote_token_file: expected a readable UTF-8 file"),
    ("remote_token_file", b"\xff\xfe\x00", "remote_token_file: expected a readable UTF-8 file"),
    ("remote_tls_ca_file", None, "remote_tls_ca_file: expected a readable file of PEM certificates"),
    ("remote_tls_ca_file", b"not a certificate\n", "remote_tls_ca_file: expected a readable file of PEM"),
])
def test_an_unusable_token_or_ca_file_is_a_value_error_before_any_tier_opens(tmp_path, setting, content, message):
    """A typo in the CA path was taken: every connection then failed and the server was blamed (degraded);
    a missing token file was a bare FileNotFoundError naming no setting, after the LMDB tier had opened."""
    path = tmp_path / "secret"
    if content is not None:
        path.write_bytes(content)
    disk = tmp_path / "disk"
    config = StoreConfig(host_bytes=2 * FP16.block_bytes, disk_dir=str(disk), remote_url="kvstores://127.0.0.1:1",
                         **{setting: str(path)})
    with pytest.raises(ValueError, match=message):
        KVStore(FP16, config)
    assert not disk.exists() or not any(disk.iterdir())  # no tier was touched


def test_a_store_whose_server_dies_serves_its_host_tier(tmp_path):
    server = ServerProcess(tmp_path / "srv", "--host-bytes", "16MiB", "--disk-bytes", "0").start()
    near, far, later = make_tokens(32, seed=1), make_tokens(96, seed=2), make_tokens(16, seed=4)
    near_kv, far_kv = make_kv(FP16, 32, seed=1), make_kv(FP16, 96, seed=2)
    try:
        with KVStore(FP16, store_config(server, TOKEN, 4, remote_timeout_seconds=0.5)) as store:
            store.put(far, far_kv)  # 6 blocks in 4 blocks of host RAM: all of them on the server
            assert store.flush(timeout=30)
            store.put(near, near_kv)
            assert store.flush(timeout=30)
            server.kill()
            store.put(later, make_kv(FP16, 16, seed=4))  # lands in host RAM (evicting far's tail, read last)
            assert store.flush(timeout=30)
            assert all(store.host.contains(b.key) for b in store.block_keys(near))
            local_far = 16 * next((n for n, b in enumerate(store.block_keys(far)) if not store.host.contains(b.key)))
            assert local_far < 96
            for _ in range(3):
                assert store.lookup(near) == 32
                assert_same_kv(store.get(near), near_kv)
                assert store.lookup(far) == local_far  # the rest was only on the server
                assert_same_kv(store.get(far), far_kv[:, :, :local_far])
                assert store.lookup(make_tokens(48, seed=3)) == 0
                assert store.lookup(later) == 16
            remote = store.stats()["tiers"]["remote"]
            assert remote["errors"] >= 1 and remote["timeouts"] == 0  # the tier raised; the store counted it
            assert remote["bypassed"] >= 1  # and then did not call the tier for a while
    finally:
        server.kill()


def test_store_stats_show_the_remote_tiers_errors():
    config = StoreConfig(host_bytes=2 * FP16.block_bytes, remote_url=f"kvstore://127.0.0.1:{free_port()}",
                         remote_token=TOKEN, remote_timeout_seconds=0.5)
    with KVStore(FP16, config) as store:
        assert store.lookup(make_tokens(32, seed=1)) == 0
        assert "refused" in (store.tiers[-1].last_error or "").lower()  # the tier raised it ...
        remote = store.stats()["tiers"]["remote"]
        assert remote["errors"] >= 1 and remote["state"] == "degraded"  # ... and the store counted it


# -- client limits -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A server with small limits: 3 keys per request, 16 KiB frames, 16 KiB per request and reply."""
    server = ServerProcess(tmp_path_factory.mktemp("limited-srv"), "--host-bytes", "16MiB", "--disk-bytes", "0",
                           "--max-keys", "3", "--max-frame-bytes", "16KiB", "--max-inflight-bytes", "16KiB").start()
    yield server
    server.kill()


def test_batches_are_split_within_the_servers_limits(limited):
    tier = RemoteTier(limited.url, FP16, TOKEN)
    try:
        blocks = [(key("split", i), make_kv(FP16, 16, seed=i)) for i in range(11)]
        before = {op: requests(limited, op) for op in ("PUT", "GET", "EXISTS_PREFIX", "LIST")}
        assert tier.put_many(blocks) == 11  # 3 blocks (12.6 KB) per 16 KiB frame, all sent before any reply
        assert tier.prefix_length([k for k, _ in blocks]) == 11
        assert list(tier.keys()) == [k for k, _ in blocks][::-1]  # a chain: the first most recently used
        outs = [zeros(FP16) for _ in range(3)]
        assert tier.get_many_into([k for k, _ in blocks[:3]], outs) == [True] * 3
        for (_, block), out in zip(blocks, outs):
            assert_same_kv(out, block)
        after = {op: requests(limited, op) - before[op] for op in before}
        assert after == {"PUT": 4, "GET": 1, "EXISTS_PREFIX": 4, "LIST": 4}
        assert tier.stats()["errors"] == 0
    finally:
        tier.close()


def test_a_get_whose_reply_exceeds_max_inflight_bytes_is_split(limited):
    fp32 = tiny_layout(dtype=torch.float32)  # 8 KiB blocks: one fits a frame, two replies do not fit 16 KiB
    tier = RemoteTier(limited.url, fp32, TOKEN)
    try:
        blocks = [(key("big", i), make_kv(fp32, 16, seed=i)) for i in range(2)]
        assert tier.put_many(blocks) == 2
        outs = [zeros(fp32) for _ in blocks]
        assert tier.get_many_into([k for k, _ in blocks], outs) == [True, True], tier.last_error
        for (_, block), out in zip(blocks, outs):
            assert_same_kv(out, block)
    finally:
        tier.close()


def test_blobs_larger_than_the_blocks_asked_for_are_corrupt_misses_not_a_server_failure(limited):
    """Another writer (same namespace) put blobs of about 7 KiB under the keys of 512-byte blocks: one is read
    not read (the connection is dropped: a 200 MiB one was read through to answer a miss); three together are more than the server sends in one reply (16 KiB),
    which the tier reads as misses instead of a failing server to back off from."""
    small = tiny_layout(num_layers=1, num_kv_heads=1, block_tokens=16)  # 512-byte blocks
    tier = RemoteTier(limited.url, small, TOKEN)
    try:
        good = [(key("good", i), make_kv(small, 16, seed=i)) for i in range(2)]
        assert tier.put_many(good) == 2
        hostile = [key("hostile", i) for i in range(3)]
        for keys in ([hostile[0]], hostile, [good[0][0], hostile[0], good[1][0]]):
            for k in set(keys) & set(hostile):  # a blob read as corrupt is deleted: put it there again
                payload = bytes(7 << 10)
                header = BlockHeader.for_payload(k, small.fingerprint, payload).pack()
                assert tier._call(lambda conn: conn.put([(k, [header, payload])])) == [PutResult.STORED]
            outs = [zeros(small) for _ in keys]
            found = tier.get_many_into(keys, outs)
            # a blob not wanted is not read through: the connection is dropped, and the blocks after it are misses
            wanted = list(itertools.takewhile(lambda k: k in dict(good), keys))
            assert found == [k in wanted for k in keys], tier.last_error
            for k, out, ok in zip(keys, outs, found):
                if ok:
                    assert_same_kv(out, dict(good)[k])
        stats = tier.stats()
        assert stats["errors"] == 0 and stats["corrupt"] >= 5 and tier.last_error is None
    finally:
        tier.close()


def test_a_store_gets_a_prefix_whose_blocks_add_up_past_max_inflight_bytes(limited):
    fp32 = tiny_layout(dtype=torch.float32)
    tokens, kv = make_tokens(64, seed=31), make_kv(fp32, 64, seed=31)
    config = StoreConfig(host_bytes=fp32.block_bytes, remote_url=limited.url, remote_token=TOKEN)
    with KVStore(fp32, config) as writer:
        writer.put(tokens, kv)
        assert writer.flush(timeout=30)
    with KVStore(fp32, config) as reader:
        assert reader.lookup(tokens) == 64
        assert reader.get(tokens).shape[2] == 64, reader.tiers[-1].last_error


def test_a_call_given_time_for_its_transfer_may_wait_a_whole_timeout_again(fake):
    """Near its deadline a call cuts the socket's timeout to what is left; once ``allow`` gave it time for
    the blocks in a reply, that cut stayed, and a 0.3 s pause in a 40 MiB reply failed the call (and the
    server was bypassed) with 1.2 s of its deadline left."""
    server = fake(lambda h: (0, WELCOME) if h.opcode == Op.HELLO else (0, b""))
    conn = Connection(server.url, TOKEN, 1.0)
    try:
        conn.begin(time.monotonic() + 0.05)
        conn.ping(b"near the deadline")
        assert conn._sock.gettimeout() <= 0.05
        conn.allow(64 << 20)  # two seconds more, at 32 MiB/s
        conn._before_io()
        assert conn._sock.gettimeout() == 1.0
    finally:
        conn.close()


def test_the_pool_reuses_its_connection_in_a_process_with_many_descriptors(fake):
    """``select`` refuses descriptors past 1024: every pooled connection there was taken for dead, and each
    call paid a new TCP connection and HELLO."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1200
    if soft < want and (hard == resource.RLIM_INFINITY or hard >= want):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    elif soft < want:
        pytest.skip(f"cannot open {want} descriptors (hard limit {hard})")
    server = fake(lambda h: (0, WELCOME) if h.opcode == Op.HELLO else (1, b""))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    tier = RemoteTier(server.url, FP16, TOKEN, timeout_seconds=2.0, connections=1)
    try:
        for i in range(20):
            tier.contains(key(f"k{i}"))
        assert len(server.sockets) == 1
    finally:
        tier.close()
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_blocks_larger_than_the_servers_frames_are_refused_with_a_warning_naming_the_limit(limited, caplog):
    """A server whose frames are smaller than a block stored nothing of it, and the tier read healthy in silence."""
    big = tiny_layout(dtype=torch.float32, num_layers=4)  # 32 KiB blocks, frames of 16 KiB
    tier = RemoteTier(limited.url, big, TOKEN)
    try:
        with caplog.at_level(logging.WARNING, logger="kvstore.tiers.remote"):
            for i in range(3):
                assert tier.put_many([(key("too-big", i), make_kv(big, 16, seed=i))]) == 0
        assert tier.stats()["rejected"] == 3 and tier.last_error is None  # refused, not failing
        warnings = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert len(warnings) == 1 and "--max-frame-bytes" in warnings[0], warnings
    finally:
        tier.close()
