"""InferenceService in the SDK: generation (whole or streamed), served adapters, feedback."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

from tunefleet.client.core import (
    Call,
    Emit,
    Feed,
    M,
    Open,
    Program,
    Read,
    Resource,
    operation,
    pages,
    stream,
)
from tunefleet.client.errors import InvalidArgument
from tunefleet.client.helpers import to_message
from tunefleet.v1 import (
    common_pb2,
    inference_pb2,
    inference_service_pb2,
    inference_service_pb2_grpc,
)

ChatTurns: TypeAlias = Sequence[common_pb2.ChatMessage | Mapping[str, Any]]
Tools: TypeAlias = Sequence[common_pb2.Tool | Mapping[str, Any]]


def to_tool(tool: common_pb2.Tool | Mapping[str, Any], field: str) -> common_pb2.Tool:
    """A tool given as a `Tool`, in OpenAI's form (`{"type": "function", "function": {...}}`)
    or as the function alone; `parameters` may be a JSON schema object or its text."""
    if isinstance(tool, common_pb2.Tool):
        return tool
    function = tool.get("function", tool)
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise InvalidArgument("a tool needs a function name", field=f"{field}.name")
    parameters = function.get("parameters", "")
    if not isinstance(parameters, str):
        parameters = json.dumps(parameters)
    return common_pb2.Tool(
        name=function["name"], description=function.get("description", ""), parameters=parameters
    )


def openai_tool(tool: common_pb2.Tool) -> dict[str, Any]:
    """A tool in OpenAI's form, `to_tool`'s inverse."""
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": json.loads(tool.parameters or "{}"),
        },
    }


def openai_tool_calls(calls: Sequence[common_pb2.ToolCall]) -> list[dict[str, Any]]:
    """An assistant's calls in OpenAI's form."""
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


def openai_message(message: common_pb2.ChatMessage) -> dict[str, Any]:
    """A chat turn in OpenAI's form: a turn that calls tools has its `tool_calls` (and `content`
    null when it wrote nothing else), a tool's answer its `tool_call_id`."""
    turn: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        turn["content"] = message.content or None
        turn["tool_calls"] = openai_tool_calls(message.tool_calls)
    if message.tool_call_id:
        turn["tool_call_id"] = message.tool_call_id
    return turn


def set_input(
    request: inference_service_pb2.GenerateRequest | inference_service_pb2.ScoreCompletionRequest,
    prompt: str | Sequence[int] | None,
    messages: ChatTurns | None,
    tools: Tools = (),
) -> None:
    """Set a request's input: text, token ids (a sequence of ints) or chat turns."""
    if (prompt is None) == (messages is None):
        raise InvalidArgument("give exactly one of prompt and messages", field="input")
    if tools and messages is None:
        raise InvalidArgument("tools are offered in a chat: give messages", field="tools")
    if isinstance(prompt, str):
        request.prompt = prompt
    elif prompt is not None:
        request.prompt_token_ids.ids.extend(prompt)
    else:
        for turn in messages or ():
            request.chat.messages.append(to_message(common_pb2.ChatMessage, turn, "chat.messages"))
        for index, tool in enumerate(tools):
            request.chat.tools.append(to_tool(tool, f"tools[{index}]"))


def generate_request(
    prompt: str | Sequence[int] | None,
    messages: ChatTurns | None,
    adapter: str,
    max_tokens: int,
    temperature: float,
    top_p: float,
    stop: Sequence[str],
    seed: int | None,
    tools: Tools = (),
) -> inference_service_pb2.GenerateRequest:
    request = inference_service_pb2.GenerateRequest(
        adapter=adapter,
        sampling=inference_pb2.SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop
        ),
    )
    if seed is not None:
        request.sampling.seed = seed
    set_input(request, prompt, messages, tools)
    return request


