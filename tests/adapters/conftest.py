"""A tiny random Llama saved locally, and real PEFT adapters for it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.storage.conftest import database_url, postgres_server  # noqa: F401 (fixtures)
from tunefleet.adapters.manager import AdapterManager
from tunefleet.adapters.versions import Hooks, RegistrySettings
from tunefleet.runtime.context import ServiceContext, Storage
from tunefleet.runtime.models import ModelCatalogue
from tunefleet.runtime.settings import load_settings
from tunefleet.storage.blobs import LocalBlobStore
from tunefleet.storage.database import Database

TINY: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


@pytest.fixture(scope="session")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def gguf_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny chat model (with tokenizer and chat template) with sharper attention (its query
    and key weights scaled up): a random model's attention is nearly uniform, and would hide a
    wrong q/k layout in a GGUF export. Its rotary base is not the default either (transformers 5
    keeps it in `rope_parameters`)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from tests.trainer.conftest import build_chat_model

    directory = build_chat_model(tmp_path_factory.mktemp("gguf-source"))
    config = json.loads((directory / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": 500.0, "rope_type": "default"}
    (directory / "config.json").write_text(json.dumps(config))
    network = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        for layer in network.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    network.save_pretrained(directory)
    return directory


MakeAdapter = Callable[..., Path]


@pytest.fixture(scope="session")
def make_adapter(tmp_path_factory: pytest.TempPathFactory) -> MakeAdapter:
    """Save a PEFT LoRA adapter for a Llama of the given shape: make_adapter(**LoraConfig args)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(*, model: dict[str, Any] | None = None, seed: int = 1, **lora: Any) -> Path:
        torch.manual_seed(seed)
        base = LlamaForCausalLM(LlamaConfig(**{**TINY, **(model or {})}))
        options = {"r": 8, "target_modules": "all-linear", "init_lora_weights": False, **lora}
        peft_model = get_peft_model(base, LoraConfig(**options))
        path = tmp_path_factory.mktemp("adapter")
        peft_model.save_pretrained(str(path))
        return path

    return make


def registry_for(db: Database, tmp_path: Path, base_model: Path, **settings: Any) -> AdapterManager:
    from tunefleet.adapters import peft_ops

    return AdapterManager(
        db,
        LocalBlobStore(tmp_path / "blobs"),
        workdir=tmp_path / "work",
        models=ModelCatalogue({"tiny-llama": base_model}),
        settings=RegistrySettings(**settings),
        hooks=Hooks(smoke_test=peft_ops.smoke_test, merge=peft_ops.merge),
    )


@pytest.fixture
def registry(database_url: str, tmp_path: Path, base_model: Path) -> Iterator[AdapterManager]:  # noqa: F811
    db = Database(database_url)
    db.migrate()
    yield registry_for(db, tmp_path, base_model)
    db.close()


@pytest.fixture
def adapter_context(tmp_path: Path, base_model: Path) -> Iterator[ServiceContext]:
    """A service context whose model catalogue knows the tiny Llama as `tiny-llama`."""
    from tunefleet.runtime.context import open_storage

    settings = load_settings(data_dir=tmp_path / "data", models={"tiny-llama": str(base_model)})
    storage: Storage = open_storage(settings)
    yield ServiceContext(settings, storage, CollectorRegistry())
    storage.close()
