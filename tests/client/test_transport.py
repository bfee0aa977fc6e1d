"""Deadlines, retries and credentials of both transports, against a small real gRPC server whose
answers the tests script (UNAVAILABLE a few times, slow answers)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from tests.client.conftest import connect
from tunefleet import client as sdk_errors
from tunefleet.client import Options
from tunefleet.v1 import (
    dataset_pb2,
    dataset_service_pb2_grpc,
    inference_service_pb2,
    inference_service_pb2_grpc,
    training_job_pb2,
    training_service_pb2_grpc,
)


@dataclass
class Script:
    unavailable: int = 0  # answer UNAVAILABLE this many times first
    delay: float = 0.0
    calls: list[str] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    after: list[int] = field(default_factory=list)  # each event stream's after_sequence

    def answer(self, method: str, context: grpc.ServicerContext) -> None:
        self.calls.append(method)
        self.metadata.append(dict(context.invocation_metadata()))  # type: ignore[arg-type]
        if self.unavailable > 0:
            self.unavailable -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        time.sleep(self.delay)


class Datasets(dataset_service_pb2_grpc.DatasetServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    def GetDataset(self, request: Any, context: grpc.ServicerContext) -> dataset_pb2.Dataset:
        self.script.answer("GetDataset", context)
        return dataset_pb2.Dataset(name=request.name)

    def UploadDataset(self, requests: Any, context: grpc.ServicerContext) -> dataset_pb2.Dataset:
        self.script.answer("UploadDataset", context)
        size = sum(len(request.chunk) for request in requests)
        return dataset_pb2.Dataset(name="datasets/uploaded", source_size_bytes=size)


class Inference(inference_service_pb2_grpc.InferenceServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    def Generate(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.script.answer("Generate", context)
        return inference_service_pb2.GenerateResponse(text="hi")


class Training(training_service_pb2_grpc.TrainingServiceServicer):
    """Events 1 to 5 of a job; the first stream breaks (UNAVAILABLE) after two of them."""

    def __init__(self, script: Script) -> None:
        self.script = script

    def StreamTrainingJobEvents(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.script.after.append(request.after_sequence)
        for sequence in range(request.after_sequence + 1, 6):
            if len(self.script.after) == 1 and sequence == 3:
                context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
            yield training_job_pb2.TrainingEvent(sequence=sequence)


@pytest.fixture
def scripted() -> Iterator[tuple[str, Script]]:
    script = Script()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    dataset_service_pb2_grpc.add_DatasetServiceServicer_to_server(
        Datasets(script),  # type: ignore[abstract]  # only the methods the tests call
        server,
    )
    inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(
        Inference(script),  # type: ignore[abstract]
        server,
    )
    training_service_pb2_grpc.add_TrainingServiceServicer_to_server(
        Training(script),  # type: ignore[abstract]
        server,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", script
    server.stop(0)


FAST = Options(timeout=5, retries=3, backoff=0.01, max_backoff=0.05)


def test_idempotent_calls_are_retried_while_unavailable(
    mode: str, scripted: tuple[str, Script]
) -> None:
    target, script = scripted
    script.unavailable = 2
    client = connect(mode, target, options=FAST)
    assert client.datasets.get("d1").name == "datasets/d1"
    assert script.calls == ["GetDataset"] * 3
    client.close()


def test_a_dropped_event_stream_resumes_after_the_last_event_seen(
    mode: str, scripted: tuple[str, Script]
) -> None:
    target, script = scripted
    client = connect(mode, target, options=FAST)
    events = list(client.training_jobs.events("j1"))
    assert [event.sequence for event in events] == [1, 2, 3, 4, 5]  # none lost or repeated
    assert script.after == [0, 2]
    client.close()


def test_retries_give_up_with_unavailable(mode: str, scripted: tuple[str, Script]) -> None:
    target, script = scripted
    script.unavailable = 10
    client = connect(mode, target, options=FAST)
    with pytest.raises(sdk_errors.Unavailable) as error:
        client.datasets.get("d1")
    assert error.value.message == "restarting"
    assert len(script.calls) == 1 + FAST.retries
    client.close()


def test_calls_that_are_not_idempotent_are_not_retried(
    mode: str, scripted: tuple[str, Script]
) -> None:
    target, script = scripted
    script.unavailable = 1
    client = connect(mode, target, options=FAST)
    with pytest.raises(sdk_errors.Unavailable):
        client.inference.generate("hello")
    assert script.calls == ["Generate"]
    client.close()


def test_a_slow_answer_exceeds_the_deadline(mode: str, scripted: tuple[str, Script]) -> None:
    target, script = scripted
    script.delay = 1.0
    client = connect(mode, target, options=Options(timeout=0.2))
    started = time.monotonic()
    with pytest.raises(sdk_errors.DeadlineExceeded):
        client.datasets.get("d1")
    assert time.monotonic() - started < 0.9
    client.close()


class SlowFile:
    """A file whose bytes arrive slowly, as from a big file on a slow disk or link."""

    def __init__(self, pieces: int, pause: float) -> None:
        self.pieces, self.pause = pieces, pause

    def read(self, size: int) -> bytes:
        if not self.pieces:
            return b""
        self.pieces -= 1
        time.sleep(self.pause)
        return b"x" * 1000


def test_an_upload_has_no_deadline_unless_asked(mode: str, scripted: tuple[str, Script]) -> None:
    """An upload lasts as long as its bytes take, past the unary deadline; `stream_timeout`
    (the CLI's --timeout) bounds it when asked."""
    target, _ = scripted
    client = connect(mode, target, options=Options(timeout=0.2))
    dataset = client.datasets.upload(SlowFile(pieces=5, pause=0.15))
    assert dataset.source_size_bytes == 5000  # 0.75 s of sending: past the 0.2 s deadline
    client.close()
    client = connect(mode, target, options=Options(stream_timeout=0.3))
    with pytest.raises(sdk_errors.DeadlineExceeded):
        client.datasets.upload(SlowFile(pieces=10, pause=0.15))
    client.close()


def test_the_token_is_sent_as_a_bearer_header(mode: str, scripted: tuple[str, Script]) -> None:
    target, script = scripted
    client = connect(mode, target, token="s3cret")
    client.datasets.get("d1")
    assert script.metadata[-1]["authorization"] == "Bearer s3cret"
    client.close()


def test_a_target_is_required() -> None:
    from tunefleet.client import Client

    with pytest.raises(sdk_errors.InvalidArgument):
        Client("")
