"""Tools through the OpenAI front: OpenAI's tool turns reach the model as the SDK's do, calls come
back in OpenAI's shape (checked with openai-python's own types), and templates that cannot show
tools are refused."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.inference.conftest import Served
from tests.openai_front.conftest import Front, start_front
from tests.trainer.conftest import COLOUR_TOOL, tool_model, tool_record  # noqa: F401 (a fixture)
from tunefleet.client import AsyncClient
from tunefleet.openai_front.inference import chat_completion_of, chunks_of
from tunefleet.v1 import common_pb2, inference_pb2, inference_service_pb2

TOOLS: Any = [{"type": "function", "function": COLOUR_TOOL}]


@pytest.fixture
async def tool_front(tool_model: Path, tmp_path: Path) -> AsyncIterator[Front]:  # noqa: F811
    async with start_front(Served(tool_model, {}), tmp_path) as started:
        yield started


async def test_openai_tool_turns_reach_the_model_as_the_sdk_s(tool_front: Front) -> None:
    """A conversation with an assistant's call and the tool's answer, tools offered: the front's
    answer and prompt tokens are InferenceService's for the same turns sent through the SDK."""
    messages: Any = tool_record("cat", "grey")["messages"][:3]
    async with tool_front.client() as client:
        reply = await client.chat.completions.create(
            model="tiny", messages=messages, tools=TOOLS, max_tokens=8, temperature=0
        )
    target = f"127.0.0.1:{tool_front.serving.server.port}"  # type: ignore[union-attr]
    async with AsyncClient(target) as sdk:
        turns = [
            {"role": "user", "content": messages[0]["content"]},
            {
                "role": "assistant",
                "toolCalls": [
                    {"id": "call_1", "name": "colour_of", "arguments": '{"animal": "cat"}'}
                ],
            },
            {"role": "tool", "content": "grey", "toolCallId": "call_1"},
        ]
        direct = await sdk.inference.generate(messages=turns, tools=TOOLS, max_tokens=8)
    assert reply.usage.prompt_tokens == direct.usage.prompt_tokens
    assert reply.choices[0].message.content == direct.text


async def test_tools_a_template_cannot_show_are_refused_and_none_drops_them(front: Front) -> None:
    messages: Any = [{"role": "user", "content": "Which colour goes with the cat?"}]
    async with front.client() as client:
        with pytest.raises(openai.BadRequestError) as raised:
            await client.chat.completions.create(
                model="tiny", messages=messages, tools=TOOLS, max_tokens=4
            )
        assert raised.value.code == "tools_not_supported" and raised.value.param == "tools"
        answered = await client.chat.completions.create(
            model="tiny", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=4
        )
        assert answered.choices[0].finish_reason in ("stop", "length")


def calling_reply() -> inference_service_pb2.GenerateResponse:
    return inference_service_pb2.GenerateResponse(
        response_id="ab" * 16,
        text="",
        adapter_version="adapters/orders/versions/3",
        finish_reason=inference_pb2.FINISH_REASON_TOOL_CALLS,
        usage=inference_pb2.Usage(prompt_tokens=30, completion_tokens=12),
        tool_calls=[
            common_pb2.ToolCall(id="call_7", name="colour_of", arguments='{"animal": "owl"}')
        ],
    )


def test_calls_come_back_in_openai_s_shape() -> None:
    completion = ChatCompletion.model_validate(chat_completion_of(calling_reply(), "orders:3", 1))
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.id == "call_7" and call.type == "function"
    assert call.function.name == "colour_of" and call.function.arguments == '{"animal": "owl"}'
    assert completion.usage is not None and completion.usage.total_tokens == 42


async def test_streamed_calls_come_as_one_chunk_in_openai_s_shape() -> None:
    chunks = [
        ChatCompletionChunk.model_validate(chunk)
        async for chunk in chunks_of(calling_reply(), "orders:3", 1, usage=True)
    ]
    first, last, usage = chunks
    (call,) = first.choices[0].delta.tool_calls or []
    assert call.index == 0 and call.function is not None and call.function.name == "colour_of"
    assert last.choices[0].finish_reason == "tool_calls"
    assert not usage.choices and usage.usage is not None and usage.usage.prompt_tokens == 30
