"""The server's Prometheus metrics and its HTTP endpoint (``/metrics``, ``/healthz``).

Each server has its own ``CollectorRegistry`` (no process-global state).
Per-namespace and per-tier figures are read from the ``BlobStore`` at
scrape time by a collector, so nothing is counted twice; latency
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


class _StoreCollector(Collector):
    def __init__(self, store: BlobStore):
        self._store = store

    def collect(self) -> Iterator:
        hits = CounterMetricFamily("kvstore_server_hits", "Blocks found, by tier", labels=["namespace", "tier"])
        misses = CounterMetricFamily("kvstore_server_misses", "Blocks asked for and not found", labels=["namespace"])
        bytes_in = CounterMetricFamily("kvstore_server_bytes_in", "Block bytes stored, by tier",
                                       labels=["namespace", "tier"])
        bytes_out = CounterMetricFamily("kvstore_server_bytes_out", "Block bytes served, by tier",
                                        labels=["namespace", "tier"])
        puts = CounterMetricFamily("kvstore_server_put_blocks", "Blocks offered by PUT, by outcome",
                                   labels=["namespace", "outcome"])
        evictions = CounterMetricFamily("kvstore_server_evictions", "Blocks evicted, by reason",
                                        labels=["namespace", "reason"])
        used = GaugeMetricFamily("kvstore_server_namespace_bytes", "Bytes a namespace holds", labels=["namespace"])
        for ns in self._store.namespaces():
            s = self._store.namespace_stats(ns)
            hits.add_metric([ns, "host"], s["hits_ram"])
            hits.add_metric([ns, "lmdb"], s["hits_disk"])
            misses.add_metric([ns], s["misses"])
            bytes_in.add_metric([ns, "host"], s["bytes_in"])
            bytes_in.add_metric([ns, "lmdb"], s["bytes_written_disk"])
            bytes_out.add_metric([ns, "host"], s["bytes_out_ram"])
            bytes_out.add_metric([ns, "lmdb"], s["bytes_out_disk"])
            for outcome in ("stored", "present", "rejected", "invalid"):
                puts.add_metric([ns, outcome], s[outcome])
            evictions.add_metric([ns, "quota"], s["evicted_quota"])
            evictions.add_metric([ns, "capacity"], s["evicted_capacity"])
            evictions.add_metric([ns, "corrupt"], s["corrupt"])
            used.add_metric([ns], s["used_bytes"])
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
        yield from (hits, misses, bytes_in, bytes_out, puts, evictions, used, tier_bytes, capacity, ram_evictions,
                    backlog)


class ServerMetrics:
    """The metrics of one server; ``render()`` is the Prometheus text exposition."""

    def __init__(self, store: BlobStore):
        self.registry = CollectorRegistry()
        self.registry.register(_StoreCollector(store))
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
    """A minimal HTTP/1.0 endpoint: ``GET /metrics`` and ``GET /healthz`` (503 while shutting down)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
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
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
