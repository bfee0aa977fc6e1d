"""Fuzzing every RPC of the four services from its descriptor, against a real `tunefleet serve`
process (all four services, the embedded shape) on SQLite, and on PostgreSQL: random bytes,
messages with hostile field values (strategies.py), broken and cut client streams, and messages
over the size limit. Whatever comes in, the answer is never INTERNAL or UNKNOWN, the server logs
no ERROR, and it keeps running.

`TUNEFLEET_FUZZ_EXAMPLES` sets the examples per method (default 60, which is over 2,000 requests
on SQLite; PostgreSQL runs a quarter of them); a long run by hand:

    TUNEFLEET_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/fuzz -p no:cacheprovider

Every request that ever failed is kept in corpus/ (`{Service}.{Method}-{sha}.bin`, the
serialized request or, for a client stream, its messages) and replayed first by every run."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.strategies import messages
from tests.inference.conftest import Served
from tests.inference.conftest import served as served  # the fixture
from tests.storage.conftest import postgres_server as postgres_server  # the fixture

DEFAULT_EXAMPLES = 60
EXAMPLES = int(os.environ.get("TUNEFLEET_FUZZ_EXAMPLES", DEFAULT_EXAMPLES))
CORPUS = Path(__file__).with_name("corpus")
FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
MAX_MESSAGE = 256 * 1024  # the fuzzed server's message limit: oversized requests stay cheap


def service_methods() -> list[MethodDescriptor]:
    from tunefleet.v1 import (
        adapter_service_pb2,
        dataset_service_pb2,
        evaluation_service_pb2,
        inference_service_pb2,
        retraining_service_pb2,
        training_service_pb2,
    )

    modules = (
        dataset_service_pb2,
        training_service_pb2,
        adapter_service_pb2,
        inference_service_pb2,
        evaluation_service_pb2,
        retraining_service_pb2,
    )
    return [
        method
        for module in modules
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


METHODS = service_methods()


def method_id(method: MethodDescriptor) -> str:
    return f"{method.containing_service.name}.{method.name}"


def _identity(data: bytes) -> bytes:
    return data


@dataclass
class Target:
    """A running server, the names of resources on it, and what it answered."""

    server: Any  # LocalServer
    known: list[str]
    channel: grpc.Channel = field(init=False)
    codes: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        options = [("grpc.max_send_message_length", 4 * MAX_MESSAGE)]
        self.channel = grpc.insecure_channel(self.server.target, options=options)

    def call(self, method: MethodDescriptor, payloads: list[bytes]) -> grpc.StatusCode:
        """Send `payloads` (one for a unary request) and read the answer; its status."""
        path = f"/{method.containing_service.full_name}/{method.name}"
        kinds = (method.client_streaming, method.server_streaming)
        code = grpc.StatusCode.OK
        try:
            if kinds == (False, False):
                self.channel.unary_unary(path, _identity, _identity)(payloads[0], timeout=20)
            elif kinds == (True, False):
                self.channel.stream_unary(path, _identity, _identity)(iter(payloads), timeout=20)
            else:
                # A stream may never end (watches): read a little of it, then hang up.
                stream = self.channel.unary_stream(path, _identity, _identity)(
                    payloads[0], timeout=1
                )
                for _, _piece in zip(range(5), stream, strict=False):
                    pass
                stream.cancel()
        except grpc.RpcError as error:
            code = error.code()
            if code == grpc.StatusCode.CANCELLED:  # our own hang-up
                code = grpc.StatusCode.OK
        self.codes[code.name] += 1
        return code

    def errors_logged(self, since: int) -> list[str]:
        """ERROR records the server logged after byte `since` of its log."""
        with self.server.log.open("rb") as log:
            log.seek(since)
            lines = log.read().decode(errors="replace").splitlines()
        errors = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # not the server's own logging (a library's print)
            if record.get("level") in ("ERROR", "CRITICAL"):
                errors.append(line)
        return errors


def requests(method: MethodDescriptor, known: list[str]) -> st.SearchStrategy[list[bytes]]:
    """What one call sends: a fuzzed message, random bytes or an oversized message (a list of
    them, cut anywhere, for a client stream)."""
    one = st.one_of(
        messages(method.input_type, known).map(lambda m: m.SerializeToString()),
        st.binary(max_size=200),
        st.sampled_from(["oversized", "truncated"]).map(odd_message),
    )
    if method.client_streaming:
        return st.lists(one, max_size=5)
    return one.map(lambda payload: [payload])


def odd_message(kind: str) -> bytes:
    if kind == "oversized":  # past the server's message limit
        return b"\xff" * (MAX_MESSAGE + 1)
    return b"\x0a\xff\xff\xff\xff\x0f"  # a length prefix past the end


def corpus_file(method: MethodDescriptor, payloads: list[bytes]) -> Path:
    blob = json.dumps([p.hex() for p in payloads]).encode()
    return CORPUS / f"{method_id(method)}-{hashlib.sha256(blob).hexdigest()[:16]}.json"


def check(target: Target, method: MethodDescriptor, payloads: list[bytes]) -> None:
    code = target.call(method, payloads)
    if code in FAULTS:
        CORPUS.mkdir(exist_ok=True)
        corpus_file(method, payloads).write_text(json.dumps([p.hex() for p in payloads]) + "\n")
    assert code not in FAULTS, f"{method_id(method)} answered {code.name}"
    assert target.server.process.poll() is None, "the server died"


def fuzz(target: Target, method: MethodDescriptor, examples: int) -> None:
    since = target.server.log.stat().st_size
    for path in sorted(CORPUS.glob(f"{method_id(method)}-*.json")):  # past findings first
        check(target, method, [bytes.fromhex(p) for p in json.loads(path.read_text())])

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(payloads=requests(method, target.known))
    def one(payloads: list[bytes]) -> None:
        check(target, method, payloads)

    one()
    assert target.errors_logged(since) == []


def serve(data_dir: Path, model: Served, database_url: str = "") -> Iterator[Target]:
    """Every service in one `tunefleet serve`, with a dataset, an adapter, a version, an alias,
    a retraining policy and a run on it."""
    from tunefleet.client import Client
    from tunefleet.demo.server import LocalServer

    settings: dict[str, Any] = {
        "models": {"tiny": str(model.model)},
        "inference": {"base_model": "tiny", "max_tokens_limit": 16},
        "server": {"max_message_bytes": MAX_MESSAGE, "shutdown_grace_seconds": 2},
        "logging": {"level": "INFO", "json_lines": True},
    }
    if database_url:
        settings["storage"] = {"database_url": database_url}
    server = LocalServer(data_dir, settings)
    server.start(300)
    try:
        records = data_dir / "records.jsonl"
        records.write_text(
            "".join(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"What is {i} + {i}?"},
                            {"role": "assistant", "content": str(2 * i)},
                        ]
                    }
                )
                + "\n"
                for i in range(30)
            )
        )
        with Client(server.target) as client:
            dataset = client.datasets.upload(str(records), display_name="fuzz")
            client.adapters.create("fuzz", base_model="tiny")
            version = client.adapters.upload_version("fuzz", model.adapters["alpha"])
            client.adapters.set_alias("fuzz", "prod", version.name)
            client.retraining.create_policy(
                {
                    "adapter": "adapters/fuzz",
                    "evaluation": {
                        "dataset": dataset.name,
                        "graders": [{"type": "exact_match"}],
                        "gate": {"metric": "exact_match"},
                    },
                }
            )
            run = client.retraining.start("fuzz")
        known = [
            dataset.name,
            dataset.name.removeprefix("datasets/"),
            "adapters/fuzz",
            version.name,
            "adapters/fuzz@prod",
            "adapters/fuzz/aliases/prod",
            "retrainingPolicies/fuzz",
            run.name,
            "prod",
            "fuzz",
            "tiny",
        ]
        target = Target(server, known)
        yield target
        assert server.process is not None and server.process.poll() is None
        print("answers:", dict(target.codes))
        target.channel.close()
    finally:
        assert server.stop() == 0


@pytest.fixture(scope="module")
def on_sqlite(tmp_path_factory: pytest.TempPathFactory, served: Served) -> Iterator[Target]:
    yield from serve(tmp_path_factory.mktemp("fuzz-sqlite"), served)


@pytest.fixture(scope="module")
def on_postgres(
    tmp_path_factory: pytest.TempPathFactory,
    served: Served,
    postgres_server: str,
) -> Iterator[Target]:
    import psycopg

    plain = postgres_server.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(f"{plain}/postgres", autocommit=True) as connection:
        connection.execute('CREATE DATABASE "fuzz"')
    yield from serve(tmp_path_factory.mktemp("fuzz-postgres"), served, f"{postgres_server}/fuzz")


def test_the_fuzzing_covers_every_rpc_and_enough_requests() -> None:
    assert len(METHODS) == 62
    assert len(METHODS) * DEFAULT_EXAMPLES >= 2000
    assert len(METHODS) * max(DEFAULT_EXAMPLES // 4, 14) >= 500


@pytest.mark.parametrize("method", METHODS, ids=method_id)
def test_fuzzed_requests_on_sqlite(on_sqlite: Target, method: MethodDescriptor) -> None:
    fuzz(on_sqlite, method, EXAMPLES)


@pytest.mark.postgres
@pytest.mark.parametrize("method", METHODS, ids=method_id)
def test_fuzzed_requests_on_postgres(on_postgres: Target, method: MethodDescriptor) -> None:
    fuzz(on_postgres, method, max(EXAMPLES // 4, 14))
