"""Remote tier: blocks on a ``kvstore serve`` cache server, shared by every engine that connects to it.

Blocks travel with the same integrity header as on disk (the server checks
it on the way in, this tier on the way back), raw or in the tier's codec's
frames. A raw block is read from the socket straight into the caller's
tensor.

A server that is down, hung, refusing or breaking the protocol is a
failure, not a miss: ``contains``, ``prefix_length``, ``put_many``,
``get_into`` and ``get_many_into`` raise what the client raised
(``ConnectionError``, ``TimeoutError``, ``ServerError``, ``ProtocolError``,
...), so that the store's health breaker bypasses the tier instead of
paying a timeout on every call. After a failure the tier waits an
exponentially growing back-off before it tries a fresh connection; a data
call inside it raises ``ConnectionError`` at once without trying
(``unavailable`` counts those). ``delete``, ``keys``, ``used_bytes``,
``capacity_bytes`` and ``stats`` never raise for a failing server: they
count it (``errors``) and answer as if the server held nothing. ``errors``
counts the failures the tier absorbed; the ones it raised are the caller's
to count (the store counts them in the tier's ``errors``). ``timeouts``
counts both. Either way the tier picks the server up again on its own
when it returns.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import torch

from kvstore.blockformat import ENCODING_RAW, FRAME_SLACK, HEADER_BYTES, BlockHeader, max_stored_bytes
from kvstore.buffers import payload_view_count, payload_views
from kvstore.client import ConnectionPool, Connection, LazyBlob
from kvstore.compression.codec import FrameCodec
from kvstore.compression.stored import CORRUPT, INTACT, OTHER_CODEC, BlockEncoding
from kvstore.layout import KVLayout
from kvstore.metrics import Counters
from kvstore.protocol import ProtocolError, PutResult, ServerError, Status
from kvstore.tiers.base import TIER_COUNTERS, Capability, RefusalLog, decode_blob, tier_stats
from kvstore.compression.registry import get_codec
from kvstore.config import StoreConfig
from kvstore.tiers.spec import TierSpec

T = TypeVar("T")
REMOTE_COUNTERS = ("errors", "timeouts", "unavailable", "stale")
# What a call to a server that is down, hung or broken raises. OSError: ConnectionError, TimeoutError,
# SSLError, ServerError; ProtocolError and ValueError: a reply this client cannot parse (a broken or newer server).
FAILURES = (OSError, ProtocolError, ValueError)

log = logging.getLogger(__name__)


class _BackingOff(ConnectionError):
    """A call not tried: the server failed a moment ago and the tier's back-off has not run out."""


_REFUSALS = {  # why the server kept no copy of a block, as the operator can change it
    PutResult.REJECTED: "larger than a frame (its --max-frame-bytes), past this token's quota or the server's "
                        "capacity, or the server's disk refusing writes (see its stats: disk_failing)",
    PutResult.INVALID: "its header did not match its key or bytes (a server of another protocol version?)",
}


class _TooLarge(Exception):
    """A GET whose reply the server refused as larger than ``max_inflight_bytes``: blobs larger than the
    blocks asked for are under those keys (another writer's), which read as misses, not a server failure."""


