"""EvaluationService in the SDK: judge adapters against a baseline, wait for the verdict, read
the answers item by item."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from typing import Any

from tunefleet.client.core import (
    Call,
    Feed,
    M,
    Program,
    Resource,
    each,
    operation,
    pages,
    stream,
    watching,
)
from tunefleet.client.errors import DeadlineExceeded
from tunefleet.client.helpers import resource_name, to_message
from tunefleet.v1 import evaluation_pb2, evaluation_service_pb2, evaluation_service_pb2_grpc

EvaluationJob = evaluation_pb2.EvaluationJob
ENDED = {
    EvaluationJob.STATE_SUCCEEDED,
    EvaluationJob.STATE_FAILED,
    EvaluationJob.STATE_CANCELLED,
}


class Evaluations(Resource[M]):
    """EvaluationService: evaluation jobs and their answers."""

    Stub = evaluation_service_pb2_grpc.EvaluationServiceStub

    @operation
    def create(
        self,
        job: evaluation_pb2.EvaluationJob | Mapping[str, Any],
        *,
        request_id: str = "",
        validate_only: bool = False,
    ) -> Program[evaluation_pb2.EvaluationJob]:
        """Start an evaluation, given as an `EvaluationJob` or its JSON form; retried safely
        (a request id is generated when none is given).

        Example::

            job = client.evaluations.create({
                "candidates": [
                    {"name": "base"},
                    {"name": "tuned", "adapter": "adapters/orders@prod"},
                ],
                "dataset": dataset.name,
                "graders": [{"type": "exact_match"}, {"type": "rouge_l"}],
                "gate": {"metric": "exact_match", "minImprovement": 0.05},
            })
        """
        request = evaluation_service_pb2.CreateEvaluationJobRequest(
            evaluation_job=to_message(evaluation_pb2.EvaluationJob, job, "evaluation_job"),
            request_id=request_id or str(uuid.uuid4()),
            validate_only=validate_only,
        )
        created: evaluation_pb2.EvaluationJob = yield Call(
            self.Stub, "CreateEvaluationJob", request, idempotent=True
        )
        return created

    @operation
    def get(self, name: str) -> Program[evaluation_pb2.EvaluationJob]:
        """A job by name (`evaluationJobs/{id}` or the id), with its results once it succeeded."""
        request = evaluation_service_pb2.GetEvaluationJobRequest(
            name=resource_name("evaluationJobs", name)
        )
        job: evaluation_pb2.EvaluationJob = yield Call(
            self.Stub, "GetEvaluationJob", request, idempotent=True
        )
        return job

    @stream
    def list(self, page_size: int = 100) -> Feed[evaluation_pb2.EvaluationJob]:
        """Every evaluation job, newest first."""
        request = evaluation_service_pb2.ListEvaluationJobsRequest(page_size=page_size)
        yield from pages(self.Stub, "ListEvaluationJobs", request, "evaluation_jobs")

    @operation
    def cancel(self, name: str) -> Program[evaluation_pb2.EvaluationJob]:
        """Stop a queued or running job."""
        request = evaluation_service_pb2.CancelEvaluationJobRequest(
            name=resource_name("evaluationJobs", name)
        )
        job: evaluation_pb2.EvaluationJob = yield Call(
            self.Stub, "CancelEvaluationJob", request, idempotent=True
        )
        return job

    @stream
    def items(
        self, name: str, candidate: str = "", page_size: int = 100
    ) -> Feed[evaluation_pb2.EvaluationItemResult]:
        """The job's answers with their scores, by item then candidate (one candidate's only
        with `candidate`).

        Example::

            for item in client.evaluations.items(job.name, candidate="tuned"):
                if item.scores.get("exact_match") == 0:
                    print(item.index, item.output, "expected", item.reference)
        """
        request = evaluation_service_pb2.ListEvaluationItemResultsRequest(
            parent=resource_name("evaluationJobs", name),
            candidate=candidate,
            page_size=page_size,
        )
        yield from pages(self.Stub, "ListEvaluationItemResults", request, "item_results")

    @stream
    def watch(self, name: str, *, timeout: float | None = None) -> Feed[EvaluationJob]:
        """The job now, then each time it changes (state, answers done, results), until it has
        ended; a dropped stream is opened again (it starts with the job as it is then).
        `timeout` bounds the whole iteration (DeadlineExceeded).

        Example::

            for job in client.evaluations.watch(job.name):
                print(job.answers_done, "/", job.answers_total)
        """
        request = evaluation_service_pb2.WatchEvaluationJobRequest(
            name=resource_name("evaluationJobs", name)
        )
        yield from watching(self.Stub, "WatchEvaluationJob", request, timeout)

    @operation
    def wait(
        self,
        name: str,
        *,
        timeout: float | None = None,
        on_change: Callable[[EvaluationJob], None] | None = None,
    ) -> Program[evaluation_pb2.EvaluationJob]:
        """Block until the job has ended (SUCCEEDED, FAILED or CANCELLED) and return it;
        `on_change` sees it each time it changes. Raises DeadlineExceeded after `timeout`."""
        last: list[EvaluationJob] = []

        def seen(job: EvaluationJob) -> None:
            last[:] = [job]
            if on_change is not None:
                on_change(job)

        yield from each(Evaluations.watch.function(self, name, timeout=timeout), seen)
        if not last or last[0].state not in ENDED:
            raise DeadlineExceeded(f"{name} has not ended after {timeout} s")
        return last[0]

    @operation
    def annotation_task(
        self, name: str, candidate: str, *, annotator: str, baseline: str = ""
    ) -> Program[evaluation_pb2.AnnotationTask]:
        """The next pair of answers for `annotator` to compare (human A/B): `candidate`'s and
        the baseline's answers to one item of a finished job, in random order, blind. Its
        `name` is empty once every item is judged.

        Example::

            task = client.evaluations.annotation_task(job.name, "tuned", annotator="ada")
            while task.name:
                print(task.input[-1].content, "\n1:", task.first, "\n2:", task.second)
                client.evaluations.annotate(task.name, "first")
                task = client.evaluations.annotation_task(job.name, "tuned", annotator="ada")
        """
        request = evaluation_service_pb2.CreateAnnotationTaskRequest(
            parent=resource_name("evaluationJobs", name),
            candidate=candidate,
            baseline=baseline,
            annotator=annotator,
        )
        task: evaluation_pb2.AnnotationTask = yield Call(self.Stub, "CreateAnnotationTask", request)
        return task

    @operation
    def annotate(self, task: str, choice: str) -> Program[evaluation_pb2.Annotation]:
        """Record which answer of `task` is better: `first`, `second` or `tie` (retried
        safely: the same answer again returns the first)."""
        request = evaluation_service_pb2.CreateAnnotationRequest(
            annotation=evaluation_pb2.Annotation(
                task=task,
                choice=evaluation_pb2.AnnotationChoice.Value(f"ANNOTATION_CHOICE_{choice.upper()}")
                if choice.upper() in ("FIRST", "SECOND", "TIE")
                else evaluation_pb2.ANNOTATION_CHOICE_UNSPECIFIED,
            )
        )
        annotation: evaluation_pb2.Annotation = yield Call(
            self.Stub, "CreateAnnotation", request, idempotent=True
        )
        return annotation

    @operation
    def annotation_summary(
        self, name: str, candidate: str, *, baseline: str = ""
    ) -> Program[evaluation_pb2.AnnotationSummary]:
        """People's preferences between `candidate` and the baseline: wins, losses, ties and
        the win rate with Wilson's interval."""
        request = evaluation_service_pb2.GetAnnotationSummaryRequest(
            parent=resource_name("evaluationJobs", name), candidate=candidate, baseline=baseline
        )
        summary: evaluation_pb2.AnnotationSummary = yield Call(
            self.Stub, "GetAnnotationSummary", request, idempotent=True
        )
        return summary
