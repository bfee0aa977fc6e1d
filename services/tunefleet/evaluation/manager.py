"""EvaluationService's requests: jobs are checked, stored, run in the background (at most
`evaluation.max_running_jobs` at once, oldest first) and followed. Answers are stored as they
come, so a restarted service resumes a job without asking again for what it has."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import random
import re
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from sqlalchemy.orm import Session

from tunefleet.core import graders as grading
from tunefleet.core.errors import FailedPrecondition, InvalidArgument, TunefleetError
from tunefleet.core.names import dataset_id
from tunefleet.core.protos import timestamp
from tunefleet.evaluation import judges as judging
from tunefleet.evaluation import store
from tunefleet.evaluation.judges import PairwiseJudge, ScoreJudge
from tunefleet.evaluation.likelihood import KlFromBase, Perplexity
from tunefleet.evaluation.metrics import EvaluationMetrics
from tunefleet.evaluation.report import EvaluationFailed, Gate, GraderSummary
from tunefleet.evaluation.runner import (
    AnyGrader,
    Candidate,
    DatasetReader,
    Endpoint,
    Generator,
    ItemResult,
    run,
)
from tunefleet.evaluation.statistics import Comparison, wilson
from tunefleet.runtime.experiments import ExperimentMirror, flatten
from tunefleet.runtime.settings import EvaluationSettings, MlflowSettings
from tunefleet.storage import idempotency
from tunefleet.storage.database import Database, utcnow
from tunefleet.storage.pagination import Page
from tunefleet.v1 import dataset_pb2, evaluation_pb2

EvaluationJob = evaluation_pb2.EvaluationJob
T = TypeVar("T")
State = EvaluationJob.State
log = logging.getLogger(__name__)
FIELD = "evaluation_job"
NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
SECRET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
MAX_ITEMS = 10_000
# What a job asked for: its MLflow run's parameters.
MIRRORED = ["display_name", "candidates", "baseline", "dataset", "split", "max_items", "sampling"]
MIRRORED += ["graders", "gate", "max_error_rate"]
WATCH_SECONDS = 5.0  # a watcher reads the job again at least this often
VERDICTS = {
    "better": evaluation_pb2.EVALUATION_VERDICT_BETTER,
    "worse": evaluation_pb2.EVALUATION_VERDICT_WORSE,
    "no significant difference": evaluation_pb2.EVALUATION_VERDICT_NO_SIGNIFICANT_DIFFERENCE,
}


def check(job: evaluation_pb2.EvaluationJob, secrets: str = "") -> None:
    """Every check that needs no other service; defaults filled in. `secrets`: the directory of
    the endpoints' API keys."""
    if not 1 <= len(job.candidates) <= 16:
        raise InvalidArgument(f"{FIELD}.candidates", "1 to 16 candidates are required")
    names: set[str] = set()
    for index, candidate in enumerate(job.candidates):
        where = f"{FIELD}.candidates[{index}]"
        if not NAME.fullmatch(candidate.name):
            raise InvalidArgument(f"{where}.name", "must be 1 to 63 of [a-z0-9-]")
        if candidate.name in names:
            raise InvalidArgument(f"{where}.name", f"{candidate.name!r} is named twice")
        names.add(candidate.name)
        check_model(candidate, where)
        if "/versions/" in candidate.adapter:
            candidate.adapter_version = candidate.adapter
    job.baseline = job.baseline or job.candidates[0].name
    if job.baseline not in names:
        raise InvalidArgument(f"{FIELD}.baseline", f"{job.baseline!r} is not a candidate")
    if not job.dataset:
        raise InvalidArgument(f"{FIELD}.dataset", "is required")
    dataset_id(job.dataset, f"{FIELD}.dataset")
    if job.split == dataset_pb2.DATASET_SPLIT_UNSPECIFIED:
        job.split = dataset_pb2.DATASET_SPLIT_VALIDATION
    if not 0 <= job.max_items <= MAX_ITEMS:
        raise InvalidArgument(f"{FIELD}.max_items", f"must be 0 to {MAX_ITEMS}")
    sampling = job.sampling
    sampling.max_tokens = sampling.max_tokens or 256
    if sampling.max_tokens < 0:
        raise InvalidArgument(f"{FIELD}.sampling.max_tokens", "must not be negative")
    if sampling.HasField("temperature") and not 0 <= sampling.temperature <= 2:
        raise InvalidArgument(f"{FIELD}.sampling.temperature", "must be 0 to 2")
    if sampling.HasField("top_p") and not 0 < sampling.top_p <= 1:
        raise InvalidArgument(f"{FIELD}.sampling.top_p", "must be in (0, 1]")
    graded = {grader.name for grader in build_graders(job, secrets)}
    for index, candidate in enumerate(job.candidates):
        model(candidate, f"{FIELD}.candidates[{index}]", secrets)  # its secret is there
    if job.HasField("gate"):
        if job.gate.metric not in graded:
            raise InvalidArgument(f"{FIELD}.gate.metric", f"{job.gate.metric!r} is not a grader")
        for name in job.gate.regression_graders:
            if name not in graded:
                raise InvalidArgument(
                    f"{FIELD}.gate.regression_graders", f"{name!r} is not a grader"
                )
        if job.gate.max_regressions < 0:
            raise InvalidArgument(f"{FIELD}.gate.max_regressions", "must not be negative")
    if not job.HasField("max_error_rate"):
        job.max_error_rate = 0.02
    if not 0 <= job.max_error_rate <= 1:
        raise InvalidArgument(f"{FIELD}.max_error_rate", "must be 0 to 1")


