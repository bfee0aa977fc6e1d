"""Tool-calling data as OpenAI and LLaMA-Factory write it: one canonical form, validated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.datasets.records import jsonl
from tunefleet.datasets.formats import FileFormat, RecordInvalid, normalise_record
from tunefleet.datasets.pipeline import IngestOptions, Ingestor
from tunefleet.v1.dataset_pb2 import RecordErrorCode

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def openai_record(city: str = "Paris", **changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": f"Weather in {city}?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": json.dumps({"city": city}),
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C, cloudy"},
            {"role": "assistant", "content": f"It is 18C and cloudy in {city}."},
        ],
    }
    record.update(changes)
    return record


def sharegpt_record(city: str = "Paris") -> dict[str, Any]:
    """LLaMA-Factory's convention: tools as a JSON string, function_call and observation turns."""
    call = {"name": "get_weather", "arguments": {"city": city}}
    return {
        "conversations": [
            {"from": "human", "value": f"Weather in {city}?"},
            {"from": "function_call", "value": json.dumps(call)},
            {"from": "observation", "value": "18C, cloudy"},
            {"from": "gpt", "value": f"It is 18C and cloudy in {city}."},
        ],
        "tools": json.dumps([WEATHER["function"]]),
    }


CANONICAL = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}],
    },
    {"role": "tool", "content": "18C, cloudy", "tool_call_id": "call_1", "name": "get_weather"},
    {"role": "assistant", "content": "It is 18C and cloudy in Paris."},
]


def test_openai_tool_calls_with_null_content_normalise() -> None:
    record = normalise_record(openai_record(), FileFormat())
    assert record.messages == CANONICAL
    assert record.tools == [WEATHER["function"]]


def test_openai_legacy_functions_and_function_call() -> None:
    legacy = {
        "functions": [WEATHER["function"]],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {"role": "function", "name": "get_weather", "content": "18C, cloudy"},
            {"role": "assistant", "content": "It is 18C and cloudy in Paris."},
        ],
    }
    record = normalise_record(legacy, FileFormat())
    assert record.messages[1]["tool_calls"][0]["name"] == "get_weather"
    assert record.messages[2]["tool_call_id"] == record.messages[1]["tool_calls"][0]["id"]


def test_llamafactory_sharegpt_tool_calls_normalise_to_the_same_form() -> None:
    record = normalise_record(sharegpt_record(), FileFormat())
    messages = [dict(m) for m in record.messages]
    messages[1]["tool_calls"][0]["id"] = messages[2]["tool_call_id"] = "call_1"
    assert messages == CANONICAL and record.tools == [WEATHER["function"]]


def broken_arguments() -> dict[str, Any]:
    record = openai_record()
    record["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{city: Paris"
    return record


def unanswered() -> dict[str, Any]:
    record = openai_record()
    del record["messages"][2:]  # the call is the last turn
    return record


def weight_after_a_call() -> dict[str, Any]:
    record = openai_record()
    record["messages"][3]["weight"] = 2
    return record


def wrong_answer() -> dict[str, Any]:
    record = openai_record()
    record["messages"][2]["tool_call_id"] = "call_9"
    return record


@pytest.mark.parametrize(
    ("record", "field"),
    [
        (openai_record(tools=[]), "messages[1].tool_calls[0].name"),
        (broken_arguments(), "messages[1].tool_calls[0].arguments"),
        (unanswered(), "messages"),
        (wrong_answer(), "messages[2]"),
        (openai_record(tools="not json"), "tools"),
    ],
)
def test_invalid_tool_calls_are_rejected_naming_the_field(record: Any, field: str) -> None:
    with pytest.raises(RecordInvalid) as raised:
        normalise_record(record, FileFormat())
    assert raised.value.code == RecordErrorCode.RECORD_ERROR_CODE_INVALID_TOOL_CALL
    assert raised.value.field == field


def test_errors_after_a_call_still_name_the_messages() -> None:
    with pytest.raises(RecordInvalid) as raised:
        normalise_record(weight_after_a_call(), FileFormat())
    assert raised.value.field == "messages[3].weight"


def test_a_tool_call_file_ingests_with_its_calls_counted(tmp_path: Path) -> None:
    cities = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Quito", "Accra", "Hanoi"]
    items = [openai_record(city) for city in cities]
    items[3]["messages"][1]["tool_calls"][0]["function"]["arguments"] = json.dumps(
        {"city": "Lima", "contact": "maria.garcia@example.org"}
    )
    items.append(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    )
    ingestor = Ingestor(IngestOptions(validation_fraction=0), tmp_path / "work")
    ingestor.feed(jsonl(items))
    result = ingestor.finish()
    assert result.record_count == 9 and result.validation.tool_call_records == 8
    stored = [orjson.loads(line) for line in result.records_path.read_bytes().splitlines()]
    lima = next(r for r in stored if "Lima" in r["messages"][0]["content"])
    assert lima["messages"][1]["tool_calls"][0]["arguments"] == {
        "city": "Lima",
        "contact": "<EMAIL>",
    }
    assert lima["redacted_pii"] == ["PII_TYPE_EMAIL"] and lima["tools"] == [WEATHER["function"]]


def test_a_llamafactory_tool_call_file_ingests_with_its_calls_counted(tmp_path: Path) -> None:
    cities = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Quito"]
    ingestor = Ingestor(IngestOptions(validation_fraction=0), tmp_path / "work")
    ingestor.feed(jsonl([sharegpt_record(city) for city in cities]))
    result = ingestor.finish()
    assert result.record_count == 6 and result.validation.tool_call_records == 6
    assert result.validation.rejected_records == 0
