"""Conversations rendered with a model's own chat template, the same way for training and for
serving, and the tool calls a model writes read back from its text.

Messages are tunefleet's canonical form (DatasetService's records): `role`, `content`, and for
tool use an assistant's `tool_calls` (`id`, `name`, `arguments` as an object) and a tool turn's
`tool_call_id` and `name`. Templates read OpenAI's form, so calls go to them as
`{"type": "function", "function": {"name", "arguments"}}` and tools as
`{"type": "function", "function": tool}`.

Tool calls are read back in the form of Hermes-style templates (Qwen 2.5 and 3, Hermes,
SmolLM3 and most open models trained for tools since): each call a JSON object with `name` and
`arguments` between `<tool_call>` and `</tool_call>`. Templates that write calls otherwise are
refused for tool use at serving time rather than answered with unparsed text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

Message = dict[str, Any]
PROBE_TOOL = "tunefleet_probe_tool"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)


def template_message(message: Message) -> dict[str, Any]:
    """A turn in the form chat templates read (OpenAI's, for calls and their answers)."""
    out: dict[str, Any] = {"role": message["role"], "content": message["content"]}
    if message.get("tool_calls"):
        out["tool_calls"] = [
            {
                "id": made["id"],
                "type": "function",
                "function": {"name": made["name"], "arguments": made["arguments"]},
            }
            for made in message["tool_calls"]
        ]
    for key in ("tool_call_id", "name"):
        if message["role"] == "tool" and message.get(key):
            out[key] = message[key]
    return out


def render(
    tokenizer: Any,
    messages: list[Message],
    generation_prompt: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    options: dict[str, Any] = {}
    if tools:
        options["tools"] = [{"type": "function", "function": tool} for tool in tools]
    text: str = tokenizer.apply_chat_template(
        [template_message(m) for m in messages],
        tokenize=False,
        add_generation_prompt=generation_prompt,
        **options,
    )
    return text


def _probe_tool() -> dict[str, Any]:
    return {"name": PROBE_TOOL, "description": "", "parameters": {"type": "object"}}


def renders_tool_calls(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template writes an assistant's tool calls into the text."""
    messages: list[Message] = [
        {"role": "user", "content": "Call the tool."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "call_0", "name": PROBE_TOOL, "arguments": {"probe": 1}}],
        },
    ]
    try:
        prompt = render(tokenizer, messages[:1], generation_prompt=True, tools=[_probe_tool()])
        full = render(tokenizer, messages, tools=[_probe_tool()])
    except Exception:
        return False
    # The call must be in the assistant's part (the tools list may name the tool before it).
    return full.startswith(prompt) and PROBE_TOOL in full[len(prompt) :]


def tool_use_problem(tokenizer: Any) -> str | None:
    """Why tools cannot be served with this tokenizer's template, or None: the template must
    show the tools to the model, and write calls in the form `parse_tool_calls` reads."""
    try:
        prompt = render(tokenizer, [{"role": "user", "content": "?"}], True, [_probe_tool()])
    except Exception as error:
        return f"its chat template fails with tools ({type(error).__name__})"
    if PROBE_TOOL not in prompt:
        return "its chat template does not show tools to the model"
    if CALL_OPEN not in (getattr(tokenizer, "chat_template", "") or ""):
        return (
            f"its chat template does not write calls as {CALL_OPEN}{{json}}{CALL_CLOSE}, the "
            "form tunefleet reads"
        )
    return None


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as text


def parse_tool_calls(text: str, tools: set[str]) -> tuple[str, list[ParsedCall]] | None:
    """The content before the first call and the calls a model's text makes; None when the text
    has call markers that do not read as calls of the declared tools (a JSON object with a
    declared `name` and object `arguments`), so that the caller keeps the text as it is."""
    if CALL_OPEN not in text:
        return text, []
    calls = []
    for body in _CALL.findall(text):
        try:
            call = json.loads(body)
        except ValueError:
            return None
        if not isinstance(call, dict):
            return None
        arguments = call.get("arguments", call.get("parameters", {}))
        if call.get("name") not in tools or not isinstance(arguments, dict):
            return None
        calls.append(ParsedCall(call["name"], json.dumps(arguments, ensure_ascii=False)))
    start = text.index(CALL_OPEN)
    if _CALL.sub("", text[start:]).strip():
        return None  # text after or between calls, or an unclosed call: not a clean call list
    return text[:start].strip(), calls
