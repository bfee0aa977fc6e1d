"""Helpers for tests against the test control plane (tests/kube/cluster.py): a namespace of
one's own in which the test plays the kubelet, polling, and a launcher request."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config

from tests.kube.cluster import Cluster
from tunefleet.training import manifests
from tunefleet.training.launcher import RunRequest


def run_request(job_id: str = "abc123", gpus: int = 1, **fields: Any) -> RunRequest:
    """What TrainingService hands the launcher, with the least of a spec."""
    spec = {"base_model": "colours", "report": {"token": "secret", "job": f"trainingJobs/{job_id}"}}
    return RunRequest(job_id=job_id, spec=spec, gpu_count=gpus, gpu_type="nvidia-l4", **fields)


class Kube:
    """A test namespace and the clients to play the kubelet in it."""

    def __init__(self, cluster: Cluster) -> None:
        api = config.new_client_from_config(str(cluster.kubeconfig))
        self.core, self.batch = client.CoreV1Api(api), client.BatchV1Api(api)
        self.cluster = cluster
        self.namespace = f"t-{uuid.uuid4().hex[:8]}"
        self.core.create_namespace({"metadata": {"name": self.namespace}})
        self.core.create_namespaced_service_account(
            self.namespace, {"metadata": {"name": "tunefleet-trainer"}}
        )

    def settings(self, **fields: Any) -> dict[str, Any]:
        return {"kubeconfig": str(self.cluster.kubeconfig), "namespace": self.namespace, **fields}

    def jobs(self, job_id: str) -> list[Any]:
        selector = f"{manifests.JOB_LABEL}={job_id}"
        return list(self.batch.list_namespaced_job(self.namespace, label_selector=selector).items)

    def pods(self, job_id: str) -> list[Any]:
        selector = f"{manifests.JOB_LABEL}={job_id}"
        items = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        return sorted(items, key=lambda p: p.metadata.creation_timestamp)

    def spec(self, job_id: str) -> dict[str, Any]:
        secret = self.core.read_namespaced_secret(manifests.run_name(job_id), self.namespace)
        return dict(json.loads(base64.b64decode(secret.data["spec.json"])))

    def resume_from(self, job_id: str) -> str:
        """The checkpoint pointer the trainer reads beside its spec."""
        secret = self.core.read_namespaced_secret(manifests.run_name(job_id), self.namespace)
        return base64.b64decode((secret.data or {}).get(manifests.RESUME_KEY, "")).decode()

    def suspend(self, job_id: str, suspended: bool) -> None:
        """The Job's Suspended condition, as Kueue's suspension (or admission) leaves it on
        servers that know `spec.suspend` (the test server, v1.20, drops the field)."""
        now = datetime.now(UTC).isoformat()
        condition = {
            "type": "Suspended",
            "status": "True" if suspended else "False",
            "reason": "JobSuspended" if suspended else "JobResumed",
            "message": "Job suspended" if suspended else "Job resumed",
            "lastProbeTime": now,
            "lastTransitionTime": now,
        }
        self.batch.patch_namespaced_job_status(
            manifests.run_name(job_id), self.namespace, {"status": {"conditions": [condition]}}
        )

    def run_pod(self, pod: Any) -> None:
        now = datetime.now(UTC).isoformat()
        self._status(pod, "Running", {"running": {"startedAt": now}})

    def end_pod(self, pod: Any, exit_code: int, message: str = "", reason: str = "") -> None:
        now = datetime.now(UTC).isoformat()
        terminated = {
            "exitCode": exit_code,
            "reason": reason or ("Completed" if exit_code == 0 else "Error"),
            "message": message,
            "startedAt": now,
            "finishedAt": now,
        }
        self._status(pod, "Succeeded" if exit_code == 0 else "Failed", {"terminated": terminated})

    def _status(self, pod: Any, phase: str, state: dict[str, Any]) -> None:
        container = {
            "name": manifests.CONTAINER,
            "image": "trainer",
            "imageID": "",
            "ready": phase == "Running",
            "restartCount": 0,
            "state": state,
        }
        self.core.patch_namespaced_pod_status(
            pod.metadata.name,
            self.namespace,
            {"status": {"phase": phase, "containerStatuses": [container]}},
        )


async def until(check: Callable[[], Awaitable[Any]], within: float = 30.0) -> Any:
    """Poll `check` until it returns something truthy, and return that."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.1)


def pods_of(kube: Kube, job_id: str, count: int = 1) -> Callable[[], Awaitable[list[Any]]]:
    """A check for `until`: the job's Pods, once there are `count` of them."""

    async def check() -> list[Any]:
        pods = await asyncio.to_thread(kube.pods, job_id)
        return pods if len(pods) >= count else []

    return check
