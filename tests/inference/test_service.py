"""InferenceService through a real gRPC server, with adapters registered in a real AdapterService
and the PEFT engine (the vLLM engine has its own tests)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from tests.conftest import StartServer
from tests.helpers import error_info
from tests.inference.conftest import (
    COMPLETION,
    MAX_TOKENS,
    PROMPTS,
    Served,
    Serving,
    reference,
    reference_logprobs,
)
from tunefleet.app.services import inference_service
from tunefleet.runtime.context import ServiceContext
from tunefleet.v1 import (
    adapter_pb2,
    adapter_service_pb2,
    common_pb2,
    inference_pb2,
    inference_service_pb2,
    inference_service_pb2_grpc,
)

State = inference_pb2.ServedAdapter.State


def expected_text(served: Served, adapter: str | None, prompt: str = PROMPTS[0]) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(served.model))
    ids = reference(served, adapter, prompt, MAX_TOKENS)
    return str(tokenizer.decode(ids, skip_special_tokens=True))


async def test_generate_with_base_versions_and_aliases(serving: Serving, served: Served) -> None:
    alpha = await serving.register("alpha", served.adapters["alpha"])
    await serving.alias("prod", alpha)

    base = await serving.generate("")
    assert base.adapter_version == ""
    assert base.text == expected_text(served, None)
    assert base.usage.prompt_tokens > 0 and base.usage.completion_tokens > 0
    assert list(base.token_ids) == reference(served, None, PROMPTS[0], MAX_TOKENS)
    assert base.finish_reason in (
        inference_pb2.FINISH_REASON_STOP,
        inference_pb2.FINISH_REASON_LENGTH,
    )

    by_version = await serving.generate(alpha)
    by_alias = await serving.generate("adapters/alpha@prod")
    assert by_version.adapter_version == by_alias.adapter_version == alpha
    assert by_version.text == by_alias.text == expected_text(served, "alpha")
    assert by_version.response_id != by_alias.response_id

    chat = await serving.inference.Generate(
        inference_service_pb2.GenerateRequest(
            adapter=alpha,
            chat=inference_pb2.ChatInput(
                messages=[
                    common_pb2.ChatMessage(role="user", content="Which colour goes with the cat?")
                ]
            ),
            sampling=inference_pb2.SamplingParams(max_tokens=MAX_TOKENS),
        )
    )
    assert chat.text == by_version.text  # PROMPTS[0] is that conversation, rendered

    stream = serving.inference.StreamGenerate(
        inference_service_pb2.StreamGenerateRequest(
            request=inference_service_pb2.GenerateRequest(
                adapter="adapters/alpha@prod",
                prompt=PROMPTS[0],
                sampling=inference_pb2.SamplingParams(max_tokens=MAX_TOKENS),
            )
        )
    )
    pieces: list[inference_service_pb2.StreamGenerateResponse] = []
    async for piece in stream:
        if not pieces:  # answering it: in flight (what an autoscaler reads)
            assert serving.sample("tunefleet_inference_requests_in_flight") == 1
        pieces.append(piece)
    assert serving.sample("tunefleet_inference_requests_in_flight") == 0
    assert pieces[0].response_id and pieces[0].adapter_version == alpha
    assert "".join(p.text_delta for p in pieces) == by_version.text
    assert pieces[-1].finish_reason and pieces[-1].usage.completion_tokens > 0
    assert all(not p.finish_reason for p in pieces[:-1])

    listed = await serving.inference.ListServedAdapters(
        inference_service_pb2.ListServedAdaptersRequest()
    )
    (served_alpha,) = listed.served_adapters
    assert served_alpha.adapter_version == alpha
    assert list(served_alpha.routed_aliases) == ["adapters/alpha@prod"]
    assert served_alpha.state == State.STATE_LOADED and served_alpha.pinned
    assert served_alpha.request_count == 4
    assert (
        serving.sample(
            "tunefleet_inference_requests_total",
            adapter="adapters/alpha",
            version=alpha,
            outcome="ok",
        )
        == 4
    )
    # The first of the four prefilled the prompt; the three after it reused all but its last
    # token from the engine's prefix cache.
    cached = serving.sample(
        "tunefleet_inference_prompt_cached_tokens_total", adapter="adapters/alpha", version=alpha
    )
    assert cached == 3 * (base.usage.prompt_tokens - 1)


async def test_dora_is_served_by_the_peft_engine(serving: Serving, served: Served) -> None:
    delta = await serving.register("delta", served.adapters["delta"])
    response = await serving.generate(delta)
    assert response.adapter_version == delta
    assert response.text == expected_text(served, "delta")


async def test_scored_completions_equal_plain_peft_while_others_generate(
    serving: Serving, served: Served
) -> None:
    """Log-probabilities of a given completion for the base model, stacked LoRA adapters and a
    DoRA one (PEFT's own forward), asked for while generations of other adapters run: each
    equals plain PEFT's, and the generations are unchanged by the scoring between their steps."""
    names = ["alpha", "beta", "delta"]  # the server's 3 slots; delta is DoRA
    versions = {name: await serving.register(name, served.adapters[name]) for name in names}
    cases = [(None, prompt) for prompt in PROMPTS] + [(name, PROMPTS[1]) for name in names]

    async def score(adapter: str | None, prompt: str) -> Any:
        return await serving.inference.ScoreCompletion(
            inference_service_pb2.ScoreCompletionRequest(
                adapter=versions[adapter] if adapter else "", prompt=prompt, completion=COMPLETION
            )
        )

    generated = [serving.generate(versions[name], max_tokens=MAX_TOKENS) for name in names]
    found = await asyncio.gather(*(score(a, p) for a, p in cases), *generated)
    for (adapter, prompt), response in zip(cases, found, strict=False):
        expected = reference_logprobs(served, adapter, prompt, COMPLETION)
        assert response.token_logprobs == pytest.approx(expected, abs=1e-4), adapter
        assert response.adapter_version == (versions[adapter] if adapter else "")
        assert len(response.token_ids) == len(expected) and response.prompt_tokens > 0
    for name, response in zip(names, found[len(cases) :], strict=True):
        assert response.text == expected_text(served, name), name
    # A generation's own token ids score as their text does.
    generation = found[len(cases)]
    by_ids = await serving.inference.ScoreCompletion(
        inference_service_pb2.ScoreCompletionRequest(
            adapter=versions["alpha"],
            prompt=PROMPTS[0],
            completion_token_ids=generation.token_ids,
        )
    )
    assert list(by_ids.token_ids) == list(generation.token_ids)
    # Greedy picks are the most likely tokens: each at least 1 / vocabulary likely.
    from transformers import AutoTokenizer

    vocabulary = len(AutoTokenizer.from_pretrained(str(served.model)))
    assert all(lp >= -math.log(vocabulary) for lp in by_ids.token_logprobs)
    # The adapters change the scores (the test would not see a wrong adapter otherwise).
    assert len({tuple(round(v, 3) for v in r.token_logprobs) for r in found[: len(cases)]}) == 5


async def test_a_prompt_given_as_token_ids_generates_as_its_text(
    serving: Serving, served: Served
) -> None:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(served.model))(
        PROMPTS[0], add_special_tokens=False
    ).input_ids
    sampling = inference_pb2.SamplingParams(max_tokens=MAX_TOKENS)
    by_text = await serving.inference.Generate(
        inference_service_pb2.GenerateRequest(prompt=PROMPTS[0], sampling=sampling)
    )
    by_ids = await serving.inference.Generate(
        inference_service_pb2.GenerateRequest(
            prompt_token_ids=inference_pb2.TokenIds(ids=ids), sampling=sampling
        )
    )
    assert (
        list(by_ids.token_ids)
        == list(by_text.token_ids)
        == reference(served, None, PROMPTS[0], MAX_TOKENS)
    )
    assert by_ids.usage.prompt_tokens == len(ids)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await serving.inference.Generate(
            inference_service_pb2.GenerateRequest(
                prompt_token_ids=inference_pb2.TokenIds(ids=[1, -4]), sampling=sampling
            )
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith("prompt_token_ids.ids[1]")


async def test_input_tokens_and_top_logprobs_equal_plain_peft(
    serving: Serving, served: Served
) -> None:
    """OpenAI's `echo` with `logprobs`: an input given as token ids is scored from its second
    token on, each token with the likeliest tokens in its place, as plain PEFT computes them."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    version = await serving.register("alpha", served.adapters["alpha"])
    tokenizer = AutoTokenizer.from_pretrained(str(served.model))
    ids = tokenizer(PROMPTS[1] + COMPLETION, add_special_tokens=False).input_ids
    response = await serving.inference.ScoreCompletion(
        inference_service_pb2.ScoreCompletionRequest(
            adapter=version,
            prompt_token_ids=inference_pb2.TokenIds(ids=ids),
            top_logprobs=3,
            score_input=True,
        )
    )
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(served.model)), str(served.adapters["alpha"])
    ).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    assert [t.token_id for t in response.input_tokens] == ids
    assert not response.tokens and not response.token_ids and response.prompt_tokens == len(ids)
    first, *rest = response.input_tokens
    assert not first.HasField("logprob") and not first.top_logprobs
    assert first.text == tokenizer.decode([ids[0]])
    for position, token in enumerate(rest, start=1):
        assert token.logprob == pytest.approx(
            float(logprobs[position - 1, ids[position]]), abs=1e-4
        )
        best = torch.topk(logprobs[position - 1], 3)
        assert [t.token_id for t in token.top_logprobs] == best.indices.tolist()
        assert [t.logprob for t in token.top_logprobs] == pytest.approx(
            best.values.tolist(), abs=1e-4
        )
        assert [t.text for t in token.top_logprobs] == [
            tokenizer.decode([i]) for i in best.indices.tolist()
        ]
    # Scored as input and completion, the same tokens keep their log-probabilities.
    split = await serving.inference.ScoreCompletion(
        inference_service_pb2.ScoreCompletionRequest(
            adapter=version,
            prompt_token_ids=inference_pb2.TokenIds(ids=ids[:5]),
            completion_token_ids=ids[5:],
            score_input=True,
        )
    )
    assert [t.logprob for t in split.input_tokens[1:]] + list(split.token_logprobs) == (
        pytest.approx([t.logprob for t in rest], abs=1e-5)
    )
    assert [t.token_id for t in split.tokens] == ids[5:]


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"prompt": "hi"}, "completion"),
        ({"prompt": "hi", "completion": "a", "top_logprobs": 21}, "top_logprobs"),
        ({"prompt_token_ids": {"ids": [3, 10**6]}, "score_input": True}, "prompt_token_ids.ids[1]"),
        ({"prompt_token_ids": {"ids": [3]}, "score_input": True}, "input"),
        ({"prompt_token_ids": {}, "completion": "a"}, "input"),
        ({"completion": "blue"}, "input"),
        ({"prompt": "hi", "completion": "blue " * 400}, "completion"),
        ({"prompt": "hi", "completion": "a", "completion_token_ids": [5]}, "completion"),
        ({"prompt": "hi", "completion_token_ids": [5, 10**6]}, "completion_token_ids[1]"),
        ({"prompt": "hi", "completion_token_ids": [-1]}, "completion_token_ids[0]"),
    ],
)
async def test_bad_score_requests_name_the_field(
    serving: Serving, request_fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await serving.inference.ScoreCompletion(
            json_format.ParseDict(request_fields, inference_service_pb2.ScoreCompletionRequest())
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith(field), raised.value.details()


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        ({"max_tokens": 100000}, "sampling.max_tokens"),
        ({"temperature": 3.0}, "sampling.temperature"),
        ({"top_p": 0.0}, "sampling.top_p"),
        ({"stop": [""]}, "sampling.stop"),
    ],
)
async def test_bad_requests_name_the_field(
    serving: Serving, sampling: dict[str, Any], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await serving.inference.Generate(
            inference_service_pb2.GenerateRequest(
                prompt="hi", sampling=inference_pb2.SamplingParams(**sampling)
            )
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith(field)


async def test_unknown_and_foreign_adapters_are_refused(serving: Serving, served: Served) -> None:
    await serving.adapters.CreateAdapter(
        adapter_service_pb2.CreateAdapterRequest(
            adapter_id="foreign", adapter=adapter_pb2.Adapter(base_model="another-model")
        )
    )
    foreign = await serving.register("foreign", served.adapters["alpha"])
    for adapter, code in [
        ("adapters/missing/versions/1", grpc.StatusCode.NOT_FOUND),
        ("adapters/missing@prod", grpc.StatusCode.NOT_FOUND),
        ("not-an-adapter", grpc.StatusCode.INVALID_ARGUMENT),
        (foreign, grpc.StatusCode.FAILED_PRECONDITION),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await serving.generate(adapter)
        assert raised.value.code() == code, adapter
    info = error_info(raised.value)
    assert info is not None and info.reason == "ADAPTER_BASE_MODEL_MISMATCH"
    listed = await serving.inference.ListServedAdapters(
        inference_service_pb2.ListServedAdaptersRequest()
    )
    assert not listed.served_adapters  # nothing was loaded
    # The registry could not check it against a model it does not know: no engine serves it.
    version = await serving.adapters.GetAdapterVersion(
        adapter_service_pb2.GetAdapterVersionRequest(name=foreign)
    )
    assert version.config.unchecked
    assert not any(c.compatible for c in version.compatibility)
    # Every request is counted once: the client's mistakes as invalid, under no name it sent;
    # the refusal of a version that exists under that version.
    requests = "tunefleet_inference_requests_total"
    assert serving.sample(requests, adapter="unresolved", version="", outcome="invalid") == 3
    assert (
        serving.sample(requests, adapter="adapters/foreign", version=foreign, outcome="error") == 1
    )


async def test_merged_and_quantized_versions_are_refused_as_not_adapters(
    serving: Serving, served: Served
) -> None:
    """Full models (a merge, its GGUF export) live in the registry beside the adapters, but are
    no adapter of the served model: refused by name, never loaded as one."""
    version = await serving.register("alpha", served.adapters["alpha"])
    exported = await serving.adapters.QuantizeModelVersion(
        adapter_service_pb2.QuantizeModelVersionRequest(
            name=version, format=adapter_pb2.EXPORT_FORMAT_GGUF_F16
        )
    )
    for full in (exported.quantized_from, exported.name):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await serving.generate(full)
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION, full
        info = error_info(raised.value)
        assert info is not None and info.reason == "NOT_AN_ADAPTER", full
    listed = await serving.inference.ListServedAdapters(
        inference_service_pb2.ListServedAdaptersRequest()
    )
    assert not listed.served_adapters


async def test_an_adapter_of_the_served_models_path_is_served(
    serving: Serving, served: Served
) -> None:
    await serving.adapters.CreateAdapter(
        adapter_service_pb2.CreateAdapterRequest(
            adapter_id="local", adapter=adapter_pb2.Adapter(base_model=str(served.model))
        )
    )
    version = await serving.register("local", served.adapters["alpha"])
    assert (await serving.generate(version)).text == expected_text(served, "alpha")


async def test_a_full_cache_says_so(serving: Serving, served: Served) -> None:
    """Three pinned versions fill the server's three slots: a fourth is refused
    RESOURCE_EXHAUSTED (ADAPTER_CACHE_FULL), counted under its version, and nothing is lost."""
    names = [await serving.register(n, served.adapters[n]) for n in ("alpha", "beta", "gamma")]
    for name in names:
        await serving.inference.LoadAdapter(
            inference_service_pb2.LoadAdapterRequest(adapter=name, pin=True)
        )
    fourth = await serving.register("delta", served.adapters["delta"])
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await serving.generate(fourth)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(raised.value)
    assert info is not None and info.reason == "ADAPTER_CACHE_FULL"
    requests = "tunefleet_inference_requests_total"
    assert serving.sample(requests, adapter="adapters/delta", version=fourth, outcome="error") == 1
    assert (await serving.generate(names[0])).text == expected_text(served, "alpha")
    await serving.inference.UnloadAdapter(
        inference_service_pb2.UnloadAdapterRequest(adapter=names[2])
    )
    assert (await serving.generate(fourth)).text == expected_text(served, "delta")


async def test_the_cache_evicts_the_least_recently_used_unpinned_version(
    serving: Serving, served: Served
) -> None:
    versions = [await serving.register(name, served.adapters[name]) for name in served.adapters]
    await serving.alias("prod", versions[0])
    await serving.generate("adapters/alpha@prod")  # routed, so pinned
    for version in versions[1:]:
        await serving.generate(version)
    listed = await serving.inference.ListServedAdapters(
        inference_service_pb2.ListServedAdaptersRequest()
    )
    loaded = {a.adapter_version for a in listed.served_adapters}
    assert loaded == {versions[0], versions[2], versions[3]}  # versions[1] was evicted
    assert serving.sample("tunefleet_inference_adapter_evictions_total") == 1
    assert serving.sample("tunefleet_inference_loaded_adapters") == 3


async def test_concurrent_first_requests_share_one_load(serving: Serving, served: Served) -> None:
    version = await serving.register("alpha", served.adapters["alpha"])
    answers = await asyncio.gather(*(serving.generate(version) for _ in range(6)))
    assert {a.adapter_version for a in answers} == {version}
    assert serving.sample("tunefleet_inference_adapter_loads_total", outcome="loaded") == 1
    assert not serving.sample("tunefleet_inference_adapter_loads_total", outcome="failed")


async def test_feedback_names_the_version_and_filters(serving: Serving, served: Served) -> None:
    alpha = await serving.register("alpha", served.adapters["alpha"])
    good = await serving.generate(alpha)
    bad = await serving.generate("")
    request = inference_service_pb2.CreateFeedbackRequest
    recorded = await serving.inference.CreateFeedback(
        request(
            feedback=inference_pb2.Feedback(
                response_id=bad.response_id, rating=-1, corrected_text="Colour: red. Done."
            ),
            request_id="0c3d8a4e-6a4b-4d1b-9a0b-8f7e6d5c4b3a",
        )
    )
    again = await serving.inference.CreateFeedback(
        request(
            feedback=inference_pb2.Feedback(
                response_id=bad.response_id, rating=-1, corrected_text="Colour: red. Done."
            ),
            request_id="0c3d8a4e-6a4b-4d1b-9a0b-8f7e6d5c4b3a",
        )
    )
    assert again.name == recorded.name
    await serving.inference.CreateFeedback(
        request(feedback=inference_pb2.Feedback(response_id=good.response_id, rating=1))
    )
    negative = await serving.inference.ListFeedback(
        inference_service_pb2.ListFeedbackRequest(filter="rating < 0")
    )
    assert [f.response_id for f in negative.feedback] == [bad.response_id]
    assert negative.feedback[0].adapter_version == ""
    of_alpha = await serving.inference.ListFeedback(
        inference_service_pb2.ListFeedbackRequest(filter=f'adapter_version = "{alpha}"')
    )
    assert [f.response_id for f in of_alpha.feedback] == [good.response_id]
    # The mean score (0 bad, 1 good) per version, for alerts; the retried request counts once.
    score = "tunefleet_inference_feedback_score"
    assert serving.sample(f"{score}_count", adapter="base", version="") == 1
    assert serving.sample(f"{score}_sum", adapter="base", version="") == 0
    assert serving.sample(f"{score}_sum", adapter="adapters/alpha", version=alpha) == 1
    # Counted by the rating's sign and whether it carries a correction, once.
    counted = "tunefleet_inference_feedback_total"
    assert (
        serving.sample(counted, adapter="base", version="", rating="negative", corrected="true")
        == 1
    )
    assert (
        serving.sample(
            counted, adapter="adapters/alpha", version=alpha, rating="positive", corrected="false"
        )
        == 1
    )
    for feedback, code in [
        (inference_pb2.Feedback(response_id="nope", rating=1), grpc.StatusCode.NOT_FOUND),
        (
            inference_pb2.Feedback(response_id=good.response_id, rating=3),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await serving.inference.CreateFeedback(request(feedback=feedback))
        assert raised.value.code() == code


async def test_feedback_lists_the_responses_it_judges(serving: Serving, served: Served) -> None:
    """What the retraining loop reads: each judged response's input (prompt or chat, with its
    tools) and text, as recorded, beside the rating and the correction."""
    alpha = await serving.register("alpha", served.adapters["alpha"])
    by_prompt = await serving.generate(alpha)
    chat = inference_pb2.ChatInput(
        messages=[common_pb2.ChatMessage(role="user", content="Which colour goes with the owl?")]
    )
    by_chat = await serving.inference.Generate(
        inference_service_pb2.GenerateRequest(
            adapter=alpha, chat=chat, sampling=inference_pb2.SamplingParams(max_tokens=6)
        )
    )
    for response, rating, correction in ((by_prompt, 1, ""), (by_chat, -1, "Grey.")):
        await serving.inference.CreateFeedback(
            inference_service_pb2.CreateFeedbackRequest(
                feedback=inference_pb2.Feedback(
                    response_id=response.response_id, rating=rating, corrected_text=correction
                )
            )
        )
    listed = await serving.inference.ListFeedback(
        inference_service_pb2.ListFeedbackRequest(
            filter='adapter_version = "adapters/alpha/*"', include_responses=True
        )
    )
    newest, oldest = listed.feedback
    assert newest.response.chat == chat and newest.response.text == by_chat.text
    assert newest.corrected_text == "Grey." and newest.response.finish_reason
    assert oldest.response.prompt == PROMPTS[0] and oldest.response.text == by_prompt.text
    plain = await serving.inference.ListFeedback(inference_service_pb2.ListFeedbackRequest())
    assert not any(f.HasField("response") for f in plain.feedback)


async def test_the_version_each_alias_serves_is_a_metric(serving: Serving, served: Served) -> None:
    """`tunefleet_inference_alias_version` follows the alias: what joins a version's request
    and feedback metrics to the alias (champion or canary) that sends it traffic."""
    first = await serving.register("alpha", served.adapters["alpha"])
    second = await serving.register("alpha", served.adapters["beta"])
    await serving.alias("prod", first)
    assert (await serving.generate("adapters/alpha@prod")).adapter_version == first

    def routed(version: str) -> float | None:
        return serving.sample(
            "tunefleet_inference_alias_version",
            adapter="adapters/alpha",
            alias="prod",
            version=version,
        )

    assert routed(first) == 1 and routed(second) is None
    await serving.alias("prod", second)
    for _ in range(200):  # the move is pushed on the change feed
        if (await serving.generate("adapters/alpha@prod")).adapter_version == second:
            break
        await asyncio.sleep(0.05)
    assert routed(second) == 1 and routed(first) is None


async def test_hot_swap_under_load_fails_no_request(serving: Serving, served: Served) -> None:
    alpha_v1 = await serving.register("alpha", served.adapters["alpha"])
    alpha_v2 = await serving.register("alpha", served.adapters["beta"])  # other weights
    await serving.alias("prod", alpha_v1)
    await serving.inference.LoadAdapter(
        inference_service_pb2.LoadAdapterRequest(adapter="adapters/alpha@prod")
    )
    texts = {alpha_v1: expected_text(served, "alpha"), alpha_v2: expected_text(served, "beta")}
    results: list[tuple[float, str, str]] = []
    failures: list[BaseException] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def client() -> None:
        while not stop.is_set():
            sent = loop.time()
            try:
                response = await serving.generate("adapters/alpha@prod")
            except grpc.aio.AioRpcError as error:
                failures.append(error)
                continue
            results.append((sent, response.adapter_version, response.text))

    clients = [asyncio.create_task(client()) for _ in range(6)]
    await asyncio.sleep(1.0)
    moved = loop.time()
    await serving.alias("prod", alpha_v2)
    for _ in range(200):
        await asyncio.sleep(0.05)
        if any(version == alpha_v2 and sent > moved for sent, version, _ in results):
            break
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*clients)

    assert failures == []
    assert {v for _, v, _ in results} == {alpha_v1, alpha_v2}
    for _, version, text in results:
        assert text == texts[version]  # every response names the version that produced it
    switched = min(sent for sent, version, _ in results if version == alpha_v2)
    assert all(version == alpha_v2 for sent, version, _ in results if sent > switched + 0.01)
    assert all(version == alpha_v1 for sent, version, _ in results if sent < moved)
    listed = await serving.inference.ListServedAdapters(
        inference_service_pb2.ListServedAdaptersRequest()
    )
    # The old version stays loaded, no longer routed or pinned (evicted least recently used
    # first): moving the alias back needs no load.
    routed = {a.adapter_version: list(a.routed_aliases) for a in listed.served_adapters}
    assert routed == {alpha_v1: [], alpha_v2: ["adapters/alpha@prod"]}
    assert not next(a for a in listed.served_adapters if a.adapter_version == alpha_v1).pinned
    assert serving.sample("tunefleet_inference_alias_swaps_total", outcome="swapped") == 1
    assert serving.sample("tunefleet_inference_swap_seconds_count") == 1


async def test_a_version_that_fails_to_load_leaves_the_old_one_serving(
    serving: Serving, served: Served
) -> None:
    from tunefleet.storage.blobs import LocalBlobStore

    alpha_v1 = await serving.register("alpha", served.adapters["alpha"])
    alpha_v2 = await serving.register("alpha", served.adapters["beta"])
    # The new version's weights rot in the blob store after registration: loading it fails.
    version = await serving.adapters.GetAdapterVersion(
        adapter_service_pb2.GetAdapterVersionRequest(name=alpha_v2)
    )
    (weights,) = [f for f in version.files if f.path == "adapter_model.safetensors"]
    assert serving.storage is not None and isinstance(serving.storage.blobs, LocalBlobStore)
    serving.storage.blobs.path(weights.sha256).write_bytes(b"not the weights")
    await serving.alias("prod", alpha_v1)
    assert (await serving.generate("adapters/alpha@prod")).adapter_version == alpha_v1
    await serving.alias("prod", alpha_v2)
    for _ in range(100):
        if serving.sample("tunefleet_inference_alias_swaps_total", outcome="failed"):
            break
        await asyncio.sleep(0.05)
    assert serving.sample("tunefleet_inference_alias_swaps_total", outcome="failed") == 1
    assert serving.sample("tunefleet_inference_adapter_loads_total", outcome="failed") == 1
    response = await serving.generate("adapters/alpha@prod")
    assert response.adapter_version == alpha_v1
    assert response.text == expected_text(served, "alpha")
    listed = await serving.inference.ListServedAdapters(
        inference_service_pb2.ListServedAdaptersRequest()
    )
    states = {a.adapter_version: a for a in listed.served_adapters}
    assert states[alpha_v2].state == State.STATE_FAILED
    assert "BLOB_CORRUPT" in states[alpha_v2].error or "corrupt" in states[alpha_v2].error
    assert states[alpha_v1].state == State.STATE_LOADED
    assert list(states[alpha_v1].routed_aliases) == ["adapters/alpha@prod"]


async def test_admin_load_and_unload(serving: Serving, served: Served) -> None:
    gamma = await serving.register("gamma", served.adapters["gamma"])
    loaded = await serving.inference.LoadAdapter(
        inference_service_pb2.LoadAdapterRequest(adapter=gamma, pin=True)
    )
    assert loaded.state == State.STATE_LOADED and loaded.pinned
    assert loaded.engine == 2  # SERVING_ENGINE_PEFT
    unloaded = await serving.inference.UnloadAdapter(
        inference_service_pb2.UnloadAdapterRequest(adapter=gamma)
    )
    assert unloaded.state == State.STATE_UNLOADING
    listed = await serving.inference.ListServedAdapters(
        inference_service_pb2.ListServedAdaptersRequest()
    )
    assert not listed.served_adapters
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await serving.inference.UnloadAdapter(
            inference_service_pb2.UnloadAdapterRequest(adapter=gamma)
        )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_without_a_base_model_nothing_is_served(
    start_server: StartServer, service_context: ServiceContext
) -> None:
    server = await start_server([inference_service(service_context)])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        listed = await stub.ListServedAdapters(inference_service_pb2.ListServedAdaptersRequest())
        assert not listed.served_adapters
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Generate(inference_service_pb2.GenerateRequest(prompt="hi"))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(raised.value)
    assert info is not None and info.reason == "NO_BASE_MODEL"


def register_directly(registry: Any, adapter: str, path: Path) -> str:
    """Register a PEFT directory through AdapterManager itself (no server); the version's name."""
    import hashlib

    from tunefleet.core.errors import AlreadyExists

    with contextlib.suppress(AlreadyExists):
        registry.create_adapter(adapter, "tiny", "", {})
    upload = registry.begin_upload(f"adapters/{adapter}", "", {}, "", "")
    for file in sorted(path.iterdir()):
        data = file.read_bytes()
        upload.start_file(file.name, len(data), hashlib.sha256(data).hexdigest())
        upload.write(data)
    row = registry.finish_upload(upload)
    return f"adapters/{row.adapter_id}/versions/{row.version}"


