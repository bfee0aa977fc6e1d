"""The Kubernetes objects of one training run: a Secret holding the trainer spec (it carries the
worker token) and a batch/v1 Job running the trainer image on GPU nodes.

A run of more than one node is an Indexed Job of one Pod per node (completions = parallelism =
nodes) with a headless Service of the run's name as the Pods' subdomain, so that each Pod has a
stable name, `<run>-<index>.<run>`: torchrun on every node meets the first one there, and takes
its node rank from the Pod's completion index. Global rank 0 (on the first node) reports,
checkpoints and registers.

With a Kueue queue (`queue_name`), Jobs are created suspended and labelled for it (and with a
WorkloadPriorityClass from the job's priority): Kueue admits one by unsuspending it, and preempts
it by suspending it again.

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
from tunefleet.training.launcher import EXIT_REASONS, Nodes, RunRequest, trainer_command

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
# Where the first node's torchrun listens for the others; the Pod annotation giving its index.
RENDEZVOUS_PORT = 29500
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
# Kueue's labels: the LocalQueue a Job is submitted to, and its WorkloadPriorityClass.
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"


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


def service_manifest(settings: KubernetesSettings, request: RunRequest) -> dict[str, Any]:
    """The headless Service giving a multi-node run's Pods their DNS names (before they are
    ready: the first node must be found while it waits for the others)."""
    name = run_name(request.job_id)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": labels(request.job_id),
        },
        "spec": {
            "clusterIP": "None",
            "selector": {MANAGED_BY: "tunefleet", JOB_LABEL: request.job_id},
            "publishNotReadyAddresses": True,
            "ports": [{"name": "torchrun", "port": RENDEZVOUS_PORT, "protocol": "TCP"}],
        },
    }


def job_manifest(settings: KubernetesSettings, request: RunRequest) -> dict[str, Any]:
    name = run_name(request.job_id)
    nodes = None
    if request.node_count > 1:
        address = f"{name}-0.{name}"  # the first Pod, in the headless Service of the run's name
        nodes = Nodes(request.node_count, "$(NODE_RANK)", address, RENDEZVOUS_PORT)
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
        "command": trainer_command("python", request.gpu_count, f"{SPEC_DIR}/spec.json", nodes),
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
    pod_spec: dict[str, Any] = {
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
    }
    job_spec: dict[str, Any] = {"completions": 1, "parallelism": 1}
    if nodes is not None:
        # Kubernetes fills in $(NODE_RANK) in the command from this variable.
        index = f"metadata.annotations['{INDEX_ANNOTATION}']"
        container["env"].append(
            {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": index}}}
        )
        container["ports"] = [{"name": "torchrun", "containerPort": RENDEZVOUS_PORT}]
        pod_spec["subdomain"] = name
        job_spec = {
            "completionMode": "Indexed",
            "completions": nodes.count,
            "parallelism": nodes.count,
        }
    job_labels = labels(request.job_id)
    if settings.queue_name:
        # Created suspended: Kueue admits the Job (unsuspends it) when its quota allows.
        job_spec["suspend"] = True
        job_labels[QUEUE_LABEL] = settings.queue_name
        classes = settings.priority_classes.items()
        fitting = [(least, name) for name, least in classes if least <= request.priority]
        if fitting:  # the class of the highest threshold the job's priority reaches
            job_labels[PRIORITY_LABEL] = max(fitting)[1]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": job_labels,
            "annotations": {"tunefleet.dev/training-job-name": f"trainingJobs/{request.job_id}"},
        },
        "spec": {
            # A gang restart (a node lost: its peers end PEER_LOST) fails every node's Pod.
            "backoffLimit": settings.backoff_limit * max(request.node_count, 1),
            "activeDeadlineSeconds": request.max_run_seconds or settings.active_deadline_seconds,
            "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
            **job_spec,
            # The trainer's own failures are final (see EXIT_REASONS: it failed, the spec cannot
            # work, it was cancelled, its result could not be registered, memory ran out); a Pod
            # disrupted by preemption or eviction is retried without counting against
            # backoffLimit, and so is, counting, one whose trainer lost a peer (PEER_LOST_EXIT):
            # all of a multi-node run's Pods start again, and resume from the checkpoint.
            # (Servers before 1.26 ignore this and retry every failure up to backoffLimit.) The
            # empty `onPodConditions` is for the 1.27 and 1.28 schemas, which require the field;
            # their servers accept it empty beside `onExitCodes`.
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
            "template": {"metadata": {"labels": labels(request.job_id)}, "spec": pod_spec},
        },
    }
