"""The record formats: detection, validation with stable error codes, and normalisation to one
chat form (lists of role/content messages).

Four formats hold conversations for supervised fine-tuning (Alpaca, ShareGPT, OpenAI chat,
prompt/completion); two hold preferences: pairs of a chosen and a rejected answer (DPO), in the
variants of TRL, LLaMA-Factory and OpenAI, and unpaired answers labelled desirable or not (KTO).
A preference record is never read as SFT data: its format is detected from `chosen`/`rejected`,
`preferred_output` or `label`/`kto_tag` before anything else.

Every check that rejects a record raises `RecordInvalid` with a code from `RecordErrorCode`
(tunefleet.v1) and a message that names the field, so the validation report can say exactly
which line failed and why.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tunefleet.datasets import tools as tool_calls
from tunefleet.v1.dataset_pb2 import DatasetFormat, DatasetKind, RecordErrorCode

ALPACA = DatasetFormat.DATASET_FORMAT_ALPACA
SHAREGPT = DatasetFormat.DATASET_FORMAT_SHAREGPT
OPENAI_CHAT = DatasetFormat.DATASET_FORMAT_OPENAI_CHAT
PROMPT_COMPLETION = DatasetFormat.DATASET_FORMAT_PROMPT_COMPLETION
PREFERENCE = DatasetFormat.DATASET_FORMAT_PREFERENCE
UNPAIRED = DatasetFormat.DATASET_FORMAT_UNPAIRED_PREFERENCE

FORMAT_NAMES = {
    ALPACA: "alpaca",
    SHAREGPT: "sharegpt",
    OPENAI_CHAT: "openai_chat",
    PROMPT_COMPLETION: "prompt_completion",
    PREFERENCE: "preference",
    UNPAIRED: "unpaired_preference",
}
# What each format's records train.
KINDS: dict[DatasetFormat.ValueType, DatasetKind.ValueType] = {
    PREFERENCE: DatasetKind.DATASET_KIND_PREFERENCE,
    UNPAIRED: DatasetKind.DATASET_KIND_UNPAIRED_PREFERENCE,
}
# The keys that identify each format, for detection and for INCONSISTENT_FIELDS messages.
SIGNATURE_KEYS = {
    OPENAI_CHAT: ("messages",),
    SHAREGPT: ("conversations",),
    ALPACA: ("instruction", "output"),
    PROMPT_COMPLETION: ("prompt", "completion"),
    PREFERENCE: ("chosen", "rejected"),
    UNPAIRED: ("completion", "label"),
}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
    "function_call": "assistant",  # LLaMA-Factory: the value is a JSON call (or list of calls)
    "observation": "tool",
}
OPENAI_ROLES = frozenset({"system", "user", "assistant", "tool"})
# Every top-level key each format reads; others are reported as ignored.
KNOWN_KEYS = {
    OPENAI_CHAT: frozenset({"messages", "tools", "functions", "parallel_tool_calls", "cluster"}),
    SHAREGPT: frozenset({"conversations", "system", "tools", "cluster"}),
    ALPACA: frozenset({"instruction", "input", "output", "system", "history", "cluster"}),
    PROMPT_COMPLETION: frozenset({"prompt", "completion", "cluster"}),
    PREFERENCE: frozenset(
        {"prompt", "chosen", "rejected", "instruction", "input", "system", "history"}
        | {"conversations", "preferred_output", "non_preferred_output", "cluster"}
    ),
    UNPAIRED: frozenset(
        {"prompt", "completion", "label", "conversations", "kto_tag", "system", "cluster"}
    ),
}
# Keys that carry images, audio or video (LLaMA-Factory's and others' conventions).
MEDIA_KEYS = ("images", "image", "videos", "video", "audios", "audio")

Message = dict[str, Any]  # {"role", "content"} plus optional "weight" and "name"


@dataclass
class Record:
    """A normalised record: a conversation, or for preference data the prompt and answers."""

    messages: list[Message]  # the conversation (SFT) or the prompt (preference kinds)
    chosen: list[Message] | None = None
    rejected: list[Message] | None = None
    completion: list[Message] | None = None
    desirable: bool | None = None
    tools: list[dict[str, Any]] | None = None  # the functions the assistant may call
    cluster: str | None = None  # records of one cluster are not independent (evaluation)

    def parts(self) -> list[list[Message]]:
        """Every list of messages the record holds (PII is looked for in all of them)."""
        answers = (self.chosen, self.rejected, self.completion)
        return [self.messages, *(part for part in answers if part is not None)]

    def document(self) -> dict[str, Any]:
        """The record's fields as stored (the preference ones only when set)."""
        fields: dict[str, Any] = {"messages": self.messages}
        for key in ("chosen", "rejected", "completion", "desirable", "tools", "cluster"):
            value = getattr(self, key)
            if value is not None:
                fields[key] = value
        return fields

    def as_sft(self) -> Record | None:
        """The SFT record this preference record converts to: the prompt with the chosen (or a
        desirable) answer; None for an undesirable answer."""
        if self.chosen is not None:
            return Record(self.messages + self.chosen, tools=self.tools, cluster=self.cluster)
        if self.completion is not None:
            if not self.desirable:
                return None
            return Record(self.messages + self.completion, tools=self.tools, cluster=self.cluster)
        return self


