"""Hostile generations against a real serving process (`tunefleet serve adapters inference`) on a
model whose context holds 32k tokens: a 12 MB prompt, and a 30k-token prompt whose client gives
up while it is prefilled, must neither stall the server's event loop (a health checker measures
it throughout) nor leave work behind that slows the next small request."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.helpers import error_info
from tests.inference.conftest import PROMPTS
from tests.trainer.conftest import build_chat_model

CONTEXT = 32768


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("long-context")
    return build_chat_model(root / "model", hidden_size=128, heads=2, max_positions=CONTEXT)


# Checks health on its own channel, in its own process (so that the test's own work on the
# 12 MB request cannot delay it), until its stdin closes; then prints every latency.
HEALTH_CHECKER = """
import json, sys, threading, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
latencies = []
with grpc.insecure_channel(sys.argv[1]) as channel:
    health = health_pb2_grpc.HealthStub(channel)
    print("READY", flush=True)
    while not stop.is_set():
        started = time.perf_counter()
        answer = health.Check(health_pb2.HealthCheckRequest(), timeout=30)
        latencies.append(time.perf_counter() - started)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        stop.wait(0.01)
print(json.dumps(latencies), flush=True)
"""


@pytest.fixture
def server(long_model: Path, tmp_path: Path) -> Iterator[str]:
    from tunefleet.demo.server import LocalServer

    server = LocalServer(
        tmp_path / "data",
        {"models": {"long": str(long_model)}, "inference": {"base_model": "long"}},
        services=["adapters", "inference"],
    )
    server.start(300)
    try:
        yield server.target
    finally:
        server.stop()


@pytest.mark.alone  # its bars are latencies: measured without another test beside it
async def test_hostile_prompts_neither_stall_the_server_nor_slow_the_next_request(
    server: str, long_model: Path
) -> None:
    from transformers import AutoTokenizer

    from tunefleet.v1 import (
        inference_pb2,
        inference_service_pb2,
        inference_service_pb2_grpc,
    )

    def request(prompt: str, adapter: str = "", max_tokens: int = 10) -> Any:
        return inference_service_pb2.GenerateRequest(
            adapter=adapter,
            prompt=prompt,
            sampling=inference_pb2.SamplingParams(max_tokens=max_tokens),
        )

    tokenizer = AutoTokenizer.from_pretrained(str(long_model))
    unit = len(tokenizer(PROMPTS[0], add_special_tokens=False).input_ids)
    long_prompt = PROMPTS[0] * (30_000 // unit)
    assert 29_000 < len(tokenizer(long_prompt, add_special_tokens=False).input_ids) < CONTEXT

    options = [("grpc.max_send_message_length", 16 * 2**20)]
    async with grpc.aio.insecure_channel(server, options=options) as channel:
        inference = inference_service_pb2_grpc.InferenceServiceStub(channel)

        async def small() -> float:
            started = time.perf_counter()
            await inference.Generate(request(PROMPTS[1]), timeout=60)
            return time.perf_counter() - started

        await small()  # warm
        idle = statistics.median([await small() for _ in range(5)])

        checker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            HEALTH_CHECKER,
            server,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert checker.stdin is not None and checker.stdout is not None
        try:
            assert await asyncio.wait_for(checker.stdout.readline(), 60) == b"READY\n"
            # 12 MB to an adapter that does not exist: refused for its size, cheaply.
            for adapter in ("adapters/missing/versions/1", ""):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await inference.Generate(request("x" * 12_000_000, adapter), timeout=60)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                info = error_info(refused.value)
                assert info is not None and info.reason == "PROMPT_TOO_LONG"

            # 30k tokens: accepted, and the client gives up while it is being prefilled.
            stream = inference.StreamGenerate(
                inference_service_pb2.StreamGenerateRequest(
                    request=request(long_prompt, max_tokens=500)
                ),
                timeout=120,
            )
            await stream.read()  # tokenised and queued in the engine
            await asyncio.sleep(0.5)
            stream.cancel()
            after = [await small() for _ in range(5)]
        finally:
            checker.stdin.close()
            output, _ = await asyncio.wait_for(checker.communicate(), 60)

    assert checker.returncode == 0
    latencies = json.loads(output)
    assert len(latencies) > 10
    worst = max(latencies)
    assert worst < 0.1, f"a health check waited {worst * 1000:.0f} ms"
    # The cancelled prefill left the engine: the next small requests run at idle speed.
    assert min(after) <= 2 * idle, f"idle {idle:.3f}s, after the cancel {after}"
