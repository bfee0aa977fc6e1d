"""TLS and mutual TLS on the gRPC port."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import StartServer
from tests.runtime.certs import CertificateAuthority, KeyPair


async def check(channel: grpc.aio.Channel) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    return int(response.status)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path)


def credentials(ca: CertificateAuthority, client: KeyPair | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.pair.cert.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )


async def test_tls_serves_trusting_clients_only(
    start_server: StartServer, ca: CertificateAuthority
) -> None:
    pair = ca.issue("localhost", server=True)
    server = await start_server(tls={"cert_file": str(pair.cert), "key_file": str(pair.key)})
    target = f"localhost:{server.port}"
    async with grpc.aio.secure_channel(target, credentials(ca)) as channel:
        assert await check(channel) == health_pb2.HealthCheckResponse.SERVING
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await check(channel)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    other_ca = CertificateAuthority(ca.directory, "other CA")
    async with grpc.aio.secure_channel(target, credentials(other_ca)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await check(channel)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_client_certificate(
    start_server: StartServer, ca: CertificateAuthority
) -> None:
    pair = ca.issue("localhost", server=True)
    server = await start_server(
        tls={
            "cert_file": str(pair.cert),
            "key_file": str(pair.key),
            "client_ca_file": str(ca.pair.cert),
        }
    )
    target = f"localhost:{server.port}"
    async with grpc.aio.secure_channel(
        target, credentials(ca, ca.issue("client", server=False))
    ) as channel:
        assert await check(channel) == health_pb2.HealthCheckResponse.SERVING
    async with grpc.aio.secure_channel(target, credentials(ca)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await check(channel)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    stranger = CertificateAuthority(ca.directory, "stranger CA").issue("mallory", server=False)
    async with grpc.aio.secure_channel(target, credentials(ca, stranger)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await check(channel)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
