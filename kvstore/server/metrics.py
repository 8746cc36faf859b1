"""The server's Prometheus metrics and its HTTP endpoint (``/metrics``, ``/healthz``).

Each server has its own ``CollectorRegistry`` (no process-global state).
Per-namespace and per-tier figures are read from the ``BlobStore`` at
scrape time by a collector, so nothing is counted twice; the endpoint
needs no token, so namespaces (tenants' names and traffic) are shown only
when the operator turns them on (``metrics_namespaces``), else summed; latency
histograms per operation, connections and errors are kept here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvstore.server.blobs import BlobStore

# Seconds: from 50 us (a PING on loopback) to 10 s (a large GET from disk under load).
LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# The HTTP endpoint needs no token: what one client may hold there is bounded. Connections past this many at once
# get a 503 and are closed at once; a request must arrive whole within the read timeout and be taken within the
# write timeout (a scraper sends its few hundred bytes at once). Idle sockets held 5 s each, without a cap.
MAX_HTTP_CONNECTIONS = 16
HTTP_READ_TIMEOUT_SECONDS = 2.0
HTTP_WRITE_TIMEOUT_SECONDS = 10.0
_HTTP_REQUEST_LIMIT = 16 << 10  # bytes of request line and headers


# Per-namespace families: (name, kind, help, the second label or None, [(its value, namespace_stats key)]).
_NAMESPACE_FAMILIES = (
    ("kvstore_server_hits", CounterMetricFamily, "Blocks found, by tier", "tier",
     (("host", "hits_ram"), ("lmdb", "hits_disk"))),
    ("kvstore_server_misses", CounterMetricFamily, "Blocks asked for and not found", None, ((None, "misses"),)),
    ("kvstore_server_bytes_in", CounterMetricFamily, "Block bytes stored, by tier", "tier",
     (("host", "bytes_in"), ("lmdb", "bytes_written_disk"))),
    ("kvstore_server_bytes_out", CounterMetricFamily, "Block bytes served, by tier", "tier",
     (("host", "bytes_out_ram"), ("lmdb", "bytes_out_disk"))),
    ("kvstore_server_put_blocks", CounterMetricFamily, "Blocks offered by PUT, by outcome", "outcome",
     tuple((o, o) for o in ("stored", "present", "rejected", "invalid"))),
    ("kvstore_server_evictions", CounterMetricFamily, "Blocks evicted, by reason", "reason",
     (("quota", "evicted_quota"), ("capacity", "evicted_capacity"), ("corrupt", "corrupt"))),
    ("kvstore_server_namespace_bytes", GaugeMetricFamily, "Bytes held (per namespace when they are shown)", None,
     ((None, "used_bytes"),)),
)


class _StoreCollector(Collector):
    """The store's figures at scrape time; per namespace (a ``namespace`` label naming each tenant) only when
    ``per_namespace``, otherwise summed over the namespaces so that no tenant's name or traffic shows."""

    def __init__(self, store: BlobStore, per_namespace: bool):
        self._store = store
        self._per_namespace = per_namespace

    def collect(self) -> Iterator:
        stats = {ns: self._store.namespace_stats(ns) for ns in self._store.namespaces()}
        for name, kind, doc, second, items in _NAMESPACE_FAMILIES:
            labels = (["namespace"] if self._per_namespace else []) + ([second] if second else [])
            sums: dict[tuple[str, ...], float] = {}
            for ns, s in stats.items():
                for value, key in items:
                    row = ((ns,) if self._per_namespace else ()) + ((value,) if second else ())
                    sums[row] = sums.get(row, 0) + s[key]
            family = kind(name, doc, labels=labels)
            for row, total in sums.items():
                family.add_metric(list(row), total)
            yield family
        totals = self._store.totals()
        tier_bytes = GaugeMetricFamily("kvstore_server_tier_bytes", "Bytes held per tier", labels=["tier"])
        tier_bytes.add_metric(["host"], totals["ram_bytes"])
        tier_bytes.add_metric(["lmdb"], totals["disk_used_bytes"])
        capacity = GaugeMetricFamily("kvstore_server_tier_capacity_bytes", "Byte capacity per tier", labels=["tier"])
        capacity.add_metric(["host"], totals["ram_capacity_bytes"])
        capacity.add_metric(["lmdb"], totals["disk_capacity_bytes"])
        ram_evictions = CounterMetricFamily("kvstore_server_ram_evictions", "RAM copies dropped (kept on disk)")
        ram_evictions.add_metric([], totals["ram_evictions"])
        backlog = GaugeMetricFamily("kvstore_server_write_backlog_bytes", "Bytes queued for the disk")
        backlog.add_metric([], totals["write_backlog_bytes"])
        failing = GaugeMetricFamily("kvstore_server_disk_failing",
                                    "1 while the disk refuses commits (full, I/O errors, read-only): puts refused")
        failing.add_metric([], totals["disk_failing"])
        write_errors = CounterMetricFamily("kvstore_server_disk_write_errors", "Disk commits that failed")
        write_errors.add_metric([], totals["disk_write_errors"])
        refused = CounterMetricFamily("kvstore_server_disk_refused_blocks", "Blocks refused while the disk failed")
        refused.add_metric([], totals["disk_refused_blocks"])
        arena = GaugeMetricFamily("kvstore_server_arena_bytes", "The preallocated receive arena, in bytes: its "
                                  "capacity, faulted in so far, taken by blobs, free", labels=["state"])
        for state in ("capacity", "faulted", "taken", "free"):
            arena.add_metric([state], totals[f"arena_{state}"])
        arena_misses = CounterMetricFamily("kvstore_server_arena_misses",
                                           "Blobs received into new memory: no faulted arena extent was free")
        arena_misses.add_metric([], totals["arena_misses"])
        yield from (tier_bytes, capacity, ram_evictions, backlog, failing, write_errors, refused, arena, arena_misses)


