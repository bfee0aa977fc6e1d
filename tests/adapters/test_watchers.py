"""Watch streams at scale, on a real `tunefleet serve adapters` process: 300 idle
WatchAdapterChanges streams cost the server (almost) nothing, every one of them still sees the
next change, and one client cannot hold more than its share of streams."""

from __future__ import annotations

import asyncio
import os
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from tests.conftest import StartServer
from tests.helpers import error_info
from tunefleet.app.services import registration
from tunefleet.demo.server import LocalServer
from tunefleet.runtime.context import ServiceContext
from tunefleet.v1 import adapter_pb2, adapter_service_pb2, adapter_service_pb2_grpc

STREAMS = 300


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def watchers(server: LocalServer) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("tunefleet_adapter_watchers "):
            return float(line.split()[1])
    raise AssertionError("no tunefleet_adapter_watchers metric")


async def until_watching(server: LocalServer, check: Callable[[float], bool]) -> None:
    """Wait until the server's count of waiting watch streams passes `check`."""
    deadline = time.monotonic() + 60
    while not check(await asyncio.to_thread(watchers, server)):
        assert time.monotonic() < deadline, "the watch streams never got there"
        await asyncio.sleep(0.1)


async def test_idle_watch_streams_cost_almost_nothing_and_all_see_a_change(tmp_path: Path) -> None:
    # All the streams come from one address here: the cap per client is lifted.
    settings = {"adapters": {"max_watchers_per_client": STREAMS}}
    server = LocalServer(tmp_path / "data", settings, services=["adapters"])
    await asyncio.to_thread(server.start, 120)
    try:
        assert server.process is not None
        # Several connections, as several clients would open them.
        channels = [grpc.aio.insecure_channel(server.target) for _ in range(6)]
        stubs = [adapter_service_pb2_grpc.AdapterServiceStub(c) for c in channels]
        streams = [
            stubs[i % len(stubs)].WatchAdapterChanges(
                adapter_service_pb2.WatchAdapterChangesRequest()
            )
            for i in range(STREAMS)
        ]
        readers = [asyncio.ensure_future(stream.read()) for stream in streams]
        await until_watching(server, lambda n: n >= STREAMS)

        before, started = cpu_seconds(server.process.pid), time.monotonic()
        await asyncio.sleep(5)
        used = (cpu_seconds(server.process.pid) - before) / (time.monotonic() - started)
        print(f"{STREAMS} idle watch streams: {used:.4f} of a core")
        assert used < 0.05, f"{STREAMS} idle streams used {used:.3f} of a core"

        await stubs[0].CreateAdapter(
            adapter_service_pb2.CreateAdapterRequest(
                adapter_id="fresh", adapter=adapter_pb2.Adapter(base_model="m")
            )
        )
        changes: list[Any] = await asyncio.wait_for(asyncio.gather(*readers), 60)
        assert {change.adapter for change in changes} == {"adapters/fresh"}
        for stream in streams:
            stream.cancel()
        for channel in channels:
            await channel.close()
    finally:
        await asyncio.to_thread(server.stop)


async def test_one_client_cannot_hold_every_stream(tmp_path: Path) -> None:
    server = LocalServer(
        tmp_path / "data", {"adapters": {"max_watchers_per_client": 5}}, services=["adapters"]
    )
    await asyncio.to_thread(server.start, 120)
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = adapter_service_pb2_grpc.AdapterServiceStub(channel)
            request = adapter_service_pb2.WatchAdapterChangesRequest()
            held = [stub.WatchAdapterChanges(request) for _ in range(5)]
            await until_watching(server, lambda n: n >= 5)
            extra = stub.WatchAdapterChanges(request)
            try:
                await extra.read()
                raise AssertionError("a sixth stream was accepted")
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                info = error_info(error)
                assert info is not None and info.reason == "TOO_MANY_STREAMS"
            held[0].cancel()
            await until_watching(server, lambda n: n <= 4)
            again = stub.WatchAdapterChanges(request)  # a freed place is taken again
            await until_watching(server, lambda n: n >= 5)
            for stream in [*held[1:], again]:
                stream.cancel()
    finally:
        await asyncio.to_thread(server.stop)


async def test_a_shutdown_ends_watch_streams_at_once_and_they_resume(
    start_server: StartServer, service_context: ServiceContext
) -> None:
    """A watch never ends on its own: at shutdown it is told UNAVAILABLE SHUTTING_DOWN at once
    (not after the grace) with where it had reached, and `start_at_latest` with bookmarks tells
    a new watcher the revision to resume from."""
    server = await start_server([registration("adapters", service_context)])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = adapter_service_pb2_grpc.AdapterServiceStub(channel)
        await stub.CreateAdapter(
            adapter_service_pb2.CreateAdapterRequest(
                adapter_id="a", adapter=adapter_pb2.Adapter(base_model="m")
            )
        )
        watch = stub.WatchAdapterChanges(
            adapter_service_pb2.WatchAdapterChangesRequest(
                start_at_latest=True, send_bookmarks=True
            )
        )
        bookmark: Any = await watch.read()
        assert bookmark.type == adapter_pb2.AdapterChange.TYPE_BOOKMARK
        assert bookmark.revision >= 1  # the adapter's creation is behind it, not sent
        stopping = asyncio.create_task(server.stop(grace=600))
        try:
            await watch.read()
            raise AssertionError("the watch went on during the shutdown")
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            info = error_info(error)
            assert info is not None and info.reason == "SHUTTING_DOWN"
        await asyncio.wait_for(stopping, 300)  # well before the 600 s grace
