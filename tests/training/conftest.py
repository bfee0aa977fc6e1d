"""An embedded platform for TrainingService and EvaluationService tests: datasets, adapters,
training and evaluation (and inference, given a base model) on one real gRPC server, sharing one
SQLite database and blob directory, with the tiny chat model of the trainer tests as a known base
model."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from tests.conftest import StartServer
from tests.storage.conftest import s3_endpoint
from tests.trainer.conftest import ANIMALS, COLOURS, chat_model, conversation, tool_model
from tunefleet.app.services import inference_service, registration, training_service
from tunefleet.runtime.context import ServiceContext, Storage, open_storage
from tunefleet.runtime.server import TunefleetServer
from tunefleet.runtime.settings import Settings, load_settings
from tunefleet.trainer import register
from tunefleet.trainer.spec import DataSpec, RegistrySpec, TrainerSpec
from tunefleet.v1 import (
    adapter_service_pb2_grpc,
    common_pb2,
    dataset_pb2,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    evaluation_service_pb2_grpc,
    inference_service_pb2_grpc,
    training_job_pb2,
    training_service_pb2,
    training_service_pb2_grpc,
)

if TYPE_CHECKING:
    from tunefleet.v1.adapter_service_pb2_grpc import AdapterServiceAsyncStub
    from tunefleet.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub
    from tunefleet.v1.training_service_pb2_grpc import TrainingServiceAsyncStub

__all__ = [
    "chat_model",
    "s3_endpoint",
    "tool_model",
]  # fixtures of other test packages, used here too


@pytest.fixture(scope="session")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The config.json of a Llama-2-7B-shaped model (6.7B parameters), without weights: enough
    for the GPU memory estimate."""
    path = tmp_path_factory.mktemp("llama-7b")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


def colour_records(train: int = 96, validation: int = 24, seed: int = 0) -> bytes:
    """OpenAI chat records of the trainer tests' task, each line distinct (a counter in the
    system message) so that deduplication keeps them all."""
    rng = random.Random(seed)
    mapping = dict(zip(ANIMALS, COLOURS, strict=True))
    lines = []
    for index in range(train + validation):
        animal = ANIMALS[index % len(ANIMALS)] if index < train else rng.choice(ANIMALS)
        messages = conversation(animal, mapping[animal])
        messages[0]["content"] += f" ({index})"
        lines.append(json.dumps({"messages": messages}))
    return ("\n".join(lines) + "\n").encode()


def colour_pairs(count: int = 80) -> bytes:
    """Preference pairs of the same task in TRL's explicit-prompt form (a DATASET_KIND_PREFERENCE
    dataset once uploaded): the English answer is preferred to the German one."""
    mapping = list(zip(ANIMALS, COLOURS, strict=True))
    lines = []
    for index in range(count):
        animal, colour = mapping[index % len(mapping)]
        prompt = conversation(animal, colour)[:2]
        prompt[0]["content"] += f" ({index})"
        record = {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": f"Colour: {colour}. Done."}],
            "rejected": [{"role": "assistant", "content": f"Farbe: {colour} -- fertig!"}],
        }
        lines.append(json.dumps(record))
    return ("\n".join(lines) + "\n").encode()


