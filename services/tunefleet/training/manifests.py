"""The Kubernetes objects of one training run: a Secret holding the trainer spec (it carries the
worker token) and a batch/v1 Job running the trainer image on GPU nodes.

The Secret's `spec.json` is written once; the launcher later adds the key `resume_from` (the last
checkpoint) with a blind patch, so the training service never needs to read Secrets back. The
trainer reads that file beside its spec (tunefleet.trainer.spec.load_spec).

Plain dictionaries, as `kubectl apply` would take them; tests check them against the schemas of
current Kubernetes versions with `kubernetes-validate --strict`.
"""

from __future__ import annotations

import json
from typing import Any

from tunefleet.runtime.settings import KubernetesSettings
from tunefleet.training.launcher import EXIT_REASONS, RunRequest, trainer_command

MANAGED_BY = "app.kubernetes.io/managed-by"
JOB_LABEL = "tunefleet.dev/training-job"
SELECTOR = f"{MANAGED_BY}=tunefleet"
SPEC_DIR = "/etc/tunefleet"
RESUME_KEY = "resume_from"
SCRATCH = "/scratch"
CONTAINER = "trainer"
# The trainer image's user (deploy/images/trainer.Dockerfile); as the Pod's fsGroup it owns the
# spec Secret's files (mode 0440) and the scratch volume.
TRAINER_UID = 10001


def run_name(job_id: str) -> str:
    return f"tunefleet-train-{job_id}"


def labels(job_id: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "tunefleet-trainer",
        "app.kubernetes.io/component": "training",
        MANAGED_BY: "tunefleet",
        JOB_LABEL: job_id,
    }


def worker_spec(request: RunRequest) -> dict[str, Any]:
    """The trainer spec as the Pod sees it: output on the scratch volume."""
    return {**request.spec, "output_dir": f"{SCRATCH}/output"}


def secret_manifest(settings: KubernetesSettings, request: RunRequest) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": run_name(request.job_id),
            "namespace": settings.namespace,
            "labels": labels(request.job_id),
        },
        "type": "Opaque",
        "stringData": {"spec.json": json.dumps(worker_spec(request), indent=1)},
    }


def job_manifest(settings: KubernetesSettings, request: RunRequest) -> dict[str, Any]:
    name = run_name(request.job_id)
    gpus = str(request.gpu_count)
    cpu = request.cpu_cores or settings.cpu_cores
    memory = str(request.memory_bytes or settings.memory_bytes)
    node_selector = dict(settings.node_selector)
    if request.gpu_type:
        node_selector[settings.gpu_type_label] = request.gpu_type
    volumes: list[dict[str, Any]] = [
        {"name": "spec", "secret": {"secretName": name, "defaultMode": 0o440}},
        {"name": "scratch", "emptyDir": {"sizeLimit": str(settings.scratch_size_bytes)}},
        {"name": "tmp", "emptyDir": {}},  # the root filesystem is read-only
        # NCCL exchanges data through shared memory; the container default of 64 MiB is too small.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
        {"name": "scratch", "mountPath": SCRATCH},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 (a mount point, not a file)
        {"name": "dshm", "mountPath": "/dev/shm"},  # noqa: S108 (a mount point, not a file)
    ]
    if settings.model_cache_claim:
        volumes.append(
            {
                "name": "models",
                "persistentVolumeClaim": {
                    "claimName": settings.model_cache_claim,
                    "readOnly": True,
                },
            }
        )
        mounts.append({"name": "models", "mountPath": settings.model_cache_path, "readOnly": True})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": trainer_command("python", request.gpu_count, f"{SPEC_DIR}/spec.json"),
        "env": [
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "HOME", "value": SCRATCH},  # caches (torch, triton) go to scratch
            {"name": "HF_HOME", "value": f"{SCRATCH}/huggingface"},
            {"name": "TUNEFLEET_TRAINING_JOB", "value": f"trainingJobs/{request.job_id}"},
            # The trainer leaves its result in the termination message.
            {"name": "TUNEFLEET_RESULT_FILE", "value": "/dev/termination-log"},
        ],
        "envFrom": [{"secretRef": {"name": secret}} for secret in settings.env_from_secrets],
        "resources": {
            # Extended resources such as GPUs must have requests equal to limits.
            "requests": {"cpu": f"{cpu:g}", "memory": memory, "nvidia.com/gpu": gpus},
            "limits": {"memory": memory, "nvidia.com/gpu": gpus},
        },
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": labels(request.job_id),
            "annotations": {"tunefleet.dev/training-job-name": f"trainingJobs/{request.job_id}"},
        },
        "spec": {
            "backoffLimit": settings.backoff_limit,
            "activeDeadlineSeconds": request.max_run_seconds or settings.active_deadline_seconds,
            "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
            "completions": 1,
            "parallelism": 1,
            # The trainer's own failures are final (see EXIT_REASONS: it failed, the spec cannot
            # work, it was cancelled, its result could not be registered, memory ran out); a Pod
            # disrupted by preemption or eviction is retried without counting against
            # backoffLimit. (Servers before 1.26 ignore this and retry every failure up to
            # backoffLimit.) The empty `onPodConditions` is for the 1.27 and 1.28 schemas, which
            # require the field; their servers accept it empty beside `onExitCodes`.
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": CONTAINER,
                            "operator": "In",
                            "values": sorted(EXIT_REASONS),
                        },
                        "onPodConditions": [],
                    },
                    {
                        "action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    },
                ]
            },
            "template": {
                "metadata": {"labels": labels(request.job_id)},
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": settings.service_account,
                    "automountServiceAccountToken": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": TRAINER_UID,
                        "runAsGroup": TRAINER_UID,
                        "fsGroup": TRAINER_UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "nodeSelector": node_selector,
                    "tolerations": settings.tolerations,
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }
