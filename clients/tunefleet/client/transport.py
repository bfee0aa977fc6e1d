"""The two transports that drive the SDK's generator methods (see `core`): blocking gRPC and
`grpc.aio`. They own what the methods leave out: stubs, deadlines, credentials, retries and the
translation of gRPC errors into `TunefleetError`."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message

from tunefleet.client.core import Call, Emit, Feed, Open, Program, Read, Sleep, Step, T
from tunefleet.client.errors import TunefleetError, Unavailable, from_rpc_error


@dataclass(frozen=True)
class Options:
    """How calls are made.

    Attributes:
        timeout: deadline in seconds of each unary call; None: no deadline.
        stream_timeout: deadline in seconds of each client stream (an upload); None, the
            default: none, an upload takes as long as its bytes take. Server streams (events,
            generation) have none either, unless the method takes one.
        retries: how often an idempotent call is retried while the server is UNAVAILABLE.
        backoff: the first wait between retries, doubled each time (with jitter) up to
            `max_backoff`.
    """

    timeout: float | None = 30.0
    stream_timeout: float | None = None
    retries: int = 5
    backoff: float = 0.2
    max_backoff: float = 5.0

    def deadline(self, call: Call) -> float | None:
        """The deadline of a call: a unary one's, or a client stream's."""
        return self.timeout if isinstance(call.request, Message) else self.stream_timeout

    def delay(self, attempt: int) -> float:
        jitter: float = random.uniform(0.5, 1.0)  # noqa: S311 - not a secret
        return min(self.max_backoff, self.backoff * (1 << attempt)) * jitter


class _Base:
    def __init__(
        self, channel: Any, metadata: tuple[tuple[str, str], ...], options: Options
    ) -> None:
        self.channel, self.metadata, self.options = channel, metadata, options
        self._stubs: dict[type, Any] = {}

    def method(self, stub: type, name: str) -> Any:
        if stub not in self._stubs:
            self._stubs[stub] = stub(self.channel)
        return getattr(self._stubs[stub], name)

    def retrying(self, step: Call, error: TunefleetError, attempt: int) -> bool:
        return step.idempotent and isinstance(error, Unavailable) and attempt < self.options.retries


class SyncTransport(_Base):
    """Runs SDK methods with blocking calls on a `grpc.Channel`."""

    def run(self, program: Program[T]) -> T:
        driver = self._drive(program)
        try:
            item = next(driver)
        except StopIteration as done:
            result: T = done.value
            return result
        driver.close()
        raise TypeError(f"an operation emitted {item!r}; decorate it with @stream")

    def iterate(self, feed: Feed[T]) -> Iterator[T]:
        yield from self._drive(feed)

    def _drive(self, program: Any) -> Any:
        streams: list[Any] = []
        send: Any = None
        error: TunefleetError | None = None
        try:
            while True:
                try:
                    step = program.throw(error) if error else program.send(send)
                except StopIteration as done:
                    return done.value
                send, error = None, None
                if isinstance(step, Emit):
                    yield step.value
                    continue
                try:
                    send = self._perform(step, streams)
                except TunefleetError as failure:
                    error = failure
        finally:
            for call in streams:
                call.cancel()
            program.close()

    def _perform(self, step: Step, streams: list[Any]) -> Any:
        if isinstance(step, Sleep):
            time.sleep(step.seconds)
            return None
        try:
            if isinstance(step, Read):
                return next(step.stream, None)
            if isinstance(step, Open):
                call = self.method(step.stub, step.method)(
                    step.request, timeout=step.timeout, metadata=self.metadata
                )
                streams.append(call)
                return call
        except grpc.RpcError as failure:
            raise from_rpc_error(failure) from None
        attempt = 0
        while True:
            try:
                return self.method(step.stub, step.method)(
                    step.request, timeout=self.options.deadline(step), metadata=self.metadata
                )
            except grpc.RpcError as failure:
                error = from_rpc_error(failure)
                if not self.retrying(step, error, attempt):
                    raise error from None
            time.sleep(self.options.delay(attempt))
            attempt += 1


class AsyncTransport(_Base):
    """Runs SDK methods as coroutines on a `grpc.aio.Channel`."""

    async def run(self, program: Program[T]) -> T:
        result: list[T] = []
        async for item in self._drive(program, result):
            raise TypeError(f"an operation emitted {item!r}; decorate it with @stream")
        return result[0]

    def iterate(self, feed: Feed[T]) -> AsyncIterator[T]:
        return self._drive(feed, [])

    async def _drive(self, program: Any, result: list[Any]) -> AsyncIterator[Any]:
        streams: list[Any] = []
        send: Any = None
        error: TunefleetError | None = None
        try:
            while True:
                try:
                    step = program.throw(error) if error else program.send(send)
                except StopIteration as done:
                    result.append(done.value)
                    return
                send, error = None, None
                if isinstance(step, Emit):
                    yield step.value
                    continue
                try:
                    send = await self._perform(step, streams)
                except TunefleetError as failure:
                    error = failure
        finally:
            for call in streams:
                call.cancel()
            program.close()

    async def _perform(self, step: Step, streams: list[Any]) -> Any:
        if isinstance(step, Sleep):
            await asyncio.sleep(step.seconds)
            return None
        try:
            if isinstance(step, Read):
                message = await step.stream.read()
                return None if message is grpc.aio.EOF else message
            if isinstance(step, Open):
                call = self.method(step.stub, step.method)(
                    step.request, timeout=step.timeout, metadata=self.metadata
                )
                streams.append(call)
                return call
        except grpc.RpcError as failure:
            raise from_rpc_error(failure) from None
        attempt = 0
        while True:
            try:
                return await self.method(step.stub, step.method)(
                    step.request, timeout=self.options.deadline(step), metadata=self.metadata
                )
            except grpc.RpcError as failure:
                error = from_rpc_error(failure)
                if not self.retrying(step, error, attempt):
                    raise error from None
            await asyncio.sleep(self.options.delay(attempt))
            attempt += 1
