"""The worker's progress reports against a TrainingService that cuts calls short as a stopping
server does: a report answered CANCELLED or INTERNAL is sent again, never lost; a refusal of the
report itself is final; a service that keeps failing one report does not hold the others for
ever."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from tests.conftest import StartServer
from tests.helpers import raw_service
from tunefleet.trainer.report import _RemoteReporter
from tunefleet.trainer.spec import ReportSpec
from tunefleet.v1 import training_service_pb2

pytestmark = pytest.mark.timeout(120)


async def reporter_against(start_server: StartServer, answers: list[grpc.StatusCode]) -> Any:
    """A reporter whose service answers each call with the next of `answers` (then OK), and
    the steps the service accepted."""
    accepted: list[int] = []
    calls: list[int] = []

    async def report(data: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        request = training_service_pb2.ReportTrainingProgressRequest.FromString(data)
        calls.append(request.progress.step)
        if answers:
            await context.abort(answers.pop(0), "cut short")
        accepted.append(request.progress.step)
        return training_service_pb2.ReportTrainingProgressResponse().SerializeToString()

    service = raw_service(
        "tunefleet.v1.TrainingService", {"ReportTrainingProgress": ("unary_unary", report)}
    )
    server = await start_server([service])
    spec = ReportSpec(endpoint=f"127.0.0.1:{server.port}", job="trainingJobs/x", token="t")
    return _RemoteReporter(spec), accepted, calls


def progress(step: int) -> dict[str, Any]:
    return {"step": step, "total_steps": 10, "epoch": 0.0, "learning_rate": 1e-3}


async def test_reports_cut_short_by_a_stopping_service_are_sent_again(
    start_server: StartServer,
) -> None:
    codes = [grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE]
    reporter, accepted, calls = await reporter_against(start_server, codes)
    for step in (1, 2, 3):
        await asyncio.to_thread(reporter.send, "progress", progress(step))
    await asyncio.to_thread(reporter.close)
    assert accepted == [1, 2, 3]  # in order, none lost
    assert calls == [1, 1, 1, 1, 2, 3]


async def test_refused_and_ever_failing_reports_are_given_up(start_server: StartServer) -> None:
    codes = [grpc.StatusCode.INVALID_ARGUMENT] + [grpc.StatusCode.INTERNAL] * 5
    reporter, accepted, calls = await reporter_against(start_server, codes)
    for step in (1, 2, 3):
        await asyncio.to_thread(reporter.send, "progress", progress(step))
    await asyncio.to_thread(reporter.close)
    assert accepted == [3]
    assert calls == [1, 2, 2, 2, 2, 2, 3]
