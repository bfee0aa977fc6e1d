"""The Kubernetes launcher: each run is a batch/v1 Job (see manifests.py) in one namespace.

Two watch threads (Jobs and Pods with tunefleet's label, each listed first and watched from that
list's resourceVersion, listed again when the watch expires) keep a cache that `status` reads,
and wake the scheduler on every change. A run's id is its Job's name, derived from the job id,
so a launch repeated after a restart finds the Job it created before (409 Conflict) instead of
creating a second, and a restarted service finds every run by label.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from tunefleet.runtime.settings import KubernetesSettings
from tunefleet.trainer import outcome
from tunefleet.training import manifests
from tunefleet.training.launcher import LogLine, Phase, Run, RunRequest, RunStatus

log = logging.getLogger(__name__)

WATCH_SECONDS = 30
KUEUE = ("kueue.x-k8s.io", "v1beta1")
KUEUE_JOB_UID = "kueue.x-k8s.io/job-uid"  # Kueue's label on a Job's Workload
MAX_LOG_BYTES = 1024 * 1024


class KubernetesLauncher:
    name = "kubernetes"

    def __init__(self, settings: KubernetesSettings, api_client: Any = None) -> None:
        self.settings = settings
        self.namespace = settings.namespace
        self._api_client = api_client
        self._jobs: dict[str, Any] = {}
        self._pods: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._wake: Callable[[], None] = lambda: None

    # --- connection and watches ----------------------------------------------------------------

    async def start(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        await asyncio.to_thread(self._connect)
        if self.settings.queue_name:
            await asyncio.to_thread(self._check_queue)
        versions = await asyncio.to_thread(lambda: (self._relist("jobs"), self._relist("pods")))
        for kind, version in zip(("jobs", "pods"), versions, strict=True):
            thread = threading.Thread(
                target=self._watch, args=(kind, version), name=f"watch-{kind}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _connect(self) -> None:
        from kubernetes import client

        if self._api_client is None:
            self._api_client = api_client(self.settings)
        self.batch = client.BatchV1Api(self._api_client)
        self.core = client.CoreV1Api(self._api_client)
        self.custom = client.CustomObjectsApi(self._api_client)

    def _check_queue(self) -> None:
        """Refuse a queue that does not exist: its Jobs would wait suspended for ever."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.get_namespaced_custom_object(
                *KUEUE, self.namespace, "localqueues", self.settings.queue_name
            )
        except ApiException as error:
            if error.status != 404:
                raise
            raise RuntimeError(
                f"training.kubernetes.queue_name: there is no Kueue LocalQueue "
                f"{self.settings.queue_name!r} in namespace {self.namespace!r} (or Kueue is not "
                "installed); Jobs sent to it would never be admitted"
            ) from None

    async def close(self) -> None:
        self._stopped.set()

    def _list(self, kind: str) -> Callable[..., Any]:
        listing: Callable[..., Any] = (
            self.batch.list_namespaced_job if kind == "jobs" else self.core.list_namespaced_pod
        )
        return listing

    def _relist(self, kind: str) -> str:
        listed = self._list(kind)(self.namespace, label_selector=manifests.SELECTOR)
        with self._lock:
            cache = {item.metadata.name: item for item in listed.items}
            if kind == "jobs":
                self._jobs = cache
            else:
                self._pods = cache
        self._wake()
        return str(listed.metadata.resource_version)

    def _watch(self, kind: str, version: str | None) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        while not self._stopped.is_set():
            try:
                if version is None:
                    version = self._relist(kind)
                stream = watch.Watch().stream(
                    self._list(kind),
                    self.namespace,
                    label_selector=manifests.SELECTOR,
                    resource_version=version,
                    timeout_seconds=WATCH_SECONDS,
                )
                for event in stream:
                    if self._stopped.is_set():
                        return
                    item = event["object"]
                    if event["type"] == "ERROR":  # the version expired (410 Gone)
                        version = None
                        break
                    with self._lock:
                        cache = self._jobs if kind == "jobs" else self._pods
                        if event["type"] == "DELETED":
                            cache.pop(item.metadata.name, None)
                        else:
                            cache[item.metadata.name] = item
                    version = item.metadata.resource_version
                    self._wake()
            except ApiException as error:
                if error.status != 410:
                    log.warning("watching %s failed: %s", kind, error.reason)
                    self._stopped.wait(1.0)
                version = None
            except Exception as error:  # the connection broke: list again, then watch
                if self._stopped.is_set():
                    return
                log.warning("watching %s failed (%s); listing again", kind, error)
                self._stopped.wait(1.0)
                version = None

    # --- runs ----------------------------------------------------------------------------------

    async def launch(self, request: RunRequest) -> Run:
        return await asyncio.to_thread(self._launch, request)

    def _launch(self, request: RunRequest) -> Run:
        from kubernetes.client.exceptions import ApiException

        name = manifests.run_name(request.job_id)
        secret = manifests.secret_manifest(self.settings, request)
        try:
            self.core.create_namespaced_secret(self.namespace, secret)
        except ApiException as error:
            if error.status != 409:
                raise
            # Launched before (a restart between the two creates): write the spec again. A patch,
            # not a read and replace: the Role grants no reading of Secrets.
            self.core.patch_namespaced_secret(
                name, self.namespace, {"stringData": secret["stringData"]}
            )
        if request.node_count > 1:
            try:
                self.core.create_namespaced_service(
                    self.namespace, manifests.service_manifest(self.settings, request)
                )
            except ApiException as error:
                if error.status != 409:
                    raise
        try:
            job = self.batch.create_namespaced_job(
                self.namespace, manifests.job_manifest(self.settings, request)
            )
            log.info("created Job %s/%s", self.namespace, name)
        except ApiException as error:
            if error.status != 409:
                raise
            job = self.batch.read_namespaced_job(name, self.namespace)  # launched before
        # The Secret (and the Service) go when the Job goes (garbage collection by owner).
        owner = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": name,
            "uid": job.metadata.uid,
        }
        owned = {"metadata": {"ownerReferences": [owner]}}
        self.core.patch_namespaced_secret(name, self.namespace, owned)
        if request.node_count > 1:
            self.core.patch_namespaced_service(name, self.namespace, owned)
        with self._lock:
            self._jobs.setdefault(name, job)
        return Run(name, {"namespace": self.namespace})

    async def status(self, run: Run) -> RunStatus:
        return await asyncio.to_thread(self._status, run)

    def _status(self, run: Run) -> RunStatus:
        from kubernetes.client.exceptions import ApiException

        with self._lock:
            job = self._jobs.get(run.run_id)
            pods = [p for p in self._pods.values() if _owned_by(p, run.run_id)]
        if job is None:  # perhaps not seen by the watch yet: ask
            try:
                job = self.batch.read_namespaced_job(run.run_id, self.namespace)
            except ApiException as error:
                if error.status == 404:
                    return RunStatus(Phase.MISSING)
                raise
        status = job.status
        retries = int(status.failed or 0)
        conditions = {c.type: c for c in status.conditions or [] if c.status == "True"}
        said = _outcome(pods)
        if "Complete" in conditions:
            return RunStatus(
                Phase.SUCCEEDED,
                retries=retries,
                output_adapter_version=str(said.get("adapter_version", "")),
                output_request=str(said.get("output_request", "")),
            )
        if "Failed" in conditions:
            condition = conditions["Failed"]
            message = condition.message or condition.reason or "the Job failed"
            termination = _termination_message(pods)
            reason = _snake(condition.reason or "JobFailed")
            if said.get("reason"):
                reason = str(said["reason"])  # the trainer said why (PodFailurePolicy)
            elif _last_terminated_reason(pods) == "OOMKilled":
                reason = "OUT_OF_MEMORY"
            return RunStatus(
                Phase.FAILED,
                reason,
                f"{message}{': ' + termination if termination else ''}",
                retries=max(0, retries - 1),  # the last failure ended the Job: not retried
                output_request=str(said.get("output_request", "")),
            )
        if any(p.status.phase == "Running" for p in pods):
            return RunStatus(Phase.RUNNING, "", _termination_message(pods), retries)
        if "Suspended" in conditions or getattr(job.spec, "suspend", False):
            reason, message = kueue_wait(self._workload(job)) or (
                "PREEMPTED",
                "the Job was suspended (preempted by the cluster's queue); it resumes from its "
                "last checkpoint when it runs again",
            )
            return RunStatus(Phase.PENDING, reason, message, retries)
        return RunStatus(
            Phase.PENDING,
            "WAITING_FOR_CAPACITY",
            "no Pod of the Job is running (waiting to be scheduled)",
            retries,
        )

    def _workload(self, job: Any) -> dict[str, Any] | None:
        """Kueue's Workload for the Job (labelled with the Job's UID), when a queue is set."""
        from kubernetes.client.exceptions import ApiException

        if not self.settings.queue_name:
            return None
        try:
            found = self.custom.list_namespaced_custom_object(
                *KUEUE,
                self.namespace,
                "workloads",
                label_selector=f"{KUEUE_JOB_UID}={job.metadata.uid}",
            )
        except ApiException as error:  # Kueue's CRDs missing, or no right to read them
            log.debug("cannot read the Workload of %s: %s", job.metadata.name, error.reason)
            return None
        items: list[dict[str, Any]] = found.get("items", [])
        return items[0] if items else None

    async def cancel(self, run: Run) -> None:
        await asyncio.to_thread(self._cancel, run)

    def _cancel(self, run: Run) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.batch.delete_namespaced_job(
                run.run_id, self.namespace, propagation_policy="Background"
            )
        except ApiException as error:
            if error.status != 404:
                raise
        # Its Pods go with it: the garbage collector deletes what the Job owns (Background
        # propagation), so the account needs no right to delete Pods.
        log.info("deleted Job %s/%s (its Pods follow)", self.namespace, run.run_id)

    async def logs(self, run: Run, cursor: dict[str, Any]) -> tuple[list[LogLine], dict[str, Any]]:
        return await asyncio.to_thread(self._logs, run, cursor)

    def _logs(self, run: Run, cursor: dict[str, Any]) -> tuple[list[LogLine], dict[str, Any]]:
        """New lines of the newest Pod's trainer container, read with timestamps and kept only
        past the last one seen (the API has no "since this line")."""
        from kubernetes.client.exceptions import ApiException

        with self._lock:
            pods = _first_node([p for p in self._pods.values() if _owned_by(p, run.run_id)])
        started = [p for p in pods if p.status.phase in ("Running", "Succeeded", "Failed")]
        if not started:
            return [], cursor
        pod = max(started, key=lambda p: p.metadata.creation_timestamp)
        last = cursor.get("last", "") if cursor.get("pod") == pod.metadata.name else ""
        options: dict[str, Any] = {"timestamps": True, "limit_bytes": MAX_LOG_BYTES}
        if last:
            seen = datetime.fromisoformat(_instant(last)[:26] + "+00:00")
            options["since_seconds"] = max(1, int((datetime.now(UTC) - seen).total_seconds()) + 2)
        try:
            # The raw body: the client's own decoding of a log turns it into the repr of bytes.
            response = self.core.read_namespaced_pod_log(
                pod.metadata.name,
                self.namespace,
                container=manifests.CONTAINER,
                _preload_content=False,
                **options,
            )
        except ApiException as error:
            log.debug("no logs of %s yet: %s", pod.metadata.name, error.reason)
            return [], cursor
        lines, last = new_lines(response.data.decode("utf-8", "replace"), last)
        return lines, {"pod": pod.metadata.name, "last": last}

    async def checkpoint_saved(self, run: Run, uri: str) -> None:
        await asyncio.to_thread(self._resume_from, run, uri)

    def _resume_from(self, run: Run, uri: str) -> None:
        """Point the run at the checkpoint, so that a retried Pod (preemption, node loss) resumes
        from it: Secret volumes are read when a Pod starts, and the trainer reads the key
        `resume_from` beside its spec. Written blind, so the Role needs no reading of Secrets."""
        self.core.patch_namespaced_secret(
            run.run_id, self.namespace, {"stringData": {manifests.RESUME_KEY: uri}}
        )


