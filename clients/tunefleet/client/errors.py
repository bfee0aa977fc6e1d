"""The SDK's one exception family: every failed call raises a `TunefleetError` subclass chosen by
the gRPC status code, carrying the server's machine-readable reason and metadata.

Example::

    try:
        client.datasets.get("datasets/missing")
    except tunefleet.client.NotFound as error:
        print(error.code, error.reason, error.metadata)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import grpc
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"


class TunefleetError(Exception):
    """A call failed.

    Attributes:
        code: the gRPC status code.
        reason: the server's stable UPPER_SNAKE_CASE reason (`google.rpc.ErrorInfo.reason`), such as
            `INSUFFICIENT_GPU_MEMORY`; the code's name when the server sent none.
        message: the server's human-readable message.
        metadata: context from the server (resource names, limits) as strings.
        field: for bad input, the request field at fault (`google.rpc.BadRequest`), else "".
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        field: str = "",
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.reason = reason or self.code.name
        self.metadata = dict(metadata or {})
        self.field = field

    def __str__(self) -> str:
        """`NOT_FOUND: message`, or `FAILED_PRECONDITION ADAPTER_NOT_SERVABLE: message`."""
        reason = "" if self.reason == self.code.name else f" {self.reason}"
        return f"{self.code.name}{reason}: {self.message}"


class Cancelled(TunefleetError):
    code = grpc.StatusCode.CANCELLED


class InvalidArgument(TunefleetError):
    """The request is malformed; `field` names the offending field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(TunefleetError):
    """The call's deadline passed before it finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(TunefleetError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(TunefleetError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(TunefleetError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(TunefleetError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(TunefleetError):
    """The system is not in a state in which the request can run; see `reason`."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(TunefleetError):
    """A concurrency conflict (such as an alias moved by someone else); read and retry."""

    code = grpc.StatusCode.ABORTED


class Unimplemented(TunefleetError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(TunefleetError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(TunefleetError):
    """The server could not be reached; idempotent calls were retried before this was raised."""

    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(TunefleetError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(TunefleetError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[TunefleetError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def from_status(
    code: grpc.StatusCode, message: str, trailing_metadata: Iterable[tuple[str, str | bytes]]
) -> TunefleetError:
    """The exception for a failed call, with the reason and metadata of its status details."""
    reason, metadata, field = "", {}, ""
    for key, value in trailing_metadata or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(info):
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Unpack(bad_request) and bad_request.field_violations:
                field = bad_request.field_violations[0].field
    cls = _BY_CODE.get(code, TunefleetError)
    return cls(message, code=code, reason=reason, metadata=metadata, field=field)


def from_rpc_error(error: grpc.RpcError) -> TunefleetError:
    """Translate an error of the sync or asyncio gRPC API."""
    call: grpc.Call = error  # type: ignore[assignment]  # raised errors are also calls
    return from_status(call.code(), call.details() or "", call.trailing_metadata() or ())