async def test_a_deleted_alias_stops_being_routed(serving: Serving, served: Served) -> None:
    alpha = await serving.register("alpha", served.adapters["alpha"])
    await serving.alias("prod", alpha)
    assert (await serving.generate("adapters/alpha@prod")).adapter_version == alpha
    await serving.adapters.DeleteAdapterAlias(
        adapter_service_pb2.DeleteAdapterAliasRequest(name="adapters/alpha/aliases/prod")
    )
    for _ in range(100):
        try:
            await serving.generate("adapters/alpha@prod")
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the deleted alias is still routed")
    assert (await serving.generate(alpha)).adapter_version == alpha  # the version still serves


async def test_a_new_version_of_a_served_alias_is_loaded_before_its_promotion(
    serving: Serving, served: Served
) -> None:
    """A version registered for an adapter whose alias is served here is loaded ahead, into a
    free slot, so moving the alias to it loads nothing; it is neither routed nor pinned until
    then."""
    first = await serving.register("alpha", served.adapters["alpha"])
    await serving.alias("prod", first)
    assert (await serving.generate("adapters/alpha@prod")).adapter_version == first
    loads = serving.sample("tunefleet_inference_adapter_loads_total", outcome="loaded")
    second = await serving.register("alpha", served.adapters["beta"])

    async def states() -> dict[str, tuple[int, list[str], bool]]:
        listed = await serving.inference.ListServedAdapters(
            inference_service_pb2.ListServedAdaptersRequest()
        )
        return {
            a.adapter_version: (a.state, list(a.routed_aliases), a.pinned)
            for a in listed.served_adapters
        }

    for _ in range(200):
        if (await states()).get(second, (0,))[0] == State.STATE_LOADED:
            break
        await asyncio.sleep(0.05)
    assert (await states())[second] == (State.STATE_LOADED, [], False)
    assert serving.sample("tunefleet_inference_adapter_loads_total", outcome="loaded") == (
        (loads or 0) + 1
    )

    await serving.alias("prod", second)
    for _ in range(200):
        if (await serving.generate("adapters/alpha@prod")).adapter_version == second:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the alias did not move")
    # Nothing was loaded for the move.
    assert serving.sample("tunefleet_inference_adapter_loads_total", outcome="loaded") == (
        (loads or 0) + 1
    )
