"""The metrics interceptor and the /metrics endpoint."""

from __future__ import annotations

import asyncio
import subprocess
import urllib.request
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import StartServer
from tests.helpers import raw_service, require_tool, unary, unary_stream
from tunefleet.core.errors import NotFound


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        return str(response.read().decode())


async def settled_scrape(port: int, needle: str) -> str:
    """A scrape that contains `needle`, waiting briefly for the server to record it."""
    for _ in range(100):
        text = await asyncio.to_thread(scrape, port)
        if needle in text:
            return text
        await asyncio.sleep(0.02)
    raise AssertionError(f"{needle} never appeared in the metrics")


def sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {name}{labels}")


def service(gate: asyncio.Event | None = None) -> Any:
    async def ok(request: bytes, context: Any) -> bytes:
        if gate is not None:
            await gate.wait()
        return request

    async def missing(request: bytes, context: Any) -> bytes:
        raise NotFound("nothing here")

    return raw_service(
        "test.Echo", {"Ok": ("unary_unary", ok), "Missing": ("unary_unary", missing)}
    )


async def test_requests_are_counted_by_code_and_timed(start_server: StartServer) -> None:
    server = await start_server([service()])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for _ in range(3):
            await unary(channel, "/test.Echo/Ok")(b"x")
        with pytest.raises(grpc.aio.AioRpcError):
            await unary(channel, "/test.Echo/Missing")(b"x")
    # The client has its answer a moment before the server's interceptor finishes counting.
    text = await settled_scrape(server.metrics_port, 'grpc_code="NOT_FOUND"')
    labels = {"grpc_service": "test.Echo", "grpc_method": "Ok"}
    assert sample(text, "tunefleet_grpc_server_requests_total", **labels, grpc_code="OK") == 3
    assert (
        sample(
            text,
            "tunefleet_grpc_server_requests_total",
            grpc_service="test.Echo",
            grpc_method="Missing",
            grpc_code="NOT_FOUND",
        )
        == 1
    )
    assert sample(text, "tunefleet_grpc_server_request_duration_seconds_count", **labels) == 3
    assert sample(text, "tunefleet_grpc_server_in_flight_requests", **labels) == 0


async def test_in_flight_gauge_counts_running_calls(start_server: StartServer) -> None:
    gate = asyncio.Event()
    server = await start_server([service(gate)])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        calls = [asyncio.ensure_future(unary(channel, "/test.Echo/Ok")(b"x")) for _ in range(2)]
        labels = {"grpc_service": "test.Echo", "grpc_method": "Ok"}
        for _ in range(100):
            text = await asyncio.to_thread(scrape, server.metrics_port)
            try:
                if sample(text, "tunefleet_grpc_server_in_flight_requests", **labels) == 2:
                    break
            except AssertionError:
                pass
            await asyncio.sleep(0.02)
        else:
            pytest.fail("in-flight gauge never reached 2")
        gate.set()
        await asyncio.gather(*calls)
    text = scrape(server.metrics_port)
    assert sample(text, "tunefleet_grpc_server_in_flight_requests", **labels) == 0


async def test_a_stream_the_client_cancels_is_counted_as_cancelled(
    start_server: StartServer,
) -> None:
    async def endless(request: bytes, context: Any) -> Any:
        while True:
            yield b"tick"
            await asyncio.sleep(0.01)

    server = await start_server([raw_service("test.Feed", {"Follow": ("unary_stream", endless)})])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = unary_stream(channel, "/test.Feed/Follow")(b"")
        assert await call.read() == b"tick"
        call.cancel()
    labels = {"grpc_service": "test.Feed", "grpc_method": "Follow"}
    for _ in range(100):
        text = await asyncio.to_thread(scrape, server.metrics_port)
        if "test.Feed" in text and 'grpc_code="CANCELLED"' in text:
            break
        await asyncio.sleep(0.02)
    assert (
        sample(text, "tunefleet_grpc_server_requests_total", **labels, grpc_code="CANCELLED") == 1
    )
    assert sample(text, "tunefleet_grpc_server_in_flight_requests", **labels) == 0


@pytest.mark.promtool
async def test_exposition_passes_promtool(start_server: StartServer) -> None:
    promtool = require_tool("promtool", "Debian package prometheus")
    server = await start_server([service()])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        await unary(channel, "/test.Echo/Ok")(b"x")
        with pytest.raises(grpc.aio.AioRpcError):
            await unary(channel, "/test.Echo/Missing")(b"x")
    text = await settled_scrape(server.metrics_port, 'grpc_code="NOT_FOUND"')
    result = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", (
        "promtool found lint problems"
    )
