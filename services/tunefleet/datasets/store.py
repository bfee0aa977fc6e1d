"""Dataset metadata: the `datasets` table, leases that block deletion, and queries."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, literal, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from tunefleet.core.errors import AlreadyExists, FailedPrecondition, NotFound
from tunefleet.storage.database import Base, utcnow
from tunefleet.storage.filtering import Filter
from tunefleet.storage.pagination import Page, paginate


class DatasetRow(Base):
    """One immutable dataset. Reports are stored as the JSON of their proto messages."""

    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_create_time_id", "create_time", "id"),)  # list pages
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(128), index=True)
    description: Mapped[str]
    labels: Mapped[dict[str, Any]]
    source_format: Mapped[int] = mapped_column(Integer)
    record_count: Mapped[int]
    train_record_count: Mapped[int]
    validation_record_count: Mapped[int]
    content_sha256: Mapped[str] = mapped_column(String(64), index=True)
    source_size_bytes: Mapped[int] = mapped_column(BigInteger)
    options: Mapped[dict[str, Any]]
    validation_report: Mapped[dict[str, Any]]
    cleaning_report: Mapped[dict[str, Any]]
    token_statistics: Mapped[dict[str, Any] | None]
    create_time: Mapped[datetime]


class DatasetLease(Base):
    """Something that uses a dataset (for example a training job) and so blocks its deletion."""

    __tablename__ = "dataset_leases"
    dataset_id: Mapped[str] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True
    )
    id: Mapped[str] = mapped_column("lease_id", String(63), primary_key=True)
    holder: Mapped[str] = mapped_column(String(256))
    create_time: Mapped[datetime]


# A dataset is stored once it is complete, so every stored dataset is READY.
LIST_FILTER = Filter(
    {"display_name": DatasetRow.display_name, "state": literal("READY", String)},
    labels=DatasetRow.labels,
)


def get(session: Session, dataset_id: str, *, for_update: bool = False) -> DatasetRow:
    """The dataset; with `for_update`, locked until the transaction ends (leasing and deleting
    take this lock, so a lease cannot slip in while a delete checks for leases)."""
    row = session.get(DatasetRow, dataset_id, with_for_update=for_update)
    if row is None:
        raise NotFound(
            f"datasets/{dataset_id} not found", metadata={"name": f"datasets/{dataset_id}"}
        )
    return row


def insert(session: Session, row: DatasetRow) -> DatasetRow:
    """Store `row` unless a dataset with its id exists (same content and options): then return
    that one."""
    existing = session.get(DatasetRow, row.id)
    if existing is not None:
        return existing
    session.add(row)
    session.flush()
    return row


def list_page(
    session: Session, filter_text: str, page_size: int, page_token: str
) -> Page[DatasetRow]:
    statement = LIST_FILTER.apply(select(DatasetRow), filter_text)
    return paginate(
        session,
        statement,
        [DatasetRow.create_time, DatasetRow.id],
        page_size=page_size,
        page_token=page_token,
        query=filter_text,
        descending=True,
    )


def delete(session: Session, dataset_id: str) -> str | None:
    """Delete a dataset; returns the sha256 of its records blob if no other dataset shares it."""
    row = get(session, dataset_id, for_update=True)
    holders = session.scalars(
        select(DatasetLease.holder).where(DatasetLease.dataset_id == dataset_id).limit(5)
    ).all()
    if holders:
        raise FailedPrecondition(
            f"datasets/{dataset_id} is in use by {', '.join(holders)}",
            reason="DATASET_IN_USE",
            metadata={"holders": ",".join(holders)},
        )
    sha256 = row.content_sha256
    session.delete(row)
    session.flush()
    shared = session.scalar(
        select(DatasetRow.id).where(DatasetRow.content_sha256 == sha256).limit(1)
    )
    return None if shared else sha256


def create_lease(session: Session, dataset_id: str, lease_id: str, holder: str) -> DatasetLease:
    """Lease `dataset_id` for `holder`; the lease that exists when a retry asks again."""
    get(session, dataset_id, for_update=True)
    lease = session.get(DatasetLease, (dataset_id, lease_id))
    if lease is not None:
        if lease.holder != holder:
            raise AlreadyExists(
                f"datasets/{dataset_id}/leases/{lease_id} is held by {lease.holder}",
                metadata={"holder": lease.holder},
            )
        return lease
    lease = DatasetLease(dataset_id=dataset_id, id=lease_id, holder=holder, create_time=utcnow())
    session.add(lease)
    session.flush()
    return lease


def delete_lease(session: Session, dataset_id: str, lease_id: str, allow_missing: bool) -> None:
    lease = session.get(DatasetLease, (dataset_id, lease_id))
    if lease is None:
        if allow_missing:
            return
        name = f"datasets/{dataset_id}/leases/{lease_id}"
        raise NotFound(f"{name} not found", metadata={"name": name})
    session.delete(lease)


def leases_page(
    session: Session, dataset_id: str, page_size: int, page_token: str
) -> Page[DatasetLease]:
    get(session, dataset_id)
    statement = select(DatasetLease).where(DatasetLease.dataset_id == dataset_id)
    return paginate(
        session,
        statement,
        [DatasetLease.create_time, DatasetLease.id],
        page_size=page_size,
        page_token=page_token,
        query=dataset_id,
    )