def kind_of(
    file_format: DatasetFormat.ValueType, wanted: DatasetKind.ValueType
) -> DatasetKind.ValueType:
    """The kind of a dataset of `file_format` built with options.kind `wanted`."""
    if wanted == DatasetKind.DATASET_KIND_SFT:
        return DatasetKind.DATASET_KIND_SFT
    return KINDS.get(file_format, DatasetKind.DATASET_KIND_SFT)


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
    """The format a record's keys point to, or None. Preference keys come first: a record with
    `chosen` and `rejected` is a pair whatever else it has."""
    if ("chosen" in record and "rejected" in record) or "preferred_output" in record:
        return PREFERENCE
    if "kto_tag" in record or ("label" in record and "completion" in record):
        return UNPAIRED
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
    """The messages of an SFT record (see `normalise_record`)."""
    return normalise_record(record, file).messages


def normalise_record(record: object, file: FileFormat) -> Record:
    """Validate one parsed record against the file's format (fixing the format on the first
    detectable record) and return it normalised; raises RecordInvalid."""
    normalised = _normalise(record, file)
    assert isinstance(record, dict)
    if "cluster" in record:
        normalised.cluster = _cluster(record["cluster"])
    return normalised


def _cluster(value: object) -> str:
    """A record's cluster id: a string or an integer, 1 to 128 characters."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RecordInvalid(
            RecordErrorCode.RECORD_ERROR_CODE_INCONSISTENT_FIELDS,
            f"cluster must be a string or an integer, not {type(value).__name__}",
            "cluster",
        )
    text = str(value)
    if not 1 <= len(text) <= 128 or not text.isprintable():
        raise RecordInvalid(
            RecordErrorCode.RECORD_ERROR_CODE_INCONSISTENT_FIELDS,
            "cluster must be 1 to 128 printable characters",
            "cluster",
        )
    return text


def _normalise(record: object, file: FileFormat) -> Record:
    if not isinstance(record, dict):
        raise RecordInvalid(
            RecordErrorCode.RECORD_ERROR_CODE_UNKNOWN_FORMAT,
            f"a record must be a JSON object, not {type(record).__name__}",
        )
    for key in MEDIA_KEYS:
        if key in record:
            raise RecordInvalid(
                RecordErrorCode.RECORD_ERROR_CODE_UNSUPPORTED_MODALITY,
                f"the record has {key!r}: only text can be trained, and a record is not "
                "stripped of part of itself; remove the key (and its placeholders) to train "
                "on the text alone",
                key,
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
    if expected == PREFERENCE:
        return _preference(record, file)
    if expected == UNPAIRED:
        return _unpaired(record, file)
    tools = None
    if expected == ALPACA:
        messages = _alpaca(record)
    elif expected == SHAREGPT:
        messages = _sharegpt(record, file)
        tools = _tools(record, "tools")
    elif expected == OPENAI_CHAT:
        messages = _openai(record)
        tools = _tools(record, "tools") or _tools(record, "functions")
    else:
        messages = _prompt_completion(record)
    check_conversation(messages)
    _check_calls(messages, tools)
    return Record(messages, tools=tools)


def _tools(record: dict[str, Any], key: str) -> list[dict[str, Any]] | None:
    """The record's tool definitions under `key`, or None when it has none."""
    if record.get(key) in (None, "", []):
        return None
    with _tool_errors():
        return tool_calls.definitions(record[key], key)


def _check_calls(messages: list[Message], tools: list[dict[str, Any]] | None) -> None:
    with _tool_errors():
        tool_calls.check_calls(messages, tools)


@contextmanager
def _tool_errors() -> Iterator[None]:
    """A tool definition or call that is invalid rejects the record, naming the field."""
    try:
        yield
    except tool_calls.ToolError as error:
        raise RecordInvalid(tool_calls.INVALID, error.message, error.field) from None