def api_client(settings: KubernetesSettings) -> Any:
    """A client of the API server: from `kubeconfig`, else the Pod's service account."""
    from kubernetes import client, config

    if settings.kubeconfig is not None:
        return config.new_client_from_config(str(settings.kubeconfig))
    configuration = client.Configuration()
    config.load_incluster_config(client_configuration=configuration)
    return client.ApiClient(configuration)


def kueue_wait(workload: dict[str, Any] | None) -> tuple[str, str] | None:
    """Why Kueue holds a suspended Job, from its Workload's conditions: evicted (preempted), or
    not admitted yet (its quota message); None when the Workload says neither."""
    if workload is None:
        return None
    conditions = {c.get("type"): c for c in (workload.get("status") or {}).get("conditions", [])}

    def holds(kind: str) -> dict[str, Any] | None:
        condition = conditions.get(kind)
        return condition if condition and condition.get("status") == "True" else None

    if holds("Admitted"):
        return None  # unsuspended in a moment
    if evicted := holds("Evicted"):
        cause = evicted.get("reason") or "Evicted"
        return (
            "PREEMPTED" if cause == "Preempted" else _snake(cause),
            f"Kueue evicted the Job ({cause}: {evicted.get('message', '')}); it resumes from its "
            "last checkpoint when Kueue admits it again",
        )
    reserved = conditions.get("QuotaReserved") or {}
    why = reserved.get("message") or "no quota reserved yet"
    queue = (workload.get("spec") or {}).get("queueName", "")
    return "WAITING_FOR_ADMISSION", f"Kueue has not admitted the Job (queue {queue}): {why}"


