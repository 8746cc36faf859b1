"""``kvstore serve``: the cache server, an asyncio process that shares a BlobStore among engines.

One coroutine per connection reads a frame, answers it and reads the next,
so a client may pipeline requests (send many, read the replies in order)
and a connection holds at most one request and its reply in memory
(``max_inflight_bytes``). Disk reads run on a small thread pool, disk
writes on the store's writer thread; the event loop only parses, looks up
and moves bytes. A malformed frame, an unknown opcode or a request over a
limit gets an error reply and the connection is closed; nothing else is
affected. Shutdown (SIGTERM/SIGINT, or ``stop()``): stop accepting, let
requests in flight finish (up to ``shutdown_grace_seconds``), let the
disk writer drain its backlog (until the same deadline, at least a
second; what is left is lost, as after a crash), close, exit 0.
``replace_tenants`` swaps the tenants in (a SIGHUP reloading the tokens
file): connections whose token no longer names their tenant are closed.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kvstore.protocol import (FLAG_ERROR, FLAG_REPLY, HEADER_BYTES, MAX_HELLO_BYTES, MAX_KEY_BYTES, MISSING, SUPPORTED_VERSIONS,
                              U64, Header, Op, ProtocolError, PutResult, Status, Welcome, choose_version, pack_json,
                              pack_keys, unpack_hello, unpack_keys)
from kvstore.server.auth import Authenticator, Tenant
from kvstore.server.blobs import BlobStore
from kvstore.server.config import ServerConfig
from kvstore.server.metrics import ServerMetrics, serve_http
from kvstore.server.streams import SocketStream, Stream, TlsStream, read_exact

DISK_READ_THREADS = 4
_BACKLOG_POLL_SECONDS = 0.002
_ADMIT_CHUNK_BYTES = 1 << 20  # how far ahead of its bytes a PUT counts them against the write backlog
_ACCEPT_RETRY_SECONDS = 0.05


@dataclass(eq=False)
class _Connection:
    stream: Stream
    tenant: Tenant | None = None
    busy: bool = False
    replying: bool = False  # a reply is partly sent: an error frame now would corrupt the stream
    revoked: bool = False  # its token was taken away (tenants reloaded): closed after the request in flight
    task: asyncio.Task | None = field(default=None, repr=False)


def _listen_error(exc: OSError, host: str, port: int, flag: str, what: str) -> OSError:
    """An error naming the address a server could not listen on, and what to do."""
    reason = exc.strerror or str(exc)
    hint = f"another server is using it: stop it or choose another {flag}" if exc.errno == errno.EADDRINUSE else \
        f"choose another host or {flag}"
    return OSError(exc.errno, f"cannot listen for {what}connections on {host}:{port}: {reason} ({hint})")


class _EncryptedKey(Exception):
    """The TLS key asked for a passphrase."""


def _tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The server's TLS context, if it serves TLS; a ``ValueError`` naming the files if they cannot be used."""
    if config.tls_cert is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    def no_passphrase() -> bytes:  # OpenSSL would ask for it on the terminal: a service has none to answer
        raise _EncryptedKey

    try:
        context.load_cert_chain(config.tls_cert, config.tls_key, password=no_passphrase)
    except _EncryptedKey:
        raise ValueError(f"tls_key: expected an unencrypted PEM private key, got {config.tls_key!r}, which is "
                         f"encrypted (passphrase-protected) and kvstore serve does not ask for passphrases; "
                         f"decrypt a copy readable by this server only (openssl pkey -in KEY -out PLAIN_KEY)"
                         ) from None
    except OSError as error:  # ssl.SSLError is one: not PEM, or a key that is not the certificate's
        reason = getattr(error, "reason", None) or error.strerror or error
        raise ValueError(f"tls_cert, tls_key: expected a readable PEM certificate and its private key, got "
                         f"{config.tls_cert!r} and {config.tls_key!r} ({reason})") from None
    return context


