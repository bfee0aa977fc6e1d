"""Bytes no protobuf parser accepts, sent to every RPC of every service (and to health and
reflection): INVALID_ARGUMENT naming the request, never UNKNOWN or INTERNAL, no traceback in the
log; with authentication on, a call without a token is UNAUTHENTICATED first."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import StartServer
from tests.helpers import error_info
from tests.runtime.test_auth import TOKENS, tokens_file  # noqa: F401 (a fixture)
from tunefleet.app.services import SERVICES, registration
from tunefleet.runtime.context import ServiceContext

GARBAGE = [b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x08" + b"\x80" * 11]


def methods(server_services: list[str]) -> list[tuple[str, bool]]:
    """Every method of the services served, as (full name, whether the client streams)."""
    from google.protobuf import descriptor_pool

    pool = descriptor_pool.Default()
    found = []
    for name in server_services:
        service = pool.FindServiceByName(name)
        for method in service.methods:
            found.append((f"/{name}/{method.name}", method.client_streaming))
    return found


SERVED = [
    "tunefleet.v1.DatasetService",
    "tunefleet.v1.TrainingService",
    "tunefleet.v1.AdapterService",
    "tunefleet.v1.InferenceService",
    "tunefleet.v1.EvaluationService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
]


async def call(
    channel: grpc.aio.Channel,
    method: str,
    streaming: bool,
    data: bytes,
    metadata: tuple[tuple[str, str], ...] = (),
) -> grpc.aio.AioRpcError:
    """Send `data` as the request (or the only message of the request stream); the error."""
    try:
        if streaming:
            # The response kind does not matter to a refusal. The message is written by hand: a
            # server that refuses before reading may close the call while it is being sent, and
            # the status to check is the server's, not that of the failed write.
            stream: Any = channel.stream_stream(method)(timeout=30, metadata=metadata)
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await stream.write(data)
                await stream.done_writing()
            async for _ in stream:
                pass
        else:
            unary: Any = channel.unary_stream(method)
            await unary(data, timeout=30, metadata=metadata).read()
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError(f"{method} accepted garbage")


async def test_garbage_is_invalid_argument_on_every_rpc(
    start_server: StartServer, service_context: ServiceContext, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server([registration(key, service_context) for key in SERVICES])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for method, streaming in methods(SERVED):
            for data in GARBAGE:
                error = await call(channel, method, streaming, data)
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error)
                info = error_info(error)
                assert info is not None and info.reason == "UNDECODABLE_REQUEST", method
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_garbage_without_a_token_is_unauthenticated(
    start_server: StartServer,
    service_context: ServiceContext,
    tokens_file: Path,  # noqa: F811
) -> None:
    server = await start_server(
        [registration(key, service_context) for key in SERVICES],
        auth={"enabled": True, "tokens_file": str(tokens_file)},
    )
    token = (("authorization", f"Bearer {TOKENS['admin']}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for method, streaming in methods(SERVED[:5]):
            error = await call(channel, method, streaming, GARBAGE[0])
            public = error.code() == grpc.StatusCode.INVALID_ARGUMENT  # public RPCs (workers')
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED or public, (method, error)
            error = await call(channel, method, streaming, GARBAGE[0], metadata=token)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error)