def check_model(model: evaluation_pb2.EvaluationCandidate, where: str) -> None:
    """A candidate's or a judge's model: an adapter, an endpoint, or the base model."""
    if model.adapter and not model.adapter.startswith("adapters/"):
        raise InvalidArgument(
            f"{where}.adapter",
            "must be adapters/{adapter}@{alias} or adapters/{adapter}/versions/{n}",
        )
    if not model.HasField("endpoint"):
        return
    endpoint, at = model.endpoint, f"{where}.endpoint"
    if model.adapter:
        raise InvalidArgument(f"{where}.adapter", "must be empty with an endpoint")
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", endpoint.base_url):
        raise InvalidArgument(f"{at}.base_url", "must be an http:// or https:// URL")
    if not endpoint.model:
        raise InvalidArgument(f"{at}.model", "is required")
    if endpoint.api_key_secret and not SECRET.fullmatch(endpoint.api_key_secret):
        raise InvalidArgument(
            f"{at}.api_key_secret",
            "must be 1 to 253 of [A-Za-z0-9._-], starting with a letter or digit",
        )


def build_graders(job: evaluation_pb2.EvaluationJob, secrets: str = "") -> list[AnyGrader]:
    if not 1 <= len(job.graders) <= 16:
        raise InvalidArgument(f"{FIELD}.graders", "1 to 16 graders are required")
    built: list[AnyGrader] = []
    names: set[str] = set()
    for index, config in enumerate(job.graders):
        where = f"{FIELD}.graders[{index}]"
        name = config.name or config.type
        if name in names:
            raise InvalidArgument(f"{where}.name", f"{name!r} is named twice")
        names.add(name)
        options: dict[str, Any] = {}
        if config.type in ("score_model", "pairwise_judge"):
            built.append(build_judge(config, where, secrets))
            continue
        if config.type in ("perplexity", "kl_from_base"):
            external = [c.name for c in job.candidates if c.HasField("endpoint")]
            if external:
                raise InvalidArgument(
                    f"{where}.type",
                    f"{config.type} reads log-probabilities, which the external endpoints of "
                    f"{', '.join(external)} do not give",
                )
            if config.type == "perplexity":
                built.append(Perplexity(name))
            else:
                sampling = job.sampling
                built.append(KlFromBase(name, sampling.max_tokens or 256, sampling.seed))
            continue
        if config.type == "exact_match":
            options = {"normalise": config.normalise}
        elif config.type == "string_check":
            options = {
                "operation": config.operation,
                "value": config.value,
                "normalise": config.normalise,
            }
            if config.operation == "regex" and config.value:
                try:
                    re.compile(config.value)
                except re.error as error:
                    message = f"not a regular expression: {error}"
                    raise InvalidArgument(f"{where}.value", message) from None
        elif config.type == "json_schema":
            try:
                options = {"schema": json.loads(config.json_schema)}
            except ValueError:
                raise InvalidArgument(f"{where}.json_schema", "is not JSON") from None
            if not isinstance(options["schema"], dict):
                raise InvalidArgument(f"{where}.json_schema", "must be a JSON object")
        try:
            grader = grading.grader(config.type, **options)
        except ValueError as error:
            field = "operation" if config.type == "string_check" else "type"
            raise InvalidArgument(f"{where}.{field}", str(error)) from None
        except Exception as error:  # the schema library's own refusal
            raise InvalidArgument(f"{where}.json_schema", f"not a valid schema: {error}") from None
        built.append(dataclasses.replace(grader, name=name))
    return built


