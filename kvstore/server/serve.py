"""Running a cache server as a process: tenants from the config, the event loop, signals, the banner."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import signal
import sys
from collections.abc import Callable

from kvstore.server.app import CacheServer
from kvstore.server.auth import DEFAULT_NAMESPACE, Tenant, default_token, load_tenants
from kvstore.server.config import ServerConfig
from kvstore.sizes import format_size
from kvstore.tiers.lmdb import DirectoryInUseError

log = logging.getLogger(__name__)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory(max_block_bytes: int) -> bool:
    """Ask glibc's allocator to reuse freed blocks of up to ``max_block_bytes`` instead of unmapping them.

    LMDB copies every value it writes into pages it ``malloc``s per commit;
    past 32 MiB glibc maps those fresh and unmaps them at ``free``, so each
    commit of a 32 MiB block faults in 8,192 new pages: twice the time of
    the write and fsync themselves. Kept in the heap, the next commit reuses
    them. The server's memory stays bounded by what it may hold at once
    (``host_bytes``, the write backlog, the frames in flight). For this
    process only (``kvstore serve``), never inside an engine. False where
    the C library has no ``mallopt`` (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    limit = min(max_block_bytes, (1 << 31) - 1)
    done = bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
    if not done:
        log.info("kvstore serve: the allocator did not accept an mmap threshold of %d bytes", limit)
    return done


def tenants_of(config: ServerConfig) -> tuple[list[Tenant], str | None, str | None]:
    """(tenants, open namespace, token to print): from ``tokens_file``, ``token``, or a kept default token."""
    if config.tokens_file is not None:
        return load_tenants(config.tokens_file), None, None
    if config.token is not None:
        return [Tenant(DEFAULT_NAMESPACE, config.token, operator=True)], None, None
    if config.allow_unauthenticated:
        return [], DEFAULT_NAMESPACE, None
    token = default_token(config.data_dir)
    return [Tenant(DEFAULT_NAMESPACE, token, operator=True)], None, token


def new_event_loop(choice: str) -> asyncio.AbstractEventLoop:
    """uvloop's loop when asked for (or ``auto`` and installed), else asyncio's."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ValueError("loop: expected uvloop to be installed (pip install uvloop), it is not") from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class TenantReloader:
    """SIGHUP: read the tokens file again and swap its tenants in (``CacheServer.replace_tenants``).

    A file that cannot be read or is not valid keeps the tenants in use (the error is logged, naming the
    file); so does a server started without ``tokens_file`` (``token``, a default token, unauthenticated),
    which has nothing to reload. Signals while a reload runs are one more reload after it, not a queue.
    """

    def __init__(self, server: CacheServer, config: ServerConfig, say: Callable[[str], None]):
        self._server = server
        self._config = config
        self._say = say
        self._running = False
        self._again = False
        self._task: asyncio.Task | None = None

    def __call__(self) -> None:
        """The signal handler (on the loop's thread)."""
        if self._config.tokens_file is None:
            log.warning("kvstore serve: SIGHUP: no tokens_file to reload (this server uses --token, a default "
                        "token or no authentication); nothing changed")
            return
        if self._running:
            self._again = True
            return
        self._running = True
        self._task = asyncio.get_running_loop().create_task(self._reload())  # kept: a task nobody holds may go

    async def _reload(self) -> None:
        loop = asyncio.get_running_loop()
        path = self._config.tokens_file
        try:
            while True:
                self._again = False
                try:
                    tenants = await loop.run_in_executor(None, load_tenants, path)
                    closed = self._server.replace_tenants(tenants)
                except (ValueError, OSError) as error:  # unreadable, not TOML/YAML, a bad tenant, a token twice
                    log.error("kvstore serve: SIGHUP: kept the tenants in use; the tokens file could not be "
                              "used: %s", " ".join(str(error).split()))
                except Exception as error:  # a bug must not cost the server: the tenants in use stay
                    log.error("kvstore serve: SIGHUP: kept the tenants in use; reloading %s failed: %s: %s", path,
                              type(error).__name__, error)
                else:
                    self._say(f"kvstore serve: reloaded {path}: {len(tenants)} tenant(s): "
                              f"{', '.join(t.namespace for t in tenants)}"
                              + (f"; closed {closed} connection(s) whose token is gone" if closed else ""))
                    sys.stdout.flush()
                if not self._again:
                    return
        finally:
            self._running = False


def run(config: ServerConfig, say: Callable[[str], None] = print) -> int:
    """Serve until SIGTERM or SIGINT, then shut down gracefully; SIGHUP reloads the tokens file
    (``TenantReloader``). Returns the exit status (0)."""
    tenants, open_namespace, token = tenants_of(config)
    keep_freed_memory(config.max_frame_bytes)
    try:
        server = CacheServer(config, tenants, open_namespace)
    except DirectoryInUseError:
        raise OSError(errno.EBUSY, f"data directory {config.data_dir} is held by another process (another "
                                   f"kvstore serve?): stop it, or give this server its own --data-dir") from None
    loop = new_event_loop(config.loop)
    asyncio.set_event_loop(loop)

    async def main() -> None:
        await server.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: loop.create_task(server.stop()))
        loop.add_signal_handler(signal.SIGHUP, TenantReloader(server, config, say))
        host, port = server.address
        scheme = "kvstores" if config.tls_cert else "kvstore"
        say(f"kvstore serve: listening on {scheme}://{host}:{port} (data in {config.data_dir}, "
            f"host RAM {format_size(config.host_bytes)}, disk {format_size(config.disk_bytes)}, "
            f"loop {type(loop).__module__})")
        arena = server.store.totals()["arena_capacity"]
        if arena:
            say(f"kvstore serve: preallocating {format_size(arena)} of RAM for received blocks in the background "
                f"(--preallocate false: allocate per block instead)")
        if server.metrics_address is not None:
            say(f"kvstore serve: metrics on http://{server.metrics_address[0]}:{server.metrics_address[1]}/metrics")
        if token is not None:
            say(f"kvstore serve: token {token} (namespace {DEFAULT_NAMESPACE}; kept in {config.data_dir}/token)")
        elif open_namespace is not None:
            say(f"kvstore serve: unauthenticated, every client in namespace {open_namespace}")
        else:
            say(f"kvstore serve: {len(tenants)} tenant(s): {', '.join(t.namespace for t in tenants)}")
        sys.stdout.flush()
        await server.serve_until_stopped()
        say("kvstore serve: stopped")

    try:
        loop.run_until_complete(main())
    except BaseException:
        server.store.close()  # a server that could not start lets go of its data directory
        raise
    finally:
        loop.close()
    return 0
