"""deploy/: each overlay renders with kustomize, passes strict schema validation for current
Kubernetes, and has what the cluster shape relies on (probes, security contexts, resources, the
training service's RBAC, GPUs for serving in the gpu overlay)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from tests.helpers import require_tool
from tunefleet.inference.metrics import InferenceMetrics
from tunefleet.runtime.settings import load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
OVERLAYS = ["dev", "gpu"]
TOKENS_FILE = Path("/etc/tunefleet-tokens/tokens.yaml")
MONITORING_KINDS = {"PrometheusRule", "ServiceMonitor"}  # CRDs: no schema in kubernetes-validate
SERVICES = {
    "datasets": "DatasetService",
    "training": "TrainingService",
    "adapters": "AdapterService",
    "inference": "InferenceService",
    "evaluation": "EvaluationService",
    "retraining": "RetrainingService",
}


def render(overlay: str) -> list[dict[str, Any]]:
    kubectl = require_tool("kubectl", "Google's kubectl package (kustomize built in)")
    result = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(documents: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in documents if d["kind"] == kind}


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.latest_version()])
def test_rendered_manifests_pass_strict_validation(overlay: str, version: str) -> None:
    documents = render(overlay)
    for document in documents:
        if document["kind"] in MONITORING_KINDS:
            continue
        kubernetes_validate.validate(document, version, strict=True)
    assert all(d["metadata"].get("namespace") == "tunefleet" for d in documents[1:])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_has_probes_limits_and_a_locked_down_container(overlay: str) -> None:
    documents = render(overlay)
    deployments = by_kind(documents, "Deployment")
    services = by_kind(documents, "Service")
    fronts = {"tunefleet-gateway", "tunefleet-openai"}
    assert set(deployments) == {f"tunefleet-{key}" for key in SERVICES} | fronts
    assert set(services) == {f"tunefleet-{key}" for key in SERVICES} | {
        "tunefleet",
        "tunefleet-openai",
    }
    for key, service in SERVICES.items():
        pod = deployments[f"tunefleet-{key}"]["spec"]["template"]
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        (container,) = spec["containers"]
        assert container["args"][:2] == ["serve", key]
        assert container["readinessProbe"]["grpc"] == {
            "port": 50051,
            "service": f"tunefleet.v1.{service}",
        }
        assert container["livenessProbe"]["grpc"]["port"] == 50051
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert {"cpu", "memory"} <= set(container["resources"]["limits"])
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["settings"]["configMap"]["name"].startswith("tunefleet-settings-")
        # Fail closed: no Pod starts without the tokens (a required Secret, digests only).
        assert volumes["tokens"]["secret"] == {
            "secretName": "tunefleet-tokens",
            "items": [{"key": "tokens.yaml", "path": "tokens.yaml"}],
        }
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert f"{mounts['tokens']}/tokens.yaml" == str(TOKENS_FILE)
        assert container["envFrom"] == [
            {"secretRef": {"name": "tunefleet-credentials", "optional": True}}
        ]
        # Its own database and no other's.
        databases = {
            e["valueFrom"]["secretKeyRef"]["name"]
            for e in container["env"]
            if e["name"].startswith("TUNEFLEET_STORAGE__DATABASE")
        }
        assert databases == {f"tunefleet-{key}-database"}
        expected_account = "tunefleet-training" if key == "training" else "tunefleet"
        assert spec["serviceAccountName"] == expected_account
        ports = {p["name"]: p["port"] for p in services[f"tunefleet-{key}"]["spec"]["ports"]}
        assert ports == {"grpc": 50051, "metrics": 9090}
    # A single process drives its runs: retraining always, training unless a leader is elected
    # (then its replicas roll, and only the Lease's holder schedules).
    assert deployments["tunefleet-retraining"]["spec"]["strategy"]["type"] == "Recreate"
    training_spec = deployments["tunefleet-training"]["spec"]
    settings = yaml.safe_load((DEPLOY / "overlays" / overlay / "tunefleet.yaml").read_text())
    elected = settings["training"].get("leader_election", "none") != "none"
    assert training_spec["strategy"]["type"] == ("RollingUpdate" if elected else "Recreate")
    assert (training_spec["replicas"] > 1) == elected
    if elected:
        (container,) = training_spec["template"]["spec"]["containers"]
        names = {e["name"]: e for e in container["env"]}
        assert names["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    (training,) = deployments["tunefleet-training"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in training["env"]}
    assert env["TUNEFLEET_TRAINING__WORKER_REGISTRY_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "tunefleet-tokens", "key": "worker-registry-token"}
    }
    assert env["TUNEFLEET_TRAINING__SERVICE_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "tunefleet-tokens", "key": "training-service-token"}
    }
    (inference,) = deployments["tunefleet-inference"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in inference["env"]}
    assert env["TUNEFLEET_INFERENCE__REGISTRY_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "tunefleet-tokens", "key": "inference-registry-token"}
    }
    (evaluation,) = deployments["tunefleet-evaluation"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in evaluation["env"]}
    assert env["TUNEFLEET_EVALUATION__SERVICE_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "tunefleet-tokens", "key": "evaluation-service-token"}
    }
    (retraining,) = deployments["tunefleet-retraining"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in retraining["env"]}
    assert env["TUNEFLEET_RETRAINING__SERVICE_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "tunefleet-tokens", "key": "retraining-service-token"}
    }
    accounts = by_kind(documents, "ServiceAccount")
    assert accounts["tunefleet"]["automountServiceAccountToken"] is False
    assert accounts["tunefleet-trainer"]["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_is_the_one_address_and_locked_down(overlay: str) -> None:
    documents = render(overlay)
    gateway = by_kind(documents, "Deployment")["tunefleet-gateway"]
    spec = gateway["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["serviceAccountName"] == "tunefleet"  # no token
    (container,) = spec["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["readinessProbe"]["httpGet"]["port"] == "health"
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    assert "data" not in {v["name"] for v in spec["volumes"]}  # no storage
    service = by_kind(documents, "Service")["tunefleet"]
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "tunefleet-gateway"}
    assert service["spec"]["ports"][0]["port"] == 50051
    (config,) = [c for c in by_kind(documents, "ConfigMap") if c.startswith("tunefleet-gateway-")]
    routes = by_kind(documents, "ConfigMap")[config]["data"]["nginx.conf"]
    for key, name in SERVICES.items():
        assert f"upstream {key} {{\n    server tunefleet-{key}:50051;" in routes
        assert f"location /tunefleet.v1.{name}/ {{\n      grpc_pass grpc://{key};" in routes


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_openai_front_is_stateless_behind_the_gateway(overlay: str) -> None:
    """`tunefleet serve openai` calls the services through the gateway with its callers'
    tokens (it holds none and no data), and the gateway's port 8000 reaches it."""
    documents = render(overlay)
    pod = by_kind(documents, "Deployment")["tunefleet-openai"]["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert container["args"][:2] == ["serve", "openai"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    assert {v["name"] for v in spec["volumes"]} == {"settings", "tmp"}  # no data, no tokens
    assert "envFrom" not in container
    ports = {
        p["name"]: p["port"]
        for p in by_kind(documents, "Service")["tunefleet-openai"]["spec"]["ports"]
    }
    assert ports == {"http": 8000, "metrics": 9090}
    gateway = {
        p["name"]: p["port"] for p in by_kind(documents, "Service")["tunefleet"]["spec"]["ports"]
    }
    assert gateway == {"grpc": 50051, "http": 8000}
    folder = DEPLOY / "base" if overlay == "base" else DEPLOY / "overlays" / overlay
    settings = load_settings(folder / "tunefleet.yaml")
    assert settings.openai.target.startswith("tunefleet") and settings.openai.port == 8000
    assert settings.inference.base_model  # the front's model id


def test_the_training_role_grants_what_the_launcher_calls_and_nothing_more() -> None:
    documents = render("dev")
    (role,) = by_kind(documents, "Role").values()
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert ("batch", "jobs", "create") in granted and ("", "pods/log", "get") in granted
    allowed = {"jobs", "pods", "pods/log", "secrets", "services", "localqueues", "workloads"}
    allowed |= {"leases"}
    assert all(resource in allowed for _, resource, _ in granted)
    assert {verb for _, r, verb in granted if r in ("localqueues", "workloads")} == {"get", "list"}
    named = {
        tuple(rule["resourceNames"]): set(rule["verbs"])
        for rule in role["rules"]
        if rule["resources"] == ["leases"] and "resourceNames" in rule
    }
    assert named == {("tunefleet-training-leader",): {"get", "update"}}  # its own Lease only
    assert {verb for _, r, verb in granted if r == "secrets"} == {"create", "patch"}  # never read
    assert {verb for _, r, verb in granted if r == "services"} == {"create", "patch"}
    assert not by_kind(documents, "ClusterRole") and not by_kind(documents, "ClusterRoleBinding")
    (binding,) = by_kind(documents, "RoleBinding").values()
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "tunefleet-training", "namespace": "tunefleet"}
    ]


