"""Server interceptors shared by every service, and the wrapper they are built on.

Each interceptor runs an async context manager *around* a call: code before `yield` runs before
the handler, code after it (or in `except`/`finally`) runs when the handler returns, raises or is
cancelled. For streaming responses the context spans the whole stream. The server stacks them in
this order, outermost first: request context (logging), metrics, errors, draining, upload limit,
auth, request decoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf.message import Message
from grpc.aio import AbortError

from tunefleet.core.errors import (
    InvalidArgument,
    ResourceExhausted,
    TunefleetError,
    Unavailable,
    environment_error,
    internal_status,
)
from tunefleet.runtime import logs
from tunefleet.runtime.fields import check_request

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"


@dataclass(frozen=True)
class RpcCall:
    """What an interceptor knows about the call it wraps."""

    full_method: str  # "/tunefleet.v1.DatasetService/GetDataset"
    metadata: dict[str, str]
    context: grpc.aio.ServicerContext[Any, Any]

    @property
    def service(self) -> str:
        return self.full_method.lstrip("/").partition("/")[0]

    @property
    def method(self) -> str:
        return self.full_method.rpartition("/")[2]


def final_code(call: RpcCall, exc: BaseException | None) -> grpc.StatusCode:
    """The status code a call ended with, seen from an interceptor's context manager."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    # Typed as StatusCode, but grpc.aio returns None until a code is set, then an int.
    code: object = call.context.code()
    if code is None:
        return grpc.StatusCode.OK if exc is None else grpc.StatusCode.UNKNOWN
    if isinstance(code, grpc.StatusCode):
        return code
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)


