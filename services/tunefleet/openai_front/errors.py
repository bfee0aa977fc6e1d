"""OpenAI's error envelope, `{"error": {"message", "type", "param", "code"}}`, with the HTTP
statuses that openai-python maps to its exception classes (400 BadRequestError, 401
AuthenticationError, 403 PermissionDeniedError, 404 NotFoundError, 409 ConflictError, 429
RateLimitError, 5xx InternalServerError)."""

from __future__ import annotations

from typing import Any

import grpc
from starlette.responses import JSONResponse

from tunefleet.client import TunefleetError

# gRPC status -> (HTTP status, OpenAI error type)
STATUSES: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.ABORTED: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}

# Request fields of the gRPC API -> the OpenAI parameter that carries them.
PARAMS = {
    "adapter": "model",
    "chat.messages": "messages",
    "chat.tools": "tools",
    "sampling.max_tokens": "max_tokens",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.stop": "stop",
    "sampling.seed": "seed",
    "top_logprobs": "logprobs",
    "training_job.base_model": "model",
    "training_job.train_dataset": "training_file",
    "training_job.validation_dataset": "validation_file",
    "training_job.adapter": "suffix",
}


class OpenAIError(Exception):
    """An error to answer in OpenAI's envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(param: str, message: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}", param=param, code=code)


def translate(error: TunefleetError) -> OpenAIError:
    """A failed gRPC call as OpenAI reports the same failure: the status that openai-python
    raises the matching exception for, the field at fault as `param` and the service's reason
    as `code`."""
    status, kind = STATUSES.get(error.code, (500, "server_error"))
    param = None
    if error.field:
        param = PARAMS.get(error.field, PARAMS.get(error.field.split("[")[0], error.field))
    return OpenAIError(status, error.message, type=kind, param=param, code=error.reason.lower())
