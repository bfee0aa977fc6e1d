"""Message and upload size limits answer RESOURCE_EXHAUSTED."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from tests.conftest import StartServer
from tests.helpers import error_info, raw_service, stream_unary, unary


async def count_bytes(requests: AsyncIterator[bytes], context: Any) -> bytes:
    total = 0
    async for chunk in requests:
        total += len(chunk)
    return str(total).encode()


async def echo(request: bytes, context: Any) -> bytes:
    return request


SERVICE = raw_service(
    "test.Upload", {"Upload": ("stream_unary", count_bytes), "Echo": ("unary_unary", echo)}
)


async def chunks(count: int, size: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield b"x" * size


async def test_message_over_the_limit(start_server: StartServer) -> None:
    server = await start_server([SERVICE], max_message_bytes=4096)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        echo_call = unary(channel, "/test.Upload/Echo")
        assert await echo_call(b"x" * 4000) == b"x" * 4000
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await echo_call(b"x" * 5000)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_upload_over_the_limit(start_server: StartServer) -> None:
    server = await start_server([SERVICE], max_upload_bytes=10_000)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        upload = stream_unary(channel, "/test.Upload/Upload")
        assert await upload(chunks(10, 1000)) == b"10000"
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await upload(chunks(11, 1000))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(raised.value)
    assert info is not None and info.reason == "UPLOAD_TOO_LARGE"
    assert info.metadata["limit_bytes"] == "10000"


async def test_a_refused_upload_reports_its_own_status_to_an_asyncio_client(
    start_server: StartServer,
) -> None:
    """The server refuses while the client still has chunks in flight. grpc.aio clients report
    such a call as INTERNAL "Internal error from Core" when a write fails after the status came
    (grpc/grpc#36066); the server reads the rest of a refused stream before answering, so the
    client sees the refusal itself, every time."""
    server = await start_server([SERVICE], max_upload_bytes=10_000)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        upload = stream_unary(channel, "/test.Upload/Upload")
        codes = []
        for _ in range(30):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await upload(chunks(200, 1000))
            codes.append(raised.value.code())
    assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
