"""A real Kubernetes control plane on 127.0.0.1 for tests: etcd, kube-apiserver and
kube-controller-manager running only the Job and garbage-collection controllers, with Kueue's
CRDs (kueue-crds.yaml; no Kueue controller: tests play it).

There is no kubelet and no scheduler: a test plays them by patching Pod status. The binaries
come from tests/kube/build-apiserver.sh (`make kube-deps`: Kubernetes v1.20.2 built from Debian's
source package), found in $TUNEFLEET_KUBE_CACHE/bin (default /var/cache/tunefleet-kube/bin).
"""

from __future__ import annotations

import os
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.helpers import free_port
from tests.runtime.certs import CertificateAuthority

HERE = Path(__file__).parent
KUBE_BIN = Path(os.environ.get("TUNEFLEET_KUBE_CACHE", "/var/cache/tunefleet-kube")) / "bin"


@dataclass(frozen=True)
class Cluster:
    server: str
    kubeconfig: Path
    logs: Path


def missing() -> str | None:
    """Why the cluster cannot start here, or None."""
    for binary in ("kube-apiserver", "kube-controller-manager"):
        if not (KUBE_BIN / binary).is_file():
            return f"{KUBE_BIN / binary} is missing (run tests/kube/build-apiserver.sh)"
    if shutil.which("etcd") is None:
        return "etcd is missing (Debian package etcd-server)"
    return None


@contextmanager
def running_cluster(directory: Path) -> Iterator[Cluster]:
    directory.mkdir(parents=True, exist_ok=True)
    authority = CertificateAuthority(directory, "kube test CA")
    serving = authority.issue("kube-apiserver", server=True)
    account_key = directory / "service-account.key"
    account_key.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    token = secrets.token_hex(16)
    (directory / "tokens.csv").write_text(f"{token},admin,admin,system:masters\n")
    etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
    server = f"https://127.0.0.1:{api_port}"
    processes: list[subprocess.Popen[bytes]] = []

    def start(name: str, command: list[str]) -> None:
        log = (directory / f"{name}.log").open("wb")
        processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))

    try:
        start(
            "etcd",
            [
                "etcd",
                "--data-dir",
                str(directory / "etcd"),
                "--listen-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-cluster",
                f"default=http://127.0.0.1:{peer_port}",
            ],
        )
        start(
            "kube-apiserver",
            [
                str(KUBE_BIN / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                "--insecure-port=0",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--token-auth-file={directory / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={account_key}",
                f"--service-account-signing-key-file={account_key}",
                "--service-cluster-ip-range=10.96.0.0/24",
                "--endpoint-reconciler-type=none",
                "--disable-admission-plugins=ServiceAccount",
            ],
        )
        context = ssl.create_default_context(cafile=str(authority.pair.cert))
        _wait_ready(f"{server}/readyz", token, context, processes)
        kubeconfig = directory / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "test",
                            "cluster": {
                                "server": server,
                                "certificate-authority": str(authority.pair.cert),
                            },
                        }
                    ],
                    "users": [{"name": "admin", "user": {"token": token}}],
                    "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
                    "current-context": "test",
                }
            )
        )
        _install_crds(kubeconfig, HERE / "kueue-crds.yaml")
        start(
            "kube-controller-manager",
            [
                str(KUBE_BIN / "kube-controller-manager"),
                f"--kubeconfig={kubeconfig}",
                "--controllers=job,garbagecollector",
                "--leader-elect=false",
                "--port=0",
                "--secure-port=0",
            ],
        )
        yield Cluster(server, kubeconfig, directory)
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def _install_crds(kubeconfig: Path, path: Path) -> None:
    """Create the CRDs of `path` and wait until the server serves them."""
    from kubernetes import client, config

    api = client.ApiextensionsV1Api(config.new_client_from_config(str(kubeconfig)))
    names = []
    for document in yaml.safe_load_all(path.read_text()):
        api.create_custom_resource_definition(document)
        names.append(document["metadata"]["name"])
    deadline = time.monotonic() + 60
    for name in names:
        while True:
            conditions = api.read_custom_resource_definition(name).status.conditions or []
            if any(c.type == "Established" and c.status == "True" for c in conditions):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the CRD {name} was not established")
            time.sleep(0.1)


def _wait_ready(
    url: str, token: str, context: ssl.SSLContext, processes: list[subprocess.Popen[bytes]]
) -> None:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(request, context=context, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
            raise RuntimeError(f"the API server did not become ready at {url}")
        time.sleep(0.25)
