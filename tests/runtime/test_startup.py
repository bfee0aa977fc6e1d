"""Start-up: nothing reports SERVING, and no call reaches a service, before it has started."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers import error_info, raw_service, unary
from tunefleet.runtime.server import TunefleetServer
from tunefleet.runtime.settings import ServerSettings

SERVING, NOT_SERVING = (
    health_pb2.HealthCheckResponse.SERVING,
    health_pb2.HealthCheckResponse.NOT_SERVING,
)


async def test_services_are_unavailable_and_not_serving_until_they_have_started() -> None:
    first_started, release = asyncio.Event(), asyncio.Event()

    async def slow_start(server: TunefleetServer) -> None:
        first_started.set()
        await release.wait()  # an engine loading its model

    async def answer(request: bytes, context: Any) -> bytes:
        return b"answer"

    first = dataclasses.replace(
        raw_service("test.First", {"Call": ("unary_unary", answer)}), on_start=slow_start
    )
    second = raw_service("test.Second", {"Call": ("unary_unary", answer)})
    server = TunefleetServer(
        ServerSettings(port=0, metrics_enabled=False, shutdown_grace_seconds=0), [first, second]
    )
    starting = asyncio.ensure_future(server.start())
    try:
        await asyncio.wait_for(first_started.wait(), 30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def status(service: str) -> int:
                request = health_pb2.HealthCheckRequest(service=service)
                return int((await health.Check(request)).status)

            assert [await status(s) for s in ("", "test.First", "test.Second")] == [NOT_SERVING] * 3
            for service in ("test.First", "test.Second"):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await unary(channel, f"/{service}/Call")(b"")
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                info = error_info(refused.value)
                assert info is not None and info.reason == "SERVICE_STARTING"
                assert service in (refused.value.details() or "")

            release.set()
            await asyncio.wait_for(starting, 30)
            assert [await status(s) for s in ("", "test.First", "test.Second")] == [SERVING] * 3
            for service in ("test.First", "test.Second"):
                assert await unary(channel, f"/{service}/Call")(b"") == b"answer"
    finally:
        release.set()
        await starting
        await server.stop(0)
