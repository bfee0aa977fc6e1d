"""Chat and text completions through the OpenAI front with the `openai` client, checked against
InferenceService's own answers and plain PEFT."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from tests.inference.conftest import MAX_TOKENS, PROMPTS, Served, reference
from tests.openai_front.conftest import Front

CHAT: Any = [
    {"role": "system", "content": "Answer with one colour."},
    {"role": "user", "content": "And the owl?"},
]


def expected_chat(served: Served, adapter: str | None) -> str:
    """Plain PEFT's greedy answer to CHAT, rendered with the model's chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(served.model))
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = reference(served, adapter, str(prompt), MAX_TOKENS)
    return str(tokenizer.decode(ids, skip_special_tokens=True))


async def test_models_list_the_base_model_and_servable_aliases_and_versions(
    front: Front, served: Served
) -> None:
    version = await front.serving.register("orders", served.adapters["alpha"])
    await front.serving.alias("prod", version)
    await front.serving.register("orders", served.adapters["delta"])  # DoRA: PEFT serves it
    async with front.client() as client:
        models = {model.id: model for model in (await client.models.list()).data}
        assert list(models) == ["tiny", "orders@prod", "orders:1", "orders:2"]
        assert models["orders@prod"].model_extra == {
            "root": "adapters/orders@prod",
            "parent": "tiny",
        }
        assert models["tiny"].model_extra == {"root": "tiny", "parent": None}
        one = await client.models.retrieve("orders:1")
        assert one.id == "orders:1" and one.model_extra["root"] == version
        with pytest.raises(openai.NotFoundError) as raised:
            await client.models.retrieve("orders:7")
        assert raised.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("gpt-4o")


async def test_chat_answers_as_the_service_does_plain_and_streamed(
    front: Front, served: Served
) -> None:
    version = await front.serving.register("orders", served.adapters["alpha"])
    await front.serving.alias("prod", version)
    async with front.client() as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="orders@prod", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0
        )
        reply = raw.parse()
        assert raw.headers["x-tunefleet-adapter-version"] == version
        text = reply.choices[0].message.content
        assert text == expected_chat(served, "alpha")
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens <= MAX_TOKENS and reply.usage.prompt_tokens > 0
        assert len(reply.id) == 32  # tunefleet's response id, for feedback

        stream = await client.chat.completions.create(
            model="orders@prod",
            messages=CHAT,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text
        assert chunks[-1].usage.total_tokens == reply.usage.total_tokens
        assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason

        base = await client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0
        )
        assert base.choices[0].message.content == expected_chat(served, None) != text


