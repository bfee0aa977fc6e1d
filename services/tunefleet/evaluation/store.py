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
