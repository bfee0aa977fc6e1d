"""Tools in Generate: calls read back from a model's text only when they are clean calls of the
offered tools, and requests that cannot work refused naming the field. (A trained adapter
answering with calls end to end: tests/training/test_local.py.)"""

from __future__ import annotations

import json

import grpc
import pytest

from tests.helpers import error_info
from tests.inference.conftest import Served, Serving
from tunefleet.core.chat import ParsedCall, parse_tool_calls, tool_use_problem
from tunefleet.v1 import common_pb2, inference_pb2, inference_service_pb2

TOOLS = {"colour_of", "weather"}


def call(name: str, **arguments: object) -> str:
    return f'<tool_call>{{"name": "{name}", "arguments": {json.dumps(arguments)}}}</tool_call>'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Red.", ("Red.", [])),
        (call("colour_of", animal="cat"), ("", [ParsedCall("colour_of", '{"animal": "cat"}')])),
        (
            "Let me look.\n" + call("colour_of", animal="cat") + "\n" + call("weather"),
            ("Let me look.",
             [ParsedCall("colour_of", '{"animal": "cat"}'), ParsedCall("weather", "{}")]),
        ),
        # Llama-style `parameters` for the arguments.
        ('<tool_call>{"name": "weather", "parameters": {"city": "Köln"}}</tool_call>',
         ("", [ParsedCall("weather", '{"city": "Köln"}')])),
    ],
)  # fmt: skip
def test_clean_calls_of_offered_tools_are_read(
    text: str, expected: tuple[str, list[ParsedCall]]
) -> None:
    assert parse_tool_calls(text, TOOLS) == expected


@pytest.mark.parametrize(
    "text",
    [
        call("delete_everything"),  # not offered
        '<tool_call>{"name": "weather", "arguments": {"city": </tool_call>',  # bad JSON
        '<tool_call>["weather"]</tool_call>',
        '<tool_call>{"name": "weather", "arguments": "Paris"}</tool_call>',
        call("weather") + " and then I made up the answer: sunny.",  # text after a call
        call("weather") + "<tool_call>",  # unclosed
        '<tool_call>{"name": "weather", "arguments": {}}',  # cut by max_tokens
    ],
)
def test_anything_else_is_not_a_call(text: str) -> None:
    """The caller then returns the text as it is, never a guessed call."""
    assert parse_tool_calls(text, TOOLS) is None


def request(*messages: common_pb2.ChatMessage, tools: list[common_pb2.Tool]) -> object:
    return inference_service_pb2.GenerateRequest(
        chat=inference_pb2.ChatInput(messages=messages, tools=tools),
        sampling=inference_pb2.SamplingParams(max_tokens=4),
    )


USER = common_pb2.ChatMessage(role="user", content="Which colour goes with the cat?")
TOOL = common_pb2.Tool(name="colour_of", parameters='{"type": "object"}')


@pytest.mark.parametrize(
    ("messages", "tools", "field"),
    [
        ([USER], [common_pb2.Tool(name="colour_of", parameters="{")], "chat.tools[0].parameters"),
        ([USER], [common_pb2.Tool(name="x", parameters="[1]")], "chat.tools[0].parameters"),
        ([USER], [common_pb2.Tool(description="no name")], "chat.tools[0].name"),
        ([USER], [TOOL, TOOL], "chat.tools[1].name"),
        (
            [USER, common_pb2.ChatMessage(
                role="assistant",
                tool_calls=[common_pb2.ToolCall(name="colour_of", arguments="cat")],
            )],
            [],
            "chat.messages[1].tool_calls[0].arguments",
        ),
    ],
)  # fmt: skip
async def test_bad_tools_are_refused_naming_the_field(
    serving: Serving,
    messages: list[common_pb2.ChatMessage],
    tools: list[common_pb2.Tool],
    field: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await serving.inference.Generate(request(*messages, tools=tools))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith(field), caught.value.details()


async def test_tools_for_a_template_that_cannot_show_them_are_refused(serving: Serving) -> None:
    """The served model's template writes roles and contents only: offered tools would be
    dropped without a word, and the answer look like one that saw them."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await serving.inference.Generate(request(USER, tools=[TOOL]))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(caught.value)
    assert info is not None and info.reason == "TOOLS_NOT_SUPPORTED"
    assert "does not show tools to the model" in (caught.value.details() or "")
    # Without tools the same conversation is answered.
    answered = await serving.inference.Generate(request(USER, tools=[]))
    assert answered.finish_reason in (
        inference_pb2.FINISH_REASON_STOP,
        inference_pb2.FINISH_REASON_LENGTH,
    )


def test_templates_that_write_calls_another_way_cannot_be_offered_tools(served: Served) -> None:
    from transformers import AutoTokenizer

    from tests.trainer.conftest import TOOL_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(served.model)
    tokenizer.chat_template = TOOL_TEMPLATE
    assert tool_use_problem(tokenizer) is None
    # Calls as `[TOOL_CALLS] [...]` (Mistral's form): refused, not served unparsed.
    tokenizer.chat_template = TOOL_TEMPLATE.replace("<tool_call>", "[TOOL_CALLS] ").replace(
        "</tool_call>", ""
    )
    problem = tool_use_problem(tokenizer)
    assert problem is not None and "does not write calls as <tool_call>" in problem
