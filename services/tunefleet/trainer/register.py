"""Registering the trained result with AdapterService, with its lineage."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunefleet.trainer.spec import TrainerSpec

CHUNK = 1024 * 1024
METHODS = {
    "lora": "TRAINING_METHOD_LORA",
    "qlora": "TRAINING_METHOD_QLORA",
    "dora": "TRAINING_METHOD_DORA",
    "full": "TRAINING_METHOD_FULL",
}


def register(spec: TrainerSpec, output: Path, metrics: dict[str, float]) -> str:
    """Upload the files in `output` as a new version of spec.registry.adapter; its name."""
    import grpc
    from google.protobuf import struct_pb2

    from tunefleet.v1 import adapter_pb2, adapter_service_pb2, adapter_service_pb2_grpc, common_pb2

    hyperparameters = struct_pb2.Struct()
    hyperparameters.update(
        {
            **spec.hyperparameters.model_dump(),
            "learning_rate": spec.learning_rate,
            **{f"lora_{k}": v for k, v in spec.lora.model_dump().items() if spec.method != "full"},
        }
    )
    lineage = adapter_pb2.Lineage(
        training_job=spec.job,
        datasets=spec.datasets,
        base_model=spec.base_model,
        method=common_pb2.TrainingMethod.Value(METHODS[spec.method]),
        hyperparameters=hyperparameters,
        metrics={k: v for k, v in metrics.items() if v is not None},
    )
    request = adapter_service_pb2.UploadAdapterVersionRequest

    def requests() -> Iterator[Any]:
        header = request.Header(
            parent=spec.registry.adapter,
            lineage=lineage,
            description=f"trained by {spec.job or 'the tunefleet trainer'}",
        )
        yield request(header=header)
        for path in sorted(p for p in output.rglob("*") if p.is_file()):
            yield request(
                file=adapter_pb2.AdapterFile(
                    path=str(path.relative_to(output)), size_bytes=path.stat().st_size
                )
            )
            with path.open("rb") as file:
                while chunk := file.read(CHUNK):
                    yield request(chunk=chunk)
        yield request(finish_write=True)

    metadata = (("authorization", f"Bearer {spec.registry.token}"),) if spec.registry.token else ()
    with grpc.insecure_channel(spec.registry.endpoint) as channel:
        stub = adapter_service_pb2_grpc.AdapterServiceStub(channel)
        version = stub.UploadAdapterVersion(requests(), timeout=600, metadata=metadata)
    return str(version.name)
