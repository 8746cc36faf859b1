"""Redis / Valkey tier: blocks in a Redis server or Redis Cluster that many machines share.

Why: scale-out. Every serving node of a fleet reads and writes one cache held
by an existing distributed engine (standalone Redis or Valkey, or a Redis
Cluster spreading keys over its nodes), so a prefix computed on one machine is
a hit on every other, and capacity grows by adding Redis nodes.

One concept: a block is one Redis string under
``<key_prefix>:<namespace>:<layout fingerprint hex>:<key hex>`` whose value is
the 72-byte ``BlockHeader`` then the payload (raw bytes or a codec's frame,
``BlockEncoding``). The namespace keeps tenants apart, the fingerprint keeps
layouts (models, dtypes, shards) apart, and a lossy codec's form follows it
(``<fingerprint hex>~<form hex>``), so stores of other codecs never meet its
blocks. A value that fails its header or
checksum is a miss counted ``corrupt`` and deleted, never data.

Redis manages its own memory: eviction follows the server's
``maxmemory-policy`` (``allkeys-lru`` recommended) and ``ttl_seconds`` sets an
expiry on each block; this tier keeps no index and no LRU order, so
``keys()`` comes in SCAN order and ``evictions`` stays 0.

A server that is down, hung or resets a connection is a failure, not a miss:
``contains``, ``prefix_length``, ``put_many``, ``get_into`` and
``get_many_into`` raise what redis-py raised (``redis.TimeoutError``,
``redis.ConnectionError``, ...), so that the store's health breaker bypasses
the tier instead of waiting on it call after call. Each call makes one
attempt (no redis-py retry): a hung server costs it one ``timeout_seconds``.
redis-py reconnects on a later call. On a cluster every call, one key or a
batch, goes to each node in its own pipeline: a node that refuses the
connection (down) leaves its keys unserved (misses, counted ``errors``) while
the nodes still up serve theirs, and the call raises only if no primary
answers; a node that times out fails the whole call. Only a miss (no such
key) or a damaged value is a False / 0 answer. ``delete``, ``keys``, ``used_bytes`` and
``stats`` never raise for a failing server: they count it (``errors``,
``timeouts``) and answer as if the server held nothing. ``errors`` counts the
failures the tier absorbed; the ones it raised are the caller's to count (the
store counts them in the tier's ``errors``). ``timeouts`` counts both.
``used_bytes`` and ``stats()["blocks"]`` are the server's own figures
(``used_memory``, DBSIZE): every namespace on it, not just this tier's.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import numpy as np
import redis
import torch
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (AskError, AuthenticationError, ClusterDownError, MovedError, NoPermissionError,
                              OutOfMemoryError, ReadOnlyError, RedisClusterException, ResponseError, TryAgainError)
from redis.retry import Retry

from kvstore.blockformat import HEADER_BYTES, BlockHeader, checksum, max_stored_bytes
from kvstore.compression.codec import FrameCodec
from kvstore.compression.stored import CORRUPT, INTACT, OTHER_CODEC, BlockEncoding
from kvstore.layout import KVLayout
from kvstore.metrics import Counters, LogLimit
from kvstore.tiers.base import TIER_COUNTERS, Capability, RefusalLog, decode_blob, tier_stats
from kvstore.compression.registry import get_codec
from kvstore.config import REDIS_CLUSTER_SSL_OPTIONS, REDIS_SCHEMES, StoreConfig, check_redis_url
from kvstore.tiers.spec import TierSpec

log = logging.getLogger(__name__)

SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
# What a call that could not reach the server raises: redis-py's errors (TimeoutError, ConnectionError, ...),
# the cluster client's, and the socket layer's (socket.timeout is the builtin TimeoutError, an OSError).
_FAILURES = (redis.RedisError, RedisClusterException, OSError)
# Replies of a cluster node that no longer owns the key's slot (or is migrating it): the cluster client resends them.
_REDIRECTED = (AskError, TryAgainError, ClusterDownError)
_SCAN_COUNT = 1000
_T = TypeVar("_T")
_FAILED = object()  # a command whose server could not be reached
_DEFAULT_BULK_LEN = 512 << 20  # Redis's largest value unless proto-max-bulk-len says otherwise, bytes
_LEAST_BULK_LEN = 1 << 20  # the least proto-max-bulk-len Redis takes: a value no larger never needs asking
_ASK_AGAIN_SECONDS = 30.0  # after no server answered what its largest value is
_SCRATCH_BYTES = 128 << 20  # most bytes of values one put copies into a reused buffer
# Most bytes of that buffer a thread keeps between puts: every thread that ever put (an engine's pool) kept up
# to _SCRATCH_BYTES for life, outside every capacity; a larger buffer is freed when its put ends.
_SCRATCH_KEEP_BYTES = 16 << 20
_FAILURE_LOG_SECONDS = 10.0  # at most one log line this often for the failures the tier absorbs
# What a read found under a key that holds no block of this layout's size to decode (besides the decode verdicts).
_ABSENT, _EMPTY, _UNSERVED = "absent", "empty", "unserved"
# Delete KEYS[1] only if it still holds what a read judged: ARGV[2] is "wrongtype" (not a string) or the
# SHA-1 hex of the GETRANGE 0..ARGV[1] the read saw; an absent key is left alone.
_DROP_JUDGED = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'none' then return 0 end
if kind ~= 'string' then
  if ARGV[2] == 'wrongtype' then return redis.call('DEL', KEYS[1]) end
  return 0
end
if redis.sha1hex(redis.call('GETRANGE', KEYS[1], 0, ARGV[1])) == ARGV[2] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_SAME_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # numpy-viewable dtypes


def _connect(url: str, timeout: float) -> Callable[[], Any]:
    """A function building the redis-py client for ``url``; ValueError for an unknown scheme."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    # One attempt per command, no redis-py retry: a retried timeout would cost a hung server's every call a
    # multiple of ``timeout`` before the caller hears of it. A connection the server closed meanwhile (a
    # restart) needs no retry: the pool checks a connection before lending it and reconnects.
    options = dict(socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))
    if scheme in REDIS_SCHEMES:
        check_redis_url("url", url)
    if scheme in ("redis", "rediss", "unix"):
        return lambda: redis.Redis.from_url(url, **options)
    if scheme in ("redis+cluster", "rediss+cluster"):
        parts = urlsplit(url)
        userinfo, _, hosts = parts.netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        nodes = []
        for host in hosts.split(","):
            node = urlsplit("//" + host.strip())
            if not node.hostname:
                raise ValueError(f"url: expected redis+cluster://host:port[,host:port...], got host {host!r}")
            nodes.append(ClusterNode(node.hostname, node.port or 6379))
        # A TLS cluster's certificates (a private CA, a client certificate): check_redis_url let only these in.
        tls = {name: value for name, value in parse_qsl(parts.query) if name in REDIS_CLUSTER_SSL_OPTIONS}
        return lambda: RedisCluster(startup_nodes=nodes, username=unquote(user) or None,
                                    password=unquote(password) or None, ssl=scheme == "rediss+cluster",
                                    **tls, **options)
    raise ValueError(f"url: expected one of the schemes {', '.join(SCHEMES)} (redis://host:port/db, "
                     f"unix:///path.sock, redis+cluster://host:port[,host:port...]), got scheme {scheme!r}")


