"""Ordinary bad input, through a real server with all four services: NUL and control characters,
over-long names, undefined enum values, broken filter strings, odd model paths. Each is
INVALID_ARGUMENT naming the field, with a bounded message, and nothing is stored."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import StartServer
from tests.helpers import error_info, field_violations
from tunefleet.app.services import SERVICES, registration
from tunefleet.runtime.context import ServiceContext
from tunefleet.v1 import (
    adapter_pb2,
    adapter_service_pb2,
    adapter_service_pb2_grpc,
    dataset_pb2,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
)


@pytest.fixture
async def channel(
    start_server: StartServer, service_context: ServiceContext
) -> AsyncIterator[grpc.aio.Channel]:
    server = await start_server([registration(key, service_context) for key in SERVICES])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


async def refusal(call: Any) -> grpc.aio.AioRpcError:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("accepted")


async def field_of(call: Any) -> str:
    error = await refusal(call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    ((field, _),) = field_violations(error)
    return field


async def test_names_ids_and_filters_are_checked_for_every_rpc(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    adapters = adapter_service_pb2_grpc.AdapterServiceStub(channel)
    datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)

    def create(adapter_id: str = "a", base_model: str = "tiny", **adapter: Any) -> Any:
        request = adapter_service_pb2.CreateAdapterRequest(
            adapter_id=adapter_id, adapter=adapter_pb2.Adapter(base_model=base_model, **adapter)
        )
        return adapters.CreateAdapter(request)

    assert await field_of(create("a\x00b")) == "adapter_id"
    assert await field_of(create(base_model="tiny\x00")) == "adapter.base_model"
    assert await field_of(create(base_model="m" * 600)) == "adapter.base_model"
    assert await field_of(create(base_model="a\tb")) == "adapter.base_model"
    assert await field_of(create(labels={"team": "a\nb"})) == "adapter.labels[team]"
    assert await field_of(create(labels={"te\x1bam": "a"})) == "adapter.labels key"
    assert await field_of(create(description="a\x00")) == "adapter.description"
    version = adapter_service_pb2.CreateAdapterVersionRequest(
        parent="adapters/a", lineage=adapter_pb2.Lineage(method=cast(Any, 99))
    )
    assert await field_of(adapters.CreateAdapterVersion(version)) == "lineage.method"
    for text in ('name = "a\tb"', 'name = "\\q"', 'name = "\\u0000"', 'name = "a\x00"'):
        listing = dataset_service_pb2.ListDatasetsRequest(filter=text)
        assert await field_of(datasets.ListDatasets(listing)) == "filter"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # None of it was stored.
    listed = await adapters.ListAdapters(adapter_service_pb2.ListAdaptersRequest())
    assert list(listed.adapters) == []


async def test_free_text_keeps_its_newlines(channel: grpc.aio.Channel) -> None:
    datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
    # A description with newlines and tabs passes the checks (the call then fails later for
    # want of a body, not for its description).
    error = await refusal(
        datasets.UploadDataset(
            iter(
                [
                    dataset_service_pb2.UploadDatasetRequest(
                        header=dataset_service_pb2.UploadDatasetHeader(
                            display_name="notes",
                            description="line one\n\tline two",
                            options=dataset_pb2.DatasetOptions(
                                format=dataset_pb2.DATASET_FORMAT_ALPACA
                            ),
                        )
                    )
                ]
            )
        )
    )
    assert "description" not in [field for field, _ in field_violations(error)]


async def test_a_huge_name_gets_its_own_error_not_a_transport_one(
    channel: grpc.aio.Channel,
) -> None:
    adapters = adapter_service_pb2_grpc.AdapterServiceStub(channel)
    error = await refusal(
        adapters.GetAdapter(adapter_service_pb2.GetAdapterRequest(name="adapters/" + "x" * 100_000))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len((error.details() or "").encode()) <= 1024
    info = error_info(error)
    assert info is not None and info.metadata["field"] == "name"


async def test_model_paths_that_are_not_models_are_refused_alike(
    channel: grpc.aio.Channel,
) -> None:
    datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
    messages = []
    for model in ("/etc", "/no/such/directory", "/" + "d" * 300, "../" * 100):
        header = dataset_service_pb2.UploadDatasetHeader(
            display_name="x", options=dataset_pb2.DatasetOptions(tokenizer_model=model)
        )
        error = await refusal(
            datasets.UploadDataset(iter([dataset_service_pb2.UploadDatasetRequest(header=header)]))
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (model, error)
        assert field_violations(error)[0][0] == "options.tokenizer_model"
        messages.append((error.details() or "").replace(model, "MODEL"))
    assert len(set(messages)) == 1  # no oracle: an existing directory reads as a missing one


async def test_health_list_reports_every_service(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    listed = await health.List(health_pb2.HealthListRequest())
    assert set(listed.statuses) >= {"", "tunefleet.v1.AdapterService"}
    assert all(s.status == health_pb2.HealthCheckResponse.SERVING for s in listed.statuses.values())
