"""Prometheus metrics: the per-RPC metrics every service shares, and the /metrics endpoint.

Each server process owns one `CollectorRegistry`; services register their own metrics on it
(`metrics.registry`) so that several servers can live in one test process.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from wsgiref.simple_server import WSGIServer

from google.protobuf import descriptor_pool
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from tunefleet.runtime.interceptors import AroundInterceptor, RpcCall, final_code

# The codes whose series exist from a server's start: success, and the server's own failures.
WATCHED_CODES = ("OK", "INTERNAL", "UNKNOWN", "DATA_LOSS")
# Upper bounds in seconds: from sub-millisecond metadata reads up to minute-long uploads.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)


class ServerMetrics:
    """The RPC metrics of one server process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.requests = Counter(
            "tunefleet_grpc_server_requests",
            "gRPC calls finished, by service, method and status code.",
            ["grpc_service", "grpc_method", "grpc_code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tunefleet_grpc_server_request_duration_seconds",
            "Time from the start of a gRPC call to its end (whole stream for streaming calls).",
            ["grpc_service", "grpc_method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "tunefleet_grpc_server_in_flight_requests",
            "gRPC calls in progress.",
            ["grpc_service", "grpc_method"],
            registry=self.registry,
        )

    def serving(self, services: Sequence[str]) -> None:
        """The request counts of every method of `services` (full names) at zero, for the codes
        alerts and the dashboard read: the first INTERNAL after a start is an increase
        (TunefleetServerErrors), not a series that appears at 1."""
        pool = descriptor_pool.Default()
        for service in services:
            try:
                methods = pool.FindServiceByName(service).methods
            except KeyError:  # a service without a descriptor (generic handlers): its first call
                continue
            for method in methods:
                for code in WATCHED_CODES:
                    self.requests.labels(service, method.name, code)


class MetricsInterceptor(AroundInterceptor):
    """Counts calls by code, times them and tracks how many are in flight."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    @asynccontextmanager
    async def around(self, call: RpcCall) -> AsyncIterator[None]:
        labels = (call.service, call.method)
        in_flight = self.metrics.in_flight.labels(*labels)
        in_flight.inc()
        start = time.perf_counter()
        failure: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            failure = exc
            raise
        finally:
            in_flight.dec()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)
            code = final_code(call, failure)
            self.metrics.requests.labels(*labels, code.name).inc()


def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> WSGIServer:
    """Serve `registry` at http://host:port/metrics in a background thread. Port 0 picks a free
    port (read it from `server.server_port`); call `shutdown()` to stop."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