def build_judge(
    config: evaluation_pb2.EvaluationGrader, where: str, secrets: str
) -> ScoreJudge | PairwiseJudge:
    name = config.name or config.type
    check_model(config.judge, f"{where}.judge")
    judge = model(config.judge, f"{where}.judge", secrets)
    score = config.type == "score_model"
    rubric = config.rubric or (judging.SCORE_RUBRIC if score else judging.PAIRWISE_RUBRIC)
    try:
        if score:
            judging.check_rubric(rubric, judging.SCORE_FIELDS, {"output"})
        else:
            judging.check_rubric(rubric, judging.PAIRWISE_FIELDS, {"answer_a", "answer_b"})
    except ValueError as error:
        raise InvalidArgument(f"{where}.rubric", str(error)) from None
    if not score:
        return PairwiseJudge(name, judge, rubric)
    low = config.score_min if config.HasField("score_min") else 1.0
    high = config.score_max if config.HasField("score_max") else 10.0
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise InvalidArgument(f"{where}.score_max", "must be finite and above score_min")
    return ScoreJudge(name, judge, rubric, low, high)


def model(config: evaluation_pb2.EvaluationCandidate, where: str, secrets: str) -> Candidate:
    """The runner's view of a model, its API key read from the secrets directory (keys are never
    stored with a job)."""
    endpoint = None
    if config.HasField("endpoint"):
        key = ""
        if config.endpoint.api_key_secret:
            path = Path(secrets or "/nonexistent") / config.endpoint.api_key_secret
            try:
                key = path.read_text().strip()
            except OSError:
                raise InvalidArgument(
                    f"{where}.endpoint.api_key_secret",
                    f"no secret {config.endpoint.api_key_secret!r} in evaluation.secrets_dir",
                ) from None
        endpoint = Endpoint(config.endpoint.base_url, config.endpoint.model, key)
    return Candidate(
        config.name,
        config.adapter_version or config.adapter,  # pinned by a run that was interrupted
        config.system_prompt,
        tuple(config.few_shot),
        endpoint,
    )


