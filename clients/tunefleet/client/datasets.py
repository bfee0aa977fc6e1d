"""DatasetService in the SDK: upload, inspect and delete fine-tuning datasets."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from tunefleet.client.core import (
    Call,
    Emit,
    Feed,
    M,
    Open,
    Program,
    Read,
    Resource,
    operation,
    pages,
    stream,
)
from tunefleet.client.helpers import (
    CHUNK_BYTES,
    Progress,
    Source,
    chunks,
    resource_name,
    to_message,
)
from tunefleet.v1 import dataset_pb2, dataset_service_pb2, dataset_service_pb2_grpc


class Datasets(Resource[M]):
    """DatasetService: upload, inspect and delete fine-tuning datasets."""

    Stub = dataset_service_pb2_grpc.DatasetServiceStub

    @operation
    def upload(
        self,
        source: Source,
        *,
        display_name: str = "",
        description: str = "",
        labels: Mapping[str, str] | None = None,
        options: dataset_pb2.DatasetOptions | Mapping[str, Any] | None = None,
        request_id: str = "",
        validate_only: bool = False,
        on_progress: Progress | None = None,
        chunk_size: int = CHUNK_BYTES,
    ) -> Program[dataset_pb2.Dataset]:
        """Upload a dataset (JSON lines or a JSON array in any supported format), streamed in
        chunks; the server validates, cleans, measures and splits it.

        `options` is a `DatasetOptions` or its JSON form; `display_name` defaults to the file's
        name; `on_progress(sent, total)` is called after each chunk.

        Example::

            dataset = client.datasets.upload(
                "orders.jsonl", options={"validationFraction": 0.1},
                on_progress=lambda sent, total: print(sent, total),
            )
            print(dataset.name, dataset.validation_report.rejected_records)
        """
        pieces, _, name = chunks(source, chunk_size, on_progress)
        header = dataset_service_pb2.UploadDatasetHeader(
            display_name=display_name or name,
            description=description,
            labels=labels,
            options=to_message(dataset_pb2.DatasetOptions, options or {}, "options"),
            request_id=request_id,
            validate_only=validate_only,
        )

        def requests() -> Iterator[dataset_service_pb2.UploadDatasetRequest]:
            yield dataset_service_pb2.UploadDatasetRequest(header=header)
            for chunk in pieces:
                yield dataset_service_pb2.UploadDatasetRequest(chunk=chunk)
            yield dataset_service_pb2.UploadDatasetRequest(finish_write=True)

        dataset: dataset_pb2.Dataset = yield Call(self.Stub, "UploadDataset", requests())
        return dataset

    @operation
    def get(self, name: str) -> Program[dataset_pb2.Dataset]:
        """A dataset by name (`datasets/{id}` or the id).

        Example::

            dataset = client.datasets.get("datasets/0f3c...")
        """
        request = dataset_service_pb2.GetDatasetRequest(name=resource_name("datasets", name))
        dataset: dataset_pb2.Dataset = yield Call(self.Stub, "GetDataset", request, idempotent=True)
        return dataset

    @stream
    def list(self, filter: str = "", page_size: int = 100) -> Feed[dataset_pb2.Dataset]:
        """Every dataset matching `filter` (such as `state=READY` or `labels.team=search`),
        newest first, fetching pages as the iteration goes.

        Example::

            for dataset in client.datasets.list(filter="state=READY"):
                print(dataset.name, dataset.record_count)
        """
        request = dataset_service_pb2.ListDatasetsRequest(page_size=page_size, filter=filter)
        yield from pages(self.Stub, "ListDatasets", request, "datasets")

    @operation
    def delete(self, name: str) -> Program[None]:
        """Delete a dataset (refused while a training job uses it).

        Example::

            client.datasets.delete("datasets/0f3c...")
        """
        request = dataset_service_pb2.DeleteDatasetRequest(name=resource_name("datasets", name))
        yield Call(self.Stub, "DeleteDataset", request, idempotent=True)

    @stream
    def leases(self, dataset: str, page_size: int = 100) -> Feed[dataset_pb2.DatasetLease]:
        """The leases on a dataset: who uses it (a training job, an evaluation), and so keeps it
        from deletion.

        Example::

            for lease in client.datasets.leases("datasets/0f3c..."):
                print(lease.holder)
        """
        request = dataset_service_pb2.ListDatasetLeasesRequest(
            parent=resource_name("datasets", dataset), page_size=page_size
        )
        yield from pages(self.Stub, "ListDatasetLeases", request, "leases")

    @operation
    def create_lease(
        self, dataset: str, lease_id: str, *, holder: str
    ) -> Program[dataset_pb2.DatasetLease]:
        """Lease a dataset for `holder` (a resource name): it cannot be deleted until every lease
        is deleted.

        Example::

            client.datasets.create_lease("datasets/0f3c...", "nightly-eval", holder="jobs/nightly")
        """
        request = dataset_service_pb2.CreateDatasetLeaseRequest(
            parent=resource_name("datasets", dataset),
            lease_id=lease_id,
            lease=dataset_pb2.DatasetLease(holder=holder),
        )
        lease: dataset_pb2.DatasetLease = yield Call(
            self.Stub, "CreateDatasetLease", request, idempotent=True
        )
        return lease

    @operation
    def delete_lease(self, name: str, *, allow_missing: bool = False) -> Program[None]:
        """Delete a lease, `datasets/{dataset}/leases/{lease}`.

        Example::

            client.datasets.delete_lease("datasets/0f3c.../leases/nightly-eval")
        """
        request = dataset_service_pb2.DeleteDatasetLeaseRequest(
            name=name, allow_missing=allow_missing
        )
        yield Call(self.Stub, "DeleteDatasetLease", request, idempotent=True)

    @stream
    def preview(
        self,
        name: str,
        *,
        split: dataset_pb2.DatasetSplit.ValueType = dataset_pb2.DATASET_SPLIT_UNSPECIFIED,
        offset: int = 0,
        limit: int = 10,
    ) -> Feed[dataset_pb2.DatasetRecord]:
        """Cleaned records of a dataset, optionally of one split.

        Example::

            for record in client.datasets.preview("datasets/0f3c...", limit=3):
                print(record.messages[-1].content)
        """
        request = dataset_service_pb2.PreviewDatasetRecordsRequest(
            name=resource_name("datasets", name), split=split, offset=offset, limit=limit
        )
        records = yield Open(self.Stub, "PreviewDatasetRecords", request)
        while (record := (yield Read(records))) is not None:
            yield Emit(record)

    @operation
    def check_contamination(
        self,
        dataset: str,
        evaluation_dataset: str,
        *,
        near_duplicate_threshold: float | None = None,
    ) -> Program[dataset_pb2.ContaminationReport]:
        """How many records of an evaluation dataset also appear in a training dataset.

        Example::

            report = client.datasets.check_contamination("datasets/train", "datasets/eval")
            print(report.exact_overlap, report.near_overlap)

        `near_duplicate_threshold` (Jaccard, in (0, 1]) defaults to the server's, 0.8.
        """
        request = dataset_service_pb2.CheckContaminationRequest(
            dataset=resource_name("datasets", dataset),
            evaluation_dataset=resource_name("datasets", evaluation_dataset),
        )
        if near_duplicate_threshold is not None:
            request.near_duplicate_threshold = near_duplicate_threshold
        report: dataset_pb2.ContaminationReport = yield Call(
            self.Stub, "CheckContamination", request, idempotent=True
        )
        return report
