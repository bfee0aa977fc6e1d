"""Evaluation jobs and their answers: the `evaluation_jobs` and `evaluation_items` tables.

A job is stored as the JSON of its `EvaluationJob` message, its state and creation time copied
out for queries; each answer of each candidate to each item is a row of its own (written as the
run goes, so a restarted service answers only what is missing).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf import json_format
from sqlalchemy import BigInteger, ForeignKey, String, select, text
from sqlalchemy.orm import Mapped, Session, mapped_column

from tunefleet.core.errors import InvalidArgument, NotFound
from tunefleet.storage.database import Base
from tunefleet.storage.pagination import Page, paginate
from tunefleet.v1 import evaluation_pb2

EvaluationJob = evaluation_pb2.EvaluationJob
State = EvaluationJob.State
TERMINAL = {State.STATE_SUCCEEDED, State.STATE_FAILED, State.STATE_CANCELLED}


class JobRow(Base):
    __tablename__ = "evaluation_jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)  # the State name without STATE_
    document: Mapped[dict[str, Any]]
    create_time: Mapped[datetime] = mapped_column(index=True)

    def job(self) -> evaluation_pb2.EvaluationJob:
        return json_format.ParseDict(self.document, EvaluationJob())

    def store(self, job: evaluation_pb2.EvaluationJob) -> None:
        self.document = json_format.MessageToDict(job, preserving_proto_field_name=True)
        self.state = State.Name(job.state).removeprefix("STATE_")


class ItemRow(Base):
    __tablename__ = "evaluation_items"
    job_id: Mapped[str] = mapped_column(
        ForeignKey("evaluation_jobs.id", ondelete="CASCADE"), primary_key=True
    )
    item_index: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    candidate: Mapped[str] = mapped_column(String(63), primary_key=True)
    output: Mapped[str | None]
    reference: Mapped[str]
    scores: Mapped[dict[str, Any]]
    errors: Mapped[dict[str, Any]]
    judgements: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'"))

    def message(self) -> evaluation_pb2.EvaluationItemResult:
        result = evaluation_pb2.EvaluationItemResult(
            index=self.item_index,
            candidate=self.candidate,
            reference=self.reference,
            scores=self.scores,
            errors=self.errors,
            judgements=self.judgements,
        )
        if self.output is not None:
            result.output = self.output
        return result


class AnnotationRow(Base):
    """A pair of answers given to a person (a task), and once answered their choice: `first`,
    `second` or `tie` as shown, with `candidate_first` saying which was which."""

    __tablename__ = "evaluation_annotations"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(
        ForeignKey("evaluation_jobs.id", ondelete="CASCADE"), index=True
    )
    item_index: Mapped[int] = mapped_column(BigInteger)
    candidate: Mapped[str] = mapped_column(String(63))
    baseline: Mapped[str] = mapped_column(String(63))
    candidate_first: Mapped[bool]
    annotator: Mapped[str] = mapped_column(String(128))
    choice: Mapped[str | None] = mapped_column(String(16))
    create_time: Mapped[datetime]
    answer_time: Mapped[datetime | None]


def job_id(name: str, field: str = "name") -> str:
    job = name.removeprefix("evaluationJobs/")
    if not name.startswith("evaluationJobs/") or not job or "/" in job:
        raise InvalidArgument(field, f"{name!r} is not evaluationJobs/{{job}}")
    return job


def get(session: Session, job: str) -> JobRow:
    row = session.get(JobRow, job)
    if row is None:
        name = f"evaluationJobs/{job}"
        raise NotFound(f"{name} not found", metadata={"name": name})
    return row


def list_page(session: Session, page_size: int, page_token: str) -> Page[JobRow]:
    return paginate(
        session,
        select(JobRow),
        [JobRow.create_time, JobRow.id],
        page_size=page_size,
        page_token=page_token,
        descending=True,
    )


def items_page(
    session: Session, job: str, candidate: str, page_size: int, page_token: str
) -> Page[ItemRow]:
    get(session, job)
    statement = select(ItemRow).where(ItemRow.job_id == job)
    if candidate:
        statement = statement.where(ItemRow.candidate == candidate)
    return paginate(
        session,
        statement,
        [ItemRow.item_index, ItemRow.candidate],
        page_size=page_size,
        page_token=page_token,
        query=f"{job}/{candidate}",
    )


def unfinished(session: Session) -> list[JobRow]:
    active = [
        State.Name(s).removeprefix("STATE_") for s in (State.STATE_QUEUED, State.STATE_RUNNING)
    ]
    return list(
        session.scalars(select(JobRow).where(JobRow.state.in_(active)).order_by(JobRow.create_time))
    )


def answered(session: Session, job: str) -> list[ItemRow]:
    return list(session.scalars(select(ItemRow).where(ItemRow.job_id == job)))


def annotation(session: Session, name: str, field: str) -> AnnotationRow:
    """The task `evaluationJobs/{job}/annotationTasks/{task}`."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "evaluationJobs" or parts[2] != "annotationTasks":
        raise InvalidArgument(
            field, f"{name!r} is not evaluationJobs/{{job}}/annotationTasks/{{task}}"
        )
    row = session.get(AnnotationRow, parts[3])
    if row is None or row.job_id != parts[1]:
        raise NotFound(f"{name} not found", metadata={"name": name})
    return row


def answered_tasks(
    session: Session, job: str, candidate: str, baseline: str
) -> list[AnnotationRow]:
    """The answered tasks of a pair."""
    return list(
        session.scalars(
            select(AnnotationRow).where(
                AnnotationRow.job_id == job,
                AnnotationRow.candidate == candidate,
                AnnotationRow.baseline == baseline,
                AnnotationRow.choice.is_not(None),
            )
        )
    )


def judged(session: Session, job: str, candidate: str, baseline: str, annotator: str) -> set[int]:
    """The items an annotator has answered a task of, for a pair."""
    return {
        row.item_index
        for row in answered_tasks(session, job, candidate, baseline)
        if row.annotator == annotator
    }


def both_answered(
    session: Session, job: str, candidate: str, baseline: str
) -> dict[int, tuple[str, str]]:
    """The items both candidates answered: index -> (candidate's answer, baseline's)."""
    outputs = {
        (row.candidate, row.item_index): row.output
        for row in answered(session, job)
        if row.output is not None and row.candidate in (candidate, baseline)
    }
    return {
        index: (output, outputs[(baseline, index)])
        for (name, index), output in outputs.items()
        if name == candidate and (baseline, index) in outputs
    }