def _wrong_type(reply: object) -> bool:
    """True if ``reply`` is the server's WRONGTYPE error: the key holds something other than a string."""
    return isinstance(reply, ResponseError) and str(reply).startswith("WRONGTYPE")


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, (redis.TimeoutError, TimeoutError))


def _refuses_settings(reply: object) -> bool:
    """True if ``reply`` is the server refusing what these settings ask of it, not an outage nor a miss: an ACL
    without a command (NOPERM), a read-only replica (READONLY), a primary that stopped writes because it cannot
    persist (MISCONF). Counted alone, each left a tier that stored nothing reading healthy, silent."""
    return isinstance(reply, (NoPermissionError, ReadOnlyError)) or (
        isinstance(reply, ResponseError) and str(reply).startswith("MISCONF"))


def _scripts_refused(reply: object) -> bool:
    """True if ``reply`` says this server runs no scripts for us: an ACL without ``@scripting`` (NOPERM), EVAL
    renamed away or scripting disabled (a managed service). Any other error (a busy script, a timeout) is not."""
    if isinstance(reply, NoPermissionError):
        return True
    text = str(reply).lower() if isinstance(reply, ResponseError) else ""
    return text.startswith("unknown command") or "script" in text and ("disabled" in text or "not allowed" in text)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the errors it was raised from or while handling: the cluster client wraps what its nodes
    answered (a refused password) in a ``RedisClusterException``."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _per_key(replies: list, per_key: int) -> list:
    """``replies`` of ``per_key`` commands a key, as one reply a key: the tuple of its replies, or the first
    error among them that is a failure (a WRONGTYPE is an answer about the key: kept in the tuple)."""
    grouped: list = []
    for start in range(0, len(replies), per_key):
        part = tuple(replies[start:start + per_key])
        failure = next((r for r in part if isinstance(r, Exception) and not _wrong_type(r)), None)
        grouped.append(part if failure is None else failure)
    return grouped


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


