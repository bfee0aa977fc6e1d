"""Adapter registry tables: adapters, immutable versions (with their dataset lineage), aliases and
the audit trail of alias moves."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, ForeignKeyConstraint, Integer, String, false
from sqlalchemy.orm import Mapped, Session, mapped_column

from tunefleet.core import names
from tunefleet.core.errors import NotFound
from tunefleet.storage.database import Base

TOPIC = "adapters"  # the change-feed topic of every adapter, version and alias change


class AdapterRow(Base):
    __tablename__ = "adapters"
    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    base_model: Mapped[str] = mapped_column(String(512), index=True)
    description: Mapped[str]
    labels: Mapped[dict[str, Any]]
    latest_version: Mapped[int] = mapped_column(Integer)
    create_time: Mapped[datetime]
    update_time: Mapped[datetime]


class VersionRow(Base):
    __tablename__ = "adapter_versions"
    adapter_id: Mapped[str] = mapped_column(
        ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # "adapter" or "full_model"
    description: Mapped[str]
    files: Mapped[dict[str, Any]]  # {"files": [{"path", "size_bytes", "sha256"}]}
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    config: Mapped[dict[str, Any]]
    compatibility: Mapped[dict[str, Any]]  # {"engines": [...], "notes": [...]}
    smoke_test: Mapped[dict[str, Any]]
    lineage: Mapped[dict[str, Any]]
    training_job: Mapped[str] = mapped_column(String(256), index=True)
    serving_name: Mapped[str] = mapped_column(String(128), unique=True)
    merged_from: Mapped[str] = mapped_column(String(256))
    # A quantized model: {"format", "quantized_from", "check": {top1_agreement, ...}}; {} else.
    export: Mapped[dict[str, Any]] = mapped_column(server_default="{}")
    create_time: Mapped[datetime]


class VersionDatasetRow(Base):
    """Lineage in reverse: which versions were trained on a dataset."""

    __tablename__ = "adapter_version_datasets"
    __table_args__ = (
        ForeignKeyConstraint(
            ["adapter_id", "version"],
            ["adapter_versions.adapter_id", "adapter_versions.version"],
            ondelete="CASCADE",
        ),
    )
    adapter_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset: Mapped[str] = mapped_column(String(256), primary_key=True, index=True)


class AliasRow(Base):
    __tablename__ = "adapter_aliases"
    __table_args__ = (
        ForeignKeyConstraint(
            ["adapter_id", "version"], ["adapter_versions.adapter_id", "adapter_versions.version"]
        ),
    )
    adapter_id: Mapped[str] = mapped_column(
        ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True
    )
    alias: Mapped[str] = mapped_column(String(63), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    update_time: Mapped[datetime]
    updated_by: Mapped[str] = mapped_column(String(256))
    # Its canary: `canary_percent` of its requests go to the version of alias `canary_alias`.
    canary_alias: Mapped[str | None] = mapped_column(String(63))
    canary_percent: Mapped[int] = mapped_column(Integer, server_default="0")


class AliasMoveRow(Base):
    __tablename__ = "adapter_alias_moves"
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    adapter_id: Mapped[str] = mapped_column(String(63), index=True)
    alias: Mapped[str] = mapped_column(String(63))
    from_version: Mapped[int | None] = mapped_column(Integer)
    to_version: Mapped[int | None] = mapped_column(Integer)
    time: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(256))
    reason: Mapped[str]
    revision: Mapped[int] = mapped_column(BigInteger)
    # Set for a change of the canary (the versions then unchanged): the canary after it.
    canary_changed: Mapped[bool] = mapped_column(server_default=false())
    canary_alias: Mapped[str | None] = mapped_column(String(63))
    canary_percent: Mapped[int] = mapped_column(Integer, server_default="0")


def adapter(session: Session, adapter: str) -> AdapterRow:
    row = session.get(AdapterRow, adapter)
    if row is None:
        raise NotFound(f"adapters/{adapter} not found", metadata={"name": f"adapters/{adapter}"})
    return row


def version(session: Session, ref: names.VersionRef) -> VersionRow:
    number = ref.version
    if ref.alias is not None:
        alias = session.get(AliasRow, (ref.adapter, ref.alias))
        if alias is None:
            raise NotFound(f"adapters/{ref.adapter}@{ref.alias}: no such alias")
        number = alias.version
    row = session.get(VersionRow, (ref.adapter, number))
    if row is None:
        raise NotFound(f"{names.version_name(ref.adapter, number or 0)} not found")
    return row
