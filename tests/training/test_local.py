"""The embedded default end to end: TrainingService runs the real trainer as a local process on
the tiny chat model, which reports back over gRPC and registers its adapter."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.evaluation.test_service import wait
from tests.trainer.conftest import ANIMALS, COLOUR_TOOL, COLOURS, LINEAR_LAYERS, tool_record
from tests.training.conftest import Platform, colour_pairs, colour_records
from tests.training.test_leases import lease_of, leases, wait_for_leases
from tunefleet.client import AsyncClient
from tunefleet.v1 import (
    adapter_service_pb2,
    common_pb2,
    dataset_pb2,
    evaluation_pb2,
    evaluation_service_pb2,
    inference_pb2,
    inference_service_pb2,
    training_job_pb2,
    training_service_pb2,
)

State = training_job_pb2.TrainingJob.State
EvaluationState = evaluation_pb2.EvaluationJob.State
ENDED = (EvaluationState.STATE_SUCCEEDED, EvaluationState.STATE_FAILED)
BETTER = evaluation_pb2.EVALUATION_VERDICT_BETTER
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


async def trainer_group(platform: Platform, job: str) -> int:
    """The process group of a running job's trainer, once the trainer has reported a step."""
    for _ in range(1200):
        current = await platform.wait(job, "RUNNING", within=60)
        if current.latest_progress.step >= 1:
            break
        await asyncio.sleep(0.1)
    return int(current.launcher_run_id)


async def stopped_run(platform: Platform) -> tuple[str, int]:
    """A long job whose trainer reported a step, then was stopped (SIGSTOP to the trainer, not
    to the wrapper shell that started it: the shell ends on SIGTERM, the trainer does not)."""
    dataset = await platform.upload()
    job = await platform.create(dataset.name, hyperparameters={"max_steps": 100000, "epochs": 1000})
    pgid = await trainer_group(platform, job.name)
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


async def test_a_trainer_whose_wrapper_died_is_not_lost(make_platform: MakePlatform) -> None:
    """The shell that records the exit status is killed; the trainer it started runs on, so
    the job is not WORKER_LOST: it ends with the trainer's own final report."""
    platform = await make_platform()
    dataset = await platform.upload()
    job = await platform.create(dataset.name, hyperparameters={"max_steps": 30})
    pgid = await trainer_group(platform, job.name)
    os.kill(pgid, signal.SIGKILL)  # the wrapper: the group's leader
    assert [pid for pid in group(pgid) if pid != pgid], "the trainer runs on"
    job = await platform.wait(job.name, "SUCCEEDED", "FAILED", within=300)
    assert job.state == State.STATE_SUCCEEDED, job.error
    assert job.output_adapter_version == "adapters/colours/versions/1"


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


async def test_a_registered_version_is_evaluated_against_the_base_model(
    make_platform: MakePlatform, platform_settings: dict[str, Any]
) -> None:
    after: dict[str, Any] = {"enabled": True, "max_items": 6, "max_tokens": 8}
    after["graders"] = ["exact_match", "rouge_l"]
    platform = await make_platform(
        training={**platform_settings["training"], "evaluation": after},
        inference={"base_model": "colours"},
    )
    dataset = await platform.upload()
    # The regression pass reads a general-skills dataset: here a few colour records stand in.
    suite = await platform.upload(colour_records(train=8, validation=0, seed=3))
    platform.settings.training.evaluation.regression_dataset = suite.name  # known only now
    job = await platform.create(dataset.name)
    job = await platform.wait(job.name, "SUCCEEDED", "FAILED", within=600)
    assert job.state == State.STATE_SUCCEEDED, job.error
    for _ in range(600):  # named on the job once EvaluationService has created them
        job = await platform.wait(job.name, "SUCCEEDED")
        if job.evaluation_jobs:
            break
        await asyncio.sleep(0.1)
    assert len(job.evaluation_jobs) == 2, job.evaluation_jobs
    done = await wait(platform, job.evaluation_jobs[0], *ENDED)
    assert done.state == EvaluationState.STATE_SUCCEEDED, done.error_message
    assert (done.dataset, done.split) == (dataset.name, dataset_pb2.DATASET_SPLIT_VALIDATION)
    assert [(c.name, c.adapter_version) for c in done.candidates] == [
        ("base", ""),
        ("adapter", job.output_adapter_version),
    ]
    base, adapter = done.results
    assert [s.grader for s in adapter.scores] == ["exact_match", "rouge_l"]
    assert all(s.count == 6 and s.errors == 0 for s in [*base.scores, *adapter.scores])
    assert adapter.HasField("gate_passed") and done.gate.metric == "exact_match"
    assert not adapter.gate_passed or adapter.scores[0].comparison.verdict == BETTER
    # The version answered with its own weights: its answers are not the base model's.
    listed = await platform.evaluation.ListEvaluationItemResults(
        evaluation_service_pb2.ListEvaluationItemResultsRequest(parent=done.name, page_size=50)
    )
    answers: dict[str, dict[int, str]] = {}
    for result in listed.item_results:
        answers.setdefault(result.candidate, {})[result.index] = result.output
    assert len(answers["base"]) == len(answers["adapter"]) == 6
    assert answers["base"] != answers["adapter"], answers

    # The regression pass: whole-word answers and KL from the base model on the suite.
    regression = await wait(platform, job.evaluation_jobs[1], *ENDED)
    assert regression.state == EvaluationState.STATE_SUCCEEDED, regression.error_message
    assert (regression.dataset, regression.split) == (suite.name, dataset_pb2.DATASET_SPLIT_TRAIN)
    kept = {r.candidate: {s.grader: s for s in r.scores} for r in regression.results}
    assert set(kept["adapter"]) == {"general", "kl_from_base"}
    general = kept["adapter"]["general"]
    assert general.count == suite.train_record_count > 0 and general.errors == 0
    assert kept["adapter"]["kl_from_base"].mean > 0 and kept["base"]["kl_from_base"].mean == 0


