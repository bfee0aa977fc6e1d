"""Training job metadata: the `training_jobs` and `training_checkpoints` tables.

A job is stored as the JSON of its `TrainingJob` message (`document`), with the columns that
queries need (state, adapter, priority, creation time) copied out of it, and the service's own
bookkeeping beside it: the trainer spec, the sha256 of the current worker token, whether a
cancel was asked for, what the launcher needs to find its run again, and when the worker last
reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from google.protobuf import json_format
from sqlalchemy import BigInteger, Float, ForeignKey, Integer, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from tunefleet.core.errors import InvalidArgument, NotFound
from tunefleet.storage.database import Base
from tunefleet.storage.filtering import Filter
from tunefleet.storage.pagination import Page, paginate
from tunefleet.v1 import training_job_pb2

State = training_job_pb2.TrainingJob.State
TERMINAL = {State.STATE_SUCCEEDED, State.STATE_FAILED, State.STATE_CANCELLED}
LEASES_WANTED, LEASES_HELD, LEASES_RELEASED = "wanted", "held", "released"
ACTIVE_NAMES = ["STATE_VALIDATING", "STATE_QUEUED", "STATE_RUNNING", "STATE_CANCELLING"]


@dataclass(frozen=True)
class LaunchState:
    """Where a job's run is, as the scheduler records it (the `launcher_state` column)."""

    launching: bool = False  # a launch is under way with `token`: a restart repeats it
    token: str = ""  # the worker token of that launch
    run: dict[str, Any] = field(default_factory=dict)  # the launcher's own state of the run
    cursor: dict[str, Any] = field(default_factory=dict)  # how far its logs were read
    retries: int = 0  # retries of the run the launcher reported
    cancel_sent: bool = False  # the launcher was asked to stop the run
    devices: list[int] = field(default_factory=list)  # the local GPUs the run holds
    waiting: str = ""  # why the run last said it waits (noted once on the job's event feed)


class JobRow(Base):
    __tablename__ = "training_jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)  # the State name without STATE_
    adapter: Mapped[str] = mapped_column(String(128), index=True)  # adapters/{adapter}
    priority: Mapped[int] = mapped_column(Integer)
    document: Mapped[dict[str, Any]]
    worker_spec: Mapped[dict[str, Any]]  # the trainer spec, less what each launch adds
    token_sha256: Mapped[str] = mapped_column(String(64))
    cancel_requested: Mapped[bool]
    launcher_state: Mapped[dict[str, Any]]
    # The job's leases on its datasets (DatasetService's): WANTED until taken, HELD, then
    # RELEASED after the job ended. The scheduler moves them along, so none outlives its job.
    lease_state: Mapped[str] = mapped_column(String(16), index=True, server_default="released")
    last_report_time: Mapped[datetime | None]
    create_time: Mapped[datetime] = mapped_column(index=True)

    @property
    def launch(self) -> LaunchState:
        return LaunchState(**self.launcher_state)

    @launch.setter
    def launch(self, state: LaunchState) -> None:
        self.launcher_state = asdict(state)

    @property
    def name(self) -> str:
        return f"trainingJobs/{self.id}"

    def job(self) -> training_job_pb2.TrainingJob:
        return json_format.ParseDict(self.document, training_job_pb2.TrainingJob())

    def store(self, job: training_job_pb2.TrainingJob) -> None:
        """Replace the document with `job` and copy the queried fields out of it."""
        self.document = json_format.MessageToDict(job, preserving_proto_field_name=True)
        self.state = State.Name(job.state).removeprefix("STATE_")
        self.adapter = job.adapter
        self.priority = job.priority


class CheckpointRow(Base):
    __tablename__ = "training_checkpoints"
    job_id: Mapped[str] = mapped_column(
        ForeignKey("training_jobs.id", ondelete="CASCADE"), primary_key=True
    )
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    uri: Mapped[str]
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    validation_loss: Mapped[float | None] = mapped_column(Float)
    create_time: Mapped[datetime]


LIST_FILTER = Filter({"state": JobRow.state, "adapter": JobRow.adapter})


def job_id(name: str, field: str = "name") -> str:
    job = name.removeprefix("trainingJobs/")
    if not name.startswith("trainingJobs/") or not job or "/" in job:
        raise InvalidArgument(field, f"{name!r} is not trainingJobs/{{job}}")
    return job


def get(session: Session, job: str, *, for_update: bool = False) -> JobRow:
    statement = select(JobRow).where(JobRow.id == job)
    if for_update:
        statement = statement.with_for_update()
    row = session.scalars(statement).one_or_none()
    if row is None:
        raise NotFound(f"trainingJobs/{job} not found", metadata={"name": f"trainingJobs/{job}"})
    return row


def list_page(session: Session, filter_text: str, page_size: int, page_token: str) -> Page[JobRow]:
    # `state = RUNNING` and `state = STATE_RUNNING` both work: the column holds the short name.
    normalised = filter_text.replace("STATE_", "")
    statement = LIST_FILTER.apply(select(JobRow), normalised)
    return paginate(
        session,
        statement,
        [JobRow.create_time, JobRow.id],
        page_size=page_size,
        page_token=page_token,
        query=filter_text,
        descending=True,
    )


def ended_holding_leases(session: Session) -> list[JobRow]:
    """Jobs that ended and may still hold leases on their datasets."""
    final = [State.Name(state).removeprefix("STATE_") for state in TERMINAL]
    return list(
        session.scalars(
            select(JobRow).where(JobRow.lease_state == LEASES_HELD, JobRow.state.in_(final))
        )
    )


def active(session: Session) -> list[JobRow]:
    """Jobs not in a final state, in the order the queue serves them."""
    short = [name.removeprefix("STATE_") for name in ACTIVE_NAMES]
    return list(
        session.scalars(
            select(JobRow)
            .where(JobRow.state.in_(short))
            .order_by(JobRow.priority.desc(), JobRow.create_time, JobRow.id)
        )
    )


def checkpoints_page(
    session: Session, job: str, page_size: int, page_token: str
) -> Page[CheckpointRow]:
    get(session, job)
    return paginate(
        session,
        select(CheckpointRow).where(CheckpointRow.job_id == job),
        [CheckpointRow.step],
        page_size=page_size,
        page_token=page_token,
        query=job,
    )


def latest_checkpoint(session: Session, job: str) -> CheckpointRow | None:
    return session.scalars(
        select(CheckpointRow)
        .where(CheckpointRow.job_id == job)
        .order_by(CheckpointRow.step.desc())
        .limit(1)
    ).one_or_none()
