"""Human A/B through EvaluationService: pairs are served blind and in random order, each
annotator judges each item once, retries are safe, and the tally is the people's preferences.
The candidates are a stub OpenAI endpoint's models, so their answers differ on every item."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from tests.evaluation.openai_stub import openai_stub
from tests.evaluation.test_service import CANDIDATE, GRADER, create, job, repeat_records, wait
from tests.helpers import error_info
from tunefleet.v1 import evaluation_pb2, evaluation_service_pb2

MakePlatform = Any
State = evaluation_pb2.EvaluationJob.State
Choice = evaluation_pb2.AnnotationChoice
MUTE = "I cannot help with that."
pytestmark = pytest.mark.timeout(300)


async def task(platform: Any, parent: str, annotator: str, candidate: str = "parrot") -> Any:
    return await platform.evaluation.CreateAnnotationTask(
        evaluation_service_pb2.CreateAnnotationTaskRequest(
            parent=parent, candidate=candidate, annotator=annotator
        )
    )


async def annotate(platform: Any, name: str, choice: Any) -> Any:
    return await platform.evaluation.CreateAnnotation(
        evaluation_service_pb2.CreateAnnotationRequest(
            annotation=evaluation_pb2.Annotation(task=name, choice=choice)
        )
    )


async def summary(platform: Any, parent: str) -> Any:
    return await platform.evaluation.GetAnnotationSummary(
        evaluation_service_pb2.GetAnnotationSummaryRequest(parent=parent, candidate="parrot")
    )


async def refused(call: Any, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == code, raised.value.details()
    info = error_info(raised.value)
    return f"{info.reason if info else ''} {raised.value.details()}"


async def test_people_judge_blind_pairs_once_each(make_platform: MakePlatform) -> None:
    platform = await make_platform(inference={"base_model": "colours"})
    dataset = await platform.upload(repeat_records(80))
    n = dataset.validation_record_count
    with openai_stub() as stub:

        def model(name: str) -> Any:
            endpoint = evaluation_pb2.OpenAIEndpoint(base_url=stub.base_url, model=name)
            return CANDIDATE(name=name, endpoint=endpoint)

        pair, exact = (model("mute"), model("parrot")), [GRADER(type="exact_match")]
        created = await create(platform, job(dataset.name, *pair, max_items=0, graders=exact))
        done = await wait(platform, created.name, State.STATE_SUCCEEDED, State.STATE_FAILED)
        single = await create(platform, job(dataset.name, *pair, max_items=1, graders=exact))
        await wait(platform, single.name, State.STATE_SUCCEEDED)
    assert done.state == State.STATE_SUCCEEDED and n >= 16

    # Ada prefers the parrot's answer on every item; which side it is on varies.
    questions, parrot_first = set(), []
    for left in range(n, 0, -1):
        given = await task(platform, done.name, "ada")
        assert given.remaining == left and given.name.startswith(f"{done.name}/annotationTasks/")
        assert {given.first, given.second} - {MUTE} and MUTE in (given.first, given.second)
        question = given.input[-1].content
        assert question not in questions  # never the same item twice
        questions.add(question)
        parrot_first.append(given.second == MUTE)
        choice = (
            Choice.ANNOTATION_CHOICE_FIRST if parrot_first[-1] else Choice.ANNOTATION_CHOICE_SECOND
        )
        recorded = await annotate(platform, given.name, choice)
        assert recorded.annotator == "ada" and recorded.create_time.seconds > 0
        assert await annotate(platform, given.name, choice) == recorded  # a retry
        other = Choice.ANNOTATION_CHOICE_TIE
        why = await refused(
            annotate(platform, given.name, other), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert why.startswith("TASK_ANSWERED")
    assert any(parrot_first) and not all(parrot_first)  # random order (both seen)
    finished = await task(platform, done.name, "ada")
    assert not finished.name and finished.remaining == 0
    tally = await summary(platform, done.name)
    assert (tally.wins, tally.losses, tally.ties, tally.annotators) == (n, 0, 0, 1)
    assert tally.win_rate == 1.0 and 0.75 < tally.win_rate_ci_low < 1 and tally.baseline == "mute"

    # Bob calls two items even; his judgements count beside Ada's.
    for _ in range(2):
        given = await task(platform, done.name, "bob")
        assert given.remaining == n
        await annotate(platform, given.name, Choice.ANNOTATION_CHOICE_TIE)
        n -= 1
    tally = await summary(platform, done.name)
    assert (tally.wins, tally.ties, tally.annotators) == (len(questions), 2, 2)

    # Two tasks opened on the one item of a job: the second answer would count it twice.
    first, second = (
        await task(platform, single.name, "eve"),
        await task(platform, single.name, "eve"),
    )
    assert first.input == second.input and first.name != second.name
    await annotate(platform, first.name, Choice.ANNOTATION_CHOICE_FIRST)
    why = await refused(annotate(platform, second.name, Choice.ANNOTATION_CHOICE_FIRST),
                        grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
    assert why.startswith("ITEM_JUDGED")


async def test_bad_annotation_requests_name_the_field(make_platform: MakePlatform) -> None:
    platform = await make_platform(inference={"base_model": "colours"})
    dataset = await platform.upload()
    cancelled = await create(
        platform, job(dataset.name, CANDIDATE(name="base"), CANDIDATE(name="parrot"))
    )
    await platform.evaluation.CancelEvaluationJob(
        evaluation_service_pb2.CancelEvaluationJobRequest(name=cancelled.name)
    )
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert "annotator" in await refused(task(platform, cancelled.name, ""), invalid)
    assert "annotator" in await refused(task(platform, cancelled.name, "a\x00b"), invalid)
    assert "candidate" in await refused(task(platform, cancelled.name, "x", "nobody"), invalid)
    assert "candidate" in await refused(task(platform, cancelled.name, "x", "base"), invalid)
    assert "parent" in await refused(task(platform, "jobs/1", "x"), invalid)
    why = await refused(task(platform, cancelled.name, "x"), grpc.StatusCode.FAILED_PRECONDITION)
    assert why.startswith("JOB_NOT_SUCCEEDED")
    assert "annotation.choice" in await refused(
        annotate(
            platform, f"{cancelled.name}/annotationTasks/x", Choice.ANNOTATION_CHOICE_UNSPECIFIED
        ),
        invalid,
    )
    assert "annotation.task" in await refused(
        annotate(platform, "evaluationJobs/x/tasks/y", Choice.ANNOTATION_CHOICE_TIE), invalid
    )
    await refused(
        annotate(
            platform, f"{cancelled.name}/annotationTasks/nothing", Choice.ANNOTATION_CHOICE_TIE
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    empty = await summary(platform, cancelled.name)
    assert (empty.wins, empty.losses, empty.ties, empty.annotators) == (0, 0, 0, 0)