class EvaluationManager:
    def __init__(
        self,
        db: Database,
        settings: EvaluationSettings,
        metrics: EvaluationMetrics,
        mirror: ExperimentMirror | None = None,
    ) -> None:
        self.db, self.settings, self.metrics = db, settings, metrics
        self.mirror = mirror or ExperimentMirror(MlflowSettings())
        self.datasets = DatasetReader(settings.datasets_endpoint, settings.service_token)
        self.generator = Generator(settings.inference_endpoint, settings.service_token)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(settings.max_running_jobs)
        self._change = asyncio.Event()  # set (and replaced) whenever a job changes

    async def start(self, server_address: str) -> None:
        """Resume the jobs a previous process left queued or running."""
        self.mirror.start()
        self.datasets.endpoint = self.datasets.endpoint or server_address
        self.generator.endpoint = self.generator.endpoint or server_address
        with self.db.read() as session:
            waiting = [row.id for row in store.unfinished(session)]
        for job in waiting:
            self._spawn(job)

    async def stop(self) -> None:
        """Jobs stop where they are (a restarted service resumes them)."""
        for task in list(self._tasks.values()):
            task.cancel()
        for task in list(self._tasks.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.datasets.close()
        await self.generator.close()
        await asyncio.to_thread(self.mirror.stop)

    async def create(
        self, requested: evaluation_pb2.EvaluationJob, request_id: str, validate_only: bool
    ) -> evaluation_pb2.EvaluationJob:
        job = EvaluationJob(
            display_name=requested.display_name,
            candidates=requested.candidates,
            baseline=requested.baseline,
            dataset=requested.dataset,
            split=requested.split,
            max_items=requested.max_items,
            sampling=requested.sampling,
            graders=requested.graders,
        )  # the fields a request sets; output-only ones are ignored
        if requested.HasField("gate"):
            job.gate.CopyFrom(requested.gate)
        if requested.HasField("max_error_rate"):
            job.max_error_rate = requested.max_error_rate
        for candidate in job.candidates:
            candidate.ClearField("adapter_version")  # output only
        check(job, self.settings.secrets_dir)
        dataset = await self.datasets.dataset(job.dataset, f"{FIELD}.dataset")
        split = job.split  # check() made an unset split VALIDATION
        records = (
            dataset.train_record_count
            if split == dataset_pb2.DATASET_SPLIT_TRAIN
            else dataset.validation_record_count
        )
        if records == 0:
            side = dataset_pb2.DatasetSplit.Name(split).removeprefix("DATASET_SPLIT_").lower()
            raise InvalidArgument(
                f"{FIELD}.split", f"{job.dataset} has no records in its {side} split"
            )
        if validate_only:
            job.state = State.STATE_QUEUED
            return job
        fingerprint = hashlib.sha256(requested.SerializeToString(deterministic=True)).hexdigest()

        def insert(session: Session) -> str:
            identifier = uuid.uuid4().hex[:20]
            now = utcnow()
            job.name = f"evaluationJobs/{identifier}"
            job.state = State.STATE_QUEUED
            job.create_time.CopyFrom(timestamp(now))
            row = store.JobRow(id=identifier, create_time=now)
            row.store(job)
            session.add(row)
            return job.name

        name, created = await asyncio.to_thread(
            idempotency.create_once,
            self.db,
            scope="CreateEvaluationJob",
            request_id=request_id,
            request_sha256=fingerprint,
            create=insert,
        )
        if created:
            self._spawn(store.job_id(name))
        return await asyncio.to_thread(self.get, name)

    def get(self, name: str) -> evaluation_pb2.EvaluationJob:
        with self.db.read() as session:
            return store.get(session, store.job_id(name)).job()

    def list_jobs(self, page_size: int, page_token: str) -> Page[evaluation_pb2.EvaluationJob]:
        with self.db.read() as session:
            page = store.list_page(session, page_size, page_token)
            return Page([row.job() for row in page.items], page.next_page_token)

    def items(
        self, parent: str, candidate: str, page_size: int, page_token: str
    ) -> Page[evaluation_pb2.EvaluationItemResult]:
        with self.db.read() as session:
            page = store.items_page(
                session, store.job_id(parent, "parent"), candidate, page_size, page_token
            )
            return Page([row.message() for row in page.items], page.next_page_token)

    async def watch(self, name: str) -> AsyncIterator[evaluation_pb2.EvaluationJob]:
        """The job now, then again each time it changes, until it has ended."""
        last = None
        while True:
            change = self._change  # taken before reading: a change after the read wakes us
            job = await asyncio.to_thread(self.get, name)
            if job != last:
                yield job
                last = job
            if job.state in store.TERMINAL:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(change.wait(), WATCH_SECONDS)

    async def _write(self, function: Callable[..., T], *args: Any) -> T:
        """Run a change of the stored job off the event loop, then wake its watchers."""
        result = await asyncio.to_thread(function, *args)
        self._change.set()
        self._change = asyncio.Event()
        return result

    async def cancel(self, name: str) -> evaluation_pb2.EvaluationJob:
        identifier = store.job_id(name)
        job = await self._write(self._end, identifier, State.STATE_CANCELLED, "", "")
        task = self._tasks.get(identifier)
        if task is not None:
            task.cancel()
        return job

    # --- human A/B ---------------------------------------------------------------------------

    async def annotation_task(
        self, parent: str, candidate: str, baseline: str, annotator: str
    ) -> evaluation_pb2.AnnotationTask:
        """A blind pair of answers, in random order, to an item this annotator has not judged."""
        if not 1 <= len(annotator) <= 128 or not annotator.isprintable():
            raise InvalidArgument("annotator", "must be 1 to 128 printable characters")
        task, job, index = await asyncio.to_thread(
            self._annotation_task, parent, candidate, baseline, annotator
        )
        if not task.name:
            return task
        try:
            item = await self.datasets.item(job.dataset, job.split, index)
        except EvaluationFailed as error:
            raise FailedPrecondition(str(error), reason="DATASET_CHANGED") from None
        task.input.extend(item.messages)
        return await asyncio.to_thread(self._fill_task, task)

    def _pair(
        self, session: Session, parent: str, candidate: str, baseline: str
    ) -> tuple[store.JobRow, evaluation_pb2.EvaluationJob, str]:
        row = store.get(session, store.job_id(parent, "parent"))
        job = row.job()
        baseline = baseline or job.baseline
        names = {c.name for c in job.candidates}
        if candidate not in names:
            raise InvalidArgument("candidate", f"{candidate!r} is not a candidate of {job.name}")
        if baseline not in names:
            raise InvalidArgument("baseline", f"{baseline!r} is not a candidate of {job.name}")
        if candidate == baseline:
            raise InvalidArgument("candidate", "is the baseline: compare two candidates")
        return row, job, baseline

    def _annotation_task(
        self, parent: str, candidate: str, baseline: str, annotator: str
    ) -> tuple[evaluation_pb2.AnnotationTask, evaluation_pb2.EvaluationJob, int]:
        """The task stored (its name only), its job, and the item's index to fetch."""
        with self.db.session() as session:
            row, job, baseline = self._pair(session, parent, candidate, baseline)
            if job.state != State.STATE_SUCCEEDED:
                raise FailedPrecondition(
                    f"{job.name} has not succeeded: there are no answers to compare",
                    reason="JOB_NOT_SUCCEEDED",
                )
            both = store.both_answered(session, row.id, candidate, baseline)
            judged = store.judged(session, row.id, candidate, baseline, annotator)
            left = sorted(set(both) - judged)
            if not left:
                return evaluation_pb2.AnnotationTask(remaining=0), job, -1
            index = random.choice(left)  # noqa: S311 - an order, not a secret
            task = store.AnnotationRow(
                id=uuid.uuid4().hex,
                job_id=row.id,
                item_index=index,
                candidate=candidate,
                baseline=baseline,
                candidate_first=random.random() < 0.5,  # noqa: S311
                annotator=annotator,
                create_time=utcnow(),
            )
            session.add(task)
            name = f"{job.name}/annotationTasks/{task.id}"
            return evaluation_pb2.AnnotationTask(name=name), job, index

    def _fill_task(self, task: evaluation_pb2.AnnotationTask) -> evaluation_pb2.AnnotationTask:
        with self.db.read() as session:
            row = store.annotation(session, task.name, "name")
            both = store.both_answered(session, row.job_id, row.candidate, row.baseline)
            judged = store.judged(session, row.job_id, row.candidate, row.baseline, row.annotator)
        ours, theirs = both[row.item_index]
        left = len(set(both) - judged)
        task.first, task.second = (ours, theirs) if row.candidate_first else (theirs, ours)
        task.remaining = left
        return task

    def annotate(self, annotation: evaluation_pb2.Annotation) -> evaluation_pb2.Annotation:
        """Record a task's answer; the same answer again is a retry and returns the first."""
        choices = {
            evaluation_pb2.ANNOTATION_CHOICE_FIRST: "first",
            evaluation_pb2.ANNOTATION_CHOICE_SECOND: "second",
            evaluation_pb2.ANNOTATION_CHOICE_TIE: "tie",
        }
        if annotation.choice not in choices:
            raise InvalidArgument("annotation.choice", "must be FIRST, SECOND or TIE")
        choice = choices[annotation.choice]
        with self.db.session() as session:
            row = store.annotation(session, annotation.task, "annotation.task")
            if row.choice is not None and row.choice != choice:
                raise FailedPrecondition(
                    f"{annotation.task} was answered {row.choice}", reason="TASK_ANSWERED"
                )
            if row.choice is None:
                if row.item_index in store.judged(
                    session, row.job_id, row.candidate, row.baseline, row.annotator
                ):
                    raise FailedPrecondition(
                        f"{row.annotator} has already judged item {row.item_index} of this pair",
                        reason="ITEM_JUDGED",
                    )
                row.choice, row.answer_time = choice, utcnow()
            assert row.answer_time is not None
            return evaluation_pb2.Annotation(
                task=annotation.task,
                choice=annotation.choice,
                annotator=row.annotator,
                create_time=timestamp(row.answer_time),
            )

    def annotation_summary(
        self, parent: str, candidate: str, baseline: str
    ) -> evaluation_pb2.AnnotationSummary:
        with self.db.read() as session:
            row, _, baseline = self._pair(session, parent, candidate, baseline)
            rows = store.answered_tasks(session, row.id, candidate, baseline)
        wins = losses = ties = 0
        for answer in rows:
            if answer.choice == "tie":
                ties += 1
            elif (answer.choice == "first") == answer.candidate_first:
                wins += 1
            else:
                losses += 1
        rate = wilson(wins, wins + losses + ties)
        return evaluation_pb2.AnnotationSummary(
            candidate=candidate,
            baseline=baseline,
            wins=wins,
            losses=losses,
            ties=ties,
            win_rate=_finite(rate.mean),
            win_rate_ci_low=_finite(rate.low),
            win_rate_ci_high=_finite(rate.high),
            annotators=len({answer.annotator for answer in rows}),
        )

    # --- running -------------------------------------------------------------------------------

    def _spawn(self, job: str) -> None:
        task = asyncio.get_running_loop().create_task(self._run(job), name=f"evaluation {job}")
        self._tasks[job] = task
        task.add_done_callback(lambda _: self._tasks.pop(job, None))

    async def _run(self, identifier: str) -> None:
        async with self._slots:
            job = await asyncio.to_thread(self.get, f"evaluationJobs/{identifier}")
            if job.state in store.TERMINAL:
                return
            self.metrics.running.inc()
            try:
                await self._evaluate(identifier, job)
            except asyncio.CancelledError:
                raise
            except EvaluationFailed as error:
                await self._write(
                    self._end, identifier, State.STATE_FAILED, "TOO_MANY_FAULTS", str(error)
                )
            except TunefleetError as error:
                # The dataset is gone or unusable; or a service it needs did not answer.
                unusable = error.code in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.NOT_FOUND,
                    grpc.StatusCode.FAILED_PRECONDITION,
                )
                reason = "DATASET_UNUSABLE" if unusable else "DEPENDENCY_FAILED"
                await self._write(self._end, identifier, State.STATE_FAILED, reason, str(error))
            except Exception as error:
                log.exception("evaluation %s failed", identifier)
                await self._write(
                    self._end, identifier, State.STATE_FAILED, "INTERNAL", repr(error)
                )
            finally:
                self.metrics.running.dec()

    async def _evaluate(self, identifier: str, job: evaluation_pb2.EvaluationJob) -> None:
        try:
            items = await self.datasets.items(job.dataset, job.split, job.max_items or MAX_ITEMS)
        except EvaluationFailed as error:  # a record without a reference answer
            raise InvalidArgument(f"{FIELD}.dataset", str(error)) from None
        if not items:
            raise InvalidArgument(f"{FIELD}.dataset", f"{job.dataset} has no items in that split")
        secrets = self.settings.secrets_dir
        candidates = [
            model(c, f"{FIELD}.candidates[{i}]", secrets) for i, c in enumerate(job.candidates)
        ]
        graders = build_graders(job, secrets)
        with self.db.read() as session:
            known = {
                (row.candidate, row.item_index): row.output
                for row in store.answered(session, identifier)
                if row.output is not None
            }
        total = len(items) * len(candidates)
        await self._write(self._started, identifier, total, len(known))
        done = 0

        async def record(result: ItemResult) -> None:
            nonlocal done
            done += 1
            await asyncio.to_thread(self._record, identifier, result, items[result.index].reference)
            if done % 20 == 0:
                await self._write(self._progress, identifier, done)

        gate = None
        if job.HasField("gate"):
            gate = Gate(
                job.gate.metric,
                job.gate.min_improvement,
                tuple(job.gate.regression_graders),
                job.gate.max_regressions,
            )

        async def pinned(candidate: str, version: str) -> None:
            def change(job: evaluation_pb2.EvaluationJob) -> None:
                for stored in job.candidates:
                    if stored.name == candidate:
                        stored.adapter_version = version

            await self._write(self._update, identifier, change)

        outcome = await run(
            items,
            candidates,
            graders,
            self.generator,
            job.sampling,
            job.baseline,
            gate,
            self.settings.concurrency,
            job.max_error_rate,
            known,
            record,
            pinned,
        )
        results = []
        for candidate in candidates:
            result = evaluation_pb2.EvaluationCandidateResult(candidate=candidate.name)
            summary = outcome.summary[candidate.name]
            verdict = outcome.gates.get(candidate.name)
            for grader in graders:
                if grader.name in summary:  # not the baseline's under a pairwise judge
                    result.scores.append(_score(grader.name, summary[grader.name]))
                    if verdict is not None and grader.name == job.gate.metric:
                        result.scores[-1].comparison.items_needed = verdict.items_needed
            if verdict is not None:
                result.gate_passed = verdict.passed
                result.gate_reasons.extend(verdict.reasons)
            results.append(result)
        await self._write(self._finish, identifier, results)

    def _update(self, identifier: str, change: Any) -> evaluation_pb2.EvaluationJob:
        with self.db.session() as session:
            row = store.get(session, identifier)
            job = row.job()
            change(job)
            row.store(job)
            return job

    def _started(self, identifier: str, total: int, done: int) -> None:
        def change(job: evaluation_pb2.EvaluationJob) -> None:
            if job.state not in store.TERMINAL:
                job.state = State.STATE_RUNNING
            job.answers_total, job.answers_done = total, done

        self._update(identifier, change)

    def _progress(self, identifier: str, done: int) -> None:
        def change(job: evaluation_pb2.EvaluationJob) -> None:
            job.answers_done = max(job.answers_done, done)

        self._update(identifier, change)

    def _record(self, identifier: str, result: ItemResult, reference: str) -> None:
        scores = {k: v for k, v in result.scores.items() if v is not None}
        with self.db.session() as session:
            row = session.get(store.ItemRow, (identifier, result.index, result.candidate))
            if row is None:
                row = store.ItemRow(
                    job_id=identifier, item_index=result.index, candidate=result.candidate
                )
                session.add(row)
            row.output, row.reference = result.output, reference
            row.scores, row.errors = scores, dict(result.errors)
            row.judgements = dict(result.judgements)
        self.metrics.graded(sum(1 for v in result.scores.values() if v is None))

    def _finish(
        self, identifier: str, results: list[evaluation_pb2.EvaluationCandidateResult]
    ) -> None:
        ended = False

        def change(job: evaluation_pb2.EvaluationJob) -> None:
            nonlocal ended
            if job.state in store.TERMINAL:
                return
            job.state = State.STATE_SUCCEEDED
            job.answers_done = job.answers_total
            job.results.extend(results)
            job.end_time.CopyFrom(timestamp(utcnow()))
            ended = True

        job = self._update(identifier, change)
        if ended:
            self._ended(job)

    def _ended(self, job: evaluation_pb2.EvaluationJob) -> None:
        """Metrics and the MLflow record of a job that has just ended."""
        self.metrics.ended(job)
        if not self.mirror.enabled:
            return
        state = State.Name(job.state).removeprefix("STATE_").lower()
        setup = EvaluationJob(**{f: getattr(job, f) for f in MIRRORED})
        tags = {"tunefleet.kind": "evaluation", "tunefleet.dataset": job.dataset}
        versions = {c.name: c.adapter_version for c in job.candidates if c.adapter_version}
        tags.update({f"tunefleet.adapter_version.{n}": v for n, v in versions.items()})
        self.mirror.run(job.name, flatten(setup), tags)
        values = {}
        for result in job.results:
            for score in result.scores:
                key = f"{result.candidate}.{score.grader}"
                values.update({f"{key}.mean": score.mean, f"{key}.ci_low": score.ci_low})
                values[f"{key}.ci_high"] = score.ci_high
                if score.HasField("comparison"):
                    values[f"{key}.difference"] = score.comparison.difference
                    values[f"{key}.p_value"] = score.comparison.p_value
        gates = {
            f"tunefleet.gate.{r.candidate}": "passed" if r.gate_passed else "failed"
            for r in job.results
            if r.HasField("gate_passed")
        }
        if values:
            self.mirror.metrics(job.name, values)
        if job.error_reason:
            gates["tunefleet.error"] = f"{job.error_reason}: {job.error_message}"[:5000]
        self.mirror.end(job.name, state, gates)

    def _end(
        self, identifier: str, state: int, reason: str, message: str
    ) -> evaluation_pb2.EvaluationJob:
        with self.db.session() as session:
            row = store.get(session, identifier)
            job = row.job()
            if job.state in store.TERMINAL:
                if state == State.STATE_CANCELLED:
                    raise FailedPrecondition(
                        f"{job.name} already ended ({State.Name(job.state)})", reason="JOB_ENDED"
                    )
                return job
            job.state = state  # type: ignore[assignment]
            job.error_reason, job.error_message = reason, message
            job.end_time.CopyFrom(timestamp(utcnow()))
            row.store(job)
        self._ended(job)
        return job


