"""The tunefleet Python SDK.

Example::

    from tunefleet.client import Client

    with Client("localhost:50051") as client:
        dataset = client.datasets.upload("orders.jsonl")
        job = client.training_jobs.create({...})
        job = client.training_jobs.wait(job.name)
        print(client.inference.generate("Hi", adapter="adapters/orders@prod").text)

`AsyncClient` has the same methods as coroutines and async iterators.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Generic

import grpc

from tunefleet.client.adapters import Adapters
from tunefleet.client.core import Async, M, Sync
from tunefleet.client.datasets import Datasets
from tunefleet.client.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TunefleetError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from tunefleet.client.evaluations import Evaluations
from tunefleet.client.inference import Inference
from tunefleet.client.retraining import Retraining
from tunefleet.client.training import TrainingJobs
from tunefleet.client.transport import AsyncTransport, Options, SyncTransport

__all__ = [
    "TLS",
    "Aborted",
    "AlreadyExists",
    "AsyncClient",
    "Cancelled",
    "Client",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "Options",
    "PermissionDenied",
    "ResourceExhausted",
    "TunefleetError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class TLS:
    """TLS for the connection: `ca_file` to trust a private CA (system roots otherwise), and
    `cert_file` + `key_file` for a client certificate (mutual TLS)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(
            read(self.ca_file), read(self.key_file), read(self.cert_file)
        )


class _Client(Generic[M]):
    datasets: Datasets[M]
    training_jobs: TrainingJobs[M]
    adapters: Adapters[M]
    inference: Inference[M]
    evaluations: Evaluations[M]
    retraining: Retraining[M]

    def _attach(self, transport: SyncTransport | AsyncTransport) -> None:
        self.datasets = Datasets(transport)
        self.training_jobs = TrainingJobs(transport)
        self.adapters = Adapters(transport)
        self.inference = Inference(transport)
        self.evaluations = Evaluations(transport)
        self.retraining = Retraining(transport)


def _connect(
    channels: Any, target: str, token: str | None, tls: bool | TLS
) -> tuple[Any, tuple[tuple[str, str], ...]]:
    """A channel made by `channels` (the `grpc` or the `grpc.aio` module), and the metadata that
    every call sends."""
    if not target:
        raise InvalidArgument("target: give the server's address, such as localhost:50051")
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    if tls:
        credentials = (tls if isinstance(tls, TLS) else TLS()).credentials()
        channel = channels.secure_channel(target, credentials, options)
    else:
        channel = channels.insecure_channel(target, options)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return channel, metadata


class Client(_Client[Sync]):
    """A blocking client of a tunefleet deployment (all services behind one address, or a
    gateway routing them).

    Args:
        target: `host:port` of the server.
        token: a bearer token, when the server requires one.
        tls: True for TLS with the system's roots, a `TLS` for a private CA or mutual TLS.
        options: deadlines and retries (`Options()` by default: 30 s per unary call, five
            retries with backoff on UNAVAILABLE for idempotent calls).

    Example::

        with Client("localhost:50051", token="...") as client:
            for dataset in client.datasets.list():
                print(dataset.name)
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool | TLS = False,
        options: Options | None = None,
    ) -> None:
        self.channel: grpc.Channel
        self.channel, metadata = _connect(grpc, target, token, tls)
        self._attach(SyncTransport(self.channel, metadata, options or Options()))

    def close(self) -> None:
        """Close the connection."""
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClient(_Client[Async]):
    """The asyncio client: the same methods as `Client`, as coroutines and async iterators.

    Example::

        async with AsyncClient("localhost:50051") as client:
            job = await client.training_jobs.get("trainingJobs/7d1e...")
            async for event in client.training_jobs.events(job.name):
                print(event)
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool | TLS = False,
        options: Options | None = None,
    ) -> None:
        self.channel: grpc.aio.Channel
        self.channel, metadata = _connect(grpc.aio, target, token, tls)
        self.options = options or Options()
        self._attach(AsyncTransport(self.channel, metadata, self.options))

    def with_token(self, token: str | None) -> AsyncClient:
        """A client on this one's connection that calls with `token` instead (for a server that
        calls on its callers' behalf, as the OpenAI front does); it shares the connection,
        which only the first closes.

        Example::

            reply = await client.with_token(caller_token).inference.generate("Hi")
        """
        other = object.__new__(AsyncClient)
        other.channel, other.options = self.channel, self.options
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        other._attach(AsyncTransport(self.channel, metadata, self.options))
        return other

    async def close(self) -> None:
        """Close the connection."""
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