def new_lines(text: str, last: str) -> tuple[list[LogLine], str]:
    """The lines of a timestamped Pod log (`<RFC 3339 time> <line>`) after time `last`, and the
    time of the newest line."""
    lines = []
    for raw in text.splitlines():
        stamp, _, line = raw.partition(" ")
        if last and _instant(stamp) <= _instant(last):
            continue
        lines.append(LogLine("stdout", line))
        last = stamp
    return lines, last


def _instant(stamp: str) -> str:
    """An RFC 3339 UTC time with nanoseconds padded, so that times compare as strings (the
    kubelet trims trailing zeros)."""
    seconds, _, fraction = stamp.rstrip("Z").partition(".")
    return f"{seconds}.{fraction.ljust(9, '0')}"


def _job_id(run_id: str) -> str:
    return run_id.removeprefix(manifests.run_name(""))


def _owned_by(pod: Any, run_id: str) -> bool:
    return bool((pod.metadata.labels or {}).get(manifests.JOB_LABEL) == _job_id(run_id))


def _terminated(pods: list[Any]) -> list[tuple[Any, Any]]:
    """The trainer containers that ended, oldest first, as (sort key, terminated state)."""
    ended = []
    for pod in pods:
        for container in pod.status.container_statuses or []:
            terminated = container.state and container.state.terminated
            if terminated is not None:
                # Times have whole seconds; the resource version orders changes within one.
                finished = terminated.finished_at or pod.metadata.creation_timestamp
                ended.append(((finished, int(pod.metadata.resource_version or 0)), terminated))
    return sorted(ended, key=lambda item: item[0])


