"""TrainingService over gRPC: converts between protobuf and the TrainingManager, nothing more."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from tunefleet.core.errors import Unavailable
from tunefleet.core.protos import timestamp
from tunefleet.training.manager import TrainingManager
from tunefleet.training.states import event_proto
from tunefleet.training.store import CheckpointRow
from tunefleet.v1 import training_job_pb2, training_service_pb2, training_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]
POLL_SECONDS = 1.0  # followers also look for events written by other processes this often


class TrainingServicer(training_service_pb2_grpc.TrainingServiceServicer):
    def __init__(self, manager: TrainingManager) -> None:
        self.manager = manager

    async def CreateTrainingJob(
        self, request: training_service_pb2.CreateTrainingJobRequest, context: Context
    ) -> training_job_pb2.TrainingJob:
        return await self.manager.create(
            request.training_job, request.request_id, request.validate_only
        )

    async def GetTrainingJob(
        self, request: training_service_pb2.GetTrainingJobRequest, context: Context
    ) -> training_job_pb2.TrainingJob:
        return await asyncio.to_thread(self.manager.get, request.name)

    async def ListTrainingJobs(
        self, request: training_service_pb2.ListTrainingJobsRequest, context: Context
    ) -> training_service_pb2.ListTrainingJobsResponse:
        page = await asyncio.to_thread(
            self.manager.list_jobs, request.filter, request.page_size, request.page_token
        )
        return training_service_pb2.ListTrainingJobsResponse(
            training_jobs=page.items, next_page_token=page.next_page_token
        )

    async def CancelTrainingJob(
        self, request: training_service_pb2.CancelTrainingJobRequest, context: Context
    ) -> training_job_pb2.TrainingJob:
        return await self.manager.cancel(request.name)

    async def StreamTrainingJobEvents(
        self, request: training_service_pb2.StreamTrainingJobEventsRequest, context: Context
    ) -> AsyncIterator[training_job_pb2.TrainingEvent]:
        sequence = request.after_sequence
        while True:
            changes, ended = await asyncio.to_thread(self.manager.events, request.name, sequence)
            for change in changes:
                sequence = change.revision
                yield event_proto(change)
            if changes:
                continue
            if ended or request.no_follow:
                return
            if self.manager.draining:
                raise Unavailable(
                    "the server is shutting down: follow again after your last sequence",
                    reason="SHUTTING_DOWN",
                )
            await self.manager.signal.wait(POLL_SECONDS)

    async def ListCheckpoints(
        self, request: training_service_pb2.ListCheckpointsRequest, context: Context
    ) -> training_service_pb2.ListCheckpointsResponse:
        page = await asyncio.to_thread(
            self.manager.checkpoints, request.parent, request.page_size, request.page_token
        )
        return training_service_pb2.ListCheckpointsResponse(
            checkpoints=[checkpoint_proto(row) for row in page.items],
            next_page_token=page.next_page_token,
        )

    async def ReportTrainingProgress(
        self, request: training_service_pb2.ReportTrainingProgressRequest, context: Context
    ) -> training_service_pb2.ReportTrainingProgressResponse:
        metadata = dict(context.invocation_metadata() or ())
        authorization = str(metadata.get("authorization", ""))
        token = authorization.removeprefix("Bearer ").strip()
        outcome = await asyncio.to_thread(self.manager.reports.report, request, token)
        await self.manager.reports.after_report(outcome)
        return training_service_pb2.ReportTrainingProgressResponse(
            cancel_requested=outcome.cancel_requested
        )


def checkpoint_proto(row: CheckpointRow) -> training_job_pb2.Checkpoint:
    checkpoint = training_job_pb2.Checkpoint(
        name=f"trainingJobs/{row.job_id}/checkpoints/{row.step}",
        step=row.step,
        uri=row.uri,
        size_bytes=row.size_bytes,
        create_time=timestamp(row.create_time),
    )
    if row.validation_loss is not None:
        checkpoint.validation_loss = row.validation_loss
    return checkpoint
