"""RetrainingService over gRPC: converts between protobuf and the RetrainingManager."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import empty_pb2

from tunefleet.retraining.manager import RetrainingManager
from tunefleet.v1 import retraining_pb2, retraining_service_pb2, retraining_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]
Requests = retraining_service_pb2


class RetrainingServicer(retraining_service_pb2_grpc.RetrainingServiceServicer):
    def __init__(self, manager: RetrainingManager) -> None:
        self.manager = manager

    async def CreateRetrainingPolicy(
        self, request: Requests.CreateRetrainingPolicyRequest, context: Context
    ) -> retraining_pb2.RetrainingPolicy:
        return await self.manager.create_policy(
            request.retraining_policy, request.retraining_policy_id, request.request_id
        )

    async def GetRetrainingPolicy(
        self, request: Requests.GetRetrainingPolicyRequest, context: Context
    ) -> retraining_pb2.RetrainingPolicy:
        return await asyncio.to_thread(self.manager.get_policy, request.name)

    async def ListRetrainingPolicies(
        self, request: Requests.ListRetrainingPoliciesRequest, context: Context
    ) -> Requests.ListRetrainingPoliciesResponse:
        page = await asyncio.to_thread(
            self.manager.list_policies, request.page_size, request.page_token
        )
        return Requests.ListRetrainingPoliciesResponse(
            retraining_policies=page.items, next_page_token=page.next_page_token
        )

    async def DeleteRetrainingPolicy(
        self, request: Requests.DeleteRetrainingPolicyRequest, context: Context
    ) -> empty_pb2.Empty:
        await asyncio.to_thread(self.manager.delete_policy, request.name)
        return empty_pb2.Empty()

    async def CreateRetrainingRun(
        self, request: Requests.CreateRetrainingRunRequest, context: Context
    ) -> retraining_pb2.RetrainingRun:
        return await self.manager.create_run(
            request.parent, request.retraining_run, request.request_id
        )

    async def GetRetrainingRun(
        self, request: Requests.GetRetrainingRunRequest, context: Context
    ) -> retraining_pb2.RetrainingRun:
        return await asyncio.to_thread(self.manager.get_run, request.name)

    async def ListRetrainingRuns(
        self, request: Requests.ListRetrainingRunsRequest, context: Context
    ) -> Requests.ListRetrainingRunsResponse:
        page = await asyncio.to_thread(
            self.manager.list_runs, request.parent, request.page_size, request.page_token
        )
        return Requests.ListRetrainingRunsResponse(
            retraining_runs=page.items, next_page_token=page.next_page_token
        )

    async def WatchRetrainingRun(
        self, request: Requests.WatchRetrainingRunRequest, context: Context
    ) -> AsyncIterator[retraining_pb2.RetrainingRun]:
        async for run in self.manager.watch(request.name):
            yield run

    async def ApproveRetrainingRun(
        self, request: Requests.ApproveRetrainingRunRequest, context: Context
    ) -> retraining_pb2.RetrainingRun:
        return await self.manager.approve(request.name, request.reason)

    async def RejectRetrainingRun(
        self, request: Requests.RejectRetrainingRunRequest, context: Context
    ) -> retraining_pb2.RetrainingRun:
        return await self.manager.reject(request.name, request.reason)

    async def CancelRetrainingRun(
        self, request: Requests.CancelRetrainingRunRequest, context: Context
    ) -> retraining_pb2.RetrainingRun:
        return await self.manager.cancel(request.name)
