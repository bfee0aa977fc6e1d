"""Change feeds: numbered, gap-free sequences of events per topic.

Watch streams (the adapter registry's changes, a training job's events) are built on this. Each
topic has a counter row that `append_change` increments with one atomic upsert; the row stays
locked until the transaction commits, so revisions of one topic commit in order and without
gaps. A reader that resumes "after revision N" therefore never misses a change that commits later
with a smaller number.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, String, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapped, Session, mapped_column

from tunefleet.storage.database import Base, utcnow


class ChangeCounter(Base):
    """The last revision handed out per topic."""

    __tablename__ = "change_counters"
    topic: Mapped[str] = mapped_column(String(255), primary_key=True)
    last_revision: Mapped[int] = mapped_column(BigInteger)


class ChangeRow(Base):
    """One change of a topic."""

    __tablename__ = "changes"
    topic: Mapped[str] = mapped_column(String(255), primary_key=True)
    revision: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]]
    create_time: Mapped[datetime]


@dataclass(frozen=True)
class Change:
    """A change as readers see it."""

    topic: str
    revision: int
    kind: str
    payload: dict[str, Any]
    create_time: datetime


def append_change(session: Session, topic: str, kind: str, payload: dict[str, Any]) -> Change:
    """Record a change in the caller's transaction and return it with its revision."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = (
        insert(ChangeCounter)
        .values(topic=topic, last_revision=1)
        .on_conflict_do_update(
            index_elements=[ChangeCounter.topic],
            set_={"last_revision": ChangeCounter.last_revision + 1},
        )
        .returning(ChangeCounter.last_revision)
    )
    revision = session.execute(statement).scalar_one()
    row = ChangeRow(
        topic=topic, revision=revision, kind=kind, payload=payload, create_time=utcnow()
    )
    session.add(row)
    session.flush()
    return _change(row)


def read_changes(
    session: Session, topic: str, after_revision: int = 0, limit: int = 1000
) -> list[Change]:
    """Changes of `topic` with revision > `after_revision`, oldest first, at most `limit`."""
    rows = session.scalars(
        select(ChangeRow)
        .where(ChangeRow.topic == topic, ChangeRow.revision > after_revision)
        .order_by(ChangeRow.revision)
        .limit(limit)
    )
    return [_change(row) for row in rows]


def latest_revision(session: Session, topic: str) -> int:
    """The newest revision of `topic`, 0 if it has none."""
    value = session.scalar(select(func.max(ChangeRow.revision)).where(ChangeRow.topic == topic))
    return int(value or 0)


def _change(row: ChangeRow) -> Change:
    return Change(row.topic, row.revision, row.kind, row.payload, row.create_time)
