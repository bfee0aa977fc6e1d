"""TrainingService through a real gRPC server, with a fake launcher standing in for where runs
execute (the local and Kubernetes launchers have their own tests)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.helpers import error_info
from tests.training.conftest import colour_pairs, job_request, lora_adapter, stored_request
from tests.training.fakes import FakeLauncher
from tunefleet.trainer.storage import upload_checkpoint
from tunefleet.training.launcher import LogLine, Phase
from tunefleet.v1 import (
    adapter_service_pb2,
    common_pb2,
    dataset_pb2,
    dataset_service_pb2,
    training_job_pb2,
    training_service_pb2,
)

State = training_job_pb2.TrainingJob.State
Worker = training_service_pb2.ReportTrainingProgressRequest
MakePlatform = Any


def states(events: list[training_job_pb2.TrainingEvent]) -> list[str]:
    return [
        State.Name(e.state_change.state).removeprefix("STATE_")
        for e in events
        if e.HasField("state_change")
    ]


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


async def test_a_job_runs_reports_and_succeeds(make_platform: MakePlatform) -> None:
    fake = FakeLauncher()
    platform = await make_platform(fake)
    dataset = await platform.upload()
    job = await platform.create(dataset.name, labels={"team": "ml"})
    assert job.name.startswith("trainingJobs/")
    assert job.launcher == "fake"
    assert job.hyperparameters.micro_batch_size == 8
    assert job.hyperparameters.warmup_ratio == pytest.approx(0.05)  # a default, reported back
    assert job.resource_estimate.model_parameters > 0
    job = await platform.wait(job.name, "RUNNING")
    assert job.launcher_run_id == f"fake-{job.name.removeprefix('trainingJobs/')}"
    run = fake.runs[job.name.removeprefix("trainingJobs/")]
    spec = run.request.spec
    assert spec["train_data"]["split"] == "train"
    assert spec["validation_data"]["split"] == "validation"
    assert spec["registry"]["adapter"] == "adapters/colours"
    assert spec["storage"]["database_url"] == "" and spec["storage"]["databases"] == {}

    token = run.token
    await platform.report(job.name, token, worker_state=Worker.WORKER_STATE_RUNNING)
    for step in (1, 2, 3):
        await platform.report(
            job.name,
            token,
            progress=training_job_pb2.TrainingProgress(
                step=step, total_steps=3, train_loss=3.0 - step, tokens_per_second=100.0
            ),
        )
    await platform.report(
        job.name,
        token,
        checkpoint=training_job_pb2.Checkpoint(step=3, uri="s3://b/x", validation_loss=0.5),
    )
    run.lines.append(LogLine("stderr", "step 3 done"))
    for _ in range(100):  # the scheduler reads the run's new lines on its next look
        if any(e.log.text == "step 3 done" for e in await platform.events(job.name)):
            break
        await asyncio.sleep(0.05)
    await platform.report(
        job.name,
        token,
        worker_state=Worker.WORKER_STATE_SUCCEEDED,
        output_adapter_version="adapters/colours/versions/1",
        evaluation=training_job_pb2.EvaluationResult(validation_loss=0.5, base_validation_loss=4),
    )
    job = await platform.wait(job.name, "SUCCEEDED")
    assert job.output_adapter_version == "adapters/colours/versions/1"
    assert job.latest_progress.step == 3
    assert job.evaluation.base_validation_loss == 4
    assert [State.Name(t.state) for t in job.state_history] == [
        "STATE_VALIDATING",
        "STATE_QUEUED",
        "STATE_RUNNING",
        "STATE_SUCCEEDED",
    ]
    assert job.HasField("start_time") and job.HasField("end_time")
    assert fake.runs[job.name.removeprefix("trainingJobs/")].resume_from == "s3://b/x"

    events = await platform.events(job.name)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert states(events) == ["VALIDATING", "QUEUED", "RUNNING", "SUCCEEDED"]
    assert [e.progress.step for e in events if e.HasField("progress")] == [1, 2, 3]
    assert [e.checkpoint.name for e in events if e.HasField("checkpoint")] == [
        f"{job.name}/checkpoints/3"
    ]
    logs = [e.log.text for e in events if e.HasField("log")]
    assert logs == ["launched on fake as " + job.launcher_run_id, "step 3 done"]
    assert [e.log.stream for e in events if e.HasField("log")] == ["launcher", "stderr"]
    # Resuming after an event sends only what follows it.
    later = await platform.events(job.name, after=events[4].sequence)
    assert [e.sequence for e in later] == [e.sequence for e in events[5:]]

    checkpoints = await platform.training.ListCheckpoints(
        training_service_pb2.ListCheckpointsRequest(parent=job.name)
    )
    assert [(c.step, c.uri, c.validation_loss) for c in checkpoints.checkpoints] == [
        (3, "s3://b/x", 0.5)
    ]
    listed = await platform.training.ListTrainingJobs(
        training_service_pb2.ListTrainingJobsRequest(filter="state = SUCCEEDED")
    )
    assert [j.name for j in listed.training_jobs] == [job.name]
    listed = await platform.training.ListTrainingJobs(
        training_service_pb2.ListTrainingJobsRequest(filter='adapter = "adapters/other"')
    )
    assert not listed.training_jobs
    # The adapter named by the job was created for it, on the job's base model.
    adapter = await platform.adapters.GetAdapter(
        adapter_service_pb2.GetAdapterRequest(name="adapters/colours")
    )
    assert adapter.base_model == "colours"


async def test_a_follower_sees_events_as_they_happen(make_platform: MakePlatform) -> None:
    fake = FakeLauncher()
    platform = await make_platform(fake)
    dataset = await platform.upload()
    job = await platform.create(dataset.name)
    request = training_service_pb2.StreamTrainingJobEventsRequest(name=job.name)
    seen: list[training_job_pb2.TrainingEvent] = []

    async def follow() -> None:
        async for event in platform.training.StreamTrainingJobEvents(request):
            seen.append(event)

    follower = asyncio.create_task(follow())
    job = await platform.wait(job.name, "RUNNING")
    fake.runs[job.name.removeprefix("trainingJobs/")].lines.append(LogLine("stdout", "hello"))
    await platform.report(
        job.name,
        fake.runs[job.name.removeprefix("trainingJobs/")].token,
        worker_state=Worker.WORKER_STATE_FAILED,
        error=training_job_pb2.JobError(reason="OUT_OF_MEMORY", message="CUDA out of memory"),
    )
    await asyncio.wait_for(follower, 10)  # the stream ends with the job
    assert states(seen)[-1] == "FAILED"
    assert [e.error.reason for e in seen if e.HasField("error")] == ["OUT_OF_MEMORY"]
    job = await platform.wait(job.name, "FAILED")
    assert job.error.message == "CUDA out of memory"
    assert fake.runs == {}  # a failed worker's run is stopped: no retries


async def test_create_is_idempotent_with_a_request_id(make_platform: MakePlatform) -> None:
    fake = FakeLauncher()
    platform = await make_platform(fake)
    dataset = await platform.upload()
    request_id = "8a1c2f63-4c4f-4d55-9a57-0d5b5e0f6f11"
    first = await platform.create(dataset.name, request_id=request_id)
    again = await platform.create(dataset.name, request_id=request_id)
    assert again.name == first.name
    listed = await platform.training.ListTrainingJobs(
        training_service_pb2.ListTrainingJobsRequest()
    )
    assert len(listed.training_jobs) == 1
    error = await refused(platform.create(dataset.name, request_id=request_id, priority=3))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).reason == "REQUEST_ID_REUSED"  # type: ignore[union-attr]
    await platform.wait(first.name, "RUNNING")
    assert fake.launches == 1


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"base_model": ""}, "training_job.base_model"),
        ({"base_model": "no-such-model"}, "training_job.base_model"),
        ({"method": common_pb2.TRAINING_METHOD_UNSPECIFIED}, "training_job.method"),
        ({"train_dataset": "datasets/missing"}, "training_job.train_dataset"),
        ({"train_dataset": "colours"}, "training_job.train_dataset"),
        ({"adapter": "Adapters/Bad"}, "training_job.adapter"),
        (
            {"hyperparameters": {"micro_batch_size": -1}},
            "training_job.hyperparameters.micro_batch_size",
        ),
        ({"hyperparameters": {"learning_rate": 5.0}}, "training_job.hyperparameters.learning_rate"),
        ({"lora": {"rank": 1024}}, "training_job.lora.rank"),
        (
            {"resources": training_job_pb2.ResourceRequest(gpu_count=99)},
            "training_job.resources.gpu_count",
        ),
        (
            {"resources": training_job_pb2.ResourceRequest(gpu_count=1, gpu_type="tpu-v9")},
            "training_job.resources.gpu_type",
        ),
        (
            {"resources": training_job_pb2.ResourceRequest(node_count=-1)},
            "training_job.resources.node_count",
        ),
        (
            {"resources": training_job_pb2.ResourceRequest(node_count=17)},
            "training_job.resources.node_count",
        ),
    ],
)
async def test_bad_jobs_are_refused_naming_the_field(
    make_platform: MakePlatform, fields: dict[str, Any], field: str
) -> None:
    platform = await make_platform(FakeLauncher())
    dataset = await platform.upload()
    error = await refused(platform.create(fields.pop("train_dataset", dataset.name), **fields))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith(field)
    listed = await platform.training.ListTrainingJobs(
        training_service_pb2.ListTrainingJobsRequest()
    )
    assert not listed.training_jobs


async def test_the_local_launcher_refuses_a_job_of_several_nodes(
    make_platform: MakePlatform,
) -> None:
    platform = await make_platform(FakeLauncher())
    dataset = await platform.upload()
    nodes = training_job_pb2.ResourceRequest(node_count=2)
    error = await refused(platform.create(dataset.name, resources=nodes))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(error).reason == "ONE_NODE_ONLY"  # type: ignore[union-attr]
    assert (error.details() or "").startswith("training_job.resources.node_count")


async def test_each_objective_refuses_the_other_kinds_data(
    make_platform: MakePlatform,
) -> None:
    """A DPO file uploaded as it is becomes a preference dataset: an SFT job refuses it, never
    reading it as conversations; a DPO job refuses conversations and unpaired (KTO) answers."""
    platform = await make_platform(FakeLauncher())
    pairs = await platform.upload(colour_pairs(20))
    assert pairs.kind == dataset_pb2.DATASET_KIND_PREFERENCE
    unpaired = await platform.upload(
        b"".join(
            json.dumps(
                {"prompt": f"colour {i}?", "completion": "Red.", "label": i % 2 == 0}
            ).encode()
            + b"\n"
            for i in range(20)
        )
    )
    assert unpaired.kind == dataset_pb2.DATASET_KIND_UNPAIRED_PREFERENCE
    conversations = await platform.upload()
    dpo = {"objective": training_job_pb2.TRAINING_OBJECTIVE_DPO}
    for dataset, fields, field in (
        (pairs.name, {}, "training_job.train_dataset"),
        (conversations.name, dpo, "training_job.train_dataset"),
        (unpaired.name, dpo, "training_job.train_dataset"),
        (
            pairs.name,
            {**dpo, "validation_dataset": conversations.name},
            "training_job.validation_dataset",
        ),
    ):
        error = await refused(platform.create(dataset, **fields))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = error_info(error)
        assert info is not None and info.reason == "DATASET_KIND_MISMATCH", error.details()
        assert (error.details() or "").startswith(field)
    for fields, field in (
        ({"method": common_pb2.TRAINING_METHOD_FULL}, "training_job.objective"),
        ({"hyperparameters": {"packing": True}}, "training_job.hyperparameters.packing"),
        ({"dpo": training_job_pb2.DpoConfig(beta=-1)}, "training_job.dpo.beta"),
    ):
        error = await refused(platform.create(pairs.name, **dpo, **fields))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (error.details() or "").startswith(field), error.details()
    listed = await platform.training.ListTrainingJobs(
        training_service_pb2.ListTrainingJobsRequest()
    )
    assert not listed.training_jobs
    # Accepted, a DPO job reports its objective and beta back, and DPO's learning rate.
    job = await platform.create(pairs.name, **dpo, hyperparameters={"learning_rate": None})
    assert job.objective == training_job_pb2.TRAINING_OBJECTIVE_DPO
    assert job.dpo.beta == pytest.approx(0.1) and job.hyperparameters.learning_rate == 5e-6
    sft = await platform.create(conversations.name)
    assert sft.objective == training_job_pb2.TRAINING_OBJECTIVE_SFT and not sft.HasField("dpo")


async def test_tool_call_data_is_refused_for_a_template_that_cannot_render_calls(
    make_platform: MakePlatform,
) -> None:
    """The test model's template writes only roles and contents (tests/trainer shows a template
    that renders calls training on them)."""
    from tests.datasets.test_tools import openai_record

    platform = await make_platform(FakeLauncher())
    data = b"".join(json.dumps(openai_record(f"city {i}")).encode() + b"\n" for i in range(20))
    dataset = await platform.upload(data)
    assert dataset.validation_report.tool_call_records == 20
    error = await refused(platform.create(dataset.name))
    info = error_info(error)
    assert info is not None and info.reason == "TOOL_CALLS_NOT_RENDERED"


async def test_an_oversized_job_is_refused_with_the_numbers(make_platform: MakePlatform) -> None:
    platform = await make_platform(FakeLauncher())
    dataset = await platform.upload()
    full = {
        "base_model": "llama-7b",
        "adapter": "adapters/big",
        "method": common_pb2.TRAINING_METHOD_FULL,
        "hyperparameters": {"micro_batch_size": 1, "max_sequence_length": 2048},
        "resources": training_job_pb2.ResourceRequest(gpu_count=1, gpu_type="nvidia-a100-80gb"),
    }
    error = await refused(platform.create(dataset.name, **full))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(error)
    assert info is not None and info.reason == "INSUFFICIENT_GPU_MEMORY"
    estimated, available = (
        int(info.metadata["estimated_bytes"]),
        int(info.metadata["available_bytes"]),
    )
    assert available == 80 * 2**30
    assert estimated > 16 * 6.7e9  # 16 bytes per parameter for full fine-tuning
    assert "6.74B parameters x 16 bytes (full)" in (error.details() or "")
    # The same model with QLoRA fits on one 24 GiB GPU (validate_only: nothing is created).
    qlora = {**full, "method": common_pb2.TRAINING_METHOD_QLORA}
    qlora["resources"] = training_job_pb2.ResourceRequest(gpu_count=1, gpu_type="nvidia-l4")
    checked = await platform.training.CreateTrainingJob(
        training_service_pb2.CreateTrainingJobRequest(
            training_job=job_request(dataset.name, **qlora), validate_only=True
        )
    )
    assert checked.name == ""
    assert 3.4e9 < checked.resource_estimate.gpu_memory_bytes < 24 * 2**30
    listed = await platform.training.ListTrainingJobs(
        training_service_pb2.ListTrainingJobsRequest()
    )
    assert not listed.training_jobs


async def test_fsdp_divides_the_model_state_by_the_gpus_and_needs_two(
    make_platform: MakePlatform,
) -> None:
    """Full fine-tuning of a 7B model does not fit one 80 GiB GPU, nor eight that each hold a
    whole copy; sharded across those eight (FSDP) it does, and the estimate says so."""
    platform = await make_platform(FakeLauncher(), training={"local_gpus": 8})
    dataset = await platform.upload()
    eight = training_job_pb2.ResourceRequest(gpu_count=8, gpu_type="nvidia-a100-80gb")
    full = {
        "base_model": "llama-7b",
        "adapter": "adapters/big",
        "method": common_pb2.TRAINING_METHOD_FULL,
        "hyperparameters": {"micro_batch_size": 1, "max_sequence_length": 2048},
        "resources": eight,
    }

    async def validate(**fields: Any) -> training_job_pb2.TrainingJob:
        request = training_service_pb2.CreateTrainingJobRequest(
            training_job=job_request(dataset.name, **{**full, **fields}), validate_only=True
        )
        job: training_job_pb2.TrainingJob = await platform.training.CreateTrainingJob(request)
        return job

    error = await refused(validate())
    info = error_info(error)
    assert info is not None and info.reason == "INSUFFICIENT_GPU_MEMORY"
    assert "shard the model across more GPUs (fsdp)" in (error.details() or "")
    replicated = int(info.metadata["estimated_bytes"])

    sharded = training_job_pb2.ResourceRequest(gpu_count=8, gpu_type="nvidia-a100-80gb", fsdp=True)
    checked = await validate(resources=sharded)
    estimate = checked.resource_estimate
    assert estimate.gpu_memory_bytes < 80 * 2**30
    # Model state is 16 bytes per parameter: the eighth of it comes off each GPU.
    parameters = estimate.model_parameters
    assert replicated - estimate.gpu_memory_bytes > 16 * parameters * 7 / 8 - 2**30
    assert "sharded across 8 GPUs" in estimate.explanation

    one = training_job_pb2.ResourceRequest(gpu_count=1, gpu_type="nvidia-a100-80gb", fsdp=True)
    error = await refused(validate(resources=one))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "training_job.resources.fsdp" in (error.details() or "")


async def test_workers_can_only_report_for_their_own_job(make_platform: MakePlatform) -> None:
    fake = FakeLauncher()
    platform = await make_platform(fake, training={"poll_seconds": 0.1, "max_running_jobs": 2})
    dataset = await platform.upload()
    first = await platform.create(dataset.name)
    second = await platform.create(dataset.name)
    await platform.wait(first.name, "RUNNING")
    await platform.wait(second.name, "RUNNING")
    first_token = fake.runs[first.name.removeprefix("trainingJobs/")].token
    error = await refused(
        platform.report(second.name, first_token, worker_state=Worker.WORKER_STATE_SUCCEEDED)
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    error = await refused(platform.training.ReportTrainingProgress(Worker(name=second.name)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    job = await platform.wait(second.name, "RUNNING")
    assert not job.HasField("end_time")


async def test_local_runs_get_gpus_of_their_own_and_wait_in_order_for_enough(
    make_platform: MakePlatform,
) -> None:
    """Four local GPUs: jobs of 2, 3 and 1 GPUs. The second waits for three free GPUs, and the
    third waits behind it (though one GPU is free), so a large job is never starved; then each
    gets GPUs no other run holds."""
    fake = FakeLauncher()
    training = {"poll_seconds": 0.1, "max_running_jobs": 4, "local_gpus": 4}
    platform = await make_platform(fake, training=training)
    dataset = await platform.upload()

    def gpus(count: int) -> training_job_pb2.ResourceRequest:
        return training_job_pb2.ResourceRequest(gpu_count=count)

    def devices(job: training_job_pb2.TrainingJob) -> tuple[int, ...]:
        return fake.runs[job.name.removeprefix("trainingJobs/")].request.devices

    two = await platform.create(dataset.name, resources=gpus(2))
    await platform.wait(two.name, "RUNNING")
    three = await platform.create(dataset.name, resources=gpus(3))
    one = await platform.create(dataset.name, resources=gpus(1))
    cpu = await platform.create(dataset.name)
    assert devices(two) == (0, 1)
    await platform.report(
        two.name,
        fake.runs[two.name.removeprefix("trainingJobs/")].token,
        worker_state=Worker.WORKER_STATE_SUCCEEDED,
    )
    fake.finish(two.name, Phase.SUCCEEDED)
    for job in (three, one, cpu):
        await platform.wait(job.name, "RUNNING")
    # Had the one-GPU job gone ahead while two GPUs were held, it would hold GPU 2.
    assert (devices(three), devices(one), devices(cpu)) == ((0, 1, 2), (3,), ())


async def test_queue_runs_by_priority_then_creation_order(make_platform: MakePlatform) -> None:
    fake = FakeLauncher()
    platform = await make_platform(fake)
    dataset = await platform.upload()
    first = await platform.create(dataset.name)
    await platform.wait(first.name, "RUNNING")  # takes the only place
    low = await platform.create(dataset.name)
    high = await platform.create(dataset.name, priority=10)
    low_too = await platform.create(dataset.name)
    assert (await platform.wait(low.name, "QUEUED")).launcher_run_id == ""
    order = []
    running = first
    for _ in range(3):
        token = fake.runs[running.name.removeprefix("trainingJobs/")].token
        await platform.report(running.name, token, worker_state=Worker.WORKER_STATE_SUCCEEDED)
        fake.finish(running.name, Phase.SUCCEEDED)
        await asyncio.sleep(0.3)
        running_now = [
            j
            for j in (
                await platform.training.ListTrainingJobs(
                    training_service_pb2.ListTrainingJobsRequest(filter="state = RUNNING")
                )
            ).training_jobs
        ]
        assert len(running_now) == 1
        running = running_now[0]
        order.append(running.name)
        if len(order) == 3:
            break
    assert order == [high.name, low.name, low_too.name]
    # The launcher is told each job's priority (Kueue's priority class comes from it).
    assert fake.runs[high.name.removeprefix("trainingJobs/")].request.priority == 10


async def test_cancel_a_queued_and_a_running_job(make_platform: MakePlatform) -> None:
    fake = FakeLauncher()
    platform = await make_platform(fake)
    dataset = await platform.upload()
    running = await platform.create(dataset.name)
    await platform.wait(running.name, "RUNNING")
    queued = await platform.create(dataset.name)

    cancelled = await platform.training.CancelTrainingJob(
        training_service_pb2.CancelTrainingJobRequest(name=queued.name)
    )
    assert cancelled.state == State.STATE_CANCELLED

    token = fake.runs[running.name.removeprefix("trainingJobs/")].token
    cancelling = await platform.training.CancelTrainingJob(
        training_service_pb2.CancelTrainingJobRequest(name=running.name)
    )
    assert cancelling.state == State.STATE_CANCELLING
    job = await platform.wait(running.name, "CANCELLED")
    assert fake.cancelled is not None and fake.cancelled.cancelled
    assert states(await platform.events(running.name))[-2:] == ["CANCELLING", "CANCELLED"]
    # A worker that still reports is told to stop.
    assert await platform.report(running.name, token)
    error = await refused(
        platform.training.CancelTrainingJob(
            training_service_pb2.CancelTrainingJobRequest(name=job.name)
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Both jobs released the dataset.
    await platform.datasets.DeleteDataset(
        dataset_service_pb2.DeleteDatasetRequest(name=dataset.name)
    )


async def test_a_used_dataset_cannot_be_deleted(make_platform: MakePlatform) -> None:
    platform = await make_platform(FakeLauncher())
    dataset = await platform.upload()
    await platform.create(dataset.name)
    error = await refused(
        platform.datasets.DeleteDataset(dataset_service_pb2.DeleteDatasetRequest(name=dataset.name))
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_silent_worker_fails_its_job(make_platform: MakePlatform) -> None:
    fake = FakeLauncher()
    platform = await make_platform(
        fake, training={"poll_seconds": 0.1, "worker_timeout_seconds": 1.0}
    )
    dataset = await platform.upload()
    job = await platform.create(dataset.name)
    job = await platform.wait(job.name, "RUNNING")
    token = fake.runs[job.name.removeprefix("trainingJobs/")].token
    for _ in range(4):  # reports keep it alive past the timeout
        await asyncio.sleep(0.4)
        await platform.report(job.name, token)
    assert (await platform.wait(job.name, "RUNNING")).state == State.STATE_RUNNING
    job = await platform.wait(job.name, "FAILED", within=60)
    assert job.error.reason == "WORKER_SILENT"
    assert "no report from the worker" in job.error.message
    assert fake.cancelled is not None and fake.cancelled.cancelled  # and its run is stopped


@pytest.mark.parametrize(
    ("phase", "reason"),
    [(Phase.SUCCEEDED, "NO_RESULT_REPORTED"), (Phase.FAILED, "WORKER_EXITED")],
)
async def test_a_run_that_ends_without_a_result_fails_the_job(
    make_platform: MakePlatform, phase: Phase, reason: str
) -> None:
    fake = FakeLauncher()
    platform = await make_platform(fake)
    dataset = await platform.upload()
    job = await platform.create(dataset.name)
    await platform.wait(job.name, "RUNNING")
    fake.finish(job.name, phase, "WORKER_EXITED", "the trainer exited with status 137")
    job = await platform.wait(job.name, "FAILED")
    assert job.error.reason == reason


async def test_restart_reconciles_without_losing_or_repeating_jobs(
    make_platform: MakePlatform,
) -> None:
    fake = FakeLauncher()
    platform = await make_platform(fake, training={"poll_seconds": 0.1, "max_running_jobs": 3})
    dataset = await platform.upload()
    keeps_running = await platform.create(dataset.name)
    finishes_while_down = await platform.create(dataset.name)
    fails_while_down = await platform.create(dataset.name)
    for job in (keeps_running, finishes_while_down, fails_while_down):
        await platform.wait(job.name, "RUNNING")
    await platform.stop()

    # While TrainingService is down: one worker reported success before it went down and its
    # run completed; another run crashed.
    fake.finish(finishes_while_down.name, Phase.SUCCEEDED)
    fake.finish(fails_while_down.name, Phase.FAILED, "WORKER_EXITED", "exit status 1")
    launches = fake.launches

    await platform.start()
    job = await platform.wait(fails_while_down.name, "FAILED")
    assert job.error.message == "exit status 1"
    # Its success report never arrived: the run ended cleanly without a result.
    job = await platform.wait(finishes_while_down.name, "FAILED")
    assert job.error.reason == "NO_RESULT_REPORTED"
    await asyncio.sleep(0.5)
    job = await platform.wait(keeps_running.name, "RUNNING")
    assert fake.launches == launches  # nothing launched again
    run = fake.runs[keeps_running.name.removeprefix("trainingJobs/")]
    await platform.report(job.name, run.token, worker_state=Worker.WORKER_STATE_SUCCEEDED)
    await platform.wait(job.name, "SUCCEEDED")


async def test_metrics_count_jobs_and_follow_losses(make_platform: MakePlatform) -> None:
    fake = FakeLauncher()
    platform = await make_platform(fake)
    dataset = await platform.upload()
    job = await platform.create(dataset.name)
    await platform.create(dataset.name)
    job = await platform.wait(job.name, "RUNNING")
    token = fake.runs[job.name.removeprefix("trainingJobs/")].token
    await platform.report(
        job.name,
        token,
        progress=training_job_pb2.TrainingProgress(
            step=1, train_loss=2.5, validation_loss=2.75, tokens_per_second=1234
        ),
    )

    def sample(name: str, **labels: str) -> float | None:
        value: float | None = platform.registry.get_sample_value(name, labels)
        return value

    for _ in range(50):
        if sample("tunefleet_training_queue_depth") == 1:
            break
        await asyncio.sleep(0.1)
    assert sample("tunefleet_training_jobs", state="running") == 1
    assert sample("tunefleet_training_queue_depth") == 1
    assert sample("tunefleet_training_train_loss", job=job.name) == 2.5
    assert sample("tunefleet_training_validation_loss", job=job.name) == 2.75
    assert sample("tunefleet_training_tokens_per_second", job=job.name) == 1234
    assert sample("tunefleet_training_queue_seconds_count") == 1
    await platform.report(job.name, token, worker_state=Worker.WORKER_STATE_SUCCEEDED)
    await platform.wait(job.name, "SUCCEEDED")
    assert sample("tunefleet_training_job_duration_seconds_count", state="succeeded") == 1
    assert sample("tunefleet_training_train_loss", job=job.name) is None


async def test_a_result_left_behind_is_registered_or_checked_through_the_registry(
    make_platform: MakePlatform, chat_model: Path, tmp_path: Path
) -> None:
    fake = FakeLauncher()
    platform = await make_platform(fake, training={"poll_seconds": 0.1, "max_running_jobs": 4})
    dataset = await platform.upload()
    jobs = [await platform.create(dataset.name) for _ in range(4)]
    for job in jobs:
        await platform.wait(job.name, "RUNNING")
    trained, impostor, honest, forged = (job.name for job in jobs)
    adapter = lora_adapter(chat_model, tmp_path / "adapter")

    # Trained and stored, but the registry was away until the trainer gave up: the service
    # registers the stored request itself.
    request_uri = stored_request(platform, trained, adapter)
    fake.finish(trained, Phase.FAILED, "REGISTRATION_FAILED", "gave up", output_request=request_uri)
    job = await platform.wait(trained, "SUCCEEDED", "FAILED")
    assert job.state == State.STATE_SUCCEEDED, job.error
    assert job.output_adapter_version == "adapters/colours/versions/1"
    # Sending the same request again (the trainer's own late retry) makes no second version.
    blobs = platform.storage.blobs
    again = adapter_service_pb2.CreateAdapterVersionRequest.FromString(
        blobs.read_bytes(request_uri.rsplit("/", 1)[-1])
    )
    assert (await platform.adapters.CreateAdapterVersion(again)).name == job.output_adapter_version

    # A termination message naming a version the job did not train is not believed.
    fake.finish(impostor, Phase.SUCCEEDED, output_adapter_version=job.output_adapter_version)
    failed = await platform.wait(impostor, "FAILED")
    assert failed.error.reason == "RESULT_NOT_REGISTERED"

    # One naming the job's own version is checked and believed.
    own = await platform.adapters.CreateAdapterVersion(
        adapter_service_pb2.CreateAdapterVersionRequest.FromString(
            blobs.read_bytes(stored_request(platform, honest, adapter).rsplit("/", 1)[-1])
        )
    )
    fake.finish(honest, Phase.SUCCEEDED, output_adapter_version=own.name)
    succeeded = await platform.wait(honest, "SUCCEEDED")
    assert succeeded.output_adapter_version == own.name == "adapters/colours/versions/2"

    # A stored request of another job is refused, not registered under this one.
    fake.finish(forged, Phase.SUCCEEDED, output_request=request_uri)
    failed = await platform.wait(forged, "FAILED")
    assert failed.error.reason == "REGISTRATION_FAILED" and "not" in failed.error.message
    versions = await platform.adapters.ListAdapterVersions(
        adapter_service_pb2.ListAdapterVersionsRequest(parent="adapters/colours")
    )
    assert len(versions.adapter_versions) == 2


async def test_only_the_newest_and_the_best_checkpoints_are_kept(
    make_platform: MakePlatform, tmp_path: Path
) -> None:
    fake = FakeLauncher()
    platform = await make_platform(fake, training={"poll_seconds": 0.1, "keep_checkpoints": 2})
    dataset = await platform.upload()
    job = await platform.create(dataset.name)
    await platform.wait(job.name, "RUNNING")
    run = fake.runs[job.name.removeprefix("trainingJobs/")]
    blobs = platform.storage.blobs
    stored: dict[int, tuple[str, set[str]]] = {}
    for step, loss in zip(range(1, 6), [3.0, 1.0, 2.0, 2.5, 2.7], strict=True):
        directory = tmp_path / f"checkpoint-{step:08d}"
        directory.mkdir()
        (directory / "trainable.safetensors").write_bytes(os.urandom(64))
        (directory / "state.json").write_text("{}")  # the same in every checkpoint
        uri = upload_checkpoint(blobs, directory)
        manifest = json.loads(blobs.read_bytes(uri[-64:]))
        stored[step] = (uri, {uri[-64:], *manifest["files"].values()})
        checkpoint = training_job_pb2.Checkpoint(
            step=step, uri=uri, size_bytes=64, validation_loss=loss
        )
        await platform.report(job.name, run.token, checkpoint=checkpoint)

    listed = await platform.training.ListCheckpoints(
        training_service_pb2.ListCheckpointsRequest(parent=job.name)
    )
    assert [c.step for c in listed.checkpoints] == [2, 4, 5]  # the best (2) and the newest two
    kept = set().union(*(stored[step][1] for step in (2, 4, 5)))
    assert all(blobs.exists(sha256) for sha256 in kept)
    for step in (1, 3):
        assert not any(blobs.exists(sha256) for sha256 in stored[step][1] - kept), step
    assert run.resume_from == stored[5][0]  # a retried run resumes from the newest
