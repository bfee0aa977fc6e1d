"""SIGTERM on a serving process (`tunefleet serve adapters inference`): generations in flight
and queued in the engine finish, a new call is refused at once, the process exits 0 within the
grace period and 2 s."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import grpc

from tests.inference.conftest import PROMPTS, Served, Serving

GRACE = 30.0


async def not_serving(channel: grpc.aio.Channel) -> None:
    """Wait until the server has taken the signal: health NOT_SERVING, or refused."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    for _ in range(500):
        try:
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError:
            return
        if answer.status == health_pb2.HealthCheckResponse.NOT_SERVING:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the server never left SERVING after SIGTERM")


async def test_sigterm_finishes_generations_and_refuses_new_ones(
    served: Served, tmp_path: Path
) -> None:
    from tunefleet.demo.server import LocalServer
    from tunefleet.v1 import inference_pb2, inference_service_pb2

    server = LocalServer(
        tmp_path / "data",
        {
            "models": {"tiny": str(served.model)},
            # 4 rows decode together: the other 4 requests wait in the engine's queue.
            "inference": {"base_model": "tiny", "max_batch": 4},
            "server": {"shutdown_grace_seconds": GRACE},
        },
        services=["adapters", "inference"],
    )
    await asyncio.to_thread(server.start, 300)
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            serving = Serving(None, None, None, channel)
            version = await serving.register("alpha", served.adapters["alpha"])
            alone = (await serving.generate(version, max_tokens=60)).text
            request = inference_service_pb2.StreamGenerateRequest(
                request=inference_service_pb2.GenerateRequest(
                    adapter=version,
                    prompt=PROMPTS[0],
                    sampling=inference_pb2.SamplingParams(max_tokens=60),
                )
            )
            streams: list[Any] = [serving.inference.StreamGenerate(request) for _ in range(8)]
            first = [await stream.read() for stream in streams]  # all 8 calls are in flight
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            await not_serving(channel)
            try:
                await serving.inference.Generate(request.request, timeout=5)
                raise AssertionError("a call after SIGTERM was accepted")
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - stopped < 5
            for stream, head in zip(streams, first, strict=True):
                pieces = [head]
                while (piece := await stream.read()) != grpc.aio.EOF:
                    pieces.append(piece)
                assert pieces[-1].finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED
                assert "".join(p.text_delta for p in pieces) == alone
        code = await asyncio.to_thread(server.process.wait, GRACE + 2)
        assert code == 0
        assert time.monotonic() - stopped < GRACE + 2
    finally:
        server.stop()
