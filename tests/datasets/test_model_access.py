"""With auth on, a request names models from the catalogue or folders under `model_roots`, never
another folder of the server: through a real server, a writer cannot count tokens with another
team's tokenizer or train on another team's model, and cannot tell an existing folder from a
missing one."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from tests.conftest import StartServer
from tests.datasets.records import jsonl, records
from tests.datasets.test_service import header, stream
from tests.helpers import field_violations
from tunefleet.app.services import registration
from tunefleet.runtime.context import ServiceContext, open_storage
from tunefleet.runtime.settings import load_settings
from tunefleet.v1 import (
    common_pb2,
    dataset_service_pb2_grpc,
    training_job_pb2,
    training_service_pb2,
    training_service_pb2_grpc,
)

TOKEN = "writer-token"
WRITER = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture
async def channel(
    tmp_path: Path, tokenizer_dir: Path, start_server: StartServer
) -> AsyncIterator[grpc.aio.Channel]:
    tokens = tmp_path / "tokens.yaml"
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    tokens.write_text(f"tokens:\n  - {{subject: w, role: writer, sha256: {digest}}}\n")
    allowed = tmp_path / "models" / "team-a"
    shutil.copytree(tokenizer_dir, allowed)
    auth = {"enabled": True, "tokens_file": tokens}
    settings = load_settings(
        data_dir=tmp_path / "data",
        models={"catalogued": tokenizer_dir},
        model_roots=[tmp_path / "models"],
        server={"auth": auth},
        training={"worker_registry_token": TOKEN},
    )
    context = ServiceContext(settings, open_storage(settings), CollectorRegistry())
    services = [registration(key, context) for key in ("datasets", "training")]
    server = await start_server(services, auth=auth)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel
    context.storage.close()


async def upload_with(channel: grpc.aio.Channel, tokenizer: str) -> str:
    stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
    request = header(display_name="d", options={"tokenizer_model": tokenizer})
    dataset = await stub.UploadDataset(
        stream(request, jsonl(records("sharegpt", 20))), metadata=WRITER
    )
    assert dataset.token_statistics.total_tokens > 0
    return str(dataset.name)


async def refused(call: object, field: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    error = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert field_violations(error)[0][0] == field
    return error.details() or ""


async def test_only_catalogued_models_and_the_allowed_roots_are_reachable(
    channel: grpc.aio.Channel, tokenizer_dir: Path, tmp_path: Path
) -> None:
    dataset = await upload_with(channel, "catalogued")
    await upload_with(channel, str(tmp_path / "models" / "team-a"))

    datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
    training = training_service_pb2_grpc.TrainingServiceStub(channel)
    models = tmp_path / "models"
    climbing = f"{models}{'/..' * (len(models.parts) - 1)}{tokenizer_dir}"  # up to / and down
    words: dict[str, set[str]] = {
        "options.tokenizer_model": set(),
        "training_job.base_model": set(),
    }
    for folder in (str(tokenizer_dir), climbing, "/no/such"):
        request = header(display_name="d", options={"tokenizer_model": folder})
        upload = datasets.UploadDataset(
            stream(request, jsonl(records("sharegpt", 5))), metadata=WRITER
        )
        words["options.tokenizer_model"].add(
            (await refused(upload, "options.tokenizer_model")).replace(folder, "X")
        )
        job = training_job_pb2.TrainingJob(
            base_model=folder,
            method=common_pb2.TRAINING_METHOD_LORA,
            train_dataset=dataset,
            adapter="adapters/a",
        )
        create = training.CreateTrainingJob(
            training_service_pb2.CreateTrainingJobRequest(training_job=job), metadata=WRITER
        )
        words["training_job.base_model"].add(
            (await refused(create, "training_job.base_model")).replace(folder, "X")
        )
    # One refusal per field, the same whether the folder exists or not; no other server path.
    for field, texts in words.items():
        (text,) = texts
        assert "nor a model under the allowed roots" in text, field
        assert str(tmp_path) not in text
