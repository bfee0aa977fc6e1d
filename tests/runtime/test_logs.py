"""Structured logs carry the RPC method and the request id."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tests.conftest import StartServer
from tests.helpers import raw_service, unary
from tunefleet.runtime.logs import configure_logging
from tunefleet.runtime.settings import LoggingSettings

service_log = logging.getLogger("tests.service")


async def work(request: bytes, context: Any) -> bytes:
    service_log.info("working on %s", request.decode())
    return b"done"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


async def test_json_lines_carry_method_and_request_id(
    start_server: StartServer, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging(LoggingSettings(level="INFO", json_lines=True))
    server = await start_server([raw_service("test.Work", {"Do": ("unary_unary", work)})])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = unary(channel, "/test.Work/Do")(b"job-7", metadata=(("x-request-id", "req-123"),))
        assert await call == b"done"
        assert ("x-request-id", "req-123") in tuple(await call.initial_metadata())
        generated = unary(channel, "/test.Work/Do")(b"job-8")
        await generated
        generated_id = dict(await generated.initial_metadata())["x-request-id"]
    lines = [
        json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")
    ]
    mine = [entry for entry in lines if entry.get("request_id") == "req-123"]
    messages = {entry["message"] for entry in mine}
    assert "working on job-7" in messages
    assert any(m.startswith("finished OK in ") for m in messages)  # the access line
    assert all(entry["rpc_method"] == "/test.Work/Do" for entry in mine)
    assert len(generated_id) == 32
    assert any(
        entry.get("request_id") == generated_id and entry["message"] == "working on job-8"
        for entry in lines
    )