def _termination_message(pods: list[Any]) -> str:
    """What the trainer container that ended last said (the reason and message of its outcome,
    or the last lines of its log), with its exit code."""
    ended = []
    for key, terminated in _terminated(pods):
        text = (terminated.message or terminated.reason or "").strip()
        said = outcome.read(text)
        if said.get("reason"):
            text = f"{said['reason']}: {said.get('message', '')}"
        elif said:
            text = terminated.reason or ""
        told = f"exit code {terminated.exit_code}" + (f": {text[-500:]}" if text else "")
        ended.append((key, told))
    for pod in pods:
        if pod.status.phase == "Failed" and not pod.status.container_statuses:
            reason = pod.status.message or pod.status.reason or f"Pod {pod.metadata.name} failed"
            ended.append(((pod.metadata.creation_timestamp, 0), reason))
    return max(ended, key=lambda item: item[0])[1] if ended else ""


def _last_terminated_reason(pods: list[Any]) -> str:
    ended = _terminated(pods)
    return str(ended[-1][1].reason or "") if ended else ""


def _first_node(pods: list[Any]) -> list[Any]:
    """The Pods of a run's first node (all of a one-node run's): the trainer process of global
    rank 0, which logs the progress and leaves the outcome, runs there."""
    return [
        pod
        for pod in pods
        if (pod.metadata.annotations or {}).get(manifests.INDEX_ANNOTATION, "0") == "0"
    ]


def _outcome(pods: list[Any]) -> dict[str, Any]:
    """What the first node's trainer container that ended last left in its termination message
    (see tunefleet.trainer.outcome): the registered version, the stored registration request,
    or why it failed."""
    ended = _terminated(_first_node(pods))
    return outcome.read(ended[-1][1].message or "") if ended else {}


def _snake(reason: str) -> str:
    """BackoffLimitExceeded -> BACKOFF_LIMIT_EXCEEDED."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", reason).upper()
