"""The cache server's client: connections, a small pool, and the batched, pipelined operations.

Blocking sockets (the store calls tiers from its own threads). A GET reads
each returned block straight into buffers the caller hands over (for a raw
block, the caller's tensor); a PUT sends each block's header and payload
from where they are. Requests larger than the server's limits (learned at
HELLO) are split into several frames, all sent before the first reply is
read (pipelining). Any failure closes the connection (the pool opens a new
one next time) and raises ``ConnectionError``, ``TimeoutError`` or
``ServerError``; ``tiers/remote.py`` raises those on the data path (for the
store's health breaker) and turns them into empty answers for listings and figures.
"""

from __future__ import annotations

import itertools
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kvstore.buffers import IOV_MAX, after_sent, byte_view
from kvstore.protocol import (FLAG_ERROR, FLAG_REPLY, HEADER_BYTES, MAX_KEY_BYTES, MISSING, U64, Header, Op,
                              ProtocolError, PutResult, ServerError, Welcome, pack_hello, pack_keys,
                              put_item_header, unpack_json, unpack_keys)

DEFAULT_PORT = 8477
_READ_AHEAD_BYTES = 64 << 10
# A call may take its timeout plus the time to move its blocks at this rate (bytes/s): far below any
# network a cache server is worth using over, so only a server that trickles runs out of it.
MIN_TRANSFER_RATE = 32 << 20
# The most payload bytes a reply of these kinds can need: a HELLO's welcome, a STATS document.
_MAX_WELCOME_BYTES = 64 << 10
_MAX_STATS_BYTES = 16 << 20
_SEND_VIEWS = 256  # a PUT's views gathered into one send (a few blocks' worth) before more are made
Bytes = bytes | bytearray | memoryview
# Given (index of the key, blob bytes), the buffers to read that blob into, in order (None: read and discard).
Sink = Callable[[int, int], Sequence[memoryview] | None]


@dataclass(frozen=True)
class LazyBlob:
    """A blob of ``nbytes`` whose parts ``make()`` gives only when its frame is sent.

    A PUT of 128 raw 2 MiB blocks made each block's 65 views up front and
    held them all until the last frame was sent: they lived through two
    garbage collections into the oldest generation, whose full collections
    (about 70 ms each with torch imported, holding the GIL) then ran every
    few puts. Made per frame, they die young.
    """

    nbytes: int
    make: Callable[[], Sequence[Bytes]]


Blob = Sequence[Bytes] | LazyBlob  # a blob's parts in order, or made when sent


class WrongSchemeError(ConnectionError):
    """The server speaks TLS and the URL says ``kvstore://``, or the reverse: the message says which to use."""


_TLS_RECORD_TYPES = (0x15, 0x16)  # a TLS alert, a handshake record: what a TLS server may answer plain bytes with
# OpenSSL's reasons when the peer's first bytes are no TLS record (1.1, 3.x)
_NOT_TLS_REASONS = {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST",
                    "UNKNOWN_PROTOCOL"}


def parse_url(url: str) -> tuple[str, int, bool]:
    """(host, port, tls) of ``kvstore://host:port`` or ``kvstores://host:port``."""
    parts = urlsplit(url)
    if parts.scheme not in ("kvstore", "kvstores") or not parts.hostname:
        raise ValueError(f"url: expected kvstore://host:port or kvstores://host:port, got {url!r}")
    return parts.hostname, parts.port or DEFAULT_PORT, parts.scheme == "kvstores"


class Connection:
    """One authenticated connection to a server. Not thread-safe: a pool lends it to one thread at a time."""

    def __init__(self, url: str, token: str | None, timeout: float, tls_ca_file: str | None = None,
                 deadline: float | None = None):
        host, port, tls = parse_url(url)
        self._timeout = timeout
        self._call_deadline = deadline
        self._deadline = time.monotonic() + timeout if deadline is None else deadline
        self._short = False  # the socket's timeout was cut to what was left of the deadline
        sock = socket.create_connection((host, port), timeout=max(1e-3, min(timeout, self._left())))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls:
                context = ssl.create_default_context(cafile=tls_ca_file)
                try:
                    sock = context.wrap_socket(sock, server_hostname=host)
                except ssl.SSLCertVerificationError:
                    raise
                except ssl.SSLError as exc:
                    if exc.reason not in _NOT_TLS_REASONS:
                        raise
                    raise WrongSchemeError(f"the server at {host}:{port} does not speak TLS (it answered the TLS "
                                           f"handshake with something else): use kvstore://{host}:{port}, or the "
                                           f"port of a TLS server ({exc.reason})") from None
            sock.settimeout(timeout)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._ahead = memoryview(bytearray(_READ_AHEAD_BYTES))
        self._pos = self._end = 0  # unread bytes of the read-ahead buffer: [_pos, _end)
        self._ids = itertools.count(1)
        self.closed = False
        try:
            rid = self._send(Op.HELLO, 0, [pack_hello(token)])
            if not tls:
                self._check_not_tls(host, port)
            header = self._header(rid, Op.HELLO)
            self.welcome = Welcome.unpack(self._payload(header, _MAX_WELCOME_BYTES))
        except BaseException:
            self.close()
            raise

    def _check_not_tls(self, host: str, port: int) -> None:
        """Before the HELLO reply is read: a TLS server answers a plain HELLO with a TLS alert, or closes at
        once; either said only 'the server closed the connection'. ``WrongSchemeError`` saying kvstores://."""
        self._before_io()
        first = self._sock.recv(2, socket.MSG_PEEK)
        if len(first) == 2 and first[0] in _TLS_RECORD_TYPES and first[1] == 0x03:
            raise WrongSchemeError(f"the server at {host}:{port} speaks TLS (it answered with a TLS record): use "
                                   f"kvstores://{host}:{port} (and tls_ca_file / --tls-ca-file for a private CA)")
        if not first:
            raise ConnectionError(f"the server at {host}:{port} closed the connection without answering HELLO: "
                                   f"if it serves TLS, use kvstores://{host}:{port}")

    # -- the call's deadline ---------------------------------------------------------

    def begin(self, deadline: float | None) -> None:
        """The calls made until the next ``begin`` end by ``deadline`` (monotonic seconds; plus their
        transfers); None: each operation gets ``timeout`` seconds of its own from when it starts."""
        self._call_deadline = deadline

    def _start(self) -> None:
        """An operation starts: its deadline is the call's, or ``timeout`` from now (``_before_io`` sets the
        socket's timeout from it). A connection closed by a failed call is not used again."""
        if self.closed:
            raise ConnectionError("this connection was closed after a call on it failed: open a new one")
        self._deadline = self._call_deadline if self._call_deadline is not None else time.monotonic() + self._timeout

    def allow(self, num_bytes: int) -> None:
        """Give the call time to move ``num_bytes`` more at ``MIN_TRANSFER_RATE``."""
        self._deadline += num_bytes / MIN_TRANSFER_RATE

    def alive(self) -> bool:
        """False if the server has closed this idle connection (or sent what no request asked for): a
        connection kept in the pool across a server restart would fail its next call, and the tier with it."""
        if self.closed or self._pos < self._end:
            return False
        if isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
            return False  # decrypted bytes nobody asked for
        poller = select.poll()  # not select(): it refuses descriptors past 1024, which engines reach
        try:
            poller.register(self._sock, select.POLLIN | select.POLLPRI)
            return not poller.poll(0)
        except (OSError, ValueError):
            return False

    def _left(self) -> float:
        return self._deadline - time.monotonic()

    def _before_io(self) -> None:
        """Raise ``TimeoutError`` once the call's deadline has passed; near it, cut the socket's timeout to
        what is left, so a server that trickles bytes cannot stretch a call without bound."""
        left = self._left()
        if left <= 0:
            raise TimeoutError(f"the call took longer than its deadline ({self._timeout} s and its transfers)")
        if left < self._timeout:
            self._sock.settimeout(left)
            self._short = True
        elif self._short:  # a new operation, or ``allow`` gave this one more time: each wait may take it all again
            self._sock.settimeout(self._timeout)
            self._short = False

    def close(self) -> None:
        self.closed = True
        try:
            self._sock.close()
        except OSError:
            pass

    # -- framing ---------------------------------------------------------------------

    def _send(self, op: Op, count: int, parts: Sequence[Bytes]) -> int:
        rid = next(self._ids)
        views = [byte_view(p) for p in parts]
        head = Header(int(op), rid, count, sum(v.nbytes for v in views)).pack()
        self._send_views([memoryview(head), *(v for v in views if v.nbytes)])
        return rid

    def _send_put(self, run: list[tuple[int, bytes, Blob]], sizes: dict[int, int]) -> int:
        """Send one PUT frame of the blobs ``run`` ((index, key, blob) in order; ``sizes`` by index, bytes).

        Sent a few blobs at a time, each blob made only when it goes: a
        frame's views held until the whole frame was sent (thousands, for
        32 blocks of 2 MiB) outlived the garbage collections meanwhile and
        reached the oldest generation (``LazyBlob``).
        """
        rid = next(self._ids)
        views = [memoryview(Header(int(Op.PUT), rid, len(run), sum(sizes[i] for i, _, _ in run)).pack())]
        try:
            for i, key, blob in run:
                made = list(blob.make()) if isinstance(blob, LazyBlob) else blob
                if isinstance(blob, LazyBlob) and _blob_bytes(made) != blob.nbytes:
                    raise ValueError(f"items: expected the blob of key {i} to make {blob.nbytes} bytes, got "
                                     f"{_blob_bytes(made)}")
                views.append(memoryview(put_item_header(key, sizes[i] - 1 - len(key) - U64.size)))
                views.extend(view for view in map(byte_view, made) if view.nbytes)
                if len(views) >= _SEND_VIEWS:
                    self._send_views(views)
                    views = []
            if views:
                self._send_views(views)
        except BaseException:
            self.close()  # part of the request may have gone out: the connection cannot be used again
            raise
        return rid

    def _send_views(self, views: list[memoryview]) -> None:
        """Send the views in order from where they are: scatter-gather ``sendmsg`` (``sendall`` each over TLS)."""
        if isinstance(self._sock, ssl.SSLSocket):
            for view in views:
                self._before_io()
                self._sock.sendall(view)
            return
        while views:
            self._before_io()
            views = after_sent(views, self._sock.sendmsg(views[:IOV_MAX]))

    def _recv_into(self, view: memoryview) -> None:
        """Fill ``view``. Small reads (a reply's header, its size table, a block header) come out of one
        read-ahead ``recv``: fewer system calls, and fewer times a thread gives up and waits for the GIL."""
        size = len(view)
        got = min(size, self._end - self._pos)
        if got:
            view[:got] = self._ahead[self._pos:self._pos + got]
            self._pos += got
        while got < size:
            self._before_io()
            if size - got >= _READ_AHEAD_BYTES // 2:  # large: straight into the destination
                n = self._sock.recv_into(view[got:])
            else:
                self._end = n = self._sock.recv_into(self._ahead)
                self._pos = min(n, size - got)
                view[got:got + self._pos] = self._ahead[:self._pos]
                n = self._pos
            if n == 0:
                raise ConnectionError("the server closed the connection")
            got += n

    def _recv(self, num_bytes: int) -> bytearray:
        data = bytearray(num_bytes)
        self._recv_into(memoryview(data))
        return data

    def _payload(self, header: Header, limit: int) -> bytearray:
        """The reply's payload, if it is at most ``limit`` bytes: a peer declaring 2**62 bytes is broken, and
        is not handed that much memory."""
        if header.payload_len > limit:
            raise ConnectionError(f"expected a {Op(header.opcode).name} reply of at most {limit} bytes, got "
                                  f"{header.payload_len}")
        return self._recv(header.payload_len)

    def _header(self, rid: int, op: Op) -> Header:
        """Read the next reply header; raises ``ServerError`` for an error reply."""
        try:
            header = Header.unpack(self._recv(HEADER_BYTES))
        except ProtocolError as exc:
            raise ConnectionError(f"bad reply from server: {exc}") from None
        if header.flags & FLAG_ERROR:
            message = self._recv(min(header.payload_len, 1 << 16)).decode("utf-8", "replace")
            raise ServerError(header.status, message)
        if not header.flags & FLAG_REPLY or header.request_id != rid or header.opcode != op:
            raise ConnectionError(f"expected the reply to request {rid} ({op.name}), got request "
                                  f"{header.request_id} opcode {header.opcode}")
        return header

    def _batches(self, count: int, sizes: Callable[[int], int] | None = None,
                 limit_bytes: int | None = None) -> list[range]:
        """Split ``count`` items of ``sizes(i)`` bytes into runs within the server's key and byte limits."""
        limit_keys = self.welcome.max_keys
        limit_bytes = self.welcome.max_frame_bytes if limit_bytes is None else limit_bytes
        runs, start, size = [], 0, 0
        for i in range(count):
            item = sizes(i) if sizes is not None else 1 + MAX_KEY_BYTES
            if i > start and (i - start >= limit_keys or size + item > limit_bytes):
                runs.append(range(start, i))
                start, size = i, 0
            size += item
        if count > start:
            runs.append(range(start, count))
        return runs

    # -- operations ---------------------------------------------------------------------

    def ping(self, payload: bytes = b"") -> bytes:
        self._start()
        rid = self._send(Op.PING, 0, [payload])
        return bytes(self._payload(self._header(rid, Op.PING), len(payload)))

    def exists_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` the server holds (one round trip per ``max_keys`` keys)."""
        self._start()
        found = 0
        for run in self._batches(len(keys)):
            rid = self._send(Op.EXISTS_PREFIX, len(run), [pack_keys(keys[run.start:run.stop])])
            count = min(self._header(rid, Op.EXISTS_PREFIX).count, len(run))
            found += count
            if count < len(run):
                break
        return found

    def get(self, keys: Sequence[bytes], sink: Sink, expected: Sequence[int] | None = None) -> list[int | None]:
        """Fetch blobs; ``sink(i, size)`` names the buffers blob ``i`` is read into. Returns sizes (None: miss).

        A sink that returns None for a blob (larger than the caller can take)
        ends the call there: the connection is closed rather than read
        through it, and the blobs after it are returned as misses.

        ``expected``: blob sizes the caller expects (bytes), so that no
        reply is asked to exceed the server's ``max_inflight_bytes``.
        """
        self._start()
        sizes_of = (lambda i: 8 + expected[i]) if expected is not None else None
        runs = self._batches(len(keys), sizes_of, self.welcome.max_inflight_bytes)
        rids = [self._send(Op.GET, len(run), [pack_keys(keys[run.start:run.stop])]) for run in runs]
        sizes: list[int | None] = []
        for run, rid in zip(runs, rids):
            header = self._header(rid, Op.GET)
            if header.count != len(run):
                raise ConnectionError(f"expected {len(run)} sizes in a GET reply, got {header.count}")
            table = self._recv(8 * len(run))
            announced = [U64.unpack_from(table, 8 * j)[0] for j in range(len(run))]
            blobs = sum(size for size in announced if size != MISSING)
            # A server sends its size table and the blobs it names, within the limit it announced: a reply
            # naming a blob of 2**62 bytes was read (and its deadline stretched to match) for ever.
            if header.payload_len != 8 * len(run) + blobs or header.payload_len > self.welcome.max_inflight_bytes:
                raise ConnectionError(f"expected a GET reply of its size table and the blobs it names, at most "
                                      f"{self.welcome.max_inflight_bytes} bytes, got {header.payload_len} bytes "
                                      f"naming {blobs} bytes of blobs")
            for i, size in zip(run, announced):
                if size == MISSING:
                    sizes.append(None)
                    continue
                buffers = sink(i, size)
                if buffers is None:  # not wanted (larger than any block the caller can take): not read through
                    self.close()  # (a blob of 200 MiB was, to answer a miss): the rest of the stream is lost
                    sizes.append(size)
                    return sizes + [None] * (len(keys) - len(sizes))
                self.allow(size)
                if sum(len(b) for b in buffers) != size:
                    raise ValueError(f"sink: expected buffers of {size} bytes in all for key {i}, got "
                                     f"{sum(len(b) for b in buffers)}")
                for buffer in buffers:
                    self._recv_into(buffer)
                sizes.append(size)
        return sizes

    def put(self, items: Sequence[tuple[bytes, Blob]]) -> list[PutResult]:
        """Store blobs given as parts (no join), or as ``LazyBlob``s made frame by frame; a result per item.

        A block too large for one frame (``max_frame_bytes``) is not sent:
        its result is ``REJECTED``, and the others are stored. ``items`` are
        a chain (a prompt's blocks, in order) and the server takes each PUT
        as one, its first blob the most recently used: frames go out last
        first, so the first frame's blobs end the most recent of all.
        """
        self._start()
        results: list[PutResult] = [PutResult.REJECTED] * len(items)
        sizes = {i: 1 + len(key) + U64.size + _blob_bytes(blob) for i, (key, blob) in enumerate(items)}
        sendable = [i for i in range(len(items)) if sizes[i] <= self.welcome.max_frame_bytes]
        runs = [[sendable[j] for j in run] for run in self._batches(len(sendable), lambda j: sizes[sendable[j]])]
        runs.reverse()
        rids = []
        self.allow(sum(sizes[i] for i in sendable))
        for run in runs:
            rids.append(self._send_put([(i, *items[i]) for i in run], sizes))
        for run, rid in zip(runs, rids):
            header = self._header(rid, Op.PUT)
            if header.payload_len != len(run):
                raise ConnectionError(f"expected {len(run)} PUT results, got {header.payload_len}")
            statuses = self._recv(header.payload_len)
            for i, status in zip(run, statuses):
                results[i] = PutResult(status)
        return results

    def delete(self, keys: Sequence[bytes]) -> list[bool]:
        self._start()
        runs = self._batches(len(keys))
        rids = [self._send(Op.DELETE, len(run), [pack_keys(keys[run.start:run.stop])]) for run in runs]
        done: list[bool] = []
        for run, rid in zip(runs, rids):
            header = self._header(rid, Op.DELETE)
            if header.payload_len != len(run):
                raise ConnectionError(f"expected {len(run)} DELETE results, got {header.payload_len}")
            done.extend(bool(b) for b in self._recv(header.payload_len))
        return done

    def stats(self) -> dict[str, Any]:
        self._start()
        rid = self._send(Op.STATS, 0, [])
        return unpack_json(self._payload(self._header(rid, Op.STATS), _MAX_STATS_BYTES))

    def list_keys(self, offset: int = 0, limit: int | None = None) -> list[bytes]:
        self._start()
        limit = self.welcome.max_keys if limit is None else min(limit, self.welcome.max_keys)
        rid = self._send(Op.LIST, limit, [U64.pack(offset)])
        header = self._header(rid, Op.LIST)
        if header.count > limit:
            raise ConnectionError(f"expected at most {limit} keys in a LIST reply, got {header.count}")
        return unpack_keys(self._payload(header, header.count * (1 + MAX_KEY_BYTES)), header.count)


def _blob_bytes(blob: Blob) -> int:
    return blob.nbytes if isinstance(blob, LazyBlob) else sum(memoryview(p).nbytes for p in blob)


class ConnectionPool:
    """At most ``size`` connections, opened on demand and reused; a failed one is closed, not returned."""

    def __init__(self, url: str, token: str | None, timeout: float, size: int = 4, tls_ca_file: str | None = None):
        parse_url(url)
        self.url = url
        self._token = token
        self._timeout = timeout
        self._tls_ca_file = tls_ca_file
        self._idle: queue.LifoQueue[Connection] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._closed = False
        self.welcome: Welcome | None = None

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        """A connection for one call, which ends ``timeout`` seconds from now (plus its transfers, see
        ``Connection.allow``): waiting for a free slot, connecting and the call itself all count."""
        deadline = time.monotonic() + self._timeout
        if not self._slots.acquire(timeout=self._timeout):
            raise TimeoutError(f"no free connection to {self.url} within {self._timeout} s")
        try:
            conn = self._reuse()
            if conn is None:
                conn = Connection(self.url, self._token, self._timeout, self._tls_ca_file, deadline)
                self.welcome = conn.welcome
            conn.begin(deadline)
            try:
                yield conn
            except BaseException:
                conn.close()
                raise
            conn.begin(None)
            with self._lock:
                if self._closed:
                    conn.close()
                else:
                    self._idle.put(conn)
        finally:
            self._slots.release()

    def _reuse(self) -> Connection | None:
        """An idle connection the server has not closed meanwhile (those it has are closed here), or None."""
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return None
            if conn.alive():
                return conn
            conn.close()

    def discard_idle(self) -> None:
        """Close the idle connections (after one failed, the others to that server are likely dead too)."""
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.discard_idle()

