"""TrainingService's client of DatasetService: the datasets a job names, and the leases that
keep them from being deleted while the job uses them."""

from __future__ import annotations

from tunefleet.core.errors import InvalidArgument, NotFound
from tunefleet.runtime.peers import Peer
from tunefleet.v1 import dataset_pb2, dataset_service_pb2, dataset_service_pb2_grpc


def lease_id(job_id: str) -> str:
    """The id of the leases a job holds on its datasets."""
    return f"job-{job_id}"


class DatasetClient(Peer):
    stub_class = dataset_service_pb2_grpc.DatasetServiceStub
    service = "DatasetService"

    async def dataset(self, name: str, field: str) -> dataset_pb2.Dataset:
        """The dataset `name`; INVALID_ARGUMENT naming `field` when there is none."""
        try:
            found: dataset_pb2.Dataset = await self.call(
                "GetDataset", dataset_service_pb2.GetDatasetRequest(name=name)
            )
        except NotFound:
            raise InvalidArgument(field, f"{name} does not exist") from None
        return found

    async def lease(self, dataset: str, job_id: str, holder: str) -> None:
        """Lease `dataset` for the job (a retry returns the lease that exists)."""
        await self.call(
            "CreateDatasetLease",
            dataset_service_pb2.CreateDatasetLeaseRequest(
                parent=dataset,
                lease_id=lease_id(job_id),
                lease=dataset_pb2.DatasetLease(holder=holder),
            ),
        )

    async def release(self, dataset: str, job_id: str) -> None:
        """Delete the job's lease on `dataset`; one that is gone already is fine."""
        await self.call(
            "DeleteDatasetLease",
            dataset_service_pb2.DeleteDatasetLeaseRequest(
                name=f"{dataset}/leases/{lease_id(job_id)}", allow_missing=True
            ),
        )