async def test_an_evaluation_service_that_does_not_answer_keeps_the_data_leased(
    make_platform: MakePlatform, platform_settings: dict[str, Any]
) -> None:
    # Nothing listens where EvaluationService should be: the job still succeeds, and its data
    # stays leased while the evaluation waits for the next try (nothing is lost).
    after = {"enabled": True, "endpoint": "127.0.0.1:1", "max_items": 6, "max_tokens": 8}
    platform = await make_platform(
        training={**platform_settings["training"], "evaluation": after},
        inference={"base_model": "colours"},
    )
    dataset = await platform.upload()
    job = await platform.create(dataset.name)
    job = await platform.wait(job.name, "SUCCEEDED", "FAILED", within=600)
    assert job.state == State.STATE_SUCCEEDED, job.error
    for _ in range(20):  # ticks of the scheduler (poll_seconds 0.1): still held, still waiting
        assert await leases(platform, dataset.name) == lease_of(job.name, dataset.name)
        await asyncio.sleep(0.1)
    assert not (await platform.wait(job.name, "SUCCEEDED")).evaluation_jobs


async def test_an_evaluation_refused_leaves_the_job_succeeded_and_releases_its_data(
    make_platform: MakePlatform, platform_settings: dict[str, Any]
) -> None:
    # Data without validation records: EvaluationService refuses the evaluation (no items); the
    # training job stays SUCCEEDED, its leases go, and no evaluation is named.
    after = {"enabled": True, "max_items": 6, "max_tokens": 8}
    platform = await make_platform(
        training={**platform_settings["training"], "evaluation": after},
        inference={"base_model": "colours"},
    )
    assert platform.server is not None
    async with AsyncClient(f"127.0.0.1:{platform.server.port}") as client:
        unsplit = await client.datasets.upload(
            colour_records(train=40, validation=0),
            display_name="unsplit",
            options={"validationFraction": 0, "removeNearDuplicates": False},
        )
    assert unsplit.validation_record_count == 0
    job = await platform.create(unsplit.name)
    job = await platform.wait(job.name, "SUCCEEDED", "FAILED", within=600)
    assert job.state == State.STATE_SUCCEEDED, job.error
    await wait_for_leases(platform, unsplit.name, {})
    assert not (await platform.wait(job.name, "SUCCEEDED")).evaluation_jobs


async def test_a_dpo_job_on_uploaded_pairs_raises_reward_accuracy(
    make_platform: MakePlatform,
) -> None:
    """Pairs uploaded in TRL's form through DatasetService train with DPO in the real trainer;
    the job's progress and evaluation carry DPO's own metrics."""
    platform = await make_platform()
    dataset = await platform.upload(colour_pairs(80))
    job = await platform.create(
        dataset.name,
        objective=training_job_pb2.TRAINING_OBJECTIVE_DPO,
        hyperparameters={"learning_rate": 5e-3, "max_steps": 8, "eval_every_steps": 4},
    )
    events = await asyncio.wait_for(follow(platform, job.name), 600)
    job = await platform.wait(job.name, "SUCCEEDED", "FAILED")
    log = "\n".join(e.log.text for e in events if e.HasField("log"))
    assert job.state == State.STATE_SUCCEEDED, f"{job.error}\n{log[-3000:]}"
    accuracies = [
        e.progress.reward_accuracy for e in events if e.progress.HasField("reward_accuracy")
    ]
    assert len(accuracies) == 2 and accuracies[-1] >= 0.9, accuracies
    evaluation = job.evaluation
    assert evaluation.base_validation_loss == pytest.approx(math.log(2))
    assert evaluation.validation_loss < evaluation.base_validation_loss
    assert evaluation.reward_accuracy >= 0.9 and evaluation.reward_margin > 0
    assert job.output_adapter_version == "adapters/colours/versions/1"
    assert (
        platform.registry.get_sample_value("tunefleet_training_reward_accuracy", {"job": job.name})
        is None
    )  # gauges of ended jobs are removed


