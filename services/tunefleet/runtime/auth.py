"""Bearer-token authentication with roles.

Each RPC of the API declares the least role it needs with the `(tunefleet.v1.required_role)`
method option; the interceptor reads it from the descriptor. Tokens live in a YAML file, stored
only as sha256 digests:

    tokens:
      - subject: ci-bot          # who; recorded in audit trails
        role: writer             # reader | writer | admin
        sha256: 9f86d0...        # hex sha256 of the token (`printf %s TOKEN | sha256sum`)
        services: [AdapterService]  # optional: only these services' RPCs (a service's token)

Clients send `authorization: Bearer <token>`. A missing or unknown token is UNAUTHENTICATED; a
known token with too small a role, or for other services, is PERMISSION_DENIED. Health checks and
reflection stay open.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from google.protobuf import descriptor_pool
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunefleet.core.errors import PermissionDenied, Unauthenticated
from tunefleet.runtime.interceptors import AroundInterceptor, RpcCall
from tunefleet.v1 import auth_pb2

ApiService = Literal["DatasetService", "TrainingService", "AdapterService", "InferenceService"]
PUBLIC_SERVICE_PREFIXES = ("grpc.health.", "grpc.reflection.")
ROLE_RANK = {
    auth_pb2.ACCESS_ROLE_READER: 1,
    auth_pb2.ACCESS_ROLE_WRITER: 2,
    auth_pb2.ACCESS_ROLE_ADMIN: 3,
}
ROLE_BY_NAME = {
    "reader": auth_pb2.ACCESS_ROLE_READER,
    "writer": auth_pb2.ACCESS_ROLE_WRITER,
    "admin": auth_pb2.ACCESS_ROLE_ADMIN,
}


@dataclass(frozen=True)
class Principal:
    """Who is calling."""

    subject: str
    role: auth_pb2.AccessRole.ValueType
    services: frozenset[str] | None = None  # the API services it may call; None: all


ANONYMOUS = Principal("anonymous", auth_pb2.ACCESS_ROLE_ADMIN)
current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "current_principal", default=ANONYMOUS
)


class _TokenEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subject: str = Field(min_length=1)
    role: Literal["reader", "writer", "admin"]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    services: list[ApiService] | None = Field(default=None, min_length=1)


class _TokensFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: list[_TokenEntry]


class TokenStore:
    """Known tokens, by sha256 digest."""

    def __init__(self, principals_by_digest: dict[str, Principal]) -> None:
        self._by_digest = principals_by_digest

    @classmethod
    def from_file(cls, path: Path) -> TokenStore:
        """Read a tokens file; raises ValueError naming the file and the bad entry."""
        try:
            parsed = _TokensFile.model_validate(yaml.safe_load(path.read_text()))
        except (OSError, yaml.YAMLError, ValidationError) as exc:
            raise ValueError(f"tokens file {str(path)!r}: {exc}") from None
        return cls(
            {
                e.sha256: Principal(
                    e.subject,
                    ROLE_BY_NAME[e.role],
                    frozenset(e.services) if e.services is not None else None,
                )
                for e in parsed.tokens
            }
        )

    def authenticate(self, token: str) -> Principal | None:
        digest = hashlib.sha256(token.encode()).hexdigest()
        for known, principal in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return principal
        return None


@functools.cache
def required_role(full_method: str) -> auth_pb2.AccessRole.ValueType | None:
    """The role an RPC declares, None for public services (health, reflection), and
    ACCESS_ROLE_UNSPECIFIED for unknown methods or methods that declare none."""
    service, _, method = full_method.lstrip("/").partition("/")
    if service.startswith(PUBLIC_SERVICE_PREFIXES):
        return None
    try:
        service_descriptor = descriptor_pool.Default().FindServiceByName(service)
    except KeyError:
        return auth_pb2.ACCESS_ROLE_UNSPECIFIED
    method_descriptor = service_descriptor.methods_by_name.get(method)
    if method_descriptor is None:
        return auth_pb2.ACCESS_ROLE_UNSPECIFIED
    options = method_descriptor.GetOptions()
    role: auth_pb2.AccessRole.ValueType = options.Extensions[auth_pb2.required_role]
    return role


class AuthInterceptor(AroundInterceptor):
    """Checks the bearer token of every call against the role its RPC requires."""

    def __init__(self, tokens: TokenStore) -> None:
        self.tokens = tokens

    @asynccontextmanager
    async def around(self, call: RpcCall) -> AsyncIterator[None]:
        needed = required_role(call.full_method)
        if needed is None or needed == auth_pb2.ACCESS_ROLE_TRAINING_WORKER:
            # Public, or checked by the service against the job's own worker token.
            yield
            return
        principal = self._principal(call)
        if (
            needed == auth_pb2.ACCESS_ROLE_UNSPECIFIED
            or ROLE_RANK[principal.role] < ROLE_RANK[needed]
        ):
            role, needed_role = _role_name(principal.role), _role_name(needed)
            raise PermissionDenied(
                f"{principal.subject} ({role}) may not call {call.full_method}, "
                f"which requires {needed_role}",
                reason="ROLE_TOO_LOW",
                metadata={"required_role": needed_role, "role": role},
            )
        service = call.full_method.split("/")[1].removeprefix("tunefleet.v1.")
        if principal.services is not None and service not in principal.services:
            raise PermissionDenied(
                f"{principal.subject} may call {', '.join(sorted(principal.services))} only, "
                f"not {call.full_method}",
                reason="SERVICE_NOT_ALLOWED",
                metadata={"service": service},
            )
        token = current_principal.set(principal)
        try:
            yield
        finally:
            current_principal.reset(token)

    def _principal(self, call: RpcCall) -> Principal:
        header = call.metadata.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise Unauthenticated(
                "missing authorization metadata: send 'Bearer <token>'", reason="MISSING_TOKEN"
            )
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(
                "authorization metadata must be 'Bearer <token>'", reason="MALFORMED_TOKEN"
            )
        principal = self.tokens.authenticate(token.strip())
        if principal is None:
            raise Unauthenticated("unknown token", reason="UNKNOWN_TOKEN")
        return principal


def _role_name(role: auth_pb2.AccessRole.ValueType) -> str:
    return auth_pb2.AccessRole.Name(role).removeprefix("ACCESS_ROLE_").lower()
