"""The gRPC server every tunefleet service runs in: `grpc.aio` with health, reflection, the shared
interceptors, TLS, message limits, a /metrics endpoint and graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from tunefleet.runtime.auth import AuthInterceptor, TokenStore
from tunefleet.runtime.interceptors import (
    CheckInterceptor,
    ErrorInterceptor,
    GateInterceptor,
    RequestContextInterceptor,
    UploadLimitInterceptor,
)
from tunefleet.runtime.metrics import MetricsInterceptor, ServerMetrics, start_metrics_server
from tunefleet.runtime.settings import ServerSettings

log = logging.getLogger(__name__)


# How long the services' own shutdown (closing engines, stopping schedulers) may take after the
# in-flight calls' grace: the process exits within grace + this.
ON_STOP_SECONDS = 1.5


@dataclass(frozen=True)
class ServiceRegistration:
    """One gRPC service to put on the server: its full name, how to add it, and optionally what
    to run once the server listens (given the server, whose port is then known) and before it
    stops (background work such as TrainingService's scheduler)."""

    name: str  # for example "tunefleet.v1.DatasetService"
    add_to_server: Callable[[grpc.aio.Server], None]
    on_start: Callable[[TunefleetServer], Awaitable[None]] | None = None
    # Shutdown began: end the streams that would otherwise run until the grace is over.
    on_drain: Callable[[], None] | None = None
    on_stop: Callable[[], Awaitable[None]] | None = None


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]  # grpcio is untyped
    """grpcio's health servicer, with `List` (which it leaves unimplemented)."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        statuses = {
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in self._server_status.items()
        }
        return health_pb2.HealthListResponse(statuses=statuses)


class Attached(Protocol):
    """Something served beside the gRPC services, such as the OpenAI front's HTTP server: it
    starts once the services do and stops before they do."""

    async def start(self, server: TunefleetServer) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class TunefleetServer:
    """A configured server. `start()` binds the ports; `stop()` drains and shuts down."""

    settings: ServerSettings
    services: Sequence[ServiceRegistration]
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    attached: Sequence[Attached] = ()
    port: int = 0
    metrics_port: int = 0
    health: HealthServicer = field(default_factory=HealthServicer)
    _gate: GateInterceptor = field(default_factory=GateInterceptor)
    _server: grpc.aio.Server | None = None
    _metrics_http: WSGIServer | None = None

    async def start(self) -> None:
        settings = self.settings
        names = [s.name for s in self.services]
        self.metrics.serving(names)
        self._gate = GateInterceptor(names)
        interceptors: list[grpc.aio.ServerInterceptor] = [
            RequestContextInterceptor(),
            MetricsInterceptor(self.metrics),
            ErrorInterceptor(),
            self._gate,
            UploadLimitInterceptor(settings.max_upload_bytes),
        ]
        if settings.auth.enabled:
            assert settings.auth.tokens_file is not None  # checked by the settings
            interceptors.append(AuthInterceptor(TokenStore.from_file(settings.auth.tokens_file)))
        interceptors.append(CheckInterceptor())
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        for service in self.services:
            service.add_to_server(server)
        # grpcio's health servicer starts with "" SERVING: nothing is, until every service started.
        for name in ["", *names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        _add_reflection(
            server, [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        )
        address = f"{settings.host}:{settings.port}"
        if settings.tls.enabled:
            self.port = server.add_secure_port(address, _server_credentials(settings))
        else:
            self.port = server.add_insecure_port(address)
        await server.start()
        self._server = server
        for service in self.services:
            if service.on_start is not None:
                await service.on_start(self)
            self._gate.open(service.name)
            await self.health.set(service.name, health_pb2.HealthCheckResponse.SERVING)
        for attached in self.attached:
            await attached.start(self)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        if settings.metrics_enabled:
            self._metrics_http = start_metrics_server(
                self.metrics.registry, settings.metrics_host, settings.metrics_port
            )
            self.metrics_port = self._metrics_http.server_port
        log.info(
            "serving %s on %s (%s), metrics on %s",
            ", ".join(names) or "health only",
            f"{settings.host}:{self.port}",
            "TLS" if settings.tls.enabled else "plaintext",
            f"http://{settings.metrics_host}:{self.metrics_port}/metrics"
            if self.metrics_port
            else "off",
        )

    async def stop(self, grace: float | None = None) -> None:
        """Mark every service NOT_SERVING, refuse new calls at once, give in-flight calls
        `grace` seconds (default: the settings') to finish, and only then stop the services'
        background work (engines, schedulers), within ON_STOP_SECONDS in all."""
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        for attached in self.attached:
            await attached.stop()
        for service in self.services:
            if service.on_drain is not None:
                service.on_drain()
        await self._gate.drain(self.settings.shutdown_grace_seconds if grace is None else grace)
        await self._server.stop(0)  # what is still running after the grace is cancelled
        self._server = None
        deadline = asyncio.get_running_loop().time() + ON_STOP_SECONDS
        for service in self.services:
            if service.on_stop is not None:
                left = max(deadline - asyncio.get_running_loop().time(), 0.1)
                try:
                    await asyncio.wait_for(service.on_stop(), left)
                except TimeoutError:
                    log.warning("%s did not stop within %.1fs: leaving it", service.name, left)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None

    @property
    def own_address(self) -> str:
        """The address this server's own services call it on."""
        host = self.settings.host
        return f"{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{self.port}"

    async def serve_until_signal(self, parent: int | None = None) -> None:
        """Start, run until SIGTERM or SIGINT (or, given `parent`, until that process is gone),
        then stop gracefully."""
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        watch = None if parent is None else asyncio.create_task(_orphaned(parent, stopping))
        await self.start()
        await stopping.wait()
        if watch is not None:
            watch.cancel()
        log.info("shutting down: in-flight calls get %.0fs", self.settings.shutdown_grace_seconds)
        await self.stop()
        log.info("stopped")


async def _orphaned(parent: int, stopping: asyncio.Event) -> None:
    """Set `stopping` once the process `parent` has died (this one is then re-parented)."""
    while os.getppid() == parent:  # noqa: ASYNC110 (nothing signals a parent's death portably)
        await asyncio.sleep(0.5)
    log.warning("the process that started this server (pid %d) is gone: stopping", parent)
    stopping.set()


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _add_reflection(server: grpc.aio.Server, service_names: list[str]) -> None:
    """Server reflection under both names clients use: grpcio ships only v1alpha, and v1 (which
    buf curl and newer grpcurl try first) has the same messages, so one servicer answers both."""
    servicer = reflection.aio.ReflectionServicer(
        [*service_names, reflection.SERVICE_NAME, REFLECTION_V1]
    )
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1_handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1_handler}),)
    )


def _server_credentials(settings: ServerSettings) -> grpc.ServerCredentials:
    tls = settings.tls
    assert tls.cert_file is not None and tls.key_file is not None
    client_ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
