"""Cache-server benchmarks on loopback, each next to a raw-TCP ceiling between the same two processes.

Run: ``pytest bench/test_bench_server.py -p no:cacheprovider --benchmark-only``.
Targets (issue): GET and PUT of 32 MiB blocks at >= 0.7 of a raw TCP socket
moving the same bytes; p50/p99 of EXISTS_PREFIX on a 512-block chain and of
a 2 MiB GET under 16 concurrent clients.

One server process per variant (``bench/server_process.py``) runs a real
``CacheServer`` and, beside it, the raw endpoint: a thread per connection on
blocking sockets (TCP_NODELAY) that receives with ``recv_into`` into a
preallocated page-aligned buffer and sends with ``sendall`` of a
preallocated memoryview. This process is the client of both, so each ratio
compares the same two processes moving the same bytes in the same run.
Variants:

- ``uvloop`` / ``asyncio``: memory only (``disk_bytes = 0``), the two event loops;
- ``lmdb-sync``: the LMDB tier with ``disk_sync``; PUTs are acknowledged from
  RAM while the writer thread commits (and fsyncs) behind, GETs are RAM hits;
- ``lmdb-durable``: ``durable`` and ``disk_sync``, ``host_bytes`` = 1 byte: a
  PUT is acknowledged after its fsync'ed commit, every GET reads LMDB (page
  cache warm) and checks the block's checksum.

Groups ``put-<size>-<variant>`` and ``get-<size>-<variant>`` (2 MiB and 32 MiB
Llama-3-8B-shaped blocks): the raw ceiling, the client's
``Connection.put``/``get`` (parts sent as they are, the blob read into a
preallocated buffer) and ``RemoteTier.put_many``/``get_into`` (which adds the
client-side checksum and, for the get, the check on the way back). Each PUT
round stores a new key (the previous one is deleted, untimed), because the
server answers a repeated key PRESENT without storing it. Two more raw PUTs
receive each message into a new buffer, as the server must for a blob it
keeps: ``raw_put_fresh_bytearray`` (what the server allocates today,
``bytearray(n)``) and ``raw_put_fresh_numpy`` (``numpy.empty``: no zero
fill, huge pages). For ``lmdb-durable`` the PUT and GET ceilings also do the
disk work on the same bytes in the server's ``data_dir`` (``raw_put_fsync``:
pwrite + fsync before the reply; ``raw_get_file``: pread of a page-cache-warm
file before sending), and that variant's PUTs and GETs are paired with those.

Latency: ``exists512-<variant>``: EXISTS_PREFIX of a 512-key chain, all present
and half present, next to a raw round trip of the same request and reply bytes
(and a PING). ``get16-2MiB-<variant>``: 16 client threads, each on its own
connection, GET 2 MiB blocks; a round is a burst of ``BURST`` GETs per client,
the round's median time gives the aggregate GB/s, each GET's own time the
p50/p99.

Ratios. The machine is shared and noisy, so each subject is paired with its
ceiling: before every timed round, untimed by pytest-benchmark, the same
ceiling operation runs once and is timed here; the ratio is the median of
those ceiling times over the subject's median (throughput ratio, higher is
better; 1.0 = as fast as the raw socket). The ``*_ceiling`` tests still time
the ceiling on their own (pytest-benchmark's table, the GB/s column ``raw``,
and bench/conftest.py's unpaired ratio lines). The summary after the tables
prints GB/s, paired ratios and p50/p99; ``extra_info`` holds the same.
Set ``KVSTORE_BENCH_PROFILE=DIR`` to write a cProfile of each server's event
loop to ``DIR/<variant>.prof``.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from server_process import FRESH, FRESH_NUMPY, READ_FILE, WRITE_FSYNC, RawClient, ServerProcess

from kvstore.benchmarking import LLAMA3_8B, random_kv
from kvstore.blockformat import HEADER_BYTES as BLOCK_HEADER_BYTES
from kvstore.blockformat import BlockHeader
from kvstore.client import Connection
from kvstore.layout import KVLayout
from kvstore.protocol import HEADER_BYTES as FRAME_BYTES
from kvstore.protocol import U64, PutResult, pack_keys
from kvstore.tiers.remote import RemoteTier


LAYOUTS = {
    "2MiB": KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, block_tokens=16),
    "32MiB": LLAMA3_8B,
}
ROUNDS = {"2MiB": 40, "32MiB": 15}
VARIANTS = {
    "uvloop": {"loop": "uvloop", "host_bytes": "1GiB", "disk_bytes": 0},
    "asyncio": {"loop": "asyncio", "host_bytes": "1GiB", "disk_bytes": 0},
    "lmdb-sync": {"loop": "auto", "host_bytes": "1GiB", "disk_bytes": "2GiB", "disk_sync": True},
    "lmdb-durable": {"loop": "auto", "host_bytes": 1, "disk_bytes": "2GiB", "disk_sync": True, "durable": True},
}
# The raw-endpoint flags of the ceiling each variant's PUTs and GETs are paired with: the durable variant's
# PUT waits for its fsync'ed commit and its GET reads LMDB, so its ceiling does the same disk work.
CEILING_FLAGS = {"lmdb-durable": (WRITE_FSYNC, READ_FILE)}
KEY_BYTES = 32
CHAIN = 512
LATENCY_ROUNDS = 1000
CLIENTS = 16
BURST = 8
BURST_ROUNDS = 6

# (variant, row) -> column -> figures, for the summary.
_RESULTS: dict[tuple[str, str], dict[str, dict[str, float]]] = {}


# -- the server process ------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(VARIANTS))
def server(request, tmp_path_factory):
    variant = request.param
    settings = dict(VARIANTS[variant], data_dir=str(tmp_path_factory.mktemp(f"server-{variant}")))
    if settings["loop"] == "uvloop":
        pytest.importorskip("uvloop", reason="uvloop is not installed (pip install uvloop)")
    profile_dir = os.environ.get("KVSTORE_BENCH_PROFILE")
    profile = str(Path(profile_dir) / f"{variant}.prof") if profile_dir else None
    started = ServerProcess(variant, settings, profile)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def raw(server):
    client = RawClient(server.raw_port, 40 << 20)
    yield client
    client.close()


@pytest.fixture(scope="module")
def conn(server):
    made = Connection(server.url, server.token, 60.0)
    yield made
    made.close()


# -- blocks --------------------------------------------------------------------------------

_KV: dict[str, torch.Tensor] = {}


def _kv(size: str) -> torch.Tensor:
    if size not in _KV:
        _KV[size] = random_kv(LAYOUTS[size], LAYOUTS[size].block_tokens)
    return _KV[size]


@pytest.fixture(params=list(LAYOUTS))
def size(request):
    return request.param


@pytest.fixture
def kv(size) -> torch.Tensor:
    return _kv(size)


@pytest.fixture
def tier(server, size):
    made = RemoteTier(server.url, LAYOUTS[size], server.token, timeout_seconds=60.0, connections=1)
    yield made
    made.close()


def _payload(kv: torch.Tensor) -> memoryview:
    return memoryview(kv.view(-1).view(torch.uint8).numpy()).cast("B")


def _key(*parts: object) -> bytes:
    return "-".join(str(p) for p in parts).encode().ljust(KEY_BYTES, b".")[:KEY_BYTES]


def _put_bytes(size: str) -> int:
    """Bytes a one-block PUT request moves: frame header, item header, block header, payload."""
    return FRAME_BYTES + 1 + KEY_BYTES + U64.size + BLOCK_HEADER_BYTES + LAYOUTS[size].block_bytes


def _get_bytes(size: str) -> int:
    """Bytes a one-block GET reply moves: frame header, size table, block header, payload."""
    return FRAME_BYTES + U64.size + BLOCK_HEADER_BYTES + LAYOUTS[size].block_bytes


GET_REQUEST_BYTES = FRAME_BYTES + 1 + KEY_BYTES


# -- timing and recording ----------------------------------------------------------------------


class Paired:
    """A pedantic ``setup`` that first times one run of the ceiling's ``operation`` (untimed by pytest-benchmark).

    ``times`` are those runs after the warm-up rounds; ``setup`` (optional) then makes the round's arguments.
    """

    def __init__(self, operation, setup=None, warmup: int = 1):
        self._operation, self._setup, self._skip = operation, setup, warmup
        self.times: list[float] = []

    def __call__(self):
        start = time.perf_counter()
        self._operation()
        elapsed = time.perf_counter() - start
        if self._skip:
            self._skip -= 1
        else:
            self.times.append(elapsed)
        return self._setup() if self._setup is not None else ((), {})


def _run(benchmark, group: str, fn, rounds: int, setup=None, warmup: int = 1, ceiling=None) -> Paired | None:
    """Time ``fn`` for ``rounds`` rounds; with ``ceiling``, pair each round with one untimed-here ceiling run."""
    benchmark.group = group
    paired = Paired(ceiling, setup, warmup) if ceiling is not None else None
    benchmark.pedantic(fn, setup=paired if paired is not None else setup, rounds=rounds, warmup_rounds=warmup)
    return paired


def _percentile(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _record(benchmark, variant: str, row: str, column: str, nbytes: int | None = None,
            paired: Paired | None = None, latencies: list[float] | None = None,
            ceiling_latencies: list[float] | None = None) -> None:
    """GB/s, the paired ratio and p50/p99 into ``extra_info`` and the summary (nothing with benchmarks disabled)."""
    if getattr(benchmark, "stats", None) is None:
        return
    stats = benchmark.stats.stats
    times = latencies if latencies is not None else stats.data
    cell = {"median_ms": 1e3 * stats.median, "p50_ms": 1e3 * _percentile(times, 0.50),
            "p99_ms": 1e3 * _percentile(times, 0.99)}
    if nbytes is not None:
        cell["GB/s"] = nbytes / stats.median / 1e9
    if paired is not None and paired.times:
        ceiling = statistics.median(paired.times)
        cell["ratio"] = ceiling / stats.median
        if nbytes is not None:
            cell["ceiling_GB/s"] = nbytes / ceiling / 1e9
        ceiling_times = ceiling_latencies if ceiling_latencies is not None else paired.times
        cell["ceiling_p50_ms"] = 1e3 * _percentile(ceiling_times, 0.50)
        cell["ceiling_p99_ms"] = 1e3 * _percentile(ceiling_times, 0.99)
    for name, value in cell.items():
        benchmark.extra_info[name] = round(value, 4)
    _RESULTS.setdefault((variant, row), {})[column] = cell


# -- PUT -----------------------------------------------------------------------------------


def _raw_put(raw: RawClient, size: str, flags: int = 0):
    return lambda: raw.exchange(_put_bytes(size), 1, flags)


def _put_ceiling(server: ServerProcess, raw: RawClient, size: str):
    """What a PUT of ``server`` is paired with: the raw PUT (durable: with pwrite+fsync)."""
    return _raw_put(raw, size, CEILING_FLAGS.get(server.variant, (0, 0))[0])


def test_raw_put_ceiling(benchmark, server, raw, size):
    _run(benchmark, f"put-{size}-{server.variant}", _raw_put(raw, size), ROUNDS[size])
    _record(benchmark, server.variant, size, "raw PUT", _put_bytes(size))


def test_raw_put_fsync(benchmark, server, raw, size):
    """Durable variant only: the raw PUT that also writes the bytes over a file's start and fsyncs it."""
    if server.variant not in CEILING_FLAGS:
        pytest.skip("only for the durable variant")
    paired = _run(benchmark, f"put-{size}-{server.variant}", _put_ceiling(server, raw, size), ROUNDS[size],
                  ceiling=_raw_put(raw, size))
    _record(benchmark, server.variant, size, "raw+fsync", _put_bytes(size), paired)


