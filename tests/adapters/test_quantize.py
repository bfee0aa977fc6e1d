"""QuantizeModelVersion: an adapter version merged into its base model (or a merged version as it
is) exported as GGUF, checked against the full model by transformers' own GGUF reader, and stored
as a new version whose lineage leads back through the merge to the adapter; an export that fails
the check is refused (or kept, marked failed, when asked)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from tests.adapters.answers import exact_match, greedy_answers
from tests.adapters.conftest import registry_for
from tests.adapters.test_service import download
from tests.conftest import StartServer
from tests.helpers import error_info
from tests.trainer.conftest import MakeSpec, chat_model, make_spec
from tunefleet.adapters import exports, gguf_export, peft_ops
from tunefleet.adapters.versions import Hooks
from tunefleet.app.services import registration
from tunefleet.core.errors import FailedPrecondition
from tunefleet.runtime.context import ServiceContext, Storage, open_storage
from tunefleet.runtime.settings import load_settings
from tunefleet.storage.database import Database
from tunefleet.v1 import adapter_pb2, adapter_service_pb2, adapter_service_pb2_grpc, common_pb2

if TYPE_CHECKING:
    from tunefleet.v1.adapter_service_pb2_grpc import AdapterServiceAsyncStub as Stub

__all__ = ["chat_model", "make_spec"]  # fixtures of the trainer's tests
pb = adapter_service_pb2
Q8_0, Q4_0, F16 = (
    adapter_pb2.EXPORT_FORMAT_GGUF_Q8_0,
    adapter_pb2.EXPORT_FORMAT_GGUF_Q4_0,
    adapter_pb2.EXPORT_FORMAT_GGUF_F16,
)
PASSED, FAILED = adapter_pb2.ExportCheck.RESULT_PASSED, adapter_pb2.ExportCheck.RESULT_FAILED


@pytest.fixture(scope="module")
def lora(gguf_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter of the chat model with small random weights (PEFT's B = 0 moved off zero)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(gguf_source),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.05)
    directory = tmp_path_factory.mktemp("lora")
    model.save_pretrained(str(directory))
    return directory


@pytest.fixture
def context(tmp_path: Path, gguf_source: Path) -> Iterator[ServiceContext]:
    settings = load_settings(data_dir=tmp_path / "data", models={"chat": str(gguf_source)})
    storage: Storage = open_storage(settings)
    yield ServiceContext(settings, storage, CollectorRegistry())
    storage.close()


@pytest.fixture
async def stub(start_server: StartServer, context: ServiceContext) -> AsyncIterator[Stub]:
    server = await start_server([registration("adapters", context)])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = adapter_service_pb2_grpc.AdapterServiceStub(channel)
        await stub.CreateAdapter(
            pb.CreateAdapterRequest(
                adapter_id="orders", adapter=adapter_pb2.Adapter(base_model="chat")
            )
        )
        yield stub


async def upload(stub: Stub, directory: Path) -> adapter_pb2.AdapterVersion:
    lineage = adapter_pb2.Lineage(base_model="chat", datasets=["datasets/orders"])
    files = await asyncio.to_thread(read, directory)

    async def requests() -> AsyncIterator[pb.UploadAdapterVersionRequest]:
        header = pb.UploadAdapterVersionRequest.Header(parent="adapters/orders", lineage=lineage)
        yield pb.UploadAdapterVersionRequest(header=header)
        for name, content in files:
            yield pb.UploadAdapterVersionRequest(
                file=adapter_pb2.AdapterFile(
                    path=name,
                    size_bytes=len(content),
                    sha256=hashlib.sha256(content).hexdigest(),
                )
            )
            yield pb.UploadAdapterVersionRequest(chunk=content)
        yield pb.UploadAdapterVersionRequest(finish_write=True)

    version: adapter_pb2.AdapterVersion = await stub.UploadAdapterVersion(requests())
    return version


def read(directory: Path) -> list[tuple[str, bytes]]:
    return [(path.name, path.read_bytes()) for path in sorted(directory.iterdir())]


def write(directory: Path, files: dict[str, tuple[bytes, str]]) -> Path:
    """The files written to `directory`, each checked against its sha256."""
    directory.mkdir()
    for path, (data, sha256) in files.items():
        assert hashlib.sha256(data).hexdigest() == sha256
        (directory / path).write_bytes(data)
    return directory


async def fetch(stub: Stub, name: str, directory: Path) -> Path:
    return await asyncio.to_thread(write, directory, await download(stub, name))


async def test_an_adapter_is_merged_then_quantized_and_the_export_agrees_with_the_merge(
    stub: Stub, lora: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    adapter = await upload(stub, lora)
    q8 = await stub.QuantizeModelVersion(
        pb.QuantizeModelVersionRequest(name=adapter.name, format=Q8_0)
    )

    # Lineage: adapter (v1) -> merged (v2) -> quantized (v3); the training lineage carried on.
    merged = await stub.GetAdapterVersion(pb.GetAdapterVersionRequest(name=q8.quantized_from))
    assert merged.kind == adapter_pb2.AdapterVersion.KIND_FULL_MODEL
    assert merged.merged_from == adapter.name == "adapters/orders/versions/1"
    assert q8.name == "adapters/orders/versions/3"
    assert q8.kind == adapter_pb2.AdapterVersion.KIND_QUANTIZED_MODEL and q8.format == Q8_0
    assert q8.lineage.base_model == "chat" and list(q8.lineage.datasets) == ["datasets/orders"]
    assert [f.path for f in q8.files] == ["model-q8_0.gguf"]
    assert q8.size_bytes == q8.files[0].size_bytes > 0
    check = q8.export_check
    assert check.result == PASSED and check.min_top1_agreement == pytest.approx(0.95)
    assert check.top1_agreement >= 0.95 and check.positions > 100 and check.kl_divergence < 0.05
    assert all(not c.compatible and "GGUF" in c.reasons[0] for c in q8.compatibility)

    # The downloaded file is the stored one, and transformers reads it as the merged model.
    exported = await fetch(stub, q8.name, tmp_path / "q8")
    source = await fetch(stub, merged.name, tmp_path / "merged")
    gguf = AutoModelForCausalLM.from_pretrained(exported, gguf_file="model-q8_0.gguf")
    full = AutoModelForCausalLM.from_pretrained(source)
    probe = torch.tensor([[1, 17, 42, 99, 256, 3, 77, 120]])
    with torch.no_grad():
        assert torch.equal(gguf(probe).logits.argmax(-1), full(probe).logits.argmax(-1))

    # A second format reuses the merge; F16 agrees at least as well as Q8_0.
    f16 = await stub.QuantizeModelVersion(
        pb.QuantizeModelVersionRequest(name=adapter.name, format=F16)
    )
    assert f16.quantized_from == merged.name and f16.version == 4
    assert f16.export_check.kl_divergence <= check.kl_divergence
    # A full model is quantized as it is.
    again = await stub.QuantizeModelVersion(
        pb.QuantizeModelVersionRequest(name=merged.name, format=Q8_0)
    )
    assert again.quantized_from == merged.name
    assert again.files[0].sha256 == q8.files[0].sha256  # the export is deterministic


async def test_bad_requests_are_refused_naming_the_field_or_reason(stub: Stub, lora: Path) -> None:
    adapter = await upload(stub, lora)

    async def refused(code: grpc.StatusCode, **request: Any) -> str:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.QuantizeModelVersion(pb.QuantizeModelVersionRequest(**request))
        assert raised.value.code() == code, raised.value.details()
        return str(raised.value.details())

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert "format" in await refused(invalid, name=adapter.name)
    assert "format" in await refused(invalid, name=adapter.name, format=99)  # a newer client's
    details = await refused(invalid, name=adapter.name, format=Q8_0, min_top1_agreement=1.5)
    assert "min_top1_agreement" in details
    await refused(grpc.StatusCode.NOT_FOUND, name="adapters/orders/versions/9", format=Q8_0)
    await refused(invalid, name="not a name", format=Q8_0)
    q8 = await stub.QuantizeModelVersion(
        pb.QuantizeModelVersionRequest(name=adapter.name, format=Q8_0)
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.QuantizeModelVersion(pb.QuantizeModelVersionRequest(name=q8.name, format=Q4_0))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(raised.value)
    assert info is not None and info.reason == "ALREADY_QUANTIZED"
    # Merging is for adapters only.
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.MergeAdapterVersion(pb.MergeAdapterVersionRequest(name=q8.name))
    assert "quantized model" in str(raised.value.details())


async def test_a_retry_with_the_same_request_id_stores_one_export(stub: Stub, lora: Path) -> None:
    adapter = await upload(stub, lora)
    request = pb.QuantizeModelVersionRequest(
        name=adapter.name, format=Q8_0, request_id="6f1c2a4e-8a0f-4c3e-9a53-2d2f1e0b7c11"
    )
    first, second = await asyncio.gather(
        stub.QuantizeModelVersion(request), stub.QuantizeModelVersion(request)
    )
    assert first.name == second.name
    versions = await stub.ListAdapterVersions(
        pb.ListAdapterVersionsRequest(parent="adapters/orders")
    )
    kinds = [v.kind for v in versions.adapter_versions]
    assert kinds.count(adapter_pb2.AdapterVersion.KIND_QUANTIZED_MODEL) == 1
    assert kinds.count(adapter_pb2.AdapterVersion.KIND_FULL_MODEL) == 1  # merged once


async def test_concurrent_exports_of_one_adapter_merge_it_once(stub: Stub, lora: Path) -> None:
    adapter = await upload(stub, lora)
    q8, f16 = await asyncio.gather(
        stub.QuantizeModelVersion(pb.QuantizeModelVersionRequest(name=adapter.name, format=Q8_0)),
        stub.QuantizeModelVersion(pb.QuantizeModelVersionRequest(name=adapter.name, format=F16)),
    )
    assert q8.quantized_from == f16.quantized_from
    versions = await stub.ListAdapterVersions(
        pb.ListAdapterVersionsRequest(parent="adapters/orders")
    )
    kinds = [v.kind for v in versions.adapter_versions]
    assert kinds.count(adapter_pb2.AdapterVersion.KIND_FULL_MODEL) == 1


@pytest.fixture
def registry_db(tmp_path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path / 'registry.db'}")
    db.migrate()
    yield db
    db.close()


def manager_with(
    db: Database, tmp_path: Path, gguf_source: Path, smoke_test: bool = True, **hooks: Any
) -> Any:
    """A registry whose export hooks are replaced (a broken writer, a full disk)."""
    # The chat model as "tiny-llama".
    manager = registry_for(db, tmp_path, gguf_source, smoke_test=smoke_test)
    manager.versions.hooks = Hooks(
        smoke_test=peft_ops.smoke_test,
        merge=peft_ops.merge,
        quantize=hooks.get("quantize", exports.write),
        check_export=exports.check,
    )
    manager.create_adapter("orders", "tiny-llama", "", {})
    return manager


def kinds(manager: Any) -> list[str]:
    return sorted(v.kind for v in manager.list_versions("adapters/orders", "", 100, "").items)


def register(manager: Any, lora: Path) -> str:
    staged = {path.name: path for path in sorted(lora.iterdir())}
    row = manager.versions.register_files(
        "orders", staged, None, "", {}, scope=("UploadAdapterVersion", "", "")
    )
    return f"adapters/orders/versions/{row.version}"


def test_an_export_with_a_wrong_q_k_layout_is_refused_by_the_check(
    registry_db: Database, tmp_path: Path, gguf_source: Path, lora: Path
) -> None:
    def broken(model_dir: Path, output: Path, export_format: str) -> None:
        output.mkdir()
        gguf_export.export(model_dir, output / "model-q8_0.gguf", "q8_0", permute_qk=False)

    manager = manager_with(registry_db, tmp_path, gguf_source, quantize=broken)
    name = register(manager, lora)
    with pytest.raises(FailedPrecondition) as raised:
        manager.versions.quantize(name, "EXPORT_FORMAT_GGUF_Q8_0")
    assert raised.value.reason == "EXPORT_CHECK_FAILED"
    assert "under the tolerance of 95.0%" in str(raised.value)
    assert float(raised.value.metadata["top1_agreement"]) < 0.8
    # Nothing but the merge was stored.
    assert kinds(manager) == ["adapter", "full_model"]
    # Asked to keep it, it is stored marked as failed.
    kept = manager.versions.quantize(name, "EXPORT_FORMAT_GGUF_Q8_0", keep_failed=True)
    assert kept.export["check"]["result"] == "RESULT_FAILED"
    assert kept.export["check"]["top1_agreement"] < 0.8


def test_a_full_disk_while_exporting_stores_nothing(
    registry_db: Database, tmp_path: Path, gguf_source: Path, lora: Path
) -> None:
    def full(model_dir: Path, output: Path, export_format: str) -> None:
        output.mkdir()
        (output / "model-q8_0.gguf").write_bytes(b"GGUF" + b"\0" * 64)
        raise OSError(errno.ENOSPC, "No space left on device")

    manager = manager_with(registry_db, tmp_path, gguf_source, quantize=full)
    name = register(manager, lora)
    with pytest.raises(OSError, match="No space"):  # RESOURCE_EXHAUSTED over gRPC
        manager.versions.quantize(name, "EXPORT_FORMAT_GGUF_Q8_0")
    assert kinds(manager) == ["adapter", "full_model"]
    assert not list((tmp_path / "work").iterdir())  # no export left behind


def test_a_model_outside_the_llama_family_is_refused_with_the_reason(
    registry_db: Database, tmp_path: Path, gguf_source: Path, lora: Path
) -> None:
    def not_llama(model_dir: Path, output: Path, export_format: str) -> None:
        raise gguf_export.ExportError("['GPT2LMHeadModel']: only the Llama family is exported")

    manager = manager_with(registry_db, tmp_path, gguf_source, quantize=not_llama)
    name = register(manager, lora)
    with pytest.raises(FailedPrecondition) as raised:
        manager.versions.quantize(name, "EXPORT_FORMAT_GGUF_F16")
    assert raised.value.reason == "EXPORT_NOT_SUPPORTED" and "GPT2" in str(raised.value)


def test_nothing_is_merged_into_a_quantized_base_model(
    registry_db: Database, tmp_path: Path, gguf_source: Path, lora: Path
) -> None:
    """A QLoRA adapter is merged into its full-precision base; a server whose base model is a
    4-bit checkpoint refuses to merge (and so to export) rather than round the adapter away."""
    import json
    import shutil

    quantized = shutil.copytree(gguf_source, tmp_path / "nf4-base")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
    }
    (quantized / "config.json").write_text(json.dumps(config))
    manager = manager_with(registry_db, tmp_path, quantized, smoke_test=False)
    name = register(manager, lora)
    with pytest.raises(FailedPrecondition) as merging:
        manager.versions.merge(name, "")
    with pytest.raises(FailedPrecondition) as exporting:
        manager.versions.quantize(name, "EXPORT_FORMAT_GGUF_Q8_0")
    for raised in (merging, exporting):
        assert raised.value.reason == "BASE_MODEL_QUANTIZED"
        assert "bitsandbytes" in str(raised.value)
    assert kinds(manager) == ["adapter"]


@pytest.mark.timeout(600)
def test_a_qlora_adapter_merged_into_the_full_precision_base_keeps_its_task_metric(
    registry_db: Database, tmp_path: Path, chat_model: Path, make_spec: MakeSpec
) -> None:
    """QLoRA trains against the base's NF4 weights; the registry merges the adapter into the
    full-precision base. The merge answers the held-out prompts as well as the adapter on the
    4-bit base it was trained on (PEFT with bitsandbytes, as the trainer loads it)."""
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunefleet.trainer.model import quantization_config
    from tunefleet.trainer.spec import parse_spec
    from tunefleet.trainer.train import Trainer

    spec = parse_spec(make_spec(method="qlora", hyperparameters={"epochs": 20}))
    trainer = Trainer(spec)
    try:
        result = trainer.run()
    finally:
        trainer.reporter.close()
    adapter = Path(result["output_dir"])
    records = [json.loads(line) for line in Path(spec.train_data.uri).read_text().splitlines()]
    held_out = [r["messages"] for r in records if r["split"] == "validation"]
    prompts, references = [m[:-1] for m in held_out], [m[-1]["content"] for m in held_out]

    manager = manager_with(registry_db, tmp_path, chat_model)
    merged = manager.versions.merge(register(manager, adapter), "float32")
    merged_dir = tmp_path / "merged"
    merged_dir.mkdir()
    for file in merged.files["files"]:
        data = b"".join(manager.file_chunks(merged, file["path"]))
        (merged_dir / file["path"]).write_bytes(data)

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    nf4 = AutoModelForCausalLM.from_pretrained(
        chat_model, quantization_config=quantization_config(spec), dtype=torch.float32
    )
    as_trained = greedy_answers(PeftModel.from_pretrained(nf4, adapter), tokenizer, prompts, 24)
    full = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    as_merged = greedy_answers(full, tokenizer, prompts, 24)
    trained, kept = exact_match(as_trained, references), exact_match(as_merged, references)
    print(f"QLoRA on NF4 {trained:.1%}, merged into full precision {kept:.1%}")
    assert trained >= 0.9, as_trained[:4]
    assert kept >= trained - 0.02, as_merged[:4]


@pytest.mark.parametrize(
    ("export_format", "layer"),
    [
        (adapter_pb2.EXPORT_FORMAT_BNB_NF4, "Linear4bit"),
        (adapter_pb2.EXPORT_FORMAT_BNB_INT8, "Linear8bitLt"),
    ],
)
async def test_a_bitsandbytes_export_is_checked_and_served_by_the_peft_engine_as_it_is(
    stub: Stub,
    lora: Path,
    tmp_path: Path,
    export_format: adapter_pb2.ExportFormat.ValueType,
    layer: str,
) -> None:
    """A bitsandbytes checkpoint with the model's tokenizer and chat template beside it: the PEFT
    engine serves it as a base model, answering as transformers does with the same files."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunefleet.inference.engine import GenerationRequest, Sampling
    from tunefleet.inference.peft_engine import PeftEngine

    adapter = await upload(stub, lora)
    exported = await stub.QuantizeModelVersion(
        pb.QuantizeModelVersionRequest(
            name=adapter.name, format=export_format, keep_failed_export=True
        )
    )
    assert exported.kind == adapter_pb2.AdapterVersion.KIND_QUANTIZED_MODEL
    paths = {f.path for f in exported.files}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= paths
    check = exported.export_check
    print(adapter_pb2.ExportFormat.Name(export_format), f"top-1 {check.top1_agreement:.1%}")
    assert check.positions > 100 and check.top1_agreement > 0.5
    served = {c.engine: c.compatible for c in exported.compatibility}
    assert served == {common_pb2.SERVING_ENGINE_PEFT: True, common_pb2.SERVING_ENGINE_VLLM: False}

    directory = await fetch(stub, exported.name, tmp_path / "export")
    config = json.loads((directory / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert any(type(m).__name__ == layer for m in model.modules())
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Which colour goes with the cat?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    engine = PeftEngine(directory)
    await engine.start()
    try:
        request = GenerationRequest(ids, None, Sampling(max_tokens=8, temperature=0.0))
        outputs = [output async for output in engine.generate(request)]
    finally:
        await engine.close()
    found = [t for output in outputs for t in output.token_ids]
    assert found == expected[0, len(ids) : len(ids) + len(found)].tolist() and found
