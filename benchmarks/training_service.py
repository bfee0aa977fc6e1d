"""TrainingService benchmark: what running a job through the platform costs over running the
trainer by hand, and how cheap the per-step progress report is, measured in the same run.

    python benchmarks/training_service.py [--steps 40] [--reports 500]

1. The same LoRA job (a small random Llama, the same data and hyperparameters) twice:
   - baseline: `python -m tunefleet.trainer --spec spec.json`, wall time from start to exit;
   - tunefleet: CreateTrainingJob on the embedded server (local launcher), wall time until the
     job is SUCCEEDED. On top of the training this includes queueing and launching, a progress
     report per step, checkpoints stored in the blob store, and registering the adapter (with
     the registry's smoke test).
2. Sequential ReportTrainingProgress calls (a worker's per-step report, with a database
   transaction and an event) against gRPC health checks on the same server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train import SMALL, build_data, build_model  # noqa: E402

HYPERPARAMETERS: dict[str, Any] = {
    "learning_rate": 2e-4,
    "epochs": 100,
    "micro_batch_size": 8,
    "max_sequence_length": 256,
    "seed": 1,
}


def baseline(model: Path, data: Path, steps: int, workdir: Path) -> float:
    spec = {
        "base_model": str(model),
        "method": "lora",
        "lora": {"rank": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "hyperparameters": {**HYPERPARAMETERS, "precision": "fp32", "max_steps": steps},
        "train_data": {"uri": str(data)},
        "output_dir": str(workdir / "baseline"),
    }
    path = workdir / "spec.json"
    path.write_text(json.dumps(spec))
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "tunefleet.trainer", "--spec", str(path)],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


async def through_the_service(
    model: Path, records: bytes, steps: int, reports: int, workdir: Path
) -> dict[str, Any]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from prometheus_client import CollectorRegistry

    from tunefleet.app.services import registration, training_service
    from tunefleet.runtime.context import ServiceContext, open_storage
    from tunefleet.runtime.server import TunefleetServer
    from tunefleet.runtime.settings import ServerSettings, load_settings
    from tunefleet.v1 import (
        common_pb2,
        dataset_pb2,
        dataset_service_pb2,
        dataset_service_pb2_grpc,
        training_job_pb2,
        training_service_pb2,
        training_service_pb2_grpc,
    )

    settings = load_settings(
        data_dir=workdir / "platform",
        models={"small": str(model)},
        training={"poll_seconds": 0.2},
    )
    storage = open_storage(settings)
    context = ServiceContext(settings, storage, CollectorRegistry())
    server = TunefleetServer(
        ServerSettings(port=0, metrics_enabled=False),
        [registration(key, context) for key in ("datasets", "adapters", "training")],
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
            training = training_service_pb2_grpc.TrainingServiceStub(channel)

            async def upload() -> Any:
                yield dataset_service_pb2.UploadDatasetRequest(
                    header=dataset_service_pb2.UploadDatasetHeader(
                        options=dataset_pb2.DatasetOptions(validation_fraction=0.0)
                    )
                )
                yield dataset_service_pb2.UploadDatasetRequest(chunk=records)
                yield dataset_service_pb2.UploadDatasetRequest(finish_write=True)

            dataset = await datasets.UploadDataset(upload())
            job = training_job_pb2.TrainingJob(
                base_model="small",
                method=common_pb2.TRAINING_METHOD_LORA,
                train_dataset=dataset.name,
                adapter="adapters/bench",
                lora=training_job_pb2.LoraConfig(rank=16, dropout=0.0),
                hyperparameters=training_job_pb2.Hyperparameters(
                    **{
                        **HYPERPARAMETERS,
                        "precision": training_job_pb2.Hyperparameters.PRECISION_FP32,
                    },
                    max_steps=steps,
                ),
            )
            started = time.perf_counter()
            created = await training.CreateTrainingJob(
                training_service_pb2.CreateTrainingJobRequest(training_job=job)
            )
            request = training_service_pb2.StreamTrainingJobEventsRequest(name=created.name)
            events = [event async for event in training.StreamTrainingJobEvents(request)]
            elapsed = time.perf_counter() - started
            final = await training.GetTrainingJob(
                training_service_pb2.GetTrainingJobRequest(name=created.name)
            )
            if final.state != training_job_pb2.TrainingJob.STATE_SUCCEEDED:
                raise SystemExit(f"the job ended {final.state}: {final.error}")
    finally:
        await server.stop(0)

    # The report path: a job "run" by a launcher that starts nothing, so that only the service
    # is measured.
    idle = IdleLauncher()
    context = ServiceContext(settings, storage, CollectorRegistry())
    server = TunefleetServer(
        ServerSettings(port=0, metrics_enabled=False), [training_service(context, idle)]
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            training = training_service_pb2_grpc.TrainingServiceStub(channel)
            other = await training.CreateTrainingJob(
                training_service_pb2.CreateTrainingJobRequest(training_job=job)
            )
            await asyncio.wait_for(idle.launched.wait(), 30)
            metadata = (("authorization", f"Bearer {idle.token}"),)
            report_times = []
            for step in range(reports):
                progress = training_job_pb2.TrainingProgress(step=step + 1, train_loss=1.0)
                tick = time.perf_counter()
                await training.ReportTrainingProgress(
                    training_service_pb2.ReportTrainingProgressRequest(
                        name=other.name, progress=progress
                    ),
                    metadata=metadata,
                )
                report_times.append(time.perf_counter() - tick)
            health = health_pb2_grpc.HealthStub(channel)
            health_times = []
            for _ in range(reports):
                tick = time.perf_counter()
                await health.Check(health_pb2.HealthCheckRequest())
                health_times.append(time.perf_counter() - tick)
    finally:
        await server.stop(0)
        storage.close()
    return {
        "seconds": elapsed,
        "events": len(events),
        "report_ms": statistics.median(report_times) * 1000,
        "health_ms": statistics.median(health_times) * 1000,
    }


class IdleLauncher:
    """Accepts runs and reports them running; starts nothing."""

    name = "idle"

    def __init__(self) -> None:
        self.token = ""
        self.launched = asyncio.Event()

    async def start(self, wake: Any) -> None:
        pass

    async def close(self) -> None:
        pass

    async def launch(self, request: Any) -> Any:
        from tunefleet.training.launcher import Run

        self.token = request.spec["report"]["token"]
        self.launched.set()
        return Run("idle", {})

    async def status(self, run: Any) -> Any:
        from tunefleet.training.launcher import Phase, RunStatus

        return RunStatus(Phase.RUNNING)

    async def cancel(self, run: Any) -> None:
        pass

    async def logs(self, run: Any, cursor: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        return [], cursor

    async def checkpoint_saved(self, run: Any, uri: str) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--reports", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        model = build_model(workdir / "model", SMALL)
        data = build_data(workdir / "data.jsonl", 400)
        plain = baseline(model, data, args.steps, workdir)
        service = asyncio.run(
            through_the_service(model, data.read_bytes(), args.steps, args.reports, workdir)
        )
    print(f"LoRA, {args.steps} steps, small Llama (hidden 256, 4 layers), CPU:")
    print(f"  trainer by hand            {plain:8.1f} s")
    print(
        f"  through TrainingService    {service['seconds']:8.1f} s"
        f"   ({service['events']} events streamed)"
    )
    print(f"  ratio (service / by hand)  {service['seconds'] / plain:8.2f}")
    print(f"median latency over {args.reports} sequential calls:")
    print(f"  ReportTrainingProgress     {service['report_ms']:8.2f} ms")
    print(f"  grpc.health.v1 Check       {service['health_ms']:8.2f} ms")
    print(f"  ratio (report / health)    {service['report_ms'] / service['health_ms']:8.2f}")


if __name__ == "__main__":
    main()
