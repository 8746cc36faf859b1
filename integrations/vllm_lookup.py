"""How vLLM's scheduler asks the workers' stores what they hold, wherever those stores live.

``vllm serve`` runs the scheduler in one process and every worker (a TP or
PP rank) in others, even with one GPU. The host and LMDB tiers a worker
opens are in its own process; a scheduler that opened its own store would
see none of them (no hits) or fight over the LMDB directory. So each worker
serves lookups of its own store on a Unix socket in Linux's abstract
namespace (no file to clean up, private to the machine's network
namespace), and the scheduler asks every rank and takes the smallest answer:
a prefix is a hit only where every TP shard and every PP stage holds it.

The wire format is length-prefixed, never pickled: a JSON header
(``{"salt": ..., "tokens": n}``) then ``n`` little-endian uint32 tokens;
the answer is a JSON object ``{"load_tokens": n, "sources": {tier: tokens}}``.
A rank that cannot be reached, answers late (``timeout`` seconds) or answers
garbage counts as holding nothing, and the scheduler does not try it again
for ``RETRY_SECONDS``: a lookup never raises into vLLM and never waits on a
dead worker request after request.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from kvstore.keys import Tokens, token_bytes

log = logging.getLogger(__name__)

MAX_TOKENS = 1 << 22  # 4 Mi tokens (16 MiB) per lookup: longer than any context vLLM serves
MAX_HEADER = 1 << 16  # bytes of JSON header or answer
MAX_CONNECTIONS = 16  # concurrent scheduler connections a worker serves (each has a thread)
RETRY_SECONDS = 1.0  # a rank that failed is not asked again for this long
_LEN = struct.Struct("<I")


@dataclass(frozen=True)
class Answer:
    """What a rank (or every rank, merged) holds of a prompt: leading tokens to load, and from which tiers."""

    load_tokens: int = 0
    sources: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def merge(answers: Sequence["Answer"]) -> "Answer":
        """The hit every rank can serve: the smallest, with its sources."""
        if not answers:
            return Answer()
        return min(answers, key=lambda a: a.load_tokens)


# A lookup function: (tokens, salt) -> Answer; raised errors are answered as a miss.
Lookup = Callable[[Tokens, str | None], Answer]


def address(engine_id: str, dp_rank: int, pp_rank: int, tp_rank: int) -> str:
    """The abstract socket name of one rank's lookup service (a NUL-led name: no file, no cleanup)."""
    return f"\0kvstore-vllm/{engine_id}/dp{dp_rank}/pp{pp_rank}/tp{tp_rank}"


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = conn.recv(min(n, 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv_frame(conn: socket.socket, limit: int) -> bytes:
    (n,) = _LEN.unpack(_recv_exact(conn, _LEN.size))
    if n > limit:
        raise ValueError(f"frame: expected at most {limit} bytes, got a length of {n}")
    return _recv_exact(conn, n)


def _send_frames(conn: socket.socket, *frames: bytes) -> None:
    conn.sendall(b"".join(_LEN.pack(len(f)) + f for f in frames))


class LookupServer:
    """Serves ``lookup(tokens, salt)`` of one worker's store on an abstract Unix socket; ``close()`` stops it."""

    def __init__(self, name: str, lookup: Lookup):
        self.name = name
        self._lookup = lookup
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(name)
        self._sock.listen(MAX_CONNECTIONS)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, name="kvstore-vllm-lookup", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed or len(self._conns) >= MAX_CONNECTIONS:
                    conn.close()
                    continue
                self._conns.add(conn)
                thread = threading.Thread(target=self._serve, args=(conn,), name="kvstore-vllm-lookup-conn",
                                          daemon=True)
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
                thread.start()  # under the lock: close() never joins a thread that has not started

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                header = json.loads(_recv_frame(conn, MAX_HEADER))
                n = header.get("tokens") if isinstance(header, dict) else None
                salt = header.get("salt") if isinstance(header, dict) else None
                if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_TOKENS or not (
                        salt is None or isinstance(salt, str)):
                    raise ValueError(f"lookup header: expected tokens in [0, {MAX_TOKENS}] and a str salt, "
                                     f"got {header!r:.200}")
                raw = _recv_frame(conn, 4 * MAX_TOKENS)
                if len(raw) != 4 * n:
                    raise ValueError(f"lookup tokens: expected {4 * n} bytes, got {len(raw)}")
                tokens = np.frombuffer(raw, dtype="<u4")  # hashed as these bytes: no list of ints
                try:
                    answer = self._lookup(tokens, salt)
                except Exception as exc:  # the store's failure is a miss for the scheduler, logged here
                    log.warning("lookup of %d tokens failed: %r", n, exc)
                    answer = Answer()
                _send_frames(conn, json.dumps({"load_tokens": answer.load_tokens,
                                               "sources": answer.sources}).encode())
        except (ConnectionError, OSError):
            pass  # the scheduler went away or the server closed
        except (ValueError, json.JSONDecodeError, struct.error) as exc:
            log.warning("dropping a lookup connection that sent a malformed request: %s", exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns, self._conns = list(self._conns), set()
            threads = list(self._threads)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._acceptor.join(timeout=5)
        for thread in threads:
            thread.join(timeout=5)

    def __enter__(self) -> "LookupServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Peer:
    """One rank's lookup socket as seen from the scheduler: connected lazily, dropped on any failure."""

    def __init__(self, name: str, timeout: float):
        self.name = name
        self.timeout = timeout
        self.conn: socket.socket | None = None
        self.down_until = 0.0

    def ask(self, header: bytes, raw: bytes) -> Answer:
        if time.monotonic() < self.down_until:
            raise ConnectionError("not retried yet after a failure")
        try:
            if self.conn is None:
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.settimeout(self.timeout)
                conn.connect(self.name)
                self.conn = conn
            _send_frames(self.conn, header, raw)
            return self.read()
        except BaseException:
            self.drop()
            raise

    def read(self) -> Answer:
        assert self.conn is not None
        body = json.loads(_recv_frame(self.conn, MAX_HEADER))
        tokens, sources = body.get("load_tokens"), body.get("sources")
        if (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0 or not isinstance(sources, dict)
                or not all(isinstance(k, str) and isinstance(v, int) for k, v in sources.items())):
            raise ValueError(f"lookup answer: expected load_tokens >= 0 and sources, got {body!r:.200}")
        return Answer(tokens, dict(sources))

    def drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.down_until = time.monotonic() + RETRY_SECONDS


class LookupClient:
    """The scheduler's view of every rank's store: ``lookup`` asks them all and merges (see module docstring)."""

    def __init__(self, names: Sequence[str], timeout: float = 1.0):
        if not names:
            raise ValueError("names: expected at least one rank's lookup address, got none")
        self._peers = [_Peer(name, timeout) for name in names]
        self._lock = threading.Lock()
        self.failures = 0

    def lookup(self, tokens: Sequence[int], salt: str | None) -> Answer:
        """Leading tokens of ``tokens`` every rank can load (0 if any rank cannot be asked)."""
        if len(tokens) > MAX_TOKENS:
            return Answer()
        header = json.dumps({"salt": salt, "tokens": len(tokens)}).encode()
        raw = token_bytes(tokens)
        with self._lock:  # one request in flight per connection; ranks are asked side by side
            if any(peer.conn is None for peer in self._peers):
                return self._ask_each(header, raw)
            peer = self._peers[0]
            try:
                for peer in self._peers:
                    _send_frames(peer.conn, header, raw)
                answers = []
                for peer in self._peers:
                    answers.append(peer.read())
            except Exception as exc:
                self._failed(peer, exc)
                for other in self._peers:  # answers still in flight would be read as the next lookup's
                    other.drop()
                return Answer()
        return Answer.merge(answers)

    def _ask_each(self, header: bytes, raw: bytes) -> Answer:
        """First use (or after a failure): connect and ask one rank at a time."""
        answers = []
        for peer in self._peers:
            try:
                answers.append(peer.ask(header, raw))
            except Exception as exc:
                self._failed(peer, exc)
                return Answer()
        return Answer.merge(answers)

    def _failed(self, peer: _Peer, exc: BaseException) -> None:
        if time.monotonic() >= peer.down_until:  # a refusal during the back-off must not extend it
            peer.drop()
        self.failures += 1
        if self.failures == 1 or self.failures % 100 == 0:
            log.warning("kvstore lookup of rank %r failed (%d failures so far; counted as a miss): %r",
                        peer.name.lstrip("\0"), self.failures, exc)

    def close(self) -> None:
        with self._lock:
            for peer in self._peers:
                if peer.conn is not None:
                    peer.conn.close()
                    peer.conn = None
