"""EvaluationService on the embedded platform: jobs are checked naming the field, run through
DatasetService and InferenceService, resumable from their stored answers, cancellable, and their
results and answers readable item by item."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.evaluation.openai_stub import openai_stub
from tests.evaluation.test_runner import set_alias, untrained_lora, upload_version
from tests.helpers import error_info
from tests.training.conftest import Platform
from tunefleet.client import AsyncClient
from tunefleet.evaluation.runner import DatasetReader
from tunefleet.v1 import (
    dataset_pb2,
    evaluation_pb2,
    evaluation_service_pb2,
    inference_pb2,
)

MakePlatform = Any
State = evaluation_pb2.EvaluationJob.State
CANDIDATE = evaluation_pb2.EvaluationCandidate
GRADER = evaluation_pb2.EvaluationGrader
pytestmark = pytest.mark.timeout(600)


def job(dataset: str, *candidates: evaluation_pb2.EvaluationCandidate, **fields: Any) -> Any:
    document: dict[str, Any] = {
        "candidates": list(candidates) or [evaluation_pb2.EvaluationCandidate(name="base")],
        "dataset": dataset,
        "max_items": 6,
        "sampling": inference_pb2.SamplingParams(max_tokens=8),
        "graders": [
            evaluation_pb2.EvaluationGrader(type="exact_match"),
            evaluation_pb2.EvaluationGrader(type="rouge_l"),
        ],
        **fields,
    }
    return evaluation_pb2.EvaluationJob(**document)


async def create(platform: Platform, evaluation: Any, **options: Any) -> Any:
    return await platform.evaluation.CreateEvaluationJob(
        evaluation_service_pb2.CreateEvaluationJobRequest(evaluation_job=evaluation, **options)
    )


async def wait(platform: Platform, name: str, *states: int, within: float = 300) -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        found = await platform.evaluation.GetEvaluationJob(
            evaluation_service_pb2.GetEvaluationJobRequest(name=name)
        )
        if found.state in states:
            return found
        assert asyncio.get_running_loop().time() < deadline, found
        await asyncio.sleep(0.1)


async def test_a_job_runs_and_its_answers_are_listed(
    make_platform: MakePlatform, chat_model: Path, tmp_path: Path
) -> None:
    platform = await make_platform(inference={"base_model": "colours", "max_loaded_adapters": 2})
    dataset = await platform.upload()
    version = await upload_version(
        platform, "untrained", untrained_lora(chat_model, tmp_path / "u")
    )
    await set_alias(platform, "adapters/untrained/aliases/prod", version)
    requested = job(
        dataset.name,
        evaluation_pb2.EvaluationCandidate(name="base"),
        evaluation_pb2.EvaluationCandidate(name="untrained", adapter=version),
        evaluation_pb2.EvaluationCandidate(name="prod", adapter="adapters/untrained@prod"),
        gate=evaluation_pb2.EvaluationGate(metric="rouge_l"),
        graders=[GRADER(type="exact_match"), GRADER(type="rouge_l"), GRADER(type="perplexity")],
    )
    created = await create(platform, requested, request_id="f2b6a9a0-5b5a-4c39-9d4a-0d3f8b3c1e11")
    assert created.name.startswith("evaluationJobs/") and created.baseline == "base"
    again = await create(platform, requested, request_id="f2b6a9a0-5b5a-4c39-9d4a-0d3f8b3c1e11")
    assert again.name == created.name
    done = await wait(platform, created.name, State.STATE_SUCCEEDED, State.STATE_FAILED)
    assert done.state == State.STATE_SUCCEEDED, done.error_message
    assert done.answers_total == done.answers_done == 18
    assert [r.candidate for r in done.results] == ["base", "untrained", "prod"]
    assert [c.adapter_version for c in done.candidates] == ["", version, version]
    base, untrained, prod = done.results
    assert [s.mean for s in prod.scores] == [s.mean for s in untrained.scores]
    assert [s.grader for s in base.scores] == ["exact_match", "rouge_l", "perplexity"]
    assert [s.lower_is_better for s in base.scores] == [False, False, True]
    assert all(s.count == 6 and s.errors == 0 for s in [*base.scores, *untrained.scores])
    assert not base.HasField("gate_passed") and not base.scores[0].HasField("comparison")
    rouge = untrained.scores[1].comparison
    assert rouge.test == "paired-bootstrap" and rouge.verdict != 0
    assert untrained.HasField("gate_passed") and not untrained.gate_passed
    assert untrained.gate_reasons

    # Prometheus: the scores by adapter version, grader and dataset, and the gate.
    def metric(name: str, **labels: str) -> float | None:
        value: float | None = platform.registry.get_sample_value(name, labels)
        return value

    labels = {"adapter": "adapters/untrained", "version": version, "dataset": dataset.name}
    score = untrained.scores[1]
    for suffix, expected in (
        ("", score.mean),
        ("_ci_low", score.ci_low),
        ("_ci_high", score.ci_high),
    ):
        found = metric(
            f"tunefleet_evaluation_score{suffix}", **labels, grader="rouge_l", candidate="untrained"
        )
        assert found == expected
    base_labels = {"adapter": "", "version": "", "dataset": dataset.name, "candidate": "base"}
    assert (
        metric("tunefleet_evaluation_score", **base_labels, grader="exact_match")
        == base.scores[0].mean
    )
    assert metric("tunefleet_evaluation_gate_passed", **labels, candidate="untrained") == 0.0
    assert metric("tunefleet_evaluation_gate_passed", **base_labels) is None
    assert metric("tunefleet_evaluation_jobs_ended_total", state="succeeded") == 1.0
    assert metric("tunefleet_evaluation_answers_total", outcome="ok") == 18.0
    assert metric("tunefleet_evaluation_jobs_running") == 0.0

    listed = await platform.evaluation.ListEvaluationItemResults(
        evaluation_service_pb2.ListEvaluationItemResultsRequest(parent=created.name, page_size=5)
    )
    assert len(listed.item_results) == 5 and listed.next_page_token
    rest = await platform.evaluation.ListEvaluationItemResults(
        evaluation_service_pb2.ListEvaluationItemResultsRequest(
            parent=created.name, page_size=50, page_token=listed.next_page_token
        )
    )
    results = list(listed.item_results) + list(rest.item_results)
    assert len(results) == 18 and not rest.next_page_token
    assert all(r.HasField("output") and r.reference.startswith("Colour: ") for r in results)
    assert {r.candidate for r in results} == {"base", "untrained", "prod"}
    assert all(set(r.scores) == {"exact_match", "rouge_l", "perplexity"} for r in results)
    only = await platform.evaluation.ListEvaluationItemResults(
        evaluation_service_pb2.ListEvaluationItemResultsRequest(
            parent=created.name, candidate="untrained"
        )
    )
    assert len(only.item_results) == 6
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await platform.evaluation.CancelEvaluationJob(
            evaluation_service_pb2.CancelEvaluationJobRequest(name=created.name)
        )
    assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    jobs = await platform.evaluation.ListEvaluationJobs(
        evaluation_service_pb2.ListEvaluationJobsRequest()
    )
    assert [j.name for j in jobs.evaluation_jobs] == [created.name]


def ENDPOINT(**fields: str) -> evaluation_pb2.OpenAIEndpoint:
    return evaluation_pb2.OpenAIEndpoint(
        **{"base_url": "http://127.0.0.1:9/v1", "model": "parrot", **fields}
    )


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"candidates": []}, "evaluation_job.candidates"),
        ({"candidates": [CANDIDATE(name="Base!")]}, "evaluation_job.candidates[0].name"),
        ({"candidates": [CANDIDATE(name="a"), CANDIDATE(name="a")]},
         "evaluation_job.candidates[1].name"),
        ({"candidates": [CANDIDATE(name="a", adapter="orders@prod")]},
         "evaluation_job.candidates[0].adapter"),
        ({"baseline": "nobody"}, "evaluation_job.baseline"),
        ({"dataset": ""}, "evaluation_job.dataset"),
        ({"dataset": "datasets/missing"}, "evaluation_job.dataset"),
        ({"max_items": 10**6}, "evaluation_job.max_items"),
        ({"graders": []}, "evaluation_job.graders"),
        ({"graders": [GRADER(type="meteor")]}, "evaluation_job.graders[0].type"),
        ({"graders": [GRADER(type="string_check", operation="starts")]},
         "evaluation_job.graders[0].operation"),
        ({"graders": [GRADER(type="string_check", operation="regex", value="([")]},
         "evaluation_job.graders[0].value"),
        ({"graders": [GRADER(type="string_check", operation="regex", value="x", normalise=True)]},
         "evaluation_job.graders[0].operation"),
        ({"graders": [GRADER(type="json_schema", json_schema="{")]},
         "evaluation_job.graders[0].json_schema"),
        ({"graders": [GRADER(type="json_schema", json_schema='{"type": 5}')]},
         "evaluation_job.graders[0].json_schema"),
        ({"graders": [GRADER(type="bleu")] * 2}, "evaluation_job.graders[1].name"),
        ({"gate": evaluation_pb2.EvaluationGate(metric="bleu")}, "evaluation_job.gate.metric"),
        ({"max_error_rate": 2.0}, "evaluation_job.max_error_rate"),
        ({"sampling": inference_pb2.SamplingParams(temperature=3)},
         "evaluation_job.sampling.temperature"),
        ({"candidates": [CANDIDATE(name="a", adapter="adapters/x@prod", endpoint=ENDPOINT())]},
         "evaluation_job.candidates[0].adapter"),
        ({"candidates": [CANDIDATE(name="a", endpoint=ENDPOINT(base_url="ftp://h/v1"))]},
         "evaluation_job.candidates[0].endpoint.base_url"),
        ({"candidates": [CANDIDATE(name="a", endpoint=ENDPOINT(model=""))]},
         "evaluation_job.candidates[0].endpoint.model"),
        ({"candidates": [CANDIDATE(name="a", endpoint=ENDPOINT(api_key_secret="missing"))]},
         "evaluation_job.candidates[0].endpoint.api_key_secret"),
        ({"candidates": [CANDIDATE(name="a", endpoint=ENDPOINT(api_key_secret="../key"))]},
         "evaluation_job.candidates[0].endpoint.api_key_secret"),
        ({"graders": [GRADER(type="pairwise_judge", rubric="Better: {answer}?")]},
         "evaluation_job.graders[0].rubric"),
        ({"graders": [GRADER(type="score_model", rubric="Rate {input}")]},
         "evaluation_job.graders[0].rubric"),
        ({"graders": [GRADER(type="score_model", score_min=5, score_max=5)]},
         "evaluation_job.graders[0].score_max"),
        ({"graders": [GRADER(type="score_model", judge=CANDIDATE(adapter="x"))]},
         "evaluation_job.graders[0].judge.adapter"),
        ({"candidates": [CANDIDATE(name="a", endpoint=ENDPOINT())],
          "graders": [GRADER(type="kl_from_base")]},
         "evaluation_job.graders[0].type"),
    ],
)  # fmt: skip
async def test_bad_jobs_are_refused_naming_the_field(
    make_platform: MakePlatform, fields: dict[str, Any], field: str
) -> None:
    platform = await make_platform()
    dataset = await platform.upload()
    requested = job(fields.pop("dataset", dataset.name), **fields)
    if "candidates" in fields:
        del requested.candidates[:]
        requested.candidates.extend(fields["candidates"])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await create(platform, requested)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith(field), refused.value.details()
    listed = await platform.evaluation.ListEvaluationJobs(
        evaluation_service_pb2.ListEvaluationJobsRequest()
    )
    assert not listed.evaluation_jobs


async def test_an_empty_split_is_refused_when_the_job_is_created(
    make_platform: MakePlatform,
) -> None:
    platform = await make_platform()
    assert platform.server is not None
    async with AsyncClient(f"127.0.0.1:{platform.server.port}") as client:
        unsplit = await client.datasets.upload(
            repeat_records(8), display_name="unsplit", options={"validationFraction": 0}
        )
    assert unsplit.validation_record_count == 0 < unsplit.train_record_count
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await create(platform, job(unsplit.name))  # the validation split, by default
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == (
        f"evaluation_job.split: {unsplit.name} has no records in its validation split"
    )
    train = await create(platform, job(unsplit.name, split=dataset_pb2.DATASET_SPLIT_TRAIN))
    assert train.name.startswith("evaluationJobs/")  # the train split has records


def repeat_records(count: int) -> bytes:
    return b"".join(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"Repeat: word{i}"},
                    {"role": "assistant", "content": f"word{i}"},
                ],
                "cluster": f"group {i // 4}",
            }
        ).encode()
        + b"\n"
        for i in range(count)
    )


async def test_an_external_endpoint_judged_pairwise_against_the_base_model(
    make_platform: MakePlatform, tmp_path: Path
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "parrot-key").write_text("sk-secret\n")
    platform = await make_platform(
        inference={"base_model": "colours"}, evaluation={"secrets_dir": str(secrets)}
    )
    dataset = await platform.upload(repeat_records(40))
    assert platform.server is not None
    reader = DatasetReader(f"127.0.0.1:{platform.server.port}")
    clusters = [
        i.cluster for i in await reader.items(dataset.name, dataset_pb2.DATASET_SPLIT_VALIDATION)
    ]
    await reader.close()
    assert len(clusters) == dataset.validation_record_count and all(clusters)
    assert all(c.startswith("group ") for c in clusters)
    with openai_stub() as stub:
        parrot = evaluation_pb2.OpenAIEndpoint(
            base_url=stub.base_url, model="parrot", api_key_secret="parrot-key"
        )
        judge = CANDIDATE(
            endpoint=evaluation_pb2.OpenAIEndpoint(base_url=stub.base_url, model="by-content")
        )
        requested = job(
            dataset.name,
            CANDIDATE(name="base"),
            CANDIDATE(name="parrot", endpoint=parrot),
            max_items=0,
            graders=[GRADER(type="exact_match"), GRADER(type="pairwise_judge", judge=judge)],
            gate=evaluation_pb2.EvaluationGate(metric="pairwise_judge", min_improvement=0.5),
        )
        created = await create(platform, requested)
        done = await wait(platform, created.name, State.STATE_SUCCEEDED, State.STATE_FAILED)
    assert done.state == State.STATE_SUCCEEDED, done.error_message
    base, found = done.results
    assert [s.grader for s in base.scores] == ["exact_match"]  # no pairwise score of its own
    n = dataset.validation_record_count
    assert found.scores[0].mean == 1.0 and base.scores[0].mean == 0.0
    pairwise = found.scores[1]
    assert (pairwise.grader, pairwise.count, pairwise.mean) == ("pairwise_judge", n, 1.0)
    assert (pairwise.pairwise.wins, pairwise.pairwise.ties, pairwise.pairwise.losses) == (n, 0, 0)
    assert pairwise.pairwise.inconsistency_rate == 0.0 and pairwise.pairwise.win_rate == 1.0
    assert pairwise.comparison.test == "sign-exact"
    assert pairwise.comparison.p_value == pytest.approx(2 * 0.5**n)
    assert found.gate_passed, found.gate_reasons
    # The key went to the endpoint and nowhere else.
    assert {r["authorization"] for r in stub.requests if r["model"] == "parrot"} == {
        "Bearer sk-secret"
    }
    assert "sk-secret" not in str(done)
    listed = await platform.evaluation.ListEvaluationItemResults(
        evaluation_service_pb2.ListEvaluationItemResultsRequest(
            parent=created.name, candidate="parrot", page_size=1
        )
    )
    item = listed.item_results[0]
    assert item.scores["pairwise_judge"] == 1.0
    assert set(item.judgements) == {
        "pairwise_judge/candidate_first",
        "pairwise_judge/baseline_first",
    }
    assert item.judgements["pairwise_judge/candidate_first"].endswith("[[A]]")
    assert item.judgements["pairwise_judge/baseline_first"].endswith("[[B]]")


async def test_an_adapter_that_cannot_answer_fails_the_job_with_the_reason(
    make_platform: MakePlatform,
) -> None:
    platform = await make_platform(inference={"base_model": "colours"})
    dataset = await platform.upload()
    requested = job(
        dataset.name,
        evaluation_pb2.EvaluationCandidate(name="base"),
        evaluation_pb2.EvaluationCandidate(name="gone", adapter="adapters/gone@prod"),
    )
    created = await create(platform, requested)
    failed = await wait(platform, created.name, State.STATE_FAILED, State.STATE_SUCCEEDED)
    assert failed.state == State.STATE_FAILED
    assert failed.error_reason == "TOO_MANY_FAULTS"
    assert "could not grade 6 of 6 items of gone" in failed.error_message
    assert "of gone: NOT_FOUND" in failed.error_message  # the first fault, for a start
    answers = await platform.evaluation.ListEvaluationItemResults(
        evaluation_service_pb2.ListEvaluationItemResultsRequest(
            parent=created.name, candidate="gone"
        )
    )
    assert all(
        not r.HasField("output") and "NOT_FOUND" in r.errors["exact_match"]
        for r in answers.item_results
    )


async def test_a_merged_full_model_is_refused_as_a_candidate_naming_why(
    make_platform: MakePlatform, chat_model: Path
) -> None:
    # A full model (what MergeAdapterVersion registers) is served as a base model of its own,
    # not by this InferenceService: the job fails loud, never with the base model's answers.
    platform = await make_platform(inference={"base_model": "colours"})
    dataset = await platform.upload()
    merged = await upload_version(platform, "merged", chat_model)
    requested = job(
        dataset.name,
        evaluation_pb2.EvaluationCandidate(name="base"),
        evaluation_pb2.EvaluationCandidate(name="merged", adapter=merged),
    )
    created = await create(platform, requested)
    failed = await wait(platform, created.name, State.STATE_FAILED, State.STATE_SUCCEEDED)
    assert failed.state == State.STATE_FAILED and failed.error_reason == "TOO_MANY_FAULTS"
    assert "of merged: FAILED_PRECONDITION" in failed.error_message
    assert "is a full model" in failed.error_message


async def test_a_dataset_without_reference_answers_fails_the_job(
    make_platform: MakePlatform,
) -> None:
    platform = await make_platform(inference={"base_model": "colours"})
    turns = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "and?"},  # no answer to compare with
    ]
    data = b"".join(
        json.dumps({"messages": [{**turns[0], "content": f"q{i}"}, *turns[1:]]}).encode() + b"\n"
        for i in range(10)
    )
    dataset = await platform.upload(data)
    created = await create(platform, job(dataset.name, split=dataset_pb2.DATASET_SPLIT_TRAIN))
    failed = await wait(platform, created.name, State.STATE_FAILED, State.STATE_SUCCEEDED)
    assert failed.error_reason == "DATASET_UNUSABLE", failed
    assert "does not end with an assistant's text answer" in failed.error_message


async def test_cancel_stops_a_job(make_platform: MakePlatform) -> None:
    """Cancelled right after its creation (queued, or answering its first items), a job ends
    CANCELLED without results, and stays so."""
    platform = await make_platform(inference={"base_model": "colours"})
    dataset = await platform.upload()
    slow = inference_pb2.SamplingParams(max_tokens=64)
    created = await create(platform, job(dataset.name, max_items=0, sampling=slow))
    watch = platform.evaluation.WatchEvaluationJob(
        evaluation_service_pb2.WatchEvaluationJobRequest(name=created.name)
    )
    first = await watch.read()
    assert first.name == created.name and first.state in (State.STATE_QUEUED, State.STATE_RUNNING)
    cancelled = await platform.evaluation.CancelEvaluationJob(
        evaluation_service_pb2.CancelEvaluationJobRequest(name=created.name)
    )
    assert cancelled.state == State.STATE_CANCELLED
    watched = [first]
    while (update := await watch.read()) is not grpc.aio.EOF:
        watched.append(update)
    assert watched[-1].state == State.STATE_CANCELLED  # the watcher saw it end, and stopped
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        async for _ in platform.evaluation.WatchEvaluationJob(
            evaluation_service_pb2.WatchEvaluationJobRequest(name="evaluationJobs/nothing")
        ):
            pass
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    ended = await wait(platform, created.name, State.STATE_CANCELLED, State.STATE_SUCCEEDED)
    assert ended.state == State.STATE_CANCELLED and not ended.results
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await platform.evaluation.CancelEvaluationJob(
            evaluation_service_pb2.CancelEvaluationJobRequest(name=created.name)
        )
    assert error_info(again.value) is not None
    assert error_info(again.value).reason == "JOB_ENDED"  # type: ignore[union-attr]


def generate_requests(platform: Platform) -> float:
    """Generate requests the platform's InferenceService counted since it started."""
    return sum(
        sample.value
        for metric in platform.registry.collect()
        if metric.name == "tunefleet_inference_requests"
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


async def test_a_restarted_service_resumes_a_job_without_asking_again(
    make_platform: MakePlatform,
) -> None:
    from sqlalchemy import func, select

    from tunefleet.evaluation.store import ItemRow

    platform = await make_platform(
        inference={"base_model": "colours"}, evaluation={"concurrency": 1}
    )
    dataset = await platform.upload()
    long = inference_pb2.SamplingParams(max_tokens=48)
    created = await create(platform, job(dataset.name, max_items=0, sampling=long))
    database = platform.storage.database_for("evaluation")

    def answered() -> int:
        with database.read() as session:
            return int(session.scalar(select(func.count()).select_from(ItemRow)) or 0)

    for _ in range(3000):  # until some answers are stored
        if await asyncio.to_thread(answered) >= 2:
            break
        await asyncio.sleep(0.01)
    assert platform.server is not None
    port = platform.server.port
    await platform.stop()
    before = await asyncio.to_thread(answered)
    total = dataset.validation_record_count
    assert 2 <= before < total, "stopped in the middle of the job"

    await platform.start(port=port)
    done = await wait(platform, created.name, State.STATE_SUCCEEDED, State.STATE_FAILED)
    assert done.state == State.STATE_SUCCEEDED, done.error_message
    assert done.results[0].scores[0].count == total
    assert await asyncio.to_thread(answered) == total
    # Only the answers missing at the restart were asked for again.
    assert generate_requests(platform) == total - before


async def test_the_sdk_creates_waits_and_reads_answers(make_platform: MakePlatform) -> None:
    from tunefleet.client import AsyncClient, Client
    from tunefleet.client.errors import InvalidArgument

    platform = await make_platform(inference={"base_model": "colours"})
    dataset = await platform.upload()
    assert platform.server is not None
    target = f"127.0.0.1:{platform.server.port}"
    document = {
        "candidates": [{"name": "base"}, {"name": "prompted", "systemPrompt": "Be brief."}],
        "dataset": dataset.name,
        "maxItems": 4,
        "sampling": {"maxTokens": 8},
        "graders": [{"type": "token_f1"}, {"type": "string_check", "operation": "like"}],
    }
    async with AsyncClient(target) as client:
        created = await client.evaluations.create(document)
        seen: list[Any] = []
        done = await client.evaluations.wait(created.name, timeout=300, on_change=seen.append)
        assert done.state == State.STATE_SUCCEEDED, done.error_message
        # Watched as it changed: states and progress only go forward, and the last is the end.
        states = [job.state for job in seen]
        assert states == sorted(states) and states[-1] == State.STATE_SUCCEEDED
        assert [j.answers_done for j in seen] == sorted(j.answers_done for j in seen)
        assert seen[-1] == done and len(seen) >= 2
        answers = [item async for item in client.evaluations.items(done.name, page_size=3)]
        assert len(answers) == 8 and {a.candidate for a in answers} == {"base", "prompted"}
        assert [j.name async for j in client.evaluations.list()] == [done.name]
        with pytest.raises(InvalidArgument) as refused:
            await client.evaluations.create({**document, "graders": []})
        assert refused.value.field == "evaluation_job.graders"

    def blocking() -> None:
        with Client(target) as client:
            assert list(client.evaluations.watch(done.name)) == [done]  # ended: one message
            job = client.evaluations.get(done.name.removeprefix("evaluationJobs/"))
            assert [r.candidate for r in job.results] == ["base", "prompted"]
            assert len(list(client.evaluations.items(job.name, candidate="base"))) == 4

    await asyncio.to_thread(blocking)
