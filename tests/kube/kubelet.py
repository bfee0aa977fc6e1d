"""A kubelet for the test control plane that runs a Pod's trainer for real: the Pod's own
command line and environment as a local process, its spec Secret's files written where the Pod
would have them mounted (the service names in the spec resolved to local addresses, as cluster
DNS would), its termination message read back from the file the container writes. Pod status
is reported as the kubelet would (Running, then Succeeded or Failed with the exit code)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.kube.namespace import Kube
from tunefleet.training import manifests


@dataclass
class Running:
    pod: Any
    process: subprocess.Popen[bytes]
    folder: Path


class ProcessKubelet:
    def __init__(self, kube: Kube, root: Path, names: dict[str, str]) -> None:
        self.kube = kube
        self.root = root
        self.names = names  # service address in the spec -> local address

    def start(self, pod: Any) -> Running:
        """Mount the Pod's Secret and run its container's command; the Pod is Running."""
        folder = self.root / pod.metadata.name
        secrets = folder / "etc"
        secrets.mkdir(parents=True)
        job_id = pod.metadata.labels[manifests.JOB_LABEL]
        secret = self.kube.core.read_namespaced_secret(
            manifests.run_name(job_id), self.kube.namespace
        )
        for key, value in (secret.data or {}).items():
            (secrets / key).write_bytes(base64.b64decode(value))
        spec = json.loads((secrets / "spec.json").read_text())
        spec["output_dir"] = str(folder / "scratch" / "output")
        for section in ("report", "registry"):
            endpoint = spec.get(section, {}).get("endpoint", "")
            spec[section]["endpoint"] = self.names.get(endpoint, endpoint)
        (secrets / "spec.json").write_text(json.dumps(spec))
        container = pod.spec.containers[0]
        command = [
            sys.executable if part == "python" else part.replace(manifests.SPEC_DIR, str(secrets))
            for part in container.command
        ]
        env = {**os.environ, **{v.name: v.value for v in container.env if v.value is not None}}
        env["TUNEFLEET_RESULT_FILE"] = str(folder / "termination-log")
        env["HOME"] = env["HF_HOME"] = str(folder / "scratch")
        log = (folder / "log").open("wb")
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.kube.run_pod(pod)
        return Running(pod, process, folder)

    def finish(self, running: Running, timeout: float = 600) -> int:
        """Wait for the container to end and report it with its termination message."""
        code = running.process.wait(timeout=timeout)
        result = running.folder / "termination-log"
        message = result.read_text() if result.exists() else ""
        self.kube.end_pod(running.pod, code, message)
        return code

    def evict(self, running: Running) -> None:
        """The Pod is deleted (its Job suspended): its container is killed and the Pod goes."""
        os.killpg(running.process.pid, signal.SIGKILL)
        running.process.wait()
        self.kube.core.delete_namespaced_pod(
            running.pod.metadata.name, self.kube.namespace, grace_period_seconds=0
        )

    def log(self, running: Running) -> str:
        return (running.folder / "log").read_text(errors="replace")
