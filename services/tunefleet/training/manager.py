"""TrainingService's core: jobs, their queue, their lifecycle and their event feed.

The database is the source of truth. Every state change happens in one transaction that also
appends the job's events (a change feed per job, `trainingJobs/{job}`), so a client following
the feed sees every transition exactly once and can resume after the last event it saw.

One scheduler loop per service process (run `TrainingService` with one replica) launches
queued jobs while the launcher has room (priority first, then creation order), follows launched
runs (state, log lines), fails runs whose worker went silent, and, when the service starts,
reconciles every unfinished job with what the launcher reports: a run that ended while the
service was down gets its final state, one still running is followed again, and a job whose
launch was interrupted is launched with the same request, which launchers treat as idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from tunefleet.core import names
from tunefleet.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TunefleetError,
    Unauthenticated,
)
from tunefleet.core.names import dataset_id
from tunefleet.core.protos import timestamp
from tunefleet.core.tasks import cancel
from tunefleet.runtime.models import ModelCatalogue
from tunefleet.runtime.settings import Settings
from tunefleet.runtime.streams import ChangeSignal
from tunefleet.storage import idempotency
from tunefleet.storage.blobs import BlobStore, uri_sha256
from tunefleet.storage.changes import Change, append_change, read_changes
from tunefleet.storage.database import Database, utcnow
from tunefleet.storage.pagination import Page
from tunefleet.training import jobs, store
from tunefleet.training.datasets import DatasetClient
from tunefleet.training.launcher import JobLauncher, LogLine, Phase, Run, RunRequest, RunStatus
from tunefleet.training.metrics import TrainingMetrics
from tunefleet.training.registry import RegistrationRefused, RegistryClient, RegistryUnavailable
from tunefleet.training.store import TERMINAL, CheckpointRow, JobRow, State
from tunefleet.v1 import training_job_pb2, training_service_pb2

log = logging.getLogger(__name__)

TrainingJob = training_job_pb2.TrainingJob
WorkerState = training_service_pb2.ReportTrainingProgressRequest.WorkerState
USER_FIELDS = [
    "display_name",
    "labels",
    "base_model",
    "method",
    "lora",
    "hyperparameters",
    "train_dataset",
    "validation_dataset",
    "adapter",
    "resources",
    "priority",
]


@dataclass(frozen=True)
class ReportOutcome:
    cancel_requested: bool
    run: Run | None  # the job's run, when the launcher must hear of the report
    checkpoint_uri: str = ""  # a checkpoint to resume retried runs from
    stop_run: bool = False  # the worker failed: stop its run (no retries)
    # Checkpoints no longer kept (their stored copies go) and those kept (which may share files).
    pruned: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()


def topic(job_id: str) -> str:
    return f"trainingJobs/{job_id}"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TrainingManager:
    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        settings: Settings,
        launcher: JobLauncher,
        metrics: TrainingMetrics,
        signal: ChangeSignal | None = None,
    ) -> None:
        self.db, self.blobs, self.settings = db, blobs, settings
        self.models = ModelCatalogue.of(settings)
        self.draining = False
        self.training = settings.training
        self.launcher, self.metrics = launcher, metrics
        self.signal = signal or ChangeSignal()
        self.worker_endpoint = self.training.worker_endpoint
        # DatasetService and AdapterService, called with TrainingService's own token; an empty
        # address is this server's own (set by start()).
        token = self.training.service_token or self.training.worker_registry_token
        self.datasets = DatasetClient(self.training.datasets_endpoint, token)
        self.registry = RegistryClient(self.training.registry_endpoint, token, blobs)
        self._leasing = asyncio.Lock()
        self._settling: dict[str, asyncio.Task[None]] = {}
        self.started_at = utcnow()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    # --- requests ------------------------------------------------------------------------------

    async def create(
        self, requested: TrainingJob, request_id: str = "", validate_only: bool = False
    ) -> TrainingJob:
        """Check a job and what it names (its datasets on DatasetService, its adapter on
        AdapterService, which creates it if need be), store it and lease its datasets."""
        job = TrainingJob()
        for field in USER_FIELDS:
            value = getattr(requested, field)
            if isinstance(value, Message):
                if requested.HasField(field):  # type: ignore[arg-type]
                    getattr(job, field).CopyFrom(value)
            elif field == "labels":
                job.labels.update(requested.labels)
            else:
                setattr(job, field, value)
        checked = jobs.check(job, self.models, self.training)
        job.hyperparameters.CopyFrom(jobs.resolved_hyperparameters(checked))
        job.resource_estimate.CopyFrom(
            training_job_pb2.ResourceEstimate(
                model_parameters=checked.estimate.model_parameters,
                gpu_memory_bytes=checked.estimate.gpu_memory_bytes,
                explanation=checked.estimate.explanation,
            )
        )
        job.launcher = self.launcher.name
        dataset_id(job.train_dataset, "training_job.train_dataset")
        if job.validation_dataset:
            dataset_id(job.validation_dataset, "training_job.validation_dataset")
        names.adapter_id(job.adapter, "training_job.adapter")
        data = await self._data(job)
        if validate_only:
            await self.registry.check_adapter(job.adapter, job.base_model)
            job.state = State.STATE_VALIDATING
            return job
        await self.registry.ensure_adapter(
            job.adapter,
            job.base_model,
            f"created for training by {job.display_name or 'a job'}",
        )
        fingerprint = hashlib.sha256(requested.SerializeToString(deterministic=True)).hexdigest()

        def insert(session: Session) -> str:
            identifier = uuid.uuid4().hex[:20]
            now = utcnow()
            job.name = topic(identifier)
            job.create_time.CopyFrom(timestamp(now))
            row = JobRow(
                id=identifier,
                worker_spec=self._worker_spec(job, checked, data),
                token_sha256="",
                cancel_requested=False,
                launcher_state={},
                lease_state=store.LEASES_WANTED,
                last_report_time=None,
                create_time=now,
            )
            job.state = State.STATE_VALIDATING
            job.state_history.append(
                TrainingJob.StateTransition(state=job.state, time=timestamp(now))
            )
            row.store(job)
            session.add(row)
            session.flush()
            self._event(session, identifier, "state_change", job.state_history[0])
            self._transition(session, row, job, State.STATE_QUEUED)
            return job.name

        name, _ = await asyncio.to_thread(
            idempotency.create_once,
            self.db,
            scope="CreateTrainingJob",
            request_id=request_id,
            request_sha256=fingerprint,
            create=insert,
        )
        # Leased now, so that the dataset cannot go between this answer and the job's launch;
        # should DatasetService not answer, the scheduler leases them before it launches the job.
        await self._lease(store.job_id(name))
        self.signal.notify()
        self.wake()
        return await asyncio.to_thread(self.get, name)

    async def _data(self, job: TrainingJob) -> dict[str, Any]:
        """Check the datasets a job names (on DatasetService); the data part of its trainer
        spec: the URIs of their records in the blob store."""
        datasets = self.datasets
        train = await datasets.dataset(job.train_dataset, "training_job.train_dataset")
        if train.train_record_count == 0:
            raise InvalidArgument(
                "training_job.train_dataset", f"{job.train_dataset} has no train records"
            )
        data: dict[str, Any] = {
            "train_data": {"uri": self.blobs.uri(train.content_sha256), "split": "train"}
        }
        if job.validation_dataset:
            other = await datasets.dataset(
                job.validation_dataset, "training_job.validation_dataset"
            )
            data["validation_data"] = {"uri": self.blobs.uri(other.content_sha256), "split": "all"}
        elif train.validation_record_count:
            data["validation_data"] = {
                "uri": self.blobs.uri(train.content_sha256),
                "split": "validation",
            }
        return data

    # --- dataset leases (DatasetService's) ------------------------------------------------------

    async def _lease(self, job_id: str) -> None:
        """Lease the datasets of a job that wants its leases. A dataset deleted since the job was
        checked fails the job; DatasetService not answering leaves it for the next tick."""
        async with self._leasing:
            row = await asyncio.to_thread(self._row, job_id)
            job = row.job()
            if row.lease_state != store.LEASES_WANTED or job.state in TERMINAL:
                return
            for dataset in _datasets(job):
                try:
                    await self.datasets.lease(dataset, job_id, job.name)
                except NotFound:
                    error = training_job_pb2.JobError(
                        reason="DATASET_DELETED",
                        message=f"{dataset} was deleted before the job could lease it",
                    )
                    await asyncio.to_thread(self._end, job_id, State.STATE_FAILED, error)
                    break
                except TunefleetError as error:
                    log.warning("cannot lease %s for %s yet: %s", dataset, job.name, error)
                    return
            await asyncio.to_thread(self._lease_state, job_id, store.LEASES_HELD)

    async def _release(self, row: JobRow) -> None:
        """Delete the leases of a job that ended; DatasetService not answering leaves them for
        the next tick."""
        async with self._leasing:
            for dataset in _datasets(row.job()):
                try:
                    await self.datasets.release(dataset, row.id)
                except TunefleetError as error:
                    log.warning("cannot release %s for %s yet: %s", dataset, row.name, error)
                    return
            await asyncio.to_thread(self._lease_state, row.id, store.LEASES_RELEASED)

    def _row(self, job_id: str) -> JobRow:
        with self.db.read() as session:
            row = store.get(session, job_id)
            session.expunge(row)
            return row

    def _lease_state(self, job_id: str, state: str) -> None:
        with self.db.session() as session:
            store.get(session, job_id, for_update=True).lease_state = state

    def _ended_holding_leases(self) -> list[JobRow]:
        with self.db.read() as session:
            rows = store.ended_holding_leases(session)
            for row in rows:
                session.expunge(row)
            return rows

    def _worker_spec(
        self, job: TrainingJob, checked: jobs.Checked, data: dict[str, Any]
    ) -> dict[str, Any]:
        """The trainer spec, less what each launch adds (endpoints, token, output directory)."""
        storage = self.settings.storage.model_dump(mode="json")
        storage["database_url"], storage["databases"] = "", {}  # workers never touch a database
        if storage["blob_backend"] == "local":
            storage["blob_dir"] = str(self.settings.blob_dir.resolve())
        return {
            "base_model": job.base_model,
            "models": {name: str(path) for name, path in self.settings.models.items()},
            "method": checked.method,
            "lora": checked.lora.model_dump(mode="json"),
            "hyperparameters": checked.hyperparameters.model_dump(mode="json"),
            **data,
            "storage": storage,
            "job": job.name,
            "datasets": _datasets(job),
            "report": {"job": job.name},
            "registry": {"adapter": job.adapter},
        }

    def get(self, name: str) -> TrainingJob:
        with self.db.read() as session:
            return store.get(session, store.job_id(name)).job()

    def list_jobs(self, filter_text: str, page_size: int, page_token: str) -> Page[TrainingJob]:
        with self.db.read() as session:
            page = store.list_page(session, filter_text, page_size, page_token)
            return Page([row.job() for row in page.items], page.next_page_token)

    def checkpoints(self, parent: str, page_size: int, page_token: str) -> Page[CheckpointRow]:
        with self.db.read() as session:
            page = store.checkpoints_page(
                session, store.job_id(parent, "parent"), page_size, page_token
            )
            for row in page.items:
                session.expunge(row)
            return page

    def events(self, name: str, after: int, limit: int = 500) -> tuple[list[Change], bool]:
        """Events after sequence `after`, and whether the job has ended."""
        if after < 0:
            raise InvalidArgument("after_sequence", "must not be negative")
        job_id = store.job_id(name)
        with self.db.read() as session:
            row = store.get(session, job_id)
            ended = row.job().state in TERMINAL
            return read_changes(session, topic(job_id), after, limit), ended

    async def cancel(self, name: str) -> TrainingJob:
        """Cancel a job: a queued one at once; a launched one is CANCELLING until the scheduler
        has stopped its run."""
        job = await asyncio.to_thread(self._cancel, store.job_id(name))
        self.signal.notify()
        self.wake()
        return job

    def _cancel(self, job_id: str) -> TrainingJob:
        with self.db.session() as session:
            row = store.get(session, job_id, for_update=True)
            job = row.job()
            if job.state in TERMINAL:
                raise FailedPrecondition(
                    f"{job.name} already ended ({State.Name(job.state)})", reason="JOB_ENDED"
                )
            run = _run(row)
            if run is None and not row.launcher_state.get("launching"):
                self._transition(session, row, job, State.STATE_CANCELLED)
            else:
                row.cancel_requested = True
                self._transition(session, row, job, State.STATE_CANCELLING)
            return job

    def report(
        self, request: training_service_pb2.ReportTrainingProgressRequest, token: str
    ) -> ReportOutcome:
        job_id = store.job_id(request.name)
        if not token:
            raise Unauthenticated(
                "a worker report needs its job's token (authorization: Bearer <token>)",
                reason="WORKER_TOKEN_MISSING",
            )
        with self.db.session() as session:
            row = store.get(session, job_id, for_update=True)
            if not row.token_sha256 or not hmac.compare_digest(digest(token), row.token_sha256):
                raise PermissionDenied(
                    f"the token is not the worker token of {request.name}",
                    reason="WORKER_TOKEN_MISMATCH",
                )
            job = row.job()
            if job.state in TERMINAL:
                return ReportOutcome(cancel_requested=True, run=None)
            now = utcnow()
            row.last_report_time = now
            if request.worker_state == WorkerState.WORKER_STATE_RUNNING:
                self._transition(session, row, job, State.STATE_RUNNING)
            if request.HasField("progress"):
                progress = request.progress
                if not progress.HasField("time"):
                    progress.time.CopyFrom(timestamp(now))
                job.latest_progress.CopyFrom(progress)
                self._event(session, job_id, "progress", progress)
                self.metrics.progress(job.name, progress)
            checkpoint_uri = ""
            pruned: list[str] = []
            kept: list[str] = []
            if request.HasField("checkpoint"):
                checkpoint_uri = self._checkpoint(session, job_id, request.checkpoint, now)
                min_delta = job.hyperparameters.early_stopping_min_delta
                pruned, kept = self._prune_checkpoints(session, job_id, min_delta)
            if request.HasField("evaluation"):
                job.evaluation.CopyFrom(request.evaluation)
                self._event(session, job_id, "evaluation", request.evaluation)
            for line in request.log_lines:
                self._event(session, job_id, "log", line)
            stop_run = False
            if request.worker_state == WorkerState.WORKER_STATE_SUCCEEDED:
                job.output_adapter_version = request.output_adapter_version
                self._transition(session, row, job, State.STATE_SUCCEEDED)
            elif request.worker_state == WorkerState.WORKER_STATE_FAILED:
                error = training_job_pb2.JobError(
                    reason=request.error.reason or "TRAINER_FAILED",
                    message=request.error.message or "the trainer failed",
                )
                self._transition(session, row, job, State.STATE_FAILED, error)
                stop_run = True
            row.store(job)
            outcome = ReportOutcome(
                row.cancel_requested,
                _run(row),
                checkpoint_uri,
                stop_run,
                tuple(pruned),
                tuple(kept),
            )
        self.signal.notify()
        return outcome

    def _checkpoint(
        self,
        session: Session,
        job_id: str,
        checkpoint: training_job_pb2.Checkpoint,
        now: datetime,
    ) -> str:
        if not checkpoint.uri or checkpoint.step <= 0:
            raise InvalidArgument("checkpoint", "needs a uri and a positive step")
        if session.get(CheckpointRow, (job_id, checkpoint.step)) is None:
            session.add(
                CheckpointRow(
                    job_id=job_id,
                    step=checkpoint.step,
                    uri=checkpoint.uri,
                    size_bytes=checkpoint.size_bytes,
                    validation_loss=checkpoint.validation_loss
                    if checkpoint.HasField("validation_loss")
                    else None,
                    create_time=now,
                )
            )
            session.flush()
            reported = training_job_pb2.Checkpoint()
            reported.CopyFrom(checkpoint)
            reported.name = f"{topic(job_id)}/checkpoints/{checkpoint.step}"
            reported.create_time.CopyFrom(timestamp(now))
            self._event(session, job_id, "checkpoint", reported)
        return checkpoint.uri

    def _prune_checkpoints(
        self, session: Session, job_id: str, min_delta: float
    ) -> tuple[list[str], list[str]]:
        """Forget all checkpoints of a job but the newest `keep_checkpoints` and the best, as the
        trainer does with its local copies. The best is the trainer's: the first validation loss,
        replaced by each one lower by more than the early stopping `min_delta` (with early
        stopping every such evaluation is checkpointed). Returns the URIs forgotten and kept."""
        rows = list(
            session.scalars(
                select(CheckpointRow)
                .where(CheckpointRow.job_id == job_id)
                .order_by(CheckpointRow.step)
            )
        )
        kept = rows[-self.training.keep_checkpoints :]
        best: CheckpointRow | None = None
        for row in rows:
            loss = row.validation_loss
            if loss is not None and (
                best is None
                or best.validation_loss is None
                or loss < best.validation_loss - min_delta
            ):
                best = row
        if best is not None:
            kept.append(best)
        pruned = [row for row in rows if row not in kept]
        for row in pruned:
            session.delete(row)
        session.flush()
        return [row.uri for row in pruned], [row.uri for row in kept]

    def _delete_checkpoint_blobs(self, pruned: tuple[str, ...], kept: tuple[str, ...]) -> None:
        """Delete the stored copies of checkpoints no longer kept: each one's manifest and the
        files it names, except files a kept checkpoint names too."""
        keep = set().union(*(_checkpoint_blobs(self.blobs, uri) for uri in kept))
        for uri in pruned:
            for sha256 in _checkpoint_blobs(self.blobs, uri) - keep:
                try:
                    self.blobs.delete(sha256)
                except Exception as error:  # a blob already gone, a store hiccup: not fatal
                    log.warning("cannot delete checkpoint blob %s: %s", sha256, error)

    async def after_report(self, outcome: ReportOutcome) -> None:
        """What the launcher must do after a report: keep a checkpoint for retries, or stop the
        run of a worker that failed; and delete the stored checkpoints no longer kept."""
        if outcome.pruned:
            await asyncio.to_thread(self._delete_checkpoint_blobs, outcome.pruned, outcome.kept)
        if outcome.run is None:
            return
        if outcome.checkpoint_uri:
            await self.launcher.checkpoint_saved(outcome.run, outcome.checkpoint_uri)
        if outcome.stop_run:
            self._spawn(self.launcher.cancel(outcome.run))

    # --- state ---------------------------------------------------------------------------------

    def _transition(
        self,
        session: Session,
        row: JobRow,
        job: TrainingJob,
        state: TrainingJob.State.ValueType,
        error: training_job_pb2.JobError | None = None,
        reason: str = "",
        message: str = "",
    ) -> None:
        """Move `job` to `state` (in the caller's transaction) with its events and metrics."""
        if job.state == state or job.state in TERMINAL:
            return
        if state == State.STATE_RUNNING and job.state != State.STATE_QUEUED:
            return  # a late "running" report must not undo CANCELLING
        now = utcnow()
        job.state = state
        transition = TrainingJob.StateTransition(
            state=state, time=timestamp(now), reason=reason, message=message
        )
        job.state_history.append(transition)
        if state == State.STATE_RUNNING and not job.HasField("start_time"):
            job.start_time.CopyFrom(timestamp(now))
            self.metrics.queue_time.observe((now - row.create_time).total_seconds())
        if error is not None:
            job.error.CopyFrom(error)
            self._event(session, row.id, "error", error)
        if state in TERMINAL:
            job.end_time.CopyFrom(timestamp(now))
            started = job.start_time.ToDatetime() if job.HasField("start_time") else None
            seconds = (now.replace(tzinfo=None) - started).total_seconds() if started else None
            self.metrics.ended(job.name, State.Name(state).removeprefix("STATE_").lower(), seconds)
            # Its leases go once this commits (the scheduler deletes them on DatasetService).
            event.listen(session, "after_commit", lambda _: self.wake(), once=True)
            log.info(
                "%s ended: %s%s",
                job.name,
                State.Name(state),
                f" ({error.reason}: {error.message})" if error else "",
            )
        self._event(session, row.id, "state_change", transition)
        row.store(job)

    def _event(self, session: Session, job_id: str, kind: str, message: Message) -> None:
        append_change(
            session,
            topic(job_id),
            kind,
            {"data": json_format.MessageToDict(message, preserving_proto_field_name=True)},
        )

    # --- the scheduler -------------------------------------------------------------------------

    async def start(self, server_address: str) -> None:
        """Reconcile with the launcher, then run the scheduler until `stop()`."""
        if not self.worker_endpoint:
            self.worker_endpoint = server_address
        self.datasets.endpoint = self.datasets.endpoint or server_address
        self.registry.endpoint = self.registry.endpoint or server_address
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.started_at = utcnow()
        await self.launcher.start(self.wake)
        await self.tick()
        self._task = asyncio.create_task(self._run(), name="training-scheduler")

    def drain(self) -> None:
        """Shutdown began: event streams that follow running jobs end (UNAVAILABLE) instead of
        holding the shutdown for its grace; clients resume after their last sequence."""
        self.draining = True
        self.signal.notify()

    async def stop(self) -> None:
        if self._task is not None:
            await cancel(self._task)
            self._task = None
        self._loop = None
        for task in list(self._settling.values()):
            await cancel(task)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.registry.close()
        await self.datasets.close()
        await self.launcher.close()

    def wake(self) -> None:
        """Ask the scheduler to look now (from any thread)."""
        if self._loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the service stopped
                self._loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that arrives as its wait ends, and stop() would wait for this loop forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.training.poll_seconds):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.tick()
            except Exception:
                log.exception("training scheduler tick failed; retrying")

    async def tick(self) -> None:
        """One look at every unfinished job: follow launched runs, fail silent workers, launch
        queued jobs while there is room; lease datasets for new jobs and release those of ended
        ones."""
        for row in await asyncio.to_thread(self._ended_holding_leases):
            await self._release(row)
        for row in await asyncio.to_thread(self._active):
            if row.lease_state == store.LEASES_WANTED:
                await self._lease(row.id)
        for row in await asyncio.to_thread(self._active):
            run = _run(row)
            if run is not None:
                await self._follow(row, run)
            elif row.launcher_state.get("launching"):
                await self._launch(row)  # interrupted by a restart: same request, same run
        for row in await asyncio.to_thread(self._active):
            if row.state == "RUNNING":
                await self._check_silence(row)
        rows = await asyncio.to_thread(self._active)
        busy = sum(1 for row in rows if _run(row) or row.launcher_state.get("launching"))
        for row in rows:
            if busy >= self.training.max_running_jobs:
                break
            if (
                row.state == "QUEUED"
                and row.lease_state == store.LEASES_HELD
                and not _run(row)
                and not row.launcher_state.get("launching")
            ):
                await self._launch(row)
                busy += 1
        await asyncio.to_thread(self._count)

    def _active(self) -> list[JobRow]:
        with self.db.read() as session:
            rows = store.active(session)
            for row in rows:
                session.expunge(row)
            return rows

    def _count(self) -> None:
        with self.db.read() as session:
            counts = dict(
                session.execute(select(JobRow.state, func.count()).group_by(JobRow.state)).all()
            )
            waiting = sum(
                1
                for row in store.active(session)
                if row.state == "QUEUED" and not row.job().launcher_run_id
            )
        self.metrics.counts({str(k): int(v) for k, v in counts.items()}, waiting)

    async def _launch(self, row: JobRow) -> None:
        token = row.launcher_state.get("token") or secrets.token_urlsafe(32)
        marked = await asyncio.to_thread(self._mark_launching, row.id, token)
        if marked is None:
            return
        marked_row, resume_from = marked
        spec = dict(marked_row.worker_spec)
        endpoint = self.worker_endpoint
        spec["report"] = {
            **spec["report"],
            "endpoint": endpoint,
            "token": token,
            "heartbeat_seconds": self.training.heartbeat_seconds,
        }
        assert self.registry is not None, "start() the manager first"
        spec["registry"] = {
            **spec["registry"],
            "endpoint": self.registry.endpoint,
            "token": self.training.worker_registry_token,
        }
        spec["keep_checkpoints"] = self.training.keep_checkpoints
        if resume_from:
            spec["resume_from"] = resume_from
        resources = marked_row.job().resources
        request = RunRequest(
            job_id=row.id,
            spec=spec,
            gpu_count=resources.gpu_count,
            gpu_type=resources.gpu_type,
            cpu_cores=resources.cpu_cores,
            memory_bytes=resources.memory_bytes,
            max_run_seconds=resources.max_run_duration.seconds,
        )
        try:
            run = await self.launcher.launch(request)
        except Exception as error:
            log.exception("launching %s failed", topic(row.id))
            await asyncio.to_thread(
                self._end,
                row.id,
                State.STATE_FAILED,
                training_job_pb2.JobError(
                    reason="LAUNCH_FAILED", message=f"{type(error).__name__}: {error}"
                ),
            )
            return
        launched = await asyncio.to_thread(self._launched, row.id, run)
        await self._follow(launched, run)

    def _mark_launching(self, job_id: str, token: str) -> tuple[JobRow, str] | None:
        """Record, before the launch, that it is under way with this token: a restart in the
        middle repeats the same launch instead of starting a second run. Returns the row and
        the newest checkpoint to resume from (a job launched again after a lost run)."""
        with self.db.session() as session:
            row = store.get(session, job_id, for_update=True)
            repeat = row.launcher_state.get("launching") and row.state == "CANCELLING"
            if row.state != "QUEUED" and not repeat:
                return None
            row.launcher_state = {"launching": True, "token": token}
            row.token_sha256 = digest(token)
            latest = store.latest_checkpoint(session, job_id)
            session.flush()
            session.expunge(row)
            return row, latest.uri if latest is not None else ""

    def _launched(self, job_id: str, run: Run) -> JobRow:
        with self.db.session() as session:
            row = store.get(session, job_id, for_update=True)
            job = row.job()
            job.launcher_run_id = run.run_id
            row.launcher_state = {"run": run.state, "cursor": {}, "retries": 0}
            row.store(job)
            self._event(
                session,
                job_id,
                "log",
                training_job_pb2.TrainingEvent.LogLine(
                    stream="launcher", text=f"launched on {self.launcher.name} as {run.run_id}"
                ),
            )
            session.flush()
            session.expunge(row)
        self.signal.notify()
        return row

    async def _follow(self, row: JobRow, run: Run) -> None:
        """Bring a launched job up to date with its run: stop it if the job is being cancelled,
        record new log lines, then the run's state."""
        job_id = row.id
        if row.state == "CANCELLING" and not row.launcher_state.get("cancel_sent"):
            await asyncio.to_thread(self._note_cancel_sent, job_id)
            self._spawn(self.launcher.cancel(run))
        cursor = await asyncio.to_thread(self._cursor, job_id)
        lines, after = await self._logs(run, cursor)
        status = await self.launcher.status(run)
        if status.phase in (Phase.SUCCEEDED, Phase.FAILED, Phase.MISSING):
            more, after = await self._logs(run, after)  # what it printed last
            lines += more
        ended = status.phase in (Phase.SUCCEEDED, Phase.FAILED)
        if (
            ended
            and row.state in ("QUEUED", "RUNNING")
            and (status.output_adapter_version or status.output_request)
        ):
            # The worker left a result behind without reporting it: check it, or register it,
            # through AdapterService before the job ends.
            if job_id not in self._settling:
                task = asyncio.ensure_future(self._settle(job_id, row.name, status))
                self._settling[job_id] = task
            status = dataclasses.replace(status, phase=Phase.PENDING)
        await asyncio.to_thread(self._apply, job_id, lines, after, status)

    async def _settle(self, job_id: str, job_name: str, status: RunStatus) -> None:
        """End a job whose run ended without reporting its result: SUCCEEDED with the version
        the worker named if AdapterService has it as this job's, else with the version the
        stored registration request makes (idempotent: the job's request id), else FAILED.
        Retried with backoff while AdapterService is unavailable."""
        assert self.registry is not None
        delay = 1.0
        try:
            while True:
                try:
                    version = status.output_adapter_version
                    if version and not await self.registry.trained_by(version, job_name):
                        log.warning("%s: %s is not a version it trained", job_name, version)
                        version = ""
                    if not version and status.output_request:
                        version = await self.registry.register(status.output_request, job_name)
                        log.info("%s: registered its stored output as %s", job_name, version)
                    break
                except RegistryUnavailable as error:
                    log.warning(
                        "%s: the registry is unavailable (%s); again in %.0f s",
                        job_name,
                        error,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
                except RegistrationRefused as error:
                    await asyncio.to_thread(
                        self._end,
                        job_id,
                        State.STATE_FAILED,
                        training_job_pb2.JobError(reason="REGISTRATION_FAILED", message=str(error)),
                    )
                    return
            if version:
                final = RunStatus(Phase.SUCCEEDED, output_adapter_version=version)
            elif status.phase == Phase.SUCCEEDED:
                final = RunStatus(
                    Phase.FAILED,
                    "RESULT_NOT_REGISTERED",
                    f"the worker named {status.output_adapter_version}, which the registry "
                    "does not have as a version this job trained",
                )
            else:
                final = status
            await asyncio.to_thread(self._apply, job_id, [], None, final)
        finally:
            self._settling.pop(job_id, None)

    async def _logs(self, run: Run, cursor: dict[str, Any]) -> tuple[list[LogLine], dict[str, Any]]:
        """New log lines of a run; none (and the same cursor) when they cannot be read now: the
        job's state must not wait for its logs."""
        try:
            return await self.launcher.logs(run, cursor)
        except Exception as error:
            log.warning("cannot read the logs of %s: %s", run.run_id, error)
            return [], cursor

    def _note_cancel_sent(self, job_id: str) -> None:
        with self.db.session() as session:
            row = store.get(session, job_id, for_update=True)
            row.launcher_state = {**row.launcher_state, "cancel_sent": True}

    def _cursor(self, job_id: str) -> dict[str, Any]:
        with self.db.read() as session:
            return dict(store.get(session, job_id).launcher_state.get("cursor", {}))

    def _apply(
        self,
        job_id: str,
        lines: list[LogLine],
        cursor: dict[str, Any] | None,
        status: RunStatus,
    ) -> None:
        with self.db.session() as session:
            row = store.get(session, job_id, for_update=True)
            job = row.job()
            if job.state in TERMINAL:
                # A job's final state change is its last event: a stream that has seen it has
                # seen everything (lines the run printed after its final report are dropped).
                lines = []
            for line in lines:
                message = training_job_pb2.TrainingEvent.LogLine(stream=line.stream, text=line.text)
                self._event(session, job_id, "log", message)
            state = dict(row.launcher_state)
            if cursor is not None:
                state["cursor"] = cursor
            if status.retries > state.get("retries", 0) and job.state not in TERMINAL:
                state["retries"] = status.retries
                note = (
                    f"the run failed and is retried (retry {status.retries}): {status.message}; "
                    "the trainer resumes from its last checkpoint"
                )
                self._event(
                    session,
                    job_id,
                    "log",
                    training_job_pb2.TrainingEvent.LogLine(stream="launcher", text=note),
                )
            row.launcher_state = state
            if job.state not in TERMINAL:
                self._apply_phase(session, row, job, status)
            row.store(job)
        self.signal.notify()

    def _apply_phase(
        self, session: Session, row: JobRow, job: TrainingJob, status: RunStatus
    ) -> None:
        cancelling = job.state == State.STATE_CANCELLING
        if status.phase == Phase.RUNNING:
            if job.state == State.STATE_QUEUED and job.HasField("start_time"):
                # Back from waiting: the silence clock starts again now.
                self._transition(
                    session,
                    row,
                    job,
                    State.STATE_RUNNING,
                    reason="RESUMED",
                    message="a Pod runs again; it resumes from the last checkpoint",
                )
                row.last_report_time = utcnow()
            elif job.state == State.STATE_QUEUED:
                self._transition(session, row, job, State.STATE_RUNNING)
                row.last_report_time = row.last_report_time or utcnow()
        elif status.phase == Phase.PENDING:
            if job.state == State.STATE_RUNNING:
                # Preempted, or its Pod lost and no capacity for another: it waits (QUEUED, so
                # the silence clock stops) instead of failing as a silent worker.
                self._transition(
                    session,
                    row,
                    job,
                    State.STATE_QUEUED,
                    reason=status.reason or "WAITING_FOR_CAPACITY",
                    message=status.message or "no Pod of the run is running",
                )
            return
        elif cancelling:
            self._transition(session, row, job, State.STATE_CANCELLED)
        elif status.phase == Phase.SUCCEEDED and status.output_adapter_version:
            job.output_adapter_version = status.output_adapter_version
            self._transition(session, row, job, State.STATE_SUCCEEDED)
        else:
            if status.phase == Phase.SUCCEEDED:
                reason, message = (
                    "NO_RESULT_REPORTED",
                    "the worker ended cleanly but never reported its result",
                )
            elif status.phase == Phase.FAILED:
                reason, message = status.reason, status.message
            else:
                reason = "RUN_LOST"
                message = f"the {self.launcher.name} launcher has no run {job.launcher_run_id}"
            error = training_job_pb2.JobError(reason=reason, message=message)
            self._transition(session, row, job, State.STATE_FAILED, error)

    async def _check_silence(self, row: JobRow) -> None:
        if row.id in self._settling:
            return  # the run has ended; its result is being registered
        # After a restart the clock starts again: the service could not hear reports while down.
        last = max(row.last_report_time or row.create_time, self.started_at)
        silent = (utcnow() - last).total_seconds()
        if silent <= self.training.worker_timeout_seconds:
            return
        error = training_job_pb2.JobError(
            reason="WORKER_SILENT",
            message=f"no report from the worker for {silent:.0f} s "
            f"(timeout {self.training.worker_timeout_seconds:g} s)",
        )
        if await asyncio.to_thread(self._end, row.id, State.STATE_FAILED, error):
            run = _run(row)
            if run is not None:
                await self.launcher.cancel(run)

    def _end(
        self, job_id: str, state: TrainingJob.State.ValueType, error: training_job_pb2.JobError
    ) -> bool:
        with self.db.session() as session:
            row = store.get(session, job_id, for_update=True)
            job = row.job()
            if job.state in TERMINAL:
                return False
            self._transition(session, row, job, state, error)
        self.signal.notify()
        return True

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _checkpoint_blobs(blobs: BlobStore, uri: str) -> set[str]:
    """The blobs of a stored checkpoint (its manifest and files); none for a local one."""
    sha256 = uri_sha256(uri)
    if sha256 is None or uri != blobs.uri(sha256):
        return set()
    try:
        manifest = json.loads(blobs.read_bytes(sha256))
        files = {str(sha) for sha in manifest["files"].values()}
    except Exception as error:  # gone already, or not a checkpoint manifest
        log.warning("cannot read checkpoint manifest %s: %s", uri, error)
        return set()
    return {sha256, *files}


def _run(row: JobRow) -> Run | None:
    run_id = row.document.get("launcher_run_id", "")
    if not run_id:
        return None
    return Run(run_id, row.launcher_state.get("run", {}))


def _datasets(job: TrainingJob) -> list[str]:
    return sorted({job.train_dataset, job.validation_dataset} - {""})


def event_proto(change: Change) -> training_job_pb2.TrainingEvent:
    """A stored event as the TrainingEvent clients receive."""
    event = training_job_pb2.TrainingEvent(sequence=change.revision)
    event.time.CopyFrom(timestamp(change.create_time))
    field = event.DESCRIPTOR.fields_by_name[change.kind]
    json_format.ParseDict(change.payload["data"], getattr(event, field.name))
    return event
