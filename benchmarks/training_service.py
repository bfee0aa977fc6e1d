"""TrainingService benchmark: what running a job through the platform costs over running the
trainer by hand, and how cheap the per-step progress report is, measured in the same run.

    python benchmarks/training_service.py [--steps 40] [--rounds 3] [--reports 500]

1. The same LoRA job (a small random Llama, the same data and hyperparameters) two ways:
   - baseline: `python -m tunefleet.trainer --spec spec.json`, wall time from start to exit;
   - tunefleet: CreateTrainingJob on the embedded server (local launcher), wall time until the
     job is SUCCEEDED. On top of the training this includes queueing and launching, a progress
     report per step, checkpoints stored in the blob store, and registering the adapter (with
     the registry's smoke test).
2. Sequential ReportTrainingProgress calls (a worker's per-step report, with a database
   transaction and an event) against gRPC health checks on the same server.
Each comparison runs both sides once untimed (the job: 4 steps), then `--rounds` rounds in a
rotating order, every round printed (benchmarks/harness.py); each ratio is printed as its median
and range.
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

from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import rotations, spread, time_rounds_async  # noqa: E402
from benchmarks.train import SMALL, build_data, build_model  # noqa: E402

HYPERPARAMETERS: dict[str, Any] = {
    "learning_rate": 2e-4,
    "epochs": 100,
    "micro_batch_size": 8,
    "max_sequence_length": 256,
    "seed": 1,
}


def by_hand(model: Path, data: Path, steps: int, workdir: Path) -> float:
    """Seconds from starting the trainer on a spec to its exit."""
    spec = {
        "base_model": str(model),
        "method": "lora",
        "lora": {"rank": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "hyperparameters": {**HYPERPARAMETERS, "precision": "fp32", "max_steps": steps},
        "train_data": {"uri": str(data)},
        "output_dir": str(workdir),
    }
    workdir.mkdir(parents=True)
    path = workdir / "spec.json"
    path.write_text(json.dumps(spec))
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "tunefleet.trainer", "--spec", str(path)],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


async def compare(model: Path, records: bytes, args: Any, workdir: Path) -> tuple[list[float], str]:
    """Per round, the job through TrainingService over the trainer by hand (wall time); and the
    dataset uploaded."""
    import grpc

    from tunefleet.app.services import registration
    from tunefleet.runtime.context import ServiceContext, open_storage
    from tunefleet.runtime.server import TunefleetServer
    from tunefleet.runtime.settings import ServerSettings, load_settings
    from tunefleet.v1 import (
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
            data = workdir / "data.jsonl"
            data.write_bytes(records)

            async def run(side: str, number: int | str, steps: int) -> float:
                if side == "by hand":
                    seconds = await asyncio.to_thread(
                        by_hand, model, data, steps, workdir / f"by-hand-{number}"
                    )
                    print(f"  round {number:<7} trainer by hand          {seconds:7.1f} s")
                    return seconds
                started = time.perf_counter()
                created = await training.CreateTrainingJob(
                    training_service_pb2.CreateTrainingJobRequest(
                        training_job=job(dataset.name, steps)
                    )
                )
                request = training_service_pb2.StreamTrainingJobEventsRequest(name=created.name)
                events = [event async for event in training.StreamTrainingJobEvents(request)]
                seconds = time.perf_counter() - started
                final = await training.GetTrainingJob(
                    training_service_pb2.GetTrainingJobRequest(name=created.name)
                )
                if final.state != training_job_pb2.TrainingJob.STATE_SUCCEEDED:
                    raise SystemExit(f"the job ended {final.state}: {final.error}")
                print(
                    f"  round {number:<7} through TrainingService {seconds:7.1f} s"
                    f"  ({len(events)} events streamed)",
                    flush=True,
                )
                return seconds

            sides = ["by hand", "service"]
            for side in sides:
                await run(side, "warm-up", 4)
            ratios = []
            for number, order in rotations(sides, args.rounds):
                seconds = {side: await run(side, number, args.steps) for side in order}
                ratios.append(seconds["service"] / seconds["by hand"])
    finally:
        await server.stop(0)
        storage.close()
    return ratios, dataset.name


def job(dataset: str, steps: int) -> Any:
    from tunefleet.v1 import common_pb2, training_job_pb2

    return training_job_pb2.TrainingJob(
        base_model="small",
        method=common_pb2.TRAINING_METHOD_LORA,
        train_dataset=dataset,
        adapter="adapters/bench",
        lora=training_job_pb2.LoraConfig(rank=16, dropout=0.0),
        hyperparameters=training_job_pb2.Hyperparameters(
            **{**HYPERPARAMETERS, "precision": training_job_pb2.Hyperparameters.PRECISION_FP32},
            max_steps=steps,
        ),
    )


async def report_path(
    model: Path, dataset: str, args: Any, workdir: Path
) -> dict[str, list[float]]:
    """Seconds of `reports` sequential ReportTrainingProgress calls, and of as many health
    checks, per round: a job "run" by a launcher that starts nothing, so that only the service
    is measured."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tunefleet.app.services import registration, training_service
    from tunefleet.runtime.context import ServiceContext, open_storage
    from tunefleet.runtime.server import TunefleetServer
    from tunefleet.runtime.settings import ServerSettings, load_settings
    from tunefleet.v1 import training_job_pb2, training_service_pb2, training_service_pb2_grpc

    settings = load_settings(data_dir=workdir / "platform", models={"small": str(model)})
    reports = args.reports
    storage = open_storage(settings)
    idle = IdleLauncher()
    context = ServiceContext(settings, storage, CollectorRegistry())
    server = TunefleetServer(
        ServerSettings(port=0, metrics_enabled=False),
        [
            *(registration(key, context) for key in ("datasets", "adapters")),
            training_service(context, idle),
        ],
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            training = training_service_pb2_grpc.TrainingServiceStub(channel)
            created = await training.CreateTrainingJob(
                training_service_pb2.CreateTrainingJobRequest(training_job=job(dataset, args.steps))
            )
            await asyncio.wait_for(idle.launched.wait(), 30)
            metadata = (("authorization", f"Bearer {idle.token}"),)
            health = health_pb2_grpc.HealthStub(channel)
            steps = iter(range(1, 1_000_000))

            async def report() -> None:
                for _ in range(reports):
                    progress = training_job_pb2.TrainingProgress(step=next(steps), train_loss=1.0)
                    await training.ReportTrainingProgress(
                        training_service_pb2.ReportTrainingProgressRequest(
                            name=created.name, progress=progress
                        ),
                        metadata=metadata,
                    )

            async def check() -> None:
                for _ in range(reports):
                    await health.Check(health_pb2.HealthCheckRequest())

            return await time_rounds_async(
                {"report": report, "health": check}, args.rounds, f"{reports} calls"
            )
    finally:
        await server.stop(0)
        storage.close()


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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reports", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        model = build_model(workdir / "model", SMALL)
        records = build_data(workdir / "records.jsonl", 400).read_bytes()
        print(f"LoRA, {args.steps} steps, small Llama (hidden 256, 4 layers), CPU:")
        ratios, dataset = asyncio.run(compare(model, records, args, workdir))
        print(f"  wall time, service / by hand: {spread(ratios)}")
        print(f"{args.reports} sequential calls per round:")
        times = asyncio.run(report_path(model, dataset, args, workdir))
    report, health = (statistics.median(times[side]) / args.reports * 1000 for side in times)
    ratios = [r / h for r, h in zip(times["report"], times["health"], strict=True)]
    print(f"  ReportTrainingProgress     {report:8.2f} ms per call (median of rounds)")
    print(f"  grpc.health.v1 Check       {health:8.2f} ms per call")
    print(f"  report / health            {spread(ratios)}")


if __name__ == "__main__":
    main()