class ServerMetrics:
    """The metrics of one server; ``render()`` is the Prometheus text exposition."""

    def __init__(self, store: BlobStore, per_namespace: bool = False):
        self.registry = CollectorRegistry()
        self.registry.register(_StoreCollector(store, per_namespace))
        self.latency = Histogram("kvstore_server_request_seconds", "Request latency by operation", ["op"],
                                 registry=self.registry, buckets=LATENCY_BUCKETS)
        self.requests = Counter("kvstore_server_requests", "Requests by operation", ["op"], registry=self.registry)
        self.errors = Counter("kvstore_server_errors", "Error replies by status", ["status"], registry=self.registry)
        self.connections = Gauge("kvstore_server_connections", "Open connections", registry=self.registry)
        self.connections_total = Counter("kvstore_server_connections_accepted", "Connections accepted",
                                         registry=self.registry)
        self.auth_failures = Counter("kvstore_server_auth_failures", "HELLOs with a wrong token",
                                     registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def serve_http(host: str, port: int, metrics: ServerMetrics, healthy: Callable[[], bool]) -> asyncio.Server:
    """A minimal HTTP/1.0 endpoint: ``GET /metrics`` and ``GET /healthz`` (503 while shutting down); at most
    ``MAX_HTTP_CONNECTIONS`` at once (the next get a 503 ``busy`` and are closed)."""
    active = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if active[0] >= MAX_HTTP_CONNECTIONS:
            writer.write(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 5\r\nConnection: close\r\n\r\nbusy\n")
            writer.close()  # sends what fits in the socket's buffer (all of it), never waits for the peer
            return
        active[0] += 1
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HTTP_READ_TIMEOUT_SECONDS)
            method, _, rest = request.partition(b" ")
            path = rest.partition(b" ")[0].partition(b"?")[0]
            if method != b"GET":
                status, body, kind = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif path == b"/metrics":
                status, body, kind = "200 OK", metrics.render(), "text/plain; version=0.0.4; charset=utf-8"
            elif path == b"/healthz":
                status, body = ("200 OK", b"ok\n") if healthy() else ("503 Service Unavailable", b"stopping\n")
                kind = "text/plain"
            else:
                status, body, kind = "404 Not Found", b"try /metrics or /healthz\n", "text/plain"
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            await asyncio.wait_for(writer.drain(), HTTP_WRITE_TIMEOUT_SECONDS)  # a peer that never reads
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, OSError, ValueError):
            pass  # ValueError: readuntil past the limit
        finally:
            active[0] -= 1
            if writer.transport.get_write_buffer_size():  # unsent (a peer that does not read): do not wait
                writer.transport.abort()
            else:
                writer.close()

    return await asyncio.start_server(handle, host, port, limit=_HTTP_REQUEST_LIMIT)