def _score(name: str, summary: GraderSummary) -> evaluation_pb2.EvaluationScore:
    estimate = summary.estimate
    score = evaluation_pb2.EvaluationScore(
        grader=name,
        count=estimate.n,
        mean=_finite(estimate.mean),
        ci_low=_finite(estimate.low),
        ci_high=_finite(estimate.high),
        errors=summary.errors,
        lower_is_better=summary.lower_is_better,
    )
    if summary.comparison is not None:
        score.comparison.CopyFrom(_comparison(summary.comparison))
    tally = summary.tally
    if tally is not None:
        score.pairwise.CopyFrom(
            evaluation_pb2.EvaluationPairwiseTally(
                wins=tally.wins,
                losses=tally.losses,
                ties=tally.ties,
                inconsistent=tally.inconsistent,
                inconsistency_rate=tally.inconsistency_rate,
                win_rate=_finite(tally.win_rate.mean),
                win_rate_ci_low=_finite(tally.win_rate.low),
                win_rate_ci_high=_finite(tally.win_rate.high),
            )
        )
    return score


def _comparison(found: Comparison) -> evaluation_pb2.EvaluationComparison:
    return evaluation_pb2.EvaluationComparison(
        difference=_finite(found.difference),
        ci_low=_finite(found.low),
        ci_high=_finite(found.high),
        p_value=found.p_value,
        test=found.test,
        verdict=VERDICTS[found.verdict],
        wins=found.wins,
        losses=found.losses,
    )


def _finite(value: float) -> float:
    """NaN (no item graded) is stored as 0: JSON has no NaN; `count` 0 says it was not measured."""
    return 0.0 if value != value else value
