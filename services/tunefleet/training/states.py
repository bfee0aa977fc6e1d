"""The life of a training job in its row: every state change happens in one transaction that
also appends the job's events (a change feed per job, `trainingJobs/{job}`), so a client
following the feed sees every transition exactly once and can resume after the last event it saw.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from google.protobuf import json_format
from google.protobuf.message import Message
from sqlalchemy import event as sql_event
from sqlalchemy.orm import Session

from tunefleet.core.protos import timestamp
from tunefleet.runtime.experiments import ExperimentMirror, flatten
from tunefleet.runtime.settings import MlflowSettings
from tunefleet.runtime.streams import ChangeSignal
from tunefleet.storage.changes import Change, append_change
from tunefleet.storage.database import Database, utcnow
from tunefleet.training import store
from tunefleet.training.launcher import Run
from tunefleet.training.metrics import TrainingMetrics
from tunefleet.training.store import TERMINAL, JobRow, State
from tunefleet.v1 import training_job_pb2

log = logging.getLogger(__name__)

TrainingJob = training_job_pb2.TrainingJob
# What a job asked for: its MLflow run's parameters.
MIRRORED = [
    "display_name", "base_model", "method", "objective", "lora", "dpo", "hyperparameters",
    "train_dataset", "validation_dataset", "adapter", "resources",
]  # fmt: skip


def topic(job_id: str) -> str:
    return f"trainingJobs/{job_id}"


class JobStates:
    """Moves jobs between states, with their events and metrics; `wake` asks the scheduler to
    look (a job that ended has leases to release)."""

    def __init__(
        self,
        db: Database,
        metrics: TrainingMetrics,
        signal: ChangeSignal,
        wake: Callable[[], None],
        mirror: ExperimentMirror | None = None,
    ) -> None:
        self.db, self.metrics, self.signal, self.wake = db, metrics, signal, wake
        self.mirror = mirror or ExperimentMirror(MlflowSettings())

    def after_commit(self, session: Session, action: Callable[[], None]) -> None:
        """Run `action` once the caller's transaction has committed (never for a rolled back
        one)."""
        sql_event.listen(session, "after_commit", lambda _: action(), once=True)

    def transition(
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
            params = flatten(TrainingJob(**{f: getattr(job, f) for f in MIRRORED}))
            tags = {"tunefleet.kind": "training", "tunefleet.launcher": job.launcher}
            self.after_commit(session, lambda: self.mirror.run(job.name, params, tags))
        if error is not None:
            job.error.CopyFrom(error)
            self.event(session, row.id, "error", error)
        if state in TERMINAL:
            job.end_time.CopyFrom(timestamp(now))
            started = job.start_time.ToDatetime() if job.HasField("start_time") else None
            seconds = (now.replace(tzinfo=None) - started).total_seconds() if started else None
            final = State.Name(state).removeprefix("STATE_").lower()
            self.metrics.ended(job.name, final, seconds)
            tags = (
                {"tunefleet.adapter_version": job.output_adapter_version}
                if (job.output_adapter_version)
                else {}
            )
            if error is not None:
                tags["tunefleet.error"] = f"{error.reason}: {error.message}"[:5000]
            self.after_commit(session, lambda: self.mirror.end(job.name, final, tags))
            # Its leases go once this commits (the scheduler deletes them on DatasetService).
            sql_event.listen(session, "after_commit", lambda _: self.wake(), once=True)
            log.info(
                "%s ended: %s%s",
                job.name,
                State.Name(state),
                f" ({error.reason}: {error.message})" if error else "",
            )
        self.event(session, row.id, "state_change", transition)
        row.store(job)

    def event(self, session: Session, job_id: str, kind: str, message: Message) -> None:
        append_change(
            session,
            topic(job_id),
            kind,
            {"data": json_format.MessageToDict(message, preserving_proto_field_name=True)},
        )

    def end(
        self, job_id: str, state: TrainingJob.State.ValueType, error: training_job_pb2.JobError
    ) -> bool:
        with self.db.session() as session:
            row = store.get(session, job_id, for_update=True)
            job = row.job()
            if job.state in TERMINAL:
                return False
            self.transition(session, row, job, state, error)
        self.signal.notify()
        return True


def run_of(row: JobRow) -> Run | None:
    run_id = row.document.get("launcher_run_id", "")
    if not run_id:
        return None
    return Run(run_id, row.launch.run)


def event_proto(change: Change) -> training_job_pb2.TrainingEvent:
    """A stored event as the TrainingEvent clients receive."""
    event = training_job_pb2.TrainingEvent(sequence=change.revision)
    event.time.CopyFrom(timestamp(change.create_time))
    field = event.DESCRIPTOR.fields_by_name[change.kind]
    json_format.ParseDict(change.payload["data"], getattr(event, field.name))
    return event
