"""The four record formats: detection, validation with stable error codes, and normalisation to
one chat form (a list of role/content messages).

Every check that rejects a record raises `RecordInvalid` with a code from `RecordErrorCode`
(tunefleet.v1) and a message that names the field, so the validation report can say exactly
which line failed and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunefleet.v1.dataset_pb2 import DatasetFormat, RecordErrorCode

ALPACA = DatasetFormat.DATASET_FORMAT_ALPACA
SHAREGPT = DatasetFormat.DATASET_FORMAT_SHAREGPT
OPENAI_CHAT = DatasetFormat.DATASET_FORMAT_OPENAI_CHAT
PROMPT_COMPLETION = DatasetFormat.DATASET_FORMAT_PROMPT_COMPLETION

FORMAT_NAMES = {
    ALPACA: "alpaca",
    SHAREGPT: "sharegpt",
    OPENAI_CHAT: "openai_chat",
    PROMPT_COMPLETION: "prompt_completion",
}
# The keys that identify each format, for detection and for INCONSISTENT_FIELDS messages.
SIGNATURE_KEYS = {
    OPENAI_CHAT: ("messages",),
    SHAREGPT: ("conversations",),
    ALPACA: ("instruction", "output"),
    PROMPT_COMPLETION: ("prompt", "completion"),
}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
}
OPENAI_ROLES = frozenset({"system", "user", "assistant", "tool"})

Message = dict[str, Any]  # {"role", "content"} plus optional "weight" and "name"


class RecordInvalid(Exception):
    """A record failed validation."""

    def __init__(self, code: RecordErrorCode.ValueType, message: str, field: str = "") -> None:
        super().__init__(message)
        self.code, self.message, self.field = code, message, field


@dataclass
class FileFormat:
    """What the file has shown so far: its format, and for ShareGPT which turn keys it uses."""

    format: DatasetFormat.ValueType | None = None
    sharegpt_keys: tuple[str, str] | None = None  # ("from", "value") or ("role", "content")


def detect(record: dict[str, Any]) -> DatasetFormat.ValueType | None:
    """The format a record's keys point to, or None."""
    if "messages" in record:
        return OPENAI_CHAT
    if "conversations" in record:
        return SHAREGPT
    if "instruction" in record or ("output" in record and "input" in record):
        return ALPACA
    if "prompt" in record or "completion" in record:
        return PROMPT_COMPLETION
    return None


def normalise(record: object, file: FileFormat) -> list[Message]:
    """Validate one parsed record against the file's format (fixing the format on the first
    detectable record) and return its messages; raises RecordInvalid."""
    if not isinstance(record, dict):
        raise RecordInvalid(
            RecordErrorCode.RECORD_ERROR_CODE_UNKNOWN_FORMAT,
            f"a record must be a JSON object, not {type(record).__name__}",
        )
    own = detect(record)
    if file.format is None:
        if own is None:
            raise RecordInvalid(
                RecordErrorCode.RECORD_ERROR_CODE_UNKNOWN_FORMAT,
                f"fields {_keys(record)} match no known format (alpaca, sharegpt, openai_chat, "
                "prompt_completion)",
            )
        file.format = own
    expected = file.format
    if own is not None and own != expected:
        raise RecordInvalid(
            RecordErrorCode.RECORD_ERROR_CODE_INCONSISTENT_FIELDS,
            f"record has {FORMAT_NAMES[own]} fields {_keys(record)} but the file is "
            f"{FORMAT_NAMES[expected]}",
        )
    if own is None:
        wanted = ", ".join(SIGNATURE_KEYS[expected])
        raise RecordInvalid(
            RecordErrorCode.RECORD_ERROR_CODE_INCONSISTENT_FIELDS,
            f"record has fields {_keys(record)}; the file is {FORMAT_NAMES[expected]}, which "
            f"uses {wanted}",
        )
    if expected == ALPACA:
        messages = _alpaca(record)
    elif expected == SHAREGPT:
        messages = _sharegpt(record, file)
    elif expected == OPENAI_CHAT:
        messages = _openai(record)
    else:
        messages = _prompt_completion(record)
    check_conversation(messages)
    return messages


def check_conversation(messages: list[Message]) -> None:
    """Roles in a trainable order: an optional system turn first, then user and assistant turns
    alternating from a user turn, tool results only after an assistant turn, and at least one
    assistant turn."""
    previous = None
    for index, message in enumerate(messages):
        role = message["role"]
        field = f"messages[{index}]"
        if role == "system":
            if index != 0:
                raise RecordInvalid(
                    RecordErrorCode.RECORD_ERROR_CODE_ROLE_ORDER,
                    f"a system turn may only come first, found one at turn {index}",
                    field,
                )
        elif role == "user":
            if previous == "user":
                raise RecordInvalid(
                    RecordErrorCode.RECORD_ERROR_CODE_ROLE_ORDER,
                    f"two user turns in a row at turns {index - 1} and {index}",
                    field,
                )
        elif role == "assistant":
            if previous in (None, "system", "assistant"):
                what = (
                    "follows another assistant turn" if previous else "comes before any user turn"
                )
                raise RecordInvalid(
                    RecordErrorCode.RECORD_ERROR_CODE_ROLE_ORDER,
                    f"the assistant turn at turn {index} {what}",
                    field,
                )
        elif role == "tool" and previous not in ("assistant", "tool"):
            raise RecordInvalid(
                RecordErrorCode.RECORD_ERROR_CODE_ROLE_ORDER,
                f"the tool turn at turn {index} does not follow an assistant turn",
                field,
            )
        previous = role
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordInvalid(
            RecordErrorCode.RECORD_ERROR_CODE_NO_ASSISTANT_TURN,
            "the conversation has no assistant turn to learn from",
        )


