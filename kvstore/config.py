"""StoreConfig: every setting of a KVStore, from code, a TOML/YAML file or KVSTORE_* variables."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit
from typing import Any

import torch
import yaml

from kvstore.compression.registry import get_codec
from kvstore.keys import HASHES
from kvstore.sizes import parse_size

WRITE_POLICIES = ("write_through", "write_back")
QUEUE_FULL_POLICIES = ("block", "drop")
PREFETCH_POLICIES = ("best_effort", "wait", "timeout")
REMOTE_SCHEMES = ("kvstore", "kvstores")
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
ENV_PREFIX = "KVSTORE_"
# Names under the prefix that are not settings.
ENV_RESERVED = frozenset({"KVSTORE_CONFIG", "KVSTORE_MODEL_CACHE", "KVSTORE_SLOW", "KVSTORE_SHRINK", "KVSTORE_CRASH_CYCLES",
                           "KVSTORE_BENCH_PROFILE"})
# Variables under these prefixes belong to other settings (the cache server's ``ServerConfig``).
ENV_OTHER_PREFIXES = ("KVSTORE_SERVER_",)


class UnknownSetting(ValueError, TypeError):
    """A keyword a settings class does not have: a ``ValueError`` naming it, as every bad setting is (and the
    ``TypeError`` Python raises for an unknown keyword, for callers that catch that)."""


def refuse_unknown_settings(cls: type) -> type:
    """Make the dataclass ``cls`` raise ``UnknownSetting`` (naming the key and its nearest setting) for an
    unknown keyword, where its generated ``__init__`` raised a bare ``TypeError``."""
    init = cls.__init__
    names = frozenset(field.name for field in dataclasses.fields(cls))

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - names)
        if unknown:
            near = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise UnknownSetting(f"{unknown[0]}: unknown setting of {cls.__name__}{hint}; expected some of "
                                 f"{sorted(names)}, got {unknown}")
        init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


@refuse_unknown_settings
@dataclass(frozen=True)
class StoreConfig:
    """Settings of one KVStore. Sizes are bytes (int) or strings such as ``"4GiB"``.

    Tiers, fastest first (a size of 0 or a directory of None leaves one out):

    - ``device_bytes`` / ``device``: a slot pool in HBM on a torch device
      (``"cuda"``, ``"cuda:1"``; ``"cpu"`` runs the same code without a GPU).
    - ``host_bytes``: host-RAM pool, allocated once at start (pinned with CUDA).
    - ``disk_dir`` / ``disk_bytes`` / ``disk_sync``: the LMDB tier on local NVMe.
    - ``files_dir`` / ``files_bytes`` / ``files_sync`` / ``files_o_direct``:
      one file per block on shared storage, safe for many processes at once;
      ``files_io_threads`` files of a batch are written, or read, at once.

    Placement (see ``kvstore/placement.py``):

    - ``write_policy``: how lower tiers receive blocks by default.
      ``write_through``: every put is queued for them at once (written in the
      background); ``write_back``: a tier gets a block when the tier above
      evicts it (and, for the persistent tiers, on close).
      ``host_write_policy`` (used when a device tier sits above host RAM),
      ``disk_write_policy`` and ``files_write_policy`` override it per tier.
    - ``disk_admit_after`` / ``files_admit_after``: sightings (puts and read
      hits) a block needs before it is written to that tier (1 = at once).
    - ``write_queue_blocks``: bound of each lower tier's background write
      queue (queued blocks stay pinned in the fastest tier, and so do a
      worker's batch taken out of it, so the bound is also capped at a
      quarter of its slots shared among the lower tiers: 16 host slots and
      one lower tier queue at most 4 blocks);
      ``queue_full``: ``block`` the caller or ``drop`` the lower copy.
    - ``promote``: copy a block found in a lower tier up into the faster ones.
    - ``slow_factor`` / ``degraded_seconds``: a tier that errors, or whose
      reads stay ``slow_factor`` times slower than its baseline (5 of the
      last 8 reads against the median of the last 64; see
      ``kvstore/health.py``), is bypassed for ``degraded_seconds``, then
      tried again.

    Compression (``kvstore/compression``; a codec spec such as ``"zstd"``,
    ``"kivi4"``, ``"rq3:zstd=3"``):

    - ``disk_codec`` / ``files_codec``: how blocks are stored in that tier;
      encoded on the way down (in the background writer), decoded on the way
      up, and capacities count encoded bytes. Default ``raw`` (exact);
      ``zstd`` is lossless; ``ec4``, ``ec5``, ``int8``, ``kivi4``, ``kivi2``,
      ``rq4``, ``rq3`` and ``rq2`` are lossy and only used when asked for
      (``ec4``: 4.1x at +0.4 % perplexity on SmolLM2; see the README).
    - ``host_codec``: ``raw`` only: host and device slots hold whole blocks
      the engine copies from directly.

    Engine hooks (``kvstore/prefetch.py``, ``kvstore/layerwise.py``, ``kvstore/planner.py``):

    - ``prefetch_policy``: how long ``PrefetchHandle.result()`` (and a
      ``load`` given the handle) waits: ``best_effort`` (what is ready),
      ``wait`` (everything) or ``timeout`` (at most
      ``prefetch_timeout_base_seconds`` + ``prefetch_timeout_per_1k_tokens_seconds``
      per 1,000 tokens of the request).
    - ``prefetch_workers``: threads bringing blocks up; ``prefetch_queue_blocks``:
      fetches that may wait for them (beyond that a prefetch is cut short and counted).
    - ``load_lookahead_layers``: layers a layer-wise load copies ahead of the engine.
    - ``staging_bytes``: host RAM kept idle between requests for layer-wise
      staging buffers, so a request reuses one instead of faulting in fresh
      pages (0: none kept).
    - ``prefill_tokens_per_second``: the engine's prefill throughput, for the
      load-vs-recompute planner; 0 learns it from ``KVStore.record_prefill``.

    Shared tiers, below the local ones (``tiers/remote.py``, ``tiers/redis.py``):

    - ``remote_url``: a ``kvstore serve`` cache server, ``kvstore://host:port``
      (``kvstores://`` for TLS, verified against ``remote_tls_ca_file`` or the
      system's CAs); ``remote_token`` or ``remote_token_file``: its shared
      secret; ``remote_timeout_seconds``: the longest one call may wait (plus
      its blocks' transfer at 32 MiB/s);
      ``remote_connections``: the client's connection pool.
    - ``redis_url``: ``redis://``, ``rediss://``, ``unix://`` or a cluster,
      ``redis+cluster://host:port[,host:port...]``; ``redis_namespace``:
      keeps tenants apart on a shared Redis; ``redis_ttl_seconds``: expiry
      (None: never); ``redis_timeout_seconds``: per call.
    - ``remote_codec`` / ``redis_codec``: the form blocks travel and are
      stored in (as ``disk_codec``); ``remote_write_policy`` /
      ``redis_write_policy`` and ``remote_admit_after`` / ``redis_admit_after``
      as for the disk. If a server is down or slow the store serves from its
      local tiers and counts the failures.

    ``model_id`` names the model in every key; ``hash`` is the key hash
    (``sha256`` default, ``blake2b``; ``xxh3_128`` only where every tenant is trusted).
    """

    model_id: str = "default"
    device_bytes: int | str = 0
    device: str = "cuda"
    host_bytes: int | str = "1GiB"
    disk_dir: str | None = None
    disk_bytes: int | str = "16GiB"
    disk_sync: bool = True
    files_dir: str | None = None
    files_bytes: int | str = "64GiB"
    files_sync: bool = True
    files_o_direct: bool = False
    files_io_threads: int = 4
    write_policy: str = "write_through"
    host_write_policy: str | None = None
    disk_write_policy: str | None = None
    files_write_policy: str | None = None
    disk_admit_after: int = 1
    files_admit_after: int = 1
    write_queue_blocks: int = 64
    queue_full: str = "block"
    promote: bool = True
    slow_factor: float = 10.0
    degraded_seconds: float = 30.0
    host_codec: str = "raw"
    disk_codec: str = "raw"
    files_codec: str = "raw"
    hash: str = "sha256"
    prefetch_policy: str = "best_effort"
    prefetch_timeout_base_seconds: float = 0.02
    prefetch_timeout_per_1k_tokens_seconds: float = 0.02
    prefetch_workers: int = 2
    prefetch_queue_blocks: int = 256
    load_lookahead_layers: int = 2
    staging_bytes: int | str = "256MiB"
    prefill_tokens_per_second: float = 0.0
    remote_url: str | None = None
    remote_token: str | None = None
    remote_token_file: str | None = None
    remote_tls_ca_file: str | None = None
    remote_timeout_seconds: float = 2.0
    remote_connections: int = 4
    remote_codec: str = "raw"
    remote_write_policy: str | None = None
    remote_admit_after: int = 1
    redis_url: str | None = None
    redis_namespace: str = "default"
    redis_ttl_seconds: float | None = None
    redis_timeout_seconds: float = 1.0
    redis_codec: str = "raw"
    redis_write_policy: str | None = None
    redis_admit_after: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ValueError(f"model_id: expected a non-empty string, got {self.model_id!r}")
        try:
            self.model_id.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"model_id: expected a string that is valid UTF-8, got {self.model_id!r} "
                             f"({error.reason} at position {error.start})") from None
        for name in ("device_bytes", "host_bytes", "disk_bytes", "files_bytes", "staging_bytes"):
            object.__setattr__(self, name, parse_size(getattr(self, name), name))
        for name in ("disk_dir", "files_dir", "remote_token_file", "remote_tls_ca_file"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (str, os.PathLike)) or not str(value):
                    raise ValueError(f"{name}: expected a path or None, got {value!r}")
                object.__setattr__(self, name, os.fspath(value))
        for name, schemes in (("remote_url", REMOTE_SCHEMES), ("redis_url", REDIS_SCHEMES)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or value.partition("://")[0] not in schemes
                                      or not value.partition("://")[2]):
                shown = hide_password(value) if isinstance(value, str) else value
                raise ValueError(f"{name}: expected a URL starting {[s + '://' for s in schemes]}, got {shown!r}")
            if value is not None:
                _check_address(name, value)
        if self.redis_url is not None:
            check_redis_url("redis_url", self.redis_url)
        for name in ("remote_token", "redis_namespace"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name}: expected a non-empty string, got {value!r}")
        # The redis tier refused it only when built, naming its own argument ("namespace"), not this setting.
        if isinstance(self.redis_namespace, str) and ":" in self.redis_namespace:
            raise ValueError(f"redis_namespace: expected a string without ':' (it separates the parts of a Redis "
                             f"key), got {self.redis_namespace!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device: expected a torch device name such as 'cuda:0' or 'cpu', got {self.device!r}")
        try:
            device_type = torch.device(self.device).type
        except (RuntimeError, ValueError):
            raise ValueError(f"device: expected a torch device name such as 'cuda:0' or 'cpu', got "
                             f"{self.device!r}") from None
        if device_type == "meta":
            raise ValueError("device: expected a device that holds data, got 'meta'")
        _check_choice("write_policy", self.write_policy, WRITE_POLICIES)
        for name in ("host_write_policy", "disk_write_policy", "files_write_policy", "remote_write_policy",
                     "redis_write_policy"):
            if getattr(self, name) is not None:
                _check_choice(name, getattr(self, name), WRITE_POLICIES)
        _check_choice("queue_full", self.queue_full, QUEUE_FULL_POLICIES)
        _check_choice("hash", self.hash, sorted(HASHES))
        for name in ("promote", "disk_sync", "files_sync", "files_o_direct"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        _check_choice("prefetch_policy", self.prefetch_policy, PREFETCH_POLICIES)
        for name in ("disk_admit_after", "files_admit_after", "files_io_threads", "write_queue_blocks",
                     "prefetch_workers", "prefetch_queue_blocks", "load_lookahead_layers", "remote_connections",
                     "remote_admit_after", "redis_admit_after"):
            value, most = getattr(self, name), _MOST.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (most and value > most):
                raise ValueError(f"{name}: expected an integer >= 1{f' and <= {most}' if most else ''}, got "
                                 f"{value!r:.80}")
        for name, least in (("slow_factor", 1.0), ("degraded_seconds", 0.0), ("prefetch_timeout_base_seconds", 0.0),
                            ("prefetch_timeout_per_1k_tokens_seconds", 0.0), ("prefill_tokens_per_second", 0.0),
                            ("remote_timeout_seconds", 0.001), ("redis_timeout_seconds", 0.001)):
            value = getattr(self, name)
            try:  # an int past a float's range (10**400, from a TOML or YAML file) is no number of these
                finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            except OverflowError:
                finite = False
            if not finite or not value >= least:  # inf: a tier degraded for ever, a slowness never seen
                raise ValueError(f"{name}: expected a finite number >= {least}, got {value!r:.80}")
            if name in _WAITS and not value <= MAX_WAIT_SECONDS:  # a socket or a lock cannot wait for ever
                raise ValueError(f"{name}: expected at most {MAX_WAIT_SECONDS} seconds, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.redis_ttl_seconds is not None:
            ttl = self.redis_ttl_seconds
            if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= MAX_TTL_SECONDS:
                raise ValueError(f"redis_ttl_seconds: expected a number > 0 and <= {MAX_TTL_SECONDS} or None, "
                                 f"got {ttl!r}")
            object.__setattr__(self, "redis_ttl_seconds", float(ttl))
        for name in ("host_codec", "disk_codec", "files_codec", "remote_codec", "redis_codec"):
            try:
                get_codec(getattr(self, name))
            except ValueError as exc:  # name the setting, then the codecs there are
                raise ValueError(f"{name}: {str(exc).removeprefix('codec: ')}") from None
        if get_codec(self.host_codec).name != "raw":
            raise ValueError(f"host_codec: expected 'raw' (host slots hold whole blocks; compress disk_codec or "
                             f"files_codec instead), got {self.host_codec!r}")
        no_disk = self.disk_dir is None or self.disk_bytes == 0
        no_files = self.files_dir is None or self.files_bytes == 0
        if (self.device_bytes == 0 and self.host_bytes == 0 and no_disk and no_files
                and self.remote_url is None and self.redis_url is None):
            raise ValueError("host_bytes: expected > 0 when no device_bytes, disk_dir (with disk_bytes > 0), "
                             "files_dir (with files_bytes > 0), remote_url or redis_url is set (the store needs a "
                             "tier), got 0")

    def tier_write_policy(self, tier: str) -> str:
        """The write policy of tier ``tier`` (``host``, ``lmdb``, ``files``, ``remote`` or ``redis``)."""
        override = {"host": self.host_write_policy, "lmdb": self.disk_write_policy,
                    "files": self.files_write_policy, "remote": self.remote_write_policy,
                    "redis": self.redis_write_policy}.get(tier)
        return override or self.write_policy

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> "StoreConfig":
        """Build from a mapping; an unknown key is a ``ValueError`` naming it and ``source``."""
        return settings_from_dict(cls, values, source)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "StoreConfig":
        """Load a ``.toml``, ``.yaml`` or ``.yml`` file (top level, or a ``[kvstore]`` table)."""
        from kvstore.server.config import ServerConfig  # here: the server's settings import these

        server_fields = {field.name for field in dataclasses.fields(ServerConfig)}
        return cls.from_dict(read_settings_file(path, "kvstore", server_fields), source=str(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None,
             environ: Mapping[str, str] | None = None) -> "StoreConfig":
        """File settings (``path`` or ``$KVSTORE_CONFIG``), overridden by ``KVSTORE_*`` variables."""
        environ = os.environ if environ is None else environ
        path = path if path is not None else environ.get("KVSTORE_CONFIG")
        base = dataclasses.asdict(cls.from_file(path)) if path else {}
        base.update(env_values(cls, environ, ENV_PREFIX, ENV_RESERVED, ENV_OTHER_PREFIXES))
        return cls.from_dict(base, source="KVSTORE_* environment" if not path else f"{path} + environment")

    def replace(self, **changes: Any) -> "StoreConfig":
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)


MAX_WAIT_SECONDS = 86_400.0  # a day: longer per call is a mistake, and infinity overflows a socket's timeout
MAX_TTL_SECONDS = 2**31 - 1  # what Redis's EXPIRE takes on every version
# Threads and connections are started at open: 10**6 prefetch workers was accepted, and tried.
_MOST = {"prefetch_workers": 256, "files_io_threads": 256, "remote_connections": 1024,
         "load_lookahead_layers": 4096}
_WAITS = frozenset({"remote_timeout_seconds", "redis_timeout_seconds", "prefetch_timeout_base_seconds",
                    "prefetch_timeout_per_1k_tokens_seconds", "degraded_seconds"})


def check_folder(name: str, path: str | os.PathLike[str], writable: bool = False) -> None:
    """A ``ValueError`` naming ``name`` if something that is not a folder is at ``path`` or on its way there,
    checked before anything is made (creating the folder printed only "[Errno 17] File exists", or "[Errno
    20] Not a directory" without the setting; a tier's bad setting left other tiers' files behind).
    ``writable``: also if this process may not write there (a bare "[Errno 13] Permission denied" named no
    flag); not for a tier's folder, which may be a read-only share served as it is."""
    probe = os.path.abspath(os.fspath(path))
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{name}: expected a folder (or a path to create one at), got {os.fspath(path)!r}, where "
                         f"{probe!r} is a file")
    if writable and not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: expected a folder this process may write (or create), got {os.fspath(path)!r}, "
                         f"where {probe!r} is not writable (permission denied)")