class RedisTier:
    """Blocks of ``layout`` in the Redis or Valkey server (or cluster) at ``url``.

    ``url``: ``redis://host:port/db``, ``rediss://`` (TLS), ``unix:///path``
    or ``redis+cluster://host:port[,host:port...]`` (startup nodes of a Redis
    Cluster; ``rediss+cluster://`` for TLS). ``namespace`` separates tenants
    sharing a server. ``ttl_seconds`` (None: no expiry) expires each block
    that long after it was written. ``timeout_seconds`` bounds each connect and
    socket read or write. ``capacity_bytes`` is reported as the capacity (a
    larger block is rejected); 0 reports the server's ``maxmemory`` (summed
    over cluster primaries; 0 if unlimited). Redis evicts on its own. A put
    copies its values into a buffer of up to 128 MiB; each thread keeps at
    most 16 MiB of it between puts.
    """

    name = "redis"
    persistent = True
    capabilities = Capability.BATCH | Capability.ENCODED

    def __init__(self, url: str, layout: KVLayout, *, namespace: str = "default", ttl_seconds: float | None = None,
                 codec: FrameCodec | None = None, timeout_seconds: float = 1.0, capacity_bytes: int = 0,
                 key_prefix: str = "kvstore"):
        if not isinstance(url, str):
            raise ValueError(f"url: expected a string, got {type(url).__name__}")
        if not isinstance(layout, KVLayout):
            raise ValueError(f"layout: expected a KVLayout, got {type(layout).__name__}")
        for label, text in (("namespace", namespace), ("key_prefix", key_prefix)):
            if not isinstance(text, str) or not text or ":" in text:
                raise ValueError(f"{label}: expected a non-empty string without ':', got {text!r}")
        if ttl_seconds is not None and not ttl_seconds > 0:
            raise ValueError(f"ttl_seconds: expected seconds > 0 or None, got {ttl_seconds!r}")
        if not timeout_seconds > 0:
            raise ValueError(f"timeout_seconds: expected seconds > 0, got {timeout_seconds!r}")
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise ValueError(f"capacity_bytes: expected an integer >= 0, got {capacity_bytes!r}")
        self._build = _connect(url, float(timeout_seconds))
        self.cluster = url.lower().startswith(("redis+cluster://", "rediss+cluster://"))
        self.layout = layout
        self._fingerprint = layout.fingerprint
        self.encoding = BlockEncoding(layout, codec)
        # A lossy form has keys of its own: stores of other codecs never meet its blocks.
        form = f"~{self.encoding.form:016x}" if self.encoding.form else ""
        self._prefix = f"{key_prefix}:{namespace}:{layout.fingerprint.hex()}{form}:".encode()
        self._pattern = _glob_escape(self._prefix.decode()) + "*"
        self._ttl_ms = None if ttl_seconds is None else max(1, round(ttl_seconds * 1000))
        # The last byte a read asks for: one past the most any block of this layout takes (a full one, not the
        # reader's ``out``: a good block larger than ``out`` is a miss of another size, never damage), so a
        # larger value (another writer's, up to Redis's 512 MB) is known as such without moving it all.
        self._limit = max_stored_bytes(layout.block_bytes)
        self._capacity = capacity_bytes
        self._server_capacity: int | None = None
        self._value_limit: int | None = None  # the servers' proto-max-bulk-len, once some server answered
        self._value_limit_asked = -_ASK_AGAIN_SECONDS  # when it was last asked (monotonic seconds)
        self._last_figures = (0, 0, 0)  # what _server_figures last returned
        self._counters = Counters(*TIER_COUNTERS, "stale", "errors", "timeouts")
        self._lock = threading.Lock()  # guards building the client
        self._local = threading.local()  # each thread's scratch buffer for values
        self._client_obj: Any = None
        self._closed = False
        self._failing = False  # the last call raised: logged once, until a call succeeds again
        self._fixes_logged: set[str] = set()  # settings the server refused, each logged once as an error
        self._no_scripts = False  # the server refused EVAL once: damaged blocks are deleted with a plain DEL
        self._refusals = RefusalLog(log, "redis")
        self._failure_log = LogLimit(_FAILURE_LOG_SECONDS)  # the failures absorbed (counted, not raised)
        self.last_error: str | None = None  # the last failure, absorbed or raised: what is wrong, in words
        try:  # a cluster client connects on construction: if the cluster is down, the first call retries
            self._client()
        except (redis.RedisError, RedisClusterException, OSError):
            self._counters.add("errors")

    # -- plumbing -------------------------------------------------------------------------------------

    def _client(self) -> Any:
        if self._closed:
            raise RuntimeError("RedisTier is closed")
        client = self._client_obj
        if client is None:
            with self._lock:
                if self._client_obj is None:
                    self._client_obj = self._build()
                client = self._client_obj
        return client

    def _call(self, call: Callable[[Any], _T]) -> _T:
        """``call(the client)``; if the server is down, hung or drops the connection, the error is raised.

        Raised, not turned into a miss: the caller (the store's health
        breaker) then stops calling for a while instead of paying a timeout
        on every call. Counted here only in ``timeouts``; the caller counts it.
        """
        try:
            result = call(self._client())
        except _FAILURES as exc:
            if _is_timeout(exc):
                self._counters.add("timeouts")
            self.last_error = f"{type(exc).__name__}: {exc}"
            fix = self._misconfigured(exc)
            if fix is not None and fix not in self._fixes_logged:
                self._fixes_logged.add(fix)
                log.error("redis tier: a call failed (%s: %s): %s", type(exc).__name__, exc, fix)
            elif not self._failing:
                log.warning("redis tier: a call failed (%s: %s); raising it to the caller", type(exc).__name__, exc)
            self._failing = True
            raise
        if self._failing:
            self._failing = False
            log.info("redis tier: the server answers again")
        return result

    def _misconfigured(self, exc: BaseException) -> str | None:
        """What the operator must change if ``exc`` is no outage but the server refusing these settings (it
        was logged like an outage, and retried for ever); None otherwise."""
        for cause in reversed(list(_causes(exc))):  # the innermost first: what the server answered
            fix = self._fix_for(cause)
            if fix is not None:
                return fix
        return None

    def _fix_for(self, exc: BaseException) -> str | None:
        """``_misconfigured`` for one error, not the ones it wraps."""
        if isinstance(exc, (MovedError, AskError)) and not self.cluster:
            return ("the server is a Redis Cluster node (it redirected a key to another node): set redis_url to "
                    "redis+cluster://host:port[,host:port...]")
        if isinstance(exc, AuthenticationError) or (
                isinstance(exc, RedisClusterException) and "authentication" in str(exc).lower()):
            return "the server refused redis_url's credentials: write them as redis://user:password@host:port"
        if isinstance(exc, NoPermissionError):
            return ("redis_url's user lacks a permission (ACL): it needs GETRANGE, EXISTS, SET, EVAL (and TYPE, "
                    "GETRANGE and DEL inside its script; without @scripting, DEL), SCAN, INFO, DBSIZE and, on a "
                    f"cluster, PING and CLUSTER SLOTS, on keys {self._pattern}")
        if isinstance(exc, ReadOnlyError):
            return "redis_url names a read-only replica; use the primary"
        if isinstance(exc, ResponseError) and str(exc).startswith("MISCONF"):
            return ("the server stopped taking writes because it cannot save its RDB snapshot (MISCONF): fix its "
                    "disk or dir, or set stop-writes-on-bgsave-error no")
        if isinstance(exc, RedisClusterException) and "cluster mode is not enabled" in str(exc).lower():
            return ("redis_url names a server that is not a Redis Cluster node: set redis_url to "
                    "redis://host:port/0")
        return None

    def _guard(self, call: Callable[[Any], _T], default: _T, server: Any = None) -> _T:
        """``call(server or the client)``, or ``default`` (the failure counted) if the server is down, hung or
        drops the connection: for the calls that never raise for a failing server (listings, figures, deletes)."""
        try:
            return call(self._client() if server is None else server)
        except _FAILURES as exc:
            self._count_failure(exc)
        return default

    def _count_failure(self, exc: BaseException) -> None:
        """A failure this tier absorbs (does not raise): counted ``errors`` (and ``timeouts``), kept in
        ``last_error`` and logged at most once per ``_FAILURE_LOG_SECONDS`` (a dead cluster node, CLUSTERDOWN
        answers: thousands were counted while the log said nothing)."""
        self._counters.add("errors")
        if _is_timeout(exc):
            self._counters.add("timeouts")
        self.last_error = f"{type(exc).__name__}: {exc}"
        events = self._failure_log.due()
        if events:
            log.warning("redis tier: %d failure%s absorbed since the last report (keys unserved, counted in "
                        "errors); the last: %s", events, "" if events == 1 else "s", self.last_error)

    def _batch(self, rkeys: Sequence[bytes], queue: Callable[[Any, int], None], per_key: int = 1,
               scripted: bool = False) -> list:
        """One pipeline (one round trip) of the ``per_key`` commands ``queue(pipe, i)`` queues for each of ``rkeys``.

        Returns each key's reply (with ``per_key`` > 1, the tuple of its
        commands' replies) or its error (an exception); raises if the server
        cannot be reached, or refuses these settings (``_refuses_settings``;
        with ``scripted``, a NOPERM is the caller's to handle: an ACL without
        scripting). On a cluster, one pipeline per node (see ``_per_node``):
        ``_FAILED`` for the keys of a node that is down.
        """
        def run(client: Any, indices: Sequence[int]) -> list:
            with client.pipeline(transaction=False) as pipe:
                for i in indices:
                    queue(pipe, i)
                replies = pipe.execute(raise_on_error=False)
            return replies if per_key == 1 else _per_key(replies, per_key)

        def refused(replies: list) -> list:
            for reply in replies:  # an ACL that refuses our commands, a read-only replica, a cluster node reached
                if (_refuses_settings(reply) and not (scripted and isinstance(reply, NoPermissionError))) or (
                        isinstance(reply, (MovedError, AskError)) and not self.cluster):  # as a server: the
                    raise reply  # tier's failure, raised to be seen
            down = [reply for reply in replies if isinstance(reply, ClusterDownError)]
            if down and all(reply is _FAILED or isinstance(reply, ClusterDownError) for reply in replies):
                raise down[0]  # a cluster that serves no slot: no key answered, the whole tier is down
            return replies

        if self.cluster:
            return self._call(lambda c: refused(self._per_node(c, rkeys, run)))
        return self._call(lambda c: refused(run(c, range(len(rkeys)))))

    def _per_node(self, client: Any, rkeys: Sequence[bytes], run: Callable[[Any, Sequence[int]], list]) -> list:
        """``run`` the keys of each cluster node in a pipeline on that node alone; ``_FAILED`` for a node down.

        Not the cluster client's own pipeline: when a node times out, that one
        sends each of the node's commands again on its own, a timeout apiece.
        Here a node that times out raises at once. Keys whose node refused
        (down) or answered with a redirection (the slot moved) are sent again
        through the cluster client, which refreshes its slot table and follows
        redirections; those still unserved are ``_FAILED``, counted once in
        ``errors``. Raises if no key could be served.
        """
        groups: dict[str, tuple[Any, list[int]]] = {}
        for i, rkey in enumerate(rkeys):
            node = client.get_node_from_key(rkey)
            groups.setdefault(node.name, (node, []))[1].append(i)
        results: list = [_FAILED] * len(rkeys)
        failure: BaseException | None = None
        for node, indices in groups.values():
            try:
                replies = run(client.get_redis_connection(node), indices)
            except _FAILURES as exc:
                if _is_timeout(exc):
                    raise  # a hung node: one timeout for the call, not one per key
                failure = exc
                continue
            for i, reply in zip(indices, replies):
                results[i] = reply
        again = [i for i, reply in enumerate(results) if reply is _FAILED or isinstance(reply, _REDIRECTED)]
        if again:
            try:
                replies = run(client, again)
            except _FAILURES as exc:
                if _is_timeout(exc):
                    raise
                failure = exc
            else:
                for i, reply in zip(again, replies):
                    results[i] = reply
        for i, reply in enumerate(results):
            if _is_timeout(reply):
                raise reply
            if isinstance(reply, redis.ConnectionError):
                failure, results[i] = reply, _FAILED
        if failure is not None and any(reply is _FAILED for reply in results):
            down = {name for name, (_, indices) in groups.items() if all(results[i] is _FAILED for i in indices)}
            if all(reply is _FAILED for reply in results) and not self._others_answer(client, down):
                raise failure
            self._count_failure(failure)  # the nodes still up serve their keys: these are misses
        return results

    def _others_answer(self, client: Any, down: set[str]) -> bool:
        """Whether a cluster primary other than those in ``down`` answers a PING: one dead node then costs
        its own keys only, instead of the store's breaker bypassing the whole cluster for its sake."""
        for node in client.get_primaries():
            if node.name in down:
                continue
            try:
                if client.get_redis_connection(node).ping():
                    return True
            except _FAILURES:
                continue
        return False

    def _per_server(self, ask: Callable[[Any], _T]) -> tuple[list[_T], bool]:
        """(``ask(server)`` of each server that answered, whether all did): each primary of a cluster."""
        def servers(client: Any) -> list:
            if self.cluster:
                return [client.get_redis_connection(node) for node in client.get_primaries()]
            return [client]
        answers = [self._guard(ask, _FAILED, server) for server in self._guard(servers, [])]
        found = [a for a in answers if a is not _FAILED]
        return found, bool(answers) and len(found) == len(answers)

    def redis_key(self, key: bytes) -> bytes:
        """The Redis key block ``key`` is stored under (namespace and layout included)."""
        if not isinstance(key, (bytes, bytearray)) or not 1 <= len(key) <= 32:
            raise ValueError(f"key: expected 1 to 32 bytes, got {key!r:.80}")
        return self._prefix + bytes(key).hex().encode()

    def _check_block(self, name: str, block: torch.Tensor) -> None:
        """ValueError unless ``block`` is a tensor of this layout with 1 to ``block_tokens`` tokens."""
        tokens = block.shape[2] if isinstance(block, torch.Tensor) and block.dim() == 5 else 0
        if not 1 <= tokens <= self.layout.block_tokens:
            shape = list(block.shape) if isinstance(block, torch.Tensor) else type(block).__name__
            raise ValueError(f"{name}: expected shape {list(self.layout.block_shape)} "
                             f"with 1 to {self.layout.block_tokens} tokens, got {shape}")
        self.layout.check_kv(block, tokens)

    def _scratch(self, nbytes: int) -> memoryview:
        """This thread's reusable buffer for values, at least ``min(nbytes, _SCRATCH_BYTES)`` bytes.

        Fresh memory costs a page fault per page when first written, which
        can cost as much as sending the block to a local server. Kept
        between puts only up to ``_SCRATCH_KEEP_BYTES`` (``_drop_scratch``).
        """
        want = min(nbytes, _SCRATCH_BYTES)
        buffer = getattr(self._local, "scratch", None)
        if buffer is None or len(buffer) < want:
            self._local.scratch = None  # the old one freed before the new one is made
            buffer = self._local.scratch = bytearray(want)
        return memoryview(buffer)

    def _drop_scratch(self) -> None:
        """Free this thread's buffer if larger than ``_SCRATCH_KEEP_BYTES``: each thread that put a long prompt
        (an engine's pool, a dozen threads) kept up to 128 MiB for life, which no capacity setting covers."""
        buffer = getattr(self._local, "scratch", None)
        if buffer is not None and len(buffer) > _SCRATCH_KEEP_BYTES:
            self._local.scratch = None

    def _value(self, key: bytes, block: torch.Tensor, into: memoryview | None) -> bytes | bytearray | memoryview:
        """Header + payload of ``block``; stored raw, one copy of its bytes into ``into`` (or a new buffer)."""
        if self.encoding.codec is not None:
            payload = self.encoding.encode(block)
            header = BlockHeader.for_payload(key, self._fingerprint, payload, self.encoding.header_encoding(payload))
            return header.pack() + payload
        nbytes = block.nbytes
        value = bytearray(HEADER_BYTES + nbytes) if into is None else into
        dst = torch.frombuffer(value, dtype=torch.uint8, offset=HEADER_BYTES, count=nbytes)
        dst = dst.view(block.dtype).view(block.shape)
        block = block.detach()
        if block.device.type == "cpu":  # numpy's one-thread copy: no wait on busy intra-op threads
            same = _SAME_SIZE[block.element_size()]
            np.copyto(dst.view(same).numpy(), block.view(same).numpy())
        else:
            dst.copy_(block)
        value[:HEADER_BYTES] = BlockHeader(key, self._fingerprint, nbytes,
                                           checksum(memoryview(value)[HEADER_BYTES:])).pack()
        return value

    # -- the Tier protocol ----------------------------------------------------------------------------

    def _server_figures(self) -> tuple[int, int, int]:
        """(used_memory bytes, keys in the database, maxmemory bytes), summed over the servers that
        answer (each primary of a cluster); one round trip per server. Caches a complete maxmemory, and
        the figures when a server answered. After ``close``, the figures last read."""
        if self._closed:
            return self._last_figures
        def ask(server: Any) -> tuple[int, int, int]:
            with server.pipeline(transaction=False) as pipe:
                pipe.info("memory")
                pipe.dbsize()
                memory, keys = pipe.execute()
            return int(memory.get("used_memory", 0)), int(keys), int(memory.get("maxmemory", 0))
        found, complete = self._per_server(ask)
        used, keys, maxmemory = (sum(column) for column in zip(*found)) if found else (0, 0, 0)
        if complete and self._server_capacity is None:
            self._server_capacity = maxmemory
        if found:  # no server answered: the figures last read stand (``cached_stats``)
            self._last_figures = used, keys, maxmemory
        return used, keys, maxmemory

    def _largest_value(self) -> int:
        """The largest value the servers take, bytes (``proto-max-bulk-len``): asked once some server answers
        (the smallest of theirs); Redis's default (512 MiB) where CONFIG is not allowed (an ACL, a managed
        service). Not asked again: a dead node would cost every put its timeout."""
        if self._value_limit is not None:
            return self._value_limit
        if time.monotonic() < self._value_limit_asked + _ASK_AGAIN_SECONDS:  # none answered: not a timeout a put
            return _DEFAULT_BULK_LEN
        self._value_limit_asked = time.monotonic()
        def ask(server: Any) -> int:
            try:
                return int(server.config_get("proto-max-bulk-len").get("proto-max-bulk-len", _DEFAULT_BULK_LEN))
            except ResponseError:  # CONFIG refused: the tier needs no permission for it
                return _DEFAULT_BULK_LEN
        found, _ = self._per_server(ask)
        if not found:
            return _DEFAULT_BULK_LEN
        self._value_limit = min(found)
        return self._value_limit

    @property
    def capacity_bytes(self) -> int:
        """The configured capacity, else the server's maxmemory in bytes (summed over cluster
        primaries; 0: unlimited, or no server answered yet)."""
        if self._capacity:
            return self._capacity
        if self._server_capacity is None:
            return self._server_figures()[2]
        return self._server_capacity

    def used_bytes(self) -> int:
        """The server's ``used_memory`` in bytes (summed over the cluster primaries that answer): every
        namespace and any other data there, plus Redis' own overhead. 0 if no server answers."""
        return self._server_figures()[0]

    def contains(self, key: bytes) -> bool:
        """EXISTS on the block's key; raises if the server cannot be reached."""
        if self.cluster:  # through the per-node batch: a key on a node that is down is a miss
            return self.prefix_length([key]) == 1
        rkey = self.redis_key(key)
        return bool(self._call(lambda c: c.exists(rkey)))

    def prefix_length(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` are stored: pipelined EXISTS, one round trip; raises if unreachable."""
        count = 0
        for found in self._exists(keys):
            if not found:
                break
            count += 1
        return count

    def held(self, keys: Sequence[bytes]) -> set[bytes]:
        """``BatchTier.held``: one pipelined EXISTS a key, one round trip."""
        return {key for key, found in zip(keys, self._exists(keys)) if found}

    def _exists(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether each of ``keys`` is stored (a key on a cluster node that is down: not); raises if unreachable."""
        rkeys = [self.redis_key(k) for k in keys]
        replies = self._batch(rkeys, lambda pipe, i: pipe.exists(rkeys[i])) if rkeys else []
        return [reply is not _FAILED and not isinstance(reply, Exception) and bool(reply) for reply in replies]

    def put_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> int:
        """SET NX each block (with the TTL) in one pipeline; returns how many are stored afterwards.

        A block already stored counts as stored and is not rewritten. If the
        server cannot be reached the call raises (a cluster node that is down
        while others serve: its blocks are not stored, counted ``errors``);
        a block the server refuses (out of memory) or larger than
        ``capacity_bytes`` is counted ``rejected``.
        """
        for key, block in items:
            self.redis_key(key)
            self._check_block("block", block)
        try:
            return self._put_many(items)
        finally:
            self._drop_scratch()

    def _put_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> int:
        """``put_many`` once its arguments are checked."""
        sizes = [HEADER_BYTES + block.nbytes for _, block in items]
        scratch = self._scratch(sum(sizes)) if self.encoding.codec is None and sizes else None
        used = 0
        rkeys: list[bytes] = []
        values: list[bytes | bytearray | memoryview] = []
        for (key, block), size in zip(items, sizes):
            into = None
            if scratch is not None and used + size <= len(scratch):
                into, used = scratch[used:used + size], used + size
            value = self._value(bytes(key), block, into)
            if self._capacity and len(value) > self._capacity:
                self._counters.add("rejected")
                continue
            if len(value) > _LEAST_BULK_LEN and len(value) > self._largest_value():  # sent, the server drops the
                self._counters.add("rejected")  # connection: the batch lost, writes suspended, for one block
                self._refusals.refused(1, "a block's value is past the server's proto-max-bulk-len: raise it "
                                          "(CONFIG SET proto-max-bulk-len), or store smaller blocks")
                continue
            rkeys.append(self.redis_key(key))
            values.append(value)
        if not rkeys:
            return 0
        replies = self._batch(rkeys, lambda pipe, i: pipe.set(rkeys[i], values[i], nx=True, px=self._ttl_ms))
        stored = out_of_memory = 0
        for value, reply in zip(values, replies):
            if reply is _FAILED:
                continue
            if isinstance(reply, OutOfMemoryError):
                self._counters.add("rejected")  # out of memory under maxmemory-policy noeviction
                out_of_memory += 1
            elif isinstance(reply, Exception):
                self._count_failure(reply)
            else:
                stored += 1
                if reply:  # None: NX found it already stored
                    self._counters.add("blocks_written")
                    self._counters.add("bytes_written", len(value) - HEADER_BYTES)
        if out_of_memory:
            self._refusals.refused(out_of_memory, "out of memory (OOM) at its maxmemory, with nothing it may evict: "
                                   "set maxmemory-policy to allkeys-lru (or a volatile-* policy with "
                                   "redis_ttl_seconds set), or give it more maxmemory")
        return stored

    def get_into(self, key: bytes, out: torch.Tensor) -> bool:
        """Read block ``key`` and copy it into ``out`` after checking header and checksum; False on a miss
        (or a damaged value); raises if the server cannot be reached. See ``get_many_into``."""
        return self.get_many_into([key], [out])[0]

    def get_many_into(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor]) -> list[bool]:
        """Read blocks ``keys`` into ``outs``: one round trip (pipelined GETRANGE and EXISTS a key; on a
        cluster, one pipeline a node), and one more for all the damaged values to delete, if any.

        Raises if the server cannot be reached (a cluster node that is down
        while others serve: misses), for the read or for the clean-up: a
        server that answers reads but hangs writes (CLIENT PAUSE WRITE, a
        FAILOVER) costs a call one timeout, not one a block. A block
        larger than its ``out`` (fewer tokens) is a miss that keeps it.
        """
        if len(keys) != len(outs):
            raise ValueError(f"outs: expected one per key ({len(keys)}), got {len(outs)}")
        rkeys = [self.redis_key(k) for k in keys]
        for out in outs:
            self._check_block("out", out)
        if not rkeys:
            return []
        # EXISTS beside GETRANGE tells an absent key (nothing to clean up) from an empty value without a round
        # trip a key: GETRANGE answers b"" for both.
        replies = self._batch(rkeys, lambda pipe, i: (pipe.getrange(rkeys[i], 0, self._limit),
                                                      pipe.exists(rkeys[i])), per_key=2)
        judged = [self._judge(bytes(key), reply, out) for key, reply, out in zip(keys, replies, outs)]
        damaged = [i for i, (verdict, _) in enumerate(judged) if verdict in (CORRUPT, OTHER_CODEC, _EMPTY)]
        deleted = dict(zip(damaged, self._drop_judged([rkeys[i] for i in damaged], [judged[i][1] for i in damaged])))
        found = []
        for i, (verdict, value) in enumerate(judged):
            found.append(verdict == INTACT)
            if verdict == INTACT:
                self._counters.add("hits")
                self._counters.add("bytes_read", len(value) - HEADER_BYTES)
                continue
            self._counters.add("misses")
            if verdict == CORRUPT or (verdict == _EMPTY and deleted[i]):  # an empty value held the key from
                self._counters.add("corrupt")  # SET NX for good; a block stored since the read is kept
            elif verdict == OTHER_CODEC:  # in a form this tier no longer serves
                self._counters.add("stale")
        return found

    def _judge(self, key: bytes, reply: object, out: torch.Tensor) -> tuple[str, object]:
        """(verdict, value read) of ``reply`` (GETRANGE's and EXISTS's) for ``key``, decoded into ``out`` if
        intact: a decode verdict (``INTACT``, ``CORRUPT``, ...), or ``_ABSENT``, ``_EMPTY``, ``_UNSERVED``."""
        if reply is _FAILED:  # its cluster node is down: counted by _per_node
            return _UNSERVED, None
        if isinstance(reply, Exception):
            self._count_failure(reply)
            return _UNSERVED, None
        value, present = reply
        if _wrong_type(value):
            return CORRUPT, value  # not a string: not a block of ours under our key
        if not value:
            return (_EMPTY if present else _ABSENT), value
        if len(value) > self._limit:  # GETRANGE stopped one byte past any block's size
            return CORRUPT, value
        return decode_blob(self.encoding, key, self._fingerprint, value, out), value

    def _drop_judged(self, rkeys: Sequence[bytes], values: Sequence[object]) -> list[bool]:
        """Delete each of ``rkeys`` if it still holds the value this read judged (a string that is not a block,
        or an empty one); whether each was deleted. One pipeline of scripts, each atomic on the server:
        another process that stored a good block under the key since the read (after an eviction, or
        racing this reader) keeps it. Raises, like a read, if the server cannot be reached."""
        if not rkeys:
            return []
        judged = ["wrongtype" if _wrong_type(v) else hashlib.sha1(v).hexdigest()  # noqa: S324 -- an equality check
                  for v in values]
        if not self._no_scripts:
            replies = self._batch(rkeys, lambda pipe, i: pipe.eval(_DROP_JUDGED, 1, rkeys[i], self._limit,
                                                                    judged[i]), scripted=True)
            refusal = next((reply for reply in replies if _scripts_refused(reply)), None)
            if refusal is None:
                return self._deleted(replies)
            self._no_scripts = True
            log.warning("redis tier: the server refuses scripts (%s); a damaged block is deleted without "
                        "checking that no other process stored it again meanwhile", refusal)
        # Without scripts, the clean-up races a writer between the read and the delete, as it did before them.
        return self._deleted(self._batch(rkeys, lambda pipe, i: pipe.delete(rkeys[i])))

    def _deleted(self, replies: Sequence[object]) -> list[bool]:
        """Whether each clean-up reply deleted its key; a failed one is counted, and is not."""
        for reply in replies:
            if isinstance(reply, Exception):
                self._count_failure(reply)
        return [reply is not _FAILED and not isinstance(reply, Exception) and bool(reply) for reply in replies]

    def delete(self, key: bytes) -> bool:
        """DEL block ``key``; True if it was stored, False if not or if the server cannot be reached."""
        rkey = self.redis_key(key)
        return bool(self._guard(lambda c: c.delete(rkey), 0))

    def keys(self) -> Iterator[bytes]:
        """This tier's block keys (its namespace and layout) in SCAN order, not LRU order: Redis keeps
        its own LRU. The keys of a server that does not answer are missing (counted ``errors``)."""
        prefix = len(self._prefix)

        def scan(server: Any) -> list[bytes]:
            return list(server.scan_iter(match=self._pattern, count=_SCAN_COUNT))

        found = []
        for rkeys in self._per_server(scan)[0]:
            for rkey in rkeys:
                try:
                    found.append(bytes.fromhex(rkey[prefix:].decode()))
                except ValueError:
                    continue  # not a block key of this tier
        return iter(found)

    def stats(self) -> dict[str, int]:
        """Counters, plus ``blocks`` (DBSIZE: keys of the whole database, every namespace, summed over
        cluster primaries), ``used_bytes`` (see ``used_bytes``) and ``capacity_bytes``; servers that do
        not answer add nothing."""
        self._server_figures()
        return self.cached_stats()

    def cached_stats(self) -> dict[str, int]:
        used, keys, maxmemory = self._last_figures
        capacity = self._capacity or (maxmemory if self._server_capacity is None else self._server_capacity)
        return tier_stats(self._counters, keys, used, capacity)

    def close(self) -> None:
        """Close the client and its connection pool; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            client, self._client_obj = self._client_obj, None
        if client is not None:
            try:
                client.close()
            except (redis.RedisError, RedisClusterException, OSError):
                pass


def _build(layout: KVLayout, config: StoreConfig) -> RedisTier:
    return RedisTier(config.redis_url, layout, namespace=config.redis_namespace, ttl_seconds=config.redis_ttl_seconds,
                     codec=get_codec(config.redis_codec), timeout_seconds=config.redis_timeout_seconds)


SPEC = TierSpec(
    name="redis",
    wanted=lambda config: config.redis_url is not None,
    build=_build,
    persistent=True,
    bandwidth_prior=0.5e9,
    admit_after=lambda config: config.redis_admit_after,
    codec_setting="redis_codec",
)
