"""The OpenAI front over DatasetService, AdapterService and InferenceService on one server, serving
the tiny chat model of the inference tests; clients are the unmodified `openai` package."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from tests.inference.conftest import Served, Serving, served  # noqa: F401 (a fixture)
from tunefleet.app.services import inference_service, registration
from tunefleet.openai_front.server import OpenAIFront
from tunefleet.runtime.context import ServiceContext, open_storage
from tunefleet.runtime.metrics import ServerMetrics
from tunefleet.runtime.server import TunefleetServer
from tunefleet.runtime.settings import load_settings


@dataclass
class Front:
    serving: Serving
    front: OpenAIFront
    metrics: ServerMetrics

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.front.port}/v1"

    def client(self, api_key: str = "unused", **options: Any) -> Any:
        """An `openai.AsyncOpenAI` (typed Any: the tests read optional fields they know set)."""
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, **options)


@contextlib.asynccontextmanager
async def start_front(served: Served, tmp_path: Path, **settings: Any) -> AsyncIterator[Front]:  # noqa: F811
    """DatasetService, AdapterService, InferenceService, EvaluationService, RetrainingService and
    the front in one process, as `tunefleet serve` runs them (no training:
    tests/openai_front/test_fine_tuning.py has it);
    `settings` are merged into the settings (`server` to turn authentication on)."""
    server_settings = {"port": 0, "metrics_port": 0, "shutdown_grace_seconds": 0}
    server_settings.update(settings.pop("server", {}))
    options = load_settings(
        data_dir=tmp_path / "data",
        models={"tiny": str(served.model)},
        server=server_settings,
        inference={"base_model": "tiny", "max_loaded_adapters": 3, **settings.pop("inference", {})},
        openai={"port": 0},
        **settings,
    )
    storage = open_storage(options)
    metrics = ServerMetrics()
    context = ServiceContext(options, storage, metrics.registry)
    attached = OpenAIFront(options.openai, "tiny", metrics.registry)
    server = TunefleetServer(
        options.server,
        [
            registration("datasets", context),
            registration("adapters", context),
            inference_service(context),
            registration("evaluation", context),
            registration("retraining", context),
        ],
        metrics,
        [attached],
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield Front(Serving(server, storage, metrics.registry, channel), attached, metrics)
    finally:
        await server.stop(0)
        storage.close()


@pytest.fixture
async def front(served: Served, tmp_path: Path) -> AsyncIterator[Front]:  # noqa: F811
    async with start_front(served, tmp_path) as started:
        yield started
