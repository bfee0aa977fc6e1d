"""The cluster shape with a database per service: a `tunefleet serve <service>` process per
service, each with its own database (SQLite files; and PostgreSQL databases), behind the gateway's
nginx, run the demo tour (upload, train twice, register, move `prod`, served without a restart,
feedback, a turn of the improvement loop) and then an evaluation of the served adapter against
the base model. Afterwards each
database holds rows of its own service's tables only: everything else went through the other
services' RPCs."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, inspect, text

from tests.cli.test_demo import check_tour
from tests.deploy.nginx import running_gateway
from tests.deploy.test_manifests import SERVICES
from tests.helpers import require_tool
from tests.storage.conftest import postgres_server  # noqa: F401 (a fixture)
from tunefleet.client import Client
from tunefleet.demo import tour
from tunefleet.demo.server import LocalServer, free_port

pytestmark = pytest.mark.timeout(1500)  # a generous bound for a busy machine, not a claim

# The tables each service writes (the change feed and idempotency keys are everyone's own).
OWN_TABLES = {
    "datasets": {"datasets", "dataset_leases"},
    "training": {"training_jobs", "training_checkpoints"},
    "adapters": {
        "adapters",
        "adapter_versions",
        "adapter_version_datasets",
        "adapter_aliases",
        "adapter_alias_moves",
    },
    "inference": {"inference_responses", "feedback"},
    "evaluation": {"evaluation_jobs", "evaluation_items"},
    "retraining": {"retraining_policies", "retraining_runs"},
}
SHARED_TABLES = {"changes", "change_counters", "idempotency_keys", "alembic_version"}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_urls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A separate, empty database for each service."""
    if request.param == "sqlite":
        yield {key: f"sqlite:///{tmp_path / f'{key}.db'}" for key in SERVICES}
        return
    base = request.getfixturevalue("postgres_server")
    plain = base.replace("postgresql+psycopg://", "postgresql://")
    names = {key: f"test_{key}_{uuid.uuid4().hex[:8]}" for key in SERVICES}
    with psycopg.connect(f"{plain}/postgres", autocommit=True) as connection:
        for name in names.values():
            connection.execute(f'CREATE DATABASE "{name}"')
    yield {key: f"{base}/{name}" for key, name in names.items()}
    with psycopg.connect(f"{plain}/postgres", autocommit=True) as connection:
        for name in names.values():
            connection.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def rows_by_table(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return {
                table: connection.execute(text(f'SELECT count(*) FROM "{table}"')).scalar_one()
                for table in inspect(connection).get_table_names()
            }
    finally:
        engine.dispose()


def evaluate_through(gateway: str) -> None:
    """The tour's served adapter against the base model on three of its dataset's items."""
    import grpc

    from tunefleet.v1 import (
        evaluation_pb2,
        evaluation_service_pb2,
        evaluation_service_pb2_grpc,
        inference_pb2,
    )

    with Client(gateway) as client, grpc.insecure_channel(gateway) as channel:
        dataset = next(d for d in client.datasets.list() if d.display_name == "orders")
        evaluations = evaluation_service_pb2_grpc.EvaluationServiceStub(channel)
        job = evaluation_pb2.EvaluationJob(
            candidates=[
                evaluation_pb2.EvaluationCandidate(name="base"),
                evaluation_pb2.EvaluationCandidate(name="tuned", adapter=f"{tour.ADAPTER}@prod"),
            ],
            dataset=dataset.name,
            max_items=3,
            sampling=inference_pb2.SamplingParams(max_tokens=16),
            graders=[evaluation_pb2.EvaluationGrader(type="rouge_l")],
        )
        created = evaluations.CreateEvaluationJob(
            evaluation_service_pb2.CreateEvaluationJobRequest(evaluation_job=job), timeout=60
        )
        state = evaluation_pb2.EvaluationJob.State
        deadline = time.monotonic() + 600
        while (found := evaluations.GetEvaluationJob(
            evaluation_service_pb2.GetEvaluationJobRequest(name=created.name), timeout=30
        )).state not in (state.STATE_SUCCEEDED, state.STATE_FAILED):  # fmt: skip
            assert time.monotonic() < deadline, found
            time.sleep(0.5)
        assert found.state == state.STATE_SUCCEEDED, found.error_message
        assert [r.candidate for r in found.results] == ["base", "tuned"]
        assert all(r.scores[0].count == 3 for r in found.results)


def chat_through(front: str, gateway_http: str) -> None:
    """OpenAI clients reach the tour's served adapter through the gateway's HTTP port, which
    passes them to `tunefleet serve openai`, which calls the services through the gateway."""
    import openai

    adapter = tour.ADAPTER.removeprefix("adapters/")
    question = [{"role": "user", "content": "Kenji wants 4 lamps in Berlin."}]
    for base_url in (f"http://{front}/v1", f"http://{gateway_http}/v1"):
        client: Any = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        with client:
            assert f"{adapter}@prod" in [model.id for model in client.models.list()]
            raw = client.chat.completions.with_raw_response.create(
                model=f"{adapter}@prod",
                messages=question,
                max_tokens=16,
                temperature=0,
            )
            served = raw.headers["x-tunefleet-adapter-version"]
            assert served.startswith(f"{tour.ADAPTER}/versions/")
            stream = client.chat.completions.create(
                model=f"{adapter}@prod",
                messages=question,
                max_tokens=16,
                temperature=0,
                stream=True,
            )
            streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert streamed == raw.parse().choices[0].message.content


def test_the_demo_tour_and_an_evaluation_run_on_the_services_with_a_database_each(
    tmp_path: Path, database_urls: dict[str, str]
) -> None:
    require_tool("nginx", "Debian package nginx")
    model = tour.prepare_model(tour.QUICK)
    data = tmp_path / "data"  # the blob store stays shared, as the object store is
    servers: dict[str, LocalServer] = {}
    for key in SERVICES:
        settings: dict[str, Any] = {
            "storage": {"database_url": database_urls[key]},
            "models": {tour.QUICK.model: str(model)},
            "logging": {"level": "INFO"},
        }
        servers[key] = LocalServer(data, settings, services=[key])
    servers["training"].settings["training"] = {
        **tour.server_settings(tour.QUICK, model)["training"],
        "registry_endpoint": servers["adapters"].target,
        "datasets_endpoint": servers["datasets"].target,
    }
    servers["inference"].settings["inference"] = {
        **tour.server_settings(tour.QUICK, model)["inference"],
        "registry_endpoint": servers["adapters"].target,
    }
    servers["evaluation"].settings["evaluation"] = {
        "datasets_endpoint": servers["datasets"].target,
        "inference_endpoint": servers["inference"].target,
    }
    port = free_port()  # the gateway's: RetrainingService calls every service through it
    servers["retraining"].settings["retraining"] = {
        "endpoint": f"127.0.0.1:{port}",
        "poll_seconds": 0.5,
    }
    try:
        for server in servers.values():
            server.start(timeout=300)
        front = LocalServer(data, {"logging": {"level": "INFO"}}, services=["openai"])
        upstreams = {key: server.target for key, server in servers.items()}
        upstreams["openai"] = f"127.0.0.1:{front.openai_port}"
        http_port = free_port()
        with running_gateway(
            tmp_path / "nginx", upstreams, http_port=http_port, port=port
        ) as gateway:
            front.settings["openai"].update(
                target=gateway, base_model=tour.QUICK.model, request_timeout_seconds=120
            )
            servers["openai"] = front.start(timeout=120)
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "tunefleet.demo",
                    "--quick",
                    "--target",
                    gateway,
                    "--metrics-url",
                    servers["inference"].metrics_url,
                ],
                capture_output=True,
                text=True,
                timeout=1200,
                check=False,
            )
            assert result.returncode == 0, result.stdout + result.stderr
            check_tour(result.stdout)
            evaluate_through(gateway)
            chat_through(f"127.0.0.1:{front.openai_port}", f"127.0.0.1:{http_port}")
    finally:
        for server in servers.values():
            server.stop()

    for key, url in database_urls.items():
        used = {table for table, count in rows_by_table(url).items() if count}
        assert used - SHARED_TABLES <= OWN_TABLES[key], f"{key}'s database: {used}"
        assert OWN_TABLES[key] & used, f"{key} stored nothing in its own database"