class RemoteTier:
    """Blocks of ``layout`` in this client's namespace on the server at ``url`` (``kvstore://host:port``).

    ``timeout_seconds`` bounds each call: waiting for one of the pool's
    ``connections``, connecting, and the call itself, plus the time its
    blocks take at 32 MiB/s (``kvstore.client.MIN_TRANSFER_RATE``), so a
    server that trickles bytes cannot stretch a call; back-off after a failure starts at
    ``backoff_seconds`` and doubles up to ``max_backoff_seconds``.
    """

    name = "remote"
    persistent = True
    capabilities = Capability.BATCH | Capability.ENCODED

    def __init__(self, url: str, layout: KVLayout, token: str | None = None, *, timeout_seconds: float = 2.0,
                 connections: int = 4, codec: FrameCodec | None = None, tls_ca_file: str | None = None,
                 backoff_seconds: float = 0.05, max_backoff_seconds: float = 2.0):
        self.layout = layout
        self.url = url
        self.encoding = BlockEncoding(layout, codec)
        self._pool = ConnectionPool(url, token, timeout_seconds, connections, tls_ca_file)
        self._fingerprint = layout.fingerprint
        self._counters = Counters(*TIER_COUNTERS, *REMOTE_COUNTERS)
        self._last_server: dict[str, int] = {}  # the server's figures when last asked (``cached_stats``)
        self._refusals = RefusalLog(log, "remote")
        self._backoff_seconds = backoff_seconds
        self._max_backoff_seconds = max_backoff_seconds
        self._lock = threading.Lock()
        self._backoff = 0.0
        self._retry_at = 0.0
        self.last_error: str | None = None
        self.token_refused = False  # the server refused this client's token: said once, shown in stats()

    def _call(self, operation: Callable[[Connection], T], reading: bool = False) -> T:
        """``operation`` on a pooled connection; raises if the server fails (one of ``FAILURES``), and inside
        the back-off after a failure raises ``ConnectionError`` without trying. ``reading``: a GET, whose
        TOO_LARGE reply raises ``_TooLarge``."""
        if time.monotonic() < self._retry_at:
            self._counters.add("unavailable")
            raise _BackingOff(f"{self.url}: not tried inside the back-off after {self.last_error}")
        try:
            with self._pool.connection() as conn:
                result = operation(conn)
        except FAILURES as exc:
            if reading and isinstance(exc, ServerError) and exc.status == Status.TOO_LARGE:
                raise _TooLarge(str(exc)) from exc  # what the server holds, not its failure: no back-off
            self._failed(exc)
            raise
        if self._backoff:
            with self._lock:
                self._backoff = 0.0
            self.token_refused = False
            log.info("remote tier: %s answers again", self.url)
        return result

    def _failed(self, exc: BaseException) -> None:
        """A call failed: count it, back off (doubling, up to the maximum), log the first failure."""
        self._pool.discard_idle()
        if isinstance(exc, TimeoutError):
            self._counters.add("timeouts")
        with self._lock:
            first = not self._backoff
            self._backoff = min(self._max_backoff_seconds, 2 * self._backoff or self._backoff_seconds)
            self._retry_at = time.monotonic() + self._backoff
        self.last_error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ServerError) and exc.status == Status.UNAUTHORIZED:
            if not self.token_refused:
                self.token_refused = True
                log.error("remote tier: the server at %s refused this engine's token (remote_token or "
                          "remote_token_file): nothing is read from or stored there until the token is one "
                          "the server knows", self.url)
        elif first:
            log.warning("remote tier: %s failed a call (%s); backing off", self.url, self.last_error)

    def _quiet(self, operation: Callable[[Connection], T], default: T) -> T:
        """``operation`` as ``_call`` runs it, but ``default`` (the failure counted ``errors``) if the server fails:
        for the calls that never raise for a failing server (listings, figures, deletes)."""
        try:
            return self._call(operation)
        except _BackingOff:
            return default
        except FAILURES:
            self._counters.add("errors")
            return default

    @property
    def capacity_bytes(self) -> int:
        """The namespace's quota, or the server's capacity when it has none (0 until first connected)."""
        welcome = self._pool.welcome
        if welcome is None:
            self._quiet(lambda conn: None, None)
            welcome = self._pool.welcome
        return welcome.quota_bytes if welcome is not None else 0

    def _server_stats(self) -> dict[str, int]:
        """The namespace's figures from STATS (the counts alone: a reply of another shape, from a broken or
        newer server, gives none, rather than an exception from ``store.stats()``)."""
        reply = self._quiet(lambda conn: conn.stats(), {})
        figures = reply.get("blocks") if isinstance(reply, dict) else None
        if not isinstance(figures, dict):
            return {}
        return {name: value for name, value in figures.items()
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0}

    def used_bytes(self) -> int:
        return self._server_stats().get("used_bytes", 0)

    def contains(self, key: bytes) -> bool:
        """Whether the server holds ``key``; raises if the server fails."""
        name = self.encoding.stored_name(key)
        return self._call(lambda conn: conn.exists_prefix([name])) == 1

    def held(self, keys: Sequence[bytes]) -> set[bytes]:
        """``BatchTier.held``: the leading run the server holds (its protocol asks for prefixes), one round trip."""
        return set(keys[:self.prefix_length(keys)])

    def prefix_length(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` the server holds, in one round trip; raises if the server fails."""
        names = [self.encoding.stored_name(key) for key in keys]
        return self._call(lambda conn: conn.exists_prefix(names)) if names else 0

    def put_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> int:
        """Send the blocks in as few frames as the server's limits allow; returns how many it holds after.
        Raises if the server fails."""
        if not items:
            return 0
        blobs = [(name, self._blob(name, block))
                 for name, block in ((self.encoding.stored_name(key), block) for key, block in items)]
        results = self._call(lambda conn: conn.put(blobs))
        held = 0
        refused: dict[PutResult, int] = {}
        for (_, blob), result in zip(blobs, results):
            if result in (PutResult.STORED, PutResult.PRESENT):
                held += 1
            else:
                self._counters.add("rejected")
                refused[result] = refused.get(result, 0) + 1
            if result == PutResult.STORED:
                self._counters.add("blocks_written")
                self._counters.add("bytes_written", blob.nbytes - HEADER_BYTES)
        for result, count in refused.items():
            self._refusals.refused(count, _REFUSALS.get(result, result.name))
        return held

    def _blob(self, key: bytes, block: torch.Tensor) -> LazyBlob:
        """The blob of ``block``, made when its frame is sent: its header, then the payload. A raw block in
        host memory is sent from where it lies (a view per layer and K/V when it is a token range of a larger
        tensor), with no gathering copy; another is encoded now (the frame's size depends on it)."""
        block = block.detach()
        if self.encoding.codec is None and payload_view_count(block) is not None:
            def views() -> list[object]:
                parts = payload_views(block)
                return [BlockHeader.for_parts(key, self._fingerprint, parts).pack(), *parts]
            return LazyBlob(HEADER_BYTES + block.nbytes, views)
        payload = self.encoding.encode(block)
        header = BlockHeader.for_payload(key, self._fingerprint, payload, self.encoding.header_encoding(payload))
        parts = [header.pack(), payload]
        return LazyBlob(HEADER_BYTES + memoryview(payload).nbytes, lambda: parts)

    def get_into(self, key: bytes, out: torch.Tensor) -> bool:
        """Fetch block ``key`` into ``out``; False on a miss (or a damaged block); raises if the server fails."""
        return self.get_many_into([key], [out])[0]

    def get_many_into(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor]) -> list[bool]:
        """Fetch blocks in one round trip; raw blocks land in ``outs`` without a bounce buffer. Raises if the
        server fails."""
        return self._get_named([self.encoding.stored_name(key) for key in keys], outs)

    def _get_named(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor]) -> list[bool]:
        """``get_many_into`` of blocks by the names they are stored as (in their headers too)."""
        heads = [bytearray(HEADER_BYTES) for _ in keys]
        scratch: list[bytearray | None] = [None] * len(keys)

        raw = [out.nbytes for out in outs]
        # What replies are sized by, to keep each within the server's max_inflight_bytes: this tier's own
        # blocks (a frame may be a little larger than the raw block: an incompressible block, lossless codec).
        expected = [HEADER_BYTES + n + (FRAME_SLACK if self.encoding.codec else 0) for n in raw]

        def sink(i: int, size: int) -> list[memoryview] | None:
            out = outs[i]
            if size > max_stored_bytes(raw[i]):  # no block of this size: a miss, and the call ends here
                return None
            if self.encoding.codec is None and size == HEADER_BYTES + out.nbytes:
                views = payload_views(out)
                if views is not None:
                    return [memoryview(heads[i]), *views]
            scratch[i] = bytearray(size)
            return [memoryview(scratch[i])]

        try:
            sizes = self._call(lambda conn: conn.get(keys, sink, expected), reading=True)
        except _TooLarge:  # blobs larger than blocks (another writer's) made the reply too large for the server
            if len(keys) == 1:
                self._counters.add("misses")
                self._counters.add("corrupt")
                return [False]
            return [self._get_named([key], [out])[0] for key, out in zip(keys, outs)]
        found = []
        for i, size in enumerate(sizes):
            if size is None:
                self._counters.add("misses")
            found.append(size is not None and self._verify(keys[i], outs[i], heads[i], scratch[i], size))
        return found

    def _verify(self, key: bytes, out: torch.Tensor, head: bytearray, blob: bytearray | None, size: int) -> bool:
        """Check a fetched block's header (and decode it if it came in a buffer); counts hit, miss, corrupt or
        stale. A damaged blob, or one in a lossy form this tier does not serve, is deleted on the server: left
        there it was a miss for good (the server answers a put of its key ``PRESENT``, and a failed read
        refreshed it in the server's LRU), as the prefix an exact client met after a lossy one wrote it. So is
        one whose header names another layout: a store's keys derive from its layout, so no other layout's
        writer holds them honestly, and such a blob had kept its key a miss for every store."""
        if blob is None:
            views = payload_views(out)
            header = BlockHeader.unpack(head)
            verdict = INTACT if header is not None and header.verifies_parts(key, self._fingerprint, views) else CORRUPT
            if verdict == INTACT and header.encoding != ENCODING_RAW:  # a frame of the raw block's size: decode it
                verdict = self.encoding.decode_into(b"".join(views), out, header.encoding)
        else:
            verdict = decode_blob(self.encoding, key, self._fingerprint, blob, out)
        self._counters.add("hits" if verdict == INTACT else "misses")
        if verdict == INTACT:
            self._counters.add("bytes_read", size - HEADER_BYTES)
        elif verdict in (CORRUPT, OTHER_CODEC):
            self._counters.add("corrupt" if verdict == CORRUPT else "stale")
            self._delete_named(key)
        return verdict == INTACT

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False if the server did not hold it, or failed (counted ``errors``)."""
        return self._delete_named(self.encoding.stored_name(key))

    def _delete_named(self, name: bytes) -> bool:
        return self._quiet(lambda conn: conn.delete([name])[0], False)

    def keys(self) -> Iterator[bytes]:
        """This namespace's keys on the server, least recently used first (empty if it is unreachable)."""
        keys: list[bytes] = []
        while True:
            page = self._quiet(lambda conn: conn.list_keys(len(keys)), [])
            keys.extend(page)
            if not page or self._pool.welcome is None or len(page) < self._pool.welcome.max_keys:
                return iter(keys)

    def stats(self) -> dict[str, int]:
        server = self._server_stats()
        if server:  # a server that did not answer leaves the figures it last gave
            self._last_server = server
        return self.cached_stats()

    def cached_stats(self) -> dict[str, int]:
        server, welcome = self._last_server, self._pool.welcome  # never connects: a hung server costs nothing
        stats = tier_stats(self._counters, server.get("blocks", 0), server.get("used_bytes", 0),
                           welcome.quota_bytes if welcome is not None else 0)
        stats["token_refused"] = int(self.token_refused)  # the store's stats() says so in the tier's state
        return stats

    def close(self) -> None:
        self._pool.close()


def _token(config: StoreConfig) -> str | None:
    """``remote_token``, else the contents of ``remote_token_file``; ValueError naming the file if unreadable."""
    if config.remote_token is not None or config.remote_token_file is None:
        return config.remote_token
    try:
        return Path(config.remote_token_file).read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"remote_token_file: expected a readable UTF-8 file holding the token, got "
                         f"{config.remote_token_file!r} ({error})") from None


def _check(layout: KVLayout, config: StoreConfig) -> None:
    """The token file and the TLS CA file, read at open: a typo in the CA path made every connection fail,
    and the cache server was blamed (bypassed as degraded) for it."""
    _token(config)
    if config.remote_tls_ca_file is not None:
        try:
            ssl.create_default_context(cafile=config.remote_tls_ca_file)
        except (ssl.SSLError, OSError, ValueError) as error:
            raise ValueError(f"remote_tls_ca_file: expected a readable file of PEM certificates, got "
                             f"{config.remote_tls_ca_file!r} ({error})") from None


def _build(layout: KVLayout, config: StoreConfig) -> RemoteTier:
    return RemoteTier(config.remote_url, layout, _token(config), timeout_seconds=config.remote_timeout_seconds,
                      connections=config.remote_connections, codec=get_codec(config.remote_codec),
                      tls_ca_file=config.remote_tls_ca_file)


SPEC = TierSpec(
    name="remote",
    wanted=lambda config: config.remote_url is not None,
    build=_build,
    check=_check,
    persistent=True,
    bandwidth_prior=1e9,
    admit_after=lambda config: config.remote_admit_after,
    codec_setting="remote_codec",
)
