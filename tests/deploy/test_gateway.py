"""The gateway's nginx configuration, as kustomize renders it, in a real nginx in front of the
cluster shape on this machine: a `tunefleet serve <service>` process per service sharing one data
directory, as the Deployments share the database and blob store. Every call the SDK makes through
it reaches its own service, streams and error details included."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.deploy.nginx import GATEWAY_CONF, running_gateway
from tests.deploy.test_manifests import SERVICES, by_kind, render
from tests.helpers import require_tool
from tunefleet import demo
from tunefleet.client import Client, FailedPrecondition, InvalidArgument, NotFound
from tunefleet.demo.server import LocalServer, free_port
from tunefleet.v1 import evaluation_service_pb2, evaluation_service_pb2_grpc


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The gateway's address, in front of one process per service."""
    require_tool("nginx", "Debian package nginx")
    directory = tmp_path_factory.mktemp("gateway")
    maps = by_kind(render("dev"), "ConfigMap")
    (name,) = [name for name in maps if name.startswith("tunefleet-gateway-")]
    config = maps[name]["data"]["nginx.conf"]
    assert config == GATEWAY_CONF.read_text()  # what the Pods mount
    servers = [LocalServer(directory / "data", services=[key]) for key in SERVICES]
    adapters = servers[list(SERVICES).index("adapters")]
    datasets = servers[list(SERVICES).index("datasets")]
    servers[list(SERVICES).index("training")].settings["training"] = {
        # as the dev overlay sets them
        "registry_endpoint": adapters.target,
        "datasets_endpoint": datasets.target,
    }
    servers[list(SERVICES).index("evaluation")].settings["evaluation"] = {
        "datasets_endpoint": datasets.target,
        "inference_endpoint": servers[list(SERVICES).index("inference")].target,
    }
    port = free_port()  # RetrainingService calls the others through the gateway, as deployed
    servers[list(SERVICES).index("retraining")].settings["retraining"] = {
        "endpoint": f"127.0.0.1:{port}"
    }
    for server in servers:
        server.start()
    try:
        upstreams = {key: server.target for key, server in zip(SERVICES, servers, strict=True)}
        with running_gateway(directory / "nginx", upstreams, config, port=port) as address:
            yield address
    finally:
        for server in servers:
            server.stop()


def test_each_service_is_reached_through_the_one_address(gateway: str) -> None:
    sample = Path(demo.__file__).parent / "data" / "orders.jsonl"
    with Client(gateway) as client:
        # A client stream (upload) and unary calls to DatasetService.
        dataset = client.datasets.upload(sample, display_name="through the gateway")
        assert dataset.record_count > 0
        assert client.datasets.get(dataset.name).name == dataset.name
        # A server stream.
        assert len(list(client.datasets.preview(dataset.name, limit=5))) == 5
        # The others answer too; a call routed to the wrong process would be UNIMPLEMENTED.
        assert list(client.training_jobs.list()) == []
        assert list(client.adapters.list()) == []
        with pytest.raises(NotFound) as missing:
            client.adapters.get("adapters/nothing")
        assert missing.value.reason  # error details (ErrorInfo) come through
        with pytest.raises(FailedPrecondition):  # no base model in this deployment
            client.inference.generate(adapter="", prompt="hello")
        assert list(client.retraining.policies()) == []
        with pytest.raises(InvalidArgument) as refused:  # it asks AdapterService via the gateway
            client.retraining.create_policy(
                {"adapter": "adapters/nothing", "evaluation": {"gate": {"metric": "exact_match"}}}
            )
        assert refused.value.field == "retraining_policy.adapter"
    with grpc.insecure_channel(gateway) as channel:
        evaluations = evaluation_service_pb2_grpc.EvaluationServiceStub(channel)
        listed = evaluations.ListEvaluationJobs(
            evaluation_service_pb2.ListEvaluationJobsRequest(), timeout=30
        )
        assert list(listed.evaluation_jobs) == []


def test_calls_for_anything_else_are_unimplemented(gateway: str) -> None:
    with grpc.insecure_channel(gateway) as channel, pytest.raises(grpc.RpcError) as refused:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
