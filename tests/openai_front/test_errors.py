"""Refusals through the OpenAI front come in OpenAI's error envelope with the status each
openai-python exception class is raised for, naming the parameter at fault."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.inference.conftest import Served
from tests.openai_front.conftest import Front, start_front

CHAT: Any = [{"role": "user", "content": "Which colour goes with the cat?"}]


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"n": 2}, "n"),
        ({"logit_bias": {"5": 3.0}}, "logit_bias"),
        ({"max_tokens": 10**6}, "max_tokens"),  # refused by InferenceService, named here
        ({"tool_choice": "required", "tools": []}, "tool_choice"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0]",
        ),
        ({"messages": []}, "messages"),
    ],
)
async def test_bad_chat_parameters_are_bad_requests_naming_them(
    front: Front, options: dict[str, Any], param: str
) -> None:
    request = {"model": "tiny", "messages": CHAT, "max_tokens": 4, **options}
    async with front.client() as client:
        with pytest.raises(openai.BadRequestError) as raised:
            await client.chat.completions.create(**request)
    assert raised.value.param == param, raised.value.message
    assert raised.value.type == "invalid_request_error"


async def test_unknown_models_are_not_found(front: Front) -> None:
    async with front.client() as client:
        for model in ("gpt-4o", "orders@prod", "orders:3", "adapters/orders/versions/3"):
            with pytest.raises(openai.NotFoundError) as raised:
                await client.chat.completions.create(model=model, messages=CHAT, max_tokens=4)
            assert raised.value.param == "model", model
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="nope@prod", prompt="hi", max_tokens=4)


async def test_bad_completion_parameters_are_bad_requests(front: Front) -> None:
    async with front.client() as client:
        for options, param in (
            ({"prompt": "hi", "logprobs": 21}, "logprobs"),
            ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
            ({"prompt": "hi", "suffix": "!"}, "suffix"),
            ({"prompt": [3, 10**7], "max_tokens": 2}, "prompt"),
            ({"prompt": "word " * 200, "max_tokens": 2}, "prompt"),  # beyond the context
            ({"prompt": "hi", "stream": True, "logprobs": 1}, "stream"),
        ):
            with pytest.raises(openai.BadRequestError) as raised:
                await client.completions.create(model="tiny", **{"max_tokens": 2, **options})
            assert raised.value.param == param, (options, raised.value.message)


def post(front: Front, path: str, data: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(front.base_url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def test_garbage_bodies_and_unknown_routes_answer_in_the_envelope(front: Front) -> None:
    status, body = await asyncio.to_thread(
        post, front, "/chat/completions", b"\x00{not json", {"content-type": "application/json"}
    )
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = await asyncio.to_thread(
        post, front, "/chat/completions", b"[1, 2]", {"content-type": "application/json"}
    )
    assert status == 400 and body["error"]["message"]
    status, body = await asyncio.to_thread(post, front, "/assistants", b"{}", {})
    assert status == 404 and body["error"]["type"] == "not_found_error"
    for content_type, data in (
        ("application/json", b'{"purpose": "fine-tune"}'),  # not a form
        ("multipart/form-data; boundary=zz", b"--zz\r\nnonsense\r\n--zz--"),
        ("multipart/form-data", b"no boundary"),
    ):
        status, body = await asyncio.to_thread(
            post, front, "/files", data, {"content-type": content_type}
        )
        assert status == 400 and body["error"]["message"], (content_type, body)
    # A body declared beyond the server's message limit (16 MiB) is refused before it is read.
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {17 * 2**20}\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", front.front.port)
    writer.write(head.encode() + b'{"model": "tiny", "prompt": "xxxx')
    await writer.drain()
    answer = await reader.readuntil(b"request_too_large")  # the answer comes before the body
    writer.close()
    assert answer.startswith(b"HTTP/1.1 413")


def write_tokens(path: Path, tokens: dict[str, str]) -> Path:
    entries = [
        {"subject": role, "role": role, "sha256": hashlib.sha256(token.encode()).hexdigest()}
        for role, token in tokens.items()
    ]
    path.write_text(yaml.safe_dump({"tokens": entries}))
    return path


async def test_the_caller_s_token_is_what_the_services_check(
    served: Served, tmp_path: Path
) -> None:
    tokens = write_tokens(tmp_path / "tokens.yaml", {"reader": "read-me", "writer": "write-me"})
    async with start_front(
        served,
        tmp_path,
        server={"auth": {"enabled": True, "tokens_file": str(tokens)}},
        inference={"registry_token": "read-me"},
        evaluation={"service_token": "read-me"},
        retraining={"service_token": "write-me"},
    ) as front:
        async with front.client(api_key="not-a-token") as client:
            with pytest.raises(openai.AuthenticationError):
                await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4)
            with pytest.raises(openai.AuthenticationError):
                await client.models.list()
        async with front.client(api_key="read-me") as client:
            reply = await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4)
            assert reply.choices[0].message.content is not None
            assert [m.id for m in (await client.models.list()).data] == ["tiny"]
            # Uploading data needs a writer: the reader's token is refused as it is on gRPC.
            with pytest.raises(openai.PermissionDeniedError):
                await client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
        # No token at all (openai-python always sends one), or another scheme: 401 too.
        for headers in ({}, {"authorization": "Basic dXNlcjpwYXNz"}):
            request = urllib.request.Request(front.base_url + "/models", headers=headers)
            with pytest.raises(urllib.error.HTTPError) as raised:
                await asyncio.to_thread(urllib.request.urlopen, request, timeout=60)
            assert raised.value.code == 401
            assert json.loads(raised.value.read())["error"]["type"] == "authentication_error"


def mutations(valid: dict[str, Any], seed: int, count: int) -> list[dict[str, Any]]:
    """`valid` with one key's value replaced by a value of another JSON type (or the key
    removed), nested one level into objects and lists: what a careless client sends."""
    rng = random.Random(seed)
    values: list[Any] = [
        None,
        True,
        -1,
        0,
        2**70,
        1.5e308,
        "",
        "x" * 300,
        [],
        [1, "a"],
        {},
        {"k": []},
    ]
    found = []
    for _ in range(count):
        body = json.loads(json.dumps(valid))
        key = rng.choice(list(body))
        target = body[key]
        if (
            isinstance(target, list)
            and target
            and isinstance(target[0], dict)
            and rng.random() < 0.5
        ):
            inner = target[0]
            inner[rng.choice(list(inner))] = rng.choice(values)
        elif rng.random() < 0.1:
            del body[key]
        else:
            body[key] = rng.choice(values)
        found.append(body)
    return found


async def test_mangled_bodies_are_refused_in_the_envelope_never_500(front: Front) -> None:
    """200 mangled requests to each JSON endpoint: each is answered (200 where it still makes
    sense) or refused with a 4xx in OpenAI's envelope; no 500, and the server goes on. (Jobs
    that pass the front's checks reach a server without TrainingService: 501.)"""
    chat = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "temperature": 0,
        "stop": ["x"],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": "none",
        "stream_options": {"include_usage": True},
    }
    completion = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "logprobs": 1, "echo": True}
    job = {
        "model": "tiny",
        "training_file": "0" * 32,
        "hyperparameters": {"n_epochs": 1},
        "method": {"type": "supervised"},
        "metadata": {"a": "b"},
    }
    statuses: Counter[int] = Counter()
    for path, valid in (
        ("/chat/completions", chat),
        ("/completions", completion),
        ("/fine_tuning/jobs", job),
    ):
        for body in mutations(valid, seed=len(path), count=200):
            status, answer = await asyncio.to_thread(
                post, front, path, json.dumps(body).encode(), {"content-type": "application/json"}
            )
            statuses[status] += 1
            if status == 501 and path == "/fine_tuning/jobs":
                # Checked and sent on: this server runs no TrainingService.
                assert answer["error"]["code"] == "unimplemented"
                continue
            assert status < 500, (path, body, answer)
            if status >= 400:
                assert set(answer["error"]) == {"message", "type", "param", "code"}, answer
    assert statuses[200] and statuses[400]  # both answered and refused requests were made
    status, _ = await asyncio.to_thread(
        post,
        front,
        "/completions",
        json.dumps(completion).encode(),
        {"content-type": "application/json"},
    )
    assert status == 200