def test_raw_put_fresh_bytearray(benchmark, server, raw, size):
    paired = _run(benchmark, f"put-{size}-{server.variant}", _raw_put(raw, size, FRESH), ROUNDS[size],
                  ceiling=_raw_put(raw, size))
    _record(benchmark, server.variant, size, "fresh bytearray", _put_bytes(size), paired)


def test_raw_put_fresh_numpy(benchmark, server, raw, size):
    paired = _run(benchmark, f"put-{size}-{server.variant}", _raw_put(raw, size, FRESH_NUMPY), ROUNDS[size],
                  ceiling=_raw_put(raw, size))
    _record(benchmark, server.variant, size, "fresh numpy", _put_bytes(size), paired)


class FreshKeys:
    """Setup of a PUT round: delete the previous round's key (untimed), hand out a new key (and its parts)."""

    def __init__(self, prefix: str, delete, make_args):
        self._prefix, self._delete, self._make_args, self._n, self._last = prefix, delete, make_args, 0, None

    def __call__(self):
        if self._last is not None:
            self._delete(self._last)
        self._n += 1
        self._last = _key(self._prefix, self._n)
        return self._make_args(self._last), {}


def test_conn_put(benchmark, server, raw, conn, kv, size):
    payload = _payload(kv)
    fingerprint = LAYOUTS[size].fingerprint
    results = []

    def make_args(key):  # the integrity header is the caller's (untimed); RemoteTier's put times its own
        return ([(key, [BlockHeader.for_payload(key, fingerprint, payload).pack(), payload])],)

    fresh = FreshKeys(f"conn-put-{size}", lambda key: conn.delete([key]), make_args)
    paired = _run(benchmark, f"put-{size}-{server.variant}", lambda items: results.extend(conn.put(items)),
                  ROUNDS[size], setup=fresh, ceiling=_put_ceiling(server, raw, size))
    _record(benchmark, server.variant, size, "conn PUT", _put_bytes(size), paired)
    assert set(results) == {PutResult.STORED}


