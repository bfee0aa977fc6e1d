"""Fixtures shared by every test package."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.helpers import IN_CI
from tests.kube import cluster
from tests.kube.namespace import Kube
from tunefleet.runtime.context import ServiceContext, open_storage
from tunefleet.runtime.server import ServiceRegistration, TunefleetServer
from tunefleet.runtime.settings import ServerSettings, load_settings


@pytest.fixture(autouse=True)
def torch_default_dtype_unchanged() -> Iterator[None]:
    """torch's default dtype is process-wide: a test (or the code it runs) that leaves it changed
    makes every later model in the process compute in it (core/loading.py)."""
    yield
    torch = sys.modules.get("torch")
    if torch is not None:
        found = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        assert found == torch.float32, f"the test left torch's default dtype {found}"


StartServer = Callable[..., Awaitable[TunefleetServer]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """Start a TunefleetServer on free ports: `await start_server(services, **server_settings)`.
    Servers are stopped when the test ends."""
    servers: list[TunefleetServer] = []

    async def start(
        services: Sequence[ServiceRegistration] = (), **settings: Any
    ) -> TunefleetServer:
        options: dict[str, Any] = {"port": 0, "metrics_port": 0, "shutdown_grace_seconds": 0}
        options.update(settings)
        server = TunefleetServer(ServerSettings.model_validate(options), list(services))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop(0)


@pytest.fixture
def service_context(tmp_path: Path) -> Iterator[ServiceContext]:
    """Settings, storage (SQLite and local blobs under tmp_path) and a metrics registry."""
    settings = load_settings(data_dir=tmp_path / "data")
    storage = open_storage(settings)
    yield ServiceContext(settings, storage, CollectorRegistry())
    storage.close()


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.Cluster]:
    """etcd, kube-apiserver and the Job controller on 127.0.0.1, once per test session."""
    why = cluster.missing()
    if why is not None:
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)
    with cluster.running_cluster(tmp_path_factory.mktemp("kube")) as running:
        yield running


@pytest.fixture
def kube(kube_cluster: cluster.Cluster) -> Kube:
    """A namespace of the test's own on the test control plane."""
    return Kube(kube_cluster)
