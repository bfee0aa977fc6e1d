"""AdapterService through a real gRPC server and client."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from tests.adapters.conftest import MakeAdapter
from tests.conftest import StartServer
from tests.helpers import error_info
from tunefleet.app.services import registration
from tunefleet.runtime.context import ServiceContext
from tunefleet.v1 import adapter_pb2, adapter_service_pb2, adapter_service_pb2_grpc, common_pb2

if TYPE_CHECKING:
    from tunefleet.v1.adapter_service_pb2_grpc import AdapterServiceAsyncStub as Stub

pb = adapter_service_pb2


@pytest.fixture
async def stub(start_server: StartServer, adapter_context: ServiceContext) -> AsyncIterator[Stub]:
    server = await start_server([registration("adapters", adapter_context)])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = adapter_service_pb2_grpc.AdapterServiceStub(channel)
        await stub.CreateAdapter(
            pb.CreateAdapterRequest(
                adapter_id="support", adapter=adapter_pb2.Adapter(base_model="tiny-llama")
            )
        )
        yield stub


def upload_requests(
    directory: Path, lineage: adapter_pb2.Lineage | None = None, chunk: int = 4096
) -> AsyncIterator[pb.UploadAdapterVersionRequest]:
    files = [(path.name, path.read_bytes()) for path in sorted(directory.iterdir())]

    async def requests() -> AsyncIterator[pb.UploadAdapterVersionRequest]:
        header = pb.UploadAdapterVersionRequest.Header(parent="adapters/support", lineage=lineage)
        yield pb.UploadAdapterVersionRequest(header=header)
        for name, content in files:
            sha256 = hashlib.sha256(content).hexdigest()
            yield pb.UploadAdapterVersionRequest(
                file=adapter_pb2.AdapterFile(path=name, size_bytes=len(content), sha256=sha256)
            )
            for start in range(0, len(content), chunk):
                yield pb.UploadAdapterVersionRequest(chunk=content[start : start + chunk])
        yield pb.UploadAdapterVersionRequest(finish_write=True)

    return requests()


async def download(stub: Stub, name: str) -> dict[str, tuple[bytes, str]]:
    files: dict[str, tuple[bytes, str]] = {}
    current = None
    async for message in stub.DownloadAdapterVersion(pb.DownloadAdapterVersionRequest(name=name)):
        if message.HasField("file"):
            current = message.file
            files[current.path] = (b"", current.sha256)
        else:
            assert current is not None
            data, sha = files[current.path]
            files[current.path] = (data + message.chunk, sha)
    return files


async def test_upload_download_round_trip(stub: Stub, make_adapter: MakeAdapter) -> None:
    directory = make_adapter(use_dora=True, target_modules=["q_proj", "v_proj"])
    lineage = adapter_pb2.Lineage(
        datasets=["datasets/ds-1"], base_model="tiny-llama", method=common_pb2.TRAINING_METHOD_DORA
    )
    version = await stub.UploadAdapterVersion(upload_requests(directory, lineage))
    assert version.name == "adapters/support/versions/1"
    assert version.kind == adapter_pb2.AdapterVersion.KIND_ADAPTER
    assert version.config.use_dora and version.config.rank == 8
    vllm, peft = version.compatibility
    assert vllm.engine == common_pb2.SERVING_ENGINE_VLLM and not vllm.compatible
    assert peft.compatible
    assert version.smoke_test.result == adapter_pb2.SmokeTest.RESULT_PASSED
    assert version.lineage.method == common_pb2.TRAINING_METHOD_DORA
    files = await download(stub, version.name)
    for path in sorted(directory.iterdir()):
        data, sha = files[path.name]
        assert data == path.read_bytes()
        assert sha == hashlib.sha256(data).hexdigest()


async def test_refusal_names_the_file(
    stub: Stub, make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    directory = tmp_path / "with-pickle"
    directory.mkdir()
    for path in make_adapter().iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    (directory / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.UploadAdapterVersion(upload_requests(directory))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith("files['adapter_model.bin']: pickled weights")
    info = error_info(raised.value)
    assert info is not None and info.reason == "PICKLED_WEIGHTS"


async def test_register_from_blob_uris(
    stub: Stub, make_adapter: MakeAdapter, adapter_context: ServiceContext
) -> None:
    blobs = adapter_context.storage.blobs
    directory = make_adapter(target_modules=["q_proj"])
    files = [
        adapter_pb2.AdapterFile(path=p.name, uri=blobs.uri(blobs.put_file(p).sha256))
        for p in sorted(directory.iterdir())
    ]
    version = await stub.CreateAdapterVersion(
        pb.CreateAdapterVersionRequest(
            parent="adapters/support",
            files=files,
            lineage=adapter_pb2.Lineage(training_job="trainingJobs/j1"),
        )
    )
    assert version.version == 1 and version.lineage.training_job == "trainingJobs/j1"
    by_job = await stub.ListAdapterVersions(
        pb.ListAdapterVersionsRequest(
            parent="adapters/-", filter='lineage.training_job = "trainingJobs/j1"'
        )
    )
    assert [v.name for v in by_job.adapter_versions] == [version.name]


async def test_aliases_and_watchers(stub: Stub, make_adapter: MakeAdapter) -> None:
    for seed in (1, 2):
        await stub.UploadAdapterVersion(upload_requests(make_adapter(seed=seed)))
    seen: list[list[adapter_pb2.AdapterChange]] = [[], []]

    async def watch(index: int, after: int, count: int) -> None:
        async for change in stub.WatchAdapterChanges(
            pb.WatchAdapterChangesRequest(after_revision=after)
        ):
            seen[index].append(change)
            if len(seen[index]) == count:
                return

    watchers = [asyncio.ensure_future(watch(i, 0, 6)) for i in range(2)]
    await asyncio.sleep(0.3)
    alias = "adapters/support/aliases/prod"
    await stub.SetAdapterAlias(
        pb.SetAdapterAliasRequest(
            name=alias, version="adapters/support/versions/1", reason="launch"
        )
    )
    moved = await stub.SetAdapterAlias(
        pb.SetAdapterAliasRequest(
            name=alias,
            version="adapters/support/versions/2",
            reason="better",
            expected_version="adapters/support/versions/1",
        )
    )
    assert moved.version == "adapters/support/versions/2"
    await stub.DeleteAdapterAlias(pb.DeleteAdapterAliasRequest(name=alias, reason="rollback"))
    await asyncio.wait_for(asyncio.gather(*watchers), 10)
    types = [adapter_pb2.AdapterChange.Type.Name(c.type) for c in seen[0]]
    assert types == [
        "TYPE_ADAPTER_CREATED",
        "TYPE_VERSION_CREATED",
        "TYPE_VERSION_CREATED",
        "TYPE_ALIAS_MOVED",
        "TYPE_ALIAS_MOVED",
        "TYPE_ALIAS_DELETED",
    ]
    assert seen[0] == seen[1]
    assert [c.revision for c in seen[0]] == list(range(1, 7))
    # A watcher that reconnects from a revision gets exactly what came after it.
    seen.append([])
    resumed: list[adapter_pb2.AdapterChange] = []
    async for change in stub.WatchAdapterChanges(pb.WatchAdapterChangesRequest(after_revision=4)):
        resumed.append(change)
        if len(resumed) == 2:
            break
    assert resumed == seen[0][4:]
    moves = await stub.ListAliasMoves(pb.ListAliasMovesRequest(parent="adapters/support"))
    assert [(m.from_version, m.to_version, m.reason) for m in moves.alias_moves] == [
        ("adapters/support/versions/2", "", "rollback"),
        ("adapters/support/versions/1", "adapters/support/versions/2", "better"),
        ("", "adapters/support/versions/1", "launch"),
    ]


async def test_alias_resolution_and_compare_and_set(stub: Stub, make_adapter: MakeAdapter) -> None:
    await stub.UploadAdapterVersion(upload_requests(make_adapter(seed=1)))
    await stub.SetAdapterAlias(
        pb.SetAdapterAliasRequest(
            name="adapters/support/aliases/prod", version="adapters/support/versions/1"
        )
    )
    via_alias = await stub.GetAdapterVersion(
        pb.GetAdapterVersionRequest(name="adapters/support@prod")
    )
    assert via_alias.name == "adapters/support/versions/1"
    assert list(via_alias.aliases) == ["adapters/support@prod"]
    adapter = await stub.GetAdapter(pb.GetAdapterRequest(name="adapters/support"))
    assert dict(adapter.aliases) == {"prod": 1}
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.SetAdapterAlias(
            pb.SetAdapterAliasRequest(
                name="adapters/support/aliases/prod",
                version="adapters/support/versions/1",
                expected_version="",
            )
        )
    assert raised.value.code() == grpc.StatusCode.ABORTED
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.DeleteAdapter(pb.DeleteAdapterRequest(name="adapters/support"))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_corrupted_blob_fails_the_download(
    stub: Stub, make_adapter: MakeAdapter, adapter_context: ServiceContext
) -> None:
    version = await stub.UploadAdapterVersion(upload_requests(make_adapter()))
    weights = next(f for f in version.files if f.path == "adapter_model.safetensors")
    path = adapter_context.settings.blob_dir / "sha256" / weights.sha256[:2] / weights.sha256
    path.write_bytes(b"\x00" + path.read_bytes()[1:])
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await download(stub, version.name)
    assert raised.value.code() == grpc.StatusCode.DATA_LOSS


async def test_merge_equals_the_unmerged_adapter(
    stub: Stub, make_adapter: MakeAdapter, base_model: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    directory = make_adapter(use_dora=True, target_modules=["q_proj", "v_proj"])
    version = await stub.UploadAdapterVersion(upload_requests(directory))
    merged = await stub.MergeAdapterVersion(
        pb.MergeAdapterVersionRequest(name=version.name, dtype="float32")
    )
    assert merged.kind == adapter_pb2.AdapterVersion.KIND_FULL_MODEL
    assert merged.merged_from == version.name and merged.version == 2
    out = tmp_path / "merged"
    out.mkdir()
    for path, (data, _) in (await download(stub, merged.name)).items():
        (out / path).write_bytes(data)
    probe = torch.tensor([[1, 17, 42, 99, 256, 3]])
    unmerged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_model), directory
    )
    with torch.no_grad():
        expected = unmerged(probe).logits
        actual = AutoModelForCausalLM.from_pretrained(out)(probe).logits
    assert torch.allclose(expected, actual, atol=1e-4)


async def test_concurrent_merges_and_smoke_tests_each_load_the_right_model(
    stub: Stub, make_adapter: MakeAdapter, base_model: Path, tmp_path: Path
) -> None:
    """transformers is not safe to load models from several threads at once (core/loading.py):
    merges in two precisions and uploads (each smoke-tested) at the same time each get their own
    model, equal to the unmerged adapter, and leave the process's default dtype alone."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    directory = make_adapter(target_modules=["q_proj", "v_proj"])
    version = await stub.UploadAdapterVersion(upload_requests(directory))
    dtypes = ["float32", "bfloat16", "float32", "bfloat16", "float32", "float32"]
    merges = [
        stub.MergeAdapterVersion(pb.MergeAdapterVersionRequest(name=version.name, dtype=dtype))
        for dtype in dtypes
    ]
    uploads = [stub.UploadAdapterVersion(upload_requests(make_adapter(seed=s))) for s in (2, 3)]
    results = await asyncio.gather(*merges, *uploads)
    assert all(r.smoke_test.result == adapter_pb2.SmokeTest.RESULT_PASSED for r in results[-2:])
    assert torch.get_default_dtype() == torch.float32

    probe = torch.tensor([[1, 17, 42, 99, 256, 3]])
    unmerged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_model), directory
    )
    with torch.no_grad():
        expected = unmerged(probe).logits
    for dtype, merged in zip(dtypes, results, strict=False):
        out = tmp_path / merged.name.replace("/", "-")
        out.mkdir()
        for path, (data, _) in (await download(stub, merged.name)).items():
            (out / path).write_bytes(data)
        with torch.no_grad():
            found = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(probe).logits
        tolerance = 1e-4 if dtype == "float32" else 0.05  # bfloat16 keeps 8 bits of mantissa
        assert torch.allclose(expected, found, atol=tolerance), (
            dtype,
            (expected - found).abs().max(),
        )


