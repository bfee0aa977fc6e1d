"""TrainingService's requests: jobs are checked (with DatasetService and AdapterService),
stored, listed, cancelled and followed; the scheduler (`scheduler.py`) runs them and worker
reports (`reports.py`) bring their progress. The database is the source of truth."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from pathlib import Path
from typing import Any

from google.protobuf.message import Message
from sqlalchemy.orm import Session

from tunefleet.core import names
from tunefleet.core.chat import renders_tool_calls
from tunefleet.core.errors import (
    FailedPrecondition,
    InvalidArgument,
)
from tunefleet.core.names import dataset_id
from tunefleet.core.protos import timestamp
from tunefleet.runtime.experiments import ExperimentMirror
from tunefleet.runtime.models import ModelCatalogue
from tunefleet.runtime.settings import Settings
from tunefleet.runtime.streams import ChangeSignal
from tunefleet.storage import idempotency
from tunefleet.storage.blobs import BlobStore
from tunefleet.storage.changes import Change, read_changes
from tunefleet.storage.database import Database, utcnow
from tunefleet.storage.pagination import Page
from tunefleet.training import jobs, leadership, store
from tunefleet.training.launcher import JobLauncher
from tunefleet.training.metrics import TrainingMetrics
from tunefleet.training.peers import (
    AdapterServiceClient,
    DatasetServiceClient,
    EvaluationServiceClient,
)
from tunefleet.training.reports import WorkerReports
from tunefleet.training.scheduler import Scheduler, datasets_of
from tunefleet.training.states import JobStates, run_of, topic
from tunefleet.training.store import TERMINAL, CheckpointRow, JobRow, State
from tunefleet.v1 import dataset_pb2, training_job_pb2

TrainingJob = training_job_pb2.TrainingJob
log = logging.getLogger(__name__)
USER_FIELDS = [
    "display_name",
    "labels",
    "base_model",
    "method",
    "objective",
    "dpo",
    "lora",
    "hyperparameters",
    "train_dataset",
    "validation_dataset",
    "adapter",
    "resources",
    "priority",
    "feedback",
]


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
        # DatasetService and AdapterService, called with TrainingService's own token; an empty
        # address is this server's own (set by start()).
        token = self.training.service_token or self.training.worker_registry_token
        self.datasets = DatasetServiceClient(self.training.datasets_endpoint, token)
        self.registry = AdapterServiceClient(self.training.registry_endpoint, token, blobs)
        self.evaluations = EvaluationServiceClient(self.training.evaluation, token)
        self.mirror = ExperimentMirror(settings.mlflow)
        self.states = JobStates(
            db, metrics, self.signal, wake=lambda: self.scheduler.wake(), mirror=self.mirror
        )
        self.scheduler = Scheduler(
            db,
            self.training,
            launcher,
            metrics,
            self.states,
            self.signal,
            self.datasets,
            self.registry,
            self.evaluations,
            leadership.for_settings(self.training, db),
        )
        self.reports = WorkerReports(
            db,
            blobs,
            self.training,
            self.states,
            launcher,
            metrics,
            self.signal,
            self.scheduler.spawn,
        )

    async def start(self, server_address: str) -> None:
        """Reconcile with the launcher, then schedule until `stop()`."""
        self.datasets.endpoint = self.datasets.endpoint or server_address
        self.registry.endpoint = self.registry.endpoint or server_address
        self.evaluations.endpoint = self.evaluations.endpoint or server_address
        self.mirror.start()
        await self.scheduler.start(server_address)

    def drain(self) -> None:
        """Shutdown began: event streams that follow running jobs end (UNAVAILABLE) instead of
        holding the shutdown for its grace; clients resume after their last sequence."""
        self.draining = True
        self.signal.notify()

    async def stop(self) -> None:
        await self.scheduler.stop()
        await self.registry.close()
        await self.evaluations.close()
        await self.datasets.close()
        await self.launcher.close()
        await asyncio.to_thread(self.mirror.stop)

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
            elif field == "feedback":
                job.feedback.extend(requested.feedback)
            else:
                setattr(job, field, value)
        checked = jobs.check(job, self.models, self.training)
        job.hyperparameters.CopyFrom(jobs.resolved_hyperparameters(checked))
        job.objective = training_job_pb2.TrainingObjective.Value(
            f"TRAINING_OBJECTIVE_{checked.objective.upper()}"
        )
        if checked.objective == "dpo":
            job.dpo.beta = checked.dpo.beta
        else:
            job.ClearField("dpo")
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
        data = await self._data(job, checked.objective)
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
            self.states.event(session, identifier, "state_change", job.state_history[0])
            self.states.transition(session, row, job, State.STATE_QUEUED)
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
        await self.scheduler.lease(store.job_id(name))
        self.signal.notify()
        self.scheduler.wake()
        return await asyncio.to_thread(self.get, name)

    async def _data(self, job: TrainingJob, objective: str) -> dict[str, Any]:
        """Check the datasets a job names (on DatasetService); the data part of its trainer
        spec: the URIs of their records in the blob store."""
        datasets = self.datasets
        train = await datasets.dataset(job.train_dataset, "training_job.train_dataset")
        _check_kind(train, "training_job.train_dataset", objective)
        await self._check_tool_calls(job, train, "training_job.train_dataset")
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
            _check_kind(other, "training_job.validation_dataset", objective)
            await self._check_tool_calls(job, other, "training_job.validation_dataset")
            data["validation_data"] = {"uri": self.blobs.uri(other.content_sha256), "split": "all"}
        elif train.validation_record_count:
            data["validation_data"] = {
                "uri": self.blobs.uri(train.content_sha256),
                "split": "validation",
            }
        return data

    async def _check_tool_calls(
        self, job: TrainingJob, dataset: dataset_pb2.Dataset, field: str
    ) -> None:
        """Data with tool calls trains only where the base model's chat template renders the
        calls (else those turns would teach empty answers)."""
        if not dataset.validation_report.tool_call_records:
            return
        model_dir = self.models.resolve(job.base_model, "training_job.base_model")
        if not await asyncio.to_thread(_template_renders_tool_calls, model_dir):
            raise InvalidArgument(
                field,
                f"{dataset.name} has {dataset.validation_report.tool_call_records} records whose "
                f"assistant calls tools, and the chat template of {job.base_model} does not "
                "render tool calls (trained without them, those turns would teach empty answers)",
                reason="TOOL_CALLS_NOT_RENDERED",
            )

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
            "objective": checked.objective,
            "dpo": checked.dpo.model_dump(mode="json"),
            "lora": checked.lora.model_dump(mode="json"),
            "hyperparameters": checked.hyperparameters.model_dump(mode="json"),
            "fsdp": job.resources.fsdp,
            **data,
            "storage": storage,
            "job": job.name,
            "datasets": datasets_of(job),
            "feedback": list(job.feedback),
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
        self.scheduler.wake()
        return job

    def _cancel(self, job_id: str) -> TrainingJob:
        with self.db.session() as session:
            row = store.get(session, job_id, for_update=True)
            job = row.job()
            if job.state in TERMINAL:
                raise FailedPrecondition(
                    f"{job.name} already ended ({State.Name(job.state)})", reason="JOB_ENDED"
                )
            run = run_of(row)
            if run is None and not row.launch.launching:
                self.states.transition(session, row, job, State.STATE_CANCELLED)
            else:
                row.cancel_requested = True
                self.states.transition(session, row, job, State.STATE_CANCELLING)
            return job


def _check_kind(dataset: dataset_pb2.Dataset, field: str, objective: str) -> None:
    """SFT trains on conversations and DPO on pairs: a dataset of another kind is refused,
    never read as the objective's data."""
    kind = dataset.kind
    if objective == "dpo" and kind != dataset_pb2.DATASET_KIND_PREFERENCE:
        raise InvalidArgument(
            field,
            f"{dataset.name} is a {dataset_pb2.DatasetKind.Name(kind)} dataset, and DPO trains "
            "on pairs of a chosen and a rejected answer (DATASET_KIND_PREFERENCE)",
            reason="DATASET_KIND_MISMATCH",
        )
    sft = (dataset_pb2.DATASET_KIND_UNSPECIFIED, dataset_pb2.DATASET_KIND_SFT)
    if objective == "sft" and kind not in sft:
        raise InvalidArgument(
            field,
            f"{dataset.name} is a {dataset_pb2.DatasetKind.Name(kind)} dataset, and SFT jobs "
            "train on conversations: use objective DPO for preference pairs, or upload the file "
            "again with options.kind DATASET_KIND_SFT to train on its chosen (or desirable) "
            "answers",
            reason="DATASET_KIND_MISMATCH",
        )


def _template_renders_tool_calls(model_dir: Path) -> bool:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as error:
        log.warning("cannot load the tokenizer of %s: %s", model_dir, error)
        return False
    return renders_tool_calls(tokenizer)
