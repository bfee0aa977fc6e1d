"""One TrainingService replica leads (its scheduler runs); another takes over when the leader
stops renewing, and a leader that lost its lease knows it. On the training database (SQLite and
PostgreSQL) and on a Kubernetes Lease of the real API server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from tests.kube.namespace import Kube
from tests.storage.conftest import database_url, db, postgres_server  # noqa: F401 (fixtures)
from tunefleet.runtime.settings import KubernetesSettings, TrainingSettings
from tunefleet.storage.database import Database
from tunefleet.training.leadership import (
    LEASE_NAME,
    DatabaseLeadership,
    Elected,
    KubernetesLeadership,
    LeaderRow,
)

LEASE, RENEW = 2.0, 0.5
MakeReplica = Callable[[], Elected]


async def until(check: Callable[[], bool], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def leads(replica: Elected) -> bool:
    return replica.leading


async def die(replica: Elected) -> None:
    """The replica's process is gone: it renews no more and gives nothing up."""
    assert replica._task is not None
    replica._task.cancel()
    await asyncio.gather(replica._task, return_exceptions=True)
    replica._task = None


async def play_takeover(make: MakeReplica) -> None:
    changes: dict[str, list[bool]] = {}

    async def start() -> Elected:
        replica = make()
        changes[replica.holder] = []
        await replica.start(changes[replica.holder].append)
        return replica

    first = await start()
    second = await start()
    assert first.leading and not second.leading
    await asyncio.sleep(3 * RENEW)  # the leader renews: it stays the only one
    assert first.leading and not second.leading

    died = time.monotonic()
    await die(first)
    await until(lambda: second.leading)
    # Never taken before the dead leader's lease ran out.
    assert time.monotonic() - died >= LEASE - RENEW
    assert changes[second.holder] == [True]
    # The old leader's own clock ran out before the lease did, so it had already stopped; it
    # cannot take the lease back while the new leader renews it.
    assert not leads(first)
    await first._attempt()
    assert not leads(first)
    assert changes[first.holder] == [True, False]

    # A leader that stops cleanly gives the lease up at once.
    await second.stop()
    assert not second.leading
    third = await start()
    assert third.leading
    await third.stop()


async def test_a_database_lease_moves_to_another_replica_when_its_leader_dies(
    db: Database,  # noqa: F811 (the fixture)
) -> None:
    await play_takeover(lambda: DatabaseLeadership(db, LEASE, RENEW))
    with db.read() as session:
        row = session.get(LeaderRow, LEASE_NAME)
        assert row is not None and row.term == 3  # first, second, third


@pytest.mark.kubernetes
async def test_a_kubernetes_lease_moves_to_another_replica_when_its_leader_dies(
    kube: Kube,
) -> None:
    settings = TrainingSettings(
        leader_election="kubernetes",
        worker_endpoint="tunefleet-training:50051",
        leader_lease_seconds=LEASE,
        leader_renew_seconds=RENEW,
        kubernetes=KubernetesSettings(**kube.settings()),
    )
    await play_takeover(lambda: KubernetesLeadership(settings))
    from kubernetes import client

    api = client.CoordinationV1Api(kube.core.api_client)
    lease = api.read_namespaced_lease(LEASE_NAME, kube.namespace)
    assert lease.spec.lease_transitions == 2  # to the second replica, then to the third
    assert lease.spec.lease_duration_seconds == 2