class Inference(Resource[M]):
    """InferenceService: generation with the base model or an adapter, served adapters and
    feedback."""

    Stub = inference_service_pb2_grpc.InferenceServiceStub

    @operation
    def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        messages: ChatTurns | None = None,
        adapter: str = "",
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        tools: Tools = (),
        routing_key: str = "",
    ) -> Program[inference_service_pb2.GenerateResponse]:
        """Generate a completion of `prompt` (raw text, or the model's token ids) or of a chat
        (`messages`, rendered with the model's chat template), with `adapter`
        (`adapters/{a}@{alias}`, `adapters/{a}/versions/{n}`) or the base model. Greedy unless
        `temperature` > 0. `tools` (OpenAI's form works) are offered to the model in a chat;
        its calls come back in `tool_calls`, with finish reason TOOL_CALLS. For an alias with a
        canary, requests with the same `routing_key` (a user or session id) land on the same
        side of the split.

        Example::

            answer = client.inference.generate(
                messages=[{"role": "user", "content": "Kenji wants 4 lamps in Berlin."}],
                adapter="adapters/orders@prod",
            )
            print(answer.text, answer.adapter_version)
        """
        request = generate_request(
            prompt, messages, adapter, max_tokens, temperature, top_p, stop, seed, tools
        )
        request.routing_key = routing_key
        response: inference_service_pb2.GenerateResponse = yield Call(
            self.Stub, "Generate", request
        )
        return response

    @stream
    def generate_stream(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        messages: ChatTurns | None = None,
        adapter: str = "",
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        tools: Tools = (),
        timeout: float | None = None,
        routing_key: str = "",
    ) -> Feed[inference_service_pb2.StreamGenerateResponse]:
        """Like `generate`, as pieces of text while they are produced; the last piece carries the
        finish reason, token counts and any tool calls. Leaving the loop early stops the
        generation.

        Example::

            for piece in client.inference.generate_stream("Once upon", adapter="adapters/a@prod"):
                print(piece.text_delta, end="", flush=True)
        """
        request = inference_service_pb2.StreamGenerateRequest(
            request=generate_request(
                prompt, messages, adapter, max_tokens, temperature, top_p, stop, seed, tools
            )
        )
        request.request.routing_key = routing_key
        pieces = yield Open(self.Stub, "StreamGenerate", request, timeout=timeout)
        while (piece := (yield Read(pieces))) is not None:
            yield Emit(piece)

    @operation
    def score(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        messages: ChatTurns | None = None,
        completion: str | Sequence[int] = "",
        adapter: str = "",
        top_logprobs: int = 0,
        score_input: bool = False,
    ) -> Program[inference_service_pb2.ScoreCompletionResponse]:
        """The log-probability of each token of `completion` (text, or token ids such as a
        generation's `token_ids`) after `prompt` or `messages`, as the model computes it; with
        `top_logprobs` the likeliest tokens in each place, with `score_input` the input's own
        tokens as well (`completion` may then be empty).

        Example::

            scored = client.inference.score("The capital of France is", completion=" Paris")
            print(sum(scored.token_logprobs))
        """
        request = inference_service_pb2.ScoreCompletionRequest(
            adapter=adapter, top_logprobs=top_logprobs, score_input=score_input
        )
        set_input(request, prompt, messages)
        if isinstance(completion, str):
            request.completion = completion
        else:
            request.completion_token_ids.extend(completion)
        response: inference_service_pb2.ScoreCompletionResponse = yield Call(
            self.Stub, "ScoreCompletion", request
        )
        return response

    @stream
    def served(self, page_size: int = 100) -> Feed[inference_pb2.ServedAdapter]:
        """The adapter versions this server has loaded (or is loading), with the aliases routed
        to them and their request counts.

        Example::

            for served in client.inference.served():
                print(served.adapter_version, list(served.routed_aliases), served.request_count)
        """
        request = inference_service_pb2.ListServedAdaptersRequest(page_size=page_size)
        yield from pages(self.Stub, "ListServedAdapters", request, "served_adapters")

    @operation
    def load(self, adapter: str, *, pin: bool = False) -> Program[inference_pb2.ServedAdapter]:
        """Load a version (or the one an alias points at) before the first request needs it;
        `pin` keeps it loaded regardless of the cache's size.

        Example::

            client.inference.load("adapters/orders@prod", pin=True)
        """
        request = inference_service_pb2.LoadAdapterRequest(adapter=adapter, pin=pin)
        served: inference_pb2.ServedAdapter = yield Call(
            self.Stub, "LoadAdapter", request, idempotent=True
        )
        return served

    @operation
    def unload(self, adapter: str) -> Program[inference_pb2.ServedAdapter]:
        """Unload a version from this server.

        Example::

            client.inference.unload("adapters/orders/versions/1")
        """
        request = inference_service_pb2.UnloadAdapterRequest(adapter=adapter)
        served: inference_pb2.ServedAdapter = yield Call(
            self.Stub, "UnloadAdapter", request, idempotent=True
        )
        return served

    @operation
    def feedback(
        self,
        response_id: str,
        *,
        rating: float,
        corrected_text: str = "",
        comment: str = "",
        request_id: str = "",
    ) -> Program[inference_pb2.Feedback]:
        """Record feedback on a response: `rating` from -1 (bad) to 1 (good), optionally what the
        answer should have been. Feeds the retraining loop.

        Example::

            client.inference.feedback(answer.response_id, rating=-1, corrected_text='{"item": ...}')
        """
        request = inference_service_pb2.CreateFeedbackRequest(
            feedback=inference_pb2.Feedback(
                response_id=response_id,
                rating=rating,
                corrected_text=corrected_text,
                comment=comment,
            ),
            request_id=request_id or str(uuid.uuid4()),
        )
        feedback: inference_pb2.Feedback = yield Call(
            self.Stub, "CreateFeedback", request, idempotent=True
        )
        return feedback

    @stream
    def list_feedback(
        self,
        filter: str = "",
        page_size: int = 100,
        *,
        include_responses: bool = False,
    ) -> Feed[inference_pb2.Feedback]:
        """Recorded feedback matching `filter`, such as
        `adapter_version=adapters/orders/versions/2` or `adapter_version="adapters/orders/*"
        AND rating < 0`, newest first; with `include_responses`, each with the response it
        judges (its input and text) in `response`.

        Example::

            for feedback in client.inference.list_feedback("rating < 0", include_responses=True):
                print(feedback.response.text, "->", feedback.corrected_text)
        """
        request = inference_service_pb2.ListFeedbackRequest(
            page_size=page_size, filter=filter, include_responses=include_responses
        )
        yield from pages(self.Stub, "ListFeedback", request, "feedback")
