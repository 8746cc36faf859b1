"""Byte streams of one server connection: plain sockets with as few copies as the kernel allows, or TLS.

On a plain socket large reads go straight from the kernel into the
destination (a blob's own buffer) and writes go from the stored blob to the
kernel: on loopback a memory copy costs about as much as the transfer, so
each avoided copy is throughput. Small reads (headers, keys) come from a
read-ahead buffer, so parsing a frame costs few system calls. TLS streams
go through asyncio's transports (the ``ssl`` module needs them).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Sequence
from typing import Protocol

from kvstore.buffers import IOV_MAX, after_sent, alloc_bytes, byte_view

READ_AHEAD_BYTES = 256 << 10

Bytes = bytes | bytearray | memoryview


class Stream(Protocol):
    async def read_into(self, view: memoryview) -> None:
        """Fill ``view`` exactly; ``EOFError`` if the peer closes first."""
        ...

    async def write(self, parts: Sequence[Bytes]) -> None: ...

    def close(self) -> None: ...


async def read_exact(stream: Stream, num_bytes: int) -> bytearray | memoryview:
    data = alloc_bytes(num_bytes)
    await stream.read_into(memoryview(data))
    return data


class SocketStream:
    """A non-blocking socket: reads through the event loop's ``sock_recv_into``, replies with ``sendmsg``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket):
        self._loop = loop
        self._sock = sock
        self._view = memoryview(b"")  # the read-ahead buffer, made at the first read: a connection refused at
        self._pos = self._end = 0       # the cap never reads, and cost 256 KiB each until then

    async def read_into(self, view: memoryview) -> None:
        if not self._view:
            self._view = memoryview(bytearray(READ_AHEAD_BYTES))
        size = len(view)
        got = min(size, self._end - self._pos)
        if got:
            view[:got] = self._view[self._pos:self._pos + got]
            self._pos += got
        while got < size:
            need = size - got
            if need >= READ_AHEAD_BYTES // 2:  # large: straight into the destination
                n = await self._loop.sock_recv_into(self._sock, view[got:])
                if n == 0:
                    raise EOFError("peer closed the connection")
                got += n
                continue
            self._end = await self._loop.sock_recv_into(self._sock, self._view)
            if self._end == 0:
                raise EOFError("peer closed the connection")
            take = min(self._end, need)
            view[got:got + take] = self._view[:take]
            self._pos = take
            got += take

    async def write(self, parts: Sequence[Bytes]) -> None:
        """Send ``parts`` in order, as few ``sendmsg`` calls as the socket's buffer allows (no joining copy)."""
        views = [view for view in map(byte_view, parts) if view.nbytes]
        while views:
            try:
                views = after_sent(views, self._sock.sendmsg(views[:IOV_MAX]))
            except (BlockingIOError, InterruptedError):
                await self._writable()

    async def _writable(self) -> None:
        ready = self._loop.create_future()
        fd = self._sock.fileno()
        self._loop.add_writer(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            self._loop.remove_writer(fd)

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass


class TlsStream:
    """A TLS connection over asyncio's transport (one extra copy each way, which TLS needs anyway)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer

    @classmethod
    async def accept(cls, loop: asyncio.AbstractEventLoop, sock: socket.socket, context: ssl.SSLContext,
                     handshake_seconds: float = 10.0) -> "TlsStream":
        reader = asyncio.StreamReader(limit=READ_AHEAD_BYTES, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock, ssl=context,
                                                          ssl_handshake_timeout=handshake_seconds)
        return cls(reader, asyncio.StreamWriter(transport, protocol, reader, loop))

    async def read_into(self, view: memoryview) -> None:
        try:
            view[:] = await self._reader.readexactly(len(view))
        except asyncio.IncompleteReadError:
            raise EOFError("peer closed the connection") from None

    async def write(self, parts: Sequence[Bytes]) -> None:
        for part in parts:
            self._writer.write(part)
        await self._writer.drain()

    def close(self) -> None:
        self._writer.close()
