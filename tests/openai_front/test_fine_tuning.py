"""OpenAI's fine-tuning flow with the unmodified `openai` client against the embedded platform:
upload a file, create a job, poll it until it succeeds, read its events and checkpoints, then
chat with the model it produced."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from tests.training.conftest import (  # noqa: F401 (fixtures)
    Platform,
    big_model,
    chat_model,
    colour_records,
    make_platform,
    platform_settings,
)
from tunefleet.openai_front.server import OpenAIFront
from tunefleet.runtime.settings import OpenAISettings
from tunefleet.v1 import common_pb2, inference_pb2, inference_service_pb2

QUESTION: Any = [
    {"role": "system", "content": "Answer with one colour."},
    {"role": "user", "content": "Which colour goes with the cat?"},
]
# tunefleet's own options, beside OpenAI's: a short LoRA run of the tiny model.
TUNEFLEET = {
    "hyperparameters": {
        "maxSteps": 6,
        "maxSequenceLength": 64,
        "evalEverySteps": 3,
        "checkpointEverySteps": 3,
    },
    "lora": {
        "rank": 8,
        "dropout": 0.0,
        "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"],
    },
}


@pytest.fixture
async def platform(make_platform: Any) -> AsyncIterator[tuple[Platform, Any]]:  # noqa: F811
    platform = await make_platform(inference={"base_model": "colours", "max_loaded_adapters": 2})
    front = OpenAIFront(OpenAISettings(port=0), "colours", platform.registry)
    assert platform.server is not None
    await front.start(platform.server)
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{front.port}/v1", api_key="unused", max_retries=0
    )
    try:
        yield platform, client
    finally:
        await client.close()
        await front.stop()


async def succeeded(client: Any, job_id: str) -> Any:
    """Poll the job as OpenAI's docs do until it ends."""
    for _ in range(1200):
        job = await client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        await asyncio.sleep(0.5)
    raise AssertionError(f"{job_id} is still {job.status}")


async def test_files_then_a_job_then_chat_with_its_model(
    platform: tuple[Platform, Any],
) -> None:
    grpc_platform, client = platform
    uploaded = await client.files.create(
        file=("colours.jsonl", colour_records()), purpose="fine-tune"
    )
    assert uploaded.status == "processed" and uploaded.filename == "colours.jsonl"
    assert (await client.files.retrieve(uploaded.id)).bytes == len(colour_records())
    assert [f.id async for f in client.files.list()] == [uploaded.id]
    content = (await client.files.content(uploaded.id)).text.splitlines()
    assert len(content) == 120 and json.loads(content[0])["messages"][1]["role"] == "user"

    job = await client.fine_tuning.jobs.create(
        model="colours",
        training_file=uploaded.id,
        suffix="colours",
        hyperparameters={"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 50},
        metadata={"team": "search"},
        extra_body={"tunefleet": TUNEFLEET},
    )
    assert job.status in ("validating_files", "queued", "running")
    assert job.hyperparameters.batch_size == 8 and job.hyperparameters.n_epochs == 1
    assert job.hyperparameters.learning_rate_multiplier == 50
    assert job.metadata == {"team": "search"}
    assert job.model_extra["tunefleet"]["hyperparameters"]["learningRate"] == pytest.approx(1e-2)
    job = await succeeded(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == "colours:1" and job.finished_at

    events = [event async for event in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert events and events[0].message == "Job entered succeeded"
    assert any(event.type == "metrics" for event in events)
    checkpoints = [c async for c in client.fine_tuning.jobs.checkpoints.list(job.id)]
    assert [c.step_number for c in checkpoints] == [6, 3]
    listed = await client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in listed.data] == [job.id] and not listed.has_more

    assert "colours:1" in [model.id async for model in client.models.list()]
    raw = await client.chat.completions.with_raw_response.create(
        model=job.fine_tuned_model, messages=QUESTION, max_tokens=8, temperature=0
    )
    reply = raw.parse()
    assert raw.headers["x-tunefleet-adapter-version"] == "adapters/colours/versions/1"
    direct = await grpc_platform.inference.Generate(
        inference_service_pb2.GenerateRequest(
            adapter="adapters/colours/versions/1",
            chat=inference_pb2.ChatInput(
                messages=[common_pb2.ChatMessage(**turn) for turn in QUESTION]
            ),
            sampling=inference_pb2.SamplingParams(max_tokens=8),
        )
    )
    assert reply.choices[0].message.content == direct.text
    base = await client.chat.completions.create(
        model="colours", messages=QUESTION, max_tokens=8, temperature=0
    )
    assert base.choices[0].message.content != direct.text

    with pytest.raises(openai.InternalServerError) as raised:
        await client.fine_tuning.jobs.pause(job.id)
    assert raised.value.status_code == 501 and "not supported" in raised.value.message
    deleted = await client.files.delete(uploaded.id)
    assert deleted.deleted


async def test_bad_fine_tuning_requests_name_the_parameter(
    platform: tuple[Platform, Any],
) -> None:
    _, client = platform
    with pytest.raises(openai.BadRequestError) as raised:
        await client.files.create(file=("x.jsonl", b"{}\n"), purpose="assistants")
    assert raised.value.param == "purpose"
    with pytest.raises(openai.BadRequestError):  # DatasetService refuses it: no valid record
        await client.files.create(file=("x.jsonl", b"garbage\x00\n"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as raised:
        await client.fine_tuning.jobs.create(model="colours", training_file="0" * 32)
    assert raised.value.param == "training_file"
    with pytest.raises(openai.BadRequestError) as raised:
        await client.fine_tuning.jobs.create(model="nope", training_file="0" * 32)
    assert raised.value.param == "model"
    with pytest.raises(openai.BadRequestError) as raised:
        await client.fine_tuning.jobs.create(
            model="colours", training_file="x", hyperparameters={"n_epochs": "many"}
        )
    assert raised.value.param == "hyperparameters.n_epochs"
    with pytest.raises(openai.NotFoundError):
        await client.fine_tuning.jobs.retrieve("0" * 32)
    for garbage, param in (
        ({"hyperparameters": "fast"}, "hyperparameters"),
        ({"seed": "abc"}, "seed"),
        ({"method": {"type": "supervised", "supervised": [1]}}, "method.supervised"),
        ({"method": "dpo"}, "method"),
        ({"method": {"type": "rlhf"}}, "method.type"),
        ({"tunefleet": {"lora": {"rank": "big"}}}, "tunefleet"),
    ):
        with pytest.raises(openai.BadRequestError) as raised:
            await client.fine_tuning.jobs.create(
                model="colours", training_file="x", extra_body=garbage
            )
        assert raised.value.param == param, garbage
