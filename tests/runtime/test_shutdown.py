"""SIGTERM: stop accepting, let in-flight calls finish within the grace period, exit 0."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from tests.helpers import unary

ROOT = Path(__file__).resolve().parents[2]


async def start(grace: float, sleep: float) -> tuple[asyncio.subprocess.Process, int]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.runtime.slow_server",
        str(grace),
        str(sleep),
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
    assert line.startswith("PORT "), line
    return process, int(line.split()[1])


async def wait_for_slow_call(process: asyncio.subprocess.Process) -> None:
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 10)
    assert line.decode().strip() == "SLOW STARTED"


async def test_in_flight_call_finishes_and_new_calls_are_refused() -> None:
    """New calls are refused at once (on the open channel and on a new one), the call in
    flight finishes, and only then does the service stop its background work (its engine)."""
    process, port = await start(grace=10, sleep=1.5)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert await unary(channel, "/test.Slow/Fast")(b"") == b"fast"
        in_flight = asyncio.ensure_future(unary(channel, "/test.Slow/Slow")(b""))
        await wait_for_slow_call(process)
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await unary(channel, "/test.Slow/Fast")(b"", timeout=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as late_channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await unary(late_channel, "/test.Slow/Fast")(b"", timeout=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await in_flight == b"finished"
    assert await asyncio.wait_for(process.wait(), 10) == 0
    assert process.stdout is not None
    rest = (await process.stdout.read()).decode().split()
    assert rest == ["SLOW", "FINISHED", "ON_STOP"]  # the engine outlives the calls it serves


async def test_grace_period_bounds_the_wait() -> None:
    process, port = await start(grace=0.5, sleep=60)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        in_flight = asyncio.ensure_future(unary(channel, "/test.Slow/Slow")(b""))
        await wait_for_slow_call(process)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
        assert time.monotonic() - started < 5
        with pytest.raises(grpc.aio.AioRpcError):
            await in_flight
