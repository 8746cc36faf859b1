"""ServerConfig: every setting of ``kvstore serve``, from flags, a TOML/YAML file or KVSTORE_SERVER_* variables."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvstore.config import MAX_WAIT_SECONDS, StoreConfig, check_folder, env_values, read_settings_file, refuse_unknown_settings, settings_from_dict
from kvstore.protocol import MAX_HELLO_BYTES
from kvstore.sizes import parse_size

ENV_PREFIX = "KVSTORE_SERVER_"
LOOPS = ("auto", "asyncio", "uvloop")


# One line per setting for ``kvstore serve --help`` (the class docstring says more).
FLAG_HELP: dict[str, str] = {
    "host": "address to listen on (loopback by default: clients on this machine only)",
    "port": "port for clients; 0 picks a free one",
    "metrics_port": "HTTP port of /metrics (Prometheus) and /healthz on --host; none: off; 0: a free one",
    "metrics_namespaces": "show each namespace (tenant names, traffic) in /metrics, which needs no token "
                          "(true/false)",
    "data_dir": "folder of the LMDB data, the default token and the lock (one server per folder)",
    "host_bytes": "RAM for the most recently used blocks, e.g. 4GiB",
    "disk_bytes": "size of the LMDB disk tier, e.g. 100GiB; 0: memory only",
    "preallocate": "allocate RAM for host_bytes (plus the write backlog) at start and fault it in the background, "
                   "so PUTs receive into memory that is ready (true/false)",
    "disk_sync": "fsync every disk commit (true/false)",
    "durable": "acknowledge a PUT only once it is on disk (true/false); otherwise once in RAM",
    "tokens_file": "TOML/YAML file of tenants (namespace, token, quota); see kvstore/server/auth.py",
    "token": "one shared secret for the default namespace (instead of a tokens file)",
    "allow_unauthenticated": "accept any client into the default namespace (loopback hosts only)",
    "tls_cert": "PEM certificate: serve TLS (kvstores://); needs --tls-key",
    "tls_key": "PEM private key of --tls-cert",
    "max_frame_bytes": "largest payload of one request, e.g. 256MiB",
    "max_keys": "most keys in one request",
    "max_connections": "most client connections at once",
    "max_inflight_bytes": "most bytes of one connection's request plus reply in memory",
    "write_backlog_bytes": "disk writes queued before PUTs wait",
    "shutdown_grace_seconds": "seconds requests in flight, then the disk writer's backlog, may take to finish on "
                              "SIGTERM (blocks still queued then are lost, as in a crash, unless --durable)",
    "hello_timeout_seconds": "seconds a new connection has for its TLS handshake and its whole HELLO",
    "request_timeout_seconds": "seconds a request has from its header to its reply",
    "loop": "event loop: auto (uvloop when installed), asyncio or uvloop",
}


@refuse_unknown_settings
@dataclass(frozen=True)
class ServerConfig:
    """Settings of one cache server. Sizes are bytes or strings such as ``"4GiB"``.

    - ``host`` / ``port``: where clients connect (loopback by default; port
      0 picks a free one); ``metrics_port``: HTTP ``/metrics`` (Prometheus)
      and ``/healthz`` on ``host`` (None: off; 0: a free port), which need
      no token: bind ``host`` to loopback or firewall the port;
      ``metrics_namespaces``: a series per namespace there (tenant names and
      traffic), off by default (sums over the namespaces).
    - ``data_dir``: the LMDB environment, the default token and the lock;
      ``host_bytes``: RAM for the most recently used blocks;
      ``disk_bytes``: the LMDB tier (0: memory only); ``preallocate``: take
      that RAM (plus, with a disk, the write backlog and one frame, at most
      ``host_bytes`` more) at start
      and fault it in on a background thread, so a PUT receives into memory
      that is ready instead of growing the process; ``disk_sync``: fsync
      every commit; ``durable``: acknowledge a PUT only once it is on disk
      (otherwise once it is in RAM, with the disk written behind).
    - Auth: ``tokens_file`` (tenants, see ``kvstore/server/auth.py``) or
      ``token`` (the ``default`` namespace); with neither, a token is made
      and kept in ``data_dir/token`` and printed at start.
      ``allow_unauthenticated``: accept any client into ``default``, only on
      a loopback ``host``. ``tls_cert`` / ``tls_key``: serve TLS.
    - Limits: ``max_frame_bytes`` (one request's payload),
      ``max_keys`` (per request), ``max_connections``,
      ``max_inflight_bytes`` (a connection's request plus reply),
      ``write_backlog_bytes`` (disk writes queued before PUTs wait),
      ``shutdown_grace_seconds`` (how long in-flight requests may finish,
      and the disk writer its backlog, until the same deadline and at least
      a second: what is still queued then is lost, as in a crash),
      ``hello_timeout_seconds`` (how long a new connection may take, from
      its accept, for its TLS handshake and to send its whole HELLO, header
      and payload, and be answered before it is closed, so silent or
      trickling sockets cannot hold slots),
      ``request_timeout_seconds`` (how long an authenticated request may take
      from its header to its reply: its payload, the work and the reply to a
      client that reads; a connection idle between requests is not timed).
    - ``loop``: ``uvloop`` when installed (``auto``), or ``asyncio``.
    """

    host: str = "127.0.0.1"
    port: int = 8477
    metrics_port: int | None = 8478
    metrics_namespaces: bool = False
    data_dir: str = "./kvstore-server"
    host_bytes: int | str = "1GiB"
    disk_bytes: int | str = "16GiB"
    preallocate: bool = True
    disk_sync: bool = True
    durable: bool = False
    tokens_file: str | None = None
    token: str | None = None
    allow_unauthenticated: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    max_frame_bytes: int | str = "256MiB"
    max_keys: int = 4096
    max_connections: int = 256
    max_inflight_bytes: int | str = "512MiB"
    write_backlog_bytes: int | str = "512MiB"
    shutdown_grace_seconds: float = 10.0
    hello_timeout_seconds: float = 10.0
    request_timeout_seconds: float = 60.0
    loop: str = "auto"

    def __post_init__(self) -> None:
        for name in ("host_bytes", "disk_bytes", "max_frame_bytes", "max_inflight_bytes", "write_backlog_bytes"):
            object.__setattr__(self, name, parse_size(getattr(self, name), name))
        for name, least in (("port", 0), ("metrics_port", 0), ("max_keys", 1), ("max_connections", 1)):
            value = getattr(self, name)
            if value is None and name == "metrics_port":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= (
                    65535 if "port" in name else 1 << 31):
                raise ValueError(f"{name}: expected an integer in [{least}, "
                                 f"{65535 if 'port' in name else 1 << 31}], got {value!r}")
        if self.host_bytes <= 0:
            raise ValueError(f"host_bytes: expected > 0, got {self.host_bytes}")
        # an empty host (an unset variable in a unit file) bound every interface, metrics port included
        if not isinstance(self.host, str) or not self.host.strip():
            raise ValueError(f"host: expected a host name or address to listen on, got {self.host!r}")
        for name in ("tls_cert", "tls_key", "tokens_file", "token"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name}: expected a {'token' if name == 'token' else 'file path'}, got {value!r}")
        if not isinstance(self.data_dir, str) or not self.data_dir:
            raise ValueError(f"data_dir: expected a folder, got {self.data_dir!r}")
        check_folder("data_dir", self.data_dir, writable=True)
        if self.max_frame_bytes < MAX_HELLO_BYTES:
            raise ValueError(f"max_frame_bytes: expected at least {MAX_HELLO_BYTES} (a HELLO must fit), got "
                             f"{self.max_frame_bytes}")
        if self.max_frame_bytes > self.max_inflight_bytes:
            raise ValueError(f"max_frame_bytes: expected <= max_inflight_bytes ({self.max_inflight_bytes}), "
                             f"got {self.max_frame_bytes}")
        for name in ("preallocate", "disk_sync", "durable", "allow_unauthenticated", "metrics_namespaces"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        if self.loop not in LOOPS:
            raise ValueError(f"loop: expected one of {list(LOOPS)}, got {self.loop!r}")
        if self.tokens_file is not None and self.token is not None:
            raise ValueError("tokens_file, token: expected one of them (a tokens file names every tenant), got both")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert, tls_key: expected both or neither, got one")
        if self.allow_unauthenticated and not _is_loopback(self.host):
            raise ValueError(f"allow_unauthenticated: only on a loopback host (127.0.0.1, ::1, localhost), "
                             f"got host {self.host!r}")
        for name in ("shutdown_grace_seconds", "hello_timeout_seconds", "request_timeout_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_WAIT_SECONDS:
                raise ValueError(f"{name}: expected a number > 0 and <= {MAX_WAIT_SECONDS:.0f} (seconds), "
                                 f"got {value!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "server config") -> "ServerConfig":
        """Build from a mapping; an unknown key is a ``ValueError`` naming it and ``source``."""
        return settings_from_dict(cls, values, source)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None,
             **overrides: Any) -> "ServerConfig":
        """File settings (``path`` or ``$KVSTORE_SERVER_CONFIG``; a ``[server]`` table or the top level),
        overridden by ``KVSTORE_SERVER_*`` variables, overridden by ``overrides`` (the flags given)."""
        environ = os.environ if environ is None else environ
        path = path if path is not None else environ.get(ENV_PREFIX + "CONFIG")
        store_fields = {field.name for field in dataclasses.fields(StoreConfig)}
        values = dict(read_settings_file(path, "server", store_fields)) if path else {}
        values.update(env_values(cls, environ, ENV_PREFIX, frozenset({ENV_PREFIX + "CONFIG"})))
        values.update(overrides)  # flags given (a None is "none" given: e.g. --metrics-port none turns metrics off)
        return settings_from_dict(cls, values, f"{path or 'defaults'} + KVSTORE_SERVER_* + flags")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