async def test_registry_metrics(
    stub: Stub, make_adapter: MakeAdapter, adapter_context: ServiceContext
) -> None:
    version = await stub.UploadAdapterVersion(upload_requests(make_adapter()))
    await stub.SetAdapterAlias(
        pb.SetAdapterAliasRequest(name="adapters/support/aliases/prod", version=version.name)
    )
    registry = adapter_context.registry
    value: Any = registry.get_sample_value
    assert value("tunefleet_adapter_versions_registered_total", {"kind": "adapter"}) == 1
    assert value("tunefleet_adapter_stored_bytes_total") == version.size_bytes
    assert value("tunefleet_adapter_alias_moves_total") == 1


async def test_cut_off_upload_stores_nothing(
    stub: Stub, make_adapter: MakeAdapter, adapter_context: ServiceContext
) -> None:
    requests = upload_requests(make_adapter(), chunk=1024)
    sent = asyncio.Event()

    async def cut_off() -> AsyncIterator[pb.UploadAdapterVersionRequest]:
        count = 0
        async for request in requests:
            if request.finish_write:
                break
            yield request
            count += 1
            if count == 10:
                sent.set()
                await asyncio.sleep(3600)

    call = stub.UploadAdapterVersion(cut_off())
    await sent.wait()
    await asyncio.sleep(0.2)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    work = adapter_context.settings.work_dir / "adapters"
    for _ in range(100):
        if not work.exists() or not any(work.iterdir()):
            break
        await asyncio.sleep(0.05)
    assert not work.exists() or list(work.iterdir()) == []
    assert list(adapter_context.storage.blobs.list()) == []
    listed = await stub.ListAdapterVersions(
        pb.ListAdapterVersionsRequest(parent="adapters/support")
    )
    assert list(listed.adapter_versions) == []