def ignored_keys(record: dict[str, Any], file: FileFormat) -> list[str]:
    """The top-level keys of a valid record that its format does not read."""
    assert file.format is not None
    known = KNOWN_KEYS[file.format]
    return [key for key in record if key not in known]


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
    prompt = _alpaca_prompt(record)
    return [*prompt, {"role": "assistant", "content": _text(record, "output", "output")}]


def _alpaca_prompt(record: dict[str, Any]) -> list[Message]:
    instruction = _text(record, "instruction", "instruction")
    extra = _text(record, "input", "input", required=False)
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
    messages.append({"role": "user", "content": prompt})
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
        if speaker.strip().lower() == "function_call":
            with _tool_errors():
                made = tool_calls.calls(turn.get(keys[1]), f"{field}.{keys[1]}", index)
            previous = messages[-1] if messages else None
            if previous and previous["role"] == "assistant" and "tool_calls" not in previous:
                previous["tool_calls"] = made  # text, then the call: one assistant turn
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": made})
            continue
        content = _text(turn, keys[1], f"{field}.{keys[1]}")
        messages.append({"role": role, "content": content})
    return messages


def _openai(record: dict[str, Any], key: str = "messages", path: str = "") -> list[Message]:
    """The OpenAI-style message list `record[key]`; errors name it as `path` (default: key)."""
    messages: list[Message] = []
    turns = _list(record, key)
    for index, turn in enumerate(turns):
        field = f"{path or key}[{index}]"
        if not isinstance(turn, dict):
            raise RecordInvalid(
                RecordErrorCode.RECORD_ERROR_CODE_UNKNOWN_FORMAT,
                f"{field} must be an object",
                field,
            )
        role = _text(turn, "role", f"{field}.role")
        if role == "function":  # the older form of a tool turn
            role = "tool"
        if role not in OPENAI_ROLES:
            raise RecordInvalid(
                RecordErrorCode.RECORD_ERROR_CODE_UNKNOWN_ROLE,
                f"{field}.role is {role!r}; expected system, user, assistant or tool",
                f"{field}.role",
            )
        made = None
        if role == "assistant" and (turn.get("tool_calls") or turn.get("function_call")):
            calls_key = "tool_calls" if turn.get("tool_calls") else "function_call"
            with _tool_errors():
                made = tool_calls.calls(turn[calls_key], f"{field}.{calls_key}", index)
        if made is not None and turn.get("content") in (None, ""):
            message: Message = {"role": role, "content": "", "tool_calls": made}
        else:
            message = {"role": role, "content": _content(turn, f"{field}.content")}
            if made is not None:
                message["tool_calls"] = made
        if role == "tool" and isinstance(turn.get("tool_call_id"), str):
            message["tool_call_id"] = turn["tool_call_id"]
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


def _content(turn: dict[str, Any], field: str) -> str:
    """An OpenAI message's content: a string, or a list of text parts (joined); a part that is
    not text (an image, audio, a file) refuses the record."""
    content = turn.get("content")
    if not isinstance(content, list):
        return _text(turn, "content", field)
    texts = []
    for index, part in enumerate(content):
        where = f"{field}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            if kind in ("image_url", "input_image", "image", "input_audio", "audio", "file"):
                raise RecordInvalid(
                    RecordErrorCode.RECORD_ERROR_CODE_UNSUPPORTED_MODALITY,
                    f"{where} is a {kind} part: only text can be trained, and a record is not "
                    "stripped of part of itself",
                    where,
                )
            raise RecordInvalid(
                RecordErrorCode.RECORD_ERROR_CODE_NON_STRING_CONTENT,
                f"{where} must be a text part ({{'type': 'text', 'text': ...}}), not "
                f"{_type_name(part) if kind is None else repr(kind)}",
                where,
            )
        texts.append(_text(part, "text", f"{where}.text", required=False))
    text = "".join(texts)
    if not text.strip():
        raise RecordInvalid(
            RecordErrorCode.RECORD_ERROR_CODE_EMPTY_FIELD, f"{field} is empty", field
        )
    return text


def _prompt_completion(record: dict[str, Any]) -> list[Message]:
    return [
        {"role": "user", "content": _text(record, "prompt", "prompt")},
        {"role": "assistant", "content": _text(record, "completion", "completion")},
    ]


# --- preference data ---------------------------------------------------------------------------


