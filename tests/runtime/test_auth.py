"""Bearer tokens with roles, declared per RPC in the protos."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import StartServer
from tests.helpers import error_info
from tunefleet.app.services import SERVICES, registration
from tunefleet.runtime.auth import TokenStore, required_role
from tunefleet.runtime.context import ServiceContext
from tunefleet.v1 import (
    auth_pb2,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    inference_service_pb2,
    inference_service_pb2_grpc,
)

TOKENS = {"reader": "r-secret", "writer": "w-secret", "admin": "a-secret"}
SERVICE_TOKEN = "s-secret"  # a service's own: writer on DatasetService only


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    lines = ["tokens:"]
    for role, token in TOKENS.items():
        digest = hashlib.sha256(token.encode()).hexdigest()
        lines += [f"  - subject: {role}-user", f"    role: {role}", f"    sha256: {digest}"]
    digest = hashlib.sha256(SERVICE_TOKEN.encode()).hexdigest()
    lines += [
        "  - subject: training-service",
        "    role: writer",
        f"    sha256: {digest}",
        "    services: [DatasetService]",
    ]
    path = tmp_path / "tokens.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
async def target(
    start_server: StartServer, tokens_file: Path, service_context: ServiceContext
) -> str:
    server = await start_server(
        [registration(key, service_context) for key in SERVICES],
        auth={"enabled": True, "tokens_file": str(tokens_file)},
    )
    return f"127.0.0.1:{server.port}"


def bearer(role: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {TOKENS[role]}"),)


async def test_missing_token_is_unauthenticated(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.GetDataset(dataset_service_pb2.GetDatasetRequest(name="datasets/x"))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = error_info(raised.value)
    assert info is not None and info.reason == "MISSING_TOKEN"


@pytest.mark.parametrize(
    ("header", "reason"),
    [("Bearer wrong", "UNKNOWN_TOKEN"), ("Basic dXNlcjpwdw==", "MALFORMED_TOKEN")],
)
async def test_bad_token_is_unauthenticated(target: str, header: str, reason: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.GetDataset(
                dataset_service_pb2.GetDatasetRequest(name="datasets/x"),
                metadata=(("authorization", header),),
            )
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = error_info(raised.value)
    assert info is not None and info.reason == reason


async def test_reader_calling_an_admin_rpc_is_denied(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        request = inference_service_pb2.LoadAdapterRequest(adapter="adapters/a@prod")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.LoadAdapter(request, metadata=bearer("reader"))
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        info = error_info(raised.value)
        assert info is not None and info.reason == "ROLE_TOO_LOW"
        assert info.metadata["required_role"] == "admin"
        # The writer is denied too; the admin gets through auth to the RPC (which finds no model
        # to serve on this server).
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.LoadAdapter(request, metadata=bearer("writer"))
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.LoadAdapter(request, metadata=bearer("admin"))
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_roles_are_ordered(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        delete = dataset_service_pb2.DeleteDatasetRequest(name="datasets/x")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.DeleteDataset(delete, metadata=bearer("reader"))
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        for role in ("writer", "admin"):  # through auth, to the service: no such dataset
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.DeleteDataset(delete, metadata=bearer(role))
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_service_token_reaches_its_services_only(target: str) -> None:
    """Least privilege for service-to-service calls: the token works where it is meant to and
    is PERMISSION_DENIED on every other service, whatever its role."""
    metadata = (("authorization", f"Bearer {SERVICE_TOKEN}"),)
    async with grpc.aio.insecure_channel(target) as channel:
        datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        delete = dataset_service_pb2.DeleteDatasetRequest(name="datasets/x")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await datasets.DeleteDataset(delete, metadata=metadata)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND  # through auth
        inference = inference_service_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await inference.ListServedAdapters(
                inference_service_pb2.ListServedAdaptersRequest(), metadata=metadata
            )
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    info = error_info(raised.value)
    assert info is not None and info.reason == "SERVICE_NOT_ALLOWED"
    assert info.metadata["service"] == "InferenceService"


def test_a_token_for_an_unknown_service_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(
        f"tokens:\n  - {{subject: s, role: reader, sha256: {'a' * 64}, services: [Nope]}}\n"
    )
    with pytest.raises(ValueError, match=r"(?s)tokens\.yaml.*services.*'DatasetService'"):
        TokenStore.from_file(path)


async def test_health_needs_no_token(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_every_rpc_declares_a_role() -> None:
    pool = descriptor_pool.Default()
    for spec in SERVICES.values():
        for method in pool.FindServiceByName(spec.descriptor.full_name).methods:
            role = required_role(f"/{spec.descriptor.full_name}/{method.name}")
            assert role not in (None, auth_pb2.ACCESS_ROLE_UNSPECIFIED), method.full_name


def test_unknown_methods_need_a_role_nobody_has() -> None:
    assert required_role("/tunefleet.v1.DatasetService/Nope") == auth_pb2.ACCESS_ROLE_UNSPECIFIED
    assert required_role("/grpc.health.v1.Health/Check") is None


def test_tokens_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text("tokens:\n  - subject: x\n    role: root\n    sha256: abc\n")
    with pytest.raises(ValueError, match=r"tokens\.yaml"):
        TokenStore.from_file(path)
