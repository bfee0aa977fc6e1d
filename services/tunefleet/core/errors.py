"""Typed errors that services raise, and their mapping to gRPC status codes.

Transport-free code raises these; the error interceptor turns them into a gRPC status with a
`google.rpc.ErrorInfo` detail (and a `google.rpc.BadRequest` field violation for bad input), so
clients get a machine-readable reason. Anything else that escapes a handler becomes INTERNAL
"internal error" and is logged with its traceback.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "tunefleet.v1"
# Bounds on what an error carries back, in UTF-8 bytes: a status travels in HTTP/2 trailers,
# whose size grpcio caps (8 KiB by default), and messages may quote client input.
MAX_MESSAGE_BYTES = 1024
MAX_METADATA_BYTES = 256


def bounded(text: str, limit: int) -> str:
    """`text`, cut to at most `limit` UTF-8 bytes (saying so) when it is longer."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 40].decode(errors="ignore") + f"... ({len(data)} bytes in all)"


class TunefleetError(Exception):
    """Base of every error a client is meant to see.

    `reason` is a stable UPPER_SNAKE_CASE identifier clients can switch on; `metadata` adds
    context (resource names, limits) as strings.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    default_reason: str = "UNKNOWN"

    def __init__(
        self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> None:
        message = bounded(message, MAX_MESSAGE_BYTES)
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = {
            key: bounded(value, MAX_METADATA_BYTES) for key, value in (metadata or {}).items()
        }

    def details(self) -> list[any_pb2.Any]:
        """Detail messages attached to the status."""
        info = any_pb2.Any()
        info.Pack(
            error_details_pb2.ErrorInfo(
                reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
            )
        )
        return [info]

    def to_status(self) -> grpc.Status:
        """The gRPC status (code, message and packed details) for this error."""
        code_value = self.code.value[0]
        status = status_pb2.Status(code=code_value, message=self.message, details=self.details())
        converted: grpc.Status = rpc_status.to_status(status)
        return converted


class InvalidArgument(TunefleetError):
    """The request is malformed; `field` names the offending field (for example `page_size`)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        field: str,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            f"{field}: {message}", reason=reason, metadata={"field": field, **(metadata or {})}
        )
        self.field = bounded(field, MAX_METADATA_BYTES)
        self.description = bounded(message, MAX_MESSAGE_BYTES)

    def details(self) -> list[any_pb2.Any]:
        bad_request = any_pb2.Any()
        bad_request.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=self.field, description=self.description
                    )
                ]
            )
        )
        return [*super().details(), bad_request]


class NotFound(TunefleetError):
    """The named resource does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(TunefleetError):
    """A resource with that name already exists."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(TunefleetError):
    """The system is not in a state in which the request can run (for example deleting a dataset
    that a job uses)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(TunefleetError):
    """A concurrency conflict, such as a compare-and-set that lost; the client may retry."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class ResourceExhausted(TunefleetError):
    """A size, count or rate limit was exceeded."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unauthenticated(TunefleetError):
    """No valid credentials were presented."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(TunefleetError):
    """The caller is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class DataLoss(TunefleetError):
    """Stored data is corrupt (for example a blob whose content no longer matches its sha256)."""

    code = grpc.StatusCode.DATA_LOSS
    default_reason = "DATA_LOSS"


class Unimplemented(TunefleetError):
    """The RPC exists in the API but this server does not implement it (yet)."""

    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "NOT_IMPLEMENTED"


class Unavailable(TunefleetError):
    """The service cannot answer now (an engine stopped, a route kept changing); retrying later
    may succeed."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


def relayed(error: grpc.RpcError | Exception, service: str) -> TunefleetError:
    """What a failed call to another tunefleet service means to the caller of this one: its own
    error (NOT_FOUND, INVALID_ARGUMENT with its field, ...) passed on with reason and metadata;
    a fault of that service or of the way there (UNAVAILABLE, INTERNAL, a deadline) UNAVAILABLE,
    so the caller retries; refused credentials FAILED_PRECONDITION (this service's own token
    for `service` is wrong: not the caller's fault). `error` is the call's, or the SDK's
    reading of it."""
    # The SDK reads status details already.
    from tunefleet.client.errors import TunefleetError as ClientError
    from tunefleet.client.errors import from_rpc_error

    if isinstance(error, ClientError):
        parsed = error
    elif isinstance(error, grpc.RpcError):
        parsed = from_rpc_error(error)
    else:
        raise TypeError(f"not the error of a call: {error!r}")
    code, message, metadata = parsed.code, parsed.message, dict(parsed.metadata)
    reason = None if parsed.reason == code.name else parsed.reason
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        metadata.pop("field", None)
        field = parsed.field or "request"
        description = message.removeprefix(f"{field}: ")
        return InvalidArgument(field, description, reason=reason, metadata=metadata)
    passed_on: dict[grpc.StatusCode, type[TunefleetError]] = {
        kind.code: kind
        for kind in (
            NotFound,
            AlreadyExists,
            FailedPrecondition,
            Aborted,
            ResourceExhausted,
            DataLoss,
        )
    }
    if code in passed_on:
        return passed_on[code](message, reason=reason, metadata=metadata)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return FailedPrecondition(
            f"this service's credentials for {service} are refused ({code.name}: {message})",
            reason="SERVICE_CREDENTIALS_REFUSED",
        )
    return Unavailable(
        f"{service} did not answer ({code.name}: {message}); retry",
        reason="UPSTREAM_UNAVAILABLE",
        metadata={"service": service},
    )


def environment_error(error: BaseException) -> TunefleetError | None:
    """The status of a fault of the server's environment rather than of the request or the
    code: a full disk, a database that is locked or unreachable, a read-only file system."""
    from sqlalchemy.exc import DBAPIError  # the server extra's: imported only when needed

    if isinstance(error, DBAPIError):
        if error.connection_invalidated:
            return Unavailable(
                "the database connection was lost: retry", reason="DATABASE_UNAVAILABLE"
            )
        error = error.orig if isinstance(error.orig, BaseException) else error
    text = str(error).lower()
    code = getattr(error, "errno", None)
    name = type(error).__name__
    if code in (errno.ENOSPC, errno.EDQUOT) or "disk is full" in text or name == "DiskFull":
        return ResourceExhausted(
            "the server's disk is full: nothing was stored; retry once space is freed",
            reason="DISK_FULL",
        )
    if code == errno.EROFS or "readonly database" in text:
        return Unavailable(
            "the server's storage is read-only: nothing was stored", reason="STORAGE_READ_ONLY"
        )
    if "database is locked" in text or "database table is locked" in text:
        return Unavailable(
            "the database is busy (locked by another writer): retry", reason="DATABASE_BUSY"
        )
    if name in ("OperationalError", "InterfaceError") and type(error).__module__.startswith(
        "psycopg"
    ):
        return Unavailable("the database is unreachable: retry", reason="DATABASE_UNAVAILABLE")
    return None


def internal_status() -> grpc.Status:
    """The status sent for unexpected failures: no internals leak to the client."""
    status = status_pb2.Status(code=code_pb2.INTERNAL, message="internal error")
    converted: grpc.Status = rpc_status.to_status(status)
    return converted
