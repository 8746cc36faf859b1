"""Remote tier: blocks on a ``kvstore serve`` cache server, shared by every engine that connects to it.

Blocks travel with the same integrity header as on disk (the server checks
it on the way in, this tier on the way back), raw or in the tier's codec's
frames. A raw block is read from the socket straight into the caller's
tensor. A server that is down, slow or refusing is never an exception
here: the call is a miss (or stores nothing), the failure is counted
(``errors``, ``timeouts``), and the tier waits an exponentially growing
back-off (``unavailable`` counts calls skipped meanwhile) before it tries
a fresh connection, so an engine keeps serving from its local tiers and
picks the server up again on its own when it returns.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch

from kvstore.blockformat import ENCODING_RAW, HEADER_BYTES, BlockHeader
from kvstore.buffers import payload_views
from kvstore.client import ConnectionPool, Connection
from kvstore.compression.codec import FrameCodec
from kvstore.compression.stored import INTACT, BlockEncoding
from kvstore.layout import KVLayout
from kvstore.metrics import Counters
from kvstore.protocol import ProtocolError, PutResult
from kvstore.tiers.base import TIER_COUNTERS, decode_blob, tier_stats

T = TypeVar("T")
REMOTE_COUNTERS = ("errors", "timeouts", "unavailable")


class RemoteTier:
    """Blocks of ``layout`` in this client's namespace on the server at ``url`` (``kvstore://host:port``).

    ``timeout_seconds`` bounds each socket operation; ``connections`` is
    the pool size (calls beyond it wait for a free connection, at most
    ``timeout_seconds``); back-off after a failure starts at
    ``backoff_seconds`` and doubles up to ``max_backoff_seconds``.
    """

    name = "remote"
    persistent = True

    def __init__(self, url: str, layout: KVLayout, token: str | None = None, *, timeout_seconds: float = 2.0,
                 connections: int = 4, codec: FrameCodec | None = None, tls_ca_file: str | None = None,
                 backoff_seconds: float = 0.05, max_backoff_seconds: float = 2.0):
        self.layout = layout
        self.url = url
        self.encoding = BlockEncoding(layout, codec)
        self._pool = ConnectionPool(url, token, timeout_seconds, connections, tls_ca_file)
        self._fingerprint = layout.fingerprint
        self._counters = Counters(*TIER_COUNTERS, *REMOTE_COUNTERS)
        self._backoff_seconds = backoff_seconds
        self._max_backoff_seconds = max_backoff_seconds
        self._lock = threading.Lock()
        self._backoff = 0.0
        self._retry_at = 0.0
        self.last_error: str | None = None

    def _call(self, operation: Callable[[Connection], T], default: T) -> T:
        """``operation`` on a pooled connection; ``default`` (and a counted failure) if the server fails."""
        if time.monotonic() < self._retry_at:
            self._counters.add("unavailable")
            return default
        try:
            with self._pool.connection() as conn:
                result = operation(conn)
        except (OSError, ProtocolError, ValueError) as exc:  # OSError: ConnectionError, TimeoutError, SSLError,
            # ServerError; ProtocolError and ValueError: a reply this client cannot parse (a broken or newer server)
            self._pool.discard_idle()
            self._counters.add("errors")
            if isinstance(exc, TimeoutError):
                self._counters.add("timeouts")
            with self._lock:
                self._backoff = min(self._max_backoff_seconds, 2 * self._backoff or self._backoff_seconds)
                self._retry_at = time.monotonic() + self._backoff
            self.last_error = f"{type(exc).__name__}: {exc}"
            return default
        if self._backoff:
            with self._lock:
                self._backoff = 0.0
        return result

    @property
    def capacity_bytes(self) -> int:
        """The namespace's quota, or the server's capacity when it has none (0 until first connected)."""
        welcome = self._pool.welcome
        if welcome is None:
            self._call(lambda conn: None, None)
            welcome = self._pool.welcome
        return welcome.quota_bytes if welcome is not None else 0

    def _server_stats(self) -> dict:
        return self._call(lambda conn: conn.stats(), {}).get("blocks", {})

    def used_bytes(self) -> int:
        return int(self._server_stats().get("used_bytes", 0))

    def contains(self, key: bytes) -> bool:
        return self._call(lambda conn: conn.exists_prefix([key]), 0) == 1

    def prefix_length(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` the server holds, in one round trip."""
        return self._call(lambda conn: conn.exists_prefix(keys), 0) if keys else 0

    def put_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> int:
        """Send the blocks in as few frames as the server's limits allow; returns how many it holds after."""
        if not items:
            return 0
        parts = []
        for key, block in items:
            payload = self.encoding.encode(block)
            header = BlockHeader.for_payload(key, self._fingerprint, payload, self.encoding.header_encoding)
            parts.append((key, [header.pack(), payload]))
        results = self._call(lambda conn: conn.put(parts), None)
        if results is None:
            return 0
        held = 0
        for (_, (_, payload)), result in zip(parts, results):
            if result in (PutResult.STORED, PutResult.PRESENT):
                held += 1
            else:
                self._counters.add("rejected")
            if result == PutResult.STORED:
                self._counters.add("blocks_written")
                self._counters.add("bytes_written", memoryview(payload).nbytes)
        return held

    def get_into(self, key: bytes, out: torch.Tensor) -> bool:
        return self.get_many_into([key], [out])[0]

    def get_many_into(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor]) -> list[bool]:
        """Fetch blocks in one round trip; raw blocks land in ``outs`` without a bounce buffer."""
        heads = [bytearray(HEADER_BYTES) for _ in keys]
        scratch: list[bytearray | None] = [None] * len(keys)

        def sink(i: int, size: int) -> list[memoryview]:
            out = outs[i]
            if self.encoding.codec is None and size == HEADER_BYTES + out.numel() * out.element_size():
                views = payload_views(out)
                if views is not None:
                    return [memoryview(heads[i]), *views]
            scratch[i] = bytearray(size)
            return [memoryview(scratch[i])]

        # A frame may be a little larger than the raw block (an incompressible block under a lossless codec).
        expected = [HEADER_BYTES + out.numel() * out.element_size() + (4096 if self.encoding.codec else 0)
                    for out in outs]
        sizes = self._call(lambda conn: conn.get(keys, sink, expected), None)
        if sizes is None:
            self._counters.add("misses", len(keys))
            return [False] * len(keys)
        found = []
        for i, size in enumerate(sizes):
            if size is None:
                self._counters.add("misses")
            found.append(size is not None and self._verify(keys[i], outs[i], heads[i], scratch[i], size))
        return found

    def _verify(self, key: bytes, out: torch.Tensor, head: bytearray, blob: bytearray | None, size: int) -> bool:
        """Check a fetched block's header (and decode it if it came in a buffer); counts hit, miss or corrupt."""
        if blob is None:
            views = payload_views(out)
            header = BlockHeader.unpack(head)
            intact = header is not None and header.verifies_parts(key, self._fingerprint, views)
            if intact and header.encoding != ENCODING_RAW:  # a frame of the raw block's size: decode it
                intact = self.encoding.decode_into(b"".join(views), out, header.encoding) == INTACT
        else:
            intact = decode_blob(self.encoding, key, self._fingerprint, blob, out) == INTACT
        self._counters.add("hits" if intact else "misses")
        if intact:
            self._counters.add("bytes_read", size - HEADER_BYTES)
        else:
            self._counters.add("corrupt")
        return intact

    def delete(self, key: bytes) -> bool:
        return self._call(lambda conn: conn.delete([key])[0], False)

    def keys(self) -> Iterator[bytes]:
        """This namespace's keys on the server, least recently used first (empty if it is unreachable)."""
        keys: list[bytes] = []
        while True:
            page = self._call(lambda conn: conn.list_keys(len(keys)), [])
            keys.extend(page)
            if not page or self._pool.welcome is None or len(page) < self._pool.welcome.max_keys:
                return iter(keys)

    def stats(self) -> dict[str, int]:
        server = self._server_stats()
        return tier_stats(self._counters, int(server.get("blocks", 0)), int(server.get("used_bytes", 0)),
                          self.capacity_bytes)

    def close(self) -> None:
        self._pool.close()