def test_tier_put_many(benchmark, server, raw, tier, kv, size):
    fresh = FreshKeys(f"tier-put-{size}", tier.delete, lambda key: (key,))
    paired = _run(benchmark, f"put-{size}-{server.variant}", lambda key: tier.put_many([(key, kv)]), ROUNDS[size],
                  setup=fresh, ceiling=_put_ceiling(server, raw, size))
    _record(benchmark, server.variant, size, "tier PUT", _put_bytes(size), paired)
    stats = tier.stats()
    assert stats["errors"] == 0 and stats["rejected"] == 0 and stats["blocks_written"] >= 1


# -- GET -----------------------------------------------------------------------------------


def _raw_get(raw: RawClient | None, size: str, flags: int = 0):
    """One raw GET of ``size`` on ``raw`` (None: on the client the returned function is given)."""
    if raw is None:
        return lambda client: client.exchange(GET_REQUEST_BYTES, _get_bytes(size), flags)
    return lambda: raw.exchange(GET_REQUEST_BYTES, _get_bytes(size), flags)


def _get_ceiling(server: ServerProcess, raw: RawClient | None, size: str):
    """What a GET of ``server`` is paired with: the raw GET (durable: reading the bytes from a file first)."""
    return _raw_get(raw, size, CEILING_FLAGS.get(server.variant, (0, 0))[1])


