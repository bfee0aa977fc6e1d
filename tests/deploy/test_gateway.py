"""The gateway's nginx configuration (deploy/base/gateway.conf, as kustomize renders it) in a real
nginx in front of the cluster shape on this machine: four `tunefleet serve <service>` processes
sharing one data directory, as the Deployments share the database and blob store. Every call the
SDK makes through it reaches its own service, streams and error details included."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.deploy.test_manifests import SERVICES, by_kind, render
from tests.helpers import free_port, require_tool
from tunefleet import demo
from tunefleet.client import Client, FailedPrecondition, NotFound
from tunefleet.demo.server import LocalServer


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The gateway's address, in front of one process per service."""
    nginx = require_tool("nginx", "Debian package nginx")
    directory = tmp_path_factory.mktemp("gateway")
    servers = [LocalServer(directory / "data", services=[key]).start() for key in SERVICES]
    try:
        (name,) = [n for n in by_kind(render("dev"), "ConfigMap") if "gateway" in n]
        config = by_kind(render("dev"), "ConfigMap")[name]["data"]["nginx.conf"]
        for key, server in zip(SERVICES, servers, strict=True):
            config = config.replace(f"tunefleet-{key}:50051", server.target)
        port = free_port()
        config = config.replace("listen 50051 http2", f"listen 127.0.0.1:{port} http2")
        config = config.replace("listen 8081", f"listen 127.0.0.1:{free_port()}")
        config = config.replace(" /tmp/", f" {directory}/")  # pid and temporary files
        (directory / "nginx.conf").write_text(config)
        process = subprocess.Popen(
            [
                nginx,
                "-e",
                "stderr",
                "-p",
                str(directory),
                "-c",
                str(directory / "nginx.conf"),
                "-g",
                "daemon off;",
            ],
            stderr=(directory / "nginx.log").open("wb"),
        )
        try:
            _wait_listening(port, process, directory / "nginx.log")
            yield f"127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(timeout=10)
    finally:
        for server in servers:
            server.stop()


def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    import socket

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited: {log.read_text()}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nginx did not listen: {log.read_text()}")


def test_each_service_is_reached_through_the_one_address(gateway: str) -> None:
    sample = Path(demo.__file__).parent / "data" / "orders.jsonl"
    with Client(gateway) as client:
        # A client stream (upload) and unary calls to DatasetService.
        dataset = client.datasets.upload(sample, display_name="through the gateway")
        assert dataset.record_count > 0
        assert client.datasets.get(dataset.name).name == dataset.name
        # The other three answer too; each knows its own resources only.
        assert list(client.training_jobs.list()) == []
        assert list(client.adapters.list()) == []
        with pytest.raises(NotFound) as missing:
            client.adapters.get("adapters/nothing")
        assert missing.value.reason  # error details (ErrorInfo) come through
        with pytest.raises(FailedPrecondition):  # no base model in this deployment
            client.inference.generate(adapter="", prompt="hello")


def test_calls_for_anything_else_are_unimplemented(gateway: str) -> None:
    with grpc.insecure_channel(gateway) as channel, pytest.raises(grpc.RpcError) as refused:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
