"""Training in the cluster shape: datasets, adapters, training (local launcher) and inference as
separate `tunefleet serve <service>` processes sharing one data directory, as the dev overlay
runs them. The trainer reports to TrainingService and registers with AdapterService at its own
address; the result is served by InferenceService and matches plain PEFT."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.trainer.conftest import ANIMALS, COLOUR_TOOL, COLOURS, LINEAR_LAYERS, tool_record
from tests.training.conftest import colour_pairs, colour_records, job_request
from tunefleet.demo.server import LocalServer
from tunefleet.v1 import (
    adapter_service_pb2,
    adapter_service_pb2_grpc,
    common_pb2,
    dataset_pb2,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    evaluation_pb2,
    evaluation_service_pb2,
    evaluation_service_pb2_grpc,
    inference_pb2,
    inference_service_pb2,
    inference_service_pb2_grpc,
    training_job_pb2,
    training_service_pb2,
    training_service_pb2_grpc,
)

State = training_job_pb2.TrainingJob.State
EvaluationState = evaluation_pb2.EvaluationJob.State
pytestmark = pytest.mark.timeout(600)
PROMPT = "Which colour goes with the cat?"


class Cluster:
    """One process per service; `servers[key]` and a channel to each."""

    def __init__(
        self,
        data_dir: Path,
        models: dict[str, str],
        keys: list[str],
        serve: str = "colours",
        training_settings: dict[str, Any] | None = None,
    ) -> None:
        common = {
            "models": models,
            "logging": {"level": "INFO"},
        }
        # "training#2": a second replica of TrainingService, sharing the first one's data.
        self.servers = {
            key: LocalServer(data_dir, common, services=[key.partition("#")[0]]) for key in keys
        }
        for key, server in self.servers.items():
            if "#" in key:  # its own settings file and log
                suffix = key.replace("#", "-")
                server.config = data_dir / f"tunefleet-{suffix}.yaml"
                server.log = data_dir / f"server-{suffix}.log"
        replicas = [server for key, server in self.servers.items() if key.startswith("training")]
        training = self.servers["training"].settings
        training["training"] = {
            "poll_seconds": 0.2,
            "heartbeat_seconds": 1.0,
            # What the dev overlay sets: the adapters Service, not TrainingService's own address.
            "registry_endpoint": self.servers["adapters"].target,
            "datasets_endpoint": self.servers["datasets"].target,
            **(training_settings or {}),
        }
        if len(replicas) > 1:
            # Workers report to any replica (as to the training Service of a cluster): gRPC
            # picks the first that answers.
            addresses = ",".join(replica.target for replica in replicas)
            training["training"]["worker_endpoint"] = f"ipv4:{addresses}"
            for replica in replicas[1:]:
                replica.settings["training"] = training["training"]
        if "inference" in self.servers:
            self.servers["inference"].settings["inference"] = {
                "base_model": serve,
                "registry_endpoint": self.servers["adapters"].target,
            }
        if "evaluation" in self.servers:
            # TrainingService evaluates each registered version on the evaluation Service, which
            # reads items from the datasets Service and has inference answer them.
            self.servers["evaluation"].settings["evaluation"] = {
                "datasets_endpoint": self.servers["datasets"].target,
                "inference_endpoint": self.servers["inference"].target,
            }
            training["training"]["evaluation"] = {
                "enabled": True,
                "endpoint": self.servers["evaluation"].target,
                "max_items": 6,
                "max_tokens": 8,
            }
        self.channels: dict[str, grpc.Channel] = {}

    def start(self) -> Cluster:
        with ThreadPoolExecutor(len(self.servers)) as pool:
            list(pool.map(lambda server: server.start(timeout=300), self.servers.values()))
        self.channels = {
            key: grpc.insecure_channel(server.target) for key, server in self.servers.items()
        }
        return self

    def stop(self) -> None:
        for channel in self.channels.values():
            channel.close()
        for server in self.servers.values():
            if server.process is not None and server.process.poll() is None:
                server.stop()

    @property
    def training(self) -> Any:
        return training_service_pb2_grpc.TrainingServiceStub(self.channels["training"])

    @property
    def adapters(self) -> Any:
        return adapter_service_pb2_grpc.AdapterServiceStub(self.channels["adapters"])

    def upload(self, data: bytes | None = None) -> str:
        def requests() -> Iterator[dataset_service_pb2.UploadDatasetRequest]:
            options = dataset_pb2.DatasetOptions(
                remove_exact_duplicates=False,
                remove_near_duplicates=False,
                validation_fraction=0.2,
            )
            header = dataset_service_pb2.UploadDatasetHeader(display_name="c", options=options)
            yield dataset_service_pb2.UploadDatasetRequest(header=header)
            yield dataset_service_pb2.UploadDatasetRequest(chunk=data or colour_records())
            yield dataset_service_pb2.UploadDatasetRequest(finish_write=True)

        stub = dataset_service_pb2_grpc.DatasetServiceStub(self.channels["datasets"])
        return str(stub.UploadDataset(requests(), timeout=120).name)

    def create(self, dataset: str, **fields: Any) -> str:
        request = training_service_pb2.CreateTrainingJobRequest(
            training_job=job_request(dataset, **fields)
        )
        return str(self.training.CreateTrainingJob(request, timeout=60).name)

    def job(self, name: str) -> training_job_pb2.TrainingJob:
        request = training_service_pb2.GetTrainingJobRequest(name=name)
        job: training_job_pb2.TrainingJob = self.training.GetTrainingJob(request, timeout=30)
        return job

    def wait(self, name: str, *states: str, within: float = 300.0) -> training_job_pb2.TrainingJob:
        wanted = {State.Value(f"STATE_{state}") for state in states}
        deadline = time.monotonic() + within
        while True:
            job = self.job(name)
            if job.state in wanted:
                return job
            assert time.monotonic() < deadline, f"{name} is {State.Name(job.state)}: {job.error}"
            time.sleep(0.2)

    def log(self, name: str) -> str:
        request = training_service_pb2.StreamTrainingJobEventsRequest(name=name, no_follow=True)
        events = self.training.StreamTrainingJobEvents(request, timeout=30)
        return "\n".join(e.log.text for e in events if e.HasField("log"))

    def versions(self) -> list[Any]:
        request = adapter_service_pb2.ListAdapterVersionsRequest(parent="adapters/colours")
        return list(self.adapters.ListAdapterVersions(request, timeout=30).adapter_versions)


@pytest.fixture
def make_cluster(tmp_path: Path, chat_model: Path, tool_model: Path) -> Iterator[Any]:
    """`make(*services, serve=model)`: the tiny chat model is `colours`, its tool-use twin
    `tools`; inference serves `serve`."""
    clusters: list[Cluster] = []
    models = {"colours": str(chat_model), "tools": str(tool_model)}

    def make(*keys: str, serve: str = "colours", training: dict[str, Any] | None = None) -> Cluster:
        cluster = Cluster(tmp_path / "data", models, list(keys), serve, training)
        clusters.append(cluster)
        return cluster.start()

    yield make
    for cluster in clusters:
        cluster.stop()


def peft_reference(chat_model: Path, adapter: Path, prompt: str, max_tokens: int) -> str:
    """Greedy text from plain transformers + PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(chat_model))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chat_model), adapter)
    model.eval()
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(  # type: ignore[no-untyped-call]
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def test_a_job_trains_registers_is_served_and_evaluated_across_processes(
    make_cluster: Any, chat_model: Path, tmp_path: Path
) -> None:
    cluster = make_cluster("datasets", "training", "adapters", "inference", "evaluation")
    name = cluster.create(cluster.upload())
    job = cluster.wait(name, "SUCCEEDED", "FAILED")
    assert job.state == State.STATE_SUCCEEDED, f"{job.error}\n{cluster.log(name)[-3000:]}"
    assert job.output_adapter_version == "adapters/colours/versions/1"
    version = cluster.adapters.GetAdapterVersion(
        adapter_service_pb2.GetAdapterVersionRequest(name=job.output_adapter_version)
    )
    assert version.lineage.training_job == name

    inference = inference_service_pb2_grpc.InferenceServiceStub(cluster.channels["inference"])
    request = inference_service_pb2.GenerateRequest(
        adapter=job.output_adapter_version,
        prompt=PROMPT,
        sampling=inference_pb2.SamplingParams(max_tokens=8, temperature=0.0),
    )
    response = inference.Generate(request, timeout=120, wait_for_ready=True)
    assert response.adapter_version == job.output_adapter_version
    adapter = tmp_path / "data" / "training" / "runs" / name.split("/")[1] / "output" / "adapter"
    assert response.text == peft_reference(chat_model, adapter, PROMPT, 8)

    # The evaluation TrainingService created on the evaluation Service: base against version.
    deadline = time.monotonic() + 120
    while not (job := cluster.job(name)).evaluation_jobs:
        assert time.monotonic() < deadline, "no evaluation was created"
        time.sleep(0.2)
    evaluations = evaluation_service_pb2_grpc.EvaluationServiceStub(cluster.channels["evaluation"])
    ended = {EvaluationState.STATE_SUCCEEDED, EvaluationState.STATE_FAILED}
    deadline = time.monotonic() + 300
    while (
        evaluation := evaluations.GetEvaluationJob(
            evaluation_service_pb2.GetEvaluationJobRequest(name=job.evaluation_jobs[0]), timeout=30
        )
    ).state not in ended:
        assert time.monotonic() < deadline, evaluation
        time.sleep(0.2)
    assert evaluation.state == EvaluationState.STATE_SUCCEEDED, evaluation.error_message
    assert [c.adapter_version for c in evaluation.candidates] == ["", job.output_adapter_version]
    assert [r.candidate for r in evaluation.results] == ["base", "adapter"]
    assert all(s.count == 6 and s.errors == 0 for r in evaluation.results for s in r.scores)
    assert evaluation.results[1].HasField("gate_passed")


def test_a_dpo_job_trains_on_pairs_across_processes(make_cluster: Any) -> None:
    cluster = make_cluster("datasets", "training", "adapters")
    name = cluster.create(
        cluster.upload(colour_pairs(80)),
        objective=training_job_pb2.TRAINING_OBJECTIVE_DPO,
        hyperparameters={"learning_rate": 5e-3, "max_steps": 8, "eval_every_steps": 4},
    )
    job = cluster.wait(name, "SUCCEEDED", "FAILED")
    assert job.state == State.STATE_SUCCEEDED, f"{job.error}\n{cluster.log(name)[-3000:]}"
    assert job.objective == training_job_pb2.TRAINING_OBJECTIVE_DPO
    assert job.evaluation.reward_accuracy >= 0.9 and job.evaluation.reward_margin > 0
    assert [v.name for v in cluster.versions()] == [job.output_adapter_version]


def test_a_tool_call_job_is_served_as_tool_calls_across_processes(make_cluster: Any) -> None:
    cluster = make_cluster("datasets", "training", "adapters", "inference", serve="tools")
    pairs = list(zip(ANIMALS, COLOURS, strict=True))
    data = "".join(json.dumps(tool_record(*pairs[i % len(pairs)])) + "\n" for i in range(120))
    name = cluster.create(
        cluster.upload(data.encode()),
        base_model="tools",
        adapter="adapters/tools",
        lora={"rank": 16, "target_modules": [*LINEAR_LAYERS, "lm_head"]},
        hyperparameters={"max_steps": 200, "epochs": 100, "max_sequence_length": 128},
    )
    job = cluster.wait(name, "SUCCEEDED", "FAILED")
    assert job.state == State.STATE_SUCCEEDED, f"{job.error}\n{cluster.log(name)[-3000:]}"
    inference = inference_service_pb2_grpc.InferenceServiceStub(cluster.channels["inference"])
    tool = common_pb2.Tool(
        name=COLOUR_TOOL["name"], parameters=json.dumps(COLOUR_TOOL["parameters"])
    )
    question = common_pb2.ChatMessage(role="user", content="Which colour goes with the cat?")
    request = inference_service_pb2.GenerateRequest(
        adapter=job.output_adapter_version,
        chat=inference_pb2.ChatInput(messages=[question], tools=[tool]),
        sampling=inference_pb2.SamplingParams(max_tokens=60),
    )
    response = inference.Generate(request, timeout=120, wait_for_ready=True)
    assert response.finish_reason == inference_pb2.FINISH_REASON_TOOL_CALLS, response
    assert [c.name for c in response.tool_calls] == ["colour_of"]
    assert json.loads(response.tool_calls[0].arguments)["animal"] in ANIMALS


def test_the_adapters_process_killed_while_the_trainer_registers(make_cluster: Any) -> None:
    cluster = make_cluster("datasets", "training", "adapters")
    name = cluster.create(cluster.upload(), hyperparameters={"max_steps": 12})
    while cluster.job(name).latest_progress.step < 1:  # training, before registering
        assert cluster.job(name).state in (State.STATE_QUEUED, State.STATE_RUNNING)
        time.sleep(0.1)
    adapters = cluster.servers["adapters"]
    assert adapters.process is not None
    adapters.process.kill()
    adapters.process.wait()
    killed = time.monotonic()
    deadline = killed + 300
    while "registering adapters/colours" not in cluster.log(name):  # the trainer's own log
        assert time.monotonic() < deadline and cluster.job(name).state == State.STATE_RUNNING
        time.sleep(0.2)
    time.sleep(max(0.0, killed + 10 - time.monotonic()))
    adapters.start(timeout=300)  # on the same port, as a restarted Pod behind its Service

    job = cluster.wait(name, "SUCCEEDED", "FAILED")
    assert job.state == State.STATE_SUCCEEDED, f"{job.error}\n{cluster.log(name)[-3000:]}"
    versions = cluster.versions()
    assert [v.name for v in versions] == [job.output_adapter_version]
    assert versions[0].lineage.training_job == name


def leading(server: LocalServer) -> bool | None:
    """Whether the replica's scheduler leads (its metric), None while it does not answer."""
    import urllib.request

    try:
        with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    values = [
        line.split()[-1]
        for line in text.splitlines()
        if line.startswith("tunefleet_training_leader ")
    ]
    return bool(values) and float(values[0]) == 1.0


def test_killing_the_leading_replica_mid_job_another_takes_over_and_it_finishes_once(
    make_cluster: Any,
) -> None:
    """Two TrainingService processes share the training database and data (leader_election:
    database, the default lease of 10 s). The follower serves the job's reads and takes
    its worker's reports; the leader is killed (SIGKILL) mid-job; the follower leads within 15 s,
    follows the run the dead leader launched (the trainer, in its own session, goes on) and the
    job succeeds once: one run, one registered version, its datasets released."""
    cluster = make_cluster(
        "datasets", "adapters", "training", "training#2", training={"leader_election": "database"}
    )
    replicas = {key: cluster.servers[key] for key in ("training", "training#2")}
    deadline = time.monotonic() + 60
    while sorted(str(leading(server)) for server in replicas.values()) != ["False", "True"]:
        assert time.monotonic() < deadline, {k: leading(s) for k, s in replicas.items()}
        time.sleep(0.2)
    leader = next(key for key, server in replicas.items() if leading(server))
    follower = next(key for key in replicas if key != leader)
    training = training_service_pb2_grpc.TrainingServiceStub(cluster.channels[follower])

    def job(name: str) -> training_job_pb2.TrainingJob:
        found: training_job_pb2.TrainingJob = training.GetTrainingJob(
            training_service_pb2.GetTrainingJobRequest(name=name), timeout=30
        )
        return found

    dataset = cluster.upload()
    steps = {"max_steps": 100, "epochs": 1000, "eval_every_steps": 50}
    created = training.CreateTrainingJob(
        training_service_pb2.CreateTrainingJobRequest(
            training_job=job_request(dataset, hyperparameters=steps)
        ),
        timeout=60,
    )
    name = created.name
    deadline = time.monotonic() + 300
    while job(name).latest_progress.step < 5:  # launched by the leader, reported to either
        assert time.monotonic() < deadline and job(name).state in (
            State.STATE_QUEUED,
            State.STATE_RUNNING,
        ), job(name).error
        time.sleep(0.1)
    run_id = job(name).launcher_run_id
    # The run is held still (SIGSTOP) from before the leader dies until a replica leads again,
    # so that the job is still running at the takeover however fast this machine trains.
    runs = cluster.servers[follower].data_dir / "training" / "runs"
    group = int((runs / name.removeprefix("trainingJobs/") / "pid").read_text())
    os.killpg(group, signal.SIGSTOP)
    try:
        dead = replicas[leader].process
        assert dead is not None
        dead.kill()
        dead.wait()
        killed = time.monotonic()
        while not leading(replicas[follower]):
            assert time.monotonic() - killed < 15, "no replica took over within 15 s"
            time.sleep(0.1)
        took_over = time.monotonic() - killed
        assert job(name).state == State.STATE_RUNNING
    finally:
        os.killpg(group, signal.SIGCONT)

    deadline = time.monotonic() + 300
    while job(name).state not in (State.STATE_SUCCEEDED, State.STATE_FAILED):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    done = job(name)
    assert done.state == State.STATE_SUCCEEDED, done.error
    assert done.launcher_run_id == run_id  # the same run, not launched again
    assert done.latest_progress.step == 100
    history = [State.Name(t.state) for t in done.state_history]
    assert history.count("STATE_RUNNING") == 1 and history.count("STATE_SUCCEEDED") == 1, history
    assert [v.name for v in cluster.versions()] == [done.output_adapter_version]
    assert [p.name for p in runs.iterdir()] == [name.removeprefix("trainingJobs/")]
    # The new leader's duty: the ended job's datasets are released.
    datasets = dataset_service_pb2_grpc.DatasetServiceStub(cluster.channels["datasets"])
    deadline = time.monotonic() + 60
    while datasets.ListDatasetLeases(
        dataset_service_pb2.ListDatasetLeasesRequest(parent=dataset), timeout=30
    ).leases:
        assert time.monotonic() < deadline, "the datasets stayed leased"
        time.sleep(0.2)
    print(f"takeover {took_over:.1f} s after the leader was killed")


def test_training_alone_needs_a_registry_endpoint(tmp_path: Path) -> None:
    server = LocalServer(tmp_path, services=["training"])
    with pytest.raises(
        RuntimeError, match=r"training\.registry_endpoint: must name an AdapterService"
    ):
        server.start(timeout=120)


def test_training_alone_needs_a_datasets_endpoint(tmp_path: Path) -> None:
    server = LocalServer(
        tmp_path, {"training": {"registry_endpoint": "adapters:50051"}}, services=["training"]
    )
    with pytest.raises(
        RuntimeError, match=r"training\.datasets_endpoint: must name a DatasetService"
    ):
        server.start(timeout=120)


def test_training_alone_that_evaluates_needs_an_evaluation_endpoint(tmp_path: Path) -> None:
    training = {
        "registry_endpoint": "adapters:50051",
        "datasets_endpoint": "datasets:50051",
        "evaluation": {"enabled": True},
    }
    server = LocalServer(tmp_path, {"training": training}, services=["training"])
    with pytest.raises(
        RuntimeError, match=r"training\.evaluation\.endpoint: must name an EvaluationService"
    ):
        server.start(timeout=120)


def test_inference_alone_needs_a_registry_endpoint(tmp_path: Path, chat_model: Path) -> None:
    server = LocalServer(
        tmp_path,
        {"models": {"colours": str(chat_model)}, "inference": {"base_model": "colours"}},
        services=["inference"],
    )
    with pytest.raises(
        RuntimeError, match=r"inference\.registry_endpoint: must name an AdapterService"
    ):
        server.start(timeout=120)