_TIER_OWNED_REDIS_OPTIONS = frozenset({"socket_timeout", "socket_connect_timeout", "retry_on_timeout",
                                       "retry_on_error"})
# Options that turn replies into text: a block's bytes then fail to decode (decode_responses: every read an
# error) or commands go out in another encoding (encoding=utf-16: every write and script refused).
_REPLY_ENCODING_REDIS_OPTIONS = frozenset({"decode_responses", "encoding", "encoding_errors"})
# The query options a TLS cluster URL takes, passed to the cluster client (a private CA, a client certificate).
REDIS_CLUSTER_SSL_OPTIONS = frozenset({"ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_password",
                                       "ssl_cert_reqs"})


HIDDEN = "<hidden>"  # in place of a secret in what is shown (errors, ``kvstore info``)
_SECRET_QUERY = re.compile(r"((?:^|&)[^=&]*password=)[^&]*")


def hide_password(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part and any ``*password=`` query value hidden:
    settings errors and ``kvstore info`` show URLs, and they reach logs and terminals."""
    base, mark, query = url.partition("?")
    scheme, sep, rest = base.partition("://")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{HIDDEN}@{hosts}"
    query = _SECRET_QUERY.sub(lambda found: found.group(1) + HIDDEN, query)
    return f"{scheme}{sep}{netloc}{slash}{path}{mark}{query}"


def check_redis_url(name: str, url: str) -> None:
    """A ``ValueError`` naming ``name`` unless ``url``'s database and query are ones the redis tier uses.

    redis-py reads ``redis://h:p/abc`` as database 0 without a word, and a
    cluster client takes no database and no query: both would quietly
    connect somewhere other than the operator wrote.
    """
    scheme = url.partition("://")[0]
    parts = urlsplit(url)
    if scheme.endswith("+cluster"):
        query = parse_qs(parts.query, keep_blank_values=True)
        allowed = REDIS_CLUSTER_SSL_OPTIONS if scheme == "rediss+cluster" else frozenset()
        if parts.path not in ("", "/", "/0") or set(query) - allowed or any(len(v) > 1 for v in query.values()):
            takes = f"no query but {', '.join(sorted(allowed))} (once each)" if allowed else "no query"
            raise ValueError(f"{name}: a Redis Cluster URL takes no database (other than 0) and {takes}, "
                             f"expected {scheme}://host:port[,host:port...], got {hide_password(url)!r}")
        return
    if scheme != "unix" and not re.fullmatch(r"/?\d*", parts.path):
        raise ValueError(f"{name}: expected a database number after the address ({scheme}://host:port/0), "
                         f"got path {parts.path!r} in {hide_password(url)!r}")
    from redis.connection import parse_url  # the client's own reading of the query, at settings time
    try:
        options = parse_url(url)
    except ValueError as error:
        raise ValueError(f"{name}: {error} (got {hide_password(url)!r})") from None
    # redis-py lets the URL's query override the tier's own options: ?socket_timeout=8 made a hung server cost
    # every call 8 s, not redis_timeout_seconds; ?socket_timeout=0 failed every call.
    owned = sorted(option for option in options if option in _TIER_OWNED_REDIS_OPTIONS)
    if owned:
        raise ValueError(f"{name}: expected a query without {', '.join(owned)} (the tier sets them: "
                         f"redis_timeout_seconds, one attempt a command), got {hide_password(url)!r}")
    text = sorted(option for option in options if option in _REPLY_ENCODING_REDIS_OPTIONS)
    if text:
        raise ValueError(f"{name}: expected a query without {', '.join(text)} (the tier reads and writes blocks "
                         f"as bytes, not text), got {hide_password(url)!r}")


def _check_address(name: str, url: str) -> None:
    """A ``ValueError`` naming ``name`` if ``url``'s host:port parts do not parse (a port out of range, not
    a number, an unclosed IPv6 bracket); the tier's client raised them later without naming the setting."""
    scheme, _, rest = url.partition("://")
    if scheme == "unix":
        return
    netloc = rest.split("/", 1)[0].rpartition("@")[2]
    hosts = netloc.split(",") if scheme.endswith("+cluster") else [netloc]
    try:
        for host in hosts:
            parts = urlsplit("//" + host.strip())
            if not parts.hostname:
                raise ValueError(f"no host in {host!r}")
            parts.port  # noqa: B018 -- parsing the port is the check
    except ValueError as error:
        raise ValueError(f"{name}: expected host:port parts that parse, got {hide_password(url)!r} ({error})") from None


