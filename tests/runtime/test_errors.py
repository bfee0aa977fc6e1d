"""The error interceptor: typed errors become the right status code with an ErrorInfo reason;
anything unexpected becomes INTERNAL without leaking internals."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest

from tests.conftest import StartServer
from tests.helpers import error_info, field_violations, raw_service, unary, unary_stream
from tunefleet.core import errors

CASES = [
    (errors.NotFound("datasets/x not found"), grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
    (errors.AlreadyExists("adapters/a exists"), grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS"),
    (
        errors.FailedPrecondition("dataset in use", reason="DATASET_IN_USE"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "DATASET_IN_USE",
    ),
    (errors.ResourceExhausted("too big"), grpc.StatusCode.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"),
    (errors.Unauthenticated("no token"), grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
    (errors.PermissionDenied("no"), grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
    (errors.Aborted("lost the race"), grpc.StatusCode.ABORTED, "ABORTED"),
    (errors.DataLoss("corrupt"), grpc.StatusCode.DATA_LOSS, "DATA_LOSS"),
    (errors.Unimplemented("later"), grpc.StatusCode.UNIMPLEMENTED, "NOT_IMPLEMENTED"),
]


def failing_service(exc: BaseException) -> Any:
    async def unary(request: bytes, context: Any) -> bytes:
        raise exc

    async def server_stream(request: bytes, context: Any) -> Any:
        yield b"first"
        raise exc

    return raw_service(
        "test.Errors",
        {"Unary": ("unary_unary", unary), "Stream": ("unary_stream", server_stream)},
    )


@pytest.mark.parametrize(("exc", "code", "reason"), CASES, ids=lambda v: getattr(v, "name", ""))
async def test_typed_error_maps_to_code_and_reason(
    start_server: StartServer, exc: errors.TunefleetError, code: grpc.StatusCode, reason: str
) -> None:
    server = await start_server([failing_service(exc)])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await unary(channel, "/test.Errors/Unary")(b"")
    assert raised.value.code() == code
    assert raised.value.details() == exc.message
    info = error_info(raised.value)
    assert info is not None
    assert (info.reason, info.domain) == (reason, "tunefleet.v1")


async def test_invalid_argument_names_the_field(start_server: StartServer) -> None:
    exc = errors.InvalidArgument("page_size", "must not be negative, got -1")
    server = await start_server([failing_service(exc)])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await unary(channel, "/test.Errors/Unary")(b"")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "page_size: must not be negative, got -1"
    info = error_info(raised.value)
    assert info is not None and info.metadata["field"] == "page_size"
    assert field_violations(raised.value) == [("page_size", "must not be negative, got -1")]


async def test_error_in_the_middle_of_a_stream(start_server: StartServer) -> None:
    server = await start_server([failing_service(errors.NotFound("gone"))])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = unary_stream(channel, "/test.Errors/Stream")(b"")
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for message in call:
                received.append(message)
    assert received == [b"first"]
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_unexpected_exception_is_internal_and_logged(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server([failing_service(KeyError("secret_column_name"))])
    with caplog.at_level(logging.ERROR, logger="tunefleet.runtime.interceptors"):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await unary(channel, "/test.Errors/Unary")(b"")
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert raised.value.details() == "internal error"
    assert "secret_column_name" not in str(raised.value.debug_error_string())
    assert "secret_column_name" not in (raised.value.details() or "")
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and "KeyError" in caplog.text and "/test.Errors/Unary" in caplog.text


def _wrapped(orig: BaseException, invalidated: bool = False) -> Exception:
    """`orig` as SQLAlchemy raises a driver's error."""
    from sqlalchemy.exc import OperationalError

    return OperationalError("INSERT ...", {}, orig, connection_invalidated=invalidated)


def test_faults_of_the_environment_get_their_own_statuses() -> None:
    """The faults the real-server tests cannot stage here (test_faults.py stages a full disk
    and a locked SQLite file): a file system turned read-only under a running server, a lost
    or unreachable PostgreSQL."""
    import errno
    import sqlite3

    import psycopg

    cases = [
        (OSError(errno.EROFS, "Read-only file system"), "UNAVAILABLE", "STORAGE_READ_ONLY"),
        (
            _wrapped(sqlite3.OperationalError("attempt to write a readonly database")),
            "UNAVAILABLE",
            "STORAGE_READ_ONLY",
        ),
        (
            _wrapped(psycopg.OperationalError("connection refused")),
            "UNAVAILABLE",
            "DATABASE_UNAVAILABLE",
        ),
        (
            _wrapped(Exception("server closed"), invalidated=True),
            "UNAVAILABLE",
            "DATABASE_UNAVAILABLE",
        ),
        (OSError(errno.ENOSPC, "No space left on device"), "RESOURCE_EXHAUSTED", "DISK_FULL"),
    ]
    for error, code, reason in cases:
        fault = errors.environment_error(error)
        assert fault is not None, error
        assert (fault.code.name, fault.reason) == (code, reason), error
    assert errors.environment_error(KeyError("a bug")) is None  # a bug stays INTERNAL


def failed_call(error: errors.TunefleetError) -> grpc.aio.AioRpcError:
    """What a client of another service holds when that service raised `error`."""
    status = error.to_status()
    return grpc.aio.AioRpcError(
        status.code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*status.trailing_metadata),
        status.details,
    )


@pytest.mark.parametrize(
    ("upstream", "code", "reason", "field"),
    [
        (
            errors.NotFound("adapters/x not found", reason="ADAPTER_NOT_FOUND"),
            "NOT_FOUND",
            "ADAPTER_NOT_FOUND",
            "",
        ),
        (
            errors.InvalidArgument("name", "is not a version"),
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
            "name",
        ),
        (
            errors.PermissionDenied("reader may not"),
            "FAILED_PRECONDITION",
            "SERVICE_CREDENTIALS_REFUSED",
            "",
        ),
        (errors.Unavailable("restarting"), "UNAVAILABLE", "UPSTREAM_UNAVAILABLE", ""),
    ],
)
def test_another_services_error_is_passed_on_as_the_callers_own(
    upstream: errors.TunefleetError, code: str, reason: str, field: str
) -> None:
    relayed = errors.relayed(failed_call(upstream), "AdapterService")
    assert (relayed.code.name, relayed.reason) == (code, reason)
    assert getattr(relayed, "field", "") == field
    if field:  # the description once, not prefixed with the field twice
        assert relayed.message == "name: is not a version"
    if code == "NOT_FOUND":
        assert relayed.message == "adapters/x not found"
