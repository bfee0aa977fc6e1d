"""InferenceService over gRPC: converts between protobuf and the InferenceManager."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import json_format

from tunefleet.core.errors import FailedPrecondition
from tunefleet.core.protos import timestamp
from tunefleet.inference.adapters import ServedVersion
from tunefleet.inference.feedback import Feedback, FeedbackRow, ResponseRow
from tunefleet.inference.manager import InferenceManager
from tunefleet.storage.pagination import check_page_size
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

    async def Generate(
        self, request: inference_service_pb2.GenerateRequest, context: Context
    ) -> inference_service_pb2.GenerateResponse:
        response = inference_service_pb2.GenerateResponse()
        text, content = [], None
        async for piece in self.manager.generate(request):
            response.response_id, response.adapter_version = (
                piece.response_id,
                piece.adapter_version,
            )
            text.append(piece.text)
            response.token_ids.extend(piece.token_ids)
            if piece.finish_reason:
                response.finish_reason = piece.finish_reason  # type: ignore[assignment]
                response.usage.prompt_tokens = piece.prompt_tokens
                response.usage.completion_tokens = piece.completion_tokens
                response.tool_calls.extend(piece.tool_calls)
                content = piece.content
                if piece.eos_token is not None:
                    response.eos_token_id = piece.eos_token
        response.text = "".join(text) if content is None else content
        return response

    async def ScoreCompletion(
        self, request: inference_service_pb2.ScoreCompletionRequest, context: Context
    ) -> inference_service_pb2.ScoreCompletionResponse:
        return await self.manager.score(request)

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
                message.tool_calls.extend(piece.tool_calls)
            yield message

    async def ListServedAdapters(
        self, request: inference_service_pb2.ListServedAdaptersRequest, context: Context
    ) -> inference_service_pb2.ListServedAdaptersResponse:
        if self._manager is None:
            check_page_size(request.page_size)
            return inference_service_pb2.ListServedAdaptersResponse()
        page = self.manager.served_page(request.page_size, request.page_token)
        return inference_service_pb2.ListServedAdaptersResponse(
            served_adapters=[self._served(v) for v in page.items],
            next_page_token=page.next_page_token,
        )

    async def LoadAdapter(
        self, request: inference_service_pb2.LoadAdapterRequest, context: Context
    ) -> inference_pb2.ServedAdapter:
        return self._served(await self.manager.load(request.adapter, request.pin))

    async def UnloadAdapter(
        self, request: inference_service_pb2.UnloadAdapterRequest, context: Context
    ) -> inference_pb2.ServedAdapter:
        served, aliases = await self.manager.unload(request.adapter)
        message = self._served(served, aliases)
        message.state = STATES.STATE_UNLOADING
        return message

    async def CreateFeedback(
        self, request: inference_service_pb2.CreateFeedbackRequest, context: Context
    ) -> inference_pb2.Feedback:
        feedback = request.feedback
        row = await self.manager.create_feedback(
            Feedback(
                feedback.response_id, feedback.rating, feedback.corrected_text, feedback.comment
            ),
            request.request_id,
        )
        return feedback_proto(row)

    async def ListFeedback(
        self, request: inference_service_pb2.ListFeedbackRequest, context: Context
    ) -> inference_service_pb2.ListFeedbackResponse:
        page, responses = await self.manager.responses.list_feedback(
            request.filter, request.page_size, request.page_token, request.include_responses
        )
        return inference_service_pb2.ListFeedbackResponse(
            feedback=[feedback_proto(row, responses.get(row.response_id)) for row in page.items],
            next_page_token=page.next_page_token,
        )

    def _served(
        self, served: ServedVersion, aliases: list[str] | None = None
    ) -> inference_pb2.ServedAdapter:
        if aliases is None:
            aliases = self.manager.pool.aliases_of(served)
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


def feedback_proto(row: FeedbackRow, response: ResponseRow | None = None) -> inference_pb2.Feedback:
    message = inference_pb2.Feedback(
        name=f"feedback/{row.id}",
        response_id=row.response_id,
        rating=row.rating,
        corrected_text=row.corrected_text,
        comment=row.comment,
        adapter_version=row.adapter_version,
        create_time=timestamp(row.create_time),
    )
    if response is not None:
        message.response.CopyFrom(recorded_response(response))
    return message


def recorded_response(row: ResponseRow) -> inference_pb2.RecordedResponse:
    """A recorded response's input (from the request as it was stored) and text."""
    request = json_format.ParseDict(
        row.request, inference_service_pb2.GenerateRequest(), ignore_unknown_fields=True
    )
    message = inference_pb2.RecordedResponse(
        text=row.text, finish_reason=row.finish_reason, create_time=timestamp(row.create_time)
    )
    which = request.WhichOneof("input")
    if which == "prompt":
        message.prompt = request.prompt
    elif which == "chat":
        message.chat.CopyFrom(request.chat)
    elif which == "prompt_token_ids":
        message.prompt_token_ids.CopyFrom(request.prompt_token_ids)
    return message
