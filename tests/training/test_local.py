"""The embedded default end to end: TrainingService runs the real trainer as a local process on
the tiny chat model, which reports back over gRPC and registers its adapter."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.training.conftest import Platform
from tunefleet.v1 import adapter_service_pb2, training_job_pb2, training_service_pb2

State = training_job_pb2.TrainingJob.State
MakePlatform = Any
pytestmark = pytest.mark.timeout(300)


def run_dir(platform: Platform, job: str) -> Path:
    return platform.settings.data_dir / "training" / "runs" / job.removeprefix("trainingJobs/")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/cmdline").read_bytes() != b""  # not a zombie


def group(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group."""
    members = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


async def gone(pgid: int, within: float) -> bool:
    """Whether every process of the group has ended within `within` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while group(pgid):
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def stopped_run(platform: Platform) -> tuple[str, int]:
    """A long job whose trainer reported a step, then was stopped (SIGSTOP to the trainer, not
    to the wrapper shell that started it: the shell ends on SIGTERM, the trainer does not)."""
    dataset = await platform.upload()
    job = await platform.create(dataset.name, hyperparameters={"max_steps": 100000, "epochs": 1000})
    for _ in range(1200):
        current = await platform.wait(job.name, "RUNNING", within=60)
        if current.latest_progress.step >= 1:
            break
        await asyncio.sleep(0.1)
    pgid = int(current.launcher_run_id)
    trainers = [pid for pid in group(pgid) if pid != pgid]
    assert trainers, "the trainer runs in the wrapper's process group"
    for pid in trainers:
        os.kill(pid, signal.SIGSTOP)
    return job.name, pgid


async def test_a_stopped_trainer_is_gone_within_the_grace_after_cancel(
    make_platform: MakePlatform,
) -> None:
    platform = await make_platform()
    name, pgid = await stopped_run(platform)
    await platform.training.CancelTrainingJob(
        training_service_pb2.CancelTrainingJobRequest(name=name)
    )
    job = await platform.wait(name, "CANCELLED", within=60)
    assert not job.HasField("error")
    # The launcher's grace is 10 s, then SIGKILL; a few seconds more for a busy machine.
    assert await gone(pgid, within=60), f"left running: {group(pgid)}"


async def test_a_stopped_trainer_fails_worker_silent_and_is_gone(
    make_platform: MakePlatform, platform_settings: dict[str, Any]
) -> None:
    # Long enough for a busy machine's trainer to start up and report, short for the test.
    training = {**platform_settings["training"], "worker_timeout_seconds": 10.0}
    platform = await make_platform(training=training)
    name, pgid = await stopped_run(platform)
    job = await platform.wait(name, "FAILED", within=60)
    assert job.error.reason == "WORKER_SILENT"
    assert await gone(pgid, within=60), f"left running: {group(pgid)}"


async def follow(platform: Platform, name: str) -> list[training_job_pb2.TrainingEvent]:
    """Every event of the job, following it until it ends."""
    request = training_service_pb2.StreamTrainingJobEventsRequest(name=name)
    return [event async for event in platform.training.StreamTrainingJobEvents(request)]


async def test_a_job_trains_registers_its_adapter_and_streams_events(
    make_platform: MakePlatform,
) -> None:
    platform = await make_platform()
    dataset = await platform.upload()
    job = await platform.create(dataset.name)
    assert job.launcher == "local"
    events = await asyncio.wait_for(follow(platform, job.name), 600)
    job = await platform.wait(job.name, "SUCCEEDED", "FAILED")
    log = "\n".join(e.log.text for e in events if e.HasField("log"))
    assert job.state == State.STATE_SUCCEEDED, f"{job.error}\n{log[-3000:]}"

    states = [State.Name(e.state_change.state) for e in events if e.HasField("state_change")]
    assert states == ["STATE_VALIDATING", "STATE_QUEUED", "STATE_RUNNING", "STATE_SUCCEEDED"]
    steps = [e.progress.step for e in events if e.HasField("progress")]
    assert steps == [1, 2, 3, 4, 5, 6]
    losses = [e.progress.validation_loss for e in events if e.progress.HasField("validation_loss")]
    assert len(losses) == 2 and losses[-1] < losses[0]
    assert [e.checkpoint.step for e in events if e.HasField("checkpoint")] == [3, 6]
    assert "launched on local as" in log and "tunefleet.trainer" in log  # the trainer's own log
    assert "pip install kernels" not in log  # bitsandbytes' noise about a kernel LoRA never uses
    assert job.evaluation.validation_loss < job.evaluation.base_validation_loss
    assert job.evaluation.adapter_changes_logits

    assert job.output_adapter_version == "adapters/colours/versions/1"
    version = await platform.adapters.GetAdapterVersion(
        adapter_service_pb2.GetAdapterVersionRequest(name=job.output_adapter_version)
    )
    assert version.lineage.training_job == job.name
    assert list(version.lineage.datasets) == [dataset.name]
    assert version.lineage.base_model == "colours"
    assert version.lineage.hyperparameters["lora_rank"] == 8
    checkpoints = await platform.training.ListCheckpoints(
        training_service_pb2.ListCheckpointsRequest(parent=job.name)
    )
    assert [c.step for c in checkpoints.checkpoints] == [3, 6]
    assert all(c.size_bytes > 0 for c in checkpoints.checkpoints)
    for _ in range(50):  # the scheduler counts jobs by state on its next look
        if platform.registry.get_sample_value("tunefleet_training_jobs", {"state": "succeeded"}):
            break
        await asyncio.sleep(0.1)
    assert platform.registry.get_sample_value("tunefleet_training_jobs", {"state": "succeeded"})
    assert (
        platform.registry.get_sample_value(
            "tunefleet_training_job_duration_seconds_count", {"state": "succeeded"}
        )
        == 1
    )
    # The worker token is on disk for the process only.
    assert (run_dir(platform, job.name) / "spec.json").stat().st_mode & 0o077 == 0


async def test_cancel_stops_the_trainer_process(make_platform: MakePlatform) -> None:
    platform = await make_platform()
    dataset = await platform.upload()
    job = await platform.create(dataset.name, hyperparameters={"max_steps": 100000, "epochs": 1000})
    job = await platform.wait(job.name, "RUNNING", within=60)
    pid = int(job.launcher_run_id)
    assert alive(pid)
    cancelling = await platform.training.CancelTrainingJob(
        training_service_pb2.CancelTrainingJobRequest(name=job.name)
    )
    assert cancelling.state == State.STATE_CANCELLING
    job = await platform.wait(job.name, "CANCELLED", within=60)
    assert not alive(pid)
    assert not job.HasField("error")


@pytest.mark.timeout(900)  # bounds for a busy machine, not claims
async def test_a_restart_in_the_middle_of_a_run_loses_and_repeats_nothing(
    make_platform: MakePlatform,
) -> None:
    platform = await make_platform()
    dataset = await platform.upload()
    job = await platform.create(
        # Long enough (several seconds on a fast machine) to be running across the restart.
        dataset.name,
        hyperparameters={"max_steps": 800, "epochs": 100, "eval_every_steps": 400},
    )
    await platform.wait(job.name, "RUNNING", within=60)
    for _ in range(600):  # until the trainer reports steps
        current = await platform.wait(job.name, "RUNNING")
        if current.latest_progress.step >= 2:
            break
        await asyncio.sleep(0.1)
    pid = int(current.launcher_run_id)
    assert current.latest_progress.step < 800
    port = platform.server.port
    await platform.stop()
    assert alive(pid)  # the run does not depend on the service
    await asyncio.sleep(1.0)

    await platform.start(port=port)  # the worker's reports reach the new process
    job = await platform.wait(job.name, "RUNNING", "SUCCEEDED", within=120)
    assert job.launcher_run_id == str(pid)
    events = await asyncio.wait_for(follow(platform, job.name), 600)
    job = await platform.wait(job.name, "SUCCEEDED", "FAILED")
    assert job.state == State.STATE_SUCCEEDED, job.error
    assert job.output_adapter_version == "adapters/colours/versions/1"
    launches = [e for e in events if e.log.text.startswith("launched on local")]
    assert len(launches) == 1
    steps = [e.progress.step for e in events if e.HasField("progress")]
    assert steps == sorted(steps) and steps[-1] == 800
    assert steps[-1] > current.latest_progress.step  # reports kept coming after the restart
    # Reports made while the service was down were delivered when it came back: none is lost
    # (one the old process recorded but could not answer may come twice).
    assert sorted(set(steps)) == list(range(1, 801))
    checkpoints = await platform.training.ListCheckpoints(
        training_service_pb2.ListCheckpointsRequest(parent=job.name)
    )
    assert [c.step for c in checkpoints.checkpoints] == [400, 800]
