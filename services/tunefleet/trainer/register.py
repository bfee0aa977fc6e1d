"""Registering the trained result with AdapterService, with its lineage.

Registration is idempotent per job: its `request_id` is derived from the job's name, so a
retried call, a retried Pod or TrainingService registering the output itself (when the trainer
could not) all end with the same single version. When the spec has a blob store, the files go
there first and the registration is a CreateAdapterVersion naming them; that request is stored
as a blob too and its URI left in the outcome file, so that TrainingService can register the
output after the trainer has gone. Without a store the files are streamed
(UploadAdapterVersion).

Calls wait for the registry to be ready and are retried with backoff for
`registry.retry_seconds` while it is unavailable (a rolling update of the adapters Deployment);
a refusal (the adapter does not exist, the output is invalid) fails at once.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tunefleet.storage.blobs import BlobStore
from tunefleet.trainer import outcome
from tunefleet.trainer.spec import TrainerSpec

log = logging.getLogger(__name__)
T = TypeVar("T")
CHUNK = 1024 * 1024
METHODS = {
    "lora": "TRAINING_METHOD_LORA",
    "qlora": "TRAINING_METHOD_QLORA",
    "dora": "TRAINING_METHOD_DORA",
    "full": "TRAINING_METHOD_FULL",
}
# Codes that mean "not now": the registry is restarting, overloaded or slow.
TRANSIENT = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "RESOURCE_EXHAUSTED"}
ATTEMPT_SECONDS = 300.0  # one call: validation and the smoke test of a large adapter take a while
# Reconnect soon after the peer comes back (gRPC's default backoff grows to two minutes).
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
]


class RegistrationFailed(Exception):
    """The result could not be registered (refused, or the registry stayed unavailable)."""


def request_id(job: str) -> str:
    """The idempotency key of a job's registration: the same for every attempt of the job."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"tunefleet:{job}")) if job else str(uuid.uuid4())


def description(spec: TrainerSpec) -> str:
    return f"trained by {spec.job or 'the tunefleet trainer'}"


def lineage(spec: TrainerSpec, metrics: dict[str, float]) -> Any:
    from google.protobuf import struct_pb2

    from tunefleet.v1 import adapter_pb2, common_pb2

    hyperparameters = struct_pb2.Struct()
    hyperparameters.update(
        {
            **spec.hyperparameters.model_dump(),
            "learning_rate": spec.learning_rate,
            **{f"lora_{k}": v for k, v in spec.lora.model_dump().items() if spec.method != "full"},
            "objective": spec.objective,
            **({"dpo_beta": spec.dpo.beta} if spec.objective == "dpo" else {}),
        }
    )
    return adapter_pb2.Lineage(
        training_job=spec.job,
        datasets=spec.datasets,
        feedback=spec.feedback,
        base_model=spec.base_model,
        method=common_pb2.TrainingMethod.Value(METHODS[spec.method]),
        hyperparameters=hyperparameters,
        metrics={k: v for k, v in metrics.items() if v is not None},
    )


def stored_request(
    spec: TrainerSpec, output: Path, metrics: dict[str, float], store: BlobStore
) -> tuple[Any, str]:
    """Put the output's files in the blob store; the CreateAdapterVersionRequest naming them,
    and the URI of its own stored copy."""
    from tunefleet.v1 import adapter_pb2, adapter_service_pb2

    files = []
    for path in sorted(p for p in output.rglob("*") if p.is_file()):
        info = store.put_file(path)
        files.append(
            adapter_pb2.AdapterFile(
                path=str(path.relative_to(output)),
                uri=store.uri(info.sha256),
                sha256=info.sha256,
                size_bytes=info.size,
            )
        )
    request = adapter_service_pb2.CreateAdapterVersionRequest(
        parent=spec.registry.adapter,
        files=files,
        description=description(spec),
        lineage=lineage(spec, metrics),
        request_id=request_id(spec.job),
    )
    stored = store.put([request.SerializeToString(deterministic=True)])
    return request, store.uri(stored.sha256)


def register(
    spec: TrainerSpec, output: Path, metrics: dict[str, float], store: BlobStore | None
) -> str:
    """Register the files in `output` as a new version of spec.registry.adapter; its name."""
    import grpc

    from tunefleet.v1 import adapter_service_pb2_grpc

    metadata = (("authorization", f"Bearer {spec.registry.token}"),) if spec.registry.token else ()
    log.info(
        "registering %s with %s (retrying for up to %g s while it is unavailable)",
        spec.registry.adapter,
        spec.registry.endpoint,
        spec.registry.retry_seconds,
    )
    with grpc.insecure_channel(spec.registry.endpoint, options=RECONNECT_OPTIONS) as channel:
        stub = adapter_service_pb2_grpc.AdapterServiceStub(channel)
        if store is not None:
            request, request_uri = stored_request(spec, output, metrics, store)
            outcome.record(output_request=request_uri)  # for TrainingService, if this fails

            def call(timeout: float) -> Any:
                return stub.CreateAdapterVersion(
                    request, timeout=timeout, metadata=metadata, wait_for_ready=True
                )
        else:
            requests = upload_requests(spec, output, metrics)

            def call(timeout: float) -> Any:
                return stub.UploadAdapterVersion(
                    requests(), timeout=timeout, metadata=metadata, wait_for_ready=True
                )

        version = with_retries(call, spec.registry.retry_seconds, spec.registry.endpoint)
    return str(version.name)


def upload_requests(
    spec: TrainerSpec, output: Path, metrics: dict[str, float]
) -> Callable[[], Iterator[Any]]:
    from tunefleet.v1 import adapter_pb2, adapter_service_pb2

    request = adapter_service_pb2.UploadAdapterVersionRequest
    header = request.Header(
        parent=spec.registry.adapter,
        lineage=lineage(spec, metrics),
        description=description(spec),
        request_id=request_id(spec.job),
    )

    def requests() -> Iterator[Any]:
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

    return requests


def with_retries(call: Callable[[float], T], retry_seconds: float, endpoint: str) -> T:
    """`call(timeout)`, again with backoff while it fails with a transient code, for
    `retry_seconds` in all."""
    import grpc

    deadline = time.monotonic() + retry_seconds
    delay, attempt = 1.0, 1
    while True:
        try:
            return call(max(1.0, min(ATTEMPT_SECONDS, deadline - time.monotonic())))
        except grpc.RpcError as error:
            code = error.code().name if error.code() else "UNKNOWN"
            said = f"{code}: {error.details()}"
            if code not in TRANSIENT:
                raise RegistrationFailed(
                    f"the registry at {endpoint} refused the result ({said})"
                ) from None
            if time.monotonic() + delay > deadline:
                raise RegistrationFailed(
                    f"the registry at {endpoint} stayed unavailable for {retry_seconds:g} s "
                    f"({attempt} attempts; last: {said})"
                ) from None
            log.warning(
                "registration attempt %d failed (%s); again in %.0f s", attempt, said, delay
            )
            time.sleep(delay)
            delay, attempt = min(delay * 2, 30.0), attempt + 1
