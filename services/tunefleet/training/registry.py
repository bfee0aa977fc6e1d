"""TrainingService's client of AdapterService, for the end of a run whose final report never
arrived: check that a version the worker left behind exists and was trained by the job, or
register the output it stored but could not register itself (the same request, with the same
request id, so a registration that did happen is not repeated)."""

from __future__ import annotations

import grpc

from tunefleet.runtime.peers import Peer
from tunefleet.storage.blobs import BlobStore, uri_sha256
from tunefleet.v1 import adapter_service_pb2, adapter_service_pb2_grpc

TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
CALL_SECONDS = 300.0


class RegistryUnavailable(Exception):
    """AdapterService cannot answer now; try again later."""


class RegistrationRefused(Exception):
    """AdapterService refused the output, or the output is not there: final."""


class RegistryClient(Peer):
    stub_class = adapter_service_pb2_grpc.AdapterServiceStub

    def __init__(self, endpoint: str, token: str, blobs: BlobStore) -> None:
        super().__init__(endpoint, token)
        self.blobs = blobs

    async def trained_by(self, version: str, job: str) -> bool:
        """Whether `version` exists and its lineage names `job`."""
        try:
            found = await self.stub.GetAdapterVersion(
                adapter_service_pb2.GetAdapterVersionRequest(name=version),
                timeout=30,
                metadata=self.metadata,
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() in TRANSIENT:
                raise RegistryUnavailable(f"{error.code().name}: {error.details()}") from None
            return False
        return bool(found.lineage.training_job == job)

    async def register(self, request_uri: str, job: str) -> str:
        """Send the stored CreateAdapterVersionRequest at `request_uri`; the version's name."""
        sha256 = uri_sha256(request_uri)
        try:
            if sha256 is None:
                raise ValueError(f"{request_uri!r} does not name a blob")
            request = adapter_service_pb2.CreateAdapterVersionRequest.FromString(
                self.blobs.read_bytes(sha256)
            )
        except Exception as error:
            raise RegistrationRefused(
                f"the stored registration request {request_uri} cannot be read ({error})"
            ) from None
        if request.lineage.training_job != job:
            raise RegistrationRefused(
                f"the stored registration request {request_uri} is not {job}'s"
            )
        try:
            version = await self.stub.CreateAdapterVersion(
                request, timeout=CALL_SECONDS, metadata=self.metadata, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as error:
            said = f"{error.code().name}: {error.details()}"
            if error.code() in TRANSIENT:
                raise RegistryUnavailable(said) from None
            raise RegistrationRefused(f"the registry refused the result ({said})") from None
        return str(version.name)
