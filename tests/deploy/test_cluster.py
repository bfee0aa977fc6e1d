"""deploy/ against a real Kubernetes API server (tests/kube: etcd, kube-apiserver v1.20 and the
Job controller): `kubectl apply --dry-run=server -k` of each overlay with the Prometheus
Operator's CRDs installed, and the training service's RBAC, asked of the server
(SubjectAccessReview through `kubectl auth can-i --as`) and exercised by the launcher itself
under the service account's own token.

The server predates gRPC probes, so the dry run goes through tests/deploy/kube-1.20, which swaps
them for tcpSocket probes on the same port and changes nothing else."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from tests.deploy.test_manifests import render
from tests.helpers import require_tool
from tests.kube.cluster import Cluster
from tests.kube.namespace import Kube, pods_of, run_request, until
from tunefleet.runtime.settings import KubernetesSettings
from tunefleet.training.kubernetes import KubernetesLauncher
from tunefleet.training.launcher import Phase

pytestmark = pytest.mark.kubernetes

HERE = Path(__file__).parent
FOR_THE_TEST_SERVER = HERE / "kube-1.20"
CRDS = ["servicemonitors.monitoring.coreos.com", "prometheusrules.monitoring.coreos.com"]


class Kubectl:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.path = require_tool("kubectl", "Google's kubectl package (kustomize built in)")

    def __call__(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.path, "--kubeconfig", str(self.cluster.kubeconfig), *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if check:
            assert result.returncode == 0, f"kubectl {' '.join(args)}:\n{result.stderr}"
        return result


@pytest.fixture(scope="module")
def kubectl(kube_cluster: Cluster) -> Kubectl:
    """kubectl as cluster admin, with the monitoring CRDs installed and the overlays' namespace
    created (as a first `kubectl apply -k` would have; a dry run cannot create what the rest of
    the overlay goes into)."""
    run = Kubectl(kube_cluster)
    run("apply", "-f", str(HERE / "monitoring-crds.yaml"))
    run("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in CRDS))
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "tunefleet"}}
    run("apply", "-f", "-", stdin=yaml.safe_dump(namespace))
    return run


def rendered(kubectl: Kubectl, overlay: str) -> list[dict[str, Any]]:
    result = kubectl("kustomize", str(FOR_THE_TEST_SERVER / overlay))
    return [document for document in yaml.safe_load_all(result.stdout) if document]


@pytest.mark.parametrize("overlay", ["dev", "gpu"])
def test_the_api_server_accepts_each_overlay(kubectl: Kubectl, overlay: str) -> None:
    result = kubectl("apply", "--dry-run=server", "-k", str(FOR_THE_TEST_SERVER / overlay))
    accepted = [line for line in result.stdout.splitlines() if line.endswith("(server dry run)")]
    documents = rendered(kubectl, overlay)
    assert len(accepted) == len(documents), result.stdout
    kinds = {d["kind"] for d in documents}
    assert {"Deployment", "Service", "Role", "RoleBinding", "PersistentVolumeClaim"} <= kinds
    if overlay == "gpu":
        assert {"ServiceMonitor", "PrometheusRule"} <= kinds
    # A dry run stores nothing.
    stored = kubectl("get", "deployments,roles,prometheusrules", "-n", "tunefleet", "-o", "name")
    assert stored.stdout == ""


@pytest.mark.parametrize(
    ("kind", "breaks", "refusal"),
    [
        # GPUs (extended resources) must be requested as much as limited.
        (
            "Deployment",
            ["spec", "template", "spec", "containers", 0, "resources", "limits"],
            "must be equal to nvidia.com/gpu limit",
        ),
        # Every rule needs an expression (the CRD's schema).
        ("PrometheusRule", ["spec", "groups", 0, "rules", 0], "expr: Required value"),
    ],
)
def test_the_dry_run_catches_what_the_server_refuses(
    kubectl: Kubectl, kind: str, breaks: list[Any], refusal: str
) -> None:
    documents = rendered(kubectl, "gpu")
    document = next(
        d
        for d in documents
        if d["kind"] == kind and d["metadata"]["name"] in {"tunefleet-inference", "tunefleet"}
    )
    target: Any = document
    for key in breaks:
        target = target[key]
    if kind == "Deployment":
        target["nvidia.com/gpu"] = "2"
    else:
        del target["expr"]
    # Without kubectl's own schema check: the refusal is the server's.
    result = kubectl(
        "apply",
        "--dry-run=server",
        "--validate=false",
        "-f",
        "-",
        stdin=yaml.safe_dump(document),
        check=False,
    )
    assert result.returncode != 0
    assert refusal in result.stderr


# --- RBAC ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def accounts(kubectl: Kubectl, kube_cluster: Cluster) -> Kube:
    """The dev overlay's service accounts, Role and RoleBinding, applied for real in a test
    namespace of their own (with the clients to play the kubelet there)."""
    kube = Kube(kube_cluster)
    for document in render("dev"):
        if document["kind"] not in {"ServiceAccount", "Role", "RoleBinding"}:
            continue
        document["metadata"]["namespace"] = kube.namespace
        for subject in document.get("subjects", []):
            subject["namespace"] = kube.namespace
        kubectl("apply", "-f", "-", stdin=yaml.safe_dump(document))
    return kube


def can(kubectl: Kubectl, account: str, namespace: str, verb: str, resource: str) -> bool:
    """The server's answer (SubjectAccessReview) for the service account `account` of the test
    namespace doing `verb` on `resource` in `namespace`."""
    resource, _, subresource = resource.partition("/")  # pods/log: --subresource log
    resource = resource.replace("#", "/")  # leases...#NAME: the object of that name
    result = kubectl(
        "auth",
        "can-i",
        verb,
        resource,
        f"--subresource={subresource}",
        f"--namespace={namespace}",
        f"--as=system:serviceaccount:{account}",
        check=False,
    )
    assert result.stdout.strip() in {"yes", "no"}, result.stderr
    return result.stdout.strip() == "yes"


LAUNCHER_MAY = [
    ("create", "jobs.batch"),
    ("get", "jobs.batch"),
    ("list", "jobs.batch"),
    ("watch", "jobs.batch"),
    ("delete", "jobs.batch"),
    ("list", "pods"),
    ("watch", "pods"),
    ("get", "pods/log"),
    ("create", "secrets"),
    ("patch", "secrets"),
    ("create", "services"),
    ("patch", "services"),
    ("get", "localqueues.kueue.x-k8s.io"),
    ("list", "workloads.kueue.x-k8s.io"),
    ("create", "leases.coordination.k8s.io"),
    ("get", "leases.coordination.k8s.io#tunefleet-training-leader"),
    ("update", "leases.coordination.k8s.io#tunefleet-training-leader"),
]
LAUNCHER_MAY_NOT = [
    ("get", "secrets"),
    ("list", "secrets"),
    ("watch", "secrets"),
    ("update", "secrets"),
    ("delete", "secrets"),
    ("create", "pods"),
    ("delete", "pods"),
    ("deletecollection", "pods"),
    ("create", "pods/exec"),
    ("update", "jobs.batch"),
    ("get", "configmaps"),
    ("create", "roles.rbac.authorization.k8s.io"),
    ("create", "rolebindings.rbac.authorization.k8s.io"),
    ("create", "deployments.apps"),
    ("get", "services"),
    ("delete", "services"),
    ("patch", "workloads.kueue.x-k8s.io"),
    ("update", "leases.coordination.k8s.io#someone-else"),
    ("delete", "leases.coordination.k8s.io#tunefleet-training-leader"),
    ("update", "workloads.kueue.x-k8s.io/status"),
]


def test_the_training_account_may_do_what_its_launcher_does(
    kubectl: Kubectl, accounts: Kube
) -> None:
    account = f"{accounts.namespace}:tunefleet-training"
    allowed = [(v, r) for v, r in LAUNCHER_MAY if can(kubectl, account, accounts.namespace, v, r)]
    assert allowed == LAUNCHER_MAY


def test_the_training_account_may_not_read_secrets_or_act_elsewhere(
    kubectl: Kubectl, accounts: Kube
) -> None:
    account = f"{accounts.namespace}:tunefleet-training"
    namespace = accounts.namespace
    assert [(v, r) for v, r in LAUNCHER_MAY_NOT if can(kubectl, account, namespace, v, r)] == []
    for elsewhere in ("default", "kube-system", "tunefleet"):
        assert [(v, r) for v, r in LAUNCHER_MAY if can(kubectl, account, elsewhere, v, r)] == []
    for cluster_wide in (("list", "nodes"), ("list", "namespaces"), ("create", "namespaces")):
        assert not can(kubectl, account, namespace, *cluster_wide)


@pytest.mark.parametrize("account", ["tunefleet", "tunefleet-trainer"])
def test_the_other_accounts_may_do_nothing(kubectl: Kubectl, accounts: Kube, account: str) -> None:
    subject = f"{accounts.namespace}:{account}"
    everything = LAUNCHER_MAY + LAUNCHER_MAY_NOT
    assert [(v, r) for v, r in everything if can(kubectl, subject, accounts.namespace, v, r)] == []


def account_kubeconfig(kubectl: Kubectl, kube: Kube, directory: Path) -> Path:
    """A kubeconfig holding a token the server issued to tunefleet-training (TokenRequest),
    as the token mounted into the training service's Pod would be."""
    token = kubectl("create", "token", "tunefleet-training", "--namespace", kube.namespace)
    admin = yaml.safe_load(kube.cluster.kubeconfig.read_text())
    admin["users"] = [{"name": "admin", "user": {"token": token.stdout.strip()}}]
    path = directory / "kubeconfig"
    path.write_text(yaml.safe_dump(admin))
    return path


