"""The Kubernetes launcher against a real API server (v1.20, with the real Job controller; the
tests play the kubelet by patching Pod status), and its manifests against the schemas of
current Kubernetes versions."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.kube.kubelet import ProcessKubelet
from tests.kube.namespace import Kube, pods_of, run_request, until
from tests.storage.conftest import s3_client
from tests.training.conftest import Platform, lora_adapter, stored_request
from tunefleet.runtime.settings import KubernetesSettings
from tunefleet.trainer.outcome import PEER_LOST_EXIT
from tunefleet.training import manifests
from tunefleet.training.kubernetes import KUEUE, KUEUE_JOB_UID, KubernetesLauncher, new_lines
from tunefleet.training.launcher import Phase
from tunefleet.v1 import adapter_service_pb2, training_job_pb2, training_service_pb2

State = training_job_pb2.TrainingJob.State
Worker = training_service_pb2.ReportTrainingProgressRequest
MakePlatform = Any
GPU = training_job_pb2.ResourceRequest(gpu_count=1, gpu_type="nvidia-l4")


# --- manifests, offline -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "version", ["1.27.0", "1.28.0", "1.30.0", kubernetes_validate.latest_version()]
)
@pytest.mark.parametrize("gpus", [1, 4])
def test_manifests_pass_strict_schema_validation(version: str, gpus: int) -> None:
    settings = KubernetesSettings(
        model_cache_claim="models", env_from_secrets=["tunefleet-s3"], node_selector={"pool": "a"}
    )
    job = manifests.job_manifest(settings, run_request(gpus=gpus, max_run_seconds=3600))
    secret = manifests.secret_manifest(settings, run_request())
    for manifest in (job, secret):
        kubernetes_validate.validate(manifest, version, strict=True)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == str(gpus)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
    if gpus > 1:  # one process per GPU
        assert container["command"][1:4] == ["-m", "tunefleet.trainer.gang", "--standalone"]
        assert f"--nproc-per-node={gpus}" in container["command"]
    assert job["spec"]["activeDeadlineSeconds"] == 3600
    assert job["spec"]["template"]["spec"]["nodeSelector"] == {
        "pool": "a",
        "nvidia.com/gpu.product": "nvidia-l4",
    }


@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.latest_version()])
def test_a_multi_node_run_is_an_indexed_job_with_a_headless_service(version: str) -> None:
    """Schemas only: the test API server (v1.20) drops `completionMode`."""
    settings = KubernetesSettings()
    request = run_request("multi1", gpus=8, node_count=4)
    job = manifests.job_manifest(settings, request)
    service = manifests.service_manifest(settings, request)
    for manifest in (job, service, manifests.secret_manifest(settings, request)):
        kubernetes_validate.validate(manifest, version, strict=True)
    spec, name = job["spec"], "tunefleet-train-multi1"
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == name
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"].items() <= pod_labels(job).items()
    container = pod["containers"][0]
    assert container["command"][1:] == [
        "-m",
        "tunefleet.trainer.gang",  # torchrun, exiting with the failed trainer's status
        "--nnodes=4",
        "--node-rank=$(NODE_RANK)",  # filled in by Kubernetes from the variable below
        f"--master-addr={name}-0.{name}",
        "--master-port=29500",
        "--nproc-per-node=8",
        "-m",
        "tunefleet.trainer",
        "--spec",
        "/etc/tunefleet/spec.json",
    ]
    (rank,) = [e for e in container["env"] if e["name"] == "NODE_RANK"]
    assert rank["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    one = manifests.job_manifest(settings, run_request("one1", gpus=8))
    assert (
        "completionMode" not in one["spec"] and "subdomain" not in one["spec"]["template"]["spec"]
    )
    # A node lost fails every node's Pod (PEER_LOST, retried): the limit counts gang restarts.
    assert spec["backoffLimit"] == 4 * one["spec"]["backoffLimit"]
    (final, _) = spec["podFailurePolicy"]["rules"]
    assert PEER_LOST_EXIT not in final["onExitCodes"]["values"]


@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.latest_version()])
def test_with_a_kueue_queue_jobs_are_created_suspended_and_labelled(version: str) -> None:
    """Kueue admits a Job by unsuspending it; its priority class follows the job's priority.
    (Schemas only: the v1.20 test API server drops `suspend`.)"""
    settings = KubernetesSettings(queue_name="gpus", priority_classes={"high": 10, "normal": 0})
    for priority, wanted in ((20, "high"), (10, "high"), (3, "normal"), (-1, None)):
        for nodes in (1, 2):
            request = run_request("kq1", priority=priority, node_count=nodes)
            job = manifests.job_manifest(settings, request)
            kubernetes_validate.validate(job, version, strict=True)
            assert job["spec"]["suspend"] is True
            labels = job["metadata"]["labels"]
            assert labels[manifests.QUEUE_LABEL] == "gpus"
            assert labels.get(manifests.PRIORITY_LABEL) == wanted
    plain = manifests.job_manifest(KubernetesSettings(), run_request("kq2", priority=20))
    assert "suspend" not in plain["spec"]
    assert not {manifests.QUEUE_LABEL, manifests.PRIORITY_LABEL} & set(plain["metadata"]["labels"])


def pod_labels(job: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = job["spec"]["template"]["metadata"]["labels"]
    return labels


def test_a_multi_node_run_s_outcome_and_logs_come_from_its_first_node() -> None:
    """Every node's trainer ends; only the first (global rank 0) registers and says so."""
    from types import SimpleNamespace

    from tunefleet.training.kubernetes import _first_node, _outcome

    def pod(index: str | None, finished: str, message: str) -> Any:
        annotations = {manifests.INDEX_ANNOTATION: index} if index is not None else None
        terminated = SimpleNamespace(
            finished_at=finished, message=message, reason="Completed", exit_code=0
        )
        return SimpleNamespace(
            metadata=SimpleNamespace(
                annotations=annotations, resource_version="1", creation_timestamp=finished
            ),
            status=SimpleNamespace(
                container_statuses=[SimpleNamespace(state=SimpleNamespace(terminated=terminated))]
            ),
        )

    said = json.dumps({"adapter_version": "adapters/colours/versions/1"})
    first, second = pod("0", "2026-12-04T10:00:00Z", said), pod("1", "2026-12-04T10:00:05Z", "")
    assert _first_node([second, first]) == [first]
    assert _outcome([first, second]) == {"adapter_version": "adapters/colours/versions/1"}
    alone = pod(None, "2026-12-04T10:00:00Z", said)  # a one-node Job's Pod has no index
    assert _outcome([alone]) == {"adapter_version": "adapters/colours/versions/1"}