def _keys(record: dict[str, Any]) -> str:
    return "(" + ", ".join(sorted(record)[:8]) + ")"


def _text(record: dict[str, Any], key: str, field: str, *, required: bool = True) -> str:
    if key not in record or (record[key] is None and not required):
        if required:
            raise RecordInvalid(
                RecordErrorCode.RECORD_ERROR_CODE_MISSING_FIELD, f"{field} is missing", field
            )
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise RecordInvalid(
            RecordErrorCode.RECORD_ERROR_CODE_NON_STRING_CONTENT,
            f"{field} must be a string, not {_type_name(value)}",
            field,
        )
    if required and not value.strip():
        raise RecordInvalid(
            RecordErrorCode.RECORD_ERROR_CODE_EMPTY_FIELD, f"{field} is empty", field
        )
    return value


def _list(record: dict[str, Any], key: str) -> list[Any]:
    if key not in record:
        raise RecordInvalid(
            RecordErrorCode.RECORD_ERROR_CODE_MISSING_FIELD, f"{key} is missing", key
        )
    value = record[key]
    if not isinstance(value, list):
        raise RecordInvalid(
            RecordErrorCode.RECORD_ERROR_CODE_UNKNOWN_FORMAT,
            f"{key} must be a list, not {_type_name(value)}",
            key,
        )
    if not value:
        raise RecordInvalid(RecordErrorCode.RECORD_ERROR_CODE_EMPTY_FIELD, f"{key} is empty", key)
    return value


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _alpaca(record: dict[str, Any]) -> list[Message]:
    instruction = _text(record, "instruction", "instruction")
    extra = _text(record, "input", "input", required=False)
    output = _text(record, "output", "output")
    system = _text(record, "system", "system", required=False)
    messages: list[Message] = [{"role": "system", "content": system}] if system.strip() else []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise RecordInvalid(
            RecordErrorCode.RECORD_ERROR_CODE_UNKNOWN_FORMAT,
            f"history must be a list of [user, assistant] pairs, not {_type_name(history)}",
            "history",
        )
    for index, pair in enumerate(history):
        field = f"history[{index}]"
        if not (isinstance(pair, list) and len(pair) == 2):
            raise RecordInvalid(
                RecordErrorCode.RECORD_ERROR_CODE_UNKNOWN_FORMAT,
                f"{field} must be a [user, assistant] pair",
                field,
            )
        user = _text({"v": pair[0]}, "v", f"{field}[0]")
        assistant = _text({"v": pair[1]}, "v", f"{field}[1]")
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return messages


def _sharegpt(record: dict[str, Any], file: FileFormat) -> list[Message]:
    turns = _list(record, "conversations")
    messages: list[Message] = []
    system = _text(record, "system", "system", required=False)
    if system.strip():
        messages.append({"role": "system", "content": system})
    for index, turn in enumerate(turns):
        field = f"conversations[{index}]"
        if not isinstance(turn, dict):
            raise RecordInvalid(
                RecordErrorCode.RECORD_ERROR_CODE_UNKNOWN_FORMAT,
                f"{field} must be an object",
                field,
            )
        keys = ("from", "value") if "from" in turn or "value" in turn else ("role", "content")
        if file.sharegpt_keys is None:
            file.sharegpt_keys = keys
        elif keys != file.sharegpt_keys:
            raise RecordInvalid(
                RecordErrorCode.RECORD_ERROR_CODE_INCONSISTENT_FIELDS,
                f"{field} uses {keys[0]}/{keys[1]} but the file uses "
                f"{file.sharegpt_keys[0]}/{file.sharegpt_keys[1]}",
                field,
            )
        speaker = _text(turn, keys[0], f"{field}.{keys[0]}")
        role = SHAREGPT_ROLES.get(speaker.strip().lower())
        if role is None:
            raise RecordInvalid(
                RecordErrorCode.RECORD_ERROR_CODE_UNKNOWN_ROLE,
                f"{field}.{keys[0]} is {speaker!r}; expected one of human, gpt, system "
                "(or user, assistant, tool)",
                f"{field}.{keys[0]}",
            )
        content = _text(turn, keys[1], f"{field}.{keys[1]}")
        messages.append({"role": role, "content": content})
    return messages


def _openai(record: dict[str, Any]) -> list[Message]:
    messages: list[Message] = []
    for index, turn in enumerate(_list(record, "messages")):
        field = f"messages[{index}]"
        if not isinstance(turn, dict):
            raise RecordInvalid(
                RecordErrorCode.RECORD_ERROR_CODE_UNKNOWN_FORMAT,
                f"{field} must be an object",
                field,
            )
        role = _text(turn, "role", f"{field}.role")
        if role not in OPENAI_ROLES:
            raise RecordInvalid(
                RecordErrorCode.RECORD_ERROR_CODE_UNKNOWN_ROLE,
                f"{field}.role is {role!r}; expected system, user, assistant or tool",
                f"{field}.role",
            )
        message: Message = {"role": role, "content": _text(turn, "content", f"{field}.content")}
        if "weight" in turn:
            weight = turn["weight"]
            if weight not in (0, 1) or isinstance(weight, bool):
                raise RecordInvalid(
                    RecordErrorCode.RECORD_ERROR_CODE_UNKNOWN_FORMAT,
                    f"{field}.weight must be 0 or 1, not {weight!r}",
                    f"{field}.weight",
                )
            message["weight"] = float(weight)
        if role == "tool" and isinstance(turn.get("name"), str):
            message["name"] = turn["name"]
        messages.append(message)
    return messages


def _prompt_completion(record: dict[str, Any]) -> list[Message]:
    return [
        {"role": "user", "content": _text(record, "prompt", "prompt")},
        {"role": "assistant", "content": _text(record, "completion", "completion")},
    ]
