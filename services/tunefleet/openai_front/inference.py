"""`/v1/chat/completions` and `/v1/completions` onto InferenceService's Generate, StreamGenerate
and ScoreCompletion.

Defaults are OpenAI's (temperature 1, completions' max_tokens 16), not tunefleet's: a client
written against OpenAI gets what it expects. The response `id` is tunefleet's response id (feedback
names it), and the `x-tunefleet-adapter-version` header names the exact version that answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

from starlette.responses import JSONResponse, Response, StreamingResponse

from tunefleet.client import AsyncClient, NotFound, TunefleetError
from tunefleet.client.inference import openai_tool_calls
from tunefleet.openai_front.errors import bad_request, translate
from tunefleet.openai_front.models import adapter_of, not_found
from tunefleet.openai_front.params import ChatBody, CompletionBody, parse
from tunefleet.v1 import inference_pb2, inference_service_pb2

VERSION_HEADER = "x-tunefleet-adapter-version"
FINISH = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_CANCELLED: "stop",
    inference_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _headers(version: str) -> dict[str, str]:
    return {VERSION_HEADER: version} if version else {}


def _usage(usage: inference_pb2.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# --- chat ---------------------------------------------------------------------------------------


def _text(content: Any, field: str) -> str:
    """A message's content: a string, or text parts (other parts are refused)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad_request(f"{field}[{index}]", "only text content parts are supported")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise bad_request(field, "must be a string or a list of text parts")


def _turn(message: dict[str, Any], index: int) -> dict[str, Any]:
    """An OpenAI chat message as the SDK's chat turn."""
    field = f"messages[{index}]"
    role = message.get("role")
    if role != "tool" and (not isinstance(role, str) or role not in ROLES):
        raise bad_request(f"{field}.role", f"{role!r} is not one of {', '.join([*ROLES, 'tool'])}")
    content = _text(message.get("content"), f"{field}.content")
    if role == "tool":
        return {
            "role": "tool",
            "content": content,
            "toolCallId": str(message.get("tool_call_id", "")),
            "name": str(message.get("name", "")),
        }
    turn: dict[str, Any] = {"role": ROLES[role], "content": content}
    calls = message.get("tool_calls") or []
    if role == "assistant" and calls:
        try:
            turn["toolCalls"] = [
                {
                    "id": call["id"],
                    "name": call["function"]["name"],
                    "arguments": call["function"]["arguments"],
                }
                for call in calls
            ]
        except (KeyError, TypeError):
            raise bad_request(
                f"{field}.tool_calls", "each needs an id and a function's name and arguments"
            ) from None
    return turn


@contextlib.asynccontextmanager
async def _refusals(model: str, input_param: str) -> AsyncIterator[None]:
    """InferenceService's refusals in this endpoint's words: NOT_FOUND is about the adapter
    (OpenAI's model_not_found), the input is `messages` or `prompt`, tools are `tools`."""
    try:
        yield
    except NotFound as error:
        raise not_found(model, f": {error.message}") from None
    except TunefleetError as error:
        failure = translate(error)
        if error.field == "input" or error.field.startswith("prompt_token_ids"):
            failure.param = input_param
        elif error.reason == "TOOLS_NOT_SUPPORTED":
            failure.param = "tools"
        raise failure from None


async def chat_completions(client: AsyncClient, base_model: str, body: Any) -> Response:
    params: ChatBody = parse(body, ChatBody)
    async with _refusals(params.model, "messages"):
        return await _chat_completions(client, base_model, params)


async def _chat_completions(client: AsyncClient, base_model: str, params: ChatBody) -> Response:
    tools = params.tools if params.tools and params.tool_choice != "none" else []
    request: dict[str, Any] = {
        "messages": [_turn(message, index) for index, message in enumerate(params.messages)],
        "adapter": adapter_of(params.model, base_model),
        "max_tokens": params.limit or 0,
        "temperature": 1.0 if params.temperature is None else params.temperature,
        "top_p": 1.0 if params.top_p is None else params.top_p,
        "stop": params.stops,
        "seed": params.seed,
        "tools": tools,
        "routing_key": params.user or "",
    }
    created = int(time.time())
    if not params.stream:
        reply = await client.inference.generate(**request)
        return JSONResponse(
            chat_completion_of(reply, params.model, created),
            headers=_headers(reply.adapter_version),
        )
    usage = bool(params.stream_options and params.stream_options.include_usage)
    if tools:
        # The call markers are parsed from the whole text: the answer comes whole, as one chunk.
        reply = await client.inference.generate(**request)
        chunks = chunks_of(reply, params.model, created, usage)
        return _stream(chunks, reply.adapter_version)
    pieces = aiter(client.inference.generate_stream(**request))
    first = await anext(pieces)  # refusals before the first piece are HTTP errors
    return _stream(_chat_chunks(first, pieces, params.model, created, usage), first.adapter_version)


