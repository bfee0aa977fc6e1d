"""The checks every request gets before a service sees it, whatever its method: one validator
for every field of every message, driven by the descriptors.

- No string holds a NUL character (PostgreSQL cannot store one, and no text needs one).
- Names, ids, filters, model names, tokens and label keys and values (every string field but the
  free text ones below) hold no control characters (tab, newline, escape, ...) and are at most
  MAX_NAME_BYTES long in UTF-8.
- Every enum field holds a value its enum defines (proto3 lets any number through).

The error names the field by its path (`training_job.lora.target_modules[2]`) and never
echoes the value.
"""

from __future__ import annotations

import unicodedata

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from tunefleet.core.errors import InvalidArgument

MAX_NAME_BYTES = 512  # the longest name column (base_model) holds 512 characters
# Free text: prompts, chat content, descriptions, comments, log lines, stop strings.
FREE_TEXT = frozenset(
    {
        "content",
        "prompt",
        "comment",
        "corrected_text",
        "description",
        "message",
        "text",
        "explanation",
        "reason",
        "stop",
        "string_value",  # google.protobuf.Value: hyperparameters and other free-form documents
    }
)
_STRING, _ENUM = FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_ENUM


def check_request(message: Message) -> None:
    """INVALID_ARGUMENT naming the first field of `message` that breaks the rules above."""
    _check(message, "")


def _check(message: Message, prefix: str) -> None:
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field, value_field = field.message_type.fields
            for key, item in value.items():
                if key_field.type == _STRING:
                    _check_string(key_field.name, key, f"{path} key")
                _check_value(value_field, item, f"{path}[{_label(key)}]")
        elif field.is_repeated:
            for index, item in enumerate(value):
                _check_value(field, item, f"{path}[{index}]")
        else:
            _check_value(field, value, path)


def _check_value(field: FieldDescriptor, value: object, path: str) -> None:
    if field.type == _STRING:
        assert isinstance(value, str)
        _check_string(field.name, value, path)
    elif field.type == _ENUM:
        assert field.enum_type is not None and isinstance(value, int)
        if value not in field.enum_type.values_by_number:
            raise InvalidArgument(path, f"{value} is not a value of {field.enum_type.name}")
    elif isinstance(value, Message):
        _check(value, f"{path}.")


def _check_string(name: str, value: str, path: str) -> None:
    if "\x00" in value:
        raise InvalidArgument(path, "contains a NUL character")
    if name in FREE_TEXT:
        return
    size = len(value.encode())
    if size > MAX_NAME_BYTES:
        raise InvalidArgument(path, f"is {size} bytes long; at most {MAX_NAME_BYTES}")
    for index, character in enumerate(value):
        if unicodedata.category(character) == "Cc":
            raise InvalidArgument(
                path, f"contains the control character U+{ord(character):04X} at {index}"
            )


def _label(key: object) -> str:
    text = str(key)
    return text if len(text) <= 64 and text.isprintable() else "..."