def test_raw_get_ceiling(benchmark, server, raw, size):
    _run(benchmark, f"get-{size}-{server.variant}", _raw_get(raw, size), ROUNDS[size])
    _record(benchmark, server.variant, size, "raw GET", _get_bytes(size))


def test_raw_get_file(benchmark, server, raw, size):
    """Durable variant only: the raw GET that first reads the bytes from a page-cache-warm file."""
    if server.variant not in CEILING_FLAGS:
        pytest.skip("only for the durable variant")
    paired = _run(benchmark, f"get-{size}-{server.variant}", _get_ceiling(server, raw, size), ROUNDS[size],
                  ceiling=_raw_get(raw, size))
    _record(benchmark, server.variant, size, "raw+pread", _get_bytes(size), paired)


def test_conn_get(benchmark, server, raw, conn, kv, size):
    payload = _payload(kv)
    key = _key("conn-get", size)
    header = BlockHeader.for_payload(key, LAYOUTS[size].fingerprint, payload).pack()
    assert conn.put([(key, [header, payload])])[0] in (PutResult.STORED, PutResult.PRESENT)
    head = memoryview(bytearray(BLOCK_HEADER_BYTES))
    out = torch.empty_like(kv)
    out.zero_()  # resident, as an engine's buffer is
    body = _payload(out)
    sizes = []
    paired = _run(benchmark, f"get-{size}-{server.variant}", lambda: sizes.extend(conn.get([key], lambda i, n: [head, body])),
                  ROUNDS[size], ceiling=_get_ceiling(server, raw, size))
    _record(benchmark, server.variant, size, "conn GET", _get_bytes(size), paired)
    assert set(sizes) == {BLOCK_HEADER_BYTES + len(payload)}
    assert bytes(head) == header and torch.equal(out, kv)


def test_tier_get_into(benchmark, server, raw, tier, kv, size):
    key = _key("tier-get", size)
    assert tier.put_many([(key, kv)]) == 1
    out = torch.empty_like(kv)
    out.zero_()
    hits = []
    paired = _run(benchmark, f"get-{size}-{server.variant}", lambda: hits.append(tier.get_into(key, out)),
                  ROUNDS[size], ceiling=_get_ceiling(server, raw, size))
    _record(benchmark, server.variant, size, "tier GET", _get_bytes(size), paired)
    assert all(hits) and torch.equal(out, kv)


# -- EXISTS_PREFIX latency -----------------------------------------------------------------