def chat_completion_of(
    reply: inference_service_pb2.GenerateResponse, model: str, created: int
) -> dict[str, Any]:
    """A whole generation as OpenAI's `chat.completion` object."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.text}
    if reply.tool_calls:
        message["tool_calls"] = openai_tool_calls(reply.tool_calls)
        message["content"] = reply.text or None
    return {
        "id": reply.response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": FINISH.get(reply.finish_reason, "stop"),
                "logprobs": None,
            }
        ],
        "usage": _usage(reply.usage),
    }


def _chunk(
    response_id: str, model: str, created: int, delta: dict[str, Any], finish: str | None = None
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def _usage_chunk(
    response_id: str, model: str, created: int, usage: inference_pb2.Usage
) -> dict[str, Any]:
    """The last chunk with `stream_options.include_usage`: no choices, the token counts."""
    return {**_chunk(response_id, model, created, {}), "choices": [], "usage": _usage(usage)}


async def chunks_of(
    reply: inference_service_pb2.GenerateResponse, model: str, created: int, usage: bool
) -> AsyncGenerator[dict[str, Any]]:
    """A whole generation as the chunks of a stream: the text and calls, the finish, usage."""
    delta: dict[str, Any] = {"role": "assistant", "content": reply.text}
    if reply.tool_calls:
        delta["tool_calls"] = [
            {"index": index, **call}
            for index, call in enumerate(openai_tool_calls(reply.tool_calls))
        ]
    yield _chunk(reply.response_id, model, created, delta)
    yield _chunk(reply.response_id, model, created, {}, FINISH.get(reply.finish_reason, "stop"))
    if usage:
        yield _usage_chunk(reply.response_id, model, created, reply.usage)


async def _chat_chunks(
    first: inference_service_pb2.StreamGenerateResponse,
    pieces: AsyncIterator[inference_service_pb2.StreamGenerateResponse],
    model: str,
    created: int,
    usage: bool,
) -> AsyncGenerator[dict[str, Any]]:
    response_id = first.response_id
    yield _chunk(response_id, model, created, {"role": "assistant", "content": ""})
    async for piece in _pieces(first, pieces):
        if piece.text_delta:
            yield _chunk(response_id, model, created, {"content": piece.text_delta})
        if piece.finish_reason:
            yield _chunk(response_id, model, created, {}, FINISH.get(piece.finish_reason, "stop"))
            if usage:
                yield _usage_chunk(response_id, model, created, piece.usage)


async def _pieces(
    first: inference_service_pb2.StreamGenerateResponse,
    rest: AsyncIterator[inference_service_pb2.StreamGenerateResponse],
) -> AsyncIterator[inference_service_pb2.StreamGenerateResponse]:
    """The pieces of a generation whose first piece was read; closing this ends the call."""
    try:
        yield first
        async for piece in rest:
            yield piece
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


def _stream(chunks: AsyncGenerator[dict[str, Any]], version: str) -> StreamingResponse:
    """Server-sent events: each chunk, an error in OpenAI's envelope if the generation fails
    part way (openai-python raises it), then `[DONE]`. A client that leaves cancels the
    generation (Starlette cancels this iterator, and closing it cancels the gRPC stream)."""

    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield _sse(chunk)
        except TunefleetError as error:
            yield _sse(translate(error).body())
        finally:
            await chunks.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", **_headers(version)},
    )


# --- completions --------------------------------------------------------------------------------


async def completions(client: AsyncClient, base_model: str, body: Any) -> Response:
    params: CompletionBody = parse(body, CompletionBody)
    async with _refusals(params.model, "prompt"):
        return await _completions(client, base_model, params)


async def _completions(client: AsyncClient, base_model: str, params: CompletionBody) -> Response:
    adapter = adapter_of(params.model, base_model)
    prompts = params.prompts
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise bad_request("prompt", f"prompt {index} is empty")
    created = int(time.time())
    sampling: dict[str, Any] = {
        "max_tokens": 16 if params.max_tokens is None else params.max_tokens,
        "temperature": 1.0 if params.temperature is None else params.temperature,
        "top_p": 1.0 if params.top_p is None else params.top_p,
        "stop": params.stops,
        "seed": params.seed,
        "routing_key": params.user or "",
    }
    if params.stream:
        if len(prompts) != 1:
            raise bad_request("prompt", "a streamed completion takes one prompt")
        pieces = aiter(client.inference.generate_stream(prompts[0], adapter=adapter, **sampling))
        first = await anext(pieces)
        usage = bool(params.stream_options and params.stream_options.include_usage)
        return _stream(
            _text_chunks(first, pieces, params.model, created, usage), first.adapter_version
        )
    choices = await asyncio.gather(
        *(_completion(client, adapter, prompt, params, sampling) for prompt in prompts)
    )
    versions = {version for _, _, version, _ in choices}
    response_ids = [rid for _, rid, _, _ in choices if rid]
    prompt_tokens = sum(usage[0] for _, _, _, usage in choices)
    completion_tokens = sum(usage[1] for _, _, _, usage in choices)
    return JSONResponse(
        {
            "id": response_ids[0] if response_ids else f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": created,
            "model": params.model,
            "choices": [
                {"index": index, **choice} for index, (choice, _, _, _) in enumerate(choices)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        },
        headers=_headers(",".join(sorted(versions - {""}))),
    )


async def _completion(
    client: AsyncClient,
    adapter: str,
    prompt: str | list[int],
    params: CompletionBody,
    sampling: dict[str, Any],
) -> tuple[dict[str, Any], str, str, tuple[int, int]]:
    """One prompt's choice, response id, the version that answered and token counts.
    Log-probabilities come from ScoreCompletion under the exact version that generated (an alias
    moving between the two calls changes nothing), over the generated tokens and the
    end-of-sequence token that ended them, as OpenAI counts it."""
    reply, version, text, finish = None, "", "", "length"
    prompt_tokens = completion_tokens = 0
    if sampling["max_tokens"]:
        reply = await client.inference.generate(prompt, adapter=adapter, **sampling)
        version, text = reply.adapter_version, reply.text
        finish = FINISH.get(reply.finish_reason, "stop")
        prompt_tokens, completion_tokens = reply.usage.prompt_tokens, reply.usage.completion_tokens
    logprobs = None
    echoed = prompt if isinstance(prompt, str) else None
    if params.logprobs is not None or (params.echo and echoed is None):
        generated = list(reply.token_ids) if reply else []
        if reply is not None and reply.HasField("eos_token_id"):
            generated.append(reply.eos_token_id)
        scored = await client.inference.score(
            prompt,
            completion=generated,
            adapter=version if reply else adapter,
            top_logprobs=params.logprobs or 0,
            score_input=params.echo,
        )
        prompt_tokens, version = scored.prompt_tokens, scored.adapter_version
        tokens = [*scored.input_tokens, *scored.tokens]
        if echoed is None and params.echo:
            echoed = "".join(token.text for token in scored.input_tokens)
        start = 0 if params.echo or not isinstance(prompt, str) else len(prompt)
        logprobs = _logprobs(tokens, start)
    if params.echo:
        text = (echoed or "") + text
    if params.logprobs is None:
        logprobs = None  # scored for the echoed text only
    choice = {"text": text, "logprobs": logprobs, "finish_reason": finish}
    response_id = reply.response_id if reply else ""
    return choice, response_id, version, (prompt_tokens, completion_tokens)


def _logprobs(tokens: Sequence[inference_pb2.ScoredToken], offset: int) -> dict[str, Any]:
    """OpenAI's legacy `logprobs` object: tokens, their log-probabilities (None for the first
    token of an echoed prompt), the likeliest tokens in each place and each token's offset in
    the text."""
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token.text)
    return {
        "tokens": [token.text for token in tokens],
        "token_logprobs": [
            token.logprob if token.HasField("logprob") else None for token in tokens
        ],
        "top_logprobs": [
            {top.text: top.logprob for top in token.top_logprobs}
            if token.HasField("logprob")
            else None
            for token in tokens
        ],
        "text_offset": offsets,
    }


async def _text_chunks(
    first: inference_service_pb2.StreamGenerateResponse,
    pieces: AsyncIterator[inference_service_pb2.StreamGenerateResponse],
    model: str,
    created: int,
    usage: bool,
) -> AsyncGenerator[dict[str, Any]]:
    def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
        return {
            "id": first.response_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        }

    async for piece in _pieces(first, pieces):
        if piece.text_delta:
            yield chunk(piece.text_delta)
        if piece.finish_reason:
            yield chunk("", FINISH.get(piece.finish_reason, "stop"))
            if usage:
                yield {**chunk(""), "choices": [], "usage": _usage(piece.usage)}
