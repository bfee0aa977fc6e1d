"""Retraining policies and runs: the `retraining_policies` and `retraining_runs` tables.

Each is stored as the JSON of its message (`document`), with the columns that queries need
copied out of it: a policy's adapter (one policy per adapter), a run's policy, state and
creation time.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from google.protobuf import json_format
from sqlalchemy import ForeignKey, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from tunefleet.core.errors import InvalidArgument, NotFound
from tunefleet.storage.database import Base
from tunefleet.storage.pagination import Page, paginate
from tunefleet.v1 import retraining_pb2

RetrainingRun = retraining_pb2.RetrainingRun
State = RetrainingRun.State
TERMINAL = {State.STATE_SUCCEEDED, State.STATE_FAILED, State.STATE_CANCELLED}
ID = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class PolicyRow(Base):
    __tablename__ = "retraining_policies"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    adapter: Mapped[str] = mapped_column(String(128), unique=True)  # adapters/{adapter}
    document: Mapped[dict[str, Any]]
    create_time: Mapped[datetime] = mapped_column(index=True)

    def policy(self) -> retraining_pb2.RetrainingPolicy:
        return json_format.ParseDict(self.document, retraining_pb2.RetrainingPolicy())

    def store(self, policy: retraining_pb2.RetrainingPolicy) -> None:
        self.document = json_format.MessageToDict(policy, preserving_proto_field_name=True)
        self.adapter = policy.adapter


class RunRow(Base):
    __tablename__ = "retraining_runs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    policy_id: Mapped[str] = mapped_column(
        ForeignKey("retraining_policies.id", ondelete="CASCADE"), index=True
    )
    state: Mapped[str] = mapped_column(String(24), index=True)  # the State name without STATE_
    document: Mapped[dict[str, Any]]
    create_time: Mapped[datetime] = mapped_column(index=True)

    def run(self) -> retraining_pb2.RetrainingRun:
        return json_format.ParseDict(self.document, RetrainingRun())

    def store(self, run: retraining_pb2.RetrainingRun) -> None:
        self.document = json_format.MessageToDict(run, preserving_proto_field_name=True)
        self.state = State.Name(run.state).removeprefix("STATE_")


def policy_id(name: str, field: str = "name") -> str:
    policy = name.removeprefix("retrainingPolicies/")
    if not name.startswith("retrainingPolicies/") or not ID.fullmatch(policy):
        raise InvalidArgument(field, f"{name!r} is not retrainingPolicies/{{policy}}")
    return policy


def run_id(name: str, field: str = "name") -> tuple[str, str]:
    """The policy and run ids of `retrainingPolicies/{policy}/runs/{run}`."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "retrainingPolicies" or parts[2] != "runs" or not parts[3]:
        raise InvalidArgument(field, f"{name!r} is not retrainingPolicies/{{policy}}/runs/{{run}}")
    return policy_id("/".join(parts[:2]), field), parts[3]


def get_policy(session: Session, policy: str, for_update: bool = False) -> PolicyRow:
    row = session.get(PolicyRow, policy, with_for_update=for_update)
    if row is None:
        name = f"retrainingPolicies/{policy}"
        raise NotFound(f"{name} not found", metadata={"name": name})
    return row


def get_run(session: Session, name: str, field: str = "name", for_update: bool = False) -> RunRow:
    policy, run = run_id(name, field)
    row = session.get(RunRow, run, with_for_update=for_update)
    if row is None or row.policy_id != policy:
        raise NotFound(f"{name} not found", metadata={"name": name})
    return row


def policies_page(session: Session, page_size: int, page_token: str) -> Page[PolicyRow]:
    return paginate(
        session,
        select(PolicyRow),
        [PolicyRow.create_time, PolicyRow.id],
        page_size=page_size,
        page_token=page_token,
        descending=True,
    )


def runs_page(session: Session, policy: str, page_size: int, page_token: str) -> Page[RunRow]:
    get_policy(session, policy)
    return paginate(
        session,
        select(RunRow).where(RunRow.policy_id == policy),
        [RunRow.create_time, RunRow.id],
        page_size=page_size,
        page_token=page_token,
        query=policy,
        descending=True,
    )


def _ended() -> list[str]:
    return [State.Name(s).removeprefix("STATE_") for s in TERMINAL]


def active_run(session: Session, policy: str) -> RunRow | None:
    """The policy's run in progress, if any."""
    return session.scalars(
        select(RunRow).where(RunRow.policy_id == policy, RunRow.state.not_in(_ended()))
    ).first()


def unfinished(session: Session) -> list[RunRow]:
    return list(
        session.scalars(
            select(RunRow).where(RunRow.state.not_in(_ended())).order_by(RunRow.create_time)
        )
    )


def runs(session: Session, policy: str) -> list[RunRow]:
    """The policy's runs, newest first."""
    return list(
        session.scalars(
            select(RunRow)
            .where(RunRow.policy_id == policy)
            .order_by(RunRow.create_time.desc(), RunRow.id.desc())
        )
    )


def policy_of(session: Session, adapter: str) -> PolicyRow | None:
    """The policy that retrains `adapter`, if any."""
    return session.scalars(select(PolicyRow).where(PolicyRow.adapter == adapter)).first()


def all_policies(session: Session) -> list[PolicyRow]:
    return list(session.scalars(select(PolicyRow).order_by(PolicyRow.create_time)))
