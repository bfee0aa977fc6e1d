"""A stub OpenAI-compatible chat completions server for the judges' and endpoints' tests: the
`openai` client talks to it over HTTP as it would to any provider. Its models answer by rule:

- `parrot` repeats the word after "Repeat: " in the last turn (right); `mute` never does (wrong);
  `half` is a parrot on even-numbered words and mute on odd ones;
- `always-a` answers "A" to anything (a judge with total position bias);
- `by-content` judges by the reference: in a comparison the answer equal to it wins (`[[C]]` when
  neither or both are), in a rubric an answer equal to it gets `[[10]]` and any other `[[1]]`;
- `mostly-by-content` judges by content, except that it answers garbage about `word7`;
- `garbage` answers without a verdict; `broken` fails with HTTP 500.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Stub:
    base_url: str
    requests: list[dict[str, Any]] = field(default_factory=list)  # bodies, with "authorization"


def _between(text: str, start: str, end: str) -> str:
    found = re.search(re.escape(start) + r"\n(.*?)\n\n" + re.escape(end), text, re.S)
    return found.group(1) if found else ""


def reply(model: str, prompt: str) -> str:
    word = re.search(r"Repeat: (\S+)", prompt)
    if model == "parrot":
        return word.group(1) if word else ""
    if model == "mute":
        return "I cannot help with that."
    if model == "half":
        number = int(re.sub(r"\D", "", word.group(1)) or 0) if word else 1
        return reply("parrot" if number % 2 == 0 else "mute", prompt)
    if model == "always-a":
        return "A"
    if model == "garbage":
        return "I like turtles."
    if model == "mostly-by-content":
        return reply("garbage" if "Repeat: word7\n" in prompt else "by-content", prompt)
    if model == "by-content":
        reference = _between(prompt, "[Reference answer]", "[Answer")
        if "[Answer A]" in prompt:
            a = _between(prompt, "[Answer A]", "[Answer B]")
            b = prompt.split("[Answer B]\n", 1)[1].split("\n\n", 1)[0]
            if (a == reference) != (b == reference):
                return "A is right. [[A]]" if a == reference else "B is right. [[B]]"
            return "They are as good. [[C]]"
        answer = prompt.split("[Answer]\n", 1)[1].split("\n\n", 1)[0]
        return "Right. [[10]]" if answer == reference else "Wrong. [[1]]"
    raise KeyError(model)


class _Handler(BaseHTTPRequestHandler):
    stub: Stub

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        body["authorization"] = self.headers.get("Authorization", "")
        self.stub.requests.append(body)
        if body["model"] == "broken":
            self._send(500, {"error": {"message": "the stub is broken", "type": "server_error"}})
            return
        text = reply(body["model"], body["messages"][-1]["content"])
        self._send(
            200,
            {
                "id": "chatcmpl-stub",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        )

    def _send(self, status: int, document: dict[str, Any]) -> None:
        data = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def openai_stub() -> Iterator[Stub]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    stub = Stub(f"http://127.0.0.1:{server.server_address[1]}/v1")
    server.RequestHandlerClass = type("Handler", (_Handler,), {"stub": stub})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
