"""Which TrainingService replica schedules (`training.leader_election`).

Every replica serves the API: reads, event streams (which poll the database), job creation,
cancellation and workers' reports are all database writes any replica can make. Launching,
following runs, failing silent workers and moving dataset leases are the scheduler's, and only
the leader's scheduler ticks.

The leader holds a lease for `leader_lease_seconds` and renews it every `leader_renew_seconds`:
a row of the training database (`database`: any shape whose replicas share that database), or a
`coordination.k8s.io/v1` Lease (`kubernetes`). A replica takes a lease that is free or expired.
The holder counts itself leader only until one renewal interval before its lease would expire,
by its own monotonic clock from when it last wrote it, so it stops acting before another
replica can take over; a replica that stops cleanly gives the lease up at once. Every launch is
idempotent besides (a run's name derives from its job, and the launch is recorded under the
job's row lock first), so even two schedulers in a clock-skewed moment start one run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Integer, String
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from tunefleet.core.tasks import cancel
from tunefleet.runtime.settings import TrainingSettings
from tunefleet.storage.database import Base, Database, utcnow

log = logging.getLogger(__name__)
LEASE_NAME = "tunefleet-training-leader"


class LeaderRow(Base):
    __tablename__ = "training_leader"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    term: Mapped[int] = mapped_column(Integer)  # how many times the lease changed hands
    expires_at: Mapped[datetime]


def identity() -> str:
    """This replica: its Pod (or host) name, process and a random part."""
    host = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{host}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


class Leadership:
    """Always the leader: one replica (`leader_election: none`)."""

    holder = "this replica"

    @property
    def leading(self) -> bool:
        return True

    async def start(self, changed: Callable[[bool], None]) -> None:
        changed(True)

    async def stop(self) -> None:
        return None


class Elected(Leadership):
    """Leader while its lease holds; `_take` and `_give_up` are the backend's."""

    def __init__(self, lease_seconds: float, renew_seconds: float) -> None:
        self.holder = identity()
        self.lease_seconds, self.renew_seconds = lease_seconds, renew_seconds
        self._until = 0.0  # monotonic time until which this replica acts as leader
        self._was = False
        self._task: asyncio.Task[None] | None = None
        self._changed: Callable[[bool], None] = lambda _: None

    @property
    def leading(self) -> bool:
        return time.monotonic() < self._until

    async def start(self, changed: Callable[[bool], None]) -> None:
        self._changed = changed
        await self._attempt()
        self._task = asyncio.create_task(self._renew_forever(), name="training-leadership")

    async def _attempt(self) -> None:
        began = time.monotonic()
        try:
            held = await asyncio.to_thread(self._take)
        except Exception as error:  # the database or API server unreachable: not the leader
            log.warning("cannot take or renew the training leader lease: %s", error)
            held = False
        if held:
            self._until = began + self.lease_seconds - self.renew_seconds
        leading = self.leading
        if leading != self._was:
            self._was = leading
            log.info(
                "%s %s the training scheduler's leader",
                self.holder,
                "is now" if leading else "is no longer",
            )
            self._changed(leading)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.renew_seconds)
            await self._attempt()

    async def stop(self) -> None:
        if self._task is not None:
            await cancel(self._task)
            self._task = None
        if self._until:
            self._until = 0.0
            try:
                await asyncio.to_thread(self._give_up)
            except Exception as error:
                log.warning("cannot give up the training leader lease: %s", error)

    def _take(self) -> bool:
        raise NotImplementedError

    def _give_up(self) -> None:
        raise NotImplementedError


class DatabaseLeadership(Elected):
    """The lease is a row of the training database, taken under its row lock."""

    def __init__(self, db: Database, lease_seconds: float, renew_seconds: float) -> None:
        super().__init__(lease_seconds, renew_seconds)
        self.db = db

    def _take(self) -> bool:
        now = utcnow()
        expires = now + timedelta(seconds=self.lease_seconds)
        try:
            with self.db.session() as session:
                row = session.get(LeaderRow, LEASE_NAME, with_for_update=True)
                if row is None:
                    session.add(
                        LeaderRow(name=LEASE_NAME, holder=self.holder, term=1, expires_at=expires)
                    )
                    return True
                if row.holder != self.holder and row.expires_at > now:
                    return False
                if row.holder != self.holder:
                    row.holder, row.term = self.holder, row.term + 1
                row.expires_at = expires
                return True
        except IntegrityError:  # another replica inserted the row first
            return False

    def _give_up(self) -> None:
        with self.db.session() as session:
            row = session.get(LeaderRow, LEASE_NAME, with_for_update=True)
            if row is not None and row.holder == self.holder:
                row.expires_at = utcnow() - timedelta(seconds=1)


class KubernetesLeadership(Elected):
    """The lease is a coordination.k8s.io/v1 Lease in the training namespace, written with the
    resource version it was read at (a concurrent writer gets 409 Conflict and loses)."""

    def __init__(self, settings: TrainingSettings) -> None:
        super().__init__(settings.leader_lease_seconds, settings.leader_renew_seconds)
        self.kubernetes = settings.kubernetes
        self.namespace = settings.kubernetes.namespace
        self._api: Any = None

    def _coordination(self) -> Any:
        from kubernetes import client

        from tunefleet.training.kubernetes import api_client

        if self._api is None:
            self._api = client.CoordinationV1Api(api_client(self.kubernetes))
        return self._api

    def _take(self) -> bool:
        from kubernetes.client.exceptions import ApiException

        api = self._coordination()
        now = datetime.now(UTC)
        try:
            lease = api.read_namespaced_lease(LEASE_NAME, self.namespace)
        except ApiException as error:
            if error.status != 404:
                raise
            body = {
                "metadata": {"name": LEASE_NAME},
                "spec": self._spec(now, now, transitions=0),
            }
            try:
                api.create_namespaced_lease(self.namespace, body)
            except ApiException as conflict:
                if conflict.status == 409:
                    return False
                raise
            return True
        spec = lease.spec
        renewed = spec.renew_time or spec.acquire_time
        duration = timedelta(seconds=spec.lease_duration_seconds or 0)
        mine = spec.holder_identity == self.holder
        if not mine and spec.holder_identity and renewed and renewed + duration > now:
            return False
        transitions = (spec.lease_transitions or 0) + (0 if mine else 1)
        acquired = spec.acquire_time if mine and spec.acquire_time else now
        lease.spec = self._spec(acquired, now, transitions)
        try:
            api.replace_namespaced_lease(LEASE_NAME, self.namespace, lease)
        except ApiException as error:
            if error.status == 409:
                return False
            raise
        return True

    def _spec(self, acquired: datetime, renewed: datetime, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": max(1, round(self.lease_seconds)),
            "acquireTime": _micro(acquired),
            "renewTime": _micro(renewed),
            "leaseTransitions": transitions,
        }

    def _give_up(self) -> None:
        api = self._coordination()
        lease = api.read_namespaced_lease(LEASE_NAME, self.namespace)
        if lease.spec.holder_identity == self.holder:
            lease.spec.holder_identity = None
            api.replace_namespaced_lease(LEASE_NAME, self.namespace, lease)


def _micro(instant: datetime) -> str:
    """A MicroTime as the API server takes it."""
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def for_settings(settings: TrainingSettings, db: Database) -> Leadership:
    if settings.leader_election == "database":
        return DatabaseLeadership(db, settings.leader_lease_seconds, settings.leader_renew_seconds)
    if settings.leader_election == "kubernetes":
        return KubernetesLeadership(settings)
    return Leadership()
