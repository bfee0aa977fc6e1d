"""InferenceService follows AdapterService only through its public RPCs: alias moves arrive on
`WatchAdapterChanges`, which resumes after its last revision when AdapterService dies and comes
back. With the two services in processes of their own, AdapterService SIGKILLed under load and
restarted: no request fails, and a move made as it comes back (before the watch has
reconnected) is followed."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from tests.inference.conftest import Served, Serving
from tunefleet.demo.server import LocalServer

ALIAS = "adapters/orders@prod"
pytestmark = pytest.mark.timeout(900)  # two servers start, one twice: bounds, not claims


@pytest.fixture
async def processes(served: Served, tmp_path: Path) -> AsyncIterator[tuple[Serving, LocalServer]]:
    settings = {"models": {"tiny": str(served.model)}}
    adapters = LocalServer(tmp_path / "data", settings, services=["adapters"])
    inference = LocalServer(tmp_path / "data", settings, services=["inference"])
    inference.settings["inference"] = {"base_model": "tiny", "registry_endpoint": adapters.target}
    try:
        await asyncio.to_thread(adapters.start, 300)
        await asyncio.to_thread(inference.start, 300)
        async with (
            grpc.aio.insecure_channel(inference.target) as channel,
            grpc.aio.insecure_channel(adapters.target) as adapters_channel,
        ):
            yield Serving(None, None, None, channel, adapters_channel), adapters
    finally:
        inference.stop()
        adapters.stop()


async def test_adapter_service_killed_and_restarted_loses_no_move_and_fails_no_request(
    processes: tuple[Serving, LocalServer], served: Served
) -> None:
    serving, adapters = processes
    first = await serving.register("orders", served.adapters["alpha"])
    second = await serving.register("orders", served.adapters["beta"])
    await serving.alias("prod", first)
    assert (await serving.generate(ALIAS)).adapter_version == first

    stamped: list[str] = []
    failures: list[grpc.aio.AioRpcError] = []
    stop, answered = asyncio.Event(), asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            try:
                stamped.append((await serving.generate(ALIAS, max_tokens=4)).adapter_version)
            except grpc.aio.AioRpcError as error:
                failures.append(error)
            answered.set()

    async def until(condition: Callable[[], bool]) -> None:
        while not condition() and not failures:  # a failure ends the wait: asserted below
            answered.clear()
            await answered.wait()

    clients = [asyncio.create_task(client()) for _ in range(3)]
    try:
        assert adapters.process is not None
        os.kill(adapters.process.pid, signal.SIGKILL)
        await asyncio.to_thread(adapters.process.wait)
        served_while_down = len(stamped)
        await until(lambda: len(stamped) >= served_while_down + 10)  # without AdapterService
        await asyncio.to_thread(adapters.start, 300)
        await serving.alias("prod", second)  # before the watch has come back, most likely
        await until(lambda: second in stamped)
        swapped = len(stamped) + len(clients)  # requests routed before the swap have ended
        await until(lambda: len(stamped) >= swapped + 10)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert failures == []
    assert set(stamped[: stamped.index(second)]) == {first}
    assert set(stamped[swapped:]) == {second}  # the move was followed, and for good
