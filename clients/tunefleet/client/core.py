"""One core for the sync and the async client.

Every SDK method is written once, as a generator that describes its gRPC calls instead of making
them ("sans-I/O"): it yields a step (`Call`, `Open`, `Read`, `Sleep`) and receives the step's
result, or has the step's `TunefleetError` thrown into it. Methods that produce many items
(pagers, event and token streams) also yield `Emit(item)`.

A transport drives such a generator: `SyncTransport` with blocking gRPC calls, `AsyncTransport`
with `grpc.aio`. The `operation` and `stream` decorators turn a generator method into a blocking
method on `Resource[Sync]` and into a coroutine (or async iterator) method on `Resource[Async]`,
and tell the type checker so: `client.datasets.get(...)` is a `Dataset`, and
`await aclient.datasets.get(...)` is one too.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Concatenate, Generic, ParamSpec, Protocol, TypeAlias, TypeVar, overload

from google.protobuf.message import Message

P = ParamSpec("P")
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Sync:
    """Mode marker: methods block and return their results."""


class Async:
    """Mode marker: methods return coroutines and async iterators."""


M = TypeVar("M", Sync, Async)


@dataclass(frozen=True)
class Call:
    """A unary call (or a client-streaming one when `request` is an iterable of messages).

    Idempotent calls are retried with backoff when the server is UNAVAILABLE."""

    stub: type
    method: str
    request: Message | Iterable[Message]
    idempotent: bool = False


@dataclass(frozen=True)
class Open:
    """Start a server-streaming call; the result is a handle for `Read`. No deadline by default:
    streams (events, generation) last as long as their subject."""

    stub: type
    method: str
    request: Message
    timeout: float | None = None


@dataclass(frozen=True)
class Read:
    """The next message of an opened stream, or None when it has ended."""

    stream: Any


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Emit(Generic[T_co]):
    """An item of a `stream` operation's output."""

    value: T_co


Step: TypeAlias = Call | Open | Read | Sleep
# A method producing one result, and one producing a sequence of items.
Program: TypeAlias = Generator[Step, Any, T]
Feed: TypeAlias = Generator[Step | Emit[T], Any, None]


class Transport(Protocol):
    def run(self, program: Program[T]) -> Any: ...

    def iterate(self, feed: Feed[T]) -> Any: ...


class Resource(Generic[M]):
    """A group of SDK methods (one per service) bound to a transport."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport


def _bind(function: Callable[..., Any], obj: Resource[Any], perform: str) -> Any:
    """`function` bound to `obj`, its generator run by the transport's `perform` method."""
    run = getattr(obj._transport, perform)

    @functools.wraps(function)
    def bound(*args: Any, **kwargs: Any) -> Any:
        return run(function(obj, *args, **kwargs))

    return bound


class operation(Generic[P, T]):
    """Decorate a generator method of a `Resource` that returns one result."""

    def __init__(self, function: Callable[Concatenate[Any, P], Program[T]]) -> None:
        self.function = function
        functools.update_wrapper(self, function)  # type: ignore[arg-type]

    @overload
    def __get__(self, obj: None, owner: type) -> operation[P, T]: ...
    @overload
    def __get__(self, obj: Resource[Sync], owner: type) -> Callable[P, T]: ...
    @overload
    def __get__(self, obj: Resource[Async], owner: type) -> Callable[P, Coroutine[Any, Any, T]]: ...
    def __get__(self, obj: Resource[Any] | None, owner: type) -> Any:
        return self if obj is None else _bind(self.function, obj, "run")


class stream(Generic[P, T]):
    """Decorate a generator method of a `Resource` that emits items: an iterator in the sync
    client, an async iterator in the async one."""

    def __init__(self, function: Callable[Concatenate[Any, P], Feed[T]]) -> None:
        self.function = function
        functools.update_wrapper(self, function)  # type: ignore[arg-type]

    @overload
    def __get__(self, obj: None, owner: type) -> stream[P, T]: ...
    @overload
    def __get__(self, obj: Resource[Sync], owner: type) -> Callable[P, Iterator[T]]: ...
    @overload
    def __get__(self, obj: Resource[Async], owner: type) -> Callable[P, AsyncIterator[T]]: ...
    def __get__(self, obj: Resource[Any] | None, owner: type) -> Any:
        return self if obj is None else _bind(self.function, obj, "iterate")


def pages(stub: type, method: str, request: Any, field: str) -> Feed[Any]:
    """Every item of a List RPC, following `next_page_token` (pages are fetched lazily)."""
    while True:
        response = yield Call(stub, method, request, idempotent=True)
        for item in getattr(response, field):
            yield Emit(item)
        if not response.next_page_token:
            return
        request.page_token = response.next_page_token


def watching(
    stub: type,
    method: str,
    request: Any,
    timeout: float | None,
    seen: Callable[[Any], object] | None = None,
) -> Feed[Any]:
    """A streaming RPC's messages until it ends, opened again with `request` after a dropped
    stream (a Watch starts with the resource as it is then; a feed that resumes after the last
    message it saw moves its cursor in `request` with `seen`, called for each message);
    `timeout` bounds the whole iteration."""
    from tunefleet.client.errors import Unavailable

    deadline = None if timeout is None else time.monotonic() + timeout
    attempt = 0
    while True:
        left = None if deadline is None else max(0.001, deadline - time.monotonic())
        updates = yield Open(stub, method, request, timeout=left)
        try:
            while (update := (yield Read(updates))) is not None:
                attempt = 0
                if seen is not None:
                    seen(update)
                yield Emit(update)
            return
        except Unavailable:
            if attempt >= 8:
                raise
        yield Sleep(min(5.0, 0.2 * (1 << attempt)))
        attempt += 1


def each(feed: Feed[T], callback: Callable[[T], object]) -> Program[None]:
    """Run `feed` inside another method, handing each item it emits to `callback`."""
    send: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = feed.throw(error) if error else feed.send(send)
        except StopIteration:
            return
        send, error = None, None
        if isinstance(step, Emit):
            callback(step.value)
            continue
        try:
            send = yield step
        except Exception as failure:
            error = failure