async def test_a_tool_call_job_is_served_as_tool_calls(
    make_platform: MakePlatform, platform_settings: dict[str, Any], tool_model: Path
) -> None:
    """Tool-call records (OpenAI form) train on a template that writes calls; the served
    adapter, offered the tool, answers with a call that parses, and after the tool's answer with
    text."""
    platform = await make_platform(
        models={**platform_settings["models"], "tools": str(tool_model)},
        inference={"base_model": "tools", "max_loaded_adapters": 1},
    )
    pairs = list(zip(ANIMALS, COLOURS, strict=True))
    records = [tool_record(*pairs[i % len(pairs)]) for i in range(120)]
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    dataset = await platform.upload(data)
    assert dataset.validation_report.tool_call_records == 120
    job = await platform.create(
        dataset.name,
        base_model="tools",
        adapter="adapters/tools",
        lora={"rank": 16, "target_modules": [*LINEAR_LAYERS, "lm_head"]},
        hyperparameters={
            "max_steps": 200,
            "epochs": 100,
            "max_sequence_length": 128,
            "eval_every_steps": 100,
        },
    )
    job = await platform.wait(job.name, "SUCCEEDED", "FAILED", within=600)
    assert job.state == State.STATE_SUCCEEDED, job.error

    tool = common_pb2.Tool(
        name=COLOUR_TOOL["name"], parameters=json.dumps(COLOUR_TOOL["parameters"])
    )
    for animal, colour in pairs[:4]:
        question = common_pb2.ChatMessage(
            role="user", content=f"Which colour goes with the {animal}?"
        )
        asked = inference_service_pb2.GenerateRequest(
            adapter=job.output_adapter_version,
            chat=inference_pb2.ChatInput(messages=[question], tools=[tool]),
            sampling=inference_pb2.SamplingParams(max_tokens=60),
        )
        response = await platform.inference.Generate(asked)
        assert response.finish_reason == inference_pb2.FINISH_REASON_TOOL_CALLS, response
        (call,) = response.tool_calls
        # The tiny model learns the call's form for sure, the copied animal mostly.
        assert call.name == "colour_of" and json.loads(call.arguments)["animal"] in ANIMALS
        assert response.text == "" and call.id.startswith("call_")
        streamed = [
            message
            async for message in platform.inference.StreamGenerate(
                inference_service_pb2.StreamGenerateRequest(request=asked)
            )
        ]
        assert "".join(m.text_delta for m in streamed).startswith("<tool_call>")
        assert [c.name for c in streamed[-1].tool_calls] == ["colour_of"]
        assert streamed[-1].tool_calls[0].arguments == call.arguments
        answered = await platform.inference.Generate(
            inference_service_pb2.GenerateRequest(
                adapter=job.output_adapter_version,
                chat=inference_pb2.ChatInput(
                    messages=[
                        question,
                        common_pb2.ChatMessage(role="assistant", tool_calls=[call]),
                        common_pb2.ChatMessage(role="tool", content=colour, tool_call_id=call.id),
                    ],
                    tools=[tool],
                ),
                sampling=inference_pb2.SamplingParams(max_tokens=20),
            )
        )
        assert answered.text.startswith("Colour: ") and not answered.tool_calls, answered
        assert answered.finish_reason == inference_pb2.FINISH_REASON_STOP
    # The SDK takes tools in OpenAI's form and a conversation as JSON.
    assert platform.server is not None
    async with AsyncClient(f"127.0.0.1:{platform.server.port}") as client:
        sdk = await client.inference.generate(
            messages=[{"role": "user", "content": f"Which colour goes with the {ANIMALS[0]}?"}],
            tools=[{"type": "function", "function": COLOUR_TOOL}],
            adapter="adapters/tools/versions/1",
            max_tokens=60,
        )
    assert [c.name for c in sdk.tool_calls] == ["colour_of"]


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


async def test_a_local_run_sees_only_its_own_gpus(tmp_path: Path) -> None:
    """CUDA_VISIBLE_DEVICES holds the run's GPUs (none for a CPU run); the "python" here is a
    script that writes what it sees."""
    from tunefleet.training.launcher import Phase, RunRequest
    from tunefleet.training.local import LocalLauncher

    script = tmp_path / "python"
    script.write_text('#!/bin/sh\nprintf "%s" "${CUDA_VISIBLE_DEVICES-unset}" > seen\n')
    script.chmod(0o755)
    launcher = LocalLauncher(tmp_path / "runs", python=str(script))
    await launcher.start(lambda: None)
    for job, count, devices, seen in (("gpu", 2, (1, 3), "1,3"), ("cpu", 0, (), "")):
        run = await launcher.launch(RunRequest(job, {}, gpu_count=count, devices=devices))
        for _ in range(600):
            if (await launcher.status(run)).phase != Phase.RUNNING:
                break
            await asyncio.sleep(0.05)
        assert (tmp_path / "runs" / job / "seen").read_text() == seen