def test_the_dev_overlay_keeps_state_on_one_volume() -> None:
    deployments = by_kind(render("dev"), "Deployment")
    deployments.pop("tunefleet-gateway")  # keeps no state
    deployments.pop("tunefleet-openai")  # nor does this
    for deployment in deployments.values():
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["data"] == {
            "name": "data",
            "persistentVolumeClaim": {"claimName": "tunefleet-data"},
        }


def test_the_gpu_overlay_serves_on_gpus_with_monitoring() -> None:
    documents = render("gpu")
    inference = by_kind(documents, "Deployment")["tunefleet-inference"]["spec"]
    assert inference["replicas"] >= 2
    pod = inference["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] and pod["tolerations"]
    kinds = {d["kind"] for d in documents}
    assert kinds >= MONITORING_KINDS
    configmaps = by_kind(documents, "ConfigMap").values()
    labels = [d["metadata"].get("labels", {}) for d in configmaps]
    dashboards = [label for label in labels if label.get("grafana_dashboard") == "1"]
    assert len(dashboards) == 1
    # Scaled on a metric every replica exports (InferenceMetrics), from the replicas it has.
    (autoscaler,) = by_kind(documents, "HorizontalPodAutoscaler").values()
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == "tunefleet-inference"
    assert autoscaler["spec"]["minReplicas"] == inference["replicas"]
    (metric,) = autoscaler["spec"]["metrics"]
    registry = CollectorRegistry()
    InferenceMetrics(registry)
    exported = {family.name for family in registry.collect()}
    assert metric["pods"]["metric"]["name"] in exported


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_the_settings_files_load(overlay: str) -> None:
    folder = DEPLOY / "base" if overlay == "base" else DEPLOY / "overlays" / overlay
    settings = load_settings(folder / "tunefleet.yaml")
    assert settings.server.host == "0.0.0.0" and settings.server.port == 50051
    assert settings.server.auth.enabled and settings.server.auth.tokens_file == TOKENS_FILE
    assert settings.inference.registry_endpoint.startswith("tunefleet-adapters")
    if overlay == "dev":  # a database file per service on the shared volume
        assert len(set(settings.storage.databases.values())) == len(SERVICES)
    if overlay != "base":
        assert settings.training.datasets_endpoint.startswith("tunefleet-datasets")
    if overlay == "gpu":
        assert settings.training.launcher == "kubernetes"
        assert settings.inference.engine == "vllm"
        assert settings.storage.blob_backend == "s3"
