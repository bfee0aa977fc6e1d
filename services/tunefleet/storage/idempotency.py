"""Idempotent creates (AIP-155): a retried create with the same `request_id` returns the resource
the first attempt created instead of creating another.

The key is recorded in the same transaction as the resource, so either both exist or neither.
Reusing a `request_id` for a different request is refused with INVALID_ARGUMENT.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import String
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from tunefleet.core.errors import InvalidArgument
from tunefleet.storage.database import Base, Database, utcnow


class IdempotencyKey(Base):
    """A request id already seen, with what it created."""

    __tablename__ = "idempotency_keys"
    scope: Mapped[str] = mapped_column(String(128), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    request_sha256: Mapped[str] = mapped_column(String(64))
    resource_name: Mapped[str] = mapped_column(String(512))
    create_time: Mapped[datetime]


def check_request_id(request_id: str) -> str:
    """The canonical form of a request id, which must be a UUID (AIP-155)."""
    try:
        return str(uuid.UUID(request_id))
    except ValueError:
        raise InvalidArgument("request_id", f"{request_id!r} is not a UUID") from None


def lookup(session: Session, scope: str, request_id: str, request_sha256: str) -> str | None:
    """The resource an earlier request with this id created, if any; INVALID_ARGUMENT if that
    request was a different one."""
    seen = session.get(IdempotencyKey, (scope, request_id))
    if seen is None:
        return None
    if seen.request_sha256 != request_sha256:
        raise InvalidArgument(
            "request_id", "was already used for a different request", reason="REQUEST_ID_REUSED"
        )
    return seen.resource_name


def remember(
    session: Session, scope: str, request_id: str, request_sha256: str, resource_name: str
) -> None:
    """Record what a request created, in the caller's transaction."""
    session.add(
        IdempotencyKey(
            scope=scope,
            request_id=request_id,
            request_sha256=request_sha256,
            resource_name=resource_name,
            create_time=utcnow(),
        )
    )
    session.flush()


def create_once(
    db: Database,
    *,
    scope: str,
    request_id: str,
    request_sha256: str,
    create: Callable[[Session], str],
) -> tuple[str, bool]:
    """Run `create` (which returns the new resource's name) unless `request_id` was seen in
    `scope` before. Returns the resource name and whether it was created now.

    `request_sha256` fingerprints the request without its request id; an empty `request_id`
    always creates.
    """
    if not request_id:
        with db.session() as session:
            return create(session), True
    request_id = check_request_id(request_id)
    for attempt in range(2):
        try:
            with db.session() as session:
                existing = lookup(session, scope, request_id, request_sha256)
                if existing is not None:
                    return existing, False
                name = create(session)
                remember(session, scope, request_id, request_sha256, name)
                return name, True
        except IntegrityError:
            if attempt:
                raise
            # A concurrent call with the same request id committed first; the next attempt
            # finds its key and returns its resource.
    raise AssertionError("unreachable")