def prompt_logprobs(served: Served, adapter: str | None, ids: list[int]) -> tuple[list[float], int]:
    """Plain transformers (+ PEFT): each token's log-probability after those before it, and the
    greedy next token."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(served.model))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(served.adapters[adapter]))
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, -1)
    return [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))], int(logits[-1].argmax())


async def test_echoed_prompt_logprobs_are_plain_peft_s_as_lm_eval_asks_for_them(
    front: Front, served: Served
) -> None:
    """lm-evaluation-harness's loglikelihood request: token ids, max_tokens 1, logprobs 1,
    echo. Every prompt token but the first carries its log-probability, then the generated
    token, which is the most likely in its place."""
    from transformers import AutoTokenizer

    version = await front.serving.register("orders", served.adapters["alpha"])
    await front.serving.alias("prod", version)
    tokenizer = AutoTokenizer.from_pretrained(str(served.model))
    texts = [PROMPTS[0], PROMPTS[1] + " Blue"]
    prompts = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    async with front.client() as client:
        reply = await client.completions.create(
            model="orders@prod", prompt=prompts, max_tokens=1, logprobs=1, echo=True, temperature=0
        )
        assert [choice.index for choice in reply.choices] == [0, 1]
        for ids, choice in zip(prompts, reply.choices, strict=True):
            expected, greedy = prompt_logprobs(served, "alpha", ids)
            logprobs = choice.logprobs
            assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
            assert logprobs.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)
            assert len(logprobs.tokens) == len(ids) + 1
            assert logprobs.tokens[-1] == tokenizer.decode([greedy])
            for token, top in zip(
                logprobs.token_logprobs[1:], logprobs.top_logprobs[1:], strict=True
            ):
                assert len(top) == 1 and max(top.values()) >= token - 1e-6
            assert logprobs.token_logprobs[-1] == max(logprobs.top_logprobs[-1].values())
            assert choice.text.startswith(tokenizer.decode(ids[:1]))
            assert logprobs.text_offset[0] == 0
        # A text prompt is echoed as it was sent, its tokens scored the same.
        by_text = await client.completions.create(
            model="orders@prod", prompt=texts[1], max_tokens=1, logprobs=2, echo=True, temperature=0
        )
        choice = by_text.choices[0]
        assert choice.text.startswith(texts[1])
        assert choice.logprobs.token_logprobs == pytest.approx(
            reply.choices[1].logprobs.token_logprobs, abs=1e-5
        )
        # Two tokens, keyed by text (tokens that decode alike share a key, as in OpenAI's API).
        assert all(1 <= len(top) <= 2 for top in choice.logprobs.top_logprobs[1:])
        # max_tokens 0 with echo scores the prompt alone, under the base model here.
        scored = await client.completions.create(
            model="tiny", prompt=prompts[0], max_tokens=0, logprobs=0, echo=True
        )
        expected, _ = prompt_logprobs(served, None, prompts[0])
        assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
        assert scored.usage.completion_tokens == 0
        raw = await client.completions.with_raw_response.create(
            model="orders@prod", prompt=prompts[0], max_tokens=0, logprobs=0, echo=True
        )
        assert raw.headers["x-tunefleet-adapter-version"] == version  # the version that scored


async def test_text_completions_plain_and_streamed_equal_plain_peft(
    front: Front, served: Served
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(served.model))
    expected = tokenizer.decode(
        reference(served, None, PROMPTS[0], MAX_TOKENS), skip_special_tokens=True
    )
    async with front.client() as client:
        reply = await client.completions.create(
            model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0
        )
        assert reply.choices[0].text == expected and reply.choices[0].logprobs is None
        stream = await client.completions.create(
            model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        assert "".join([chunk.choices[0].text async for chunk in stream]) == expected


async def test_langchain_s_chat_openai_completes_a_chat(front: Front, served: Served) -> None:
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    version = await front.serving.register("orders", served.adapters["alpha"])
    await front.serving.alias("prod", version)
    chat = ChatOpenAI(
        base_url=front.base_url,
        api_key="unused",
        model="orders@prod",
        temperature=0,
        max_tokens=MAX_TOKENS,
        max_retries=0,
    )
    messages = [SystemMessage(CHAT[0]["content"]), HumanMessage(CHAT[1]["content"])]
    reply = await chat.ainvoke(messages)
    assert reply.content == expected_chat(served, "alpha")
    assert reply.response_metadata["model_name"] == "orders@prod"
    streamed = "".join([str(chunk.content) async for chunk in chat.astream(messages)])
    assert streamed == reply.content


async def wait_for(condition: Any, what: str) -> None:
    for _ in range(600):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"waited 30 s for {what}")


async def test_a_client_that_leaves_a_stream_stops_its_generation(front: Front) -> None:
    """The front closes the gRPC stream when the HTTP client goes: InferenceService counts the
    request cancelled, not served to its end."""
    registry = front.serving.registry
    assert registry is not None

    def cancelled() -> float:
        labels = {"adapter": "base", "version": "", "outcome": "cancelled"}
        return registry.get_sample_value("tunefleet_inference_requests_total", labels) or 0.0

    async with front.client() as client:
        stream = await client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=90, temperature=0, stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        await stream.close()
    await wait_for(lambda: cancelled() == 1.0, "the generation to be cancelled")
    ok = {"adapter": "base", "version": "", "outcome": "ok"}
    assert registry.get_sample_value("tunefleet_inference_requests_total", ok) == 0


async def test_a_client_that_leaves_before_a_whole_answer_stops_its_generation(
    front: Front,
) -> None:
    """Not streamed: the front notices the closed connection and cancels the call."""
    import json
    import socket

    registry = front.serving.registry
    assert registry is not None
    labels = {"adapter": "base", "version": "", "outcome": "cancelled"}
    body = json.dumps(
        {"model": "tiny", "messages": CHAT, "max_tokens": 90, "temperature": 0}
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()

    def first_tokens() -> float:
        base = {"adapter": "base", "version": ""}
        name = "tunefleet_inference_time_to_first_token_seconds_count"
        return registry.get_sample_value(name, base) or 0.0

    with socket.create_connection(("127.0.0.1", front.front.port)) as connection:
        connection.sendall(head + body)
        await wait_for(lambda: first_tokens() > 0, "the generation to start")
    await wait_for(
        lambda: registry.get_sample_value("tunefleet_inference_requests_total", labels) == 1.0,
        "the generation to be cancelled",
    )
    await wait_for(
        lambda: (
            registry.get_sample_value(
                "tunefleet_openai_requests_total",
                {"route": "/v1/chat/completions", "method": "POST", "status": "499"},
            )
            == 1.0
        ),
        "the front to count the request as closed by the client",
    )


async def test_concurrent_chats_each_get_their_own_adapter_s_answer(
    front: Front, served: Served
) -> None:
    """16 clients at once, over two adapters and the base model: every answer is the one plain
    PEFT gives for the model its request named, and the header names that version."""
    versions = {}
    for name in ("alpha", "beta"):
        versions[name] = await front.serving.register(name, served.adapters[name])
        await front.serving.alias("prod", versions[name])
    expected = {name: expected_chat(served, name) for name in ("alpha", "beta")}
    expected["tiny"] = expected_chat(served, None)
    models = {"alpha": "alpha@prod", "beta": "beta:1", "tiny": "tiny"}

    async def ask(client: Any, name: str) -> tuple[str, str, str]:
        raw = await client.chat.completions.with_raw_response.create(
            model=models[name], messages=CHAT, max_tokens=MAX_TOKENS, temperature=0
        )
        version = raw.headers.get("x-tunefleet-adapter-version", "")
        return name, version, raw.parse().choices[0].message.content

    names = [("alpha", "beta", "tiny")[i % 3] for i in range(16)]
    async with front.client() as client:
        answers = await asyncio.gather(*(ask(client, name) for name in names))
    for name, version, text in answers:
        assert text == expected[name], name
        assert version == versions.get(name, "")


async def test_log_probabilities_come_from_the_version_that_answered_while_the_alias_flips(
    front: Front, served: Served
) -> None:
    """Completions with logprobs on `orders@prod` while `prod` flips between two versions faster
    than the requests: each answer's text and log-probabilities are exactly those of the version
    its header names (the front scores under that version, not the alias, which may have moved
    since it generated)."""
    first = await front.serving.register("orders", served.adapters["alpha"])
    second = await front.serving.register("orders", served.adapters["beta"])
    await front.serving.alias("prod", first)
    request = {"prompt": PROMPTS[0], "max_tokens": 6, "logprobs": 2, "temperature": 0}
    async with front.client() as client:
        expected = {}
        for version, model in ((first, "orders:1"), (second, "orders:2")):
            reply = await client.completions.create(model=model, **request)
            expected[version] = (reply.choices[0].text, reply.choices[0].logprobs.token_logprobs)
        assert expected[first] != expected[second]
        stop = asyncio.Event()

        async def flip() -> None:
            while not stop.is_set():
                for version in (second, first):
                    await front.serving.alias("prod", version)
                    await asyncio.sleep(0.01)

        flipping = asyncio.create_task(flip())
        try:
            seen = []
            for _ in range(40):
                raw = await client.completions.with_raw_response.create(
                    model="orders@prod", **request
                )
                reply = raw.parse()
                version = raw.headers["x-tunefleet-adapter-version"]
                choice = reply.choices[0]
                text, logprobs = expected[version]
                assert choice.text == text
                assert choice.logprobs.token_logprobs == pytest.approx(logprobs, abs=1e-5)
                seen.append(version)
        finally:
            stop.set()
            await flipping
    assert set(seen) == {first, second}  # the alias did move under the requests
