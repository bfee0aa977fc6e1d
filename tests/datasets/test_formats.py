"""Each format normalises to chat form; each error code names the field and reason."""

from __future__ import annotations

from typing import Any

import pytest

from tunefleet.datasets.formats import FileFormat, RecordInvalid, normalise
from tunefleet.v1.dataset_pb2 import DatasetFormat, RecordErrorCode


def test_alpaca_with_input_system_and_history() -> None:
    record = {
        "system": "You are terse.",
        "history": [["What is 2+2?", "4"]],
        "instruction": "Translate to French",
        "input": "good morning",
        "output": "bonjour",
    }
    file = FileFormat()
    assert normalise(record, file) == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Translate to French\n\ngood morning"},
        {"role": "assistant", "content": "bonjour"},
    ]
    assert file.format == DatasetFormat.DATASET_FORMAT_ALPACA


@pytest.mark.parametrize("keys", [("from", "value"), ("role", "content")])
def test_sharegpt_both_variants(keys: tuple[str, str]) -> None:
    speakers = {"from": ["system", "human", "gpt"], "role": ["system", "user", "assistant"]}[
        keys[0]
    ]
    record = {"conversations": [{keys[0]: s, keys[1]: f"text {i}"} for i, s in enumerate(speakers)]}
    assert [m["role"] for m in normalise(record, FileFormat())] == ["system", "user", "assistant"]


def test_openai_chat_with_tools_and_weights() -> None:
    record = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "Calling the weather tool.", "weight": 0},
            {"role": "tool", "name": "weather", "content": "18C, cloudy"},
            {"role": "assistant", "content": "It is 18C and cloudy.", "weight": 1},
        ]
    }
    messages = normalise(record, FileFormat())
    assert messages[1]["weight"] == 0.0 and messages[2]["name"] == "weather"


def test_prompt_completion() -> None:
    assert normalise({"prompt": "2+2=", "completion": "4"}, FileFormat()) == [
        {"role": "user", "content": "2+2="},
        {"role": "assistant", "content": "4"},
    ]


ERRORS: list[tuple[str, Any, str, str]] = [
    # (file format, record, code, field)
    ("alpaca", {"instruction": "x", "input": ""}, "MISSING_FIELD", "output"),
    ("alpaca", {"instruction": "  ", "output": "y"}, "EMPTY_FIELD", "instruction"),
    ("alpaca", {"instruction": "x", "output": 42}, "NON_STRING_CONTENT", "output"),
    (
        "sharegpt",
        {"conversations": [{"from": "robot", "value": "hi"}]},
        "UNKNOWN_ROLE",
        "conversations[0].from",
    ),
    (
        "openai_chat",
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        "ROLE_ORDER",
        "messages[1]",
    ),
    (
        "openai_chat",
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "b"},
                {"role": "assistant", "content": "c"},
            ]
        },
        "ROLE_ORDER",
        "messages[1]",
    ),
    (
        "openai_chat",
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]},
        "NO_ASSISTANT_TURN",
        "",
    ),
    (
        "openai_chat",
        {
            "messages": [
                {"role": "user", "content": ["part"]},
                {"role": "assistant", "content": "b"},
            ]
        },
        "NON_STRING_CONTENT",
        "messages[0].content[0]",
    ),
    ("openai_chat", {"prompt": "a", "completion": "b"}, "INCONSISTENT_FIELDS", ""),
    ("alpaca", {"question": "a", "answer": "b"}, "INCONSISTENT_FIELDS", ""),
    ("alpaca", [1, 2], "UNKNOWN_FORMAT", ""),
]


@pytest.mark.parametrize(("kind", "record", "code", "field"), ERRORS)
def test_error_codes(kind: str, record: Any, code: str, field: str) -> None:
    file = FileFormat(DatasetFormat.Value(f"DATASET_FORMAT_{kind.upper()}"))
    with pytest.raises(RecordInvalid) as raised:
        normalise(record, file)
    assert RecordErrorCode.Name(raised.value.code) == f"RECORD_ERROR_CODE_{code}"
    assert raised.value.field == field
    assert raised.value.message


def test_sharegpt_variants_cannot_be_mixed_in_one_file() -> None:
    file = FileFormat()
    normalise(
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}, file
    )
    with pytest.raises(RecordInvalid) as raised:
        normalise(
            {
                "conversations": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                ]
            },
            file,
        )
    assert raised.value.code == RecordErrorCode.RECORD_ERROR_CODE_INCONSISTENT_FIELDS
    assert "from/value" in raised.value.message


def test_first_detectable_record_fixes_the_file_format() -> None:
    file = FileFormat()
    with pytest.raises(RecordInvalid):
        normalise({"text": "no format"}, file)
    assert file.format is None
    normalise({"prompt": "a", "completion": "b"}, file)
    assert file.format == DatasetFormat.DATASET_FORMAT_PROMPT_COMPLETION


@pytest.mark.parametrize(
    ("record", "field"),
    [
        (
            {
                "conversations": [
                    {"from": "human", "value": "<image>What is in the picture?"},
                    {"from": "gpt", "value": "A cat."},
                ],
                "images": ["cat.jpg"],
            },
            "images",
        ),
        ({"instruction": "Transcribe", "output": "hello", "audios": ["a.wav"]}, "audios"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is this?"},
                            {"type": "image_url", "image_url": {"url": "https://x/cat.png"}},
                        ],
                    },
                    {"role": "assistant", "content": "A cat."},
                ]
            },
            "messages[0].content[1]",
        ),
    ],
)
def test_images_audio_and_video_are_refused_naming_the_key(record: Any, field: str) -> None:
    with pytest.raises(RecordInvalid) as raised:
        normalise(record, FileFormat())
    assert RecordErrorCode.Name(raised.value.code) == "RECORD_ERROR_CODE_UNSUPPORTED_MODALITY"
    assert raised.value.field == field


def test_openai_text_parts_are_joined() -> None:
    record = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "there"}],
            },
            {"role": "assistant", "content": "Hi."},
        ]
    }
    assert normalise(record, FileFormat())[0] == {"role": "user", "content": "Hello, there"}


def test_keys_the_format_does_not_read_are_named() -> None:
    from tunefleet.datasets.formats import ignored_keys

    file = FileFormat()
    record = {"instruction": "a", "output": "b", "id": 7, "source": "web"}
    normalise(record, file)
    assert ignored_keys(record, file) == ["id", "source"]
