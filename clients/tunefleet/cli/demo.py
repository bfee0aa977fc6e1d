"""`make demo`: start the embedded server and show what it serves.

Until the SDK and CLI issue lands this tour is short: it starts `tunefleet serve` (all four
services in one process), checks each service's health, lists the API through server reflection,
uploads the bundled sample dataset (order extraction, with the flaws a real export has) and shows
its validation and cleaning report and a preview, lists training jobs, shows that
InferenceService says what it needs (a base model), reads the Prometheus metrics, and shuts the
server down with SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tunefleet.v1 import (
    dataset_pb2,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    inference_service_pb2,
    inference_service_pb2_grpc,
    training_service_pb2,
    training_service_pb2_grpc,
)

SERVICES = [
    "tunefleet.v1.DatasetService",
    "tunefleet.v1.TrainingService",
    "tunefleet.v1.AdapterService",
    "tunefleet.v1.InferenceService",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def wait_healthy(stub: health_pb2_grpc.HealthStub, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"tunefleet serve exited with {server.returncode}")
        try:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            return
        except grpc.RpcError:
            time.sleep(0.2)
    raise SystemExit("tunefleet serve did not become healthy within 60 s")


def upload_sample(stub: dataset_service_pb2_grpc.DatasetServiceStub) -> None:
    sample = resources.files("tunefleet.cli.data").joinpath("orders.jsonl").read_bytes()
    step(f"uploading the sample dataset orders.jsonl ({len(sample)} bytes)")

    def requests() -> Iterator[dataset_service_pb2.UploadDatasetRequest]:
        yield dataset_service_pb2.UploadDatasetRequest(
            header=dataset_service_pb2.UploadDatasetHeader(display_name="orders-demo")
        )
        for start in range(0, len(sample), 16384):
            yield dataset_service_pb2.UploadDatasetRequest(chunk=sample[start : start + 16384])
        yield dataset_service_pb2.UploadDatasetRequest(finish_write=True)

    dataset = stub.UploadDataset(requests(), timeout=60)
    report, cleaning = dataset.validation_report, dataset.cleaning_report
    print(
        f"  {dataset.name}: {dataset.record_count} records "
        f"({dataset.train_record_count} train / {dataset.validation_record_count} validation)"
    )
    print(f"  read {report.total_records}, rejected {report.rejected_records}:")
    for error in report.errors:
        code = dataset_pb2.RecordErrorCode.Name(error.code).removeprefix("RECORD_ERROR_CODE_")
        print(f"    line {error.line}: {code}: {error.message}")
    print(
        f"  duplicates removed: {cleaning.exact_duplicates_removed} exact, "
        f"{cleaning.near_duplicates_removed} near"
    )
    for count in cleaning.pii_counts:
        kind = dataset_pb2.PiiType.Name(count.type).removeprefix("PII_TYPE_")
        print(f"  PII redacted: {count.count} x {kind}")
    preview = stub.PreviewDatasetRecords(
        dataset_service_pb2.PreviewDatasetRecordsRequest(name=dataset.name, limit=1), timeout=10
    )
    for record in preview:
        for message in record.messages:
            print(f"    {message.role:>9}: {message.content}")


def main() -> int:
    port, metrics_port = free_port(), free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="tunefleet-demo-"))
    env = {
        **os.environ,
        "TUNEFLEET_DATA_DIR": str(data_dir),
        "TUNEFLEET_SERVER__PORT": str(port),
        "TUNEFLEET_SERVER__METRICS_PORT": str(metrics_port),
        "TUNEFLEET_LOGGING__LEVEL": "WARNING",
    }
    step(f"starting `tunefleet serve` on 127.0.0.1:{port} (data in {data_dir})")
    tunefleet = Path(sys.executable).with_name("tunefleet")
    server = subprocess.Popen([str(tunefleet), "serve"], env=env)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            wait_healthy(health, server)

            step("health (grpc.health.v1)")
            for name in SERVICES:
                status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)
                print(f"  {name:34} {status_name}")

            step("API through server reflection")
            pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
            for name in SERVICES:
                methods = [m.name for m in pool.FindServiceByName(name).methods]
                print(f"  {name}: {', '.join(methods)}")

            upload_sample(dataset_service_pb2_grpc.DatasetServiceStub(channel))

            step("TrainingService.ListTrainingJobs")
            jobs = training_service_pb2_grpc.TrainingServiceStub(channel).ListTrainingJobs(
                training_service_pb2.ListTrainingJobsRequest(), timeout=5
            )
            print(f"  {len(jobs.training_jobs)} training jobs (the launcher is the local process)")

            step("InferenceService.Generate (no base model is configured in this tour)")
            try:
                inference_service_pb2_grpc.InferenceServiceStub(channel).Generate(
                    inference_service_pb2.GenerateRequest(prompt="Hello"), timeout=5
                )
            except grpc.RpcError as error:
                print(f"  {error.code().name}: {error.details()}")

        step(f"metrics (http://127.0.0.1:{metrics_port}/metrics)")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as page:
            for line in page.read().decode().splitlines():
                wanted = line.startswith(
                    ("tunefleet_grpc_server_requests_total", "tunefleet_dataset_")
                )
                if wanted and "_created" not in line and "_bucket" not in line:
                    print(f"  {line}")
    finally:
        step("stopping with SIGTERM")
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        print(f"  tunefleet serve exited with {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