async def test_the_launcher_runs_a_job_with_the_training_accounts_token(
    kubectl: Kubectl, accounts: Kube, tmp_path: Path
) -> None:
    kube = accounts
    kubeconfig = account_kubeconfig(kubectl, kube, tmp_path)
    settings = KubernetesSettings(kubeconfig=kubeconfig, namespace=kube.namespace)
    launcher = KubernetesLauncher(settings)
    await launcher.start(lambda: None)  # lists and watches Jobs and Pods
    try:
        identifier = f"rbac{uuid.uuid4().hex[:6]}"
        run = await launcher.launch(run_request(identifier))
        assert (await launcher.launch(run_request(identifier))).run_id == run.run_id  # again: 409s
        (pod,) = await until(pods_of(kube, identifier))
        kube.run_pod(pod)

        async def running() -> bool:
            return (await launcher.status(run)).phase == Phase.RUNNING  # seen by the Pod watch

        await until(running)
        # The log read is allowed (a refusal raises 403); with no node in this cluster, it is empty.
        assert not launcher.core.read_namespaced_pod_log(pod.metadata.name, kube.namespace)
        await launcher.checkpoint_saved(run, "s3://bucket/checkpoint-10")
        assert kube.resume_from(identifier) == "s3://bucket/checkpoint-10"
        await launcher.cancel(run)
        assert kube.jobs(identifier) == []
        multi = await launcher.launch(run_request(f"{identifier}m", node_count=2))  # + a Service
        assert (await launcher.launch(run_request(f"{identifier}m", node_count=2))) == multi
        await launcher.cancel(multi)

        async def pods_gone() -> bool:
            return not await asyncio.to_thread(kube.pods, identifier)

        await until(pods_gone)
    finally:
        await launcher.close()
    # Pointed at another namespace, the launcher cannot even list what runs there.
    elsewhere = KubernetesLauncher(KubernetesSettings(kubeconfig=kubeconfig, namespace="default"))
    with pytest.raises(ApiException) as refused:
        await elsewhere.start(lambda: None)
    assert refused.value.status == 403
