"""A real embedded server (`tunefleet serve` with the tiny chat model as base model and the local
trainer) and the SDK against it, sync and async through one test body."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.conftest import chat_model
from tests.training.conftest import colour_records
from tunefleet.client import AsyncClient, Client
from tunefleet.demo.server import LocalServer

__all__ = ["chat_model"]


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, chat_model: Path) -> Iterator[LocalServer]:
    server = LocalServer(
        tmp_path_factory.mktemp("platform"),
        {
            "models": {"colours": str(chat_model)},
            "logging": {"level": "WARNING"},
            "training": {"heartbeat_seconds": 1, "poll_seconds": 0.2},
            "inference": {"base_model": "colours"},
        },
    )
    with server:
        yield server


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The colour task as a JSON lines file."""
    path = tmp_path_factory.mktemp("colours") / "colours.jsonl"
    path.write_bytes(colour_records())
    return path


UPLOAD_OPTIONS = {
    "removeExactDuplicates": False,
    "removeNearDuplicates": False,
    "validationFraction": 0.2,
}


def job_spec(dataset: str, adapter: str, **hyperparameters: Any) -> dict[str, Any]:
    """A few steps of LoRA on the tiny chat model, in the JSON form the SDK accepts."""
    return {
        "baseModel": "colours",
        "method": "TRAINING_METHOD_LORA",
        "trainDataset": dataset,
        "adapter": adapter,
        "lora": {"rank": 8, "dropout": 0.0, "targetModules": ["q_proj", "v_proj", "lm_head"]},
        "hyperparameters": {
            "learningRate": 1e-2,
            "maxSteps": 4,
            "microBatchSize": 8,
            "maxSequenceLength": 64,
            "evalEverySteps": 2,
            **hyperparameters,
        },
    }


class Blocking:
    """An AsyncClient driven from synchronous test code: its coroutines run to completion and its
    async iterators are iterated on an event loop thread of its own. With it, one test body
    checks both clients."""

    def __init__(self, target: str, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def make() -> AsyncClient:
            return AsyncClient(target, **kwargs)

        self.client = self.run(make())

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=600)

    def iterate(self, iterator: AsyncIterator[Any]) -> Iterator[Any]:
        while True:
            try:
                yield self.run(iterator.__anext__())  # type: ignore[arg-type]
            except StopAsyncIteration:
                return

    def __getattr__(self, name: str) -> Any:
        return _Group(self, getattr(self.client, name))

    def close(self) -> None:
        self.run(self.client.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class _Group:
    def __init__(self, owner: Blocking, group: Any) -> None:
        self.owner, self.group = owner, group

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.group, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            if inspect.iscoroutine(result):
                return self.owner.run(result)
            if hasattr(result, "__anext__"):
                return self.owner.iterate(result)
            return result

        return call


def connect(mode: str, target: str, **kwargs: Any) -> Any:
    """A sync Client, or an AsyncClient behind `Blocking`; `kwargs` go to the client."""
    return Client(target, **kwargs) if mode == "sync" else Blocking(target, **kwargs)


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def sdk(mode: str, platform: LocalServer) -> Iterator[Any]:
    """The client of the parametrised mode, connected to the platform (typed as Client)."""
    client = connect(mode, platform.target)
    yield client
    client.close()
