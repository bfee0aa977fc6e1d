"""EvaluationService over gRPC: converts between protobuf and the EvaluationManager."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from tunefleet.evaluation.manager import EvaluationManager
from tunefleet.v1 import evaluation_pb2, evaluation_service_pb2, evaluation_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class EvaluationServicer(evaluation_service_pb2_grpc.EvaluationServiceServicer):
    def __init__(self, manager: EvaluationManager) -> None:
        self.manager = manager

    async def CreateEvaluationJob(
        self, request: evaluation_service_pb2.CreateEvaluationJobRequest, context: Context
    ) -> evaluation_pb2.EvaluationJob:
        return await self.manager.create(
            request.evaluation_job, request.request_id, request.validate_only
        )

    async def GetEvaluationJob(
        self, request: evaluation_service_pb2.GetEvaluationJobRequest, context: Context
    ) -> evaluation_pb2.EvaluationJob:
        return await asyncio.to_thread(self.manager.get, request.name)

    async def ListEvaluationJobs(
        self, request: evaluation_service_pb2.ListEvaluationJobsRequest, context: Context
    ) -> evaluation_service_pb2.ListEvaluationJobsResponse:
        page = await asyncio.to_thread(
            self.manager.list_jobs, request.page_size, request.page_token
        )
        return evaluation_service_pb2.ListEvaluationJobsResponse(
            evaluation_jobs=page.items, next_page_token=page.next_page_token
        )

    async def CancelEvaluationJob(
        self, request: evaluation_service_pb2.CancelEvaluationJobRequest, context: Context
    ) -> evaluation_pb2.EvaluationJob:
        return await self.manager.cancel(request.name)

    async def WatchEvaluationJob(
        self, request: evaluation_service_pb2.WatchEvaluationJobRequest, context: Context
    ) -> AsyncIterator[evaluation_pb2.EvaluationJob]:
        async for job in self.manager.watch(request.name):
            yield job

    async def CreateAnnotationTask(
        self, request: evaluation_service_pb2.CreateAnnotationTaskRequest, context: Context
    ) -> evaluation_pb2.AnnotationTask:
        return await self.manager.annotation_task(
            request.parent, request.candidate, request.baseline, request.annotator
        )

    async def CreateAnnotation(
        self, request: evaluation_service_pb2.CreateAnnotationRequest, context: Context
    ) -> evaluation_pb2.Annotation:
        return await asyncio.to_thread(self.manager.annotate, request.annotation)

    async def GetAnnotationSummary(
        self, request: evaluation_service_pb2.GetAnnotationSummaryRequest, context: Context
    ) -> evaluation_pb2.AnnotationSummary:
        return await asyncio.to_thread(
            self.manager.annotation_summary, request.parent, request.candidate, request.baseline
        )

    async def ListEvaluationItemResults(
        self, request: evaluation_service_pb2.ListEvaluationItemResultsRequest, context: Context
    ) -> evaluation_service_pb2.ListEvaluationItemResultsResponse:
        page = await asyncio.to_thread(
            self.manager.items,
            request.parent,
            request.candidate,
            request.page_size,
            request.page_token,
        )
        return evaluation_service_pb2.ListEvaluationItemResultsResponse(
            item_results=page.items, next_page_token=page.next_page_token
        )
