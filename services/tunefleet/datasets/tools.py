"""Tool calling in datasets: tool definitions, an assistant's calls and the turns answering them,
in one canonical form whatever the file's convention.

    tools        [{"name", "description", "parameters": <JSON Schema object>}]
    assistant    {"role": "assistant", "content": "" or text,
                  "tool_calls": [{"id", "name", "arguments": <JSON object>}]}
    tool         {"role": "tool", "content": <result>, "tool_call_id", "name"}

OpenAI chat writes `tools` ([{"type": "function", "function": {...}}], or the older
`functions`), assistant `tool_calls` (or the older `function_call`) and `tool` turns with
`tool_call_id`. ShareGPT as LLaMA-Factory writes it has `tools` as a JSON string, `function_call`
turns whose value is a JSON call (or a list of calls) and `observation` turns with the results.

`check_calls` validates a conversation: every call names a declared tool, its arguments are a
JSON object, and every call is answered by a later tool turn (an id names its call; a turn without
one answers the earliest call still open). A conversation without calls may still have tool turns
(tool output given as context), as before tool calls were understood.
"""

from __future__ import annotations

import json
from typing import Any

from tunefleet.v1.dataset_pb2 import RecordErrorCode

INVALID = RecordErrorCode.RECORD_ERROR_CODE_INVALID_TOOL_CALL
EMPTY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}


class ToolError(Exception):
    """A tool definition or call is invalid; `field` names where."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.message, self.field = message, field


def _json(value: Any, field: str, what: str) -> Any:
    """`value`, parsed when it is JSON text."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as error:
        raise ToolError(f"{field} is not valid JSON ({error}); expected {what}", field) from None


def definitions(value: Any, field: str) -> list[dict[str, Any]]:
    """Tool definitions in canonical form."""
    tools = _json(value, field, "a list of tools")
    if not isinstance(tools, list):
        raise ToolError(f"{field} must be a list of tools", field)
    out: list[dict[str, Any]] = []
    for index, tool in enumerate(tools):
        where = f"{field}[{index}]"
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
            if tool.get("type", "function") != "function":
                raise ToolError(f"{where}.type must be function, not {tool['type']!r}", where)
            tool = tool["function"]
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            raise ToolError(f"{where} must be a function with a name", where)
        parameters = tool.get("parameters", EMPTY_SCHEMA)
        if not isinstance(parameters, dict):
            raise ToolError(f"{where}.parameters must be a JSON Schema object", where)
        if any(t["name"] == tool["name"] for t in out):
            raise ToolError(f"{where} declares {tool['name']!r} a second time", where)
        description = tool.get("description", "")
        out.append(
            {
                "name": tool["name"],
                "description": description if isinstance(description, str) else "",
                "parameters": parameters,
            }
        )
    return out


def call(value: Any, field: str, default_id: str) -> dict[str, Any]:
    """One call in canonical form, from OpenAI's `{"id", "type", "function": {...}}`, an older
    `function_call` or LLaMA-Factory's `{"name", "arguments"}`."""
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        identifier = value.get("id") or default_id
        value = value["function"]
    else:
        identifier = (value.get("id") if isinstance(value, dict) else None) or default_id
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        raise ToolError(f"{field} must be a call with a function name", field)
    arguments = _json(value.get("arguments", {}), f"{field}.arguments", "a JSON object")
    if not isinstance(arguments, dict):
        raise ToolError(f"{field}.arguments must be a JSON object", f"{field}.arguments")
    if not isinstance(identifier, str):
        raise ToolError(f"{field}.id must be a string", f"{field}.id")
    return {"id": identifier, "name": value["name"], "arguments": arguments}


def calls(value: Any, field: str, turn: int) -> list[dict[str, Any]]:
    """The calls of one turn: a list (OpenAI `tool_calls`, or a JSON list in a ShareGPT value) or
    a single call; ids default to `call_<turn>_<n>`."""
    parsed = _json(value, field, "a call or a list of calls")
    items = parsed if isinstance(parsed, list) else [parsed]
    if not items:
        raise ToolError(f"{field} is empty", field)
    return [call(item, f"{field}[{n}]", f"call_{turn}_{n}") for n, item in enumerate(items)]


def check_calls(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> None:
    """Every call names a declared tool and is answered; a tool turn answers an open call."""
    if not any(m.get("tool_calls") for m in messages):
        return
    declared = {tool["name"] for tool in tools or []}
    open_calls: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        field = f"messages[{index}]"
        for number, made in enumerate(message.get("tool_calls", [])):
            if made["name"] not in declared:
                known = ", ".join(sorted(declared)) or "none: the record has no tools"
                raise ToolError(
                    f"{field} calls {made['name']!r}, which the record does not declare "
                    f"(its tools: {known})",
                    f"{field}.tool_calls[{number}].name",
                )
            open_calls.append(made)
        if message["role"] != "tool":
            continue
        wanted = message.get("tool_call_id")
        answered = next((c for c in open_calls if c["id"] == wanted), None) if wanted else None
        if answered is None and not wanted and open_calls:
            answered = open_calls[0]
        if answered is None:
            what = f"call {wanted!r}" if wanted else "a call"
            raise ToolError(f"{field} answers {what}, which no earlier turn made open", field)
        open_calls.remove(answered)
        message["tool_call_id"] = answered["id"]
        message.setdefault("name", answered["name"])
    if open_calls:
        raise ToolError(
            f"the call {open_calls[0]['id']!r} of {open_calls[0]['name']!r} is never answered by a "
            "tool turn",
            "messages",
        )