@pytest.fixture(scope="module")
def chain(server, conn):
    """512 chained keys, all stored (tiny blobs), and the same chain with its second half missing."""
    keys = [_key("chain", i) for i in range(CHAIN)]
    payload = os.urandom(64)
    fingerprint = LLAMA3_8B.fingerprint
    items = [(key, [BlockHeader.for_payload(key, fingerprint, payload).pack(), payload]) for key in keys]
    assert set(conn.put(items)) <= {PutResult.STORED, PutResult.PRESENT}
    half = keys[:CHAIN // 2] + [_key("absent", i) for i in range(CHAIN // 2)]
    return keys, half


def _raw_exists(raw: RawClient, keys: list[bytes]):
    """The same request bytes in, a reply header out."""
    request = FRAME_BYTES + len(pack_keys(keys))
    return lambda: raw.exchange(request, FRAME_BYTES)


def test_raw_exists_ceiling(benchmark, server, raw, chain):
    _run(benchmark, f"exists512-{server.variant}", _raw_exists(raw, chain[0]), LATENCY_ROUNDS, warmup=20)
    _record(benchmark, server.variant, "exists512", "raw RTT")


def test_ping(benchmark, server, raw, conn):
    paired = _run(benchmark, f"exists512-{server.variant}", conn.ping, LATENCY_ROUNDS, warmup=20,
                  ceiling=lambda: raw.exchange(FRAME_BYTES, FRAME_BYTES))
    _record(benchmark, server.variant, "exists512", "PING", paired=paired)


def test_exists_prefix_all(benchmark, server, raw, conn, chain):
    found = []
    paired = _run(benchmark, f"exists512-{server.variant}", lambda: found.append(conn.exists_prefix(chain[0])),
                  LATENCY_ROUNDS, warmup=20, ceiling=_raw_exists(raw, chain[0]))
    _record(benchmark, server.variant, "exists512", "all present", paired=paired)
    assert set(found) == {CHAIN}


def test_exists_prefix_half(benchmark, server, raw, conn, chain):
    found = []
    paired = _run(benchmark, f"exists512-{server.variant}", lambda: found.append(conn.exists_prefix(chain[1])),
                  LATENCY_ROUNDS, warmup=20, ceiling=_raw_exists(raw, chain[1]))
    _record(benchmark, server.variant, "exists512", "half present", paired=paired)
    assert set(found) == {CHAIN // 2}


# -- 2 MiB GET under 16 concurrent clients ---------------------------------------------------


class Burst:
    """``CLIENTS`` threads, each with its own client; a call runs ``BURST`` ``get(client)`` per thread.

    Each get's time is kept (``latencies``; the warm-up round's are dropped); the call's is the round's.
    """

    def __init__(self, pool: ThreadPoolExecutor, clients: list, get):
        self._pool, self._clients, self._get = pool, clients, get
        self._rounds: list[list[float]] = []

    def _one(self, client) -> list[float]:
        times = []
        for _ in range(BURST):
            start = time.perf_counter()
            self._get(client)
            times.append(time.perf_counter() - start)
        return times

    def __call__(self) -> None:
        times = []
        for part in self._pool.map(self._one, self._clients):
            times += part
        self._rounds.append(times)

    @property
    def latencies(self) -> list[float]:
        return [t for times in self._rounds[1:] for t in times]


@pytest.fixture(scope="module")
def raw16(server):
    """A thread pool of ``CLIENTS`` and a ``Burst`` factory for ``CLIENTS`` raw 2 MiB GET clients."""
    clients = [RawClient(server.raw_port, _get_bytes("2MiB")) for _ in range(CLIENTS)]
    pool = ThreadPoolExecutor(CLIENTS, thread_name_prefix="bench-client")
    get = _get_ceiling(server, None, "2MiB")
    yield pool, lambda: Burst(pool, clients, get)
    pool.shutdown()
    for client in clients:
        client.close()


def test_raw_get16_ceiling(benchmark, server, raw16):
    burst = raw16[1]()
    _run(benchmark, f"get16-2MiB-{server.variant}", burst, BURST_ROUNDS)
    _record(benchmark, server.variant, "get16-2MiB", "raw", CLIENTS * BURST * _get_bytes("2MiB"),
            latencies=burst.latencies)


def test_conn_get16(benchmark, server, raw16):
    pool, _ = raw16
    layout = LAYOUTS["2MiB"]
    payload = _payload(_kv("2MiB"))
    clients = []
    for i in range(CLIENTS):
        key = _key("get16", i)
        client = Connection(server.url, server.token, 60.0)
        header = BlockHeader.for_payload(key, layout.fingerprint, payload).pack()
        assert client.put([(key, [header, payload])])[0] in (PutResult.STORED, PutResult.PRESENT)
        head = memoryview(bytearray(BLOCK_HEADER_BYTES))
        body = memoryview(bytearray(len(payload)))
        body[:] = payload  # resident
        clients.append((client, key, [head, body]))
    sizes = []

    def get(client) -> None:
        conn, key, buffers = client
        sizes.extend(conn.get([key], lambda i, n: buffers))

    ceiling = raw16[1]()
    burst = Burst(pool, clients, get)
    try:
        paired = _run(benchmark, f"get16-2MiB-{server.variant}", burst, BURST_ROUNDS, ceiling=ceiling)
        _record(benchmark, server.variant, "get16-2MiB", "kvstore", CLIENTS * BURST * _get_bytes("2MiB"), paired,
                latencies=burst.latencies, ceiling_latencies=ceiling.latencies)
    finally:
        for conn, _, _ in clients:
            conn.close()
    assert set(sizes) == {BLOCK_HEADER_BYTES + len(payload)}
    assert all(bytes(body) == bytes(payload) for _, _, (_, body) in clients)


# -- the summary ---------------------------------------------------------------------------


def _cell(cell: dict[str, float] | None, width: int = 16) -> str:
    if cell is None:
        return f"{'-':>{width}}"
    if "ratio" in cell:
        return f"{cell['GB/s']:>{width - 7}.2f} ({cell['ratio']:.2f})"
    return f"{cell['GB/s']:>{width}.2f}"


class _Summary:
    """Prints one table of every figure of this module at the end of the run."""

    def __init__(self, load_before: float):
        self.load_before = load_before

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not _RESULTS:
            return
        write = terminalreporter.write_line
        terminalreporter.section("kvstore server vs raw TCP between the same two processes")
        write(f"load average before {self.load_before:.2f}, after {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs). "
              f"GB/s of medians; (ratio) = paired ceiling median / median: 1.00 = as fast as its ceiling")
        write("ceilings: raw socket; lmdb-durable conn/tier: raw socket + pwrite+fsync (PUT) or + pread of a warm "
              "file (GET); raw+fsync, raw+pread, fresh *: vs the plain raw socket")
        variants = list(dict.fromkeys(v for v, _ in _RESULTS))
        for title, columns in (("PUT", ("raw PUT", "raw+fsync", "fresh bytearray", "fresh numpy", "conn PUT",
                                        "tier PUT")),
                               ("GET", ("raw GET", "raw+pread", "conn GET", "tier GET"))):
            write(f"{title:<13} {'size':<6}" + "".join(f"{c:>16}" for c in columns))
            for variant in variants:
                for size in LAYOUTS:
                    row = _RESULTS.get((variant, size))
                    if row and any(c in row for c in columns):
                        write(f"{variant:<13} {size:<6}" + "".join(_cell(row.get(c)) for c in columns))
        write(f"EXISTS_PREFIX x{CHAIN} and PING: p50 / p99 ms (paired raw round trip of the same bytes p50 / p99; "
              f"ratio of medians)")
        for variant in variants:
            row = _RESULTS.get((variant, "exists512"))
            if row:
                write(f"{variant:<13} " + ", ".join(
                    f"{name} {c['p50_ms']:.3f} / {c['p99_ms']:.3f}"
                    + (f" (raw {c['ceiling_p50_ms']:.3f} / {c['ceiling_p99_ms']:.3f}; {c['ratio']:.2f})"
                       if "ratio" in c else "") for name, c in row.items()))
        write(f"2 MiB GET, {CLIENTS} clients x {BURST} GETs a round: aggregate GB/s, per-GET p50 / p99 ms")
        for variant in variants:
            row = _RESULTS.get((variant, "get16-2MiB"))
            if row:
                write(f"{variant:<13} " + "; ".join(
                    f"{name} {c['GB/s']:.2f} GB/s p50 {c['p50_ms']:.2f} / p99 {c['p99_ms']:.2f}"
                    + (f" (paired raw {c['ceiling_GB/s']:.2f} GB/s p50 {c['ceiling_p50_ms']:.2f} / p99 "
                       f"{c['ceiling_p99_ms']:.2f}; ratio {c['ratio']:.2f})" if "ratio" in c else "")
                    for name, c in row.items()))


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    manager = request.config.pluginmanager
    if not manager.has_plugin("kvstore-server-bench-summary"):
        manager.register(_Summary(os.getloadavg()[0]), "kvstore-server-bench-summary")
    yield
