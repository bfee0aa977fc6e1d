"""DatasetService through a real gRPC server and client."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from tests.conftest import StartServer
from tests.datasets.records import chunks, jsonl, perturb, records
from tests.helpers import error_info, field_violations
from tunefleet.app.services import registration
from tunefleet.runtime.context import ServiceContext
from tunefleet.v1 import dataset_pb2, dataset_service_pb2, dataset_service_pb2_grpc

if TYPE_CHECKING:
    from tunefleet.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Stub


@pytest.fixture
async def stub(start_server: StartServer, service_context: ServiceContext) -> AsyncIterator[Stub]:
    server = await start_server([registration("datasets", service_context)])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield dataset_service_pb2_grpc.DatasetServiceStub(channel)


def header(**fields: Any) -> dataset_service_pb2.UploadDatasetRequest:
    options = fields.pop("options", {})
    return dataset_service_pb2.UploadDatasetRequest(
        header=dataset_service_pb2.UploadDatasetHeader(
            options=dataset_pb2.DatasetOptions(**options), **fields
        )
    )


async def stream(
    first: dataset_service_pb2.UploadDatasetRequest, data: bytes, size: int = 8192
) -> AsyncIterator[dataset_service_pb2.UploadDatasetRequest]:
    yield first
    for chunk in chunks(data, size):
        yield dataset_service_pb2.UploadDatasetRequest(chunk=chunk)
    yield dataset_service_pb2.UploadDatasetRequest(finish_write=True)


async def upload(stub: Stub, data: bytes, **fields: Any) -> dataset_pb2.Dataset:
    return await stub.UploadDataset(stream(header(**fields), data))


async def test_upload_then_get_list_preview_delete(
    stub: Stub, service_context: ServiceContext
) -> None:
    data = jsonl(records("alpaca", 300))
    dataset = await upload(stub, data, display_name="support-v1", labels={"team": "ml"})
    assert dataset.name.startswith("datasets/ds-")
    assert dataset.state == dataset_pb2.Dataset.STATE_READY
    assert dataset.source_format == dataset_pb2.DATASET_FORMAT_ALPACA
    assert (dataset.record_count, dataset.train_record_count, dataset.validation_record_count) == (
        300,
        270,
        30,
    )
    assert dataset.source_size_bytes == len(data)
    assert dataset.validation_report.total_records == 300
    assert dataset.options.near_duplicate_threshold == pytest.approx(0.8)
    assert dataset.options.pii_policy == dataset_pb2.PII_POLICY_REDACT

    got = await stub.GetDataset(dataset_service_pb2.GetDatasetRequest(name=dataset.name))
    assert got == dataset

    await upload(stub, jsonl(records("sharegpt", 20, seed=1)), display_name="chat-v1")
    listed = await stub.ListDatasets(dataset_service_pb2.ListDatasetsRequest(page_size=1))
    assert len(listed.datasets) == 1 and listed.next_page_token
    second = await stub.ListDatasets(
        dataset_service_pb2.ListDatasetsRequest(page_size=1, page_token=listed.next_page_token)
    )
    assert {listed.datasets[0].display_name, second.datasets[0].display_name} == {
        "support-v1",
        "chat-v1",
    }
    filtered = await stub.ListDatasets(
        dataset_service_pb2.ListDatasetsRequest(filter='display_name = "support*"')
    )
    assert [d.name for d in filtered.datasets] == [dataset.name]
    by_label = await stub.ListDatasets(
        dataset_service_pb2.ListDatasetsRequest(filter='labels.team = "ml"')
    )
    assert [d.name for d in by_label.datasets] == [dataset.name]

    preview = [
        record
        async for record in stub.PreviewDatasetRecords(
            dataset_service_pb2.PreviewDatasetRecordsRequest(
                name=dataset.name, split=dataset_pb2.DATASET_SPLIT_VALIDATION, offset=5, limit=3
            )
        )
    ]
    assert len(preview) == 3
    assert all(r.split == dataset_pb2.DATASET_SPLIT_VALIDATION for r in preview)
    assert preview[0].messages[-1].role == "assistant"

    await stub.DeleteDataset(dataset_service_pb2.DeleteDatasetRequest(name=dataset.name))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetDataset(dataset_service_pb2.GetDatasetRequest(name=dataset.name))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert not service_context.storage.blobs.exists(dataset.content_sha256)


async def test_same_upload_and_seed_give_the_same_dataset(stub: Stub) -> None:
    data = jsonl(records("openai_chat", 200, seed=4))
    first = await upload(stub, data, options={"split_seed": 1})
    again = await upload(stub, data, options={"split_seed": 1})
    other_seed = await upload(stub, data, options={"split_seed": 2})
    assert first.name == again.name and first.content_sha256 == again.content_sha256
    assert other_seed.name != first.name


def lease_request(
    parent: str, lease_id: str = "job-j1", holder: str = "trainingJobs/j1"
) -> dataset_service_pb2.CreateDatasetLeaseRequest:
    return dataset_service_pb2.CreateDatasetLeaseRequest(
        parent=parent, lease_id=lease_id, lease=dataset_pb2.DatasetLease(holder=holder)
    )


async def test_a_leased_dataset_cannot_be_deleted_until_its_leases_go(stub: Stub) -> None:
    dataset = await upload(stub, jsonl(records("alpaca", 20)))
    lease = await stub.CreateDatasetLease(lease_request(dataset.name))
    assert lease.name == f"{dataset.name}/leases/job-j1" and lease.holder == "trainingJobs/j1"
    # A retry gets the same lease; another holder may not take its id.
    again = await stub.CreateDatasetLease(lease_request(dataset.name))
    assert again == lease
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.CreateDatasetLease(lease_request(dataset.name, holder="trainingJobs/other"))
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    await stub.CreateDatasetLease(lease_request(dataset.name, "job-j2", "trainingJobs/j2"))
    listed = await stub.ListDatasetLeases(
        dataset_service_pb2.ListDatasetLeasesRequest(parent=dataset.name, page_size=1)
    )
    rest = await stub.ListDatasetLeases(
        dataset_service_pb2.ListDatasetLeasesRequest(
            parent=dataset.name, page_token=listed.next_page_token
        )
    )
    assert [x.holder for x in [*listed.leases, *rest.leases]] == [
        "trainingJobs/j1",
        "trainingJobs/j2",
    ]

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.DeleteDataset(dataset_service_pb2.DeleteDatasetRequest(name=dataset.name))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(raised.value)
    assert info is not None and info.reason == "DATASET_IN_USE"
    assert "trainingJobs/j1" in (raised.value.details() or "")

    for name in (lease.name, f"{dataset.name}/leases/job-j2"):
        await stub.DeleteDatasetLease(dataset_service_pb2.DeleteDatasetLeaseRequest(name=name))
    # Gone: an error unless allow_missing (a release retried after its answer was lost).
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.DeleteDatasetLease(
            dataset_service_pb2.DeleteDatasetLeaseRequest(name=lease.name)
        )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    await stub.DeleteDatasetLease(
        dataset_service_pb2.DeleteDatasetLeaseRequest(name=lease.name, allow_missing=True)
    )
    await stub.DeleteDataset(dataset_service_pb2.DeleteDatasetRequest(name=dataset.name))
    await stub.DeleteDatasetLease(
        dataset_service_pb2.DeleteDatasetLeaseRequest(name=lease.name, allow_missing=True)
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.CreateDatasetLease(lease_request(dataset.name))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"parent": "datasets"}, "parent"),
        ({"lease_id": "Job_1"}, "lease_id"),
        ({"lease_id": "x" * 64}, "lease_id"),
        ({"holder": ""}, "lease.holder"),
        ({"holder": "h" * 257}, "lease.holder"),
    ],
)
async def test_bad_leases_are_refused_naming_the_field(
    stub: Stub, request_fields: dict[str, str], field: str
) -> None:
    dataset = await upload(stub, jsonl(records("alpaca", 20)))
    arguments = {"parent": dataset.name, **request_fields}
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.CreateDatasetLease(lease_request(**arguments))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(raised.value)] == [field]
    bad_name = dataset_service_pb2.DeleteDatasetLeaseRequest(name=f"{dataset.name}/leases")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.DeleteDatasetLease(bad_name)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_lease_racing_a_delete_never_leaves_a_lease_on_a_deleted_dataset(
    stub: Stub,
) -> None:
    """Either the delete wins (the lease is NOT_FOUND) or the lease does (the delete is
    refused): never both."""
    outcomes = set()
    for round_ in range(12):
        dataset = await upload(stub, jsonl(records("alpaca", 20, seed=round_)))
        lease, delete = await asyncio.gather(
            stub.CreateDatasetLease(lease_request(dataset.name)),
            stub.DeleteDataset(dataset_service_pb2.DeleteDatasetRequest(name=dataset.name)),
            return_exceptions=True,
        )
        if isinstance(lease, grpc.aio.AioRpcError):
            assert lease.code() == grpc.StatusCode.NOT_FOUND and not isinstance(delete, Exception)
            outcomes.add("deleted")
        else:
            assert isinstance(delete, grpc.aio.AioRpcError)
            assert delete.code() == grpc.StatusCode.FAILED_PRECONDITION
            await stub.GetDataset(dataset_service_pb2.GetDatasetRequest(name=dataset.name))
            outcomes.add("leased")
    assert outcomes  # which side wins is up to the scheduler; the invariant holds either way


async def test_rejected_upload_names_the_lines_and_stores_nothing(
    stub: Stub, service_context: ServiceContext
) -> None:
    lines = jsonl(records("alpaca", 60)).splitlines()
    lines[41] = b'{"instruction": "q", "output": 7}'
    data = b"\n".join(lines)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await upload(
            stub, data, options={"invalid_record_policy": dataset_pb2.INVALID_RECORD_POLICY_REJECT}
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(raised.value)
    assert info is not None and info.reason == "DATASET_REJECTED"
    assert field_violations(raised.value) == [
        ("line 42", "RECORD_ERROR_CODE_NON_STRING_CONTENT: output must be a string, not int")
    ]
    assert list(service_context.storage.blobs.list()) == []
    listed = await stub.ListDatasets(dataset_service_pb2.ListDatasetsRequest())
    assert list(listed.datasets) == []


async def test_records_keep_their_cluster_and_bad_clusters_are_refused(stub: Stub) -> None:
    def chat(i: int, **extra: Any) -> dict[str, Any]:
        turns = [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
        return {"messages": turns, **extra}

    good = [chat(0, cluster="passage-1"), chat(1, cluster="passage-1"), chat(2, cluster=7), chat(3)]
    dataset = await upload(stub, jsonl(good), options={"remove_near_duplicates": False})
    assert not dataset.validation_report.ignored_keys  # cluster is read, not ignored
    found = [
        record.cluster
        async for record in stub.PreviewDatasetRecords(
            dataset_service_pb2.PreviewDatasetRecordsRequest(
                name=dataset.name, split=dataset_pb2.DATASET_SPLIT_TRAIN, limit=10
            )
        )
    ]
    assert sorted(found) == sorted(["passage-1", "passage-1", "7", ""])
    for bad, why in (
        (["a"], "cluster must be a string or an integer, not list"),
        (True, "cluster must be a string or an integer, not bool"),
        ("", "cluster must be 1 to 128 printable characters"),
        ("x" * 129, "cluster must be 1 to 128 printable characters"),
        ("a\x00b", "cluster must be 1 to 128 printable characters"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await upload(
                stub,
                jsonl([chat(0), chat(1, cluster=bad)]),
                options={"invalid_record_policy": dataset_pb2.INVALID_RECORD_POLICY_REJECT},
            )
        assert field_violations(raised.value) == [
            ("line 2", f"RECORD_ERROR_CODE_INCONSISTENT_FIELDS: {why}")
        ], bad


async def test_interrupted_upload_leaves_nothing_behind(
    stub: Stub, service_context: ServiceContext
) -> None:
    data = jsonl(records("alpaca", 3000))
    sent = asyncio.Event()

    async def cut_off() -> AsyncIterator[dataset_service_pb2.UploadDatasetRequest]:
        yield header(display_name="cut")
        for index, chunk in enumerate(chunks(data, 4096)):
            yield dataset_service_pb2.UploadDatasetRequest(chunk=chunk)
            if index == 20:
                sent.set()
                await asyncio.sleep(3600)  # the client stalls, then goes away

    call = stub.UploadDataset(cut_off())
    await sent.wait()
    await asyncio.sleep(0.2)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    work = service_context.settings.work_dir / "datasets"
    for _ in range(100):  # the server notices the cancellation and cleans up
        if not work.exists() or not any(work.iterdir()):
            break
        await asyncio.sleep(0.05)
    assert not work.exists() or list(work.iterdir()) == []
    assert list(service_context.storage.blobs.list()) == []
    listed = await stub.ListDatasets(dataset_service_pb2.ListDatasetsRequest())
    assert list(listed.datasets) == []


async def test_request_id_makes_retries_idempotent(stub: Stub) -> None:
    request_id = str(uuid.uuid4())
    data = jsonl(records("alpaca", 30))
    first = await upload(stub, data, request_id=request_id)
    # A retry is answered from the first result, even before its bytes are read again.
    retry = await stub.UploadDataset(stream(header(request_id=request_id), b"garbage"))
    assert retry.name == first.name
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await upload(stub, data, request_id=request_id, display_name="other")
    info = error_info(raised.value)
    assert info is not None and info.reason == "REQUEST_ID_REUSED"


async def test_validate_only_stores_and_counts_nothing(
    stub: Stub, service_context: ServiceContext
) -> None:
    dataset = await upload(stub, jsonl(records("alpaca", 30)), validate_only=True)
    assert dataset.name == "" and dataset.record_count == 30
    assert list(service_context.storage.blobs.list()) == []
    accepted = service_context.registry.get_sample_value("tunefleet_dataset_records_accepted_total")
    assert not accepted


async def test_a_parquet_file_is_refused_as_unsupported(stub: Stub, tmp_path: Path) -> None:
    import pandas as pd

    path = tmp_path / "train.parquet"
    pd.DataFrame(records("alpaca", 20)).to_parquet(path)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await upload(stub, path.read_bytes())
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(raised.value)
    assert info is not None and info.reason == "UNSUPPORTED_FILE_FORMAT"
    assert (raised.value.details() or "").startswith("file: looks like Parquet")


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"near_duplicate_threshold": 1.5}, "options.near_duplicate_threshold"),
        ({"validation_fraction": 0.9}, "options.validation_fraction"),
        ({"tokenizer_model": "no-such-model"}, "options.tokenizer_model"),
        ({"validation_dataset": "datasets/missing"}, "options.validation_dataset"),
    ],
)
async def test_bad_options_name_the_field(stub: Stub, options: dict[str, Any], field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await upload(stub, jsonl(records("alpaca", 5)), options=options)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith(f"{field}:")


async def test_a_stream_without_finish_write_stores_nothing(
    stub: Stub, service_context: ServiceContext
) -> None:
    async def unfinished() -> AsyncIterator[dataset_service_pb2.UploadDatasetRequest]:
        yield header()
        yield dataset_service_pb2.UploadDatasetRequest(chunk=jsonl(records("alpaca", 10)))

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.UploadDataset(unfinished())
    info = error_info(raised.value)
    assert info is not None and info.reason == "UPLOAD_INCOMPLETE"
    assert list(service_context.storage.blobs.list()) == []


async def test_first_message_must_be_the_header(stub: Stub) -> None:
    async def chunks_only() -> AsyncIterator[dataset_service_pb2.UploadDatasetRequest]:
        yield dataset_service_pb2.UploadDatasetRequest(chunk=b"{}")

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.UploadDataset(chunks_only())
    assert (raised.value.details() or "").startswith("header:")


async def test_explicit_validation_dataset(stub: Stub) -> None:
    held_out = await upload(stub, jsonl(records("alpaca", 20, seed=8)))
    dataset = await upload(
        stub,
        jsonl(records("alpaca", 100, seed=9)),
        options={"validation_dataset": held_out.name},
    )
    assert (dataset.train_record_count, dataset.validation_record_count) == (100, 0)
    assert dataset.options.validation_dataset == held_out.name


async def test_contamination_check(stub: Stub, tmp_path: Path) -> None:
    rng = random.Random(1)
    train_items = records("prompt_completion", 500, seed=21)
    evaluation_items = records("prompt_completion", 50, seed=22)
    evaluation_items[:5] = train_items[:5]  # leaked exactly
    evaluation_items[5:8] = [
        dict(item, completion=perturb(item["completion"], rng)) for item in train_items[5:8]
    ]  # leaked with an edit
    train = await upload(stub, jsonl(train_items), options={"validation_fraction": 0})
    evaluation = await upload(stub, jsonl(evaluation_items), options={"validation_fraction": 0})
    report = await stub.CheckContamination(
        dataset_service_pb2.CheckContaminationRequest(
            dataset=train.name, evaluation_dataset=evaluation.name
        )
    )
    assert (report.evaluation_records, report.exact_overlap, report.near_overlap) == (50, 5, 3)
    assert {(e.kept_line, e.removed_line) for e in report.examples} == {(i, i) for i in range(1, 9)}


async def test_held_out_prompts_are_refused(stub: Stub) -> None:
    """A record asking an evaluation item's question (in any case and spacing, with any answer)
    is rejected as HELD_OUT, naming the held-out dataset; the rest is kept, and CheckContamination
    then finds no exact overlap. A missing held-out dataset is refused naming its field."""
    evaluation_items = records("prompt_completion", 20, seed=31)
    evaluation = await upload(stub, jsonl(evaluation_items), options={"validation_fraction": 0})
    fresh = records("prompt_completion", 30, seed=32)
    leaked = [
        {"prompt": f"  {item['prompt'].upper()} ", "completion": "a corrected answer"}
        for item in evaluation_items[:4]
    ]
    as_chat = {
        "messages": [
            {"role": "user", "content": evaluation_items[4]["prompt"]},
            {"role": "assistant", "content": "another answer"},
        ]
    }
    options = {"validation_fraction": 0, "held_out_datasets": [evaluation.name]}
    train = await upload(stub, jsonl([*fresh[:10], *leaked, *fresh[10:]]), options=options)
    report = train.validation_report
    assert train.record_count == 30
    assert report.rejected_records == 4
    assert {e.line for e in report.errors} == {11, 12, 13, 14}
    assert {e.code for e in report.errors} == {dataset_pb2.RECORD_ERROR_CODE_HELD_OUT}
    assert evaluation.name in report.errors[0].message
    assert list(train.options.held_out_datasets) == [evaluation.name]
    chat = await upload(
        stub, jsonl([*records("openai_chat", 5, seed=33), as_chat]), options=options
    )
    assert [e.line for e in chat.validation_report.errors] == [6]
    contamination = await stub.CheckContamination(
        dataset_service_pb2.CheckContaminationRequest(
            dataset=train.name, evaluation_dataset=evaluation.name
        )
    )
    assert contamination.exact_overlap == 0
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await upload(stub, jsonl(fresh), options={"held_out_datasets": ["datasets/nope"]})
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "options.held_out_datasets[0]" in str(refused.value.details())


async def test_token_statistics_with_a_local_tokenizer(stub: Stub, tokenizer_dir: Path) -> None:
    dataset = await upload(
        stub,
        jsonl(records("sharegpt", 40)),
        options={"tokenizer_model": str(tokenizer_dir), "max_sequence_length": 100},
    )
    stats = dataset.token_statistics
    assert stats.tokenizer_model == str(tokenizer_dir)
    assert 0 < stats.trainable_tokens < stats.total_tokens
    assert stats.tokens_per_record.min <= stats.tokens_per_record.p50 <= stats.tokens_per_record.max
    assert stats.records_over_max_length == 40  # every conversation is longer than 100 tokens


async def test_ingestion_metrics(stub: Stub, service_context: ServiceContext) -> None:
    lines = jsonl(records("alpaca", 30)).splitlines()
    lines[3] = b"{broken"
    lines.append(lines[10])
    await upload(stub, b"\n".join(lines))
    registry = service_context.registry
    assert registry.get_sample_value("tunefleet_dataset_records_accepted_total") == 30
    assert (
        registry.get_sample_value(
            "tunefleet_dataset_records_rejected_total", {"code": "INVALID_JSON"}
        )
        == 1
    )
    assert (
        registry.get_sample_value("tunefleet_dataset_duplicates_removed_total", {"kind": "exact"})
        == 1
    )
    assert registry.get_sample_value("tunefleet_dataset_ingest_duration_seconds_count") == 1


async def test_a_rejection_of_many_bad_lines_reaches_the_client_whole(
    start_server: StartServer, service_context: ServiceContext
) -> None:
    """The most common first mistake, a file in another format: 10,000 bad lines. The status
    stays far under the 8 KiB grpc clients accept in trailers, so the SDK gets INVALID_ARGUMENT
    with its reason every time (not RESOURCE_EXHAUSTED for oversized metadata)."""
    from tunefleet.client import AsyncClient
    from tunefleet.client import InvalidArgument as SdkInvalidArgument

    server = await start_server([registration("datasets", service_context)])
    data = b"\n".join(
        json.dumps({"question": f"question {i} " + "x" * 80, "reply": f"answer {i}"}).encode()
        for i in range(10_000)
    )
    options = {"format": "DATASET_FORMAT_ALPACA"}
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        for _ in range(100):
            with pytest.raises(SdkInvalidArgument) as raised:
                await client.datasets.upload(data, options=options)
            assert raised.value.reason == "DATASET_REJECTED"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await upload(stub, data, options={"format": dataset_pb2.DATASET_FORMAT_ALPACA})
    trailers = refused.value.trailing_metadata() or ()
    assert sum(len(key) + len(value) for key, value in trailers) < 4096
    violations = field_violations(refused.value)
    assert violations[0][0] == "line 1"
    assert violations[-1] == (
        "records",
        f"and {10_000 - len(violations) + 1} more rejected records, not listed here",
    )