@dataclass
class Platform:
    """A running embedded server and clients of its services."""

    start_server: StartServer
    settings: Settings
    storage: Storage
    launcher: Any
    server: TunefleetServer | None = None
    channel: grpc.aio.Channel | None = None
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    async def start(self, port: int = 0) -> Platform:
        self.registry = CollectorRegistry()
        context = ServiceContext(self.settings, self.storage, self.registry)
        services = [
            registration("datasets", context),
            registration("adapters", context),
            training_service(context, self.launcher),
        ]
        if self.settings.inference.base_model:
            services.append(inference_service(context))
        services.append(registration("evaluation", context))
        if self.settings.inference.base_model:  # the loop reads InferenceService's feedback
            services.append(registration("retraining", context))
        self.server = await self.start_server(services, port=port)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.server.port}")
        return self

    async def stop(self) -> None:
        """Stop the server as SIGTERM would (runs of the launcher go on)."""
        assert self.server is not None and self.channel is not None
        await self.channel.close()
        await self.server.stop(0)

    @property
    def _channel(self) -> grpc.aio.Channel:
        assert self.channel is not None, "start() the platform first"
        return self.channel

    @property
    def training(self) -> TrainingServiceAsyncStub:
        return training_service_pb2_grpc.TrainingServiceStub(self._channel)

    @property
    def inference(self) -> Any:
        return inference_service_pb2_grpc.InferenceServiceStub(self._channel)

    @property
    def evaluation(self) -> Any:
        return evaluation_service_pb2_grpc.EvaluationServiceStub(self._channel)

    @property
    def datasets(self) -> DatasetServiceAsyncStub:
        return dataset_service_pb2_grpc.DatasetServiceStub(self._channel)

    @property
    def adapters(self) -> AdapterServiceAsyncStub:
        return adapter_service_pb2_grpc.AdapterServiceStub(self._channel)

    async def upload(self, data: bytes | None = None) -> dataset_pb2.Dataset:
        async def requests() -> AsyncIterator[dataset_service_pb2.UploadDatasetRequest]:
            yield dataset_service_pb2.UploadDatasetRequest(
                header=dataset_service_pb2.UploadDatasetHeader(
                    display_name="colours",
                    options=dataset_pb2.DatasetOptions(
                        remove_exact_duplicates=False,
                        remove_near_duplicates=False,
                        validation_fraction=0.2,
                    ),
                )
            )
            yield dataset_service_pb2.UploadDatasetRequest(chunk=data or colour_records())
            yield dataset_service_pb2.UploadDatasetRequest(finish_write=True)

        return await self.datasets.UploadDataset(requests())

    async def create(self, dataset: str, **fields: Any) -> training_job_pb2.TrainingJob:
        request_id = fields.pop("request_id", "")
        return await self.training.CreateTrainingJob(
            training_service_pb2.CreateTrainingJobRequest(
                training_job=job_request(dataset, **fields), request_id=request_id
            )
        )

    async def wait(
        self, name: str, *states: str, within: float = 60.0
    ) -> training_job_pb2.TrainingJob:
        """Poll until the job is in one of `states` (names such as "RUNNING")."""
        wanted = {training_job_pb2.TrainingJob.State.Value(f"STATE_{s}") for s in states}
        deadline = asyncio.get_running_loop().time() + within
        while True:
            job = await self.training.GetTrainingJob(
                training_service_pb2.GetTrainingJobRequest(name=name)
            )
            if job.state in wanted:
                return job
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(
                    f"{name} is {training_job_pb2.TrainingJob.State.Name(job.state)}, "
                    f"not {states}: {job.error}"
                )
            await asyncio.sleep(0.05)

    async def report(self, name: str, token: str, **fields: Any) -> bool:
        """A worker's report with its token; whether the service asks it to stop."""
        response = await self.training.ReportTrainingProgress(
            training_service_pb2.ReportTrainingProgressRequest(name=name, **fields),
            metadata=(("authorization", f"Bearer {token}"),),
        )
        return bool(response.cancel_requested)

    async def events(self, name: str, after: int = 0) -> list[training_job_pb2.TrainingEvent]:
        request = training_service_pb2.StreamTrainingJobEventsRequest(
            name=name, after_sequence=after, no_follow=True
        )
        return [event async for event in self.training.StreamTrainingJobEvents(request)]


def job_request(dataset: str, **fields: Any) -> training_job_pb2.TrainingJob:
    """A LoRA job on the tiny chat model, a few steps long; `fields` override."""
    hyperparameters = {
        "learning_rate": 1e-2,
        "epochs": 1,
        "max_steps": 6,
        "micro_batch_size": 8,
        "max_sequence_length": 64,
        "eval_every_steps": 3,
        **fields.pop("hyperparameters", {}),
    }
    lora = {
        "rank": 8,
        "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"],
        **fields.pop("lora", {}),
    }
    job = {
        "display_name": "colours",
        "base_model": "colours",
        "method": common_pb2.TRAINING_METHOD_LORA,
        "train_dataset": dataset,
        "adapter": "adapters/colours",
        "hyperparameters": training_job_pb2.Hyperparameters(**hyperparameters),
        "lora": training_job_pb2.LoraConfig(**lora),
        **fields,
    }
    return training_job_pb2.TrainingJob(**job)


@pytest.fixture
def platform_settings(tmp_path: Path, chat_model: Path, big_model: Path) -> dict[str, Any]:
    """Keyword arguments of load_settings; tests change them before `make_platform`."""
    return {
        "data_dir": tmp_path / "platform",
        "models": {"colours": str(chat_model), "llama-7b": str(big_model)},
        "training": {"poll_seconds": 0.1, "local_gpus": 8, "heartbeat_seconds": 1.0},
    }


@pytest.fixture
async def make_platform(
    start_server: StartServer, platform_settings: dict[str, Any]
) -> AsyncIterator[Any]:
    storages: list[Storage] = []

    async def make(launcher: Any = None, **overrides: Any) -> Platform:
        options = {**platform_settings, **overrides}
        settings = load_settings(**options)
        storage = open_storage(settings)
        storages.append(storage)
        return await Platform(start_server, settings, storage, launcher).start()

    yield make
    for storage in storages:
        storage.close()


def lora_adapter(chat_model: Path, directory: Path) -> Path:
    """A real LoRA adapter of the tiny chat model, with weights that change its output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(chat_model)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(str(directory))
    return directory


def stored_request(platform: Platform, job: str, adapter: Path) -> str:
    """What a trainer that could not register leaves behind (trainer/register.py): its files
    and its registration request in the blob store; the request's URI."""
    spec = TrainerSpec(
        base_model="colours",
        train_data=DataSpec(uri="unused"),
        output_dir=adapter,
        job=job,
        registry=RegistrySpec(adapter="adapters/colours"),
    )
    _, uri = register.stored_request(spec, adapter, {}, platform.storage.blobs)
    return uri