class AroundInterceptor(grpc.aio.ServerInterceptor):
    """Base class: subclasses implement `around`, and may filter client-streamed requests."""

    def around(self, call: RpcCall) -> AbstractAsyncContextManager[None]:
        raise NotImplementedError

    def filter_requests(self, call: RpcCall, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        return requests

    def filter_request(self, call: RpcCall, request: Any) -> Any:
        return request

    def adapt(self, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        """The handler to wrap (subclasses may swap its serializers)."""
        return handler

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        handler = self.adapt(handler)
        metadata = {
            key: value
            for key, value in handler_call_details.invocation_metadata
            if isinstance(value, str)
        }
        return _wrap(handler, self, handler_call_details.method, metadata)


def _wrap(
    handler: grpc.RpcMethodHandler[Any, Any],
    interceptor: AroundInterceptor,
    method: str,
    metadata: dict[str, str],
) -> grpc.RpcMethodHandler[Any, Any]:
    """A copy of `handler` whose behaviour runs inside `interceptor.around`."""

    def call_of(context: grpc.aio.ServicerContext[Any, Any]) -> RpcCall:
        return RpcCall(method, metadata, context)

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    # The stubs type behaviours as synchronous; on a grpc.aio server they are coroutines.
    inner: Callable[..., Any]
    if handler.unary_unary or handler.stream_unary:
        inner = cast(Callable[..., Any], handler.unary_unary or handler.stream_unary)
        streaming_requests = handler.stream_unary is not None

        async def unary_response(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            call = call_of(context)
            async with interceptor.around(call):
                if streaming_requests:
                    request = interceptor.filter_requests(call, request)
                else:
                    request = interceptor.filter_request(call, request)
                return await inner(request, context)

        if streaming_requests:
            return grpc.stream_unary_rpc_method_handler(unary_response, **serializers)
        return grpc.unary_unary_rpc_method_handler(unary_response, **serializers)

    inner = cast(Callable[..., Any], handler.unary_stream or handler.stream_stream)
    streaming_requests = handler.stream_stream is not None
    if inspect.isasyncgenfunction(inner):

        async def stream_response(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            call = call_of(context)
            async with interceptor.around(call):
                if streaming_requests:
                    request = interceptor.filter_requests(call, request)
                else:
                    request = interceptor.filter_request(call, request)
                async for response in inner(request, context):
                    yield response

        wrapped: Callable[..., Any] = stream_response
    else:  # a coroutine that sends responses with context.write()

        async def write_response(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            call = call_of(context)
            async with interceptor.around(call):
                if streaming_requests:
                    request = interceptor.filter_requests(call, request)
                else:
                    request = interceptor.filter_request(call, request)
                await inner(request, context)

        wrapped = write_response
    if streaming_requests:
        return grpc.stream_stream_rpc_method_handler(wrapped, **serializers)
    return grpc.unary_stream_rpc_method_handler(wrapped, **serializers)


class RequestContextInterceptor(AroundInterceptor):
    """Gives each call a request id (the client's `x-request-id`, or a new one), returns it in the
    response headers, puts it and the method into every log record of the call, and logs one line
    per finished call."""

    QUIET_SERVICES = frozenset({"grpc.health.v1.Health"})

    @asynccontextmanager
    async def around(self, call: RpcCall) -> AsyncIterator[None]:
        rid = call.metadata.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        method_token = logs.rpc_method.set(call.full_method)
        rid_token = logs.request_id.set(rid)
        await call.context.send_initial_metadata(((REQUEST_ID_HEADER, rid),))
        start = time.perf_counter()
        failure: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            failure = exc
            raise
        finally:
            code = final_code(call, failure)
            level = logging.DEBUG if call.service in self.QUIET_SERVICES else logging.INFO
            elapsed_ms = (time.perf_counter() - start) * 1000
            log.log(level, "finished %s in %.1fms", code.name, elapsed_ms)
            # A response stream the client left is closed by the event loop, in another context.
            with contextlib.suppress(ValueError):
                logs.rpc_method.reset(method_token)
                logs.request_id.reset(rid_token)


class ErrorInterceptor(AroundInterceptor):
    """Maps typed errors to their status codes with an ErrorInfo reason, and faults of the
    environment to theirs (`errors.environment_error`: RESOURCE_EXHAUSTED for a full disk,
    UNAVAILABLE for a locked or lost database); anything else is logged with its traceback and
    becomes INTERNAL "internal error".

    A client stream refused before its end (a reader's upload, one over the size limit) is read
    to its end, up to `DRAIN_BYTES` and `DRAIN_SECONDS`, before the status is sent: a grpc.aio
    client whose write fails after the status arrived reports INTERNAL "Internal error from
    Core" instead of that status (grpc/grpc#36066)."""

    DRAIN_BYTES = 16 * 1024 * 1024
    DRAIN_SECONDS = 10.0

    def __init__(self) -> None:
        self._streams: dict[int, AsyncIterator[Any]] = {}

    def filter_requests(self, call: RpcCall, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        self._streams[id(call.context)] = requests
        return requests

    @asynccontextmanager
    async def around(self, call: RpcCall) -> AsyncIterator[None]:
        try:
            yield
        except TunefleetError as exc:
            status = exc.to_status()
            await self._read_rest(call)
            await call.context.abort(status.code, status.details, status.trailing_metadata)
        except (AbortError, asyncio.CancelledError):
            raise  # the handler already chose its status, or the client went away
        except Exception as exc:
            fault = environment_error(exc)
            if fault is None:
                log.exception("unexpected error in %s", call.full_method)
                status = internal_status()
            else:
                log.warning("%s failed: %s (%s)", call.full_method, fault.message, exc)
                status = fault.to_status()
            await self._read_rest(call)
            await call.context.abort(status.code, status.details, status.trailing_metadata)
        finally:
            self._streams.pop(id(call.context), None)

    async def _read_rest(self, call: RpcCall) -> None:
        """Reads and drops what is left of the call's client stream (nothing for unary calls)."""
        requests = self._streams.pop(id(call.context), None)
        if requests is None:
            return

        async def read() -> None:
            total = 0
            async for request in requests:
                total += len(request) if isinstance(request, bytes) else request.ByteSize()
                if total > self.DRAIN_BYTES:
                    return

        with contextlib.suppress(Exception):
            await asyncio.wait_for(read(), self.DRAIN_SECONDS)


class GateInterceptor(AroundInterceptor):
    """Lets a call through only while its service is up: before the service has started it is
    refused with UNAVAILABLE (SERVICE_STARTING), and once `drain()` is called (at SIGTERM) every
    new call is (SHUTTING_DOWN; grpcio's own stop cancels calls that race it, which clients read
    as CANCELLED). Counts the calls in flight for the drain. Services it was not told about
    (health, reflection) always pass, so probes see the health status."""

    def __init__(self, services: Sequence[str] = ()) -> None:
        self.gated, self.started = set(services), set[str]()
        self.draining = False
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def open(self, service: str) -> None:
        """`service` has started: let its calls through."""
        self.started.add(service)

    @asynccontextmanager
    async def around(self, call: RpcCall) -> AsyncIterator[None]:
        if call.service not in self.gated:
            yield
            return
        if self.draining:
            raise Unavailable(
                "the server is shutting down: retry on another replica", reason="SHUTTING_DOWN"
            )
        if call.service not in self.started:
            raise Unavailable(
                f"{call.service} is starting: retry shortly", reason="SERVICE_STARTING"
            )
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if not self.active:
                self._idle.set()

    async def drain(self, grace: float) -> None:
        """Refuse new calls; wait up to `grace` seconds for those in flight."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)


@dataclass(frozen=True)
class Undecodable:
    """A request message the method's parser refused, kept until the call's checks
    (authentication first) have run."""

    size: int

    def ByteSize(self) -> int:  # a protobuf message's name for it
        return self.size


class CheckInterceptor(AroundInterceptor):
    """The innermost interceptor: every request message is checked here, after authentication.
    Bytes that do not parse as the method's request would make grpcio answer UNKNOWN (naming the
    parser's exception) or INTERNAL before any interceptor runs; here they reach the call as
    `Undecodable` and are refused as INVALID_ARGUMENT (UNDECODABLE_REQUEST). Messages that parse
    get the checks of `fields.check_request` (NUL and control characters, lengths, enums)."""

    def adapt(self, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        parse = handler.request_deserializer
        if parse is None:
            return handler

        def tolerant(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception:
                return Undecodable(len(data))

        adapted: grpc.RpcMethodHandler[Any, Any] = cast(Any, handler)._replace(
            request_deserializer=tolerant
        )
        return adapted

    @asynccontextmanager
    async def around(self, call: RpcCall) -> AsyncIterator[None]:
        yield

    def filter_request(self, call: RpcCall, request: Any) -> Any:
        if isinstance(request, Undecodable):
            raise InvalidArgument(
                "request",
                f"{request.size} bytes that do not parse as {call.method}'s request message",
                reason="UNDECODABLE_REQUEST",
            )
        if isinstance(request, Message):
            check_request(request)
        return request

    async def filter_requests(
        self, call: RpcCall, requests: AsyncIterator[Any]
    ) -> AsyncIterator[Any]:
        async for request in requests:
            yield self.filter_request(call, request)


class UploadLimitInterceptor(AroundInterceptor):
    """Caps the total size of a client stream: past `max_upload_bytes` the call fails with
    RESOURCE_EXHAUSTED (reason UPLOAD_TOO_LARGE)."""

    def __init__(self, max_upload_bytes: int) -> None:
        self.max_upload_bytes = max_upload_bytes

    @asynccontextmanager
    async def around(self, call: RpcCall) -> AsyncIterator[None]:
        yield

    async def filter_requests(
        self, call: RpcCall, requests: AsyncIterator[Any]
    ) -> AsyncIterator[Any]:
        total = 0
        async for request in requests:
            total += len(request) if isinstance(request, bytes) else request.ByteSize()
            if total > self.max_upload_bytes:
                raise ResourceExhausted(
                    f"upload exceeds the limit of {self.max_upload_bytes} bytes",
                    reason="UPLOAD_TOO_LARGE",
                    metadata={"limit_bytes": str(self.max_upload_bytes)},
                )
            yield request
