"""RetrainingService's requests: policies are checked and stored; runs are stored and driven in
the background, one step after another, through the other services' public APIs (the SDK's
AsyncClient, on the gateway in a cluster or this server's own address embedded).

A run's steps record what they made (dataset, training job, evaluations) before the next step,
and each call that creates something carries a request id derived from the run, so a restarted
service resumes a run where it was without making anything twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tunefleet.client import AsyncClient, Options
from tunefleet.client import TunefleetError as ClientError
from tunefleet.client.feedback import Examples, training_examples
from tunefleet.client.inference import openai_message, openai_tool
from tunefleet.core import names
from tunefleet.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
)
from tunefleet.core.protos import timestamp
from tunefleet.retraining import store
from tunefleet.retraining.metrics import RetrainingMetrics
from tunefleet.retraining.policies import (
    RECIPE_FIELDS,
    check_policy,
    comparison,
    copy_field,
    override,
)
from tunefleet.runtime.auth import current_principal
from tunefleet.runtime.settings import RetrainingSettings
from tunefleet.storage import idempotency
from tunefleet.storage.database import Database, utcnow
from tunefleet.storage.pagination import Page
from tunefleet.v1 import (
    dataset_pb2,
    evaluation_pb2,
    retraining_pb2,
    training_job_pb2,
)

Policy = retraining_pb2.RetrainingPolicy
Run = retraining_pb2.RetrainingRun
State = Run.State
log = logging.getLogger(__name__)
WATCH_SECONDS = 5.0
ENDED_JOBS = {
    training_job_pb2.TrainingJob.STATE_SUCCEEDED,
    training_job_pb2.TrainingJob.STATE_FAILED,
    training_job_pb2.TrainingJob.STATE_CANCELLED,
}
ENDED_EVALUATIONS = {
    evaluation_pb2.EvaluationJob.STATE_SUCCEEDED,
    evaluation_pb2.EvaluationJob.STATE_FAILED,
    evaluation_pb2.EvaluationJob.STATE_CANCELLED,
}
PREVIEW_PAGE = 1000


class RunFailed(Exception):
    """A run cannot go on: it ends FAILED with `reason`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


class RunEnded(Exception):
    """The run ended (cancelled) while a step was under way: the step's result is dropped."""


def _key(run: str, step: str) -> str:
    """The request id of a run's step: the same on every attempt."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"tunefleet:retraining:{run}:{step}"))


def _outcome(run: Run) -> str:
    if run.state == State.STATE_SUCCEEDED:
        return Run.Outcome.Name(run.outcome).removeprefix("OUTCOME_").lower()
    return State.Name(run.state).removeprefix("STATE_").lower()


class RetrainingManager:
    def __init__(
        self, db: Database, settings: RetrainingSettings, metrics: RetrainingMetrics
    ) -> None:
        self.db, self.settings, self.metrics = db, settings, metrics
        self.client: AsyncClient | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._triggers: asyncio.Task[None] | None = None
        self._change = asyncio.Event()  # set (and replaced) whenever a run changes

    # --- life ----------------------------------------------------------------------------------

    async def start(self, server_address: str) -> None:
        """Resume the runs a previous process left in progress; check triggers from now on."""
        self.client = AsyncClient(
            self.settings.endpoint or server_address,
            token=self.settings.service_token or None,
            options=Options(timeout=120.0),
        )
        with self.db.read() as session:
            waiting = [(row.policy_id, row.id) for row in store.unfinished(session)]
            known = [row.policy() for row in store.all_policies(session)]
        for known_policy in known:
            self.metrics.policy(known_policy.name.split("/")[-1], known_policy.adapter)
        for policy, run in waiting:
            self.metrics.in_progress.inc()
            self._spawn(f"retrainingPolicies/{policy}/runs/{run}")
        self._triggers = asyncio.create_task(self._check_triggers(), name="retraining triggers")

    async def stop(self) -> None:
        """Runs stop where they are (a restarted service resumes them)."""
        tasks = [*self._tasks.values(), *([self._triggers] if self._triggers else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.client is not None:
            await self.client.close()

    @property
    def api(self) -> AsyncClient:
        assert self.client is not None, "start() first"
        return self.client

    # --- policies ------------------------------------------------------------------------------

    async def create_policy(
        self, requested: Policy, policy_id: str, request_id: str = ""
    ) -> Policy:
        fingerprint = hashlib.sha256(
            requested.SerializeToString(deterministic=True) + policy_id.encode()
        ).hexdigest()
        policy = Policy()
        policy.CopyFrom(requested)
        for output in ("name", "create_time"):
            policy.ClearField(output)
        await check_policy(policy, self.api)
        identifier = policy_id or names.adapter_id(policy.adapter, "retraining_policy.adapter")
        if not store.ID.fullmatch(identifier):
            raise InvalidArgument("retraining_policy_id", "must be 1 to 63 of [a-z0-9-]")
        now = utcnow()
        policy.name = f"retrainingPolicies/{identifier}"
        policy.create_time.CopyFrom(timestamp(now))

        def insert(session: Session) -> str:
            if session.get(store.PolicyRow, identifier) or store.policy_of(session, policy.adapter):
                raise AlreadyExists(
                    f"{policy.name} exists, or another policy retrains {policy.adapter}",
                    metadata={"adapter": policy.adapter},
                )
            row = store.PolicyRow(id=identifier, create_time=now)
            row.store(policy)
            session.add(row)
            return policy.name

        try:
            name, _ = await asyncio.to_thread(
                idempotency.create_once,
                self.db,
                scope="CreateRetrainingPolicy",
                request_id=request_id,
                request_sha256=fingerprint,
                create=insert,
            )
        except IntegrityError:  # the same policy created at the same moment
            raise AlreadyExists(
                f"{policy.name} exists", metadata={"adapter": policy.adapter}
            ) from None
        created = await asyncio.to_thread(self.get_policy, name)
        self.metrics.policy(created.name.split("/")[-1], created.adapter)
        return created

    def get_policy(self, name: str) -> Policy:
        with self.db.read() as session:
            return store.get_policy(session, store.policy_id(name)).policy()

    def list_policies(self, page_size: int, page_token: str) -> Page[Policy]:
        with self.db.read() as session:
            page = store.policies_page(session, page_size, page_token)
            return Page([row.policy() for row in page.items], page.next_page_token)

    def delete_policy(self, name: str) -> None:
        with self.db.session() as session:
            row = store.get_policy(session, store.policy_id(name))
            active = store.active_run(session, row.id)
            if active is not None:
                raise _in_progress(active)
            session.delete(row)

    # --- runs ----------------------------------------------------------------------------------

    async def create_run(self, parent: str, requested: Run, request_id: str) -> Run:
        policy_id = store.policy_id(parent, "parent")
        trigger = requested.trigger or Run.TRIGGER_MANUAL
        if len(requested.trigger_detail) > 500:
            raise InvalidArgument("retraining_run.trigger_detail", "at most 500 characters")
        fingerprint = hashlib.sha256(
            f"{parent}\n{trigger}\n{requested.trigger_detail}".encode()
        ).hexdigest()
        actor = current_principal.get().subject
        policy = await asyncio.to_thread(self.get_policy, parent)
        if request_id:  # one run per request id and policy: a policy made again starts afresh
            idempotency.check_request_id(request_id)
            incarnation = f"{request_id}:{policy.create_time.ToJsonString()}"
            request_id = str(uuid.uuid5(uuid.NAMESPACE_URL, incarnation))

        def insert(session: Session) -> str:
            store.get_policy(session, policy_id, for_update=True)
            active = store.active_run(session, policy_id)
            if active is not None:
                raise _in_progress(active)
            identifier = uuid.uuid4().hex[:20]
            now = utcnow()
            run = Run(
                name=f"{parent}/runs/{identifier}",
                trigger=trigger,
                trigger_detail=requested.trigger_detail,
                state=State.STATE_PREPARING_DATA,
            )
            run.create_time.CopyFrom(timestamp(now))
            detail = f" ({requested.trigger_detail})" if requested.trigger_detail else ""
            trigger_name = Run.Trigger.Name(trigger).removeprefix("TRIGGER_").lower()
            _event(run, f"started: {trigger_name}{detail}", actor)
            row = store.RunRow(id=identifier, policy_id=policy_id, create_time=now)
            row.store(run)
            session.add(row)
            return run.name

        name, created = await asyncio.to_thread(
            idempotency.create_once,
            self.db,
            scope="CreateRetrainingRun",
            request_id=request_id,
            request_sha256=fingerprint,
            create=insert,
        )
        if created:
            self.metrics.in_progress.inc()
            self._spawn(name)
            self._changed()
        return await asyncio.to_thread(self.get_run, name)

    def get_run(self, name: str) -> Run:
        with self.db.read() as session:
            return store.get_run(session, name).run()

    def list_runs(self, parent: str, page_size: int, page_token: str) -> Page[Run]:
        with self.db.read() as session:
            page = store.runs_page(
                session, store.policy_id(parent, "parent"), page_size, page_token
            )
            return Page([row.run() for row in page.items], page.next_page_token)

    async def watch(self, name: str) -> AsyncIterator[Run]:
        """The run now, then again each time it changes, until it has ended."""
        last = None
        while True:
            change = self._change  # taken before reading: a change after the read wakes us
            run = await asyncio.to_thread(self.get_run, name)
            if run != last:
                yield run
                last = run
            if run.state in store.TERMINAL:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(change.wait(), WATCH_SECONDS)

    async def approve(self, name: str, reason: str) -> Run:
        actor = current_principal.get().subject
        run = await asyncio.to_thread(self._decide, name, actor, f"approved: {reason or '-'}")
        policy = await asyncio.to_thread(self.get_policy, name.rsplit("/runs/", 1)[0])
        with contextlib.suppress(RunEnded):  # a concurrent approval ended it first
            await self._promote(
                policy, run, f"approved by {actor}" + (f": {reason}" if reason else "")
            )
        return await asyncio.to_thread(self.get_run, name)

    async def reject(self, name: str, reason: str) -> Run:
        actor = current_principal.get().subject
        run = await asyncio.to_thread(self._decide, name, actor, f"rejected: {reason or '-'}")
        policy = await asyncio.to_thread(self.get_policy, name.rsplit("/runs/", 1)[0])
        await self._end_canary(policy, run, f"rejected by {actor}")

        def change(run: Run) -> None:
            _end(run, State.STATE_SUCCEEDED, outcome=Run.OUTCOME_REJECTED)

        return await self._update(name, change)

    def _decide(self, name: str, actor: str, message: str) -> Run:
        """Record a person's decision on a run awaiting it (refused in any other state)."""
        with self.db.session() as session:
            row = store.get_run(session, name, for_update=True)
            run = row.run()
            if run.state != State.STATE_AWAITING_APPROVAL:
                raise FailedPrecondition(
                    f"{name} is {State.Name(run.state)}, not awaiting approval",
                    reason="RUN_NOT_AWAITING_APPROVAL",
                    metadata={"state": State.Name(run.state)},
                )
            _event(run, message, actor)
            row.store(run)
            return run

    async def cancel(self, name: str) -> Run:
        actor = current_principal.get().subject

        def change(run: Run) -> None:
            if run.state in store.TERMINAL:
                raise FailedPrecondition(
                    f"{name} already ended ({State.Name(run.state)})", reason="RUN_ENDED"
                )
            _event(run, "cancelled", actor)
            _end(run, State.STATE_CANCELLED)

        run = await self._update(name, change, final=False)
        task = self._tasks.get(name)
        if task is not None:
            task.cancel()
        with contextlib.suppress(ClientError):  # best effort: what it started stops
            if run.training_job:
                await self.api.training_jobs.cancel(run.training_job)
            policy = await asyncio.to_thread(self.get_policy, name.rsplit("/runs/", 1)[0])
            await self._end_canary(policy, run, f"cancelled by {actor}")
        return run

    # --- running -------------------------------------------------------------------------------

    def _spawn(self, name: str) -> None:
        task = asyncio.get_running_loop().create_task(self._drive(name), name=name)
        self._tasks[name] = task
        task.add_done_callback(lambda _: self._tasks.pop(name, None))

    async def _drive(self, name: str) -> None:
        try:
            policy = await asyncio.to_thread(self.get_policy, name.rsplit("/runs/", 1)[0])
            await self._steps(policy, name)
        except (asyncio.CancelledError, RunEnded):
            return
        except RunFailed as failure:
            await self._fail(name, failure.reason, failure.message)
        except ClientError as error:
            await self._fail(name, "DEPENDENCY_FAILED", f"{error.code.name}: {error.message}")
        except Exception as error:
            log.exception("retraining run %s failed", name)
            await self._fail(name, "INTERNAL", repr(error))

    async def _fail(self, name: str, reason: str, message: str) -> None:
        def change(run: Run) -> None:
            run.error_reason, run.error_message = reason, message
            _event(run, f"failed: {reason}: {message}")
            _end(run, State.STATE_FAILED)

        with contextlib.suppress(RunEnded):
            await self._update(name, change)

    async def _steps(self, policy: Policy, name: str) -> None:
        run = await asyncio.to_thread(self.get_run, name)
        if run.state == State.STATE_PREPARING_DATA:
            run = await self._prepare(policy, run)
        if run.state == State.STATE_TRAINING:
            run = await self._train(policy, run)
        if run.state == State.STATE_EVALUATING:
            run = await self._evaluate(policy, run)
        if run.state == State.STATE_CANARY:
            run = await self._watch_canary(policy, run)
        if run.state == State.STATE_AWAITING_APPROVAL and policy.promotion == Policy.PROMOTION_AUTO:
            await self._promote(policy, run, "the gate passed")

    async def _prepare(self, policy: Policy, run: Run) -> Run:
        if not run.champion_version:
            champion = await self._alias(policy.adapter, policy.champion_alias)
            if not champion:
                raise RunFailed(
                    "NO_CHAMPION",
                    f"{policy.adapter} has no alias {policy.champion_alias!r} to retrain from",
                )

            def pinned(current: Run) -> None:
                current.champion_version = champion
                _event(current, f"champion {policy.champion_alias} is {champion}")

            run = await self._update(run.name, pinned)
        new = await self._new_examples(policy, run.name)
        examples, until = await self._examples(policy, run.name, promoted_only=True)
        sft = policy.recipe.objective != training_job_pb2.TRAINING_OBJECTIVE_DPO
        if new < policy.data.min_new_examples:

            def too_few(current: Run) -> None:
                current.sft_examples, current.preference_pairs = (
                    len(examples.sft),
                    len(examples.pairs),
                )
                _event(
                    current,
                    f"{new} new examples, fewer than the {policy.data.min_new_examples} needed",
                )
                _end(current, State.STATE_SUCCEEDED, outcome=Run.OUTCOME_NOT_ENOUGH_DATA)

            return await self._update(run.name, too_few)
        lines = examples.sft if sft else examples.pairs
        if sft and policy.data.include_champion_data:
            lines = [*lines, *await self._champion_data(run.champion_version)]
        held_out = [
            getattr(policy, f).dataset for f in ("evaluation", "regression") if policy.HasField(f)
        ]
        options = dataset_pb2.DatasetOptions(held_out_datasets=held_out)
        if not sft:
            options.kind = dataset_pb2.DATASET_KIND_PREFERENCE
        try:
            dataset = await self.api.datasets.upload(
                b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in lines),
                display_name=f"{policy.name.split('/')[-1]} retraining {run.name.split('/')[-1]}",
                description=f"training data of {run.name}",
                options=options,
                request_id=_key(run.name, "data"),
            )
        except ClientError as error:
            if error.code.name in ("INVALID_ARGUMENT", "FAILED_PRECONDITION"):
                raise RunFailed("DATA_REFUSED", f"DatasetService: {error.message}") from None
            raise
        report = dataset.validation_report
        held = sum(
            c.count for c in report.counts if c.code == dataset_pb2.RECORD_ERROR_CODE_HELD_OUT
        )
        refused = {
            e.line for e in report.errors if e.code == dataset_pb2.RECORD_ERROR_CODE_HELD_OUT
        }
        if len(refused) < held:
            raise RunFailed(
                "DATA_REFUSED",
                f"{dataset.name}: {held} examples are held out, more than the report lists: "
                "which feedback went in cannot be told (the lineage would be wrong)",
            )
        origins = examples.sft_sources if sft else examples.pair_sources
        used = sorted(
            {name for line, names in enumerate(origins, 1) if line not in refused for name in names}
        )

        def prepared(current: Run) -> None:
            current.feedback[:] = used
            current.sft_examples, current.preference_pairs = len(examples.sft), len(examples.pairs)
            current.held_out_examples = held
            current.train_dataset = dataset.name
            if until is not None:
                current.feedback_until.CopyFrom(until)
            current.state = State.STATE_TRAINING
            _event(
                current,
                f"{dataset.name}: {len(examples.sft)} SFT examples and {len(examples.pairs)} "
                f"pairs from {len(examples.sources)} feedback, {held} refused as held out, "
                f"{dataset.record_count} records in all",
            )

        return await self._update(run.name, prepared)

    async def _examples(
        self, policy: Policy, name: str, promoted_only: bool
    ) -> tuple[Examples, Any]:
        """The examples of the feedback on the adapter after the newest feedback of the previous
        runs that read it (`promoted_only`: that promoted their version), and the time of the
        newest feedback read."""
        cutoff = await asyncio.to_thread(self._cutoff, policy, name, promoted_only)
        query = f'adapter_version = "{policy.adapter}/*"'
        if cutoff:
            query += f' AND create_time > "{cutoff}"'
        feedback = [
            f async for f in self.api.inference.list_feedback(query, 1000, include_responses=True)
        ]
        seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
        examples = training_examples(
            feedback, positive_fraction=policy.data.positive_fraction, seed=seed
        )
        newest = max(feedback, key=lambda f: f.create_time.ToDatetime(), default=None)
        return examples, newest.create_time if newest is not None else None

    def _cutoff(self, policy: Policy, name: str, promoted_only: bool) -> str:
        """The newest feedback a previous run read (RFC 3339), or "". A run trains on the
        feedback since the last promotion (what a run whose gate failed read is read again: it
        is not in the champion's data), and needs examples new since any run."""
        with self.db.read() as session:
            for row in store.runs(session, store.policy_id(policy.name)):
                run = row.run()
                if run.name == name or not run.HasField("feedback_until"):
                    continue
                if not promoted_only or run.outcome == Run.OUTCOME_PROMOTED:
                    return str(run.feedback_until.ToJsonString())
        return ""

    async def _new_examples(self, policy: Policy, name: str) -> int:
        """Examples from feedback newer than what any previous run read."""
        examples, _ = await self._examples(policy, name, promoted_only=False)
        sft = policy.recipe.objective != training_job_pb2.TRAINING_OBJECTIVE_DPO
        return len(examples.sft) if sft else len(examples.pairs)

    async def _champion_data(self, champion: str) -> list[dict[str, Any]]:
        """The train split of the datasets the champion was trained on, as chat records."""
        version = await self.api.adapters.get_version(champion)
        records: list[dict[str, Any]] = []
        for dataset in version.lineage.datasets:
            offset = 0
            while True:
                page = [
                    r
                    async for r in self.api.datasets.preview(
                        dataset,
                        split=dataset_pb2.DATASET_SPLIT_TRAIN,
                        offset=offset,
                        limit=PREVIEW_PAGE,
                    )
                ]
                for record in page:
                    if record.chosen or record.rejected:
                        break  # preference data: not SFT records
                    entry: dict[str, Any] = {
                        "messages": [openai_message(m) for m in record.messages]
                    }
                    if record.tools:
                        entry["tools"] = [openai_tool(t) for t in record.tools]
                    records.append(entry)
                if len(page) < PREVIEW_PAGE:
                    break
                offset += PREVIEW_PAGE
        return records

    async def _train(self, policy: Policy, run: Run) -> Run:
        if not run.training_job:
            job = await self._job(policy, run)
            try:
                created = await self.api.training_jobs.create(
                    job, request_id=_key(run.name, "train")
                )
            except ClientError as error:
                if error.code.name in ("INVALID_ARGUMENT", "FAILED_PRECONDITION"):
                    raise RunFailed(
                        "TRAINING_FAILED", f"TrainingService: {error.message}"
                    ) from None
                raise

            def started(current: Run) -> None:
                current.training_job = created.name
                _event(current, f"{created.name} queued")

            run = await self._update(run.name, started)
        while True:
            job = await self.api.training_jobs.get(run.training_job)
            if job.state in ENDED_JOBS:
                break
            await asyncio.sleep(self.settings.poll_seconds)
        if job.state != training_job_pb2.TrainingJob.STATE_SUCCEEDED:
            state = training_job_pb2.TrainingJob.State.Name(job.state)
            raise RunFailed(
                "TRAINING_FAILED", f"{job.name} ended {state}: {job.error.message}".strip(": ")
            )

        def trained(current: Run) -> None:
            current.challenger_version = job.output_adapter_version
            current.state = State.STATE_EVALUATING
            _event(current, f"{job.name} registered {job.output_adapter_version}")

        return await self._update(run.name, trained)

    async def _job(self, policy: Policy, run: Run) -> training_job_pb2.TrainingJob:
        """The champion's recipe with the policy's overrides, on the run's data."""
        champion = await self.api.adapters.get_version(run.champion_version)
        job = training_job_pb2.TrainingJob()
        if champion.lineage.training_job:
            base = await self.api.training_jobs.get(champion.lineage.training_job)
            for field in RECIPE_FIELDS:
                copy_field(base, job, field)
        elif not policy.recipe.method:
            raise RunFailed(
                "NO_RECIPE",
                f"{run.champion_version} was not trained by tunefleet: the policy's recipe must "
                "name the method and hyperparameters",
            )
        override(policy.recipe, job)
        adapter = await self.api.adapters.get(policy.adapter)
        job.base_model = champion.lineage.base_model or adapter.base_model
        job.adapter = policy.adapter
        job.train_dataset = run.train_dataset
        job.feedback[:] = run.feedback
        job.display_name = f"retraining {run.name}"[:200]
        job.labels["retraining-policy"] = policy.name.split("/")[-1]
        return job

    async def _evaluate(self, policy: Policy, run: Run) -> Run:
        if not run.evaluation_jobs:
            created = []
            for field in ("evaluation", "regression"):
                if not policy.HasField(field):
                    continue
                template = getattr(policy, field)
                wanted = comparison(
                    template, run.champion_version, run.challenger_version, field == "evaluation"
                )
                wanted.display_name = f"{run.name}: {field}"[:200]
                try:
                    job = await self.api.evaluations.create(
                        wanted, request_id=_key(run.name, field)
                    )
                except ClientError as error:
                    if error.code.name in ("INVALID_ARGUMENT", "FAILED_PRECONDITION"):
                        raise RunFailed(
                            "EVALUATION_FAILED", f"EvaluationService: {error.message}"
                        ) from None
                    raise
                created.append(job.name)

            def started(current: Run) -> None:
                current.evaluation_jobs[:] = created
                _event(current, f"evaluating: {', '.join(created)}")

            run = await self._update(run.name, started)
        jobs = []
        for name in run.evaluation_jobs:
            while True:
                job = await self.api.evaluations.get(name)
                if job.state in ENDED_EVALUATIONS:
                    break
                await asyncio.sleep(self.settings.poll_seconds)
            if job.state != evaluation_pb2.EvaluationJob.STATE_SUCCEEDED:
                state = evaluation_pb2.EvaluationJob.State.Name(job.state)
                raise RunFailed(
                    "EVALUATION_FAILED", f"{name} ended {state}: {job.error_message}".strip(": ")
                )
            jobs.append(job)
        passed, reasons = _verdict(policy, jobs)
        percent = policy.canary.percent
        if passed:
            await self.api.adapters.set_alias(
                policy.adapter,
                policy.challenger_alias,
                run.challenger_version,
                reason=f"{run.name}: the gate passed",
            )
            if percent:
                await self.api.adapters.set_canary(
                    policy.adapter,
                    policy.champion_alias,
                    policy.challenger_alias,
                    percent,
                    reason=f"{run.name}: canary of the challenger",
                )

        def judged(current: Run) -> None:
            current.gate_passed = passed
            current.gate_reasons[:] = reasons
            if not passed:
                _event(current, f"the gate did not pass: {'; '.join(reasons)}")
                _end(current, State.STATE_SUCCEEDED, outcome=Run.OUTCOME_GATE_FAILED)
                return
            said = f"the gate passed; {policy.challenger_alias} is {current.challenger_version}"
            if percent:
                current.state = State.STATE_CANARY
                current.canary.start_time.CopyFrom(timestamp(datetime.now(UTC)))
                said += f", answering {percent}% of {policy.champion_alias}'s requests"
            else:
                current.state = State.STATE_AWAITING_APPROVAL
            _event(current, said)

        return await self._update(run.name, judged)

    async def _watch_canary(self, policy: Policy, run: Run) -> Run:
        """Compare the ratings of the challenger's answers with the champion's since the canary
        started, until there are enough: worse by more than the policy's margin, the canary is
        removed and the run ROLLED_BACK; else it goes on to promotion (or approval)."""
        rule = policy.canary
        while True:
            measured = await self._canary_ratings(run)
            champion = measured.champion_negative / max(1, measured.champion_ratings)
            challenger = measured.challenger_negative / max(1, measured.challenger_ratings)
            counts = (
                f"challenger {measured.challenger_negative}/{measured.challenger_ratings} "
                f"negative ({challenger:.0%}), champion {measured.champion_negative}/"
                f"{measured.champion_ratings} ({champion:.0%})"
            )
            if measured.challenger_ratings >= rule.min_ratings:
                break

            run = await self._update(run.name, _measured(measured))
            await asyncio.sleep(self.settings.canary_seconds)
        worse = challenger > champion + rule.max_negative_increase
        if worse:
            await self._end_canary(policy, run, f"rolled back: {counts}")

        def judged(current: Run) -> None:
            current.canary.CopyFrom(measured)
            if worse:
                self.metrics.rollbacks.labels(policy.adapter).inc()
                _event(
                    current,
                    f"rolled back: {counts}, more than {rule.max_negative_increase:.0%} above; "
                    f"{policy.champion_alias} answers every request again",
                )
                _end(current, State.STATE_SUCCEEDED, outcome=Run.OUTCOME_ROLLED_BACK)
                return
            current.state = State.STATE_AWAITING_APPROVAL
            _event(current, f"the canary held: {counts}")

        return await self._update(run.name, judged)

    async def _canary_ratings(self, run: Run) -> retraining_pb2.CanaryResult:
        measured = retraining_pb2.CanaryResult()
        measured.CopyFrom(run.canary)
        since = run.canary.start_time.ToJsonString()
        for side, version in (
            ("champion", run.champion_version),
            ("challenger", run.challenger_version),
        ):
            query = f'adapter_version = "{version}" AND create_time > "{since}"'
            ratings = [f.rating async for f in self.api.inference.list_feedback(query, 1000)]
            setattr(measured, f"{side}_ratings", len(ratings))
            setattr(measured, f"{side}_negative", sum(1 for r in ratings if r < 0))
        return measured

    async def _end_canary(self, policy: Policy, run: Run, why: str) -> None:
        """Send every request of the champion alias to its own version again."""
        if policy.canary.percent and run.HasField("canary"):
            await self.api.adapters.set_canary(
                policy.adapter,
                policy.champion_alias,
                policy.challenger_alias,
                0,
                reason=f"{run.name}: {why}"[:1000],
            )

    async def _promote(self, policy: Policy, run: Run, why: str) -> None:
        """Move the champion alias to the challenger, by compare-and-set against the champion
        the run started from: a move made meanwhile (by a person) wins. A canary ends either
        way."""
        try:
            await self.api.adapters.set_alias(
                policy.adapter,
                policy.champion_alias,
                run.challenger_version,
                reason=f"{run.name}: {why}"[:1000],
                expected_version=run.champion_version,
            )
        except ClientError as error:
            if error.code.name != "ABORTED":
                raise
            now = error.metadata.get("current_version", "another version")

            def lost(current: Run) -> None:
                _event(
                    current,
                    f"not promoted: {policy.champion_alias} moved to {now} since the run started "
                    f"from {current.champion_version} (compare-and-set lost)",
                )
                _end(current, State.STATE_SUCCEEDED, outcome=Run.OUTCOME_CHAMPION_MOVED)

            await self._end_canary(policy, run, "not promoted")
            await self._update(run.name, lost)
            return
        await self._end_canary(policy, run, "promoted")
        self.metrics.promotions.labels(policy.adapter).inc()

        def promoted(current: Run) -> None:
            _event(current, f"promoted: {policy.champion_alias} is {current.challenger_version}")
            _end(current, State.STATE_SUCCEEDED, outcome=Run.OUTCOME_PROMOTED)

        await self._update(run.name, promoted)

    async def _alias(self, adapter: str, alias: str) -> str:
        """The version `alias` of `adapter` points at, or ""."""
        async for found in self.api.adapters.aliases(adapter):
            if found.name.endswith(f"/aliases/{alias}"):
                return str(found.version)
        return ""

    # --- storage -------------------------------------------------------------------------------

    async def _update(self, name: str, change: Callable[[Run], None], final: bool = True) -> Run:
        """Apply `change` to the stored run (refused, RunEnded, once the run has ended, unless
        `final` is False), then wake its watchers."""

        def write() -> tuple[Run, bool]:
            with self.db.session() as session:
                row = store.get_run(session, name, for_update=True)
                run = row.run()
                if final and run.state in store.TERMINAL:
                    raise RunEnded(name)
                was_active = run.state not in store.TERMINAL
                change(run)
                row.store(run)
                return run, was_active and run.state in store.TERMINAL

        run, ended = await asyncio.to_thread(write)
        if ended:
            self.metrics.in_progress.dec()
            policy = name.split("/")[1]
            adapter = await asyncio.to_thread(self.get_policy, f"retrainingPolicies/{policy}")
            self.metrics.runs.labels(policy, adapter.adapter, _outcome(run)).inc()
        self._changed()
        return run

    def _changed(self) -> None:
        self._change.set()
        self._change = asyncio.Event()

    # --- triggers ------------------------------------------------------------------------------

    async def _check_triggers(self) -> None:
        while True:
            await asyncio.sleep(self.settings.trigger_seconds)
            try:
                await self.check_triggers()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("checking retraining triggers failed")

    async def check_triggers(self) -> list[Run]:
        """Start the runs that policies' schedules and thresholds call for; the runs started."""
        started = []
        with self.db.read() as session:
            policies = [
                (
                    row.policy(),
                    store.active_run(session, row.id) is not None,
                    store.runs(session, row.id),
                )
                for row in store.all_policies(session)
            ]
        for policy, busy, runs in policies:
            labels = (policy.name.split("/")[-1], policy.adapter)
            self.metrics.policy(*labels)  # one another replica created, or updated
            self.metrics.min_examples.labels(*labels).set(policy.data.min_new_examples)
            try:
                pending = await self._new_examples(policy, f"{policy.name}/pending")
            except ClientError as error:
                log.warning("cannot read the feedback of %s: %s", policy.adapter, error)
                continue
            self.metrics.pending.labels(*labels).set(pending)
            if busy:
                continue
            trigger, detail = Run.TRIGGER_UNSPECIFIED, ""
            every = policy.triggers.schedule_seconds
            last = runs[0].create_time if runs else None
            if every and (last is None or (utcnow() - last).total_seconds() >= every):
                trigger, detail = Run.TRIGGER_SCHEDULE, f"every {every} s"
            elif policy.triggers.on_new_examples and pending >= policy.data.min_new_examples:
                trigger, detail = Run.TRIGGER_NEW_EXAMPLES, f"{pending} new examples"
            if trigger:
                with contextlib.suppress(FailedPrecondition):
                    started.append(
                        await self.create_run(
                            policy.name, Run(trigger=trigger, trigger_detail=detail), ""
                        )
                    )
        return started


