"""The trainer with the rest of the platform: reporting to TrainingService's progress RPC and
registering its result with a real AdapterService."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from tests.conftest import StartServer
from tests.trainer.conftest import MakeSpec
from tests.trainer.test_trainer import train
from tunefleet.app.services import registration
from tunefleet.runtime.context import ServiceContext, open_storage
from tunefleet.runtime.server import ServiceRegistration
from tunefleet.runtime.settings import load_settings
from tunefleet.trainer.report import Cancelled
from tunefleet.v1 import (
    adapter_pb2,
    adapter_service_pb2,
    adapter_service_pb2_grpc,
    training_service_pb2,
    training_service_pb2_grpc,
)


async def test_result_is_registered_with_lineage(
    start_server: StartServer, make_spec: MakeSpec, chat_model: Path, tmp_path: Path
) -> None:
    settings = load_settings(data_dir=tmp_path / "platform", models={"colours": str(chat_model)})
    storage = open_storage(settings)
    context = ServiceContext(settings, storage, CollectorRegistry())
    server = await start_server([registration("adapters", context)])
    target = f"127.0.0.1:{server.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        stub = adapter_service_pb2_grpc.AdapterServiceStub(channel)
        await stub.CreateAdapter(
            adapter_service_pb2.CreateAdapterRequest(
                adapter_id="colours", adapter=adapter_pb2.Adapter(base_model="colours")
            )
        )
        spec = make_spec(
            registry={"endpoint": target, "adapter": "adapters/colours"},
            job="trainingJobs/j-1",
            datasets=["datasets/ds-colours"],
        )
        result = await asyncio.to_thread(train, spec)
        assert result["adapter_version"] == "adapters/colours/versions/1"
        version = await stub.GetAdapterVersion(
            adapter_service_pb2.GetAdapterVersionRequest(name=result["adapter_version"])
        )
    assert version.smoke_test.result == adapter_pb2.SmokeTest.RESULT_PASSED
    assert version.lineage.training_job == "trainingJobs/j-1"
    assert list(version.lineage.datasets) == ["datasets/ds-colours"]
    assert version.lineage.metrics["validation_loss"] == pytest.approx(
        result["evaluation"]["validation_loss"]
    )
    assert version.lineage.hyperparameters["lora_rank"] == 8
    storage.close()


class RecordingTrainingService(training_service_pb2_grpc.TrainingServiceServicer):
    """The peer the trainer reports to: records reports, asks to cancel after `cancel_after`."""

    def __init__(self, cancel_after: int) -> None:
        self.reports: list[tuple[Any, str]] = []
        self.cancel_after = cancel_after

    async def ReportTrainingProgress(
        self, request: training_service_pb2.ReportTrainingProgressRequest, context: Any
    ) -> training_service_pb2.ReportTrainingProgressResponse:
        token = dict(context.invocation_metadata()).get("authorization", "")
        self.reports.append((request, token))
        progress = [r for r, _ in self.reports if r.HasField("progress")]
        return training_service_pb2.ReportTrainingProgressResponse(
            cancel_requested=len(progress) >= self.cancel_after
        )


async def test_progress_is_reported_and_cancel_stops_training(
    start_server: StartServer, make_spec: MakeSpec, tmp_path: Path
) -> None:
    service = RecordingTrainingService(cancel_after=5)  # type: ignore[abstract]
    server = await start_server(
        [
            ServiceRegistration(
                "tunefleet.v1.TrainingService",
                lambda s: training_service_pb2_grpc.add_TrainingServiceServicer_to_server(
                    service, s
                ),
            )
        ]
    )
    spec = make_spec(
        report={
            "endpoint": f"127.0.0.1:{server.port}",
            "token": "job-secret",
            "job": "trainingJobs/j-2",
        }
    )
    with pytest.raises(Cancelled, match="cancelled"):
        await asyncio.to_thread(train, spec)
    requests = [r for r, _ in service.reports]
    assert {token for _, token in service.reports} == {"Bearer job-secret"}
    assert all(r.name == "trainingJobs/j-2" for r in requests)
    assert requests[0].worker_state == (
        training_service_pb2.ReportTrainingProgressRequest.WORKER_STATE_RUNNING
    )
    steps = [r.progress.step for r in requests if r.HasField("progress")]
    assert steps == [1, 2, 3, 4, 5]
    assert all(r.progress.HasField("train_loss") for r in requests if r.HasField("progress"))
    events = [json.loads(line) for line in (tmp_path / "out" / "progress.jsonl").open()]
    assert [e["step"] for e in events if e["event"] == "progress"] == [1, 2, 3, 4, 5]
