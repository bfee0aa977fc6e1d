"""Calls from one tunefleet service to another, over the other's public gRPC API."""

from __future__ import annotations

from typing import Any

import grpc

from tunefleet.core.errors import InvalidArgument, NotFound, relayed
from tunefleet.v1 import dataset_pb2, dataset_service_pb2, dataset_service_pb2_grpc


class Peer:
    """Another tunefleet service, seen from this one: one channel, opened on first use (so the
    address may be set until then: the embedded shape calls its own port), and this service's own
    bearer token on every call. Subclasses name the stub."""

    stub_class: Any  # the generated stub (typed for the blocking API, used with grpc.aio)
    service = "the service"  # its name in errors
    call_seconds = 30.0

    def __init__(self, endpoint: str = "", token: str = "") -> None:
        self.endpoint = endpoint
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel: grpc.aio.Channel | None = None

    @property
    def stub(self) -> Any:
        if self._channel is None:
            assert self.endpoint, f"{type(self).__name__}: the address is not known yet"
            self._channel = grpc.aio.insecure_channel(self.endpoint)
        return self.stub_class(self._channel)

    async def call(self, method: str, request: Any) -> Any:
        """One unary call; a refusal is relayed as this service's own error (see `relayed`)."""
        try:
            return await getattr(self.stub, method)(
                request, timeout=self.call_seconds, metadata=self.metadata
            )
        except grpc.aio.AioRpcError as error:
            raise relayed(error, self.service) from None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class DatasetServicePeer(Peer):
    """DatasetService, as the services that read its datasets call it."""

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