def _answer(record: dict[str, Any], key: str, file: FileFormat) -> list[Message]:
    """One answer of a preference record: a string, a message list, or one ShareGPT turn."""
    value = record.get(key)
    if isinstance(value, str) or value is None:
        return [{"role": "assistant", "content": _text(record, key, key)}]
    if isinstance(value, dict):  # LLaMA-Factory's ShareGPT style: {"from": "gpt", "value": ...}
        turn = _sharegpt({"conversations": [value]}, file)
        if turn[-1]["role"] != "assistant":
            raise RecordInvalid(
                RecordErrorCode.RECORD_ERROR_CODE_ROLE_ORDER,
                f"{key} must be an assistant turn",
                key,
            )
        return turn
    answer = _openai(record, key)
    if answer[0]["role"] != "assistant":
        raise RecordInvalid(
            RecordErrorCode.RECORD_ERROR_CODE_ROLE_ORDER,
            f"{key} must start with an assistant turn, not {answer[0]['role']}",
            f"{key}[0]",
        )
    return answer


def _prompt(record: dict[str, Any], file: FileFormat) -> list[Message]:
    """The prompt of a preference record, in whichever variant it comes."""
    if "conversations" in record:
        return _sharegpt(record, file)
    if "instruction" in record:
        return _alpaca_prompt(record)
    if "input" in record and isinstance(record["input"], dict):  # OpenAI's preference format
        return _openai(record["input"], "messages", "input.messages")
    value = record.get("prompt")
    if isinstance(value, list):
        return _openai(record, "prompt")
    return [{"role": "user", "content": _text(record, "prompt", "prompt")}]


def _shared_prompt(record: dict[str, Any]) -> tuple[list[Message], list[Message], list[Message]]:
    """TRL's implicit prompt: `chosen` and `rejected` are whole conversations; the turns they
    share are the prompt."""
    if not (isinstance(record["chosen"], list) and isinstance(record["rejected"], list)):
        raise RecordInvalid(
            RecordErrorCode.RECORD_ERROR_CODE_MISSING_FIELD,
            "prompt is missing: a pair of plain texts has no prompt to answer (give `prompt`, or "
            "`chosen` and `rejected` as conversations that share their first turns)",
            "prompt",
        )
    chosen, rejected = _openai(record, "chosen"), _openai(record, "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1]["role"] == "assistant":
        shared -= 1  # the answers start at the first assistant turn after the last user turn
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _preference(record: dict[str, Any], file: FileFormat) -> Record:
    tools = None
    if "preferred_output" in record or "non_preferred_output" in record:
        prompt = _prompt(record, file)
        chosen = _answer(record, "preferred_output", file)
        rejected = _answer(record, "non_preferred_output", file)
        if isinstance(record.get("input"), dict):
            tools = _tools(record["input"], "tools")
    elif not ({"prompt", "instruction", "conversations"} & record.keys()):
        prompt, chosen, rejected = _shared_prompt(record)
    else:
        prompt = _prompt(record, file)
        chosen, rejected = _answer(record, "chosen", file), _answer(record, "rejected", file)
    for answer in (chosen, rejected):
        check_conversation(prompt + answer)
        _check_calls(prompt + answer, tools)
    if chosen == rejected:
        raise RecordInvalid(
            RecordErrorCode.RECORD_ERROR_CODE_NO_PREFERENCE,
            "chosen and rejected are the same answer: the pair prefers nothing",
            "rejected",
        )
    return Record(prompt, chosen=chosen, rejected=rejected, tools=tools)


def _unpaired(record: dict[str, Any], file: FileFormat) -> Record:
    key = "kto_tag" if "kto_tag" in record else "label"
    label = record.get(key)
    if not isinstance(label, bool):
        raise RecordInvalid(
            RecordErrorCode.RECORD_ERROR_CODE_UNKNOWN_FORMAT,
            f"{key} must be true (a desirable answer) or false, not {_type_name(label)}",
            key,
        )
    if "conversations" in record:  # LLaMA-Factory: the last turn is the answer
        turns = _sharegpt(record, file)
        prompt, completion = turns[:-1], turns[-1:]
    else:
        prompt, completion = _prompt(record, file), _answer(record, "completion", file)
    check_conversation(prompt + completion)
    if completion[0]["role"] != "assistant":
        raise RecordInvalid(
            RecordErrorCode.RECORD_ERROR_CODE_ROLE_ORDER,
            "the answer (the last turn) must be an assistant turn",
            "completion",
        )
    return Record(prompt, completion=completion, desirable=label)
