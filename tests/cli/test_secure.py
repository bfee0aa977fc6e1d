"""The SDK and the CLI against a server with TLS and bearer tokens."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from tests.client.conftest import connect, mode
from tests.runtime.certs import CertificateAuthority
from tunefleet import client as sdk_errors
from tunefleet.client import TLS
from tunefleet.demo.server import LocalServer

TUNEFLEET = Path(sys.executable).with_name("tunefleet")
__all__ = ["mode"]  # the sync/async fixture of the SDK tests
TOKENS = {"reader": "r-token-1234", "writer": "w-token-5678"}


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalServer, Path]]:
    directory = tmp_path_factory.mktemp("secure")
    ca = CertificateAuthority(directory)
    pair = ca.issue("localhost", server=True)
    tokens = directory / "tokens.yaml"
    entries = [
        {"subject": role, "role": role, "sha256": hashlib.sha256(token.encode()).hexdigest()}
        for role, token in TOKENS.items()
    ]
    tokens.write_text(yaml.safe_dump({"tokens": entries}))
    server = LocalServer(
        directory / "data",
        {
            "logging": {"level": "WARNING"},
            "server": {
                "tls": {"cert_file": str(pair.cert), "key_file": str(pair.key)},
                "auth": {"enabled": True, "tokens_file": str(tokens)},
            },
            "training": {"worker_registry_token": TOKENS["writer"]},
            "evaluation": {"service_token": TOKENS["reader"]},
            "retraining": {"service_token": TOKENS["writer"]},
        },
        credentials=grpc.ssl_channel_credentials(ca.pair.cert.read_bytes()),
    )
    server.target = server.target.replace("127.0.0.1", "localhost")  # the certificate's name
    with server:
        yield server, ca.pair.cert


def test_sdk_with_tls_and_tokens(mode: str, secure: tuple[LocalServer, Path]) -> None:
    server, ca_file = secure
    tls = TLS(ca_file=ca_file)
    writer = connect(mode, server.target, tls=tls, token=TOKENS["writer"])
    dataset = writer.datasets.upload(b'{"prompt": "q", "completion": "a"}\n')
    writer.close()

    reader = connect(mode, server.target, tls=tls, token=TOKENS["reader"])
    assert dataset.name in [d.name for d in reader.datasets.list()]
    with pytest.raises(sdk_errors.PermissionDenied):
        reader.datasets.delete(dataset.name)
    reader.close()

    nobody = connect(mode, server.target, tls=tls)
    with pytest.raises(sdk_errors.Unauthenticated):
        nobody.datasets.get(dataset.name)
    nobody.close()


def cli(server: LocalServer, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TUNEFLEET), "--target", server.target, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
        check=False,
    )


def test_cli_with_tls_and_tokens(secure: tuple[LocalServer, Path]) -> None:
    server, ca_file = secure
    ok: Any = cli(
        server, "--ca-file", str(ca_file), "datasets", "list", TUNEFLEET_TOKEN=TOKENS["reader"]
    )
    assert ok.returncode == 0, ok.stderr
    denied = cli(server, "--ca-file", str(ca_file), "--token", "wrong", "datasets", "list")
    assert denied.returncode == 1
    assert denied.stderr.startswith("error: UNAUTHENTICATED")
    plain = cli(server, "datasets", "list", TUNEFLEET_TOKEN=TOKENS["reader"])  # no TLS
    assert plain.returncode == 1 and plain.stderr.startswith("error: UNAVAILABLE")