def test_the_strict_check_catches_unknown_fields() -> None:
    job = manifests.job_manifest(KubernetesSettings(), run_request())
    job["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)


def test_pod_log_lines_are_taken_once() -> None:
    text = (
        "2026-11-29T10:00:00.5Z first\n2026-11-29T10:00:00.51Z second\n2026-11-29T10:00:01Z third\n"
    )
    lines, last = new_lines(text, "")
    assert [line.text for line in lines] == ["first", "second", "third"]
    # Read again from a time before `last` (the API's since is whole seconds): nothing repeats.
    again, _ = new_lines(text + "2026-11-29T10:00:01.2Z fourth\n", last)
    assert [line.text for line in again] == ["fourth"]
    assert new_lines("2026-11-29T10:00:00.6Z x\n", "2026-11-29T10:00:00.5Z")[0][0].text == "x"


# --- against the API server ---------------------------------------------------------------------


async def launched(platform: Platform, name: str) -> training_job_pb2.TrainingJob:
    """The job once the service has recorded its run: the Kubernetes Job (and its Pod) exists
    a moment before the service writes down the run's name."""

    async def check() -> training_job_pb2.TrainingJob | None:
        job = await platform.training.GetTrainingJob(
            training_service_pb2.GetTrainingJobRequest(name=name)
        )
        return job if job.launcher_run_id else None

    job: training_job_pb2.TrainingJob = await until(check)
    return job


@pytest.mark.kubernetes
async def test_the_api_server_accepts_the_job_and_launching_is_idempotent(kube: Kube) -> None:
    launcher = KubernetesLauncher(KubernetesSettings(**kube.settings()))
    await launcher.start(lambda: None)
    try:
        run = await launcher.launch(run_request("idem1", cpu_cores=4, memory_bytes=2**34))
        again = await launcher.launch(run_request("idem1", cpu_cores=4, memory_bytes=2**34))
        assert run.run_id == again.run_id == "tunefleet-train-idem1"
        jobs = kube.jobs("idem1")
        assert len(jobs) == 1
        job = jobs[0]
        pod_spec = job.spec.template.spec
        container = pod_spec.containers[0]
        assert container.resources.requests["nvidia.com/gpu"] == "1"
        assert container.resources.limits["nvidia.com/gpu"] == "1"
        assert container.resources.requests["cpu"] == "4"
        assert container.resources.limits["memory"] == str(2**34)
        assert pod_spec.restart_policy == "Never"
        assert pod_spec.service_account_name == "tunefleet-trainer"
        assert pod_spec.node_selector == {"nvidia.com/gpu.product": "nvidia-l4"}
        assert [t.key for t in pod_spec.tolerations] == ["nvidia.com/gpu"]
        assert {v.name for v in pod_spec.volumes} == {"spec", "scratch", "tmp", "dshm"}
        assert pod_spec.security_context.run_as_non_root
        assert pod_spec.security_context.fs_group == manifests.TRAINER_UID
        assert container.security_context.read_only_root_filesystem
        assert job.spec.backoff_limit == 3
        assert job.spec.active_deadline_seconds == 7 * 24 * 3600
        assert job.metadata.labels[manifests.JOB_LABEL] == "idem1"
        secret = kube.core.read_namespaced_secret(run.run_id, kube.namespace)
        assert [o.uid for o in secret.metadata.owner_references] == [job.metadata.uid]
        assert kube.spec("idem1")["output_dir"] == "/scratch/output"
        pods = await until(pods_of(kube, "idem1"))  # the Job controller made the Pod
        assert (await launcher.status(run)).phase == Phase.PENDING
        kube.run_pod(pods[0])
        await until(lambda: _phase(launcher, run, Phase.RUNNING))
    finally:
        await launcher.close()


@pytest.mark.kubernetes
async def test_the_api_server_accepts_a_multi_node_run_and_its_service_goes_with_it(
    kube: Kube,
) -> None:
    launcher = KubernetesLauncher(KubernetesSettings(**kube.settings()))
    await launcher.start(lambda: None)
    try:
        run = await launcher.launch(run_request("multi2", node_count=2))
        again = await launcher.launch(run_request("multi2", node_count=2))
        assert run.run_id == again.run_id
        (job,) = kube.jobs("multi2")
        assert (job.spec.completions, job.spec.parallelism) == (2, 2)
        assert job.spec.template.spec.subdomain == run.run_id
        service = kube.core.read_namespaced_service(run.run_id, kube.namespace)
        assert service.spec.cluster_ip == "None"
        assert [o.uid for o in service.metadata.owner_references] == [job.metadata.uid]
        await launcher.cancel(run)
    finally:
        await launcher.close()


async def _phase(launcher: KubernetesLauncher, run: Any, phase: Phase) -> bool:
    return (await launcher.status(run)).phase == phase


@pytest.mark.kubernetes
async def test_the_api_server_refuses_what_kubernetes_refuses(kube: Kube) -> None:
    from kubernetes.client.exceptions import ApiException

    job = manifests.job_manifest(KubernetesSettings(namespace=kube.namespace), run_request("bad1"))
    job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "2"
    with pytest.raises(ApiException) as raised:
        kube.batch.create_namespaced_job(kube.namespace, job)
    assert raised.value.status == 422  # GPU requests must equal limits


@pytest.fixture
def kube_platform(
    kube: Kube, make_platform: MakePlatform, s3_endpoint: str, platform_settings: dict[str, Any]
) -> Iterator[Callable[..., Awaitable[Platform]]]:
    bucket = f"kube-{uuid.uuid4().hex[:8]}"
    s3_client(s3_endpoint).create_bucket(Bucket=bucket)

    async def make(training: dict[str, Any] | None = None, **kubernetes: Any) -> Platform:
        platform: Platform = await make_platform(
            storage={"blob_backend": "s3", "s3": {"bucket": bucket, "endpoint_url": s3_endpoint}},
            training={
                **platform_settings["training"],
                **(training or {}),
                "launcher": "kubernetes",
                "max_running_jobs": 4,
                "worker_endpoint": "tunefleet-training.tunefleet.svc:50051",
                "kubernetes": kube.settings(**kubernetes),
            },
        )
        return platform

    yield make


def job_id(name: str) -> str:
    return name.removeprefix("trainingJobs/")


async def running_job(kube: Kube, platform: Platform) -> tuple[training_job_pb2.TrainingJob, Any]:
    """A one-GPU job whose Pod the test has started; the job and the Pod."""
    dataset = await platform.upload()
    job = await platform.create(dataset.name, resources=GPU)
    (pod,) = await until(pods_of(kube, job_id(job.name)))
    kube.run_pod(pod)
    return await platform.wait(job.name, "RUNNING", within=60), pod


@pytest.mark.kubernetes
async def test_state_follows_the_job_to_success(kube: Kube, kube_platform: Any) -> None:
    platform = await kube_platform()
    dataset = await platform.upload()
    job = await platform.create(dataset.name, resources=GPU)
    assert job.launcher == "kubernetes"
    pods = await until(pods_of(kube, job_id(job.name)))
    job = await launched(platform, job.name)  # its Pod is not running yet
    assert job.state == State.STATE_QUEUED
    assert job.launcher_run_id == f"tunefleet-train-{job_id(job.name)}"
    spec = kube.spec(job_id(job.name))
    assert spec["report"]["endpoint"] == "tunefleet-training.tunefleet.svc:50051"
    assert spec["train_data"]["uri"].startswith("s3://")
    kube.run_pod(pods[0])
    await platform.wait(job.name, "RUNNING", within=60)
    # The worker in the Pod reports with the token from its spec.
    token = spec["report"]["token"]
    await platform.report(job.name, token, worker_state=Worker.WORKER_STATE_RUNNING)
    await platform.report(
        job.name,
        token,
        worker_state=Worker.WORKER_STATE_SUCCEEDED,
        output_adapter_version="adapters/colours/versions/1",
    )
    kube.end_pod(pods[0], 0, json.dumps({"adapter_version": "adapters/colours/versions/1"}))
    job = await platform.wait(job.name, "SUCCEEDED", within=60)
    assert job.output_adapter_version == "adapters/colours/versions/1"
    await until(lambda: _job_complete(kube, job_id(job.name)))


@pytest.mark.kubernetes
async def test_a_job_of_two_nodes_runs_as_two_pods_and_succeeds(
    kube: Kube, kube_platform: Any
) -> None:
    """The v1.20 server drops `completionMode`, so its Pods carry no index: the run still
    needs both to succeed, and the result is the first node's."""
    platform = await kube_platform()
    dataset = await platform.upload()
    nodes = training_job_pb2.ResourceRequest(gpu_count=2, gpu_type="nvidia-l4", node_count=2)
    job = await platform.create(dataset.name, resources=nodes)
    identifier = job_id(job.name)
    pods = await until(pods_of(kube, identifier, count=2))
    (kubernetes_job,) = kube.jobs(identifier)
    assert kubernetes_job.spec.parallelism == 2
    service = kube.core.read_namespaced_service(kubernetes_job.metadata.name, kube.namespace)
    assert service.metadata.owner_references[0].uid == kubernetes_job.metadata.uid
    for pod in pods:
        kube.run_pod(pod)
    await platform.wait(job.name, "RUNNING", within=60)
    token = kube.spec(identifier)["report"]["token"]
    version = "adapters/colours/versions/1"
    await platform.report(job.name, token, worker_state=Worker.WORKER_STATE_RUNNING)
    await platform.report(
        job.name, token, worker_state=Worker.WORKER_STATE_SUCCEEDED, output_adapter_version=version
    )
    kube.end_pod(pods[1], 0, "")
    kube.end_pod(pods[0], 0, json.dumps({"adapter_version": version}))
    job = await platform.wait(job.name, "SUCCEEDED", within=60)
    assert job.output_adapter_version == version
    await until(lambda: _job_complete(kube, identifier))


async def _job_complete(kube: Kube, identifier: str) -> bool:
    jobs = await asyncio.to_thread(kube.jobs, identifier)
    conditions = jobs[0].status.conditions or []
    return any(c.type == "Complete" and c.status == "True" for c in conditions)


@pytest.mark.kubernetes
async def test_a_lost_pod_is_retried_from_the_last_checkpoint_then_the_job_fails(
    kube: Kube, kube_platform: Any
) -> None:
    platform = await kube_platform(backoff_limit=1)
    job, pod = await running_job(kube, platform)
    identifier = job_id(job.name)
    token = kube.spec(identifier)["report"]["token"]
    checkpoint = training_job_pb2.Checkpoint(step=40, uri="s3://bucket/checkpoint-40")
    await platform.report(job.name, token, checkpoint=checkpoint)
    assert kube.resume_from(identifier) == "s3://bucket/checkpoint-40"

    kube.end_pod(pod, 137, "node lost")  # preempted: the Job controller retries
    first = pod.metadata.name
    pods = await until(pods_of(kube, identifier, 2), within=60)
    retried = next(p for p in pods if p.metadata.name != first)
    # The retried Pod reads the pointer at start: it resumes from the checkpoint.
    assert kube.resume_from(identifier) == "s3://bucket/checkpoint-40"

    async def retry_noted() -> bool:
        events = await platform.events(job.name)
        return any("retried" in e.log.text for e in events if e.HasField("log"))

    await until(retry_noted)
    # Until the retried Pod runs, the job waits (QUEUED: no worker to hear from).
    job = await platform.wait(job.name, "QUEUED")
    assert job.state_history[-1].reason == "WAITING_FOR_CAPACITY"

    kube.run_pod(retried)
    job = await platform.wait(job.name, "RUNNING")
    assert job.state_history[-1].reason == "RESUMED"
    kube.end_pod(retried, 137, "node lost again")
    job = await platform.wait(job.name, "FAILED", within=30)
    assert job.error.reason == "BACKOFF_LIMIT_EXCEEDED"
    assert "node lost again" in job.error.message
    events = await platform.events(job.name)
    # One retry, noted once: the failure that ended the Job is not called a retry.
    assert sum("retried" in e.log.text for e in events if e.HasField("log")) == 1


@pytest.mark.kubernetes
async def test_a_preempted_job_waits_past_the_worker_timeout_and_resumes(
    kube: Kube, kube_platform: Any
) -> None:
    """Kueue suspends the Job to preempt it, its Pod goes away, and no GPU is free to run the
    one the Job controller makes again: the job waits (for longer than the worker timeout)
    instead of failing, and resumes from its checkpoint once a Pod runs."""
    platform = await kube_platform(training={"worker_timeout_seconds": 2})
    job, pod = await running_job(kube, platform)
    identifier = job_id(job.name)
    token = kube.spec(identifier)["report"]["token"]
    checkpoint = training_job_pb2.Checkpoint(step=40, uri="s3://bucket/checkpoint-40")
    await platform.report(job.name, token, checkpoint=checkpoint)

    kube.suspend(identifier, True)
    kube.core.delete_namespaced_pod(pod.metadata.name, kube.namespace, grace_period_seconds=0)
    job = await platform.wait(job.name, "QUEUED", within=30)
    assert job.state_history[-1].reason == "PREEMPTED"

    await asyncio.sleep(5)  # well past the worker timeout
    job = await platform.wait(job.name, "QUEUED", "FAILED")
    assert job.state == State.STATE_QUEUED, job.error
    assert kube.jobs(identifier), "the Kubernetes Job was deleted"

    # Capacity again: the Job runs a Pod, which resumes from the checkpoint.
    kube.suspend(identifier, False)
    pods = await until(pods_of(kube, identifier), within=60)
    (again,) = [p for p in pods if p.metadata.name != pod.metadata.name]
    assert kube.resume_from(identifier) == "s3://bucket/checkpoint-40"
    kube.run_pod(again)
    job = await platform.wait(job.name, "RUNNING", within=30)
    assert [t.state for t in job.state_history][-3:] == [
        State.STATE_RUNNING,
        State.STATE_QUEUED,
        State.STATE_RUNNING,
    ]
    await platform.report(job.name, token, worker_state=Worker.WORKER_STATE_RUNNING)
    await asyncio.sleep(1)
    assert (await platform.wait(job.name, "RUNNING")).state == State.STATE_RUNNING


class PlayedKueue:
    """Kueue's part, played by the test on the real API server with Kueue's CRDs: a Workload
    for each queued Job (labelled with the Job's UID, owned by it), admission (quota reserved,
    admitted, the Job unsuspended) and preemption (evicted, the Job suspended). The v1.20
    server drops `spec.suspend`, so the Job controller makes Pods regardless: the Job's
    Suspended condition says what Kueue's suspension would, and the test's kubelet runs a Pod
    only while its Job is admitted."""

    def __init__(self, kube: Kube, queue: str) -> None:
        from kubernetes import client

        self.kube, self.queue = kube, queue
        self.custom = client.CustomObjectsApi(kube.core.api_client)
        self.custom.create_namespaced_custom_object(
            *KUEUE,
            kube.namespace,
            "localqueues",
            {
                "apiVersion": "kueue.x-k8s.io/v1beta1",
                "kind": "LocalQueue",
                "metadata": {"name": queue},
                "spec": {"clusterQueue": "gpus"},
            },
        )

    def _name(self, job_id: str) -> str:
        return f"job-{manifests.run_name(job_id)}-a1b2c"

    def queued(self, job_id: str, message: str) -> None:
        """Kueue took the Job in (its Workload) and cannot reserve quota for it yet."""
        (job,) = self.kube.jobs(job_id)
        assert job.metadata.labels[manifests.QUEUE_LABEL] == self.queue
        owner = {"apiVersion": "batch/v1", "kind": "Job", "name": job.metadata.name}
        workload = {
            "apiVersion": "kueue.x-k8s.io/v1beta1",
            "kind": "Workload",
            "metadata": {
                "name": self._name(job_id),
                "labels": {KUEUE_JOB_UID: job.metadata.uid},
                "ownerReferences": [{**owner, "uid": job.metadata.uid, "controller": True}],
            },
            "spec": {"queueName": self.queue, "podSets": [{"name": "main", "count": 1}]},
        }
        self.custom.create_namespaced_custom_object(
            *KUEUE, self.kube.namespace, "workloads", workload
        )
        self._conditions(job_id, {"QuotaReserved": ("False", "Pending", message)}, True)

    def admit(self, job_id: str) -> None:
        admitted = {
            "QuotaReserved": ("True", "QuotaReserved", "Quota reserved in ClusterQueue gpus"),
            "Admitted": ("True", "Admitted", "The workload is admitted"),
            "Evicted": ("False", "Admitted", "The workload is admitted"),
        }
        self._conditions(job_id, admitted, suspended=False)

    def preempt(self, job_id: str, message: str) -> None:
        evicted = {
            "QuotaReserved": ("False", "Pending", "Preempted"),
            "Admitted": ("False", "NoReservation", "The workload has no reservation"),
            "Evicted": ("True", "Preempted", message),
        }
        self._conditions(job_id, evicted, suspended=True)

    def _conditions(
        self, job_id: str, conditions: dict[str, tuple[str, str, str]], suspended: bool
    ) -> None:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        status = {
            "conditions": [
                {
                    "type": kind,
                    "status": value,
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": now,
                }
                for kind, (value, reason, message) in conditions.items()
            ]
        }
        self.custom.patch_namespaced_custom_object_status(
            *KUEUE, self.kube.namespace, "workloads", self._name(job_id), {"status": status}
        )
        self.kube.suspend(job_id, suspended)


@pytest.mark.kubernetes
async def test_a_queue_that_does_not_exist_is_refused_at_start(kube: Kube) -> None:
    """Jobs sent to a LocalQueue that is not there would wait suspended for ever."""
    launcher = KubernetesLauncher(KubernetesSettings(**kube.settings(queue_name="gpu-jobs")))
    with pytest.raises(RuntimeError, match="queue_name: there is no Kueue LocalQueue"):
        await launcher.start(lambda: None)
    await launcher.close()
    PlayedKueue(kube, "gpu-jobs")  # now there is one
    launcher = KubernetesLauncher(KubernetesSettings(**kube.settings(queue_name="gpu-jobs")))
    await launcher.start(lambda: None)
    await launcher.close()


@pytest.mark.kubernetes
@pytest.mark.timeout(600)
async def test_a_job_kueue_preempts_and_readmits_resumes_and_ends_as_if_never_stopped(
    kube: Kube, kube_platform: Any, tmp_path: Path
) -> None:
    """The real trainer runs in the Pods (tests/kube/kubelet.py). Kueue holds the Job for quota,
    admits it, preempts it after a checkpoint (its Pod killed and deleted) and admits it again:
    the job says why it waits at each turn, the new Pod resumes from the checkpoint, and the job
    SUCCEEDS with the same losses as an uninterrupted run of the same job."""
    kueue = PlayedKueue(kube, "gpu-jobs")
    platform = await kube_platform(queue_name="gpu-jobs")
    assert platform.server is not None
    service = {"tunefleet-training.tunefleet.svc:50051": f"127.0.0.1:{platform.server.port}"}
    kubelet = ProcessKubelet(kube, tmp_path / "pods", service)
    dataset = await platform.upload()
    steps = {"epochs": 2, "max_steps": 0, "eval_every_steps": 6, "checkpoint_every_steps": 3}

    # An uninterrupted run of the job, admitted at once.
    reference = await platform.create(
        dataset.name, resources=GPU, hyperparameters=steps, adapter="adapters/reference"
    )
    (pod,) = await until(pods_of(kube, job_id(reference.name)))
    kueue.queued(job_id(reference.name), "waiting for quota")
    kueue.admit(job_id(reference.name))
    run = await asyncio.to_thread(kubelet.start, pod)
    assert await asyncio.to_thread(kubelet.finish, run) == 0, kubelet.log(run)[-3000:]
    reference = await platform.wait(reference.name, "SUCCEEDED", within=120)

    job = await platform.create(dataset.name, resources=GPU, hyperparameters=steps)
    identifier = job_id(job.name)
    (pod,) = await until(pods_of(kube, identifier))
    no_quota = (
        "couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu in "
        "flavor default-flavor, 1 more needed"
    )
    kueue.queued(identifier, no_quota)

    async def noted(text: str) -> bool:
        events = await platform.events(job.name)
        return any(text in e.log.text for e in events if e.HasField("log"))

    await until(lambda: noted("waiting (WAITING_FOR_ADMISSION): Kueue has not admitted"))
    assert await noted(no_quota)
    assert (await platform.wait(job.name, "QUEUED")).state == State.STATE_QUEUED

    kueue.admit(identifier)
    first = await asyncio.to_thread(kubelet.start, pod)
    await platform.wait(job.name, "RUNNING", within=60)

    async def checkpointed() -> str:
        return await asyncio.to_thread(kube.resume_from, identifier)

    await until(checkpointed, within=120)  # a checkpoint stored and pointed at
    preempted = "Preempted to accommodate a workload (UID: 1234) due to prioritization"
    kueue.preempt(identifier, preempted)
    await asyncio.to_thread(kubelet.evict, first)
    progress = (await platform.wait(job.name, "QUEUED", within=30)).latest_progress
    assert 0 < progress.step < progress.total_steps, "the run ended before it was preempted"
    resume_from = kube.resume_from(identifier)
    stored = await platform.training.ListCheckpoints(
        training_service_pb2.ListCheckpointsRequest(parent=job.name)
    )
    checkpoint_step = {c.uri: c.step for c in stored.checkpoints}[resume_from]
    job = await platform.wait(job.name, "QUEUED")
    assert job.state_history[-1].reason == "PREEMPTED"
    assert preempted in job.state_history[-1].message

    kueue.admit(identifier)
    pods = await until(pods_of(kube, identifier))  # the Job controller makes the next Pod
    (again,) = [p for p in pods if p.metadata.name != pod.metadata.name]
    second = await asyncio.to_thread(kubelet.start, again)
    code = await asyncio.to_thread(kubelet.finish, second)
    assert code == 0, kubelet.log(second)[-3000:]
    job = await platform.wait(job.name, "SUCCEEDED", within=120)
    assert [t.reason for t in job.state_history if t.state == State.STATE_RUNNING][-1] == "RESUMED"

    # The second Pod's trainer resumed from the checkpoint the Secret pointed at.
    events = [
        json.loads(line)
        for line in (second.folder / "scratch/output/progress.jsonl").read_text().splitlines()
    ]
    (resumed,) = [e for e in events if e["event"] == "resumed"]
    assert resumed["step"] == checkpoint_step
    assert min(e["step"] for e in events if e["event"] == "progress") == resumed["step"] + 1
    # ... and ended as the uninterrupted run did.
    assert job.latest_progress.step == reference.latest_progress.step == 24  # two epochs
    assert job.latest_progress.train_loss == pytest.approx(
        reference.latest_progress.train_loss, rel=1e-6
    )
    assert job.evaluation.validation_loss == pytest.approx(
        reference.evaluation.validation_loss, rel=1e-6
    )


@pytest.mark.kubernetes
async def test_an_oom_killed_pod_fails_the_job_out_of_memory(
    kube: Kube, kube_platform: Any
) -> None:
    platform = await kube_platform(backoff_limit=0)
    job, pod = await running_job(kube, platform)
    kube.end_pod(pod, 137, reason="OOMKilled")
    job = await platform.wait(job.name, "FAILED", within=30)
    assert job.error.reason == "OUT_OF_MEMORY", job.error


@pytest.mark.kubernetes
async def test_a_trainer_that_could_not_register_leaves_it_to_the_service(
    kube: Kube, kube_platform: Any, chat_model: Path, tmp_path: Path
) -> None:
    platform = await kube_platform(backoff_limit=0)
    job, pod = await running_job(kube, platform)
    # The trainer stored its output and request in S3, but the registry stayed away: it exits 4
    # with its outcome in the termination message, and the service registers the output.
    request_uri = stored_request(platform, job.name, lora_adapter(chat_model, tmp_path / "a"))
    assert request_uri.startswith("s3://")
    outcome = {
        "reason": "REGISTRATION_FAILED",
        "message": "the registry stayed unavailable",
        "output_request": request_uri,
    }
    kube.end_pod(pod, 4, json.dumps(outcome))
    job = await platform.wait(job.name, "SUCCEEDED", "FAILED", within=60)
    assert job.state == State.STATE_SUCCEEDED, job.error
    assert job.output_adapter_version == "adapters/colours/versions/1"


@pytest.mark.kubernetes
async def test_cancel_deletes_the_job_and_its_pods(kube: Kube, kube_platform: Any) -> None:
    platform = await kube_platform()
    job, _ = await running_job(kube, platform)
    identifier = job_id(job.name)
    await platform.training.CancelTrainingJob(
        training_service_pb2.CancelTrainingJobRequest(name=job.name)
    )
    await platform.wait(job.name, "CANCELLED", within=30)
    assert kube.jobs(identifier) == []

    async def pods_gone() -> bool:
        return not await asyncio.to_thread(kube.pods, identifier)

    await until(pods_gone)


@pytest.mark.kubernetes
async def test_restart_reconciles_with_the_cluster(
    kube: Kube, kube_platform: Any, chat_model: Path, tmp_path: Path
) -> None:
    platform = await kube_platform()
    dataset = await platform.upload()
    done = await platform.create(dataset.name, resources=GPU)
    running = await platform.create(dataset.name, resources=GPU)
    pending = await platform.create(dataset.name, resources=GPU)
    done_pods = await until(pods_of(kube, job_id(done.name)))
    running_pods = await until(pods_of(kube, job_id(running.name)))
    await until(pods_of(kube, job_id(pending.name)))
    kube.run_pod(done_pods[0])
    kube.run_pod(running_pods[0])
    await platform.wait(done.name, "RUNNING", within=60)
    await platform.wait(running.name, "RUNNING", within=60)
    # One trainer registers its result, then TrainingService goes down.
    adapter = lora_adapter(chat_model, tmp_path / "adapter")
    request_uri = stored_request(platform, done.name, adapter)
    registered = await platform.adapters.CreateAdapterVersion(
        adapter_service_pb2.CreateAdapterVersionRequest.FromString(
            platform.storage.blobs.read_bytes(request_uri[-64:])
        )
    )
    await platform.stop()

    # While it is down, that run finishes; its last report never arrived, but the trainer left
    # the version's name in the termination message.
    kube.end_pod(done_pods[0], 0, json.dumps({"adapter_version": registered.name}))
    await until(lambda: _job_complete(kube, job_id(done.name)))

    await platform.start()
    job = await platform.wait(done.name, "SUCCEEDED", within=20)
    assert job.output_adapter_version == registered.name
    assert (await platform.wait(running.name, "RUNNING")).state == State.STATE_RUNNING
    assert (await launched(platform, pending.name)).state == State.STATE_QUEUED
    await asyncio.sleep(1.0)
    for name in (done.name, running.name, pending.name):  # nothing was launched twice
        assert len(kube.jobs(job_id(name))) == 1
        assert len(kube.pods(job_id(name))) == 1
    kube.run_pod(kube.pods(job_id(pending.name))[0])
    await platform.wait(pending.name, "RUNNING", within=60)


def test_kubernetes_validate_cli_accepts_the_written_manifests(tmp_path: Path) -> None:
    """The command users run in CI on rendered manifests."""
    import subprocess
    import sys

    import yaml

    settings = KubernetesSettings()
    documents = [
        manifests.secret_manifest(settings, run_request()),
        manifests.job_manifest(settings, run_request()),
    ]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump_all(documents))
    cli = Path(sys.executable).parent / "kubernetes-validate"
    result = subprocess.run(
        [str(cli), "--strict", "--quiet", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


class FakeKubelet:
    """The kubelet's log endpoint (HTTPS, `/containerLogs/{namespace}/{pod}/{container}`), which
    the API server proxies `pods/log` to: serves the lines a test gives it, with timestamps."""

    def __init__(self, directory: Path) -> None:
        import http.server
        import ssl
        import threading

        from tests.runtime.certs import CertificateAuthority

        self.lines: list[str] = []
        self.paths: list[str] = []
        kubelet = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                kubelet.paths.append(self.path)
                body = "".join(f"{line}\n" for line in kubelet.lines).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        pair = CertificateAuthority(directory, "kubelet CA").issue("kubelet", server=True)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pair.cert, pair.key)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def say(self, text: str) -> None:
        self.lines.append(f"{datetime.now(UTC).isoformat().replace('+00:00', 'Z')} {text}")


@pytest.mark.kubernetes
async def test_pod_logs_reach_the_event_feed(
    kube: Kube, kube_platform: Any, tmp_path: Path
) -> None:
    kubelet = FakeKubelet(tmp_path)
    node = f"gpu-node-{uuid.uuid4().hex[:6]}"
    kube.core.create_node({"metadata": {"name": node}})
    kube.core.patch_node_status(
        node,
        {
            "status": {
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet.port}},
            }
        },
    )
    platform = await kube_platform()
    dataset = await platform.upload()
    job = await platform.create(dataset.name, resources=GPU)
    (pod,) = await until(pods_of(kube, job_id(job.name)))
    binding = {
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": pod.metadata.name},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    }  # what the scheduler does
    kube.core.create_namespaced_pod_binding(
        pod.metadata.name, kube.namespace, binding, _preload_content=False
    )
    kubelet.say("loading the base model")
    kube.run_pod(pod)
    await platform.wait(job.name, "RUNNING", within=60)

    async def logged(*texts: str) -> bool:
        events = await platform.events(job.name)
        seen = [e.log.text for e in events if e.HasField("log")]
        return all(text in seen for text in texts)

    await until(lambda: logged("loading the base model"))
    kubelet.say("step 1 of 10")
    await until(lambda: logged("loading the base model", "step 1 of 10"))
    events = await platform.events(job.name)
    texts = [e.log.text for e in events if e.HasField("log")]
    assert texts.count("loading the base model") == 1  # each line once
    assert kubelet.paths[0].startswith(f"/containerLogs/{kube.namespace}/{pod.metadata.name}/")
    assert "timestamps=true" in kubelet.paths[0]