def _verdict(policy: Policy, jobs: list[evaluation_pb2.EvaluationJob]) -> tuple[bool, list[str]]:
    """Whether the challenger passes: the comparison's gate, and on the regression suite no more
    graders significantly worse than its `gate.max_regressions`."""
    reasons: list[str] = []
    judged = next(r for r in jobs[0].results if r.candidate == "challenger")
    if not judged.gate_passed:
        reasons += [f"{jobs[0].name}: {why}" for why in judged.gate_reasons] or [
            f"{jobs[0].name}: the gate did not pass"
        ]
    if len(jobs) > 1:
        suite = next(r for r in jobs[1].results if r.candidate == "challenger")
        worse = [
            s.grader
            for s in suite.scores
            if s.comparison.verdict == evaluation_pb2.EVALUATION_VERDICT_WORSE
        ]
        if len(worse) > policy.regression.gate.max_regressions:
            reasons.append(
                f"{jobs[1].name}: significantly worse than the champion on {', '.join(worse)} "
                f"(at most {policy.regression.gate.max_regressions} allowed)"
            )
    return not reasons, reasons


def _measured(measured: retraining_pb2.CanaryResult) -> Callable[[Run], None]:
    def change(run: Run) -> None:
        run.canary.CopyFrom(measured)

    return change


def _event(run: Run, message: str, actor: str = "") -> None:
    event = run.events.add(state=run.state, message=message[:2000], actor=actor)
    event.time.CopyFrom(timestamp(datetime.now(UTC)))


def _end(
    run: Run, state: State.ValueType, outcome: Run.Outcome.ValueType = Run.OUTCOME_UNSPECIFIED
) -> None:
    run.state = state
    run.outcome = outcome
    run.end_time.CopyFrom(timestamp(datetime.now(UTC)))
    if run.events:
        run.events[-1].state = state


def _in_progress(row: store.RunRow) -> FailedPrecondition:
    name = f"retrainingPolicies/{row.policy_id}/runs/{row.id}"
    return FailedPrecondition(
        f"{name} is in progress: one run of a policy at a time",
        reason="RUN_IN_PROGRESS",
        metadata={"run": name},
    )
