"""One cache-server process for ``bench/test_bench_server.py``: a real CacheServer plus a raw-TCP ceiling.

Run: ``python bench/server_process.py '{"loop": "uvloop", "disk_bytes": 0, ...}' [--profile OUT.prof]``.
The JSON holds ServerConfig settings (``host``, ``port``, ``metrics_port``
and ``token`` are set here). The process prints one line,
``READY <kvstore port> <raw port> <token> <loop module> <arena seconds>`` once
its receive arena is faulted in (the seconds that took), then serves until
SIGTERM/SIGINT or until its stdin closes (the benchmark died), and exits 0.

The raw endpoint is the ceiling: a thread per connection on blocking
sockets with TCP_NODELAY, as fast as a plain Python socket gets. A request
is a 24-byte header ``u64 n_in, u64 n_out, u64 flags`` followed by ``n_in``
bytes, which it receives with ``recv_into`` into one preallocated,
page-aligned buffer (``flags & FRESH``: into a new ``bytearray(n_in)`` each
time, as the server does for a blob it keeps; ``flags & FRESH_NUMPY``: into a
new ``numpy.empty(n_in, uint8)``, which is neither zero-filled nor, for large
sizes, faulted in 4 KiB pages: numpy advises huge pages); it answers with
``n_out`` bytes sent with ``sendall`` of a memoryview of a preallocated,
page-aligned buffer. A PUT ceiling is ``(N, 1)``, a GET ceiling
``(request bytes, N)``. With a disk tier (``disk_bytes`` > 0) two more flags
model the disk work of a persistent server on the same bytes, in a file
``raw-ceiling.bin`` in ``data_dir``: ``WRITE_FSYNC`` writes the received
bytes over the file's start (``pwrite``) and calls ``fsync`` before replying;
``READ_FILE`` reads the ``n_out`` bytes from the (page-cache warm) file
(``preadv`` into the preallocated buffer) before sending them.

``--profile OUT`` runs the event loop under cProfile (the loop thread only:
that is where the server parses, looks up and moves bytes) and writes the
stats to OUT on exit.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from kvstore.server.app import CacheServer
from kvstore.server.auth import Tenant
from kvstore.server.config import ServerConfig
from kvstore.server.serve import keep_freed_memory, new_event_loop

RAW_HEADER = struct.Struct("<QQQ")
FRESH = 1
FRESH_NUMPY = 2
WRITE_FSYNC = 4
READ_FILE = 8
TOKEN = "bench-token-0123456789abcdef"
BUFFER_BYTES = 64 << 20  # larger than any message of the benchmark (chunked beyond it)


def aligned_buffer(num_bytes: int) -> memoryview:
    """A page-aligned, resident (written) byte buffer."""
    array = np.empty(num_bytes + 4096, np.uint8)
    start = -array.ctypes.data % 4096
    view = array[start:start + num_bytes]
    view[:] = np.resize(np.frombuffer(os.urandom(1 << 16), np.uint8), num_bytes)
    return memoryview(view)


def recv_exact(sock: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


class ServerProcess:
    """``bench/server_process.py`` with ``settings``: ``url``, ``raw_port``, ``token``, ``loop``."""

    def __init__(self, variant: str, settings: dict, profile: str | None = None, timeout: float = 60.0):
        self.variant = variant
        cmd = [sys.executable, str(Path(__file__).resolve()), json.dumps(settings)]
        if profile is not None:
            cmd += ["--profile", profile]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.monotonic() + timeout
        output = []
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = self.proc.stdout.readline() if ready else ""
            if not line:
                break
            output.append(line)
            if line.startswith("READY "):
                _, port, raw_port, self.token, self.loop, arena_seconds = line.split()
                self.arena_seconds = float(arena_seconds)  # the server's start-up: faulting in its arena
                self.url = f"kvstore://127.0.0.1:{port}"
                self.raw_port = int(raw_port)
                return
        self.proc.kill()
        self.proc.wait()
        raise RuntimeError(f"server_process.py did not start: {''.join(output)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    if not recv_exact(sock, view):
        raise ConnectionError("raw endpoint closed the connection")


class RawClient:
    """One plain blocking socket (no timeout, TCP_NODELAY) to the raw endpoint, with preallocated buffers."""

    def __init__(self, port: int, max_bytes: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(None)
        self._out = aligned_buffer(max_bytes)
        self._in = aligned_buffer(max_bytes)

    def exchange(self, n_in: int, n_out: int, flags: int = 0) -> None:
        """Send the 24-byte header and ``n_in`` bytes (two ``sendall``), receive ``n_out`` bytes."""
        self.sock.sendall(RAW_HEADER.pack(n_in, n_out, flags))
        if n_in:
            self.sock.sendall(self._out[:n_in])
        _recv_exact(self.sock, self._in[:n_out])

    def close(self) -> None:
        self.sock.close()




class RawEndpoint:
    """The raw-TCP ceiling on 127.0.0.1 (a free port): see the module docstring."""

    def __init__(self, data_dir: str | None = None) -> None:
        self._sink = aligned_buffer(BUFFER_BYTES)
        self._source = aligned_buffer(BUFFER_BYTES)
        self._fd = None
        if data_dir is not None:
            os.makedirs(data_dir, exist_ok=True)
            self._fd = os.open(os.path.join(data_dir, "raw-ceiling.bin"), os.O_RDWR | os.O_CREAT, 0o644)
            self._pwrite(self._source)
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="raw-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(sock,), name="raw-conn", daemon=True).start()

    def _pwrite(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], done)

    def _pread(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], done)
            if n == 0:
                raise EOFError("raw-ceiling.bin is shorter than asked")
            done += n

    def _serve(self, sock: socket.socket) -> None:
        head = bytearray(RAW_HEADER.size)
        try:
            while recv_exact(sock, memoryview(head)):
                n_in, n_out, flags = RAW_HEADER.unpack(head)
                if flags & (FRESH | FRESH_NUMPY):
                    fresh = bytearray(n_in) if flags & FRESH else np.empty(n_in, np.uint8)
                    if not recv_exact(sock, memoryview(fresh)):
                        return
                    del fresh
                else:
                    while n_in:
                        step = min(n_in, BUFFER_BYTES)
                        if not recv_exact(sock, self._sink[:step]):
                            return
                        n_in -= step
                        if flags & WRITE_FSYNC and self._fd is not None:
                            self._pwrite(self._sink[:step])
                    if flags & WRITE_FSYNC and self._fd is not None:
                        os.fsync(self._fd)
                if flags & READ_FILE and self._fd is not None:
                    self._pread(self._source[:min(n_out, BUFFER_BYTES)])
                while n_out:
                    step = min(n_out, BUFFER_BYTES)
                    sock.sendall(self._source[:step])
                    n_out -= step
        except OSError:
            pass
        finally:
            sock.close()


def main(argv: list[str]) -> int:
    settings = json.loads(argv[1]) if len(argv) > 1 else {}
    profile_path = argv[argv.index("--profile") + 1] if "--profile" in argv else None
    config = ServerConfig.from_dict(dict(settings, host="127.0.0.1", port=0, metrics_port=None, token=TOKEN))
    raw = RawEndpoint(config.data_dir if config.disk_bytes else None)
    keep_freed_memory(config.max_frame_bytes)  # as ``kvstore serve`` does
    loop = new_event_loop(config.loop)
    asyncio.set_event_loop(loop)
    server = CacheServer(config, [Tenant("default", TOKEN)])

    def stop() -> None:
        loop.create_task(server.stop())

    def watch_stdin() -> None:  # the benchmark process went away: stop too
        while sys.stdin.buffer.read(4096):
            pass
        loop.call_soon_threadsafe(stop)

    async def serve() -> None:
        await server.start()
        started = time.perf_counter()
        # Serve at full speed from the first timed request: wait until the receive arena is faulted in, as a
        # server that has been up a few seconds is (LMCache's server also touches its memory before serving).
        while (totals := server.store.totals())["arena_faulted"] < totals["arena_capacity"]:
            await asyncio.sleep(0.02)
        arena_seconds = time.perf_counter() - started
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()
        print(f"READY {server.address[1]} {raw.port} {TOKEN} {type(loop).__module__} {arena_seconds:.3f}",
              flush=True)
        await server.serve_until_stopped()

    profiler = None
    if profile_path is not None:
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    try:
        loop.run_until_complete(serve())
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile_path)
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
