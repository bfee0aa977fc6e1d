"""DatasetService over gRPC: converts between protobuf and the DatasetManager, nothing more."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import grpc
import orjson
from google.protobuf import empty_pb2, json_format

from tunefleet.core.errors import InvalidArgument
from tunefleet.core.names import dataset_id
from tunefleet.core.protos import timestamp
from tunefleet.datasets.formats import kind_of
from tunefleet.datasets.manager import DatasetManager, Upload, UploadHeader
from tunefleet.datasets.pipeline import IngestOptions
from tunefleet.datasets.store import DatasetLease, DatasetRow
from tunefleet.runtime.streams import UploadStream, UploadWorker
from tunefleet.v1 import common_pb2, dataset_pb2, dataset_service_pb2, dataset_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]
SPLITS = {
    dataset_pb2.DATASET_SPLIT_UNSPECIFIED: None,
    dataset_pb2.DATASET_SPLIT_TRAIN: "train",
    dataset_pb2.DATASET_SPLIT_VALIDATION: "validation",
}
MAX_DISPLAY_NAME = 128
MAX_HELD_OUT = 8


class DatasetServicer(dataset_service_pb2_grpc.DatasetServiceServicer):
    def __init__(self, manager: DatasetManager) -> None:
        self.manager = manager

    async def UploadDataset(
        self,
        request_iterator: AsyncIterator[dataset_service_pb2.UploadDatasetRequest],
        context: Context,
    ) -> dataset_pb2.Dataset:
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or not first.HasField("header"):
            raise InvalidArgument("header", "the first message of an upload must carry the header")
        worker = UploadWorker("dataset-upload")
        upload: Upload | None = None
        stream = UploadStream(requests, context)
        try:
            async with stream.refusing_early():
                upload = await worker.run(self.manager.start_upload, upload_header(first.header))
                if upload.existing is not None:  # a retry: answered without reading it again
                    await stream.drain()
                else:
                    async for request in stream:
                        if request.HasField("header"):
                            raise InvalidArgument(
                                "header", "only the first message may carry a header"
                            )
                        await worker.run(self.manager.feed, upload, request.chunk)
            row = await worker.run(self.manager.complete, upload)
        finally:
            await worker.close(partial(self.manager.abort, upload) if upload else None)
        return to_proto(row, stored=not upload.header.validate_only)

    async def GetDataset(
        self, request: dataset_service_pb2.GetDatasetRequest, context: Context
    ) -> dataset_pb2.Dataset:
        return to_proto(await asyncio.to_thread(self.manager.get, request.name))

    async def ListDatasets(
        self, request: dataset_service_pb2.ListDatasetsRequest, context: Context
    ) -> dataset_service_pb2.ListDatasetsResponse:
        page = await asyncio.to_thread(
            self.manager.list, request.filter, request.page_size, request.page_token
        )
        return dataset_service_pb2.ListDatasetsResponse(
            datasets=[to_proto(row) for row in page.items], next_page_token=page.next_page_token
        )

    async def DeleteDataset(
        self, request: dataset_service_pb2.DeleteDatasetRequest, context: Context
    ) -> empty_pb2.Empty:
        await asyncio.to_thread(self.manager.delete, request.name)
        return empty_pb2.Empty()

    async def CreateDatasetLease(
        self, request: dataset_service_pb2.CreateDatasetLeaseRequest, context: Context
    ) -> dataset_pb2.DatasetLease:
        lease = await asyncio.to_thread(
            self.manager.create_lease, request.parent, request.lease_id, request.lease.holder
        )
        return lease_proto(lease)

    async def DeleteDatasetLease(
        self, request: dataset_service_pb2.DeleteDatasetLeaseRequest, context: Context
    ) -> empty_pb2.Empty:
        await asyncio.to_thread(self.manager.delete_lease, request.name, request.allow_missing)
        return empty_pb2.Empty()

    async def ListDatasetLeases(
        self, request: dataset_service_pb2.ListDatasetLeasesRequest, context: Context
    ) -> dataset_service_pb2.ListDatasetLeasesResponse:
        page = await asyncio.to_thread(
            self.manager.leases, request.parent, request.page_size, request.page_token
        )
        return dataset_service_pb2.ListDatasetLeasesResponse(
            leases=[lease_proto(lease) for lease in page.items],
            next_page_token=page.next_page_token,
        )

    async def PreviewDatasetRecords(
        self, request: dataset_service_pb2.PreviewDatasetRecordsRequest, context: Context
    ) -> AsyncIterator[dataset_pb2.DatasetRecord]:
        records = self.manager.records(
            request.name, SPLITS.get(request.split), request.offset, request.limit or 100
        )
        while True:
            record = await asyncio.to_thread(next, records, None)
            if record is None:
                return
            yield dataset_pb2.DatasetRecord(
                index=record["index"],
                source_line=record["source_line"],
                split=(
                    dataset_pb2.DATASET_SPLIT_VALIDATION
                    if record["split"] == "validation"
                    else dataset_pb2.DATASET_SPLIT_TRAIN
                ),
                messages=[_message(m) for m in record["messages"]],
                redacted_pii=[dataset_pb2.PiiType.Value(t) for t in record["redacted_pii"]],
                chosen=[_message(m) for m in record.get("chosen", [])],
                rejected=[_message(m) for m in record.get("rejected", [])],
                completion=[_message(m) for m in record.get("completion", [])],
                desirable=record.get("desirable", False),
                tools=[_tool(tool) for tool in record.get("tools", [])],
                cluster=record.get("cluster", ""),
            )

    async def CheckContamination(
        self, request: dataset_service_pb2.CheckContaminationRequest, context: Context
    ) -> dataset_pb2.ContaminationReport:
        threshold = (
            request.near_duplicate_threshold
            if request.HasField("near_duplicate_threshold")
            else 0.8
        )
        report = await asyncio.to_thread(
            self.manager.contamination, request.dataset, request.evaluation_dataset, threshold
        )
        return json_format.ParseDict(report, dataset_pb2.ContaminationReport())


def upload_header(header: dataset_service_pb2.UploadDatasetHeader) -> UploadHeader:
    """Validate an upload header, naming the field of any bad value."""
    if len(header.display_name) > MAX_DISPLAY_NAME:
        raise InvalidArgument("display_name", f"is longer than {MAX_DISPLAY_NAME} characters")
    for key, value in header.labels.items():
        if not key or len(key) > 63 or len(value) > 63:
            raise InvalidArgument(
                f"labels[{key!r}]", "keys must be 1-63 and values 0-63 characters"
            )
    return UploadHeader(
        options=ingest_options(header.options),
        display_name=header.display_name,
        description=header.description,
        labels=dict(header.labels),
        request_id=header.request_id,
        validate_only=header.validate_only,
    )


def ingest_options(options: dataset_pb2.DatasetOptions) -> IngestOptions:
    defaults = IngestOptions()
    threshold = (
        options.near_duplicate_threshold
        if options.HasField("near_duplicate_threshold")
        else defaults.near_duplicate_threshold
    )
    if not 0 < threshold <= 1:
        raise InvalidArgument(
            "options.near_duplicate_threshold", f"must be in (0, 1], got {threshold}"
        )
    fraction = (
        options.validation_fraction
        if options.HasField("validation_fraction")
        else defaults.validation_fraction
    )
    if not 0 <= fraction <= 0.5:
        raise InvalidArgument("options.validation_fraction", f"must be in [0, 0.5], got {fraction}")
    if options.validation_dataset and options.HasField("validation_fraction") and fraction > 0:
        raise InvalidArgument(
            "options.validation_fraction", "cannot be set together with options.validation_dataset"
        )
    if len(options.held_out_datasets) > MAX_HELD_OUT:
        raise InvalidArgument(
            "options.held_out_datasets",
            f"at most {MAX_HELD_OUT} datasets, got {len(options.held_out_datasets)}",
        )
    held_out = tuple(
        f"datasets/{dataset_id(name, f'options.held_out_datasets[{i}]')}"
        for i, name in enumerate(options.held_out_datasets)
    )
    for name in ("min_record_count", "max_record_chars", "max_sequence_length"):
        if getattr(options, name) < 0:
            raise InvalidArgument(
                f"options.{name}", f"must not be negative, got {getattr(options, name)}"
            )
    return IngestOptions(
        format=options.format or None,
        invalid_record_policy=(
            "reject"
            if options.invalid_record_policy == dataset_pb2.INVALID_RECORD_POLICY_REJECT
            else "drop"
        ),
        min_record_count=options.min_record_count or defaults.min_record_count,
        max_record_chars=options.max_record_chars or defaults.max_record_chars,
        remove_exact_duplicates=(
            options.remove_exact_duplicates if options.HasField("remove_exact_duplicates") else True
        ),
        remove_near_duplicates=(
            options.remove_near_duplicates if options.HasField("remove_near_duplicates") else True
        ),
        near_duplicate_threshold=threshold,
        pii_policy={
            dataset_pb2.PII_POLICY_REPORT: "report",
            dataset_pb2.PII_POLICY_DROP: "drop",
        }.get(options.pii_policy, "redact"),  # type: ignore[arg-type]
        tokenizer_model=options.tokenizer_model,
        max_sequence_length=options.max_sequence_length or defaults.max_sequence_length,
        validation_fraction=0.0 if options.validation_dataset else fraction,
        split_seed=options.split_seed,
        validation_dataset=options.validation_dataset,
        kind=options.kind,
        held_out_datasets=held_out,
    )


def lease_proto(lease: DatasetLease) -> dataset_pb2.DatasetLease:
    return dataset_pb2.DatasetLease(
        name=f"datasets/{lease.dataset_id}/leases/{lease.id}",
        holder=lease.holder,
        create_time=timestamp(lease.create_time),
    )


def to_proto(row: DatasetRow, *, stored: bool = True) -> dataset_pb2.Dataset:
    dataset = dataset_pb2.Dataset(
        name=f"datasets/{row.id}" if stored else "",
        display_name=row.display_name,
        description=row.description,
        labels=row.labels,
        state=dataset_pb2.Dataset.STATE_READY,
        source_format=row.source_format,  # type: ignore[arg-type]
        kind=kind_of(
            row.source_format,  # type: ignore[arg-type]
            dataset_pb2.DatasetKind.Value(row.options.get("kind", "DATASET_KIND_UNSPECIFIED")),
        ),
        record_count=row.record_count,
        train_record_count=row.train_record_count,
        validation_record_count=row.validation_record_count,
        content_sha256=row.content_sha256,
        source_size_bytes=row.source_size_bytes,
        options=json_format.ParseDict(row.options, dataset_pb2.DatasetOptions()),
        validation_report=json_format.ParseDict(
            row.validation_report, dataset_pb2.ValidationReport()
        ),
        cleaning_report=json_format.ParseDict(row.cleaning_report, dataset_pb2.CleaningReport()),
        create_time=timestamp(row.create_time),
    )
    if row.token_statistics is not None:
        dataset.token_statistics.CopyFrom(
            json_format.ParseDict(row.token_statistics, dataset_pb2.TokenStatistics())
        )
    return dataset


def _message(message: dict[str, Any]) -> common_pb2.ChatMessage:
    result = common_pb2.ChatMessage(
        role=message["role"],
        content=message["content"],
        name=message.get("name", ""),
        tool_call_id=message.get("tool_call_id", ""),
        tool_calls=[
            common_pb2.ToolCall(
                id=made["id"], name=made["name"], arguments=orjson.dumps(made["arguments"]).decode()
            )
            for made in message.get("tool_calls", [])
        ],
    )
    if "weight" in message:
        result.weight = message["weight"]
    return result


def _tool(tool: dict[str, Any]) -> common_pb2.Tool:
    return common_pb2.Tool(
        name=tool["name"],
        description=tool["description"],
        parameters=orjson.dumps(tool["parameters"]).decode(),
    )
