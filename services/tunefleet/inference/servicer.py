"""InferenceService over gRPC: converts between protobuf and the InferenceManager."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from tunefleet.core import names
from tunefleet.core.errors import FailedPrecondition, InvalidArgument, NotFound
from tunefleet.core.protos import timestamp
from tunefleet.inference.adapters import AdapterPool, ServedVersion
from tunefleet.inference.feedback import Feedback, FeedbackRow
from tunefleet.inference.metrics import version_labels
from tunefleet.inference.service import InferenceManager
from tunefleet.storage.pagination import check_page_size, decode_page_token, encode_page_token
from tunefleet.v1 import (
    common_pb2,
    inference_pb2,
    inference_service_pb2,
    inference_service_pb2_grpc,
)

Context = grpc.aio.ServicerContext[Any, Any]
ENGINES = {"vllm": common_pb2.SERVING_ENGINE_VLLM, "peft": common_pb2.SERVING_ENGINE_PEFT}
STATES = inference_pb2.ServedAdapter.State


class InferenceServicer(inference_service_pb2_grpc.InferenceServiceServicer):
    """Without a manager (no base model configured) nothing is served: the served list is
    empty and every other call answers FAILED_PRECONDITION."""

    def __init__(self, manager: InferenceManager | None) -> None:
        self._manager = manager

    @property
    def manager(self) -> InferenceManager:
        if self._manager is None:
            raise FailedPrecondition(
                "this server serves no model: set inference.base_model "
                "(TUNEFLEET_INFERENCE__BASE_MODEL) to a model in `models`",
                reason="NO_BASE_MODEL",
            )
        return self._manager

    @property
    def pool(self) -> AdapterPool:
        return self.manager.pool

    async def Generate(
        self, request: inference_service_pb2.GenerateRequest, context: Context
    ) -> inference_service_pb2.GenerateResponse:
        response = inference_service_pb2.GenerateResponse()
        text = []
        async for piece in self.manager.generate(request):
            response.response_id, response.adapter_version = (
                piece.response_id,
                piece.adapter_version,
            )
            text.append(piece.text)
            if piece.finish_reason:
                response.finish_reason = piece.finish_reason  # type: ignore[assignment]
                response.usage.prompt_tokens = piece.prompt_tokens
                response.usage.completion_tokens = piece.completion_tokens
        response.text = "".join(text)
        return response

    async def StreamGenerate(
        self, request: inference_service_pb2.StreamGenerateRequest, context: Context
    ) -> AsyncIterator[inference_service_pb2.StreamGenerateResponse]:
        async for piece in self.manager.generate(request.request):
            message = inference_service_pb2.StreamGenerateResponse(
                response_id=piece.response_id,
                text_delta=piece.text,
                adapter_version=piece.adapter_version,
            )
            if piece.finish_reason:
                message.finish_reason = piece.finish_reason  # type: ignore[assignment]
                message.usage.prompt_tokens = piece.prompt_tokens
                message.usage.completion_tokens = piece.completion_tokens
            yield message

    async def ListServedAdapters(
        self, request: inference_service_pb2.ListServedAdaptersRequest, context: Context
    ) -> inference_service_pb2.ListServedAdaptersResponse:
        size = check_page_size(request.page_size)
        if self._manager is None:
            return inference_service_pb2.ListServedAdaptersResponse()
        served = sorted(self.pool.served.values(), key=lambda v: (v.version, v.serving_name))
        start = 0
        if request.page_token:
            last = tuple(decode_page_token(request.page_token, "served"))
            start = next(
                (i for i, v in enumerate(served) if (v.version, v.serving_name) > last),
                len(served),
            )
        page = served[start : start + size]
        token = ""
        if start + size < len(served):
            token = encode_page_token([page[-1].version, page[-1].serving_name], "served")
        return inference_service_pb2.ListServedAdaptersResponse(
            served_adapters=[self._served(v) for v in page], next_page_token=token
        )

    async def LoadAdapter(
        self, request: inference_service_pb2.LoadAdapterRequest, context: Context
    ) -> inference_pb2.ServedAdapter:
        ref = names.version_ref(request.adapter, "adapter")
        if ref.alias is not None:
            served = await self.pool.route(request.adapter)
            served.pinned |= request.pin
        else:
            served = await self.pool.load(request.adapter, pin=request.pin)
        return self._served(served)

    async def UnloadAdapter(
        self, request: inference_service_pb2.UnloadAdapterRequest, context: Context
    ) -> inference_pb2.ServedAdapter:
        ref = names.version_ref(request.adapter, "adapter")
        if ref.alias is not None:
            routed = self.pool.routes.get(request.adapter)
            if routed is None:
                raise InvalidArgument("adapter", f"{request.adapter} is not routed here")
            found = [routed]
        else:
            found = self.pool.find(request.adapter)
            if not found:
                raise NotFound(f"{request.adapter} is not loaded on this server")
        for served in found:
            served.pinned = False
        message = self._served(found[-1])  # what it was, before unloading forgets its aliases
        await asyncio.gather(*(self.pool.unload(served) for served in found))
        message.state = STATES.STATE_UNLOADING
        return message

    async def CreateFeedback(
        self, request: inference_service_pb2.CreateFeedbackRequest, context: Context
    ) -> inference_pb2.Feedback:
        feedback = request.feedback
        row, created = await self.manager.responses.create_feedback(
            Feedback(
                feedback.response_id, feedback.rating, feedback.corrected_text, feedback.comment
            ),
            request.request_id,
        )
        if created:
            labels = version_labels(row.adapter_version)
            self.manager.metrics.feedback_score.labels(*labels).observe((row.rating + 1) / 2)
        return feedback_proto(row)

    async def ListFeedback(
        self, request: inference_service_pb2.ListFeedbackRequest, context: Context
    ) -> inference_service_pb2.ListFeedbackResponse:
        page = await self.manager.responses.list_feedback(
            request.filter, request.page_size, request.page_token
        )
        return inference_service_pb2.ListFeedbackResponse(
            feedback=[feedback_proto(row) for row in page.items],
            next_page_token=page.next_page_token,
        )

    def _served(self, served: ServedVersion) -> inference_pb2.ServedAdapter:
        aliases = self.pool.aliases_of(served)
        message = inference_pb2.ServedAdapter(
            adapter_version=served.version,
            serving_name=served.serving_name,
            routed_aliases=aliases,
            engine=ENGINES.get(served.engine.name if served.engine else "", 0),  # type: ignore[arg-type]
            state=STATES.Value(f"STATE_{served.state}"),
            error=served.error,
            pinned=served.pinned or bool(aliases),
            request_count=served.request_count,
        )
        if served.load_time is not None:
            message.load_time.CopyFrom(timestamp(served.load_time))
        return message


def feedback_proto(row: FeedbackRow) -> inference_pb2.Feedback:
    return inference_pb2.Feedback(
        name=f"feedback/{row.id}",
        response_id=row.response_id,
        rating=row.rating,
        corrected_text=row.corrected_text,
        comment=row.comment,
        adapter_version=row.adapter_version,
        create_time=timestamp(row.create_time),
    )