def _parse_bool(name: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}: expected true/false/1/0, got {text!r}")


def settings_from_dict(cls: type, values: Mapping[str, Any], source: str) -> Any:
    """Dataclass ``cls`` built from ``values``; an unknown key is a ``ValueError`` naming it and ``source``."""
    fields = {f.name for f in dataclasses.fields(cls)}
    odd = [key for key in values if not isinstance(key, str)]
    if odd:
        raise ValueError(f"{source}: expected setting names as strings, got {odd[0]!r}")
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {unknown}; expected some of {sorted(fields)}")
    return cls(**dict(values))


_SIDE_BY_SIDE = {"kvstore": "server", "server": "kvstore"}  # StoreConfig's table and ServerConfig's, in one file


def read_settings_file(path: str | os.PathLike[str], table: str,
                       their_fields: Collection[str] | None = None) -> dict[str, Any]:
    """Settings from a ``.toml``, ``.yaml`` or ``.yml`` file: its top level, or its ``[table]`` table alone.

    ``their_fields``: the settings of the other side of ``_SIDE_BY_SIDE``,
    which top-level settings beside ``[table]`` must be (a server's ``port``
    written there was silently the store's, and ignored)."""
    path = Path(path)
    loader = _FILE_LOADERS.get(path.suffix.lower())
    if loader is None:
        raise ValueError(f"{path}: expected a file ending in {sorted(_FILE_LOADERS)}, got {path.suffix!r}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is no setting
    except OSError as exc:  # missing, a directory, unreadable: the caller's setting, named (SGLang's start-up too)
        raise ValueError(f"{path}: {exc.strerror or exc} (expected a readable TOML or YAML settings file)") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (expected TOML or YAML)") from None
    try:
        values = loader(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        kind = "TOML" if path.suffix.lower() == ".toml" else "YAML"
        raise ValueError(f"{path}: not valid {kind}: {' '.join(str(exc).split())}") from None
    if values is None:  # an empty (or all-comment) YAML file: no settings, as an empty TOML file
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(values).__name__}")
    # One file may hold the store's and the server's settings: each in its table, or one side's at the top level
    # beside the other's table.
    theirs = _SIDE_BY_SIDE.get(table)
    if isinstance(values.get(table), dict):
        others = sorted(k for k in values if k not in (table, theirs)
                        and (theirs is None or theirs in values or isinstance(values[k], dict)))
        if others:
            beside = "" if theirs is None else \
                f", beside the [{theirs}] table or beside top-level settings of the {theirs}"
            raise ValueError(f"{path}: expected the [{table}] table alone{beside}, got [{table}] beside {others}")
        strays = sorted(k for k in values if k not in (table, theirs) and their_fields is not None
                        and k not in their_fields)
        if strays:
            raise ValueError(f"{path}: top-level settings beside the [{table}] table are the {theirs}'s; "
                             f"{strays} are none of the {theirs}'s settings (expected them in [{table}])")
        return values[table]
    return {k: v for k, v in values.items() if not (k == theirs and isinstance(v, dict))}


def env_values(cls: type, environ: Mapping[str, str], prefix: str, reserved: frozenset[str] = frozenset(),
               other_prefixes: Sequence[str] = ()) -> dict[str, Any]:
    """Settings of dataclass ``cls`` from ``<prefix><FIELD>`` variables, converted to each field's type.

    A variable under ``prefix`` that names no field is an error naming it,
    unless it is ``reserved`` or starts with one of ``other_prefixes``.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    texts: dict[str, tuple[str, str]] = {}
    for var, text in environ.items():
        if not var.startswith(prefix) or var in reserved or var.startswith(tuple(other_prefixes)):
            continue
        name = var[len(prefix):].lower()
        if var[len(prefix):] != name.upper():  # KVSTORE_host_bytes beside KVSTORE_HOST_BYTES: which one won?
            raise ValueError(f"{var}: expected an upper-case setting name, {prefix}{name.upper()}")
        if name not in names:
            raise ValueError(f"{var}: unknown setting {name!r}; expected {prefix} plus one of {sorted(names)}")
        texts[name] = (var, text)
    return convert_settings(cls, texts)


def convert_settings(cls: type, texts: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
    """``{field: (source name, text)}`` converted to the types of dataclass ``cls``'s fields (env vars, flags)."""
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for name, (source, text) in texts.items():
        if "None" in types[name] and text.strip().lower() in ("", "none"):
            values[name] = None
        else:
            values[name] = _ENV_CONVERTERS.get(types[name].removesuffix(" | None"), _as_text)(source, text)
    return values


def _as_text(name: str, text: str) -> str:
    return text


_NUMBER_TEXT = {int: re.compile(r"[+-]?[0-9]+"),  # ASCII digits only: int("١٢") is 12, "1_000" is 1000
                float: re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")}


def _parse_number(kind: Callable[[str], Any]) -> Callable[[str, str], Any]:
    def convert(name: str, text: str) -> Any:
        if _NUMBER_TEXT[kind].fullmatch(text.strip()):
            return kind(text.strip())
        raise ValueError(f"{name}: expected {'an integer' if kind is int else 'a number'}, got {text!r}")
    return convert


_ENV_CONVERTERS: dict[str, Callable[[str, str], Any]] = {
    "bool": _parse_bool,
    "int": _parse_number(int),
    "float": _parse_number(float),
}


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the last one silently won; TOML refuses)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()  # the keys written here: a merged mapping's (``<<: *defaults``) may be overridden
        for key_node, _ in [pair for pair in node.value if pair[0].tag != "tag:yaml.org,2002:merge"]:
            key = self.construct_object(key_node, deep=deep)
            try:
                twice = key in seen
            except TypeError:  # a list or mapping as a key: safe_load's own error
                raise yaml.constructor.ConstructorError(None, None, "found unhashable key",
                                                        key_node.start_mark) from None
            if twice:
                raise yaml.constructor.ConstructorError(None, None, f"setting {key!r} given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)


_FILE_LOADERS: dict[str, Callable[[str], Any]] = {
    ".toml": tomllib.loads,
    ".yaml": _load_yaml,
    ".yml": _load_yaml,
}
