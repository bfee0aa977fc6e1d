"""A training job keeps its datasets from being deleted through DatasetService's leases, which
TrainingService takes and deletes over gRPC: taken when the job is created, deleted when it ends,
and neither lost nor leaked when TrainingService stops between its own commit and the call."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import text

from tests.training.conftest import Platform, colour_records
from tests.training.fakes import FakeLauncher
from tunefleet.datasets.store import DatasetLease, DatasetRow
from tunefleet.storage.database import Database, utcnow
from tunefleet.training import store
from tunefleet.v1 import dataset_service_pb2, training_service_pb2

Worker = training_service_pb2.ReportTrainingProgressRequest
MakePlatform = Any


async def leases(platform: Platform, dataset: str) -> dict[str, str]:
    """The leases on `dataset`: lease name → holder."""
    page = await platform.datasets.ListDatasetLeases(
        dataset_service_pb2.ListDatasetLeasesRequest(parent=dataset)
    )
    return {lease.name: lease.holder for lease in page.leases}


async def wait_for_leases(
    platform: Platform, dataset: str, expected: dict[str, str]
) -> dict[str, str]:
    """Poll until the leases on `dataset` are `expected` (TrainingService moves them after its
    own commit, so they follow the job's state)."""
    for _ in range(600):
        found = await leases(platform, dataset)
        if found == expected:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"leases on {dataset}: {found}, not {expected}")


def lease_of(job: str, dataset: str) -> dict[str, str]:
    return {f"{dataset}/leases/job-{job.removeprefix('trainingJobs/')}": job}


async def test_a_job_leases_its_datasets_until_it_ends(make_platform: MakePlatform) -> None:
    platform = await make_platform(FakeLauncher())
    train = await platform.upload()
    validation = await platform.upload(colour_records(train=0, validation=20, seed=3))
    job = await platform.create(train.name, validation_dataset=validation.name)
    # Leased when CreateTrainingJob answers.
    assert await leases(platform, train.name) == lease_of(job.name, train.name)
    assert await leases(platform, validation.name) == lease_of(job.name, validation.name)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await platform.datasets.DeleteDataset(
            dataset_service_pb2.DeleteDatasetRequest(name=train.name)
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert job.name in (refused.value.details() or "")

    await platform.wait(job.name, "RUNNING")
    await platform.training.CancelTrainingJob(
        training_service_pb2.CancelTrainingJobRequest(name=job.name)
    )
    await platform.wait(job.name, "CANCELLED")
    for dataset in (train.name, validation.name):
        await wait_for_leases(platform, dataset, {})
        await platform.datasets.DeleteDataset(
            dataset_service_pb2.DeleteDatasetRequest(name=dataset)
        )


def crash_state(platform: Platform, job: str, lease_state: str, dataset: str) -> None:
    """Set a job's lease state and make DatasetService's lease of it on `dataset` match what the
    service would have left had it stopped mid-way (held: the lease exists; wanted: it does
    not), straight in the databases."""
    job_id, dataset_id = store.job_id(job), dataset.removeprefix("datasets/")
    with platform.storage.database.session() as session:
        row = session.get(store.JobRow, job_id)
        assert row is not None
        row.lease_state = lease_state
        lease = session.get(DatasetLease, (dataset_id, f"job-{job_id}"))
        if lease_state == store.LEASES_WANTED and lease is not None:
            session.delete(lease)
        elif lease_state == store.LEASES_HELD and lease is None:
            session.add(
                DatasetLease(
                    dataset_id=dataset_id,
                    id=f"job-{job_id}",
                    holder=job,
                    create_time=utcnow(),
                )
            )


async def test_leases_are_neither_lost_nor_leaked_when_the_service_stops_mid_way(
    make_platform: MakePlatform,
) -> None:
    """What a TrainingService killed between its commit and its call to DatasetService leaves:
    a job stored but not yet leased, and a job ended whose leases were not yet deleted. The
    restarted service finishes both."""
    fake = FakeLauncher()
    platform = await make_platform(fake, training={"poll_seconds": 0.1, "max_running_jobs": 1})
    dataset = await platform.upload()
    running = await platform.create(dataset.name)
    await platform.wait(running.name, "RUNNING")
    unleased = await platform.create(dataset.name)  # QUEUED behind `running`
    ended = await platform.create(dataset.name)
    await platform.training.CancelTrainingJob(
        training_service_pb2.CancelTrainingJobRequest(name=ended.name)
    )
    await platform.wait(ended.name, "CANCELLED")
    both = lease_of(running.name, dataset.name) | lease_of(unleased.name, dataset.name)
    await wait_for_leases(platform, dataset.name, both)
    await platform.stop()
    crash_state(platform, unleased.name, store.LEASES_WANTED, dataset.name)
    crash_state(platform, ended.name, store.LEASES_HELD, dataset.name)

    await platform.start()
    await wait_for_leases(platform, dataset.name, both)
    run = fake.runs[store.job_id(running.name)]
    await platform.report(running.name, run.token, worker_state=Worker.WORKER_STATE_SUCCEEDED)
    await platform.wait(unleased.name, "RUNNING")


async def test_a_dataset_deleted_before_the_lease_fails_the_job(
    make_platform: MakePlatform,
) -> None:
    fake = FakeLauncher()
    platform = await make_platform(fake, training={"poll_seconds": 0.1, "max_running_jobs": 1})
    other = await platform.upload(colour_records(seed=5))
    running = await platform.create(other.name)
    await platform.wait(running.name, "RUNNING")
    dataset = await platform.upload()
    queued = await platform.create(dataset.name)
    await platform.stop()
    # Stopped after storing the job and before leasing; meanwhile the dataset went.
    crash_state(platform, queued.name, store.LEASES_WANTED, dataset.name)
    with platform.storage.database.session() as session:
        session.delete(session.get(DatasetRow, dataset.name.removeprefix("datasets/")))

    await platform.start()
    job = await platform.wait(queued.name, "FAILED")
    assert job.error.reason == "DATASET_DELETED"
    assert dataset.name in job.error.message
    assert store.job_id(queued.name) not in fake.runs  # never launched


async def test_one_process_with_a_database_per_service(
    make_platform: MakePlatform, tmp_path: Path
) -> None:
    """The embedded shape with `storage.databases`: each service's rows land in its own
    database and none in the shared one, while a job leases, trains and ends as usual."""
    urls = {
        key: f"sqlite:///{tmp_path / f'{key}.db'}" for key in ("datasets", "training", "adapters")
    }
    fake = FakeLauncher()
    platform = await make_platform(fake, storage={"databases": urls})
    dataset = await platform.upload()
    job = await platform.create(dataset.name)
    await platform.wait(job.name, "RUNNING")
    run = fake.runs[store.job_id(job.name)]
    await platform.report(job.name, run.token, worker_state=Worker.WORKER_STATE_FAILED)
    await platform.wait(job.name, "FAILED")
    await wait_for_leases(platform, dataset.name, {})

    def tables(database: Database) -> set[str]:
        with database.read() as session:
            return {
                table
                for table in ("datasets", "training_jobs", "adapters")
                if session.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
            }

    storage = platform.storage
    assert tables(storage.database_for("datasets")) == {"datasets"}
    assert tables(storage.database_for("training")) == {"training_jobs"}
    assert tables(storage.database_for("adapters")) == {"adapters"}
    assert tables(storage.database) == set()
