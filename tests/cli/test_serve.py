"""`tunefleet serve`: the real command, as a subprocess, checked with real gRPC clients."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.helpers import IN_CI, error_info, free_port
from tunefleet.v1 import inference_service_pb2, inference_service_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
TUNEFLEET = Path(sys.executable).with_name("tunefleet")
ALL_SERVICES = {
    "tunefleet.v1.DatasetService",
    "tunefleet.v1.TrainingService",
    "tunefleet.v1.AdapterService",
    "tunefleet.v1.InferenceService",
}


class Serve:
    def __init__(
        self, process: subprocess.Popen[str], port: int, metrics_port: int, openai_port: int
    ) -> None:
        self.process, self.port, self.metrics_port = process, port, metrics_port
        self.openai_port = openai_port
        self.target = f"127.0.0.1:{port}"


def run_serve(tmp_path: Path, *args: str) -> Iterator[Serve]:
    port, metrics_port, openai_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "TUNEFLEET_DATA_DIR": str(tmp_path / "data"),
        "TUNEFLEET_SERVER__PORT": str(port),
        "TUNEFLEET_SERVER__METRICS_PORT": str(metrics_port),
        "TUNEFLEET_OPENAI__PORT": str(openai_port),
    }
    process = subprocess.Popen(
        [str(TUNEFLEET), "serve", *args], env=env, stderr=subprocess.PIPE, text=True
    )
    serve = Serve(process, port, metrics_port, openai_port)
    try:
        wait_serving(serve)
        yield serve
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def wait_serving(serve: Serve) -> None:
    deadline = time.monotonic() + 60
    with grpc.insecure_channel(serve.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert serve.process.poll() is None, (
                serve.process.stderr and serve.process.stderr.read()
            )
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    pytest.fail("tunefleet serve did not become healthy")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    yield from run_serve(tmp_path_factory.mktemp("embedded"))


def health_of(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return int(response.status)


def reflected_services(target: str) -> set[str]:
    with grpc.insecure_channel(target) as channel:
        return set(ProtoReflectionDescriptorDatabase(channel).get_services())


def test_every_service_is_serving(embedded: Serve) -> None:
    for service in ["", *ALL_SERVICES]:
        assert health_of(embedded.target, service) == health_pb2.HealthCheckResponse.SERVING


def test_the_embedded_server_answers_openai_clients_on_its_own_port(embedded: Serve) -> None:
    """The front runs beside the services (this server has no base model: no models, and a
    chat is refused as InferenceService refuses it), and its requests are on /metrics."""
    import json
    import urllib.request

    import openai

    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{embedded.openai_port}/v1", api_key="unused", max_retries=0
    )
    with client:
        assert client.models.list().data == []
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(
                model="any", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        assert raised.value.code == "no_base_model"
    health = f"http://127.0.0.1:{embedded.openai_port}/health"
    with urllib.request.urlopen(health, timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok"}
    metrics = f"http://127.0.0.1:{embedded.metrics_port}/metrics"
    with urllib.request.urlopen(metrics, timeout=10) as response:
        text = response.read().decode()
    assert (
        'tunefleet_openai_requests_total{method="GET",route="/v1/models",status="200"} 1.0' in text
    )
    assert 'route="/v1/chat/completions",status="400"' in text


def failed_start(*args: str, **env: str) -> str:
    """What `tunefleet serve ARGS` printed on stderr, having exited with an error at start-up."""
    result = subprocess.run(
        [str(TUNEFLEET), "serve", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0, result.stderr
    return result.stderr


def test_the_front_alone_needs_the_services_address(tmp_path: Path) -> None:
    assert "openai.target" in failed_start("openai", TUNEFLEET_DATA_DIR=str(tmp_path))


def test_an_openai_port_in_use_fails_start_up_naming_it(tmp_path: Path) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        stderr = failed_start(
            TUNEFLEET_DATA_DIR=str(tmp_path),
            TUNEFLEET_SERVER__PORT=str(free_port()),
            TUNEFLEET_SERVER__METRICS_PORT=str(free_port()),
            TUNEFLEET_OPENAI__PORT=str(port),
        )
    assert f"openai.port: cannot listen on 127.0.0.1:{port}" in stderr


def test_health_watch_streams_the_status(embedded: Serve) -> None:
    with grpc.insecure_channel(embedded.target) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="tunefleet.v1.AdapterService"), timeout=5
        )
        assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
        stream.cancel()


def test_reflection_lists_and_describes_the_services(embedded: Serve) -> None:
    services = reflected_services(embedded.target)
    assert services >= ALL_SERVICES
    assert "grpc.health.v1.Health" in services
    with grpc.insecure_channel(embedded.target) as channel:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service = pool.FindServiceByName("tunefleet.v1.TrainingService")
        assert "CreateTrainingJob" in [m.name for m in service.methods]


def test_inference_without_a_base_model_says_so(embedded: Serve) -> None:
    with grpc.insecure_channel(embedded.target) as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Generate(inference_service_pb2.GenerateRequest(prompt="hi"), timeout=5)
    error = raised.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "inference.base_model" in (error.details() or "")
    info = error_info(error)
    assert info is not None and info.reason == "NO_BASE_MODEL"


def test_buf_curl_reaches_the_server_through_reflection(embedded: Serve) -> None:
    buf = ROOT / "node_modules" / ".bin" / "buf"
    if not buf.exists():
        if IN_CI:
            pytest.fail("buf is not installed (npm install)")
        pytest.skip("buf is not installed (npm install)")
    url = f"http://{embedded.target}"
    listed = subprocess.run(
        [str(buf), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--list-services", url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert set(listed.stdout.split()) >= ALL_SERVICES
    health = subprocess.run(
        [
            str(buf),
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            f"{url}/grpc.health.v1.Health/Check",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert '"status": "SERVING"' in health.stdout


def test_one_service_per_process(tmp_path: Path) -> None:
    for serve in run_serve(tmp_path, "datasets"):
        assert health_of(serve.target, "tunefleet.v1.DatasetService") == (
            health_pb2.HealthCheckResponse.SERVING
        )
        with pytest.raises(grpc.RpcError) as raised:
            health_of(serve.target, "tunefleet.v1.TrainingService")
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        services = reflected_services(serve.target)
        assert "tunefleet.v1.DatasetService" in services
        assert not services & (ALL_SERVICES - {"tunefleet.v1.DatasetService"})


def test_bad_setting_fails_start_up_naming_it(tmp_path: Path) -> None:
    stderr = failed_start(TUNEFLEET_SERVER__PORT="not-a-port")
    assert "server.port (TUNEFLEET_SERVER__PORT)" in stderr


ORPHANING_PARENT = """
import sys, threading
from pathlib import Path
from tunefleet.demo.server import LocalServer
server = LocalServer(Path(sys.argv[1])).start(300)
print(server.process.pid, flush=True)
threading.Event().wait()
"""


def test_a_server_whose_parent_is_killed_stops(tmp_path: Path) -> None:
    """The demo's and the tests' servers (`--exit-with-parent`) stop when whoever started them is
    SIGKILLed, instead of holding their port for ever."""
    parent = subprocess.Popen(
        [sys.executable, "-c", ORPHANING_PARENT, str(tmp_path / "data")], stdout=subprocess.PIPE
    )
    assert parent.stdout is not None
    server_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 120
    while alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(server_pid)
    assert "is gone: stopping" in (tmp_path / "data" / "server.log").read_text()


def alive(pid: int) -> bool:
    """Running (an exited process nobody has reaped yet is a zombie: not running)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"