class CacheServer:
    """A cache server for ``config``; ``tenants`` (else from the config) name who may connect.

    ``await start()``, then ``await serve_until_stopped()``; ``stop()`` from the loop ends it.
    """

    def __init__(self, config: ServerConfig, tenants: list[Tenant], open_namespace: str | None = None):
        self.config = config
        self._ssl = _tls_context(config)  # before anything is opened: a bad certificate stops serve at once
        self.auth = Authenticator(tenants, open_namespace)
        # What RAM holds: the recent blobs and, with a disk, the blobs queued for it (up to the backlog bound and
        # one frame, counted here up to host_bytes again: past that, a backlog that deep allocates as before).
        queued = min(config.write_backlog_bytes + config.max_frame_bytes, config.host_bytes) if config.disk_bytes else 0
        arena_bytes = config.host_bytes + queued if config.preallocate else 0
        # The current Authenticator's quotas (replace_tenants swaps it).
        self.store = BlobStore(config.data_dir, config.host_bytes, config.disk_bytes,
                               lambda namespace: self.auth.quota_of(namespace), sync=config.disk_sync,
                               arena_bytes=arena_bytes)
        self.metrics = ServerMetrics(self.store, config.metrics_namespaces)
        self._connections: set[_Connection] = set()
        self._incoming = 0  # payload bytes of PUTs admitted and still being received (see _admit_put)
        self._handshakes = 0  # TLS connections not yet through their handshake
        self._disk = ThreadPoolExecutor(DISK_READ_THREADS, thread_name_prefix="kvstore-server-read")
        self._stopping = False
        self._stopped: asyncio.Event | None = None
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task | None = None
        self._http: asyncio.Server | None = None
        self._started = time.time()
        self.address: tuple[str, int] = (config.host, config.port)
        self.metrics_address: tuple[str, int] | None = None
        self._handlers: dict[int, Callable[[_Connection, Header], Awaitable[None]]] = {
            Op.HELLO: self._hello, Op.PING: self._ping, Op.EXISTS_PREFIX: self._exists_prefix, Op.GET: self._get,
            Op.PUT: self._put, Op.DELETE: self._delete, Op.STATS: self._stats, Op.LIST: self._list,
        }

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        host = self.config.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, self.config.port))
            listener.listen(512)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            raise _listen_error(exc, host, self.config.port, "--port", "") from None
        if self.config.metrics_port is not None:  # before any task runs: a failure here leaves none pending
            try:
                self._http = await serve_http(host, self.config.metrics_port, self.metrics,
                                              lambda: not self._stopping)
            except OSError as exc:
                listener.close()
                raise _listen_error(exc, host, self.config.metrics_port, "--metrics-port", "metrics ") from None
            self.metrics_address = self._http.sockets[0].getsockname()[:2]
        self._listener = listener
        self.address = listener.getsockname()[:2]
        self._accept_task = loop.create_task(self._accept_loop())

    async def serve_until_stopped(self) -> None:
        await self._stopped.wait()

    def replace_tenants(self, tenants: list[Tenant]) -> int:
        """Swap in ``tenants`` (from the loop's thread; ``ValueError``, nothing changed, if they conflict).

        A new HELLO is checked against them at once; an open connection whose token now names its tenant
        goes on (with its new quota and operator flag), any other is closed (now if idle, else after its
        request in flight); each namespace's new quota is enforced at once. Returns the connections closed.
        """
        auth = Authenticator(tenants)
        self.auth = auth
        closed = 0
        for conn in list(self._connections):
            if conn.tenant is None:
                continue
            now = auth.authenticate(conn.tenant.token)
            if now is not None and now.namespace == conn.tenant.namespace:
                conn.tenant = now
                continue
            conn.revoked = True
            closed += 1
            if not conn.busy and conn.task is not None:
                conn.task.cancel()
        self.store.enforce_quotas()
        return closed

    async def stop(self) -> None:
        """Stop accepting, finish requests in flight, flush and close the store."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        if self._accept_task is not None:
            self._accept_task.cancel()
        if self._listener is not None:
            self._listener.close()
        for conn in list(self._connections):
            if not conn.busy and conn.task is not None:
                conn.task.cancel()
        deadline = time.monotonic() + self.config.shutdown_grace_seconds
        while any(c.busy for c in self._connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        tasks = [c.task for c in self._connections if c.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        drain = max(deadline - time.monotonic(), min(1.0, self.config.shutdown_grace_seconds))
        if self._http is not None:
            self._http.close()
            await self._http.wait_closed()
        loop = asyncio.get_running_loop()
        # A cancelled GET's disk read still runs in its thread: the store's map must outlive it.
        await loop.run_in_executor(None, self._disk.shutdown, True)
        await loop.run_in_executor(None, self.store.close, drain)
        self._stopped.set()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(self._listener)
            except OSError:  # out of file descriptors or memory for now: keep accepting once some are freed
                if self._stopping:
                    return
                self.metrics.errors.labels("ACCEPT").inc()
                await asyncio.sleep(_ACCEPT_RETRY_SECONDS)
                continue
            self.metrics.connections_total.inc()
            conn_task = loop.create_task(self._open(sock))
            conn_task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _open(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        hello_deadline = loop.time() + self.config.hello_timeout_seconds  # the TLS handshake and the HELLO
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._ssl is not None:
            # A handshake in progress holds a slot: each costs about 300 KiB of TLS buffers, and 6,000 silent
            # sockets took the server from 239 MB to 2 GB before the cap was ever checked.
            if len(self._connections) + self._handshakes >= self.config.max_connections:
                sock.close()
                return
            self._handshakes += 1
        try:
            stream: Stream = (SocketStream(loop, sock) if self._ssl is None
                              else await TlsStream.accept(loop, sock, self._ssl, self.config.hello_timeout_seconds))
        except (OSError, ssl.SSLError, asyncio.TimeoutError):
            sock.close()
            return
        finally:
            if self._ssl is not None:
                self._handshakes -= 1
        if len(self._connections) >= self.config.max_connections:
            await self._send_error(stream, Header(0, 0), Status.TOO_MANY_CONNECTIONS,
                                   f"expected at most {self.config.max_connections} connections, this is one more")
            stream.close()
            return
        conn = _Connection(stream, task=asyncio.current_task())
        self._connections.add(conn)
        self.metrics.connections.inc()
        try:
            await self._serve(conn, hello_deadline)
        finally:
            self._connections.discard(conn)
            self.metrics.connections.dec()
            stream.close()

    async def _serve(self, conn: _Connection, hello_deadline: float) -> None:
        header = Header(0, 0)
        try:
            loop = asyncio.get_running_loop()
            while not self._stopping and not conn.revoked:
                conn.busy = False
                if conn.tenant is None:  # a client that never says HELLO, or trickles it, must not keep a slot
                    deadline = hello_deadline  # from the accept: a TLS handshake's time counts too
                    raw = await asyncio.wait_for(read_exact(conn.stream, HEADER_BYTES),
                                                 max(0.0, deadline - loop.time()))
                else:  # idle between requests is allowed (pooled engine connections); a request is timed
                    raw = await read_exact(conn.stream, HEADER_BYTES)
                    deadline = loop.time() + self.config.request_timeout_seconds
                conn.busy = True
                start = time.perf_counter()
                header = Header(0, 0)  # what an error reply carries if this header does not parse
                header = Header.unpack(raw)
                handler = self._check(conn, header)
                try:
                    async with asyncio.timeout_at(deadline):  # no task per request, unlike wait_for
                        await handler(conn, header)
                except TimeoutError:
                    self.metrics.errors.labels("DEADLINE").inc()
                    raise
                op = Op(header.opcode).name
                self.metrics.requests.labels(op).inc()
                self.metrics.latency.labels(op).observe(time.perf_counter() - start)
        except ProtocolError as exc:
            self.metrics.errors.labels(exc.status.name).inc()
            if exc.status == Status.UNAUTHORIZED:
                self.metrics.auth_failures.inc()
            if not conn.replying:
                await self._send_error(conn.stream, header, exc.status, str(exc))
        except (EOFError, ConnectionError, OSError, asyncio.CancelledError, asyncio.TimeoutError):
            pass
        except Exception as exc:  # a bug must cost one connection, never the server
            self.metrics.errors.labels(Status.INTERNAL.name).inc()
            if not conn.replying:
                await self._send_error(conn.stream, header, Status.INTERNAL, f"{type(exc).__name__}: {exc}")
        finally:
            conn.busy = False

    def _check(self, conn: _Connection, header: Header) -> Callable[[_Connection, Header], Awaitable[None]]:
        """The handler of a well-formed request within the limits; ``ProtocolError`` otherwise."""
        if header.flags or header.status:
            raise ProtocolError(Status.MALFORMED, f"expected flags 0 and status 0 in a request, got flags "
                                                  f"{header.flags} and status {header.status}")
        handler = self._handlers.get(header.opcode)
        if handler is None:
            raise ProtocolError(Status.UNKNOWN_OPCODE, f"expected an opcode in {[op.name for op in Op]}, "
                                                       f"got {header.opcode}")
        if header.payload_len > self.config.max_frame_bytes:
            raise ProtocolError(Status.TOO_LARGE, f"expected a payload of at most {self.config.max_frame_bytes} "
                                                  f"bytes, got {header.payload_len}")
        if header.count > self.config.max_keys:
            raise ProtocolError(Status.TOO_MANY_KEYS, f"expected at most {self.config.max_keys} keys per request, "
                                                      f"got {header.count}")
        if conn.tenant is None and header.opcode != Op.HELLO:
            raise ProtocolError(Status.NOT_AUTHENTICATED, f"expected HELLO first, got {Op(header.opcode).name}")
        return handler

    # -- replies --------------------------------------------------------------------

    @staticmethod
    async def _reply(conn: _Connection, request: Header, count: int = 0, *parts: bytes | bytearray | memoryview
                     ) -> None:
        payload_len = sum(len(p) for p in parts)
        head = Header(request.opcode, request.request_id, count, payload_len, FLAG_REPLY).pack()
        conn.replying = True
        await conn.stream.write([head, *parts])
        conn.replying = False
        await asyncio.sleep(0)  # let other connections run between replies (asyncio's loop is not fair otherwise)

    async def _send_error(self, stream: Stream, request: Header, status: Status, message: str) -> None:
        body = message.encode()[:4096]
        head = Header(request.opcode, request.request_id, 0, len(body), FLAG_REPLY | FLAG_ERROR, int(status))
        try:
            await asyncio.wait_for(stream.write([head.pack(), body]), 5.0)
        except (OSError, ConnectionError, asyncio.TimeoutError, EOFError):
            pass

    # -- operations -------------------------------------------------------------------

    async def _keys(self, conn: _Connection, header: Header) -> list[bytes]:
        if header.payload_len > header.count * (1 + MAX_KEY_BYTES):
            raise ProtocolError(Status.MALFORMED, f"expected at most {header.count * (1 + MAX_KEY_BYTES)} payload "
                                                  f"bytes for {header.count} keys, got {header.payload_len}")
        return unpack_keys(await read_exact(conn.stream, header.payload_len), header.count)

    async def _hello(self, conn: _Connection, header: Header) -> None:
        if conn.tenant is not None:
            raise ProtocolError(Status.MALFORMED, "expected one HELLO per connection, got a second")
        if header.payload_len > MAX_HELLO_BYTES:
            raise ProtocolError(Status.TOO_LARGE, f"expected a HELLO of at most {MAX_HELLO_BYTES} bytes, "
                                                  f"got {header.payload_len}")
        low, high, token = unpack_hello(await read_exact(conn.stream, header.payload_len))
        version = choose_version(low, high)
        if version is None:
            raise ProtocolError(Status.UNSUPPORTED_VERSION, f"expected a version range including one of "
                                                            f"{list(SUPPORTED_VERSIONS)}, got [{low}, {high}]")
        tenant = self.auth.authenticate(token)
        if tenant is None:
            raise ProtocolError(Status.UNAUTHORIZED, "expected a valid token, got an unknown one")
        conn.tenant = tenant
        welcome = Welcome(version, self.config.max_frame_bytes, self.config.max_keys, self.config.max_inflight_bytes,
                          self.auth.quota_of(tenant.namespace) or self.store.capacity_bytes, tenant.namespace)
        await self._reply(conn, header, 0, welcome.pack())

    async def _ping(self, conn: _Connection, header: Header) -> None:
        await self._reply(conn, header, 0, await read_exact(conn.stream, header.payload_len))

    async def _exists_prefix(self, conn: _Connection, header: Header) -> None:
        keys = await self._keys(conn, header)
        await self._reply(conn, header, self.store.exists_prefix(conn.tenant.namespace, keys))

    async def _get(self, conn: _Connection, header: Header) -> None:
        keys = await self._keys(conn, header)
        namespace = conn.tenant.namespace
        loop = asyncio.get_running_loop()
        blobs = []
        total = 8 * len(keys)
        for key in keys:
            blob, on_disk = self.store.get_ram(namespace, key)
            if blob is None and on_disk:
                blob = await loop.run_in_executor(self._disk, self.store.read_disk, namespace, key)
            total += len(blob) if blob is not None else 0
            if total > self.config.max_inflight_bytes:
                raise ProtocolError(Status.TOO_LARGE, f"expected a reply of at most {self.config.max_inflight_bytes}"
                                                      f" bytes (max_inflight_bytes), this GET needs more")
            blobs.append(blob)
        self.store.touch_chain(namespace, [key for key, blob in zip(keys, blobs) if blob is not None])
        sizes = b"".join(U64.pack(MISSING if b is None else len(b)) for b in blobs)
        await self._reply(conn, header, len(keys), sizes, *(b for b in blobs if b is not None))

    async def _admit_put(self, num_bytes: int, held: int) -> None:
        """Wait until ``num_bytes`` more of a PUT's payload may be received: while the disk backlog, the PUT
        bytes received and not yet queued (``held`` of them this PUT's own) and these fit
        ``write_backlog_bytes``, or nothing but this PUT is queued or incoming (a frame larger than the bound
        goes alone). Then they count as incoming. Checked and counted with no await between, on the one
        event loop thread: checking the backlog alone let every connection past it at once (8 writers of
        8 MiB frames held 24 MiB behind a 1 MiB backlog). Counted as the bytes are about to arrive, at most
        ``_ADMIT_CHUNK_BYTES`` ahead, so a client that announces a frame and stalls holds no more room
        than that. A failing disk does not drain the backlog: its PUTs are refused at once."""
        if self.config.disk_bytes:
            bound = self.config.write_backlog_bytes
            while self.store.disk_error is None:
                others = self.store.backlog_bytes() + self._incoming - held
                if others == 0 or others + held + num_bytes <= bound:
                    break
                await asyncio.sleep(_BACKLOG_POLL_SECONDS)
        self._incoming += num_bytes

    async def _put(self, conn: _Connection, header: Header) -> None:
        held = [0]  # this PUT's bytes counted incoming until its blobs are queued (then in the backlog)

        async def admit(num_bytes: int) -> None:
            await self._admit_put(num_bytes, held[0])
            held[0] += num_bytes

        def queued() -> None:
            self._incoming -= held[0]
            held[0] = 0

        try:
            await self._receive_put(conn, header, admit, queued)
        finally:
            queued()

    async def _receive_put(self, conn: _Connection, header: Header, admit: Callable[[int], Awaitable[None]],
                           queued: Callable[[], None]) -> None:
        remaining = header.payload_len
        items = []
        for i in range(header.count):
            if remaining < 1 + 1 + U64.size:
                raise ProtocolError(Status.MALFORMED, f"block {i}: payload ended ({remaining} bytes left)")
            key_len = (await read_exact(conn.stream, 1))[0]
            if not 1 <= key_len <= MAX_KEY_BYTES or remaining < 1 + key_len + U64.size:
                raise ProtocolError(Status.MALFORMED, f"block {i}: bad key length {key_len}")
            key = bytes(await read_exact(conn.stream, key_len))
            (blob_len,) = U64.unpack(await read_exact(conn.stream, U64.size))
            remaining -= 1 + key_len + U64.size
            if blob_len > remaining:
                raise ProtocolError(Status.MALFORMED, f"block {i}: expected at most {remaining} bytes, "
                                                      f"header says {blob_len}")
            blob = self.store.buffer(blob_len)
            view = memoryview(blob)
            for at in range(0, blob_len, _ADMIT_CHUNK_BYTES):
                part = view[at:at + _ADMIT_CHUNK_BYTES]
                await admit(len(part))
                await conn.stream.read_into(part)
            items.append((key, blob))
            remaining -= blob_len
        if remaining:
            raise ProtocolError(Status.MALFORMED, f"expected {header.count} blocks filling the payload, "
                                                  f"{remaining} bytes are left over")
        if self.config.durable:
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            results = self.store.put_many(conn.tenant.namespace, items,
                                          lambda ok: loop.call_soon_threadsafe(_resolve, done, ok))
            queued()
            if not await done:  # the disk refused the commit: nothing of this PUT is acknowledged as durable
                results = [PutResult.REJECTED if r == PutResult.STORED else r for r in results]
        else:
            results = self.store.put_many(conn.tenant.namespace, items)
        stored = sum(r == PutResult.STORED for r in results)
        await self._reply(conn, header, stored, bytes(results))

    async def _delete(self, conn: _Connection, header: Header) -> None:
        done = self.store.delete_many(conn.tenant.namespace, await self._keys(conn, header))
        await self._reply(conn, header, sum(done), bytes(done))

    async def _stats(self, conn: _Connection, header: Header) -> None:
        await read_exact(conn.stream, header.payload_len)
        body = {"namespace": conn.tenant.namespace, "blocks": self.store.namespace_stats(conn.tenant.namespace)}
        if conn.tenant.operator:  # the whole server's figures say what other tenants hold: the operator's only
            body["server"] = dict(self.store.totals(), connections=len(self._connections),
                                  uptime_seconds=round(time.time() - self._started, 3))
        await self._reply(conn, header, 0, pack_json(body))

    async def _list(self, conn: _Connection, header: Header) -> None:
        if header.payload_len != U64.size:
            raise ProtocolError(Status.MALFORMED, f"expected an 8-byte offset, got {header.payload_len} bytes")
        (offset,) = U64.unpack(await read_exact(conn.stream, U64.size))
        keys = self.store.list_keys(conn.tenant.namespace, offset, header.count)
        await self._reply(conn, header, len(keys), pack_keys(keys))


def _resolve(future: asyncio.Future, ok: bool) -> None:
    if not future.done():
        future.set_result(ok)

